"""Roofline: the bandwidth arithmetic against a known size and time, bytes read per token, the views."""

from __future__ import annotations

import itertools
import math

import pytest

from workbench.planning.roofline import bytes_per_token, roofline, weights_read
from workbench.planning.machine import measure_bandwidth

MIB = 1 << 20


def test_bandwidth_is_bytes_moved_over_the_best_time() -> None:
    """A fake clock makes every copy and every sum take exactly 0.25 s: the figures follow from the size alone."""
    ticks = itertools.count(0.0, 0.25)
    result = measure_bandwidth(threads=1, buffer_bytes=4 * MIB, repeats=3, clock=lambda: next(ticks))
    assert result["buffer_bytes"] == 4 * MIB and result["bytes_moved"] == 8 * MIB  # read + write
    assert result["copy_best_s"] == pytest.approx(0.25) and result["read_best_s"] == pytest.approx(0.25)
    assert result["copy_bytes_s"] == pytest.approx(8 * MIB / 0.25)
    assert result["read_bytes_s"] == pytest.approx(4 * MIB / 0.25)
    assert result["bandwidth_bytes_s"] == max(result["copy_bytes_s"], result["read_bytes_s"])


def test_real_bandwidth_measurement_is_consistent() -> None:
    """A real 16 MiB copy, timed by a clock the test records: the rates follow from the known allocation (read +
    write of 16 MiB per copy, 16 MiB per sum) and the intervals the test saw, not from the result's own fields."""
    import time

    stamps: list[float] = []

    def recording_clock() -> float:
        stamps.append(time.perf_counter())
        return stamps[-1]

    result = measure_bandwidth(threads=1, buffer_bytes=16 * MIB, repeats=2, clock=recording_clock)
    # Per repeat: start and end of the copy, then start and end of the sum.
    assert len(stamps) == 2 * 4
    copies = [stamps[i + 1] - stamps[i] for i in range(0, len(stamps), 4)]
    sums = [stamps[i + 3] - stamps[i + 2] for i in range(0, len(stamps), 4)]
    assert result["threads"] == 1 and result["buffer_bytes"] == 16 * MIB and result["bytes_moved"] == 32 * MIB
    assert result["copy_bytes_s"] == pytest.approx(32 * MIB / min(copies))
    assert result["read_bytes_s"] == pytest.approx(16 * MIB / min(sums))
    assert result["bandwidth_bytes_s"] == pytest.approx(max(32 * MIB / min(copies), 16 * MIB / min(sums)))
    assert math.isfinite(result["bandwidth_bytes_s"]) and result["bandwidth_bytes_s"] > 0


def test_bytes_per_token_skips_an_untied_embedding_but_not_a_tied_one() -> None:
    read = {"embedding_bytes": 1000 * 8, "embedding_rows": 1000, "tied": False}
    assert bytes_per_token(50_000, read) == 50_000 - 8000 + 8
    assert bytes_per_token(50_000, {**read, "tied": True}) == 50_000
    assert bytes_per_token(50_000, None) == 50_000
    fields = roofline(1e9, 50_000, read, decode_tok_s=10_000.0)
    assert fields["bytes_per_token"] == 42_008
    assert fields["decode_tok_s_limit"] == pytest.approx(1e9 / 42_008)
    assert fields["fraction"] == pytest.approx(10_000 / (1e9 / 42_008))
    assert roofline(None, 50_000, read, 1.0) is None and roofline(1e9, 50_000, read, None)["fraction"] is None


def test_weights_read_sees_tied_and_untied_embeddings() -> None:
    from pathlib import Path

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from workbench.runtimes.torch import TorchVariant

    for tied in (False, True):
        config = LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied)
        model = LlamaForCausalLM(config).to(torch.float32)
        read = weights_read(TorchVariant("x", model, None, Path("."), "cpu"))
        assert read == {"embedding_bytes": 100 * 16 * 4, "embedding_rows": 100, "tied": tied}


def _run_with_roofline() -> dict:
    metrics = {"ttft_s": 0.1, "ttft_s_min": 0.09, "ttft_s_max": 0.12, "decode_tok_s": 20.0, "decode_tok_s_min": 19.0,
               "decode_tok_s_max": 21.0, "weight_bytes": 1e8}
    record = {"name": "fp32", "method": "fp32", "status": "ok", "honesty": "real-kernel", "error": None,
              "metrics": metrics, "roofline": roofline(4e9, 100_000_000, None, 20.0)}
    return {"model": {"source": "x", "note": None}, "variants": [record], "preset": {"baseline": "fp32"}}


def test_latency_chart_and_table_show_the_limit() -> None:
    from workbench.views.plots import latency
    from workbench.views.report import summary_table

    figure = latency(_run_with_roofline())
    limit = next(trace for trace in figure.data if trace.name == "bandwidth limit")
    assert list(limit.y) == [pytest.approx(40.0)] and "limit 40 (50%)" in limit.text[0]
    row = summary_table(_run_with_roofline()).iloc[0]
    assert row["decode limit tok/s"] == pytest.approx(40.0) and row["of limit"] == pytest.approx(0.5)


class _LoadedMachine:
    """/proc counters in which `load` other cores stay busy, and the calibrations' results, set by the test."""

    def __init__(self) -> None:
        self.load, self.bandwidth, self.flops, self.calls = 0.0, 10e9, 50e9, 0

    def probe(self):
        import time

        from workbench.metrics.latency import CpuSample

        now = time.perf_counter()
        return CpuSample(machine_busy_s=now * (1 + self.load), process_ticks_s=now, process_cpu_s=now)


def test_calibration_under_contention_is_not_cached_and_clean_ones_keep_the_best(monkeypatch, tmp_path) -> None:
    """The real calibrate_worker (in this process), with a loaded /proc reading and fast stand-in measurements."""
    from workbench import process
    from workbench.planning import machine as calibration
    from workbench.process import WorkerOutcome

    machine = _LoadedMachine()
    monkeypatch.setattr(calibration, "workbench_home", lambda: tmp_path)
    monkeypatch.setattr(calibration, "_cpu_probe", machine.probe)
    def bandwidth(threads: int) -> dict:
        import time

        time.sleep(0.2)  # a known duration, so the microseconds between the probe and clock readings are noise
        return {"bandwidth_bytes_s": machine.bandwidth, "method": "stand-in", "threads": threads}

    monkeypatch.setattr(calibration, "measure_bandwidth", bandwidth)
    monkeypatch.setattr(calibration, "measure_matmul", lambda threads: {"flops_s": machine.flops})

    def in_process(target, payload, log_path, on_event=lambda _m: None, **_kwargs):
        machine.calls += 1
        return WorkerOutcome(ok=True, result=calibration.calibrate_worker(payload, on_event))

    monkeypatch.setattr(process, "run_in_worker", in_process)
    messages: list[str] = []

    machine.load, machine.bandwidth = 1.5, 5.8e9  # the contended 1-thread calibration
    loaded = calibration.machine_profile(1, emit=messages.append)
    assert loaded["provisional"] is True and loaded["contention"] == pytest.approx(1.5, rel=0.05)
    assert calibration.cached_profile(1) is None and not (tmp_path / calibration.PROFILE_FILE).exists()
    assert any("other processes used 1.5" in m for m in messages) and any("not cached" in m for m in messages)
    assert "PROVISIONAL" in calibration.calibration_note(loaded)

    calibration.machine_profile(1)  # nothing clean is cached: measured again
    assert machine.calls == 2

    machine.load, machine.bandwidth = 0.0, 12e9
    clean = calibration.machine_profile(1)
    assert "provisional" not in clean and clean["contention"] < 0.25
    assert calibration.cached_profile(1)["bandwidth"]["bandwidth_bytes_s"] == 12e9
    assert calibration.machine_profile(1) == calibration.cached_profile(1) and machine.calls == 3  # cached: not measured

    machine.bandwidth, machine.flops = 9e9, 60e9  # a slower bandwidth reading, a faster matmul one
    again = calibration.machine_profile(1, refresh=True)
    assert again["bandwidth"]["bandwidth_bytes_s"] == 12e9 and again["matmul"]["flops_s"] == 60e9
    assert again["calibrations"] == 2 and calibration.cached_profile(1) == again

    messages.clear()
    machine.load, machine.bandwidth = 0.9, 30e9  # faster, but measured under contention: discarded
    kept = calibration.machine_profile(1, refresh=True, emit=messages.append)
    assert kept["bandwidth"]["bandwidth_bytes_s"] == 12e9 and kept["discarded_contention"] == pytest.approx(0.9, rel=0.05)
    assert calibration.cached_profile(1)["bandwidth"]["bandwidth_bytes_s"] == 12e9
    assert any("other processes used 0.9" in m for m in messages)
    assert "discarded" in calibration.calibration_note(kept)


def test_a_calibration_stored_before_contention_was_recorded_is_measured_again(monkeypatch, tmp_path) -> None:
    import json

    from workbench.planning import machine as calibration

    monkeypatch.setattr(calibration, "workbench_home", lambda: tmp_path)
    legacy = {"bandwidth": {"bandwidth_bytes_s": 5.8e9}, "matmul": {"flops_s": 1e9}, "measured_at": "then"}
    (tmp_path / calibration.PROFILE_FILE).write_text(json.dumps({calibration._profile_key(1): legacy}))
    assert calibration.cached_profile(1) is None
