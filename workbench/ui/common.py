"""What the tabs share: shared-mode limits, allowed folders, and run-to-table/chart helpers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    """A refusal for the page: one bullet per reason."""
    from workbench.config.policy import PolicyError

    if isinstance(exc, PolicyError) and len(exc.reasons) > 1:
        return "\n" + "\n".join(f"- {reason}" for reason in exc.reasons)
    return str(exc)


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def display_table(run: dict[str, Any], budget_gb: float | None = None):
    """The summary table with readable units, plus whether each variant fits a memory budget."""
    from workbench.views.report import summary_table

    table = summary_table(run)
    if budget_gb:
        peaks = [r["metrics"].get("peak_rss_bytes") for r in run["variants"]]
        table.insert(3, f"fits {budget_gb:g} GB", ["—" if p is None else ("yes" if p <= budget_gb * 1e9 else "NO (greyed)")
                                                   for p in peaks])
    return table.round(4)


def figures(run: dict[str, Any] | None, budget_gb: float | None = None) -> list[Any]:
    """One comparison chart per entry of plots.CHARTS (empty ones before a run); variants over budget are greyed in the size chart."""
    import plotly.graph_objects as go

    from workbench.views.plots import CHARTS

    if not run or not any(r["status"] == "ok" for r in run["variants"]):
        return [go.Figure() for _ in CHARTS]
    charts = [build(run) for build in CHARTS.values()]
    if budget_gb:
        over = {r["name"] for r in run["variants"] if (r["metrics"].get("peak_rss_bytes") or 0) > budget_gb * 1e9}
        scatter = charts[0].data[0]
        scatter.marker.color = ["lightgrey" if label.split(" [")[0] in over else "royalblue" for label in scatter.text]
    return charts


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
