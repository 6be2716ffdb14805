"""Noise-aware timing: the median's interval against scipy's binomial ranks and a simulation, the noisy flag on
series of known spread, adaptive repeats on a fake clock, contention arithmetic, a real busy process, pinning."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from typing import Callable, Iterator, Sequence

import numpy as np
import pytest
from scipy import stats

from workbench.metrics.latency import (CpuSample, MIN_CI_REPEATS, Repeat, interleaved_latency, measure_contention,
                                       measure_latency, median_ci, other_cores, summarize)
from workbench.process import run_in_worker

NEW_TOKENS = 9  # 8 decode intervals per repeat


def _scipy_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """Independent truth: the rank from scipy's binomial quantile; [min, max] where no rank reaches 95 %."""
    x = np.sort(np.asarray(values))
    n = len(x)
    rank = int(stats.binom.ppf(0.025, n, 0.5))  # largest j with P(B <= j - 1) < 2.5 %
    if rank < 1:
        return float(x[0]), float(x[-1]), (1 - 2 * 0.5**n) if n > 1 else 0.0
    return float(x[rank - 1]), float(x[n - rank]), float(1 - 2 * stats.binom.cdf(rank - 1, n, 0.5))


@pytest.mark.parametrize("n", list(range(1, 41)) + [57, 100, 333])
def test_median_interval_matches_scipy_binomial_ranks(n: int) -> None:
    values = np.random.default_rng(n).lognormal(size=n).tolist()
    low, high, coverage = median_ci(values)
    want_low, want_high, want_coverage = _scipy_interval(values)
    assert (low, high) == (want_low, want_high)
    assert coverage == pytest.approx(want_coverage, abs=1e-12)
    assert coverage >= 0.95 if n >= MIN_CI_REPEATS else coverage < 0.95


def test_median_interval_covers_the_true_median_as_often_as_it_says() -> None:
    """Exponential samples (median ln 2): the simulated coverage matches the binomial one within sampling error."""
    rng = np.random.default_rng(13)
    trials = 4000
    for n in (6, 10, 25):
        hits = 0
        for _ in range(trials):
            low, high, coverage = median_ci(rng.exponential(size=n).tolist())
            hits += low <= np.log(2) <= high
        sigma = np.sqrt(coverage * (1 - coverage) / trials)
        assert abs(hits / trials - coverage) < 4 * sigma + 1e-9, (n, hits / trials, coverage)


def _repeats(rates: Sequence[float], ttfts: Sequence[float] | None = None, other: float | None = 0.0) -> list[Repeat]:
    ttfts = ttfts or [0.1] * len(rates)
    return [Repeat(ttft_s=t, decode_s=(NEW_TOKENS - 1) / r, wall_s=t + (NEW_TOKENS - 1) / r, cpu_s=0.0, other_cores=other)
            for r, t in zip(rates, ttfts)]


def test_noisy_flag_follows_the_interval_width_and_the_contention() -> None:
    steady = [100.0 * (1 + 0.01 * k) for k in (-4, -3, -2, -1, 0, 0, 1, 2, 3, 4, 5, -5)]  # spread +-5 %
    metrics = summarize(_repeats(steady), prompt_tokens=32, new_tokens=NEW_TOKENS)
    low, high, _ = _scipy_interval(steady)
    assert metrics["decode_tok_s_ci95"] == [pytest.approx(low), pytest.approx(high)]
    assert metrics["decode_tok_s"] == pytest.approx(float(np.median(steady)))
    assert metrics["latency_repeats"] == 12 and metrics["contention"] == 0.0
    assert metrics["speed_noisy"] is False

    # Spread +-40 % (the 5 to 88 tok/s is far worse): the interval alone flags it.
    wide = [100.0 * (1 + 0.08 * k) for k in (-5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 0)]
    wide_metrics = summarize(_repeats(wide), 32, NEW_TOKENS)
    wide_low, wide_high, _ = _scipy_interval(wide)
    assert wide_metrics["decode_tok_s_ci95"] == [pytest.approx(wide_low), pytest.approx(wide_high)]
    assert (wide_metrics["decode_tok_s"] - wide_low) / wide_metrics["decode_tok_s"] > 0.10
    assert wide_metrics["speed_noisy"] is True

    # The steady series again, but other processes used half a core meanwhile: flagged for contention.
    busy = summarize(_repeats(steady, other=0.5), 32, NEW_TOKENS)
    assert busy["contention"] == pytest.approx(0.5) and busy["speed_noisy"] is True
    assert summarize(_repeats(steady, other=0.2), 32, NEW_TOKENS)["speed_noisy"] is False

    # A steady decode with a noisy time to first token is noisy too: TTFT is a speed figure as well.
    ttfts = [0.1 * (1 + 0.1 * k) for k in (-5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 0)]
    assert summarize(_repeats(steady, ttfts), 32, NEW_TOKENS)["speed_noisy"] is True


def test_few_repeats_use_min_and_max() -> None:
    metrics = summarize(_repeats([90.0, 100.0, 130.0]), 32, NEW_TOKENS)
    assert metrics["decode_tok_s_ci95"] == [pytest.approx(90.0), pytest.approx(130.0)]
    assert metrics["speed_noisy"] is True  # +30 % from the median
    single = summarize(_repeats([100.0]), 32, NEW_TOKENS)
    assert single["decode_tok_s_ci95"] == [pytest.approx(100.0), pytest.approx(100.0)]


def test_contention_is_the_machine_busy_time_less_our_own() -> None:
    before = CpuSample(machine_busy_s=1000.0, process_ticks_s=10.0, process_cpu_s=10.0)
    after = CpuSample(machine_busy_s=1003.5, process_ticks_s=12.0, process_cpu_s=12.0)  # 3.5 s busy, 2 of them ours
    assert other_cores(before, after, wall_s=2.0) == pytest.approx(0.75)
    assert other_cores(CpuSample(None, None, 0.0), after, 2.0) is None  # no /proc: no figure, no flag from it


class FakeMachine:
    """A clock that the fake model advances, and /proc counters in which `other` cores stay busy."""

    def __init__(self, other: float = 0.0) -> None:
        self.now, self.other = 0.0, other

    def clock(self) -> float:
        return self.now

    def probe(self) -> CpuSample:
        return CpuSample(machine_busy_s=self.now * (1 + self.other), process_ticks_s=self.now, process_cpu_s=self.now)

    def model(self, rates: Iterator[float], ttft_s: float = 0.1, on_call: Callable[[], None] = lambda: None):
        """A generate() whose first token costs ttft_s and every later one 1 / rate of the fake clock, the rate
        drawn from `rates` once per call; `on_call` sees every call."""
        def generate(ids: Sequence[int], n: int) -> Iterator[int]:
            on_call()
            rate = next(rates)
            self.now += ttft_s
            yield 1
            for _ in range(n - 1):
                self.now += 1 / rate
                yield 1
        return generate


def _run(machine: FakeMachine, rates: list[float], **kwargs) -> tuple[dict, dict]:
    detail: dict = {}
    result = measure_latency(machine.model(iter(rates)), list(range(32)), NEW_TOKENS, clock=machine.clock,
                             probe=machine.probe, detail=detail, **kwargs)
    return result, detail


def test_adaptive_repeats_stop_once_the_interval_is_tight() -> None:
    steady = [100.0, 101.0, 99.0, 100.5, 99.5, 100.2] + [100.0] * 50
    result, detail = _run(FakeMachine(), steady, warmup=1, repeats=2, target_ci=0.05)
    # 2 is the minimum, but no interval is a 95 % one before 6 repeats; at 6 this series is within +-1 %.
    assert detail["stop"] == "target_ci" and result["latency_repeats"] == MIN_CI_REPEATS
    assert len(detail["repeats"]) == MIN_CI_REPEATS and detail["ci_coverage"] >= 0.95
    assert result["speed_noisy"] is False and result["contention"] == pytest.approx(0.0)


def test_adaptive_repeats_go_on_through_a_noisy_start() -> None:
    """Wild first repeats, then steady ones: timing continues until scipy's ranks put the interval within 5 %."""
    rates = [30.0, 160.0, 45.0, 140.0, 100.0, 100.0] + [100.0] * 60
    result, detail = _run(FakeMachine(), rates, warmup=0, repeats=6, target_ci=0.05)
    expected = next(n for n in range(6, len(rates)) if max(
        abs(v - np.median(rates[:n])) for v in _scipy_interval(rates[:n])[:2]) <= 0.05 * np.median(rates[:n]))
    assert detail["stop"] == "target_ci" and result["latency_repeats"] == expected > 6


def test_adaptive_repeats_stop_at_the_time_budget() -> None:
    alternating = [50.0, 150.0] * 100  # never within +-5 %
    machine = FakeMachine(other=0.5)
    result, detail = _run(machine, alternating, warmup=1, repeats=3, target_ci=0.05, max_seconds=3.0)
    # Each repeat costs 0.1 s to the first token plus 8 tokens at its rate; the warm-up (rate 50) counts too.
    spent, n = 0.1 + 8 / 50, 0
    while spent < 3.0:
        spent += 0.1 + 8 / alternating[1 + n]
        n += 1
    assert detail["stop"] == "max_seconds" and result["latency_repeats"] == n
    assert result["speed_noisy"] is True and result["contention"] == pytest.approx(0.5)


def test_fixed_repeats_without_a_target() -> None:
    result, detail = _run(FakeMachine(), [50.0, 150.0] * 10, warmup=0, repeats=4, target_ci=None)
    assert detail["stop"] == "repeats" and result["latency_repeats"] == 4


def test_the_minimum_runs_in_full_even_past_the_budget() -> None:
    result, detail = _run(FakeMachine(), [10.0] * 20, warmup=0, repeats=5, target_ci=0.05, max_seconds=0.5)
    assert detail["stop"] == "max_seconds" and result["latency_repeats"] == 5


def test_max_repeats_bounds_a_fast_noisy_model() -> None:
    result, detail = _run(FakeMachine(), [50.0, 150.0] * 50, warmup=0, repeats=2, target_ci=0.05, max_repeats=9)
    assert detail["stop"] == "max_repeats" and result["latency_repeats"] == 9


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="contention is read from Linux's /proc")
def test_a_busy_process_shows_as_contention() -> None:
    # A bare interpreter that spins for at most 20 s, so it ends even if this test dies.
    spin = "import time\nend = time.monotonic() + 20\nwhile time.monotonic() < end: pass"
    child = subprocess.Popen([sys.executable, "-c", spin])
    try:
        time.sleep(0.5)  # let it start spinning
        _, cores = measure_contention(lambda: time.sleep(1.0))
    finally:
        child.kill()
        child.wait()
    # At least the spinning child (other work on a shared machine only adds to it); this process slept.
    assert cores is not None and cores > 0.25


def pinned_target(payload: int, emit) -> dict:
    """Runs in a worker: pin, then start a thread, and report both masks."""
    import threading

    from workbench.metrics.latency import pin_threads

    cpus = pin_threads(payload)
    seen: dict = {}
    thread = threading.Thread(target=lambda: seen.update(thread=sorted(os.sched_getaffinity(0))))
    thread.start()
    thread.join()
    return {"pinned": cpus, "main": sorted(os.sched_getaffinity(0)), **seen}


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="pinning needs Linux's sched_setaffinity")
def test_pinning_uses_the_lowest_allowed_cores_and_new_threads_inherit(tmp_path) -> None:
    allowed = sorted(os.sched_getaffinity(0))
    outcome = run_in_worker("tests.test_speed_noise:pinned_target", 1, tmp_path / "pin.log")
    assert outcome.ok, outcome.error
    assert outcome.result == {"pinned": allowed[:1], "main": allowed[:1], "thread": allowed[:1]}
    many = run_in_worker("tests.test_speed_noise:pinned_target", len(allowed) + 4, tmp_path / "pin2.log")
    assert many.result["pinned"] == allowed  # more threads than cores: all of them, no error


def _run_document() -> dict:
    def record(name: str, rates: list[float], other: float) -> dict:
        from workbench.running.runner import METRIC_NAMES

        metrics = {**dict.fromkeys(METRIC_NAMES), "weight_bytes": 1e8, **summarize(_repeats(rates, other=other), 32, NEW_TOKENS)}
        return {"name": name, "method": "fp32", "status": "ok", "honesty": "real-kernel", "error": None,
                "metrics": metrics, "layers": [], "samples": []}

    steady = [100.0 * (1 + 0.005 * k) for k in range(-4, 5)]
    return {"run_id": "r", "created_at": "now", "preset": {"name": "p", "baseline": "steady"},
            "model": {"source": "x", "note": None},
            "variants": [record("steady", steady, 0.0), record("busy", [50.0, 150.0, 90.0, 120.0, 60.0, 140.0], 0.8)]}


def test_table_chart_and_report_show_the_interval_and_the_flag(tmp_path) -> None:
    from workbench.views.plots import latency
    from workbench.views.report import export_html, speed_note, summary_table

    run = _run_document()
    table = summary_table(run).set_index("variant")
    steady_ci = run["variants"][0]["metrics"]["decode_tok_s_ci95"]
    assert table.loc["steady", "decode tok/s 95% CI"] == f"{steady_ci[0]:.4g}–{steady_ci[1]:.4g}"
    assert table.loc["steady", "TTFT ms 95% CI"] == "100–100"  # every TTFT is 0.1 s
    assert table.loc["steady", "speed noisy"] == "no" and table.loc["busy", "speed noisy"] == "NOISY"
    assert table.loc["busy", "other cores"] == pytest.approx(0.8) and table.loc["busy", "repeats"] == 6

    decode = latency(run).data[1]
    busy = run["variants"][1]["metrics"]
    # The bars reach from the median to the ends of its interval ([min, max] of the six busy repeats: 50 and 150).
    assert decode.error_y.arrayminus[1] == pytest.approx(busy["decode_tok_s"] - 50.0)
    assert decode.error_y.array[1] == pytest.approx(150.0 - busy["decode_tok_s"])
    assert list(decode.text) == ["", "NOISY"]

    assert speed_note(run).startswith("Speed figures flagged NOISY: busy (")
    export_html(run | {"environment": _ENV, "protocol": _PROTOCOL}, tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text()
    assert "flagged NOISY: busy" in page and "decode tok/s 95% CI" in page


_ENV = {"cpu": "cpu", "device": "cpu", "threads": 1, "torch": "t", "transformers": "t", "bitsandbytes": "b"}
_PROTOCOL = {"scored_tokens": 1, "eval_tokens": 1, "eval_text": "pydoc", "context": 2, "stride": 2, "scored": "all",
             "prompt_tokens": 32, "new_tokens": NEW_TOKENS, "repeats": 5, "warmup": 1, "peak_rss": "VmHWM",
             "latency_repeats": "at least 5", "latency_ci95": "order statistics", "contention": "other cores",
             "speed_noisy": "+-10 % or 0.25 core"}


def test_interleaved_pass_times_round_robin() -> None:
    machine, calls = FakeMachine(), []

    def model(name: str, rate: float):
        return machine.model(itertools.repeat(rate), on_call=lambda: calls.append(name))

    generates = {"base": model("base", 50.0), "a": model("a", 100.0), "b": model("b", 200.0)}
    result = interleaved_latency(generates, "base", list(range(32)), NEW_TOKENS, warmup=1, repeats=4, target_ci=None,
                                 clock=machine.clock, probe=machine.probe)
    assert calls == ["base", "a", "b"] * 5  # one warm-up round, then four timed rounds in the same order
    assert result["rounds"] == 4 and result["stop"] == "repeats" and result["order"] == ["base", "a", "b"]
    assert result["variants"]["b"]["decode_ratio"] == pytest.approx(4.0)
    assert result["variants"]["base"]["decode_ratio"] == pytest.approx(1.0)


def test_pairing_by_round_cancels_drift() -> None:
    """The machine slows down 3 % per round: each variant's own interval is wide, its ratio's is not."""
    machine = FakeMachine()
    slowdown = iter(np.repeat(1 - 0.03 * np.arange(40), 2))  # one factor per call, two variants per round

    def model(rate: float, ttft_s: float):
        def generate(ids: Sequence[int], n: int) -> Iterator[int]:
            factor = next(slowdown)
            machine.now += ttft_s / factor
            yield 1
            for _ in range(n - 1):
                machine.now += 1 / (rate * factor)
                yield 1
        return generate

    result = interleaved_latency({"base": model(20.0, 0.4), "q4": model(100.0, 0.1)}, "base", list(range(32)),
                                 NEW_TOKENS, warmup=0, repeats=12, target_ci=0.05, clock=machine.clock,
                                 probe=machine.probe)
    q4 = result["variants"]["q4"]
    assert q4["speed_noisy"] is True  # its own decode interval spans the drift
    assert q4["decode_ratio"] == pytest.approx(5.0) and q4["ttft_ratio"] == pytest.approx(0.25)
    assert q4["decode_ratio_ci95"] == [pytest.approx(5.0), pytest.approx(5.0)]
    assert result["stop"] == "target_ci" and result["rounds"] == 12


def test_interleaved_ratio_interval_is_the_order_statistics_of_the_round_ratios() -> None:
    machine = FakeMachine()
    rng = np.random.default_rng(3)
    base_rates, q_rates = rng.uniform(15, 25, size=11), rng.uniform(80, 140, size=11)
    streams = {"base": iter(base_rates), "q": iter(q_rates)}

    def model(name: str):
        return machine.model(streams[name])

    result = interleaved_latency({"base": model("base"), "q": model("q")}, "base", list(range(32)), NEW_TOKENS,
                                 warmup=0, repeats=11, target_ci=None, clock=machine.clock, probe=machine.probe)
    ratios = q_rates / base_rates
    low, high, _ = _scipy_interval(ratios.tolist())
    q = result["variants"]["q"]
    assert q["decode_ratio"] == pytest.approx(float(np.median(ratios)))
    assert q["decode_ratio_ci95"] == [pytest.approx(low), pytest.approx(high)]


def test_a_run_records_the_speed_figures_and_the_interleaved_pass(write_preset) -> None:
    """A real run of two tiny variants: the contract keys, the stop reason, pinned cores, the paired ratios."""
    from workbench.config.presets import load_preset
    from workbench.views.report import summary_table
    from workbench.running.runner import Runner

    path = write_preset([{"name": "fp32", "method": "fp32"}, {"name": "half", "method": "fp16"}], name="speed",
                        latency={"prompt_tokens": 16, "new_tokens": 4, "warmup": 1, "repeats": 2, "max_seconds": 2,
                                 "interleave": True})
    run = Runner(load_preset(path)).run()
    assert run["status"] == "ok", [r["error"] for r in run["variants"]]
    allowed = sorted(os.sched_getaffinity(0))
    for record in run["variants"]:
        m = record["metrics"]
        assert isinstance(m["latency_repeats"], int) and m["latency_repeats"] >= 2
        assert m["latency_repeats"] == len(record["latency"]["repeats"])
        assert record["latency"]["stop"] in ("target_ci", "max_seconds", "max_repeats")
        low, high = m["decode_tok_s_ci95"]
        assert low <= m["decode_tok_s"] <= high and m["ttft_s_ci95"][0] <= m["ttft_s"] <= m["ttft_s_ci95"][1]
        assert isinstance(m["speed_noisy"], bool) and m["contention"] >= 0
        assert record["runtime"]["pinned_cpus"] == allowed[:1]
        assert record["interleaved"]["rounds"] >= 2
    half = next(r for r in run["variants"] if r["name"] == "half")["interleaved"]
    assert half["decode_ratio_ci95"][0] <= half["decode_ratio"] <= half["decode_ratio_ci95"][1]
    assert run["protocol"]["interleave"].startswith("interleaved pass (")
    assert "order fp32 half" in run["protocol"]["interleave"]
    assert summary_table(run).set_index("variant").loc["fp32", "decode x baseline"] == pytest.approx(1.0)
