"""Chat arena: 2-4 variants of a run answer the same prompt side by side; blind A/B votes."""

from __future__ import annotations

import html
import os
import random
import time
from typing import Any

import gradio as gr

from workbench.errors import WorkbenchError
from workbench.paths import runs_dir
from workbench.data.store import History
from workbench.ui.chat_worker import ChatWorker
from workbench.ui.common import limits, owned_run_ids, visitor_id
from workbench.ui.votes import vote_html, vote_table

PANELS = 4
MAX_NEW_TOKENS = 64


def max_new_tokens() -> int:
    """The longest answer (WORKBENCH_CHAT_MAX_NEW_TOKENS, default 64): long answers keep a small Space busy."""
    value = os.environ.get("WORKBENCH_CHAT_MAX_NEW_TOKENS", "")
    return int(value) if value.strip().isdigit() and int(value) > 0 else MAX_NEW_TOKENS


def _workers(session: dict, run: dict, names: list[str]) -> dict[str, ChatWorker]:
    """This visitor's workers for the chosen variants, started once and kept between prompts; a worker that
    crashed or failed to load is replaced by a fresh one here, on the next prompt."""
    pool: dict[tuple[str, str], ChatWorker] = session.setdefault("chat_workers", {})
    records = {r["name"]: r for r in run["variants"]}
    chosen = {}
    for name in names:
        key = (run["run_id"], name)
        if key in pool and not pool[key].alive():
            pool.pop(key).close()
        if key not in pool:
            record = records[name]
            pool[key] = ChatWorker({"name": name, "runtime": record["runtime"]["name"],
                                    "artifact_path": record["artifact_path"], "threads": 1}, runs_dir() / "chat-logs")
        chosen[name] = pool[key]
    return chosen


def close_workers(session: dict) -> None:
    for worker in session.get("chat_workers", {}).values():
        worker.close()
    session["chat_workers"] = {}


def first_text_difference(a: str, b: str) -> int | None:
    """The first character where two visible texts differ (None when they are the same text).

    Texts, not token ids: two runtimes may spell the same text with other ids, or emit special tokens that
    decode to nothing, and neither is a difference a reader can see."""
    for index, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return index
    return None if len(a) == len(b) else min(len(a), len(b))


def render(text: str, diverge_at: int | None, stats: str, error: str | None = None, note: str | None = None) -> str:
    extra = f"<div class='chat-note'><i>{html.escape(note)}</i></div>" if note else ""
    if error:
        shown = f"<div style='white-space:pre-wrap'>{html.escape(text)}</div>" if text else ""
        return f"{extra}{shown}<div class='answer chat-failed'><b>failed:</b> {html.escape(error)}</div>"
    if diverge_at is None:
        body = html.escape(text)
    else:  # the baseline's answer and this one part ways here
        body = html.escape(text[:diverge_at]) + "<mark>" + html.escape(text[diverge_at:]) + "</mark>"
    return f"{extra}<div class='answer' style='white-space:pre-wrap'>{body}</div><small>{html.escape(stats)}</small>"


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
                   labels: list[str] | None = None, blind: bool = False):
    """Yield the panel HTML for every variant: first their loading, then the answers until all are complete.

    `blind`: panels are labelled by `labels` only, and nothing that would tell the variants apart (the
    comparison with the baseline, the speed) is shown."""
    if not prompt or not prompt.strip():
        raise gr.Error("the prompt is empty")
    run = chat_run(run_id, session, visitor_id(request))
    names = [n for n in names if n]
    if not 2 <= len(names) <= PANELS:
        raise gr.Error(f"choose 2 to {PANELS} variants (chosen: {len(names)})")
    records = {r["name"]: r for r in run["variants"]}
    unknown = [n for n in names if n not in records]
    if unknown:
        raise gr.Error(f"run {run_id} has no variant {', '.join(unknown)}")
    bad = [n for n in names if records[n]["status"] != "ok"]
    if bad:
        raise gr.Error(f"variants that failed in this run cannot chat: {', '.join(bad)}")
    labels = labels or names
    workers = _workers(session, run, names)
    state = {n: {"text": "", "tokens": 0, "done": False, "error": None, "note": None, "stats": None} for n in names}
    blank = [""] * (PANELS - len(names))

    started = time.perf_counter()
    while not all(w.ready or w.error for w in workers.values()):  # loading: say so, per variant, with the time
        for worker in workers.values():
            worker.poll_loading()
            if not worker.ready and worker.error is None and time.perf_counter() - worker.started > 600:
                worker.error = "the variant did not load in 10 minutes"
        waited = time.perf_counter() - started
        yield [_wrap(_loading_panel(workers[n], label, waited, blind), blind) for n, label in zip(names, labels)] + blank
        time.sleep(0.2)

    limit = max_new_tokens()
    for name, worker in workers.items():
        if worker.error:
            state[name].update(done=True, error=worker.error)
        else:
            worker.ask(prompt, limit)
    baseline = None if blind else run["preset"].get("baseline")
    while True:
        for name, worker in workers.items():
            entry = state[name]
            if entry["done"]:
                continue
            if worker.error:  # ask found the pipe broken: the process died between prompts
                entry.update(done=True, error=worker.error)
                continue
            for kind, value in worker.poll():
                if kind == "token":
                    entry["tokens"] += 1
                    entry["text"] = value[1]
                elif kind == "note":
                    entry["note"] = value
                elif kind == "done":
                    entry.update(done=True, stats=value, text=value["text"])
                else:
                    entry.update(done=True, error=value)
        yield [_wrap(_panel(state, name, baseline, label, blind), blind) for name, label in zip(names, labels)] + blank
        if all(entry["done"] for entry in state.values()):
            return
        time.sleep(0.05)


def _wrap(panel: str, blind: bool) -> str:
    """One element per answer (gradio repeats a component's classes on nested elements), for pages and tests."""
    return f"<div class='{'blind-answer' if blind else 'chat-answer'}'>{panel}</div>"


def _loading_panel(worker: ChatWorker, label: str, waited: float, blind: bool = False) -> str:
    if worker.error:
        line = f"failed to load: {worker.error}"
    elif worker.ready:  # a blind panel leaves out the load time: a small GGUF loads faster than fp32
        line = "loaded; waiting for the others" if blind else f"loaded in {worker.load_s:.1f} s; waiting for the others"
    else:
        line = f"{worker.stage} ({time.perf_counter() - worker.started:.0f} s)"
    return (f"<h4>{html.escape(label)}</h4><div class='chat-loading'><b>loading the variants ({waited:.0f} s)</b>"
            f"<br><small>{html.escape(line)}</small></div>")


def _panel(state: dict, name: str, baseline: str | None, label: str, blind: bool) -> str:
    entry = state[name]
    if entry["done"] and entry["stats"]:
        figures = entry["stats"]
        stats = f"{figures['tokens']} tokens"
        if not blind:  # speed tells variants apart (a GGUF is faster), so a blind panel does not show it
            if figures["ttft_s"] is not None:
                stats = f"TTFT {figures['ttft_s'] * 1000:.0f} ms · " + stats
            if figures["tok_s"]:
                stats += f" · {figures['tok_s']:.1f} tok/s"
    else:
        stats = f"{entry['tokens']} tokens so far" if entry["tokens"] else "waiting for the first token"
    diverge = None
    other = state.get(baseline) if baseline else None
    if other is not None and name != baseline and other["done"] and entry["done"] and not (other["error"] or entry["error"]):
        diverge = first_text_difference(other["text"], entry["text"])
        stats += (f" · same text as {baseline}" if diverge is None
                  else f" · text differs from {baseline} from character {diverge + 1}")
    return f"<h4>{html.escape(label)}</h4>" + render(entry["text"], diverge, stats, entry["error"], entry["note"])


def _vote_visitor(request: Any) -> str | None:
    """Whose votes the table shows: in shared mode only this visitor's ("" for one without a session: none)."""
    return (visitor_id(request) or "") if limits().shared else None


def leaderboard_html(request: Any = None) -> str:
    return vote_html(vote_table(History().leaderboard(visitor=_vote_visitor(request))))


def record_vote(choice: str, session: dict, request: Any = None) -> tuple[str, Any]:
    """Store (or, for the same blind answer, replace) the vote; reveal both names; the updated table."""
    pending = session.get("blind")
    if not pending:
        raise gr.Error("ask a blind question first")
    if not pending.get("complete", True):  # a vote on half an answer would judge the faster variant
        raise gr.Error("wait until both answers have ended, then vote")
    history = History()
    a, b = pending["pair"]
    if pending.get("vote_id") is None:
        visitor = visitor_id(request)
        pending["vote_id"] = history.add_vote(pending["run_id"], pending["prompt"], a, b, choice, visitor=visitor)
        verb = "Recorded"
    else:  # a second click on the same answer changes the vote; the pair still counts once
        history.change_vote(pending["vote_id"], choice)
        verb = "Changed your vote"
    said = {"a": "A is better", "b": "B is better", "tie": "a tie"}[choice]
    return (f"{verb} ({said}): A was **{a}**, B was **{b}**.",
            vote_table(history.leaderboard(visitor=_vote_visitor(request))))


def build_chat(session: gr.State, current_run: gr.State, app: gr.Blocks | None = None) -> None:
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
            blind_panels = [gr.HTML(elem_classes=["chat-panel", "blind-panel"]) for _ in range(2)]
        with gr.Row():
            votes = [gr.Button(label) for label in ("A is better", "Tie", "B is better")]
        vote_note = gr.Markdown(elem_classes=["vote-note"])
        gr.Markdown("**Votes per variant** (win share = wins / votes, with its 95% Wilson interval)")
        leaderboard = gr.HTML(elem_classes=["vote-table"])

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
        if not prompt_text or not prompt_text.strip():
            raise gr.Error("the prompt is empty")
        pair = random.sample(names, 2)
        pending = {"run_id": run_id, "prompt": prompt_text, "pair": pair, "vote_id": None, "complete": False}
        session_value["blind"] = pending
        note = "A and B are hidden; vote when both answers have ended, then they are revealed."
        for panels_html in stream_answers(run_id, pair, prompt_text, session_value, request, labels=["A", "B"], blind=True):
            yield panels_html[:2] + [note]
            note = gr.skip()  # said once: later yields must not overwrite a note written meanwhile
        pending["complete"] = True

    def voter(choice: str):
        def vote(session_value: dict, request: gr.Request):  # the annotation lets gradio pass the request
            note, frame = record_vote(choice, session_value, request)
            return note, vote_html(frame)

        return vote

    def on_load(session_value: dict, current: str | None, request: gr.Request):
        return runs_choices(session_value, current, request), leaderboard_html(request)

    refresh.click(runs_choices, [session, current_run], run_box, api_name="chat_runs")
    current_run.change(runs_choices, [session, current_run], run_box)
    run_box.change(variant_choices, [run_box, session], variants)
    send.click(stream_answers, [run_box, variants, prompt, session], panels, api_name="chat")
    blind_go.click(blind, [run_box, prompt, session], blind_panels + [vote_note], api_name="chat_blind")
    for button, choice in zip(votes, ("a", "tie", "b")):
        button.click(voter(choice), session, [vote_note, leaderboard], api_name=f"vote_{choice}")
    if app is not None:  # the run list and the vote table are filled when the page opens, not only on Refresh
        app.load(on_load, [session, current_run], [run_box, leaderboard])
