"""Perplexity and divergence from the baseline, computed from per-window logits on fixed token ids.

Windows and which tokens each scores are planned in `metrics/windows.py`.

The baseline's log-probabilities at every scored position are kept in a .npy file (memory-mapped,
read one window's rows at a time), so a variant's KLD, top-1 agreement and delta-p compare exact
distributions without loading the baseline again. By default that file is float16 (half the
float32 size, a quarter of float64); beside it, `<file>.per_token.npz` keeps what must stay exact per
scored token: the baseline's log-probability of the target token (float64) and its argmax id. So
perplexity-ratio, delta-p and top-1 figures do not depend on the 16-bit storage at all; only the KLD
figures do, and `evaluate_quality` reports a proven bound on how much they can move (`kld_storage_bound`).

The statistics follow llama.cpp's `llama-perplexity --kl-divergence` (tools/perplexity/perplexity.cpp,
https://github.com/ggml-org/llama.cpp/blob/master/tools/perplexity/perplexity.cpp, functions
`kl_divergence`, `log_softmax(..., kl_divergence_result &)`, lambdas `mean_and_uncertainty`,
`covariance` and `percentile`): see `divergence_statistics`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from workbench.metrics.windows import Window, plan_windows, scored_count
from workbench.data.validity import with_bos

REFERENCE_DTYPES = {"float16": np.float16, "float32": np.float32}

# Unit roundoff of IEEE binary16 (11 significant bits): round-to-nearest moves a normal value x by at most
# 2^-11 |x|; below the smallest normal (2^-14) the spacing is 2^-24, so the move is at most 2^-25.
FP16_UNIT_ROUNDOFF = 2.0**-11
FP16_SUBNORMAL_HALF_SPACING = 2.0**-25

# Fractions for percentiles, as llama.cpp prints them (KLD: 90/95/99/99.9 %; delta-p: 1/5/50/95/99 %).
KLD_PERCENTILES = {"kld_p90": 0.90, "kld_p95": 0.95, "kld_p99": 0.99, "kld_p999": 0.999}
DELTA_P_PERCENTILES = {"delta_p_p01": 0.01, "delta_p_p05": 0.05, "delta_p_p50": 0.50, "delta_p_p95": 0.95,
                       "delta_p_p99": 0.99}

# Keys of `evaluate_quality`'s result that belong in a variant record's metrics (worker.py passes these).
DIVERGENCE_KEYS = (
    "kld_mean", "kld_mean_stderr", "kld_median", *KLD_PERCENTILES, "kld_max",
    "top1_agreement", "top1_agreement_stderr",
    "delta_p_mean", "delta_p_mean_stderr", "delta_p_rms", "delta_p_rms_stderr", *DELTA_P_PERCENTILES,
    "ln_ppl_ratio_mean", "ln_ppl_ratio_stderr", "ln_ppl_correlation",
    "ppl_ratio", "ppl_ratio_ci95", "ppl_indistinguishable",
)
QUALITY_METRICS = ("perplexity", *DIVERGENCE_KEYS)
ROWS_PER_BLOCK = 64  # rows of the reference compared at once (64 x 49152 float64 = 25 MB per temporary)


def per_token_path(reference: Path) -> Path:
    """The exact per-token side file of a reference .npy (target log-prob, argmax)."""
    return reference.with_name(reference.name + ".per_token.npz")


def remove_reference(reference: Path) -> None:
    reference.unlink(missing_ok=True)
    per_token_path(reference).unlink(missing_ok=True)


def kld_stats(base_logp: torch.Tensor, var_logp: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-position KL(base || variant), top-1 agreement and delta-p of the correct token. Inputs [n, vocab].

    Computed in float64. Unlike llama.cpp, which skips base log-probs below -16 (the floor of its 16-bit
    storage), every vocabulary entry counts; entries where the base probability is exactly 0 add 0.
    """
    base, var = base_logp.double(), var_logp.double()
    p = base.exp()
    kld = torch.where(p > 0, p * (base - var), torch.zeros_like(p)).sum(-1)
    agree = base.argmax(-1) == var.argmax(-1)
    rows = torch.arange(targets.numel())
    delta_p = var[rows, targets].exp() - base[rows, targets].exp()
    return {"kld": kld, "agree": agree, "delta_p": delta_p}


def _half_spacing(x: torch.Tensor) -> torch.Tensor:
    return torch.clamp(FP16_UNIT_ROUNDOFF * x.abs(), min=FP16_SUBNORMAL_HALF_SPACING)


def fp16_block_divergence(stored_base_logp: np.ndarray, stored_var_logp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per position: KL(base || variant) from float16-rounded log-probs, and how far it can be from the exact one.

    Both sides are rounded to float16 and renormalized to sum to probability 1 (float64): without that,
    each row's rounding errors add a first-order term sum(p * error) ~ 1e-4 to every KLD, which swamps
    near-lossless variants' KLD tails (measured with bench/fidelity.py); after it, the first-order term is
    weighted by (p - q) or (log p - log q), both small when the variant is close. A variant that
    reproduces the baseline exactly still gets KLD 0.

    The bound: with r = fl16(l) the rounded value, |l - r| <= max(2^-11 |r|, 2^-25); renormalizing
    subtracts c = logsumexp(r) (the exact row has logsumexp 0), so the renormalized s = r - c is within
    e := max(2^-11 |r|, 2^-25) + |c| of l; likewise h for the variant's t. Each KLD term is e^x (x - y).
    Moving x from s to l: by the mean value theorem the term moves at most e * e^(s+e) (|s - t + 1| + e + h);
    moving y from t to m: at most e^s h. The bound is the sum of both over the vocabulary.

    One pass of float64 torch ops over the block (each exponential computed once), since this runs on
    every scored token of every variant against a vocabulary of tens of thousands.
    """
    r = torch.from_numpy(stored_base_logp.astype(np.float64))  # numpy's float16 -> float64 is the faster one
    q = torch.from_numpy(stored_var_logp.astype(np.float64))
    c_s = torch.logsumexp(r, -1, keepdim=True)
    c_t = torch.logsumexp(q, -1, keepdim=True)
    s, t = r - c_s, q - c_t
    # A float64 sum of float16 values cannot overflow, so it is finite exactly when every value is.
    if bool(torch.isfinite(r.sum())) and bool(torch.isfinite(q.sum())):
        # The usual case (no -inf log-prob on either side): the same formulas without the masks, in place.
        p = s.exp()
        d = s.sub_(t)  # s - t; s is not needed after this
        kld = (p * d).sum(-1)
        eps = r.abs_().mul_(FP16_UNIT_ROUNDOFF).clamp_(min=FP16_SUBNORMAL_HALF_SPACING).add_(c_s.abs())
        eta = q.abs_().mul_(FP16_UNIT_ROUNDOFF).clamp_(min=FP16_SUBNORMAL_HALF_SPACING).add_(c_t.abs())
        w = d.add_(1.0).abs_().add_(eps).add_(eta).mul_(eps).mul_(eps.exp_()).add_(eta)
        return kld.numpy(), w.mul_(p).sum(-1).numpy()
    finite = torch.isfinite(s)  # -inf: the exact value was below -65504, a probability of 0 in float64 too
    p = s.exp()  # exactly 0 where s is -inf
    zero = torch.zeros((), dtype=torch.float64)
    kld = torch.where(p > 0, p * (s - t), zero).sum(-1)
    s0 = torch.where(finite, s, zero)
    eps = torch.where(finite, _half_spacing(torch.where(finite, r, zero)) + c_s.abs(), zero)
    eta = _half_spacing(q) + c_t.abs()
    exp_s0 = torch.where(finite, p, torch.ones((), dtype=torch.float64))
    terms = eps * exp_s0 * eps.exp() * ((s0 - t + 1.0).abs() + eps + eta) + exp_s0 * eta
    bound = torch.where(finite, terms, zero).sum(-1)
    return kld.numpy(), bound.numpy()


def percentile(values: np.ndarray, fraction: float) -> float:
    """Linear interpolation between order statistics at rank fraction*(n-1) of the sorted values (0-based).

    This is numpy's default ('linear', Hyndman & Fan type 7) and llama.cpp's `percentile` lambda;
    the median (fraction 0.5) is the mean of the two middle values for even n, as llama.cpp prints it.
    """
    return float(np.quantile(values, fraction, method="linear"))


def mean_and_stderr(values: np.ndarray) -> tuple[float, float | None]:
    """llama.cpp's `mean_and_uncertainty`: mean and sqrt((mean(x^2) - mean^2) / (n - 1)).

    llama.cpp prints 0 for the error when n <= 10; here it is None (not computed) instead.
    """
    n = len(values)
    mean = float(values.mean())
    if n <= 10:
        return mean, None
    variance = float(((values - mean) ** 2).mean())  # = sum2/n - mean^2, without the cancellation
    return mean, math.sqrt(variance / (n - 1))


def divergence_statistics(kld: np.ndarray, delta_p: np.ndarray, agree: np.ndarray, nll: np.ndarray,
                          nll_base: np.ndarray) -> dict[str, Any]:
    """The llama.cpp `--kl-divergence` set from per-token arrays (all over the same scored tokens).

    Names and formulas (llama.cpp tools/perplexity/perplexity.cpp, `kl_divergence`):
    - "Mean KLD ± err": kld_mean, kld_mean_stderr (mean_and_uncertainty of per-token KLD).
    - "Median/90/95/99/99.9 % KLD", "Maximum KLD": kld_median, kld_p90 ... kld_p999, kld_max (`percentile`).
    - "Mean Δp ± err" (Δp = p_variant(target) - p_base(target)): delta_p_mean, delta_p_mean_stderr.
    - "RMS Δp ± err": delta_p_rms = sqrt(mean(Δp^2)), error 0.5 / rms * stderr(Δp^2).
    - "1/5/50/95/99 % Δp": delta_p_p01 ... delta_p_p99.
    - "Mean ln(PPL(Q)/PPL(base)) ± err": ln_ppl_ratio_mean = mean(nll) - mean(nll_base), error
      sqrt(se^2 + se_base^2 - 2 cov) with cov = (mean(nll*nll_base) - mean(nll) mean(nll_base)) / (n - 1).
    - "Cor(ln(PPL(Q)), ln(PPL(base)))": ln_ppl_correlation = cov / (se * se_base), i.e. the Pearson
      correlation of the per-token NLLs (a fraction here, llama.cpp prints percent).
    - "Same top p ± err": top1_agreement, sqrt(p (1 - p) / (n - 1)).
    llama.cpp reports errors as 0 for n <= 10 tokens; here they are None. Its per-token errors treat
    tokens as independent; `ppl_ratio_interval` gives the interval that does not.
    """
    n = len(kld)
    out: dict[str, Any] = {}
    out["kld_mean"], out["kld_mean_stderr"] = mean_and_stderr(kld)
    out["kld_median"] = percentile(kld, 0.5)
    out.update({key: percentile(kld, fraction) for key, fraction in KLD_PERCENTILES.items()})
    out["kld_max"] = float(kld.max())
    top1 = float(agree.mean())
    out["top1_agreement"] = top1
    out["top1_agreement_stderr"] = math.sqrt(top1 * (1 - top1) / (n - 1)) if n > 10 else None
    out["delta_p_mean"], out["delta_p_mean_stderr"] = mean_and_stderr(delta_p)
    mse, mse_err = mean_and_stderr(delta_p**2)
    out["delta_p_rms"] = math.sqrt(mse)
    out["delta_p_rms_stderr"] = 0.5 / out["delta_p_rms"] * mse_err if mse_err is not None and mse > 0 else (
        0.0 if mse_err is not None else None)
    out.update({key: percentile(delta_p, fraction) for key, fraction in DELTA_P_PERCENTILES.items()})
    diff = nll - nll_base
    # mean(nll) - mean(nll_base) and sqrt(var(nll - nll_base) / (n - 1)) are llama.cpp's formulas rearranged:
    # se^2 + se_base^2 - 2 cov is exactly the population variance of the difference over (n - 1).
    out["ln_ppl_ratio_mean"], out["ln_ppl_ratio_stderr"] = mean_and_stderr(diff)
    out["ln_ppl_correlation"] = None
    if n > 10:
        a, b = nll - nll.mean(), nll_base - nll_base.mean()
        denominator = math.sqrt(float((a * a).mean()) * float((b * b).mean()))
        out["ln_ppl_correlation"] = float((a * b).mean()) / denominator if denominator > 0 else None
    return out


def ppl_ratio_interval(nll: np.ndarray, nll_base: np.ndarray, window_sizes: Sequence[int],
                       level: float = 0.95) -> dict[str, Any]:
    """Paired interval of PPL(variant) / PPL(base) from per-window NLL differences.

    Why per window and not per token: the NLL differences of neighbouring tokens are correlated (a
    passage that is hard for the baseline is hard for the variant, and both share the window's context),
    so treating tokens as independent, as llama.cpp's "ln(PPL(Q)/PPL(base)) ± err" does, makes the
    interval too narrow. The windows score disjoint blocks of tokens and are the nearest to independent
    units the protocol has. The estimate is the token-weighted mean difference r = sum_w D_w / N
    (D_w = sum of nll - nll_base over window w's N_w tokens), so exp(r) is exactly the perplexity ratio;
    its error is the cluster (window) sandwich estimate sqrt(W / (W - 1) * sum_w (D_w - N_w r)^2) / N, and
    the interval exp(r ± t_{W-1} * se) uses Student's t because W is small (8 windows for the quickstart).
    """
    out: dict[str, Any] = {"ppl_ratio": float(math.exp(float((nll - nll_base).mean()))), "ppl_ratio_ci95": None,
                           "ppl_indistinguishable": None, "ppl_ratio_note": None}
    windows = len(window_sizes)
    if windows < 2:
        out["ppl_ratio_note"] = "one scoring window: no paired interval (needs at least 2 windows)"
        return out
    from scipy.stats import t as student_t

    bounds = np.cumsum([0, *window_sizes])
    diff = nll - nll_base
    sums = np.array([diff[bounds[i] : bounds[i + 1]].sum() for i in range(windows)])
    sizes = np.asarray(window_sizes, dtype=np.float64)
    total = sizes.sum()
    r = float(sums.sum() / total)
    se = math.sqrt(windows / (windows - 1) * float(((sums - sizes * r) ** 2).sum())) / total
    half = float(student_t.ppf(0.5 + level / 2, windows - 1)) * se
    low, high = math.exp(r - half), math.exp(r + half)
    out.update(ppl_ratio=math.exp(r), ppl_ratio_ci95=[low, high], ppl_indistinguishable=bool(low <= 1.0 <= high))
    return out


def _null_divergence() -> dict[str, Any]:
    return {key: None for key in DIVERGENCE_KEYS}


def evaluate_quality(
    logits_fn: Callable[[Sequence[int]], np.ndarray],
    tokens: Sequence[int],
    context: int,
    stride: int,
    write_reference: Path | None = None,
    reference: Path | None = None,
    on_window: Callable[[int, int], None] = lambda _i, _n: None,
    reference_dtype: str = "float16",
    bos_id: int | None = None,
) -> dict[str, Any]:
    """Perplexity over the scored tokens; with `reference`, the divergence statistics against it.

    `write_reference` stores this variant's log-probabilities for later variants (the baseline), as
    `reference_dtype` (float16 by default; float32 to compare the two storages), plus the exact side file.
    `bos_id`: every window starts with BOS in place of its first (never scored) token, as llama.cpp does.
    """
    windows: list[Window] = plan_windows(len(tokens), context, stride)
    total = scored_count(windows)
    ids = torch.tensor(list(tokens))
    nll_parts: list[np.ndarray] = []
    writer = _ReferenceWriter(write_reference, total, reference_dtype) if write_reference is not None else None
    comparison = _Comparison(reference) if reference is not None else None
    row = vocab = 0
    for index, window in enumerate(windows):
        logits = torch.from_numpy(np.asarray(logits_fn(with_bos(tokens[window.start : window.end], bos_id))))
        offset = window.first_target - window.start  # logits at position p predict token p + 1
        logp = torch.log_softmax(logits[offset - 1 : window.end - window.start - 1].double(), -1)
        vocab = logp.shape[1]
        targets = ids[window.first_target : window.end]
        target_logp = logp[torch.arange(len(targets)), targets].numpy()
        nll_parts.append(-target_logp)
        if writer is not None:
            writer.add(row, logp, target_logp)
        if comparison is not None:
            comparison.add(row, logp, targets)
        row += len(targets)
        on_window(index + 1, len(windows))
    if writer is not None:
        writer.close()
    return _quality_result(np.concatenate(nll_parts), total, windows, comparison, vocab)


class _ReferenceWriter:
    """The baseline's log-probabilities, written window by window, then the exact per-token side file."""

    def __init__(self, path: Path, total: int, dtype: str) -> None:
        self.path, self.total, self.dtype = path, total, dtype
        self.out: np.ndarray | None = None  # opened on the first window, once the vocabulary size is known
        self.target, self.argmax = np.zeros(total, np.float64), np.zeros(total, np.int64)

    def add(self, row: int, logp: torch.Tensor, target_logp: np.ndarray) -> None:
        n = len(target_logp)
        if self.out is None:
            self.out = np.lib.format.open_memmap(self.path, mode="w+", dtype=REFERENCE_DTYPES[self.dtype],
                                                 shape=(self.total, logp.shape[1]))
        self.out[row : row + n] = logp.numpy()
        self.target[row : row + n] = target_logp
        self.argmax[row : row + n] = logp.argmax(-1).numpy()

    def close(self) -> None:
        if self.out is None:
            return
        self.out.flush()
        self.out = None  # closes the memory map before the side file is written
        np.savez(per_token_path(self.path), target_logp=self.target, argmax=self.argmax)


class _Comparison:
    """Per-token KLD, its float16 storage bound and top-1 agreement against a stored reference."""

    def __init__(self, reference: Path) -> None:
        self.ref = np.load(reference, mmap_mode="r")
        self.side = dict(np.load(per_token_path(reference)))
        self.kld_parts: list[np.ndarray] = []
        self.agree_parts: list[np.ndarray] = []
        self.bound_parts: list[np.ndarray] = []

    def add(self, row: int, logp: torch.Tensor, targets: torch.Tensor) -> None:
        if self.ref.shape[1] != logp.shape[1]:
            return  # another vocabulary: nothing comparable (the result's note says so)
        n = len(targets)
        # Blocks of rows: only these are read from disk, and the float64 temporaries stay small.
        for first in range(0, n, ROWS_PER_BLOCK):
            last = min(first + ROWS_PER_BLOCK, n)
            stored = np.array(self.ref[row + first : row + last])  # a writable copy, for torch.from_numpy
            # The variant's log-probs are rounded to the storage precision too: identical models give KLD 0.
            var_stored = logp[first:last].numpy().astype(stored.dtype)
            if stored.dtype == np.float16:
                kld, bound = fp16_block_divergence(stored, var_stored)
                self.kld_parts.append(kld)
                self.bound_parts.append(bound)
            else:
                self.kld_parts.append(kld_stats(torch.from_numpy(stored), torch.from_numpy(var_stored),
                                                targets[first:last])["kld"].numpy())
        self.agree_parts.append(self.side["argmax"][row : row + n] == logp.argmax(-1).numpy())


def _quality_result(nll: np.ndarray, total: int, windows: list[Window], comparison: _Comparison | None,
                    vocab: int) -> dict[str, Any]:
    """Perplexity, and with a comparable reference the divergence statistics, their bound and notes."""
    nll_sum = float(nll.sum())
    result: dict[str, Any] = {
        "perplexity": float(np.exp(nll_sum / total)),
        "nll_mean": nll_sum / total,
        "scored_tokens": total,
        **_null_divergence(),
        "ppl_ratio_note": None,
        "kld_storage_bound": None,
        "divergence_note": None,
    }
    if comparison is None:
        return result
    if not comparison.kld_parts:
        result["divergence_note"] = (
            f"vocabulary sizes differ (baseline {comparison.ref.shape[1]}, variant {vocab}): KLD and top-1 not computed"
        )
        return result
    base_target = comparison.side["target_logp"]
    var_target = -nll
    delta_p = np.exp(var_target) - np.exp(base_target)
    result.update(divergence_statistics(np.concatenate(comparison.kld_parts), delta_p,
                                        np.concatenate(comparison.agree_parts), nll, -base_target))
    result.update(ppl_ratio_interval(nll, -base_target, [w.end - w.first_target for w in windows]))
    if comparison.bound_parts:
        bound = np.concatenate(comparison.bound_parts)
        # Order statistics (percentiles, max) move by at most the largest per-token move; the mean by
        # the mean move; the standard error by RMS(move) / sqrt(n - 1) (the standard deviation is
        # 1-Lipschitz in the RMS norm).
        result["kld_storage_bound"] = {
            "storage": "float16", "kld_mean": float(bound.mean()), "kld_percentiles_and_max": float(bound.max()),
            "kld_mean_stderr": float(math.sqrt((bound**2).mean() / (len(bound) - 1))) if len(bound) > 1 else None,
            "other_statistics": 0.0,
        }
    if result["kld_mean_stderr"] is None:
        result["divergence_note"] = f"{total} scored tokens: standard errors need more than 10"
    return result
