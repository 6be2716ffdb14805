"""The honesty label of a variant whose method claims faster kernels: kept only when its speed shows it.

A label is a promise about what runs. For llama.cpp's quant types it is known from the format; for
torch-side low-bit tensors (torchao, HQQ) it depends on the kernels this machine's torch build has and on
their per-call overhead, so it is measured: `real-kernel` when the variant decodes faster than the baseline
with the interval excluding parity, `no-speedup` otherwise, and the record's `honesty_evidence` says which
figures decided it.
"""

from __future__ import annotations

from typing import Any

REAL = "real-kernel"
NO_SPEEDUP = "no-speedup"


def _interval(values: Any) -> tuple[float, float] | None:
    if not isinstance(values, (list, tuple)) or len(values) != 2 or any(v is None for v in values):
        return None
    return float(values[0]), float(values[1])


def label_from_speed(record: dict[str, Any], baseline: dict[str, Any] | None) -> tuple[str, str]:
    """(label, evidence) from the paired decode ratio of the interleaved pass when there is one, else from the
    sequential decode intervals of the variant and the baseline (faster only when they do not overlap)."""
    interleaved = record.get("interleaved") or {}
    paired = _interval(interleaved.get("decode_ratio_ci95"))
    if paired is not None and interleaved.get("decode_ratio") is not None:
        label = REAL if paired[0] > 1 else NO_SPEEDUP
        return label, (f"decode {interleaved['decode_ratio']:.2f}x the baseline's, 95 % paired interval "
                       f"[{paired[0]:.2f}, {paired[1]:.2f}] (interleaved pass)")
    mine = _interval((record.get("metrics") or {}).get("decode_tok_s_ci95"))
    theirs = _interval(((baseline or {}).get("metrics") or {}).get("decode_tok_s_ci95"))
    if mine is None or theirs is None or baseline is None or baseline.get("status") != "ok":
        return NO_SPEEDUP, "no decode speed of both this variant and the baseline to compare: a faster kernel is not shown"
    rate, base_rate = record["metrics"]["decode_tok_s"], baseline["metrics"]["decode_tok_s"]
    label = REAL if mine[0] > theirs[1] else NO_SPEEDUP
    return label, (f"decode {rate:.3g} tok/s [{mine[0]:.3g}, {mine[1]:.3g}] vs the baseline's {base_rate:.3g} "
                   f"[{theirs[0]:.3g}, {theirs[1]:.3g}] (sequential pass, 95 % intervals; faster only when they do not overlap)")


def apply_speed_labels(records: dict[int, dict], baseline_name: str, claims_speed: dict[str, bool]) -> bool:
    """Relabel every ok record whose method claims its speed (`claims_speed[name]`) and whose stages left it
    `real-kernel`; True when any record changed."""
    baseline = next((r for r in records.values() if r["name"] == baseline_name), None)
    changed = False
    for record in records.values():
        if record["status"] != "ok" or not claims_speed.get(record["name"]) or record.get("honesty") not in (REAL, NO_SPEEDUP):
            continue
        label, evidence = label_from_speed(record, baseline)
        changed = changed or (label, evidence) != (record.get("honesty"), record.get("honesty_evidence"))
        record["honesty"], record["honesty_evidence"] = label, evidence
    return changed
