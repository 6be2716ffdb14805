"""Decode speed of GGUF Q4_K_M on llama.cpp over fp32 torch, on this machine, measured side by side.

    python bench/speedups.py [--preset presets/quickstart.yaml] [--new-tokens 64] [--repeats 5]

Both variants load in this process with the preset's threads; runs alternate (torch, llama.cpp,
torch, ...) after one warm-up each, on the same prompt ids; decode tok/s is (new_tokens - 1) over
the time after the first token. Prints both medians and the ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics

from _common import built_artifact, prepared


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="presets/quickstart.yaml")
    parser.add_argument("--quant", default="Q4_K_M")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from workbench.metrics.latency import time_one
    from workbench.runtimes.llamacpp import LlamaCppVariant
    from workbench.runtimes.torch import TorchVariant

    preset, source, tokens = prepared(args.preset)
    prompt = tokens[: preset.latency.prompt_tokens]
    artifact = built_artifact(source, "gguf", {"quant": args.quant}, preset.threads)
    variants = {"fp32-torch": TorchVariant.load("fp32", source.hf_dir, "cpu", preset.threads),
                args.quant: LlamaCppVariant.load(args.quant, artifact, "cpu", preset.threads,
                                                 n_ctx=len(prompt) + args.new_tokens)}
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for variant in variants.values():
        time_one(variant.generate, prompt, args.new_tokens)  # warm-up
    for _ in range(args.repeats):
        for name, variant in variants.items():
            _, decode_s = time_one(variant.generate, prompt, args.new_tokens)
            rates[name].append((args.new_tokens - 1) / decode_s)
    medians = {name: statistics.median(values) for name, values in rates.items()}
    print(json.dumps({"threads": preset.threads, "prompt_tokens": len(prompt), "new_tokens": args.new_tokens,
                      "repeats": args.repeats, "decode_tok_s": medians}, indent=1))
    print(f"{args.quant} (llama.cpp) over fp32 (torch) decode tok/s: {medians[args.quant] / medians['fp32-torch']:.2f}x")


if __name__ == "__main__":
    main()
