"""Chat arena: 2-4 variants of a run answer the same prompt side by side; blind A/B votes."""

from __future__ import annotations

import html
import random
import time
from typing import Any

import gradio as gr

from workbench.errors import WorkbenchError
from workbench.paths import runs_dir
from workbench.data.store import History
from workbench.ui.chat_worker import ChatWorker
from workbench.ui.common import owned_run_ids, visitor_id

PANELS = 4
MAX_NEW_TOKENS = 64


def _workers(session: dict, run: dict, names: list[str]) -> dict[str, ChatWorker]:
    """This visitor's workers for the chosen variants, started once and kept between prompts."""
    pool: dict[tuple[str, str], ChatWorker] = session.setdefault("chat_workers", {})
    records = {r["name"]: r for r in run["variants"]}
    chosen = {}
    for name in names:
        key = (run["run_id"], name)
        if key not in pool or pool[key].error:
            record = records[name]
            pool[key] = ChatWorker({"name": name, "runtime": record["runtime"]["name"],
                                    "artifact_path": record["artifact_path"], "threads": 1}, runs_dir() / "chat-logs")
        chosen[name] = pool[key]
    return chosen


def close_workers(session: dict) -> None:
    for worker in session.get("chat_workers", {}).values():
        worker.close()
    session["chat_workers"] = {}


def render(pieces: list[str], diverge_at: int | None, stats: str, error: str | None = None) -> str:
    if error:
        return f"<div class='answer'><b>failed:</b> {html.escape(error)}</div>"
    if diverge_at is None:
        body = html.escape("".join(pieces))
    else:  # the baseline's answer and this one part ways here
        body = html.escape("".join(pieces[:diverge_at])) + "<mark>" + html.escape("".join(pieces[diverge_at:])) + "</mark>"
    return f"<div class='answer' style='white-space:pre-wrap'>{body}</div><small>{stats}</small>"


def first_difference(a: list[int], b: list[int]) -> int | None:
    for index, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return index
    return None if len(a) == len(b) else min(len(a), len(b))


def chat_run(run_id: str | None, session: dict, visitor: str | None) -> dict:
    """The run to chat with: one this visitor may open, whose preset the policy gate lets load here."""
    from workbench.config.policy import PolicyError, app_mode, enforce
    from workbench.config.presets import parse_preset
    from workbench.ui.history import load_owned_run

    if not run_id:
        raise gr.Error("choose a run first (History or Compare)")
    run = load_owned_run(run_id, session, visitor)
    try:  # the variants load code and weights: the run's preset must pass the same gate as a new run
        enforce(parse_preset(run["preset"], f"run {run_id}"), app_mode(), estimate=False)
    except PolicyError as exc:
        raise gr.Error(f"run {run_id} cannot be loaded here: {exc}") from None
    except WorkbenchError:
        pass  # an older preset that no longer parses: its artifacts are plain folders, the checks above hold
    return run


def stream_answers(run_id: str, names: list[str], prompt: str, session: dict, request: gr.Request = None,
                   labels: list[str] | None = None):
    """Yield the panel HTML for every variant until all answers are complete."""
    if not prompt or not prompt.strip():
        raise gr.Error("the prompt is empty")
    run = chat_run(run_id, session, visitor_id(request))
    names = [n for n in names if n]
    if not 2 <= len(names) <= PANELS:
        raise gr.Error(f"choose 2 to {PANELS} variants (chosen: {len(names)})")
    bad = [n for n in names if next(r for r in run["variants"] if r["name"] == n)["status"] != "ok"]
    if bad:
        raise gr.Error(f"variants that failed in this run cannot chat: {', '.join(bad)}")
    labels = labels or names
    workers = _workers(session, run, names)
    state = {n: {"pieces": [], "tokens": [], "sent": None, "first": None, "done": False, "error": None} for n in names}
    for name, worker in workers.items():
        worker.wait_ready()
        state[name]["error"] = worker.error
        state[name]["done"] = worker.error is not None
    for name, worker in workers.items():
        if not state[name]["done"]:
            state[name]["sent"] = time.perf_counter()
            worker.ask(prompt, MAX_NEW_TOKENS)
    baseline = run["preset"]["baseline"]
    while True:
        for name, worker in workers.items():
            entry = state[name]
            if entry["done"]:
                continue
            for kind, value in worker.poll():
                if kind == "token":
                    entry["first"] = entry["first"] or time.perf_counter()
                    entry["tokens"].append(value[0])
                    entry["pieces"].append(value[1])
                else:
                    entry["done"], entry["error"] = True, value if kind == "error" else None
        yield [_panel(state, name, baseline, label) for name, label in zip(names, labels)] + [""] * (PANELS - len(names))
        if all(entry["done"] for entry in state.values()):
            return
        time.sleep(0.05)


def _panel(state: dict, name: str, baseline: str, label: str) -> str:
    entry = state[name]
    stats = "waiting"
    if entry["first"]:
        ttft = entry["first"] - entry["sent"]
        elapsed = time.perf_counter() - entry["first"]
        rate = (len(entry["tokens"]) - 1) / elapsed if len(entry["tokens"]) > 1 and elapsed > 0 else None
        stats = f"TTFT {ttft * 1000:.0f} ms · {len(entry['tokens'])} tokens" + (f" · {rate:.1f} tok/s" if rate else "")
    diverge = None
    if baseline in state and name != baseline and state[baseline]["done"] and entry["done"]:
        diverge = first_difference(state[baseline]["tokens"], entry["tokens"])
        stats += " · same as baseline" if diverge is None else f" · differs from {baseline} at token {diverge}"
    return f"<h4>{html.escape(label)}</h4>" + render(entry["pieces"], diverge, stats, entry["error"])


def build_chat(session: gr.State, current_run: gr.State) -> None:
    with gr.Row():
        run_box = gr.Dropdown(label="Run", choices=[], allow_custom_value=True)
        refresh = gr.Button("Refresh runs", size="sm")
    variants = gr.Dropdown(label="Variants (2-4)", choices=[], multiselect=True, allow_custom_value=True)
    prompt = gr.Textbox(label="Prompt", placeholder="Ask all chosen variants the same thing", lines=2)
    send = gr.Button("Send to all", variant="primary")
    with gr.Row():
        panels = [gr.HTML(elem_classes=["chat-panel"]) for _ in range(PANELS)]
    with gr.Accordion("Blind A/B", open=False):
        blind_go = gr.Button("Answer blind with two random variants")
        with gr.Row():
            blind_panels = [gr.HTML() for _ in range(2)]
        with gr.Row():
            votes = [gr.Button(label) for label in ("A is better", "Tie", "B is better")]
        vote_note = gr.Markdown()
        leaderboard = gr.Dataframe(label="Votes per variant", interactive=False)

    def runs_choices(session_value: dict, current: str | None, request: gr.Request):
        mine = owned_run_ids(session_value, visitor_id(request))  # None: not shared, every run
        rows = [r for r in History().runs() if mine is None or r["run_id"] in mine]
        ids = [r["run_id"] for r in rows]
        return gr.Dropdown(choices=ids, value=current if current in ids else (ids[0] if ids else None))

    def variant_choices(run_id: str | None, session_value: dict, request: gr.Request):
        mine = owned_run_ids(session_value, visitor_id(request))
        run = History().load_run(run_id) if run_id and (mine is None or run_id in mine) else None
        names = [r["name"] for r in run["variants"] if r["status"] == "ok"] if run else []
        return gr.Dropdown(choices=names, value=names[:2], multiselect=True)

    def blind(run_id: str, prompt_text: str, session_value: dict, request: gr.Request):
        run = chat_run(run_id, session_value, visitor_id(request))
        names = [r["name"] for r in run["variants"] if r["status"] == "ok"]
        if len(names) < 2:
            raise gr.Error("the run needs at least two ok variants for a blind test")
        pair = random.sample(names, 2)
        session_value["blind"] = {"run_id": run_id, "prompt": prompt_text, "pair": pair}
        for panels_html in stream_answers(run_id, pair, prompt_text, session_value, request, labels=["A", "B"]):
            yield panels_html[:2] + ["A and B are hidden; vote, then they are revealed."]

    def vote(choice: str, session_value: dict):
        pending = session_value.pop("blind", None)
        if not pending:
            raise gr.Error("ask a blind question first")
        history = History()
        a, b = pending["pair"]
        history.add_vote(pending["run_id"], pending["prompt"], a, b, choice)
        return f"Recorded: A was **{a}**, B was **{b}**.", history.leaderboard()

    refresh.click(runs_choices, [session, current_run], run_box, api_name="chat_runs")
    current_run.change(runs_choices, [session, current_run], run_box)
    run_box.change(variant_choices, [run_box, session], variants)
    send.click(stream_answers, [run_box, variants, prompt, session], panels, api_name="chat")
    blind_go.click(blind, [run_box, prompt, session], blind_panels + [vote_note])
    for button, choice in zip(votes, ("a", "tie", "b")):
        button.click(lambda s, c=choice: vote(c, s), session, [vote_note, leaderboard])
