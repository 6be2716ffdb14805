"""Perplexity and divergence from the baseline, computed from per-window logits on fixed token ids.

Windows and which tokens each scores are planned in `metrics/windows.py`.

The baseline's log-probabilities at every scored position are kept in a float32 .npy file
(memory-mapped), so a variant's KLD, top-1 agreement and delta-p compare exact distributions
without loading the baseline again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from workbench.metrics.windows import plan_windows, scored_count
from workbench.validity import with_bos


def kld_stats(base_logp: torch.Tensor, var_logp: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-position KL(base || variant), top-1 agreement and delta-p of the correct token. Inputs [n, vocab]."""
    kld = (base_logp.exp() * (base_logp - var_logp)).sum(-1)
    agree = base_logp.argmax(-1) == var_logp.argmax(-1)
    rows = torch.arange(targets.numel())
    delta_p = var_logp[rows, targets].exp() - base_logp[rows, targets].exp()
    return {"kld": kld, "agree": agree, "delta_p": delta_p}


def evaluate_quality(
    logits_fn: Callable[[Sequence[int]], np.ndarray],
    tokens: Sequence[int],
    context: int,
    stride: int,
    write_reference: Path | None = None,
    reference: Path | None = None,
    on_window: Callable[[int, int], None] = lambda _i, _n: None,
    bos_id: int | None = None,
) -> dict[str, float | int | str | None]:
    """Perplexity over the scored tokens; with `reference`, KLD / top-1 / delta-p against it.

    `write_reference` stores this variant's log-probabilities for later variants (the baseline).
    `bos_id`: every window starts with BOS in place of its first (never scored) token, as llama.cpp does.
    """
    windows = plan_windows(len(tokens), context, stride)
    total = scored_count(windows)
    ids = torch.tensor(list(tokens))
    nll_sum = 0.0
    kld_parts, agree_parts, delta_parts = [], [], []
    ref = np.load(reference, mmap_mode="r") if reference is not None else None
    out = None
    row = 0
    for index, window in enumerate(windows):
        logits = torch.from_numpy(np.asarray(logits_fn(with_bos(tokens[window.start : window.end], bos_id))))
        offset = window.first_target - window.start  # logits at position p predict token p + 1
        logp = torch.log_softmax(logits[offset - 1 : window.end - window.start - 1].double(), -1).float()
        targets = ids[window.first_target : window.end]
        nll_sum -= float(logp[torch.arange(targets.numel()), targets].double().sum())
        if write_reference is not None:
            if out is None:
                out = np.lib.format.open_memmap(write_reference, mode="w+", dtype=np.float32, shape=(total, logp.shape[1]))
            out[row : row + len(targets)] = logp.numpy()
        if ref is not None and ref.shape[1] == logp.shape[1]:
            stats = kld_stats(torch.from_numpy(np.array(ref[row : row + len(targets)])), logp, targets)
            kld_parts.append(stats["kld"])
            agree_parts.append(stats["agree"])
            delta_parts.append(stats["delta_p"])
        row += len(targets)
        on_window(index + 1, len(windows))
    if out is not None:
        out.flush()
    result: dict[str, float | int | str | None] = {
        "perplexity": float(np.exp(nll_sum / total)),
        "nll_mean": nll_sum / total,
        "scored_tokens": total,
        "kld_mean": None,
        "kld_p99": None,
        "top1_agreement": None,
        "delta_p_mean": None,
        "divergence_note": None,
    }
    if ref is not None and not kld_parts:
        result["divergence_note"] = (
            f"vocabulary sizes differ (baseline {ref.shape[1]}, variant {logp.shape[1]}): KLD and top-1 not computed"
        )
    if kld_parts:
        kld = torch.cat(kld_parts).double().numpy()
        result.update(
            kld_mean=float(kld.mean()),
            kld_p99=float(np.percentile(kld, 99)),
            top1_agreement=float(torch.cat(agree_parts).double().mean()),
            delta_p_mean=float(torch.cat(delta_parts).double().mean()),
        )
    return result
