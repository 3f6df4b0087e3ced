#!/usr/bin/env python3
"""Issue 4's benchmark in one run: ours and transformers on the same machine, every figure also a
ratio, so that noise of the machine (other builds, thermal state) hits both sides alike.

    /opt/venv-ref/bin/python tools/bench/run.py                    # the full measurement
    /opt/venv-ref/bin/python tools/bench/run.py --smoke            # minutes: is the pipeline whole?

Steps: build `blip2` (release); save the random "base" checkpoint under target/bench/base if it is
missing (make_random_checkpoint.py); `blip2 bench --json` (single model, random weights) for each
--shape, and again with an int8 LLM when the binary has `--llm-weights`; `blip2 serve all` on the
checkpoint with `blip2 bench load` at each --concurrency (sessions at once, --turns turns each,
the first with an image); the server stopped, reference.py (transformers, 2 threads) on the same
shapes and prompt lengths. Writes target/bench/results.json (every input JSON, the ratios, the
targets met or not), a PNG plot (--plot), and prints Markdown tables for BENCHMARKS.md.

Needs the Python of tools/bench/requirements.txt (torch, transformers, matplotlib).
"""

import argparse
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
COMMANDS = []


def log(message):
    print(f"[run] {message}", file=sys.stderr, flush=True)


def run(cmd, capture=False, **kwargs):
    """Runs a command from the repository root, recording it for results.json."""
    COMMANDS.append(shlex.join(str(c) for c in cmd))
    log(COMMANDS[-1])
    if capture:
        out = subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.PIPE, text=True, **kwargs)
        return out.stdout
    subprocess.run(cmd, cwd=REPO, check=True, **kwargs)
    return None


def machine():
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cpus": os.cpu_count(), "platform": platform.platform()}


class Server:
    """`blip2 serve all` in the background; stopped with SIGTERM (then SIGKILL) on exit."""

    def __init__(self, binary, model, extra):
        help_text = subprocess.run([str(binary), "serve", "all", "--help"], stdout=subprocess.PIPE,
                                   text=True, check=True).stdout
        cmd = [str(binary), "serve", "all", "--listen", "127.0.0.1:0", "--model", str(model)]
        if "--http-listen" in help_text:
            cmd += ["--http-listen", "off"]  # no gateway on a fixed port; it is not measured
        cmd += extra
        COMMANDS.append(shlex.join(cmd))
        log(COMMANDS[-1])
        self.log = open(REPO / "target" / "bench" / "server.log", "w")
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.addr = None
        deadline = time.time() + 600
        for line in self.proc.stdout:
            if line.startswith("blip2 session listening on "):
                self.addr = "http://" + line.split()[-1]
                break
            if time.time() > deadline:
                break
        # Keep reading its stdout so that the server never blocks on a full pipe.
        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()
        if self.addr is None:
            self.stop()
            raise SystemExit("blip2 serve all did not start: see target/bench/server.log")
        log(f"session tier at {self.addr}")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def ratio(a, b):
    return a / b if a is not None and b else None


def fmt(v, digits=2):
    return "-" if v is None else f"{v:.{digits}f}"


def target(name, value, op, bound):
    met = None if value is None else (value <= bound if op == "<=" else value >= bound if op == ">=" else value < bound)
    return {"target": name, "value": value, "bound": f"{op} {bound}", "met": met}


def plot(load_rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing (pip install -r tools/bench/requirements.txt): no plot")
        return False
    xs = [r["concurrency"] for r in load_rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.plot(xs, [r["ours"]["tokens_per_second"] for r in load_rows], "o-", label="blip2 (session tier)")
    ref = [(r["concurrency"], r["reference"]["tokens_per_second"]) for r in load_rows if r["reference"]]
    if ref:
        left.plot(*zip(*ref), "s--", label="transformers batched generate")
    left.set_xlabel("concurrent sessions")
    left.set_ylabel("generated tokens/s")
    left.set_title("Throughput")
    left.set_xticks(xs)
    left.legend()
    right.plot(xs, [r["ours"]["all_turns"]["itl_ms"]["p99"] for r in load_rows], "o-", label="blip2 ITL p99")
    right.plot(xs, [r["ours"]["first_turns"]["ttft_ms"]["p99"] for r in load_rows], "^-", label="blip2 TTFT p99 (first turn)")
    later = [(r["concurrency"], r["ours"]["later_turns"]["ttft_ms"]["p99"]) for r in load_rows
             if r["ours"]["later_turns"]["ttft_ms"]["p99"] is not None]
    if later:
        right.plot(*zip(*later), "v-", label="blip2 TTFT p99 (later turns)")
    if ref:
        right.plot(*zip(*[(r["concurrency"], r["reference"]["itl_ms"]["p99"]) for r in load_rows if r["reference"]]),
                   "s--", label="transformers ITL p99")
        right.plot(*zip(*[(r["concurrency"], r["reference"]["ttft_ms"]["p99"]) for r in load_rows if r["reference"]]),
                   "d--", label="transformers TTFT")
    right.axhline(250, color="gray", linewidth=0.8, linestyle=":", label="250 ms")
    right.set_yscale("log")
    right.set_xlabel("concurrent sessions")
    right.set_ylabel("ms")
    right.set_title("p99 latency")
    right.set_xticks(xs)
    right.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    log(f"plot: {path}")
    return True


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="small and quick: concurrency 1 2, 8 new tokens, 1 image, base only")
    parser.add_argument("--shape", nargs="+", default=["base"], choices=["base", "opt-2.7b"],
                        help="single-model shapes (opt-2.7b: ~16 GB of RAM per side, minutes)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--turns", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--images", type=int, default=3, help="encode runs of the single-model benches")
    parser.add_argument("--checkpoint", type=Path, default=REPO / "target" / "bench" / "base")
    parser.add_argument("--out", type=Path, default=REPO / "target" / "bench")
    parser.add_argument("--plot", type=Path, default=REPO / "docs" / "bench.png")
    parser.add_argument("--no-build", action="store_true", help="use target/release/blip2 as it is")
    parser.add_argument("--serve-arg", action="append", default=[],
                        help="extra argument of `blip2 serve all` (repeat), e.g. --serve-arg=--llm-max-batch=16")
    args = parser.parse_args()
    if args.smoke:
        args.concurrency, args.new_tokens, args.images, args.shape = [1, 2], 8, 1, ["base"]

    # The f32 figures must be f32 whatever the caller's environment says.
    for variable in ("BLIP2_LLM_WEIGHTS", "BLIP2_MODEL"):
        if os.environ.pop(variable, None) is not None:
            log(f"ignoring {variable} from the environment")
    python = sys.executable
    binary = REPO / "target" / "release" / "blip2"
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.no_build:
        run(["cargo", "build", "--release", "--bin", "blip2"])
    if not (args.checkpoint / "model.safetensors").exists():
        run([python, HERE / "make_random_checkpoint.py", "--shape", "base", "--out", args.checkpoint])

    # 1. Ours, single model.
    bench_new_tokens = args.new_tokens
    single = {}
    for shape in args.shape:
        new_tokens = bench_new_tokens if shape == "base" else min(bench_new_tokens, 8)
        images = args.images if shape == "base" else 1
        common = ["--shape", shape, "--images", str(images), "--new-tokens", str(new_tokens), "--json"]
        ours = json.loads(run([binary, "bench", *common], capture=True))[0]
        single[shape] = {"ours": ours, "new_tokens": new_tokens, "images": images}
    help_text = run([binary, "bench", "--help"], capture=True)
    int8 = None
    if "--llm-weights" in help_text:
        try:
            out = run([binary, "bench", "--shape", "base", "--images", "1", "--new-tokens",
                       str(bench_new_tokens), "--llm-weights", "int8", "--json"], capture=True)
            int8 = json.loads(out)[0]
        except subprocess.CalledProcessError as e:
            log(f"int8 bench failed: {e}")
    else:
        log("this blip2 has no `bench --llm-weights`: no int8 figure")

    # 2. Ours, serving: the session tier under N concurrent sessions.
    load = {}
    server = Server(binary, args.checkpoint, args.serve_arg)
    try:
        for n in args.concurrency:
            path = args.out / f"load-c{n}.json"
            run([binary, "bench", "load", "--addr", server.addr, "--sessions", str(n), "--turns",
                 str(args.turns), "--new-tokens", str(args.new_tokens), "--json", path])
            load[n] = json.loads(path.read_text())
    finally:
        server.stop()
    first_prompt = load[args.concurrency[0]]["first_turns"]["mean_prompt_tokens"] or 41
    generate_text_tokens = max(int(round(first_prompt)) - 32, 1)

    # 3. transformers, with the machine to itself again.
    for shape in args.shape:
        s = single[shape]
        path = args.out / f"reference-{shape}.json"
        cmd = [python, HERE / "reference.py", "--shape", shape, "--images", str(s["images"]),
               "--new-tokens", str(s["new_tokens"]), "--json", path]
        if shape == "base":
            cmd += ["--generate-text-tokens", str(generate_text_tokens), "--concurrency",
                    *[str(n) for n in args.concurrency]]
        else:
            cmd += ["--concurrency"]
        run(cmd, stdout=subprocess.DEVNULL)
        s["reference"] = json.loads(path.read_text())
        o, r = s["ours"], s["reference"]
        s["ratios"] = {
            "encode_time": ratio(o["encode_seconds_per_image"], r["encode_seconds_per_image"]),
            "prefill_time": ratio(o["prefill_seconds"], r["prefill_seconds"]),
            "decode_batch1_speed": ratio(o["decode_tokens_per_second_batch1"], r["decode_tokens_per_second_batch1"]),
            "decode_batch8_speed": ratio(o["decode_tokens_per_second_batch8"], r["decode_tokens_per_second_batch8"]),
        }

    base_ref = single["base"]["reference"] if "base" in single else None
    ref_by_batch = {g["batch"]: g for g in (base_ref or {}).get("generate", [])}
    load_rows = []
    for n in args.concurrency:
        ours, ref = load[n], ref_by_batch.get(n)
        load_rows.append({
            "concurrency": n,
            "ours": ours,
            "reference": ref,
            "ratios": {
                "tokens_per_second": ratio(ours["tokens_per_second"], ref and ref["tokens_per_second"]),
                "first_turn_ttft_p50": ratio(ours["first_turns"]["ttft_ms"]["p50"], ref and ref["ttft_ms"]["p50"]),
                "later_over_first_ttft_p50": ratio(ours["later_turns"]["ttft_ms"]["p50"],
                                                   ours["first_turns"]["ttft_ms"]["p50"]),
            },
        })

    # 4. Issue 4's targets (base, 2 cores, f32).
    targets = []
    if "base" in single:
        rb = single["base"]["ratios"]
        targets.append(target("vision encode of one image, time vs transformers", rb["encode_time"], "<=", 0.7))
        targets.append(target("single-stream decode, tokens/s vs transformers", rb["decode_batch1_speed"], ">=", 1.5))
        if int8:
            targets.append(target("int8 LLM single-stream decode vs transformers f32",
                                  ratio(int8["decode_tokens_per_second_batch1"],
                                        base_ref["decode_tokens_per_second_batch1"]), ">=", 3.0))
    row8 = next((r for r in load_rows if r["concurrency"] == 8), None)
    if row8:
        targets.append(target("8 sessions, tokens/s vs transformers batched generate of 8",
                              row8["ratios"]["tokens_per_second"], ">=", 3.0))
        targets.append(target("8 sessions, p99 inter-token latency (ms)",
                              row8["ours"]["all_turns"]["itl_ms"]["p99"], "<", 250))
    row1 = next((r for r in load_rows if r["concurrency"] == 1), None)
    if row1 and args.turns > 1:
        targets.append(target("second turn (prefix reused) TTFT vs first turn's, 1 session",
                              row1["ratios"]["later_over_first_ttft_p50"], "<=", 0.3))

    results = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "machine": machine(),
        "commands": COMMANDS,
        "settings": {"concurrency": args.concurrency, "turns": args.turns, "new_tokens": args.new_tokens,
                     "generate_text_tokens": generate_text_tokens, "smoke": args.smoke},
        "single_model": single,
        "single_model_int8": int8,
        "load": load_rows,
        "targets": targets,
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    log(f"results: {args.out / 'results.json'}")
    plot(load_rows, args.plot)
    print(markdown(results))


def markdown(results):
    m = results["machine"]
    lines = [f"Measured {results['date']} on {m['cpu']} ({m['cpus']} CPUs); ratios are ours / transformers "
             "(times: lower is better; speeds: higher is better).", ""]
    lines += ["| shape | encode s/image (ratio) | prefill s (ratio) | decode batch 1 tok/s (ratio) | decode batch 8 tok/s (ratio) |",
              "|---|---|---|---|---|"]
    for shape, s in results["single_model"].items():
        o, r, q = s["ours"], s["reference"], s["ratios"]
        lines.append(
            f"| {shape} | {fmt(o['encode_seconds_per_image'], 3)} vs {fmt(r['encode_seconds_per_image'], 3)} ({fmt(q['encode_time'])}x)"
            f" | {fmt(o['prefill_seconds'], 3)} vs {fmt(r['prefill_seconds'], 3)} ({fmt(q['prefill_time'])}x)"
            f" | {fmt(o['decode_tokens_per_second_batch1'], 1)} vs {fmt(r['decode_tokens_per_second_batch1'], 1)} ({fmt(q['decode_batch1_speed'])}x)"
            f" | {fmt(o['decode_tokens_per_second_batch8'], 1)} vs {fmt(r['decode_tokens_per_second_batch8'], 1)} ({fmt(q['decode_batch8_speed'])}x) |")
    if results["single_model_int8"]:
        i = results["single_model_int8"]
        lines.append(f"| base, int8 LLM | {fmt(i['encode_seconds_per_image'], 3)} | {fmt(i['prefill_seconds'], 3)}"
                     f" | {fmt(i['decode_tokens_per_second_batch1'], 1)} | {fmt(i['decode_tokens_per_second_batch8'], 1)} |")
    lines += ["", "| sessions | tok/s (vs transformers) | req/s | TTFT 1st turn p50 / p95 / p99 ms | TTFT later turns p50 / p99 ms"
              " | ITL p50 / p99 ms | transformers batched: TTFT / ITL p99 ms |",
              "|---|---|---|---|---|---|---|"]
    for row in results["load"]:
        o, r, q = row["ours"], row["reference"], row["ratios"]
        ft, lt, itl = o["first_turns"]["ttft_ms"], o["later_turns"]["ttft_ms"], o["all_turns"]["itl_ms"]
        ref = f"{fmt(r['ttft_ms']['p50'], 0)} / {fmt(r['itl_ms']['p99'], 0)}" if r else "-"
        ref_tps = f"{fmt(r['tokens_per_second'], 1)}, {fmt(q['tokens_per_second'])}x" if r else "-"
        lines.append(
            f"| {row['concurrency']} | {fmt(o['tokens_per_second'], 1)} ({ref_tps}) | {fmt(o['requests_per_second'], 3)}"
            f" | {fmt(ft['p50'], 0)} / {fmt(ft['p95'], 0)} / {fmt(ft['p99'], 0)} | {fmt(lt['p50'], 0)} / {fmt(lt['p99'], 0)}"
            f" | {fmt(itl['p50'], 1)} / {fmt(itl['p99'], 1)} | {ref} |")
    lines += ["", "| target | value | bound | met |", "|---|---|---|---|"]
    for t in results["targets"]:
        met = {True: "yes", False: "**no**", None: "-"}[t["met"]]
        lines.append(f"| {t['target']} | {fmt(t['value'])} | {t['bound']} | {met} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
