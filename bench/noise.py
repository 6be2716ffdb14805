"""Speed figures under background load: fp32 and Q4_K_M of the bundled model, idle and loaded.

    python bench/noise.py [--preset presets/quickstart.yaml] [--max-seconds 60] [--load-procs N]
    python bench/noise.py --max-seconds 1 --repeats 1 --warmup 0 --new-tokens 4 --load-procs 1   # smoke run

Each variant is timed in its own fresh worker process exactly as a run's measuring step times it
(threads pinned, `warmup` untimed runs, adaptive repeats of the preset's latency protocol until both
95 % intervals lie within +-target_ci or max_seconds is spent; workbench/metrics/latency.py), twice:
once as the machine is (meant to be idle), once while this script keeps one busy process per core
running (plain Python spin loops, each ending by itself after --load-max-s at the latest, and killed
as soon as the loaded pass is over). Prints, per condition, each variant's decode tok/s with its 95 %
interval, repeats, stop reason, contention and noisy flag, then the Q4_K_M/fp32 decode ratio in both
conditions and how far apart the two ratios are (the goal: within 15 %; noisy off idle, on loaded).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import built_artifact, prepared

SPIN = "import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end: pass\n"


def time_variant(payload: dict, emit) -> dict:
    """Worker entry: pin, load, time (the measuring step's latency part only), report."""
    from workbench.metrics.latency import measure_latency, pin_threads

    pinned = pin_threads(payload["threads"])
    import torch

    from workbench.runtimes import load_variant

    torch.set_num_threads(payload["threads"])
    spec = payload["latency"]
    extra = {"n_ctx": spec["prompt_tokens"] + spec["new_tokens"] + 8} if payload["runtime"] == "llamacpp" else {}
    variant = load_variant(payload["runtime"], name=payload["name"], artifact_path=Path(payload["artifact_path"]),
                           device="cpu", threads=payload["threads"], **extra)
    detail: dict = {}
    metrics = measure_latency(variant.generate, payload["prompt"], spec["new_tokens"], spec["warmup"], spec["repeats"],
                              target_ci=spec["target_ci"], max_seconds=spec["max_seconds"],
                              max_repeats=spec["max_repeats"], detail=detail)
    variant.close()
    return {"metrics": metrics, "stop": detail["stop"], "timing_s": detail["timing_s"], "pinned_cpus": pinned}


def start_load(procs: int, max_s: float) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", SPIN.format(seconds=max_s)]) for _ in range(procs)]


def stop_load(load: list[subprocess.Popen]) -> None:
    for proc in load:
        proc.kill()
    for proc in load:
        proc.wait()


def half_width(metrics: dict) -> float:
    low, high = metrics["decode_tok_s_ci95"]
    median = metrics["decode_tok_s"]
    return max(median - low, high - median) / median


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="presets/quickstart.yaml")
    parser.add_argument("--quant", default="Q4_K_M")
    parser.add_argument("--max-seconds", type=float, help="timing budget per variant (default: the preset's)")
    parser.add_argument("--load-procs", type=int, default=os.cpu_count() or 1, help="busy processes (default: one per core)")
    parser.add_argument("--load-max-s", type=float, default=900.0, help="each busy process ends by itself after this")
    # Overrides of the preset's latency protocol, for a quick smoke run of the script itself.
    for name in ("prompt-tokens", "new-tokens", "warmup", "repeats"):
        parser.add_argument(f"--{name}", type=int, help=f"latency.{name.replace('-', '_')} (default: the preset's)")
    args = parser.parse_args()

    from workbench.methods.registry import get_method
    from workbench.process import run_in_worker

    preset, source, tokens = prepared(args.preset)
    latency = preset.latency.model_dump()
    if args.max_seconds:
        latency["max_seconds"] = args.max_seconds
    for key in ("prompt_tokens", "new_tokens", "warmup", "repeats"):
        if getattr(args, key) is not None:
            latency[key] = getattr(args, key)
    variants = {"fp32": ("fp32", {}), args.quant: ("gguf", {"quant": args.quant})}
    artifacts = {name: (built_artifact(source, method, options, preset.threads), get_method(method).runtime)
                 for name, (method, options) in variants.items()}
    logs = Path(tempfile.mkdtemp(prefix="noise-bench-"))

    def measure(condition: str) -> dict:
        results = {}
        for name, (artifact, runtime) in artifacts.items():
            print(f"{condition}: timing {name}", file=sys.stderr, flush=True)
            outcome = run_in_worker("noise:time_variant", {
                "name": name, "runtime": runtime, "artifact_path": str(artifact), "threads": preset.threads,
                "prompt": tokens[: latency["prompt_tokens"]], "latency": latency}, logs / f"{condition}-{name}.log")
            if not outcome.ok:
                raise SystemExit(f"{condition} {name}: {outcome.error} (log in {logs})")
            results[name] = outcome.result
        return results

    started = time.time()
    conditions = {"idle": measure("idle")}
    load = start_load(args.load_procs, args.load_max_s)
    try:
        conditions["loaded"] = measure("loaded")
    finally:
        stop_load(load)

    summary = {"threads": preset.threads, "latency": latency, "load_procs": args.load_procs,
               "wall_s": time.time() - started, "conditions": {}}
    ratios = {}
    for condition, results in conditions.items():
        rows = {}
        for name, result in results.items():
            m = result["metrics"]
            rows[name] = {"decode_tok_s": m["decode_tok_s"], "decode_tok_s_ci95": m["decode_tok_s_ci95"],
                          "decode_half_width": half_width(m), "ttft_s_ci95": m["ttft_s_ci95"],
                          "repeats": m["latency_repeats"], "stop": result["stop"], "contention": m["contention"],
                          "speed_noisy": m["speed_noisy"], "pinned_cpus": result["pinned_cpus"]}
        ratios[condition] = rows[args.quant]["decode_tok_s"] / rows["fp32"]["decode_tok_s"]
        summary["conditions"][condition] = rows
    print(json.dumps(summary, indent=1))
    for condition, rows in summary["conditions"].items():
        parts = ", ".join(f"{name} {r['decode_tok_s']:.1f} tok/s +-{r['decode_half_width']:.1%} ({r['repeats']} repeats, "
                          f"{r['stop']}, other {r['contention'] or 0:.2f} cores, noisy {'yes' if r['speed_noisy'] else 'no'})"
                          for name, r in rows.items())
        print(f"{condition}: {args.quant}/fp32 decode {ratios[condition]:.2f}x; {parts}")
    apart = abs(ratios["loaded"] / ratios["idle"] - 1)
    print(f"loaded vs idle ratio: {apart:.1%} apart (goal: within 15 %)")


if __name__ == "__main__":
    main()
