"""Perplexity, KLD, top-1 and delta-p against hand computations on known distributions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from workbench.metrics.quality import evaluate_quality, kld_stats
from workbench.metrics.windows import plan_windows, scored_count, scored_label
from workbench.runtimes.base import DummyVariant


@pytest.mark.parametrize("n,context,stride", [(1000, 128, 128), (1000, 128, 64), (1000, 128, 50), (130, 128, 128), (64, 64, 32)])
def test_windows_score_every_token_once(n: int, context: int, stride: int) -> None:
    windows = plan_windows(n, context, stride)
    scored = [t for w in windows for t in range(w.first_target, w.end)]
    assert len(scored) == len(set(scored)) == scored_count(windows)
    assert all(w.end - w.start <= context and w.first_target > w.start for w in windows)
    if stride < context:  # overlapping windows leave only token 0 unscored
        assert set(scored) == set(range(1, n))
    else:  # disjoint windows: every token but each window's first
        assert set(scored) == set(range(1, n)) - {w.start for w in windows}


def test_scored_labels() -> None:
    assert scored_label(512, 512) == "all"
    assert scored_label(512, 256) == "second-half"
    assert scored_label(512, 100) == "last-100-of-512"


def _random_table(vocab: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(vocab, vocab)).astype(np.float32) * 3


def _hand_nll(table: np.ndarray, tokens: list[int], windows) -> float:
    total, count = 0.0, 0
    for w in windows:
        for target in range(w.first_target, w.end):
            row = table[tokens[target - 1]].astype(np.float64)
            log_z = math.log(np.exp(row - row.max()).sum()) + row.max()
            total -= row[tokens[target]] - log_z
            count += 1
    return total / count


def test_perplexity_equals_hand_computation() -> None:
    table = _random_table(16, seed=1)
    tokens = list(np.random.default_rng(2).integers(0, 16, size=300))
    result = evaluate_quality(DummyVariant("d", table).logits, tokens, context=64, stride=32)
    expected = math.exp(_hand_nll(table, tokens, plan_windows(300, 64, 32)))
    assert result["perplexity"] == pytest.approx(expected, rel=1e-6)
    assert result["scored_tokens"] == 299
    assert result["kld_mean"] is None and result["top1_agreement"] is None


def test_divergence_against_itself_is_zero_and_against_another_matches_hand(tmp_path) -> None:
    base, other = _random_table(12, seed=3), _random_table(12, seed=4)
    tokens = list(np.random.default_rng(5).integers(0, 12, size=200))
    reference = tmp_path / "ref.npy"
    # float32 storage: within 1e-4 of float64 even for these far-apart tables (KLD ~ 8 nats); the float16
    # default is checked against its bound below and in test_fidelity.py.
    evaluate_quality(DummyVariant("b", base).logits, tokens, 50, 50, write_reference=reference,
                     reference_dtype="float32")
    same = evaluate_quality(DummyVariant("b", base).logits, tokens, 50, 50, reference=reference)
    assert same["kld_mean"] == 0.0 and same["kld_p99"] == 0.0
    assert same["top1_agreement"] == 1.0 and same["delta_p_mean"] == 0.0

    diff = evaluate_quality(DummyVariant("o", other).logits, tokens, 50, 50, reference=reference)
    klds, agrees, deltas = [], [], []
    for w in plan_windows(200, 50, 50):
        for target in range(w.first_target, w.end):
            p = np.exp(base[tokens[target - 1]].astype(np.float64)); p /= p.sum()
            q = np.exp(other[tokens[target - 1]].astype(np.float64)); q /= q.sum()
            klds.append(float((p * np.log(p / q)).sum()))
            agrees.append(p.argmax() == q.argmax())
            deltas.append(q[tokens[target]] - p[tokens[target]])
    assert diff["kld_mean"] == pytest.approx(np.mean(klds), rel=1e-4)
    assert diff["kld_p99"] == pytest.approx(np.percentile(klds, 99), rel=1e-4)
    assert diff["top1_agreement"] == pytest.approx(np.mean(agrees))
    assert diff["delta_p_mean"] == pytest.approx(np.mean(deltas), abs=1e-6)

    half = tmp_path / "ref16.npy"
    evaluate_quality(DummyVariant("b", base).logits, tokens, 50, 50, write_reference=half)
    diff16 = evaluate_quality(DummyVariant("o", other).logits, tokens, 50, 50, reference=half)
    bound = diff16["kld_storage_bound"]
    assert abs(diff16["kld_mean"] - np.mean(klds)) <= bound["kld_mean"]
    assert abs(diff16["kld_p99"] - np.percentile(klds, 99)) <= bound["kld_percentiles_and_max"]
    assert diff16["delta_p_mean"] == diff["delta_p_mean"] and diff16["top1_agreement"] == diff["top1_agreement"]


def test_kld_of_known_two_point_distributions() -> None:
    p = torch.tensor([[0.5, 0.5]]).log()
    q = torch.tensor([[0.9, 0.1]]).log()
    stats = kld_stats(p, q, torch.tensor([1]))
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)  # 0.5108...
    assert float(stats["kld"][0]) == pytest.approx(expected, rel=1e-6)
    assert float(stats["delta_p"][0]) == pytest.approx(0.1 - 0.5, abs=1e-6)


def test_vocabulary_mismatch_leaves_divergence_null(tmp_path) -> None:
    tokens = list(range(10)) * 10
    reference = tmp_path / "ref.npy"
    evaluate_quality(DummyVariant("b", _random_table(10, 6)).logits, tokens, 20, 20, write_reference=reference)
    wide = np.concatenate([_random_table(10, 7), np.zeros((10, 2), np.float32)], axis=1)
    result = evaluate_quality(DummyVariant("w", wide).logits, tokens, 20, 20, reference=reference)
    assert result["kld_mean"] is None and "vocabulary sizes differ" in result["divergence_note"]
