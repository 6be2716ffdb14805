"""Paired comparisons with the baseline item by item: lm-eval flips with McNemar's test, generation agreement.

Flips follow Dutta et al. 2024 ("Accuracy is not all you need", arXiv 2407.09141): the share of items
whose correctness differs from the baseline's, split into gains (baseline wrong, variant right) and
losses (baseline right, variant wrong). Recovery is the variant's score as a percentage of the
baseline's (Kurtic et al. 2025, "Give me BF16 or give me death").

The baseline's per-item results travel to later variants in `baseline_items.json` beside the
reference log-probs (`items_path`), written by the baseline's measuring worker.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

# Below this many discordant pairs the chi-square approximation of McNemar's test is poor; use the
# exact binomial test (the usual rule of thumb, e.g. b + c < 25).
EXACT_BELOW = 25
FLIP_KEYS = ("flips", "flips_gain", "flips_loss", "mcnemar_p", "recovery", "paired_items")


def items_path(reference: Path) -> Path:
    return reference.with_name("baseline_items.json")


def write_items(path: Path, lm_eval_items: Mapping[str, Mapping[str, bool]], samples: Sequence[Sequence[int]]) -> None:
    path.write_text(json.dumps({"lm_eval": lm_eval_items, "samples": [list(s) for s in samples]}))


def read_items(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def mcnemar_p(gain: int, loss: int) -> float:
    """Two-sided McNemar p-value on the discordant counts.

    Under "no difference" each discordant item is a gain or a loss with probability 1/2. With fewer than
    EXACT_BELOW discordant items: the exact binomial test (scipy.stats.binomtest); otherwise the
    chi-square statistic with continuity correction, (|b - c| - 1)^2 / (b + c) on 1 degree of freedom.
    No discordant items: p = 1 (no evidence of any difference).
    """
    from scipy.stats import binomtest, chi2

    discordant = gain + loss
    if discordant == 0:
        return 1.0
    if discordant < EXACT_BELOW:
        return float(binomtest(gain, discordant, 0.5, alternative="two-sided").pvalue)
    statistic = (abs(gain - loss) - 1) ** 2 / discordant
    return float(chi2.sf(statistic, 1))


def flip_statistics(base: Mapping[str, bool], variant: Mapping[str, bool]) -> dict[str, Any]:
    """Flips, gains, losses (shares of the paired items), McNemar p and recovery (percent) over shared items."""
    shared = sorted(set(base) & set(variant))
    out: dict[str, Any] = {key: None for key in FLIP_KEYS}
    out["note"] = None
    if not shared:
        out["note"] = "no item was scored by both the baseline and this variant"
        return out
    n = len(shared)
    gain = sum(1 for k in shared if variant[k] and not base[k])
    loss = sum(1 for k in shared if base[k] and not variant[k])
    base_correct = sum(1 for k in shared if base[k])
    variant_correct = sum(1 for k in shared if variant[k])
    out.update(flips=(gain + loss) / n, flips_gain=gain / n, flips_loss=loss / n, mcnemar_p=mcnemar_p(gain, loss),
               paired_items=n)
    if base_correct:
        out["recovery"] = 100.0 * variant_correct / base_correct
    else:
        out["note"] = "the baseline got no item right: recovery (percent of its score) is undefined"
    return out


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first token where two outputs differ (the shorter length if one is a prefix); None if equal."""
    for index, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return index
    return None if len(a) == len(b) else min(len(a), len(b))


def generation_agreement(base: Sequence[Sequence[int]], variant: Sequence[Sequence[int]]) -> dict[str, Any]:
    """Exact-match rate of greedy outputs, and the mean 0-based position of the first differing token.

    The mean position is over the prompts whose outputs differ; None (with a note) when none differ.
    """
    out: dict[str, Any] = {"samples_exact_match": None, "samples_first_diff_mean": None, "note": None}
    pairs = list(zip(base, variant))
    if not pairs or len(base) != len(variant):
        out["note"] = "the baseline's and this variant's sample prompts differ"
        return out
    firsts = [first_difference(a, b) for a, b in pairs]
    differing = [f for f in firsts if f is not None]
    out["samples_exact_match"] = (len(pairs) - len(differing)) / len(pairs)
    if differing:
        out["samples_first_diff_mean"] = sum(differing) / len(differing)
    else:
        out["note"] = "every output equals the baseline's: no first difference"
    return out
