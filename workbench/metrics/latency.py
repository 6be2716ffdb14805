"""Latency of streamed greedy generation: time to first token, prefill and decode speed.

Protocol: the same `prompt_tokens` token ids for every variant; `warmup` untimed runs, then
`repeats` timed runs of exactly `new_tokens` tokens (EOS ignored, so every run does equal work).
ttft_s = wall time from the call to the first token (prefill + first sampling);
prefill_tok_s = prompt_tokens / ttft_s; decode_tok_s = (new_tokens - 1) / time after the first token.
Medians are reported, with min and max across repeats.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Iterator, Sequence


def time_one(generate: Callable[[Sequence[int], int], Iterator[int]], prompt: Sequence[int], new_tokens: int,
             clock: Callable[[], float] = time.perf_counter) -> tuple[float, float]:
    """(ttft_s, decode_s) of one streamed generation."""
    start = clock()
    first = None
    count = 0
    for _token in generate(prompt, new_tokens):
        count += 1
        if first is None:
            first = clock()
    end = clock()
    if first is None or count != new_tokens:
        raise RuntimeError(f"generate yielded {count} tokens, {new_tokens} were asked for")
    return first - start, end - first


def measure_latency(
    generate: Callable[[Sequence[int], int], Iterator[int]],
    prompt: Sequence[int],
    new_tokens: int,
    warmup: int,
    repeats: int,
) -> dict[str, float]:
    for _ in range(warmup):
        time_one(generate, prompt, new_tokens)
    runs = [time_one(generate, prompt, new_tokens) for _ in range(repeats)]
    ttfts = [ttft for ttft, _ in runs]
    decode_rates = [(new_tokens - 1) / decode_s for _, decode_s in runs]
    return {
        "ttft_s": statistics.median(ttfts),
        "ttft_s_min": min(ttfts),
        "ttft_s_max": max(ttfts),
        "prefill_tok_s": len(prompt) / statistics.median(ttfts),
        "decode_tok_s": statistics.median(decode_rates),
        "decode_tok_s_min": min(decode_rates),
        "decode_tok_s_max": max(decode_rates),
    }
