"""What the tabs share: shared-mode limits, allowed folders, and run-to-table/chart helpers."""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from workbench.errors import WorkbenchError
from workbench.data.sources import classify_model

PRESETS_DIR = Path(__file__).resolve().parent.parent.parent / "presets"


@dataclass(frozen=True)
class Limits:
    """Shared mode (WORKBENCH_SHARED=1, e.g. a public Space): no local paths, capped size and variant count."""

    shared: bool
    max_variants: int
    max_model_params: float
    allowed_dirs: tuple[Path, ...]


def limits() -> Limits:
    """The app's mode (policy.app_mode) in the shape the tabs use."""
    from workbench.config.policy import app_mode

    mode = app_mode()
    return Limits(shared=mode.shared, max_variants=int(mode.cap("variants") or 16),
                  max_model_params=float(mode.cap("params") or 1e11), allowed_dirs=mode.allowed_dirs or ())


def check_model_allowed(model: str, lim: Limits) -> None:
    """Local paths only inside allowed folders, none at all in shared mode; say which folders are allowed."""
    if not classify_model(model).is_local:
        return  # the bundled model or a hub id
    if lim.shared:
        raise WorkbenchError("local paths are disabled in shared mode; use the bundled model or a hub id")
    resolved = Path(model).expanduser().resolve()
    if not any(resolved == d or d in resolved.parents for d in lim.allowed_dirs):
        raise WorkbenchError(f"path {model} is outside the allowed folders ({', '.join(map(str, lim.allowed_dirs))}); "
                             "set WORKBENCH_ALLOWED_DIRS to allow more")


def visitor_id(request: Any) -> str | None:
    """The visitor's gradio session: what a shared app keys run ownership by."""
    return getattr(request, "session_hash", None) if request is not None else None


def owned_run_ids(session: dict, visitor: str | None) -> set[str] | None:
    """The run ids this visitor may see in shared mode; None when the app is not shared (every run)."""
    from workbench.data.store import History

    if not limits().shared:
        return None
    mine = set(session.get("run_ids", []))
    if visitor:
        mine |= {r["run_id"] for r in History().runs(visitor=visitor)}
    return mine


def gate_message(exc: Exception) -> str:
    """A refusal or parse error for the page (Markdown): one bullet per policy reason; a YAML error with its line
    and column; the whole message, with '<' and '>' escaped so Markdown does not swallow '<stream end>' as a tag."""
    from workbench.config.policy import PolicyError

    if isinstance(exc, yaml.YAMLError):
        return html.escape(yaml_error_text(exc), quote=False)
    if isinstance(exc, PolicyError) and len(exc.reasons) > 1:
        return "\n" + "\n".join(f"- {html.escape(reason, quote=False)}" for reason in exc.reasons)
    return html.escape(str(exc), quote=False)


def yaml_error_text(exc: yaml.YAMLError) -> str:
    """'YAML error at line L, column C: problem (context at line L2, column C2)', 1-based as editors count, on one
    line (PyYAML's own text spans several lines with a caret and names the stream '<unicode string>')."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    text = f"YAML error{where}: {problem}"
    context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context:
        text += f" ({context}" + (f" at line {context_mark.line + 1}, column {context_mark.column + 1}"
                                  if context_mark is not None else "") + ")"
    return text


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


DASH = "—"  # a figure that does not apply (null in the record), never a blank cell
SIGNIFICANT = 4
# How a row over the "fits in N GB" budget looks: grey text on a grey ground, visible at a glance.
GREYED_CSS = "background-color: #e5e7eb; color: #9ca3af"


def format_cell(value: Any, digits: int = SIGNIFICANT) -> str:
    """One table cell: numbers to `digits` significant digits (no exponent for large ones), DASH for null/NaN/blank."""
    if value is None:
        return DASH
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))  # counts (repeats, items) stay exact
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if not math.isfinite(value):
            return DASH if math.isnan(value) else str(value)
        if value == 0:
            return "0"
        magnitude = math.floor(math.log10(abs(value)))
        if magnitude >= digits:  # 12345.6 -> "12350", not "1.235e+04"
            return f"{round(value, digits - 1 - magnitude):.0f}"
        return f"{value:.{digits}g}"
    text = str(value)
    return text if text.strip() else DASH


def over_budget(run: dict[str, Any], budget_gb: float | None) -> set[str]:
    """Names of the variants whose measured peak memory is above the budget (unknown peaks are not greyed)."""
    if not budget_gb:
        return set()
    return {r["name"] for r in run["variants"]
            if r["metrics"].get("peak_rss_bytes") is not None and r["metrics"]["peak_rss_bytes"] > budget_gb * 1e9}


def display_table(run: dict[str, Any], budget_gb: float | None = None) -> pd.DataFrame:
    """The summary table as text cells: units in the headers, 4 significant digits, DASH where a figure does not
    apply, and with a budget a "fits N GB" column."""
    from workbench.views.report import summary_table

    table = summary_table(run)
    if budget_gb:
        peaks = [r["metrics"].get("peak_rss_bytes") for r in run["variants"]]
        table.insert(3, f"fits {budget_gb:g} GB", [None if p is None else ("yes" if p <= budget_gb * 1e9 else "NO")
                                                   for p in peaks])
    return table.astype(object).map(format_cell)


def greyed(frame: pd.DataFrame, rows: list[bool]) -> Any:
    """The frame as a pandas Styler whose `rows` (True: over budget) are greyed; gradio draws the style in the page."""
    flags = list(rows)
    return frame.reset_index(drop=True).style.apply(
        lambda row: [GREYED_CSS if flags[row.name] else "" for _ in row], axis=1)


def styled_table(run: dict[str, Any], budget_gb: float | None = None) -> Any:
    """The Compare tab's results: display_table with the rows over the budget greyed."""
    over = over_budget(run, budget_gb)
    return greyed(display_table(run, budget_gb), [r["name"] in over for r in run["variants"]])


def charts(run: dict[str, Any] | None, budget_gb: float | None = None) -> dict[str, Any]:
    """name -> figure for the charts this run has data for (plots.CHART_SPECS), variants over budget greyed."""
    from workbench.views.plots import CHART_SPECS, grey_over_budget

    if not run or not any(r["status"] == "ok" for r in run["variants"]):
        return {}
    over = over_budget(run, budget_gb)
    built = {name: build(run) for name, (_label, build, has_data) in CHART_SPECS.items() if has_data(run)}
    return {name: grey_over_budget(figure, over) for name, figure in built.items()}


def figures(run: dict[str, Any] | None, budget_gb: float | None = None) -> list[Any]:
    """One update per plots.CHART_SPECS entry (the tabs' gr.Plot list): the chart, shown, where the run has data for
    it; hidden otherwise, so the page never shows an empty chart box."""
    import gradio as gr

    from workbench.views.plots import CHART_SPECS

    built = charts(run, budget_gb)
    return [gr.Plot(value=built[name], visible=True) if name in built else gr.Plot(value=None, visible=False)
            for name in CHART_SPECS]


def run_note(run: dict[str, Any] | None) -> str:
    if not run:
        return ""
    from workbench.views.report import protocol_summary, speed_note

    from workbench.views.report import budget_verdict

    note = f"**Note:** {run['model']['note']}\n\n" if run["model"].get("note") else ""
    if speed_note(run):
        note += f"**Speed:** {speed_note(run)}\n\n"
    verdict = budget_verdict(run)
    if verdict:  # the memory-budget verdict, as the CLI prints it after its table
        head, *rest = verdict.splitlines()
        note += f"**{head}**\n" + "".join(f"\n- {line.strip().removeprefix('over budget: ')}" for line in rest) + "\n\n"
    failed = [f"- **{r['name']}** failed: {r['error']}" for r in run["variants"] if r["status"] != "ok"]
    failed += [f"- **{r['name']}** flagged: {flag['message']}" for r in run["variants"] for flag in r.get("flags") or []]
    honesty = ", ".join(f"{r['name']}: *{r['honesty']}*" for r in run["variants"] if r.get("honesty"))
    return (f"{note}Run `{run['run_id']}` ({run['status']}). Honesty: {honesty}.\n\n" + "\n".join(failed)
            + f"\n\n<small>{protocol_summary(run)}</small>")
