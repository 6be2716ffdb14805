"""Mixed precision under a size budget (gguf-auto) against uniform llama.cpp types of the same size.

    python bench/mixed_precision.py [--preset presets/quickstart.yaml] [--candidates Q8_0,Q6_K,...]
                                    [--imatrix-samples 32] [--no-imatrix-auto] [--eval-tokens N]

On the preset's model (the bundled SmolLM2-135M by default), one workbench run measures against the
fp32 baseline, on the preset's eval text and windows:
  - uniform Q4_K_M and Q3_K_M, and gguf-auto with target_mb set to each one's tensor bytes (the
    weights the workbench reports; the file adds the same metadata to both), so sizes match within 2 %;
  - Q4_K_M and IQ4_XS, each with and without an importance matrix (calibration text, never eval text);
  - with --imatrix-auto (default on), gguf-auto at both sizes with the matrix as well.
Prints file MB, tensor MB, bits/weight, KLD mean and p99, perplexity and build seconds per variant,
then the ratio mean KLD(auto) / mean KLD(uniform) at equal size (the issue's goal: <= 0.85).
Sensitivities are cached (same candidates, matrix and tokens), so the second target reuses the first's.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from _common import built_artifact, prepared


def _tensor_bytes(folder: Path) -> int:
    return json.loads((folder / "stage_report.json").read_text())["gguf"]["tensor_bytes"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="presets/quickstart.yaml")
    parser.add_argument("--candidates", default="Q8_0,Q6_K,Q5_K,Q5_0,Q4_K,Q4_0,Q3_K")
    parser.add_argument("--imatrix-samples", type=int, default=32)
    parser.add_argument("--sensitivity-samples", type=int, default=2)
    parser.add_argument("--no-imatrix-auto", action="store_true", help="skip gguf-auto with an importance matrix")
    parser.add_argument("--eval-tokens", type=int, default=None, help="score fewer eval tokens than the preset")
    parser.add_argument("--out", default=None, help="write the run's records (JSON) here")
    args = parser.parse_args()

    from workbench.config.presets import VariantSpec
    from workbench.running.runner import Runner

    preset, source, _tokens = prepared(args.preset)
    candidates = args.candidates.split(",")
    imatrix = {"samples": args.imatrix_samples, "seq_len": 256, "text": "pydoc", "seed": 0}
    sensitivity = {"samples": args.sensitivity_samples, "seq_len": 256, "text": "pydoc", "seed": 1}
    # The uniform files first: their tensor bytes are the auto variants' budgets.
    targets = {}
    for quant in ("Q4_K_M", "Q3_K_M"):
        started = time.perf_counter()
        targets[quant] = _tensor_bytes(built_artifact(source, "gguf", {"quant": quant}, preset.threads)) / 1e6
        print(f"{quant}: {targets[quant]:.3f} MB of tensors ({time.perf_counter() - started:.0f} s, cached builds are instant)")

    def auto(target: float, with_imatrix: bool) -> dict:
        options = {"target_mb": target, "candidates": candidates, "sensitivity": sensitivity}
        return {**options, "imatrix": imatrix} if with_imatrix else options

    variants = [
        VariantSpec(name="fp32", method="fp32"),
        VariantSpec(name="Q4_K_M", method="gguf", options={"quant": "Q4_K_M"}),
        VariantSpec(name="Q4_K_M-imat", method="gguf", options={"quant": "Q4_K_M", "imatrix": imatrix}),
        VariantSpec(name="IQ4_XS", method="gguf", options={"quant": "IQ4_XS"}),
        VariantSpec(name="IQ4_XS-imat", method="gguf", options={"quant": "IQ4_XS", "imatrix": imatrix}),
        VariantSpec(name="Q3_K_M", method="gguf", options={"quant": "Q3_K_M"}),
        VariantSpec(name="auto-Q4_K_M", method="gguf-auto", options=auto(targets["Q4_K_M"], False)),
        VariantSpec(name="auto-Q3_K_M", method="gguf-auto", options=auto(targets["Q3_K_M"], False)),
    ]
    if not args.no_imatrix_auto:
        variants += [VariantSpec(name="auto-imat-Q4_K_M", method="gguf-auto", options=auto(targets["Q4_K_M"], True)),
                     VariantSpec(name="auto-imat-Q3_K_M", method="gguf-auto", options=auto(targets["Q3_K_M"], True))]
    # Sizes and quality are the point here: one short latency run and one short sample keep the run brief.
    preset = preset.model_copy(update={
        "name": "mixed-precision", "baseline": "fp32", "variants": variants, "sensitivity": None,
        "eval": preset.eval.model_copy(update={"max_tokens": args.eval_tokens or preset.eval.max_tokens}),
        "latency": preset.latency.model_copy(update={"prompt_tokens": 16, "new_tokens": 4, "warmup": 0, "repeats": 1}),
        "samples": preset.samples.model_copy(update={"prompts": preset.samples.prompts[:1], "new_tokens": 4})})
    with tempfile.TemporaryDirectory() as out:
        run = Runner(preset, out_dir=Path(out)).run()
    records = {r["name"]: r for r in run["variants"]}
    if args.out:
        Path(args.out).write_text(json.dumps(run, indent=1, default=str))

    header = f"{'variant':<18} {'file MB':>8} {'tensor MB':>9} {'bits/w':>6} {'KLD mean':>9} {'KLD p99':>8} {'ppl':>7} {'build s':>8}"
    print(f"\n{preset.model}: {run['protocol']['eval_tokens']} eval tokens, context {preset.eval.context}; "
          f"candidates {', '.join(candidates)}; imatrix {imatrix['samples']} x {imatrix['seq_len']} tokens; "
          f"sensitivity {sensitivity['samples']} x {sensitivity['seq_len']} tokens")
    print(header + "\n" + "-" * len(header))
    for name, record in records.items():
        if record["status"] != "ok":
            print(f"{name:<18} {record['status']}: {record['error']}")
            continue
        m, g = record["metrics"], record.get("gguf") or {}
        build = (record.get("timing") or {}).get("build_s")
        kld = "—" if m["kld_mean"] is None else f"{m['kld_mean']:.4f}"
        p99 = "—" if m["kld_p99"] is None else f"{m['kld_p99']:.3f}"
        print(f"{name:<18} {m['disk_bytes'] / 1e6:>8.2f} {m['weight_bytes'] / 1e6:>9.2f} "
              f"{g.get('bits_per_weight') or 32:>6.2f} {kld:>9} {p99:>8} {m['perplexity']:>7.2f} "
              f"{'cached' if (record.get('timing') or {}).get('build_cached') else f'{build:.0f}':>8}")
    print()
    for uniform in ("Q4_K_M", "Q3_K_M"):
        for prefix in ("auto", "auto-imat"):
            mixed = records.get(f"{prefix}-{uniform}")
            if not mixed or mixed["status"] != "ok" or records[uniform]["status"] != "ok":
                continue
            a, u = mixed["metrics"], records[uniform]["metrics"]
            size = a["disk_bytes"] / u["disk_bytes"] - 1
            print(f"{prefix}-{uniform}: file {size * 100:+.2f} % vs {uniform}; mean KLD {a['kld_mean']:.4f} vs "
                  f"{u['kld_mean']:.4f} = {a['kld_mean'] / u['kld_mean']:.3f}x (goal <= 0.85x); "
                  f"p99 {a['kld_p99']:.3f} vs {u['kld_p99']:.3f}; choice {_choice_summary(mixed)}")


def _choice_summary(record: dict) -> str:
    from collections import Counter

    choice = ((record.get("gguf") or {}).get("auto") or {}).get("choice") or {}
    counts = Counter(choice.values())
    embedding = {u: t for u, t in choice.items() if not u.startswith("blk.")}
    return ", ".join(f"{t} x{n}" for t, n in counts.most_common()) + f" (non-block: {embedding})"


if __name__ == "__main__":
    main()
