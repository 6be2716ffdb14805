"""Latency of streamed greedy generation: time to first token, prefill and decode speed, with their noise.

Protocol: the same `prompt_tokens` token ids for every variant; `warmup` untimed runs, then timed
runs of exactly `new_tokens` tokens (EOS ignored, so every run does equal work).
ttft_s = wall time from the call to the first token (prefill + first sampling);
prefill_tok_s = prompt_tokens / ttft_s; decode_tok_s = (new_tokens - 1) / time after the first token.
Medians are reported, with min and max across repeats.

Noise: every timed repeat also records the worker's own CPU time and the CPU time the rest of the
machine used meanwhile ("contention", in cores: /proc/stat busy jiffies minus this process's
utime+stime, over the repeat's wall time). Each median gets a distribution-free 95 % interval (order
statistics; `median_ci`). A variant is flagged noisy when an interval reaches beyond +-10 % of its
median or other processes used more than 0.25 core on average during the timed repeats.

Adaptive repeats: `repeats` is a minimum; timing goes on until both intervals lie within
+-`target_ci` of their medians (never before MIN_CI_REPEATS, the first count with a real 95 %
interval), or `max_seconds` of timing (warm-up included) or `max_repeats` are spent.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

CONFIDENCE = 0.95
NOISY_HALF_WIDTH = 0.10  # an interval reaching beyond +-10 % of the median is too wide to compare variants
NOISY_CONTENTION = 0.25  # other processes' mean cores during the timed repeats
MIN_CI_REPEATS = 6  # the smallest n whose [min, max] covers the median with >= 95 % (1 - 2 / 2**6 = 96.9 %)
_TICK_S = 1.0 / (os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100)


# ---- the confidence interval of a median ----------------------------------------------------------


def median_ci(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """(low, high, coverage): the order-statistic interval [x(j), x(n+1-j)] around the median.

    For any continuous distribution, P(x(j) <= median <= x(n+1-j)) = 1 - 2 P(B <= j - 1) with
    B ~ Binomial(n, 1/2); j is the largest rank whose coverage still reaches `confidence`. With
    n < 6 no rank reaches 95 %, so the interval degenerates to [min, max] and its true coverage
    (1 - 2 / 2**n: 93.8 % at n = 5, 50 % at n = 2, 0 at n = 1) is returned instead of the asked one.
    """
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        raise ValueError("no values")
    below = 0.0  # P(B <= j - 1), growing with j
    rank, coverage = 1, 1 - 2 * 0.5**n if n > 1 else 0.0
    for j in range(1, (n + 1) // 2 + 1):
        below += math.comb(n, j - 1) / 2**n
        if 1 - 2 * below < confidence:
            break
        rank, coverage = j, 1 - 2 * below
    return ordered[rank - 1], ordered[n - rank], coverage


def relative_half_width(low: float, high: float, median: float) -> float:
    """How far the interval reaches from the median, as a fraction of it (the wider side counts)."""
    if median <= 0:
        return math.inf
    return max(median - low, high - median) / median


def is_noisy(half_widths: Sequence[float], contention: float | None) -> bool:
    return any(w > NOISY_HALF_WIDTH for w in half_widths) or (contention is not None and contention > NOISY_CONTENTION)


# ---- CPU time of this process and of the rest of the machine ---------------------------------------


@dataclass(frozen=True)
class CpuSample:
    machine_busy_s: float | None  # every CPU's non-idle time since boot (None without /proc)
    process_ticks_s: float | None  # this process's utime + stime, in the same tick units as machine_busy_s
    process_cpu_s: float  # this process's CPU time at full resolution


def cpu_sample() -> CpuSample:
    """One reading of the counters; the contention of an interval is the difference of two readings."""
    process_cpu = time.process_time()
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
        # user nice system idle iowait irq softirq steal: idle and iowait are not work; steal is another
        # guest running on our CPU, which slows us exactly like a local process does.
        busy = sum(fields[i] for i in (0, 1, 2, 5, 6, 7) if i < len(fields)) * _TICK_S
        with open("/proc/self/stat") as own:
            rest = own.read().rsplit(")", 1)[1].split()  # the name in parentheses may contain spaces
        ticks = (int(rest[11]) + int(rest[12])) * _TICK_S  # fields 14 and 15: utime, stime
    except (OSError, ValueError, IndexError):
        return CpuSample(None, None, process_cpu)
    return CpuSample(busy, ticks, process_cpu)


def other_cores(before: CpuSample, after: CpuSample, wall_s: float) -> float | None:
    """Mean cores the rest of the machine used between two readings (tick-rounded; may dip below 0)."""
    if before.machine_busy_s is None or after.machine_busy_s is None or wall_s <= 0:
        return None
    assert before.process_ticks_s is not None and after.process_ticks_s is not None
    other = (after.machine_busy_s - before.machine_busy_s) - (after.process_ticks_s - before.process_ticks_s)
    return other / wall_s


def measure_contention(work: Callable[[], Any], probe: Callable[[], CpuSample] = cpu_sample,
                       clock: Callable[[], float] = time.perf_counter) -> tuple[Any, float | None]:
    """(work's result, other processes' mean cores while it ran): for calibrations and benchmarks."""
    before, started = probe(), clock()
    result = work()
    wall = clock() - started
    cores = other_cores(before, probe(), wall)
    return result, None if cores is None else max(cores, 0.0)


# ---- pinning -------------------------------------------------------------------------------------


def pin_threads(threads: int) -> list[int] | None:
    """Pin this process and every thread it has to the lowest `threads` CPUs it may use; the CPUs, or None.

    A fixed set, so repeats (and variants) run on the same cores instead of wandering between them;
    threads started later (torch's pool, llama.cpp's workers) inherit the mask.
    """
    if not hasattr(os, "sched_setaffinity"):
        return None
    try:
        allowed = sorted(os.sched_getaffinity(0))
        cpus = allowed[: max(1, min(threads, len(allowed)))]
        tids = [int(t) for t in os.listdir("/proc/self/task")] if os.path.isdir("/proc/self/task") else [0]
        for tid in tids:
            try:
                os.sched_setaffinity(tid, cpus)
            except (ProcessLookupError, PermissionError):  # a thread that ended meanwhile
                pass
        os.sched_setaffinity(0, cpus)
        return cpus
    except OSError:
        return None


# ---- timing --------------------------------------------------------------------------------------


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


@dataclass
class Repeat:
    ttft_s: float
    decode_s: float
    wall_s: float
    cpu_s: float  # this process's CPU time during the repeat (all its threads)
    other_cores: float | None  # the rest of the machine, mean cores during the repeat


def timed_repeat(generate: Callable[[Sequence[int], int], Iterator[int]], prompt: Sequence[int], new_tokens: int,
                 clock: Callable[[], float] = time.perf_counter, probe: Callable[[], CpuSample] = cpu_sample) -> Repeat:
    before, started = probe(), clock()
    ttft, decode = time_one(generate, prompt, new_tokens, clock)
    wall = clock() - started
    after = probe()
    return Repeat(ttft, decode, wall, after.process_cpu_s - before.process_cpu_s, other_cores(before, after, wall))


def summarize(repeats: Sequence[Repeat], prompt_tokens: int, new_tokens: int) -> dict[str, Any]:
    """The metrics of a series of repeats (medians, min/max, 95 % intervals, contention, the noisy flag)."""
    ttfts = [r.ttft_s for r in repeats]
    rates = [(new_tokens - 1) / r.decode_s for r in repeats]
    ttft, rate = statistics.median(ttfts), statistics.median(rates)
    ttft_lo, ttft_hi, _ = median_ci(ttfts)
    rate_lo, rate_hi, _ = median_ci(rates)
    measured = [r for r in repeats if r.other_cores is not None]
    wall = sum(r.wall_s for r in measured)
    # Time-weighted mean over the repeats: the tick rounding of short repeats averages out this way.
    contention = max(sum(r.other_cores * r.wall_s for r in measured) / wall, 0.0) if measured and wall > 0 else None
    half_widths = [relative_half_width(rate_lo, rate_hi, rate), relative_half_width(ttft_lo, ttft_hi, ttft)]
    return {
        "ttft_s": ttft,
        "ttft_s_min": min(ttfts),
        "ttft_s_max": max(ttfts),
        "ttft_s_ci95": [ttft_lo, ttft_hi],
        "prefill_tok_s": prompt_tokens / ttft,
        "decode_tok_s": rate,
        "decode_tok_s_min": min(rates),
        "decode_tok_s_max": max(rates),
        "decode_tok_s_ci95": [rate_lo, rate_hi],
        "latency_repeats": len(repeats),
        "contention": contention,
        "speed_noisy": is_noisy(half_widths, contention),
    }


def stop_reason(repeats: Sequence[Repeat], new_tokens: int, minimum: int, target_ci: float | None,
                spent_s: float, max_seconds: float, max_repeats: int) -> str | None:
    """Why timing stops after these repeats, or None to go on. The minimum always runs in full."""
    n = len(repeats)
    if n < minimum:
        return None
    if target_ci is None:
        return "repeats"
    if n >= MIN_CI_REPEATS:
        ttfts = [r.ttft_s for r in repeats]
        rates = [(new_tokens - 1) / r.decode_s for r in repeats]
        widths = [relative_half_width(*median_ci(xs)[:2], statistics.median(xs)) for xs in (ttfts, rates)]
        if max(widths) <= target_ci:
            return "target_ci"
    if spent_s >= max_seconds:
        return "max_seconds"
    if n >= max_repeats:
        return "max_repeats"
    return None


def measure_latency(
    generate: Callable[[Sequence[int], int], Iterator[int]],
    prompt: Sequence[int],
    new_tokens: int,
    warmup: int,
    repeats: int,
    target_ci: float | None = None,
    max_seconds: float = 60.0,
    max_repeats: int = 500,
    clock: Callable[[], float] = time.perf_counter,
    probe: Callable[[], CpuSample] = cpu_sample,
    detail: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The latency metrics; `detail`, when given, receives the per-repeat series and why timing stopped.

    With `target_ci` None exactly `repeats` runs are timed (stop reason "repeats").
    """
    started = clock()
    for _ in range(warmup):
        time_one(generate, prompt, new_tokens, clock)
    series: list[Repeat] = []
    while True:
        series.append(timed_repeat(generate, prompt, new_tokens, clock, probe))
        reason = stop_reason(series, new_tokens, repeats, target_ci, clock() - started, max_seconds, max_repeats)
        if reason is not None:
            break
    result = summarize(series, len(prompt), new_tokens)
    if detail is not None:
        _, _, coverage = median_ci([r.ttft_s for r in series])
        detail.update({
            "stop": reason, "timing_s": clock() - started, "min_repeats": repeats, "target_ci": target_ci,
            "max_seconds": max_seconds, "ci_coverage": coverage,
            "ci_method": "order statistics of the repeats (binomial, distribution-free); [min, max] below 6 repeats",
            "repeats": [{"ttft_s": r.ttft_s, "decode_s": r.decode_s, "wall_s": r.wall_s, "cpu_s": r.cpu_s,
                         "other_cores": r.other_cores} for r in series],
        })
    return result


# ---- the interleaved speed pass --------------------------------------------------------------------


def ratio_summary(values: Sequence[float]) -> tuple[float, list[float]]:
    """(median, 95 % interval) of per-round ratios: the pairing by round cancels what hit the round."""
    low, high, _ = median_ci(values)
    return statistics.median(values), [low, high]


def interleaved_stop(rounds: Sequence[dict[str, Repeat]], baseline: str, new_tokens: int, minimum: int,
                     target_ci: float | None, spent_s: float, max_seconds: float, max_repeats: int) -> str | None:
    """Like `stop_reason`, on every variant's paired decode and TTFT ratio to the baseline."""
    n = len(rounds)
    if n < minimum:
        return None
    if target_ci is None:
        return "repeats"
    if n >= MIN_CI_REPEATS:
        widths = []
        for name in rounds[0]:
            if name == baseline:
                continue
            for ratios in _round_ratios(rounds, name, baseline, new_tokens):
                median, (low, high) = ratio_summary(ratios)
                widths.append(relative_half_width(low, high, median))
        if not widths or max(widths) <= target_ci:
            return "target_ci"
    if spent_s >= max_seconds:
        return "max_seconds"
    if n >= max_repeats:
        return "max_repeats"
    return None


def _round_ratios(rounds: Sequence[dict[str, Repeat]], name: str, baseline: str,
                  new_tokens: int) -> tuple[list[float], list[float]]:
    """(decode speed ratios, TTFT ratios) of `name` over the baseline, one per round."""
    decode = [(new_tokens - 1) / r[name].decode_s / ((new_tokens - 1) / r[baseline].decode_s) for r in rounds]
    ttft = [r[name].ttft_s / r[baseline].ttft_s for r in rounds]
    return decode, ttft


def interleaved_latency(
    generates: dict[str, Callable[[Sequence[int], int], Iterator[int]]],
    baseline: str,
    prompt: Sequence[int],
    new_tokens: int,
    warmup: int,
    repeats: int,
    target_ci: float | None = None,
    max_seconds: float = 60.0,
    max_repeats: int = 500,
    clock: Callable[[], float] = time.perf_counter,
    probe: Callable[[], CpuSample] = cpu_sample,
) -> dict[str, Any]:
    """Time every variant once per round, in the same order every round (A B C A B C ...).

    Drift and background load then hit every variant of a round alike, so each round's ratio to the
    baseline is a paired comparison; the reported ratio is the median over rounds with its 95 %
    order-statistic interval. `repeats` is the minimum number of rounds; `max_seconds` is per variant
    (the pass may take len(generates) times as long), like the sequential pass's budget.
    """
    names = list(generates)
    if baseline not in generates:
        raise ValueError(f"the baseline {baseline!r} is not among the interleaved variants")
    started = clock()
    for _ in range(warmup):
        for name in names:
            time_one(generates[name], prompt, new_tokens, clock)
    rounds: list[dict[str, Repeat]] = []
    while True:
        rounds.append({name: timed_repeat(generates[name], prompt, new_tokens, clock, probe) for name in names})
        reason = interleaved_stop(rounds, baseline, new_tokens, repeats, target_ci, clock() - started,
                                  max_seconds * len(names), max_repeats)
        if reason is not None:
            break
    variants = {}
    for name in names:
        figures = summarize([r[name] for r in rounds], len(prompt), new_tokens)
        decode, ttft = _round_ratios(rounds, name, baseline, new_tokens)
        figures["decode_ratio"], figures["decode_ratio_ci95"] = ratio_summary(decode)
        figures["ttft_ratio"], figures["ttft_ratio_ci95"] = ratio_summary(ttft)
        variants[name] = figures
    return {"rounds": len(rounds), "stop": reason, "order": names, "baseline": baseline,
            "timing_s": clock() - started, "variants": variants}
