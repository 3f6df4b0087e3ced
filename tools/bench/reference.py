#!/usr/bin/env python3
"""The transformers side of the benchmark: Blip2ForConditionalGeneration (fp32, CPU, 2 threads)
with random weights at the shapes of `blip2 bench --shape` (tools/bench/shapes.py), measuring the
same things as `blip2 bench` and `blip2 bench load`, so that tools/bench/run.py can state every
figure of ours as a ratio measured in the same run on the same machine.

    /opt/venv-ref/bin/python tools/bench/reference.py --shape base --concurrency 1 2 4 8 --json out.json

Single model (as services/server/src/bench.rs measures it):
  - encode: vision model + Q-Former + projection of one 224 px image (get_image_features), mean
    of --images runs after one warm-up;
  - prefill: the language model over 32 soft-prompt positions + --text-tokens tokens;
  - decode at batch 1 and 8: --new-tokens forward steps on a KV cache (fixed input tokens).
Serving equivalent ("concurrent sessions"): for each --concurrency N, one batched
`generate(pixel_values, input_ids)` of N image prompts, greedy, exactly --new-tokens tokens
(min_new_tokens = max_new_tokens), timed with a streamer: TTFT (call to first token, vision and
prefill included), inter-token gaps, tokens/s = N * new_tokens / wall. That is what transformers
offers for N users at once: one static batch, every request starting and ending together.
"""

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shapes  # noqa: E402


def percentile(values, p):
    """numpy's default (linear) percentile, as the Rust side computes it."""
    if not values:
        return None
    v = sorted(values)
    rank = p / 100 * (len(v) - 1)
    lo = int(rank)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (rank - lo)


def dist_ms(seconds):
    ms = [s * 1e3 for s in seconds]
    return {
        "count": len(ms),
        "mean": sum(ms) / len(ms) if ms else None,
        "p50": percentile(ms, 50),
        "p95": percentile(ms, 95),
        "p99": percentile(ms, 99),
        "max": max(ms) if ms else None,
    }


class StepTimer:
    """A generate() streamer that timestamps each step. generate() first puts the prompt ids
    (decoder-only models), then one tensor of new tokens per step."""

    def __init__(self):
        self.times = []
        self.prompt_seen = False

    def put(self, value):
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self):
        pass


def log(message):
    print(message, file=sys.stderr, flush=True)


@torch.inference_mode()
def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="base", choices=["base", "opt-2.7b"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--images", type=int, default=3, help="encode runs after a warm-up")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--text-tokens", type=int, default=8,
                        help="text tokens after the soft prompt (BOS included)")
    parser.add_argument("--generate-text-tokens", type=int,
                        help="text tokens (BOS included) of the batched-generate prompts; default "
                        "--text-tokens (run.py passes the session tier's first-turn prompt length)")
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 8],
                        help="batch sizes of the batched-generate runs (none: skip them)")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"],
                        help="attention implementation (sdpa: transformers' default)")
    parser.add_argument("--json", type=Path, help="write the result here")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from transformers import Blip2ForConditionalGeneration
    import transformers

    config = shapes.config(args.shape)
    config._attn_implementation = args.attn
    log(f"[reference {args.shape}] building random weights")
    model = Blip2ForConditionalGeneration(config).eval()
    lm = model.language_model
    n_query = config.num_query_tokens
    size = config.vision_config.image_size
    pixels = torch.randn(1, 3, size, size)

    def encode(p):
        return model.get_image_features(pixel_values=p).pooler_output

    encode(pixels)  # warm-up
    start = time.perf_counter()
    for _ in range(args.images):
        soft_prompt = encode(pixels)
    encode_s = (time.perf_counter() - start) / max(args.images, 1)
    log(f"[reference {args.shape}] encode: {encode_s:.3f} s/image")

    text_ids = torch.arange(100, 100 + args.text_tokens).unsqueeze(0)
    prompt = torch.cat([soft_prompt, lm.get_input_embeddings()(text_ids)], dim=1)
    positions = prompt.shape[1]
    lm(inputs_embeds=prompt, use_cache=True)  # warm-up
    start = time.perf_counter()
    lm(inputs_embeds=prompt, use_cache=True)
    prefill_s = time.perf_counter() - start
    log(f"[reference {args.shape}] prefill of {positions} positions: {prefill_s:.3f} s")

    def decode(batch):
        out = lm(inputs_embeds=prompt.expand(batch, -1, -1), use_cache=True)
        # transformers 5.x names the KV cache `cache` (`past_key_values` is deprecated).
        kv = out.cache
        mask = torch.ones(batch, positions, dtype=torch.long)
        start = time.perf_counter()
        for step in range(args.new_tokens):
            tokens = torch.full((batch, 1), 200 + step, dtype=torch.long)
            mask = torch.cat([mask, torch.ones(batch, 1, dtype=torch.long)], dim=1)
            out = lm(input_ids=tokens, cache=kv, attention_mask=mask, use_cache=True)
            kv = out.cache
        return batch * args.new_tokens / (time.perf_counter() - start)

    decode_b1 = decode(1)
    log(f"[reference {args.shape}] decode batch 1: {decode_b1:.1f} tokens/s")
    decode_b8 = decode(8)
    log(f"[reference {args.shape}] decode batch 8: {decode_b8:.1f} tokens/s")

    def batched_generate(n, new_tokens):
        ids = [config.image_token_index] * n_query + [config.text_config.bos_token_id]
        ids += list(range(100, 100 + generate_text_tokens - 1))
        input_ids = torch.tensor([ids] * n, dtype=torch.long)
        timer = StepTimer()
        start = time.perf_counter()
        out = model.generate(
            pixel_values=torch.randn(n, 3, size, size),
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            num_beams=1,
            streamer=timer,
        )
        wall = time.perf_counter() - start
        times = timer.times
        # One put per step; the output's length says the same when no streamer call was seen.
        generated = len(times) or out.shape[1] - input_ids.shape[1]
        ttft = times[0] - start if times else wall
        gaps = [b - a for a, b in zip(times, times[1:])]
        return {
            "batch": n,
            "wall_seconds": wall,
            "generated_tokens_per_sequence": int(generated),
            "tokens_per_second": n * int(generated) / wall,
            "requests_per_second": n / wall,
            # Every sequence of a static batch gets its first token at the same time.
            "ttft_ms": dist_ms([ttft]),
            "itl_ms": dist_ms(gaps),
        }

    generate_text_tokens = args.generate_text_tokens or args.text_tokens
    generate_runs = []
    if args.concurrency:
        batched_generate(1, 2)  # warm-up
    for n in args.concurrency:
        run = batched_generate(n, args.new_tokens)
        log(f"[reference {args.shape}] generate batch {n}: {run['tokens_per_second']:.1f} tokens/s, "
            f"TTFT {run['ttft_ms']['p50']:.0f} ms, ITL p99 {run['itl_ms']['p99'] or 0:.0f} ms")
        generate_runs.append(run)

    result = {
        "shape": args.shape,
        "implementation": f"transformers {transformers.__version__} / torch {torch.__version__}, "
                          f"fp32, {args.attn} attention, {args.threads} threads",
        "machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count()},
        "encode_seconds_per_image": encode_s,
        "encode_images_per_second": 1 / encode_s,
        "prefill_seconds": prefill_s,
        "prompt_positions": positions,
        "decode_tokens_per_second_batch1": decode_b1,
        "decode_tokens_per_second_batch8": decode_b8,
        "new_tokens": args.new_tokens,
        "text_tokens": args.text_tokens,
        "generate_text_tokens": generate_text_tokens,
        "generate": generate_runs,
    }
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
