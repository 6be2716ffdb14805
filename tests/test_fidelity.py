"""Fidelity statistics against independent plain-numpy computations, McNemar against scipy's exact
binomial, and the 16-bit reference storage against its size and error bound."""

from __future__ import annotations

import math

import numpy as np
import pytest

from workbench.metrics.agreement import first_difference, flip_statistics, generation_agreement, mcnemar_p
from workbench.metrics.quality import (divergence_statistics, evaluate_quality, per_token_path, ppl_ratio_interval)
from workbench.metrics.windows import plan_windows
from workbench.runtimes.base import DummyVariant

VOCAB, N_TOKENS, CONTEXT, STRIDE = 64, 400, 64, 48


def _tables(seed: int = 11) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(VOCAB, VOCAB)).astype(np.float32) * 3
    # A "compressed" variant: the baseline plus noise, so the distributions are close but not equal.
    other = (base + rng.normal(size=base.shape).astype(np.float32) * 0.4).astype(np.float32)
    return base, other


def _tokens(seed: int = 12) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, VOCAB, size=N_TOKENS)]


def _hand_log_softmax(row: np.ndarray) -> np.ndarray:
    row = row.astype(np.float64)
    top = row.max()
    return row - (top + math.log(np.exp(row - top).sum()))


def _hand_per_token(base: np.ndarray, other: np.ndarray, tokens: list[int]) -> dict[str, np.ndarray]:
    """Per scored token, from the logit tables alone: KLD, Δp, same-top, NLLs, and each token's window."""
    kld, dp, same, nll, nll_base, window_of = [], [], [], [], [], []
    for w_index, w in enumerate(plan_windows(len(tokens), CONTEXT, STRIDE)):
        for target in range(w.first_target, w.end):
            lp, lq = _hand_log_softmax(base[tokens[target - 1]]), _hand_log_softmax(other[tokens[target - 1]])
            p = np.exp(lp)
            kld.append(float(np.sum(p * (lp - lq))))
            dp.append(math.exp(lq[tokens[target]]) - math.exp(lp[tokens[target]]))
            same.append(int(np.argmax(lp)) == int(np.argmax(lq)))
            nll.append(-lq[tokens[target]])
            nll_base.append(-lp[tokens[target]])
            window_of.append(w_index)
    return {k: np.array(v) for k, v in dict(kld=kld, dp=dp, same=same, nll=nll, nll_base=nll_base,
                                           window=window_of).items()}


def _hand_percentile(values: np.ndarray, fraction: float) -> float:
    """llama.cpp's `percentile`: rank fraction*(n-1) on the sorted values, linear between neighbours."""
    ordered = sorted(values.tolist())
    rank = fraction * (len(ordered) - 1)
    low = int(math.floor(rank))
    high = min(low + 1, len(ordered) - 1)
    return (1 - (rank - low)) * ordered[low] + (rank - low) * ordered[high]


def _hand_median(values: np.ndarray) -> float:
    ordered = sorted(values.tolist())
    n = len(ordered)
    return ordered[n // 2] if n % 2 else 0.5 * (ordered[n // 2 - 1] + ordered[n // 2])


def _llama_mean_and_uncertainty(values: np.ndarray) -> tuple[float, float]:
    """Written as llama.cpp accumulates it: sums of x and x^2 (perplexity.cpp, mean_and_uncertainty)."""
    n = len(values)
    s, s2 = float(sum(values)), float(sum(v * v for v in values))
    f = s / n
    df = s2 / n - f * f
    return f, math.sqrt(df / (n - 1))


def _hand_statistics(t: dict[str, np.ndarray]) -> dict[str, float]:
    n = len(t["kld"])
    expected: dict[str, float] = {}
    expected["kld_mean"], expected["kld_mean_stderr"] = _llama_mean_and_uncertainty(t["kld"])
    expected["kld_median"] = _hand_median(t["kld"])
    for key, fraction in (("kld_p90", 0.9), ("kld_p95", 0.95), ("kld_p99", 0.99), ("kld_p999", 0.999)):
        expected[key] = _hand_percentile(t["kld"], fraction)
    expected["kld_max"] = max(t["kld"])
    expected["delta_p_mean"], expected["delta_p_mean_stderr"] = _llama_mean_and_uncertainty(t["dp"])
    mse, mse_unc = _llama_mean_and_uncertainty(t["dp"] ** 2)
    expected["delta_p_rms"] = math.sqrt(mse)
    expected["delta_p_rms_stderr"] = 0.5 / math.sqrt(mse) * mse_unc
    for key, fraction in (("delta_p_p01", 0.01), ("delta_p_p05", 0.05), ("delta_p_p95", 0.95), ("delta_p_p99", 0.99)):
        expected[key] = _hand_percentile(t["dp"], fraction)
    expected["delta_p_p50"] = _hand_median(t["dp"])
    top = float(np.mean(t["same"]))
    expected["top1_agreement"], expected["top1_agreement_stderr"] = top, math.sqrt(top * (1 - top) / (n - 1))
    # llama.cpp's ln(PPL(Q)/PPL(base)) error: sqrt(se^2 + se_base^2 - 2 cov), cov from the sum of products.
    (mean_q, se_q), (mean_b, se_b) = _llama_mean_and_uncertainty(t["nll"]), _llama_mean_and_uncertainty(t["nll_base"])
    cov = (float(sum(a * b for a, b in zip(t["nll"], t["nll_base"]))) / n - mean_q * mean_b) / (n - 1)
    expected["ln_ppl_ratio_mean"] = mean_q - mean_b
    expected["ln_ppl_ratio_stderr"] = math.sqrt(se_q**2 + se_b**2 - 2 * cov)
    expected["ln_ppl_correlation"] = cov / (se_q * se_b)
    return expected


MEANS = ("kld_mean", "kld_mean_stderr", "delta_p_mean", "delta_p_mean_stderr", "delta_p_rms", "delta_p_rms_stderr",
         "top1_agreement", "top1_agreement_stderr", "ln_ppl_ratio_mean", "ln_ppl_ratio_stderr", "ln_ppl_correlation")
PERCENTILES = ("kld_median", "kld_p90", "kld_p95", "kld_p99", "kld_p999", "kld_max", "delta_p_p01", "delta_p_p05",
               "delta_p_p50", "delta_p_p95", "delta_p_p99")


def _hand_ppl_interval(t: dict[str, np.ndarray]) -> tuple[float, float, float]:
    """Window-level paired interval, by loops: exp of (sum D_w / N) ± t_{W-1, .975} * cluster standard error."""
    from scipy.stats import t as student_t

    diffs: dict[int, list[float]] = {}
    for window, d in zip(t["window"], t["nll"] - t["nll_base"]):
        diffs.setdefault(int(window), []).append(float(d))
    total = sum(len(v) for v in diffs.values())
    r = sum(sum(v) for v in diffs.values()) / total
    w = len(diffs)
    se = math.sqrt(w / (w - 1) * sum((sum(v) - len(v) * r) ** 2 for v in diffs.values())) / total
    half = student_t.ppf(0.975, w - 1) * se
    return math.exp(r), math.exp(r - half), math.exp(r + half)


def test_every_statistic_matches_an_independent_numpy_computation(tmp_path) -> None:
    base, other = _tables()
    tokens = _tokens()
    reference = tmp_path / "ref.npy"
    evaluate_quality(DummyVariant("b", base).logits, tokens, CONTEXT, STRIDE, write_reference=reference,
                     reference_dtype="float32")
    got = evaluate_quality(DummyVariant("o", other).logits, tokens, CONTEXT, STRIDE, reference=reference)
    truth = _hand_per_token(base, other, tokens)
    expected = _hand_statistics(truth)
    assert got["scored_tokens"] == len(truth["kld"]) > 100
    for key in MEANS:  # KLD from float32-stored log-probs: well inside 1e-6 of the float64 truth
        assert got[key] == pytest.approx(expected[key], rel=1e-6), key
    for key in PERCENTILES:  # same rank and interpolation convention as the hand version
        assert got[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-12), key
    ratio, low, high = _hand_ppl_interval(truth)
    assert got["ppl_ratio"] == pytest.approx(ratio, rel=1e-9)
    assert got["ppl_ratio"] == pytest.approx(got["perplexity"] / math.exp(truth["nll_base"].mean()), rel=1e-9)
    assert got["ppl_ratio_ci95"] == pytest.approx([low, high], rel=1e-9)
    assert got["ppl_indistinguishable"] == (low <= 1 <= high)


def test_percentile_convention_is_rank_interpolation_on_a_known_set() -> None:
    # 0..100 shuffled: the p-th percentile at rank p*(n-1) is p*100 exactly; 0.999 -> rank 99.9 -> 99.9.
    values = np.random.default_rng(0).permutation(np.arange(101, dtype=np.float64))
    zeros = np.zeros(101)
    stats = divergence_statistics(values, values - 50, np.ones(101, bool), zeros + 2, zeros + 1)
    assert (stats["kld_median"], stats["kld_p90"], stats["kld_p99"], stats["kld_p999"], stats["kld_max"]) == (
        50.0, 90.0, 99.0, pytest.approx(99.9), 100.0)
    assert (stats["delta_p_p01"], stats["delta_p_p05"], stats["delta_p_p50"]) == (-49.0, -45.0, 0.0)
    # Even count: the median is the mean of the two middle values (llama.cpp's kld_median).
    even = divergence_statistics(np.array([4.0, 1, 3, 2] * 3), np.zeros(12), np.ones(12, bool), np.ones(12), np.ones(12))
    assert even["kld_median"] == 2.5
    assert even["ln_ppl_ratio_mean"] == 0.0 and even["ln_ppl_correlation"] is None  # constant NLLs: undefined


def test_too_few_tokens_give_null_errors_not_zero() -> None:
    stats = divergence_statistics(np.arange(10.0), np.arange(10.0), np.ones(10, bool), np.arange(10.0), np.zeros(10))
    assert stats["kld_mean"] == 4.5
    assert stats["kld_mean_stderr"] is None and stats["top1_agreement_stderr"] is None
    assert stats["ln_ppl_correlation"] is None
    one = ppl_ratio_interval(np.ones(5), np.zeros(5), [5])
    assert one["ppl_ratio"] == pytest.approx(math.e) and one["ppl_ratio_ci95"] is None and one["ppl_ratio_note"]


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_baseline_against_itself(tmp_path, dtype: str) -> None:
    base, _ = _tables()
    tokens = _tokens()
    reference = tmp_path / "ref.npy"
    evaluate_quality(DummyVariant("b", base).logits, tokens, CONTEXT, STRIDE, write_reference=reference,
                     reference_dtype=dtype)
    same = evaluate_quality(DummyVariant("b", base).logits, tokens, CONTEXT, STRIDE, reference=reference)
    # Both sides are rounded to the storage precision before the KLD: the same model gives exactly 0.
    assert same["kld_mean"] == 0.0 and same["kld_max"] == 0.0 and same["top1_agreement"] == 1.0
    assert same["delta_p_rms"] == 0.0 and same["ln_ppl_ratio_mean"] == 0.0 and same["ppl_ratio"] == 1.0
    assert same["ppl_ratio_ci95"] == [1.0, 1.0] and same["ppl_indistinguishable"] is True


def test_16bit_reference_is_half_the_size_and_moves_statistics_within_the_bound(tmp_path) -> None:
    vocab = 2048
    rng = np.random.default_rng(21)
    base = rng.normal(size=(vocab, vocab)).astype(np.float32) * 2.5
    other = (base + rng.normal(size=base.shape).astype(np.float32) * 0.3).astype(np.float32)
    tokens = [int(t) for t in rng.integers(0, vocab, size=300)]
    paths = {d: tmp_path / f"ref-{d}.npy" for d in ("float16", "float32")}
    for dtype, path in paths.items():
        evaluate_quality(DummyVariant("b", base).logits, tokens, 100, 100, write_reference=path, reference_dtype=dtype)
    half, full = paths["float16"].stat().st_size, paths["float32"].stat().st_size
    header = 128  # numpy's .npy header for these arrays, the same for both
    assert half - header == (full - header) // 2  # 2 bytes per log-prob instead of 4
    # With the exact per-token side file (target log-prob float64 + argmax int64): half, plus 16 bytes a token
    # and the headers.
    side = per_token_path(paths["float16"]).stat().st_size
    assert half + side <= full / 2 + 16 * len(tokens) + 1024
    got = evaluate_quality(DummyVariant("o", other).logits, tokens, 100, 100, reference=paths["float16"])
    bound = got["kld_storage_bound"]

    # The bound, recomputed here from the stored half-precision values: |l - fl16(l)| <= max(2^-11 |r|, 2^-25),
    # plus the shift that renormalizes the rounded row.
    stored = np.load(paths["float16"]).astype(np.float64)
    truth_kld, hand_bounds = [], []
    row = 0
    for w in plan_windows(len(tokens), 100, 100):
        for target in range(w.first_target, w.end):
            lp, lq = _hand_log_softmax(base[tokens[target - 1]]), _hand_log_softmax(other[tokens[target - 1]])
            truth_kld.append(float(np.sum(np.exp(lp) * (lp - lq))))
            r, q = stored[row], lq.astype(np.float16).astype(np.float64)
            c_s, c_t = math.log(np.exp(r).sum()), math.log(np.exp(q).sum())  # renormalizing shifts
            s, t = r - c_s, q - c_t
            e = np.maximum(np.abs(r) * 2.0**-11, 2.0**-25) + abs(c_s)
            h = np.maximum(np.abs(q) * 2.0**-11, 2.0**-25) + abs(c_t)
            hand_bounds.append(float(np.sum(e * np.exp(s + e) * (np.abs(s - t + 1) + e + h) + np.exp(s) * h)))
            row += 1
    truth_kld, hand_bounds = np.array(truth_kld), np.array(hand_bounds)
    assert bound["kld_mean"] == pytest.approx(hand_bounds.mean(), rel=1e-9)
    assert bound["kld_percentiles_and_max"] == pytest.approx(hand_bounds.max(), rel=1e-9)
    assert abs(got["kld_mean"] - truth_kld.mean()) <= bound["kld_mean"]
    for key, fraction in (("kld_p90", 0.9), ("kld_p99", 0.99), ("kld_p999", 0.999), ("kld_max", 1.0)):
        assert abs(got[key] - _hand_percentile(truth_kld, fraction)) <= bound["kld_percentiles_and_max"], key
    _, truth_se = _llama_mean_and_uncertainty(truth_kld)
    assert abs(got["kld_mean_stderr"] - truth_se) <= bound["kld_mean_stderr"]
    # Everything else reads the exact side file: identical to the float32 storage's figures.
    exact = evaluate_quality(DummyVariant("o", other).logits, tokens, 100, 100, reference=paths["float32"])
    for key in ("top1_agreement", "delta_p_mean", "delta_p_rms", "delta_p_p01", "ln_ppl_ratio_mean",
                "ln_ppl_ratio_stderr", "ln_ppl_correlation", "ppl_ratio", "ppl_ratio_ci95"):
        assert got[key] == exact[key], key


@pytest.mark.parametrize("gain,loss", [(0, 1), (3, 9), (9, 3), (0, 7), (5, 5), (11, 13), (2, 20)])
def test_mcnemar_exact_binomial_on_few_discordant_pairs(gain: int, loss: int) -> None:
    from scipy.stats import binomtest

    n = gain + loss
    assert mcnemar_p(gain, loss) == pytest.approx(binomtest(gain, n, 0.5).pvalue, rel=1e-12)
    # And from first principles: twice the smaller tail of Binomial(n, 1/2), capped at 1.
    tail = sum(math.comb(n, k) for k in range(0, min(gain, loss) + 1)) / 2**n
    assert mcnemar_p(gain, loss) == pytest.approx(min(1.0, 2 * tail), rel=1e-12)


def test_mcnemar_many_discordant_pairs_uses_continuity_corrected_chi_square() -> None:
    gain, loss = 30, 12
    statistic = (abs(gain - loss) - 1) ** 2 / (gain + loss)
    # The chi-square(1) survival function is erfc(sqrt(x / 2)).
    assert mcnemar_p(gain, loss) == pytest.approx(math.erfc(math.sqrt(statistic / 2)), rel=1e-12)
    assert mcnemar_p(0, 0) == 1.0


def test_flip_statistics_on_a_known_table() -> None:
    # 10 shared items: 5 both right, 1 both wrong, 3 lost (base right -> variant wrong), 1 gained.
    base = {str(i): v for i, v in enumerate([1, 1, 1, 1, 1, 0, 1, 1, 1, 0])}
    variant = {str(i): v for i, v in enumerate([1, 1, 1, 1, 1, 0, 0, 0, 0, 1])}
    variant["extra"] = True  # not scored by the baseline: left out of the pairing
    stats = flip_statistics({k: bool(v) for k, v in base.items()}, {k: bool(v) for k, v in variant.items()})
    assert stats["paired_items"] == 10
    assert (stats["flips"], stats["flips_gain"], stats["flips_loss"]) == (0.4, 0.1, 0.3)
    assert stats["recovery"] == pytest.approx(100 * 6 / 8)
    assert stats["mcnemar_p"] == pytest.approx(2 * (1 + 4) / 16)  # Binomial(4, 1/2), k <= 1, two-sided
    none_right = flip_statistics({"a": False}, {"a": True})
    assert none_right["recovery"] is None and "undefined" in none_right["note"]


def test_generation_agreement() -> None:
    base = [[1, 2, 3, 4], [5, 6, 7], [8, 9], [1, 1]]
    variant = [[1, 2, 3, 4], [5, 0, 7], [8, 9, 10], [2, 1]]
    assert first_difference([1, 2], [1, 2, 3]) == 2 and first_difference([1], [1]) is None
    result = generation_agreement(base, variant)
    assert result["samples_exact_match"] == 0.25
    assert result["samples_first_diff_mean"] == pytest.approx((1 + 2 + 0) / 3)
    same = generation_agreement(base, base)
    assert same["samples_exact_match"] == 1.0 and same["samples_first_diff_mean"] is None and same["note"]


def test_run_pairs_every_variant_with_the_baselines_items(write_preset, tmp_path) -> None:
    import json

    from workbench.config.presets import load_preset
    from workbench.running.runner import Runner

    path = write_preset([{"name": "fp32", "method": "fp32"}, {"name": "bf16", "method": "bf16"}], name="flips",
                        lm_eval={"tasks": ["pydoc_lastword"], "limit": 12, "batch_size": 4})
    out = tmp_path / "out"
    run = Runner(load_preset(path), out_dir=out).run()
    base, variant = run["variants"]
    assert base["status"] == variant["status"] == "ok"
    assert not (out / "baseline_logprobs.npy").exists() and not (out / "baseline_logprobs.npy.per_token.npz").exists()
    saved = json.loads((out / "baseline_items.json").read_text())
    assert saved["lm_eval"]["pydoc_lastword"] == base["quality_detail"]["lm_eval_items"]["pydoc_lastword"]
    assert saved["samples"] == [s["output_ids"] for s in base["samples"]]
    # The baseline is not paired with itself: null with a reason, never 0.
    assert base["metrics"]["lm_eval.pydoc_lastword.flips"] is None and base["quality_detail"]["paired_note"]
    assert base["metrics"]["ppl_ratio"] == 1.0 and base["metrics"]["kld_mean"] == 0.0

    # Flips recomputed by hand from the two variants' per-item results.
    b = saved["lm_eval"]["pydoc_lastword"]
    v = variant["quality_detail"]["lm_eval_items"]["pydoc_lastword"]
    assert len(b) == len(v) == 12
    gains = sum(1 for k in b if v[k] and not b[k])
    losses = sum(1 for k in b if b[k] and not v[k])
    m = variant["metrics"]
    assert m["lm_eval.pydoc_lastword.flips"] == pytest.approx((gains + losses) / 12)
    assert m["lm_eval.pydoc_lastword.flips_gain"] == pytest.approx(gains / 12)
    assert m["lm_eval.pydoc_lastword.acc"] == pytest.approx(sum(v.values()) / 12)
    if any(b.values()):
        assert m["lm_eval.pydoc_lastword.recovery"] == pytest.approx(100 * sum(v.values()) / sum(b.values()))
    same = [a == c for a, c in zip(saved["samples"], [s["output_ids"] for s in variant["samples"]])]
    assert m["samples_exact_match"] == sum(same) / len(same)
    for key in ("kld_p999", "delta_p_rms", "ln_ppl_ratio_stderr", "ppl_ratio"):
        assert m[key] is not None, key
    assert len(m["ppl_ratio_ci95"]) == 2 and m["ppl_indistinguishable"] in (True, False)

    from workbench.views.report import INDISTINGUISHABLE_TEXT, fidelity_table, flips_table, format_table

    assert "ppl ratio [95% CI]" in format_table(run)
    # The mark and its legend appear when a variant other than the baseline has an interval containing 1.
    assert (INDISTINGUISHABLE_TEXT in format_table(run)) == bool(variant["metrics"]["ppl_indistinguishable"])
    assert list(flips_table(run)["variant"]) == ["fp32", "bf16"]
    assert fidelity_table(run)["KLD mean"][0] == 0.0
    assert "<h2>Fidelity</h2>" in (out / "report.html").read_text()
