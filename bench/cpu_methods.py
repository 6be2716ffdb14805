"""Which compressed variants decode and prefill faster than fp32 on this CPU, and at what perplexity.

    python bench/cpu_methods.py [--preset presets/cpu-speed.yaml] [--results RUN/results.json]

Runs the preset (every variant of presets/cpu-speed.yaml: fp32, bf16, llama.cpp Q4_K_M and Q8_0, torchao
int4 / int8 / int8-dynamic, hqq 4-bit and 8-bit) through the workbench, or reads a finished run's results.json, and prints per
variant, against the fp32 baseline and measured side by side in that one run:
  - decode and prefill (time to first token) speed ratios: medians of per-round ratios of the interleaved
    pass, with their 95 % paired intervals (running/speedpass.py); prefill ratio = 1 / TTFT ratio;
  - the perplexity ratio with its paired 95 % interval, and mean KLD;
  - weight MB and the honesty label (torchao's is measured: real-kernel only when its decode is faster).
Then the issue's goal: a torch-side 4-bit variant decoding >= 2x fp32 at perplexity <= 1.10x fp32, met or not,
and which came closest.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _common import prepared

GOAL_DECODE, GOAL_PPL = 2.0, 1.10


def _is_torch_side_4bit(record: dict) -> bool:
    options = record.get("options") or {}
    return (record["method"] == "torchao" and options.get("scheme") == "int4-weight-only") or \
        (record["method"] == "hqq" and options.get("nbits", 4) == 4)


def _interval(values: list | None, invert: bool = False) -> str:
    if not values or any(v is None for v in values):
        return "[—]"
    low, high = (1 / values[1], 1 / values[0]) if invert else values
    return f"[{low:.2f}, {high:.2f}]"


def _kld(metrics: dict) -> str:
    return "—" if metrics.get("kld_mean") is None else f"{metrics['kld_mean']:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="presets/cpu-speed.yaml")
    parser.add_argument("--results", default=None, help="a finished run's results.json instead of running the preset")
    args = parser.parse_args()

    if args.results:
        run = json.loads(Path(args.results).read_text())
    else:
        from workbench.running.runner import Runner

        preset, _source, _tokens = prepared(args.preset)
        # Kept like any run ($WORKBENCH_HOME/runs/RUN_ID, and in the History tab): its records are the evidence.
        run = Runner(preset, on_event=lambda e: print(f"  {e.variant or ''} {e.phase}: {e.message}", flush=True)).run()
    print(f"run {run['run_id']}: {run['protocol'].get('interleave')}")
    header = (f"{'variant':<16} {'method':<8} {'MB':>6} {'decode x':>8} {'95% CI':>13} {'prefill x':>9} {'95% CI':>13} "
              f"{'ppl x':>6} {'95% CI':>13} {'KLD':>7}  honesty")
    print(header + "\n" + "-" * len(header))
    best: tuple[float, str] | None = None
    for record in run["variants"]:
        name, method = record["name"], record["method"]
        if record["status"] != "ok":
            print(f"{name:<16} {method:<8} {record['status']}: {record['error']}")
            continue
        m, paired = record["metrics"], record.get("interleaved") or {}
        decode, ttft = paired.get("decode_ratio"), paired.get("ttft_ratio")
        ppl = m.get("ppl_ratio") if m.get("ppl_ratio") is not None else 1.0
        print(f"{name:<16} {method:<8} {m['weight_bytes'] / 1e6:>6.1f} "
              f"{'—' if decode is None else f'{decode:.2f}':>8} {_interval(paired.get('decode_ratio_ci95')):>13} "
              f"{'—' if ttft is None else f'{1 / ttft:.2f}':>9} {_interval(paired.get('ttft_ratio_ci95'), True):>13} "
              f"{ppl:>6.3f} {_interval(m.get('ppl_ratio_ci95')):>13} "
              f"{_kld(m):>7}  {record['honesty']}")
        if _is_torch_side_4bit(record) and decode is not None and ppl <= GOAL_PPL and (best is None or decode > best[0]):
            best = (decode, name)
    if best is None:
        print(f"\ngoal (a torch-side 4-bit variant >= {GOAL_DECODE}x fp32 decode at ppl <= {GOAL_PPL}x): no such "
              "variant has a paired decode ratio within the perplexity bound")
    else:
        verdict = "met" if best[0] >= GOAL_DECODE else "not met"
        print(f"\ngoal (a torch-side 4-bit variant >= {GOAL_DECODE}x fp32 decode at ppl <= {GOAL_PPL}x fp32): {verdict}; "
              f"closest {best[1]} at {best[0]:.2f}x")


if __name__ == "__main__":
    main()
