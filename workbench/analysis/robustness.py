"""Calibration robustness: variants that differ only in their calibration (text or seed) form a group,
and the spread of their perplexity and KLD shows whether one result was luck.

Nothing to configure: list the same method two or more times with different `calibration` options
(presets/calibration.yaml does), and every report shows the groups it finds.
"""

from __future__ import annotations

import json
import statistics
from typing import Any

SPREAD_METRICS = ("perplexity", "kld_mean", "top1_agreement")


def _without_calibration(stages: list[dict]) -> str:
    """The variant's recipe with every stage's calibration removed: equal keys differ only in calibration."""
    return json.dumps([{"method": s["method"], "options": {k: v for k, v in (s.get("options") or {}).items()
                                                            if k != "calibration"}} for s in stages], sort_keys=True)


def _stages(preset: dict, name: str) -> list[dict]:
    spec = next((v for v in preset.get("variants", []) if v["name"] == name), None)
    if spec is None:  # a record whose preset entry is gone (an edited document): nothing to group by
        return []
    return spec.get("pipeline") or [{"method": spec["method"], "options": spec.get("options") or {}}]


def calibration_groups(run: dict[str, Any]) -> list[dict[str, Any]]:
    """One entry per group of >= 2 measured variants sharing a recipe but not a calibration."""
    groups: dict[str, list[dict]] = {}
    for record in run["variants"]:
        stages = _stages(run["preset"], record["name"])
        calibrations = [s.get("options", {}).get("calibration") for s in stages]
        if record["status"] != "ok" or not any(c is not None for c in calibrations):
            continue
        groups.setdefault(_without_calibration(stages), []).append(
            {"name": record["name"], "calibration": next(c for c in calibrations if c is not None),
             **{m: record["metrics"].get(m) for m in SPREAD_METRICS}})
    result = []
    for key, members in groups.items():
        if len(members) < 2:
            continue
        spread = {}
        for metric in SPREAD_METRICS:
            values = [m[metric] for m in members if m[metric] is not None]
            if len(values) >= 2:
                spread[metric] = {"min": min(values), "max": max(values), "mean": statistics.fmean(values),
                                  "stdev": statistics.stdev(values), "relative_range": (max(values) - min(values)) /
                                  abs(statistics.fmean(values)) if statistics.fmean(values) else None}
        result.append({"recipe": json.loads(key), "members": members, "spread": spread})
    return result


def robustness_text(groups: list[dict[str, Any]]) -> str:
    lines = []
    for group in groups:
        recipe = " + ".join(s["method"] for s in group["recipe"])
        lines.append(f"calibration robustness of {recipe} ({len(group['members'])} calibrations):")
        for member in group["members"]:
            c = member["calibration"]
            lines.append(f"  {member['name']:<22} text={c.get('text', 'pydoc')} seed={c.get('seed', 0)} "
                         f"samples={c.get('samples', '?')}x{c.get('seq_len', '?')}  ppl {_fmt(member['perplexity'])}  "
                         f"KLD {_fmt(member['kld_mean'])}  top-1 {_fmt(member['top1_agreement'])}")
        for metric, s in group["spread"].items():
            relative = f" ({s['relative_range']:.1%} of the mean)" if s["relative_range"] is not None else ""
            lines.append(f"  {metric}: {s['min']:.4g} .. {s['max']:.4g}, stdev {s['stdev']:.3g}{relative}")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g}"
