#!/usr/bin/env python3
"""Image-text retrieval benchmark (issue 8): ours against a brute-force numpy baseline, in one run.

    /opt/venv-ref/bin/python tools/bench/retrieval.py              # builds blip2 (release) first
    /opt/venv-ref/bin/python tools/bench/retrieval.py --no-build --sizes 10000,100000

1. `blip2 bench retrieval --json`: images/s and texts/s embedded by the retrieval model with random
   weights ("base": ViT-B/14 at 224 px + the BERT-base Q-Former with text input, 32 queries,
   D = 256), ITM pairs/s, and the search latency of the retrieval tier's index (text -> images:
   [N*32, 256] @ [256] then max over each image's 32 queries, top-k; image -> texts) over N random
   unit embeddings per --sizes.
2. The same searches in numpy (float32, the same shapes, the same thread count: OMP/OPENBLAS
   threads = blip2's), brute force: `(E @ t).reshape(N, 32).max(1)` then argpartition.
3. Prints a Markdown table with the ratios and writes target/bench/retrieval.json.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def bench_ours(args):
    binary = REPO / "target" / "release" / "blip2"
    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "-p", "blip2-server"], cwd=REPO, check=True)
    cmd = [str(binary), "bench", "retrieval", "--json", "--index-sizes", args.sizes,
           "--searches", str(args.searches), "--top-k", str(args.top_k),
           "--images", str(args.images), "--texts", str(args.texts)]
    if args.no_model:
        cmd.append("--no-model")
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def bench_numpy(n, searches, top_k, q=32, d=256):
    import numpy as np

    rng = np.random.default_rng(n)

    def units(rows):
        v = rng.standard_normal((rows, d), dtype=np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        return v

    images = np.empty((n * q, d), dtype=np.float32)
    for s in range(0, n * q, 1 << 20):
        e = min(n * q, s + (1 << 20))
        images[s:e] = units(e - s)
    texts = units(n)
    text_queries = units(searches)
    image_queries = units(searches * q).reshape(searches, q, d)

    def by_text(t):
        scores = (images @ t).reshape(n, q).max(axis=1)
        top = np.argpartition(-scores, top_k - 1)[:top_k]
        return top[np.argsort(-scores[top])]

    def by_image(im):
        scores = (texts @ im.T).max(axis=1)
        top = np.argpartition(-scores, top_k - 1)[:top_k]
        return top[np.argsort(-scores[top])]

    by_text(text_queries[0])  # warm-up
    t_ms = []
    for t in text_queries:
        t0 = time.perf_counter()
        by_text(t)
        t_ms.append((time.perf_counter() - t0) * 1e3)
    i_ms = []
    for im in image_queries:
        t0 = time.perf_counter()
        by_image(im)
        i_ms.append((time.perf_counter() - t0) * 1e3)
    del images, texts
    t_ms.sort()
    i_ms.sort()
    return dict(indexed=n, search_by_text_ms_mean=sum(t_ms) / len(t_ms), search_by_text_ms_p50=t_ms[len(t_ms) // 2],
                search_by_image_ms_mean=sum(i_ms) / len(i_ms), search_by_image_ms_p50=i_ms[len(i_ms) // 2])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10000,100000")
    p.add_argument("--searches", type=int, default=20)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--texts", type=int, default=256)
    p.add_argument("--no-model", action="store_true", help="search latency only")
    p.add_argument("--no-build", action="store_true")
    args = p.parse_args()

    ours = bench_ours(args)
    threads = str(ours["threads"])
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = threads  # before numpy is imported
    import numpy as np

    baseline = [bench_numpy(int(n), args.searches, args.top_k) for n in args.sizes.split(",")]
    result = dict(ours=ours, numpy=baseline, numpy_version=np.__version__, threads=ours["threads"])
    out = REPO / "target" / "bench" / "retrieval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    e = ours.get("embed")
    if e:
        print(f"\nEmbedding ({e['shape']}, random weights, {ours['threads']} threads): "
              f"{e['images_per_second']:.2f} images/s (batch {e['batch']}), "
              f"{e['texts_per_second']:.1f} texts/s ({e['mean_text_tokens']:.1f} tokens each, batches of 32), "
              f"{e['itm_pairs_per_second']:.1f} ITM pairs/s\n")
    print("| indexed | text -> images: ours mean / p50 ms | numpy mean / p50 ms | ours / numpy | "
          "image -> texts: ours mean ms | numpy mean ms | ours / numpy |")
    print("|---|---|---|---|---|---|---|")
    for o, b in zip(ours["search"], baseline):
        print(f"| {o['indexed']:,} | {o['search_by_text_ms_mean']:.1f} / {o['search_by_text_ms_p50']:.1f} | "
              f"{b['search_by_text_ms_mean']:.1f} / {b['search_by_text_ms_p50']:.1f} | "
              f"{o['search_by_text_ms_mean'] / b['search_by_text_ms_mean']:.2f} | "
              f"{o['search_by_image_ms_mean']:.2f} | {b['search_by_image_ms_mean']:.2f} | "
              f"{o['search_by_image_ms_mean'] / b['search_by_image_ms_mean']:.2f} |")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    sys.exit(main())
