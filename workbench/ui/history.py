"""History tab: stored runs, reopen one's charts, compare two, delete, export CSV / JSON / HTML."""

from __future__ import annotations

import tempfile
from pathlib import Path

import gradio as gr
import pandas as pd

from workbench.views.report import export_csv, export_html, export_json
from workbench.data.store import History
from workbench.views.plots import CHART_LABELS
from workbench.ui.common import display_table, figures, owned_run_ids, run_note, visitor_id


def visible_runs(session: dict, visitor: str | None = None) -> pd.DataFrame:
    """All stored runs locally; in shared mode only the runs this visitor (gradio session) started."""
    rows = History().runs()
    mine = owned_run_ids(session, visitor)
    if mine is not None:
        rows = [r for r in rows if r["run_id"] in mine]
    return pd.DataFrame(rows, columns=["run_id", "created_at", "name", "model", "status", "variants", "ok"])


def load_owned_run(run_id: str | None, session: dict, visitor: str | None) -> dict:
    """The run, if this visitor may open it (every run when the app is not shared); a gr.Error otherwise.

    The same message for "not yours" and "does not exist", so run ids of others cannot be probed."""
    mine = owned_run_ids(session, visitor)
    run = History().load_run(run_id) if run_id and (mine is None or run_id in mine) else None
    if run is None:
        raise gr.Error(f"no run '{run_id}' here")
    return run


def build_history(session: gr.State, current_run: gr.State, app: gr.Blocks | None = None) -> None:
    refresh = gr.Button("Refresh")
    runs = gr.Dataframe(label="Runs", interactive=False)
    with gr.Row():
        pick = gr.Dropdown(label="Run", choices=[], allow_custom_value=True)
        other = gr.Dropdown(label="Compare with", choices=[], allow_custom_value=True)
    with gr.Row():
        open_run = gr.Button("Open", variant="primary")
        compare = gr.Button("Compare the two")
        confirm = gr.Checkbox(label="Yes, delete this run")
        delete = gr.Button("Delete", variant="stop")
        export = gr.Button("Export CSV, JSON, HTML")
    note = gr.Markdown()
    table = gr.Dataframe(interactive=False)
    files = gr.File(label="Exports", file_count="multiple")
    plots = [gr.Plot(label=label, visible=False) for label in CHART_LABELS]  # shown by figures() when a run has data

    def list_runs(session_value: dict, request: gr.Request):
        frame = visible_runs(session_value, visitor_id(request))
        ids = list(frame["run_id"])
        return frame, gr.Dropdown(choices=ids, value=ids[0] if ids else None), gr.Dropdown(choices=ids, value=None)

    def show(run_id: str, session_value: dict, request: gr.Request):
        run = load_owned_run(run_id, session_value, visitor_id(request))
        return [run_note(run), display_table(run), *figures(run), run_id]

    def compare_two(first: str, second: str, session_value: dict, request: gr.Request):
        if not first or not second:
            raise gr.Error("choose two runs")
        frames = []
        for run_id in (first, second):
            frame = display_table(load_owned_run(run_id, session_value, visitor_id(request)))
            frame.insert(0, "run", run_id)
            frames.append(frame)
        return pd.concat(frames, ignore_index=True)

    def remove(run_id: str, sure: bool, session_value: dict, request: gr.Request):
        if not sure:
            return "tick 'Yes, delete this run' first; nothing was deleted"
        load_owned_run(run_id, session_value, visitor_id(request))
        History().delete_run(run_id)
        return f"deleted run {run_id} from the history (its folder on disk is kept)"

    def export_files(run_id: str, session_value: dict, request: gr.Request):
        run = load_owned_run(run_id, session_value, visitor_id(request))
        folder = Path(tempfile.mkdtemp(prefix="squeeze-export-"))
        paths = [folder / f"{run_id}.csv", folder / f"{run_id}.json", folder / f"{run_id}.html"]
        export_csv(run, paths[0])
        export_json(run, paths[1])
        export_html(run, paths[2])
        return [str(p) for p in paths]

    refresh.click(list_runs, session, [runs, pick, other], api_name="history_list")
    open_run.click(show, [pick, session], [note, table, *plots, current_run], api_name="history_open")
    compare.click(compare_two, [pick, other, session], table)
    # After a delete the tick is cleared: the next run's delete asks for its own confirmation.
    delete.click(remove, [pick, confirm, session], note, api_name="history_delete").then(
        list_runs, session, [runs, pick, other]).then(lambda: False, None, confirm)
    export.click(export_files, [pick, session], files, api_name="history_export")
    if app is not None:  # the list is filled when the page opens, not only on Refresh
        app.load(list_runs, session, [runs, pick, other])
