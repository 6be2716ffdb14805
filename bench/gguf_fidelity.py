"""Fidelity of the llama.cpp runtime: GGUF F16 perplexity vs the fp32 torch baseline, same token ids.

    python bench/gguf_fidelity.py [--preset presets/quickstart.yaml]

Runs the preset's model as two variants of one workbench run (fp32 torch and GGUF F16 converted by
llama.cpp's converter), so both score the identical eval_tokens.json with the same windows.
Prints both perplexities and their relative difference (the issue asks for <= 0.5 %).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import _common  # noqa: F401 (puts the project on sys.path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="presets/quickstart.yaml")
    args = parser.parse_args()

    from workbench.config.presets import VariantSpec, load_preset
    from workbench.running.runner import Runner

    preset = load_preset(args.preset)
    preset = preset.model_copy(update={"baseline": "fp32", "variants": [
        VariantSpec(name="fp32", method="fp32"), VariantSpec(name="gguf-f16", method="gguf", options={"quant": "F16"})]})
    with tempfile.TemporaryDirectory() as out:
        run = Runner(preset, out_dir=Path(out)).run()
    fp32, f16 = (r["metrics"] for r in run["variants"])
    relative = abs(f16["perplexity"] - fp32["perplexity"]) / fp32["perplexity"]
    print(json.dumps({"model": preset.model, "eval_tokens": run["protocol"]["eval_tokens"],
                      "context": preset.eval.context, "stride": preset.eval.stride,
                      "fp32_torch_perplexity": fp32["perplexity"], "gguf_f16_perplexity": f16["perplexity"],
                      "gguf_f16_kld_mean": f16["kld_mean"], "relative_difference": relative}, indent=1))
    print(f"GGUF F16 vs fp32 torch perplexity: {relative * 100:.4f} % apart (want <= 0.5 %)")


if __name__ == "__main__":
    main()
