"""Memory, time and sparsity measured against known truth: an allocation, a sleep, a count of zeros."""

from __future__ import annotations

import time
from typing import Iterator, Sequence

import numpy as np
import pytest
import torch

from workbench.metrics.latency import measure_latency
from workbench.metrics.sparsity import sparsity_report, zero_count
from workbench.process import run_in_worker

MIB = 1 << 20


def test_peak_memory_sees_a_known_allocation_in_a_worker(tmp_path) -> None:
    size = 300 * MIB
    outcome = run_in_worker("tests.worker_targets:allocate_and_report", {"bytes": size}, tmp_path / "w.log")
    assert outcome.ok, outcome.error
    # The block is 300 MiB of touched pages; RSS accounting moves by a few pages either way
    # (pages the allocator returns, pages the interpreter touches), far below the block itself.
    assert size - 2 * MIB <= outcome.result["added_bytes"] <= size + 32 * MIB
    assert outcome.result["process_peak_rss_bytes"] >= size


def test_latency_sees_known_sleeps() -> None:
    prefill_s, per_token_s, new_tokens = 0.20, 0.05, 5

    def sleepy_generate(ids: Sequence[int], max_new_tokens: int) -> Iterator[int]:
        time.sleep(prefill_s)
        yield 1
        for _ in range(max_new_tokens - 1):
            time.sleep(per_token_s)
            yield 1

    result = measure_latency(sleepy_generate, list(range(40)), new_tokens, warmup=1, repeats=3)
    assert result["ttft_s"] == pytest.approx(prefill_s, abs=0.05)
    assert result["prefill_tok_s"] == pytest.approx(40 / result["ttft_s"])
    assert result["decode_tok_s"] == pytest.approx(1 / per_token_s, rel=0.2)
    assert result["decode_tok_s_min"] <= result["decode_tok_s"] <= result["decode_tok_s_max"]


def test_latency_refuses_a_generator_that_stops_early() -> None:
    with pytest.raises(RuntimeError, match="yielded 1 tokens, 3 were asked for"):
        measure_latency(lambda ids, n: iter([1]), [1, 2], 3, warmup=0, repeats=1)


def test_sparsity_of_tensors_with_known_zeros() -> None:
    a = torch.ones(10, 10)
    a.view(-1)[:37] = 0
    b = np.ones((4, 25), dtype=np.int8)
    b[0, :5] = 0
    assert zero_count(a) == (37, 100)
    assert zero_count(b) == (5, 100)
    overall, layers = sparsity_report([("a", a), ("b", b)])
    assert overall == pytest.approx(42 / 200)
    assert [l["sparsity"] for l in layers] == [pytest.approx(0.37), pytest.approx(0.05)]
    assert all(l["kld_contribution"] is None for l in layers)
