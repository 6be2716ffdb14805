"""Harness overhead: the workbench's streamed decode tok/s vs a bare `model.generate` loop.

    python bench/overhead.py [--preset presets/quickstart.yaml] [--new-tokens 64] [--repeats 7]

Same model (the preset's fp32 baseline folder), same threads, same prompt ids (the first
`prompt_tokens` eval token ids), same number of greedy tokens. Decode tok/s is (new_tokens - 1)
divided by the time from the first new token to the last, for both sides: the workbench through
`TorchVariant.generate`, transformers through `model.generate` with a streamer that timestamps
each token. Runs alternate (A, B, A, B, ...) after a warm-up of each, so drift hits both alike.
Prints the medians and their ratio (the issue asks for >= 0.95).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from _common import prepared
from transformers import AutoTokenizer


class TimestampStreamer:
    """A transformers streamer that records when each new token arrives (the first put is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="presets/quickstart.yaml")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    import torch

    from workbench.metrics.latency import time_one
    from workbench.runtimes.torch import TorchVariant

    preset, source, tokens = prepared(args.preset)
    tokenizer = AutoTokenizer.from_pretrained(source.hf_dir)
    variant = TorchVariant.load("fp32", source.hf_dir, "cpu", preset.threads)
    prompt = tokens[: preset.latency.prompt_tokens]
    n = args.new_tokens
    model = variant.model
    input_ids = torch.tensor([prompt])

    def bare_decode_tok_s() -> float:
        streamer = TimestampStreamer()
        with torch.inference_mode():
            model.generate(input_ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=streamer,
                           pad_token_id=tokenizer.eos_token_id)
        assert len(streamer.times) == n, len(streamer.times)
        return (n - 1) / (streamer.times[-1] - streamer.times[0])

    def workbench_decode_tok_s() -> float:
        _, decode_s = time_one(variant.generate, prompt, n)
        return (n - 1) / decode_s

    bare_decode_tok_s(), workbench_decode_tok_s()  # warm-up
    bare, ours = [], []
    for _ in range(args.repeats):
        bare.append(bare_decode_tok_s())
        ours.append(workbench_decode_tok_s())
    result = {
        "model": preset.model, "threads": torch.get_num_threads(), "prompt_tokens": len(prompt), "new_tokens": n,
        "repeats": args.repeats, "bare_generate_decode_tok_s": statistics.median(bare),
        "workbench_decode_tok_s": statistics.median(ours),
        "ratio": statistics.median(ours) / statistics.median(bare), "torch": torch.__version__,
    }
    print(json.dumps(result, indent=1))
    print(f"workbench / bare model.generate decode tok/s: {result['ratio']:.3f} (want >= 0.95)")


if __name__ == "__main__":
    main()
