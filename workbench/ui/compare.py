"""Compare tab: pick a model and methods (forms generated from each method's typed options), run, see charts."""

from __future__ import annotations

import queue
import threading
import time
import typing
from typing import Any

import gradio as gr
import pandas as pd
import yaml

from workbench.errors import WorkbenchError
from workbench.methods.registry import get_method, method_names
from workbench.paths import workbench_home
from workbench.views.plots import CHART_LABELS
from workbench.data.sources import BUNDLED
from workbench.ui.common import (PRESETS_DIR, display_table, figures, gate_message, limits, preset_names, run_note,
                                 visitor_id)
from workbench.ui.runqueue import RUNS


def _default(field: Any) -> Any:
    """A field's default as plain data (a nested options model, e.g. a calibration spec, as its dict); None
    for a required field (bnb-auto's target_mb), which the form leaves empty until it is filled in."""
    if field.is_required():
        return None
    default = field.get_default(call_default_factory=True)
    return default.model_dump() if hasattr(default, "model_dump") else default


def _field_component(method: str, name: str, field: Any) -> gr.components.Component:
    """One input per option, chosen from its type; help text from the field's description."""
    annotation = field.annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    base = args[0] if len(args) == 1 else annotation
    default = _default(field)
    label = f"{method} · {name}"
    if typing.get_origin(base) is typing.Literal:
        return gr.Dropdown(choices=list(typing.get_args(base)), value=default, label=label, info=field.description)
    if base is bool:
        return gr.Checkbox(value=default, label=label, info=field.description)
    if base in (int, float):
        return gr.Number(value=default, label=label, info=field.description, precision=0 if base is int else None)
    return gr.Textbox(value="" if default is None else yaml.safe_dump(default, default_flow_style=True).strip(),
                      label=label, info=f"{field.description} (YAML)")


def _option_value(field: Any, value: Any) -> Any:
    if isinstance(value, str) and not (typing.get_origin(field.annotation) is typing.Literal):
        return yaml.safe_load(value) if value.strip() else None
    if isinstance(value, float) and field.annotation in (int, int | None) and value is not None:
        return int(value)
    return value


def preset_from_form(model: str, methods: list[str], threads: float, fields: list[tuple[str, str, Any]], values: list) -> str:
    """A preset YAML from the form: fp32 baseline plus one variant per checked method, options that differ from defaults."""
    variants = [{"name": "fp32", "method": "fp32"}]
    for method in methods:
        if method == "fp32":
            continue
        options = {}
        for (owner, name, field), value in zip(fields, values):
            if owner == method:
                value = _option_value(field, value)
                if value != _default(field):
                    options[name] = value
        variants.append({"name": method, "method": method, **({"options": options} if options else {})})
    data = {"name": "custom", "model": model.strip() or BUNDLED, "device": "auto", "threads": int(threads or 2),
            "baseline": "fp32", "variants": variants}
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None)


def gated_preset(yaml_text: str, estimate: bool = True) -> Any:
    """Parse the editor's YAML and pass it through the policy gate (policy.py) in the app's mode."""
    from workbench.config.policy import app_mode, enforce
    from workbench.config.presets import parse_preset

    preset = parse_preset(yaml.safe_load(yaml_text or ""), "preset")
    enforce(preset, app_mode(), estimate=estimate)
    return preset


def run_preset(yaml_text: str, budget_gb: float | None, session: dict, request: gr.Request = None):
    """Validate, then run in a background thread, streaming per-variant progress; finish with table and charts."""
    from workbench.running.runner import Runner

    empty = [gr.skip()] * (2 + len(CHART_LABELS))  # results table, every chart, current run id
    try:
        preset = gated_preset(yaml_text)
    except (WorkbenchError, yaml.YAMLError) as exc:
        yield [f"**Cannot run:** {gate_message(exc)}", None] + empty
        return
    visitor = visitor_id(request) or f"anonymous-{id(session)}"  # an API call without a session is its own visitor
    try:
        ticket = RUNS.join(visitor)
    except WorkbenchError as exc:
        yield [f"**Cannot run:** {exc}", None] + empty
        return
    session["ticket"] = ticket
    runner = None
    try:
        while (ahead := RUNS.ahead(ticket)) > 0:  # the page shows the place in the line while it waits
            if ticket.cancelled.is_set():
                yield ["cancelled while waiting in the queue; nothing ran", None] + empty
                return
            yield [f"waiting in the queue: {ahead} run(s) ahead of yours", None] + empty
            time.sleep(1.0)
        if ticket.cancelled.is_set():
            yield ["cancelled while waiting in the queue; nothing ran", None] + empty
            return
        events: queue.Queue = queue.Queue()
        runner = Runner(preset, on_event=events.put, visitor=visitor_id(request))
        session["runner"] = runner
        yield from _run_and_stream(runner, preset, events, budget_gb, session, empty)
    except GeneratorExit:  # the visitor left (page closed): stop the run, free the line
        if runner is not None:
            runner.cancel()
        raise
    finally:
        session.pop("runner", None)
        session.pop("ticket", None)
        RUNS.leave(ticket)


def _run_and_stream(runner: Any, preset: Any, events: queue.Queue, budget_gb: float | None, session: dict, empty: list):
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["run"] = runner.run()
        except WorkbenchError as exc:
            outcome["error"] = gate_message(exc)
        except Exception as exc:  # never a stack trace in the page: one line, and the app stays up
            outcome["error"] = f"{type(exc).__name__}: {exc}"

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    progress = {v.name: ("queued", "") for v in preset.variants}
    while thread.is_alive() or not events.empty():
        try:
            event = events.get(timeout=0.5)
            if event.variant:
                progress[event.variant] = (event.phase, event.message)
            status = f"{event.phase}: {event.message}" if not event.variant else "running"
        except queue.Empty:
            status = "running"
        table = pd.DataFrame([{"variant": k, "phase": p, "detail": m} for k, (p, m) in progress.items()])
        yield [status, table] + empty
    if "error" in outcome:
        yield [f"**Run failed:** {outcome['error']}", None] + empty
        return
    run = outcome["run"]
    session.setdefault("run_ids", []).append(run["run_id"])
    table = pd.DataFrame([{"variant": r["name"], "phase": r["status"], "detail": r["error"] or ""} for r in run["variants"]])
    yield [run_note(run), table, display_table(run, budget_gb), *figures(run, budget_gb), run["run_id"]]


def suggestion_markdown(run: dict[str, Any] | None) -> str:
    """The run's per-block sensitivity and the mixed-precision variant it suggests, for the Compare tab."""
    from workbench.views.report import sensitivity_text

    sensitivity = (run or {}).get("sensitivity")
    if not sensitivity:
        return ("No per-block sensitivity in this run: add `sensitivity: {variant: NAME, keep: 2}` to the preset "
                "(NAME a bitsandbytes variant) to get a suggested mixed-precision variant.") if run else ""
    text = f"```\n{sensitivity_text(sensitivity)}\n```"
    if sensitivity.get("mixed_precision_variant"):
        text += "\n\n**Build this** adds the suggested variant to the preset below; **Run** then builds and measures it."
    return text


def add_suggested_variant(yaml_text: str, run: dict[str, Any] | None) -> tuple[str, str]:
    """(the editor's preset with the run's suggested mixed-precision variant added, what happened).

    The editor stays the source of truth for a run: the variant is appended to what it holds (the run's own
    preset when it is empty), under a name no other variant has, and the result must parse as a preset;
    otherwise the editor is left as it was and the message says why."""
    import copy

    from workbench.config.presets import parse_preset

    suggestion = ((run or {}).get("sensitivity") or {}).get("mixed_precision_variant")
    if not suggestion:
        return yaml_text, "**Nothing to add:** this run has no suggested mixed-precision variant (its sensitivity " \
                          "section is missing, failed, or measured a method without skip_modules)."
    try:
        data = yaml.safe_load(yaml_text) if (yaml_text or "").strip() else copy.deepcopy(run["preset"])
    except yaml.YAMLError as exc:
        return yaml_text, f"**Cannot add:** the preset in the editor is not valid YAML ({type(exc).__name__}); fix it first"
    if not isinstance(data, dict) or not isinstance(data.get("variants"), list):
        return yaml_text, "**Cannot add:** the editor does not hold a preset with a variants list; load one first"
    variant = copy.deepcopy(suggestion)
    if any(v == variant for v in data["variants"] if isinstance(v, dict)):
        return yaml_text, f"variant '{variant['name']}' is already in the preset; press Run to build it"
    names = {v.get("name") for v in data["variants"] if isinstance(v, dict)}
    base, number = variant["name"], 2
    while variant["name"] in names:  # same name, other options (an earlier suggestion): keep both
        variant["name"], number = f"{base}-{number}", number + 1
    data["variants"].append(variant)
    text = yaml.safe_dump(data, sort_keys=False, default_flow_style=None)
    try:
        parse_preset(yaml.safe_load(text), "preset")
    except WorkbenchError as exc:
        return yaml_text, f"**Cannot add:** {exc}"
    note = ""
    source = (run.get("preset") or {}).get("model")
    if source and data.get("model") != source:
        note = (f" Note: the sensitivity was measured on `{source}`, and this preset runs `{data.get('model')}`; "
                "the block names fit only models with the same layers.")
    return text, f"added variant `{variant['name']}` to the preset; press **Run** to build and measure it.{note}"


def check_model_size(preset: Any, lim: Any) -> None:
    """The size cap (WORKBENCH_MAX_PARAMS; 5e8 in shared mode) is checked from the model's config alone,
    before anything downloads or loads."""
    from workbench.planning.modelshape import read_shape

    params = read_shape(preset.model, preset.trust_remote_code)[0].params()
    if params > lim.max_model_params:
        raise WorkbenchError(f"{preset.model} has about {_count(params)} parameters; this app allows at most "
                             f"{_count(lim.max_model_params)} (WORKBENCH_MAX_PARAMS)")


def _count(n: float) -> str:
    return f"{n / 1e9:.1f} B" if n >= 1e9 else f"{n / 1e6:.0f} M" if n >= 1e6 else f"{n:,.0f}"


def plan_preset_markdown(yaml_text: str, budget_gb: float | None) -> str:
    """Estimated weights, peak memory and time of every variant, from the model config alone (planning/planner.py)."""
    from workbench.planning.planner import plan_markdown, plan_preset_file

    try:
        preset = gated_preset(yaml_text)  # the Plan button reads nothing the Run button would refuse
        plans, context = plan_preset_file(preset, emit=lambda _m: None)
    except (WorkbenchError, yaml.YAMLError) as exc:
        return f"**Cannot plan:** {gate_message(exc)}"
    return plan_markdown(preset, plans, context, budget_gb or preset.memory_budget_gb)


def cancel_run(session: dict) -> str:
    runner, ticket = session.get("runner"), session.get("ticket")
    if runner is None and ticket is not None:
        ticket.cancelled.set()
        return "cancelled: your run leaves the queue"
    if runner is None:
        return "nothing is running"
    runner.cancel()
    return "cancelling: the variant in flight stops, the rest are recorded as cancelled"


def end_session(session: dict) -> None:
    """The visitor left: their queued or running run is cancelled (chat workers are closed by chat.close_workers)."""
    if session.get("ticket") is not None:
        session["ticket"].cancelled.set()
    if session.get("runner") is not None:
        session["runner"].cancel()


def _importable_methods() -> tuple[list[str], dict[str, str]]:
    usable, broken = [], {}
    for name in method_names():
        try:
            get_method(name)
            usable.append(name)
        except Exception as exc:
            broken[name] = f"{type(exc).__name__}: {exc}"
    return usable, broken


def build_compare(session: gr.State, current_run: gr.State) -> None:
    lim = limits()
    with gr.Row():
        model = gr.Textbox(value=BUNDLED, label="Model", info="bundled:smollm2-135m-instruct, a hub id"
                           + ("" if lim.shared else ", or a local folder / .gguf inside the allowed folders"))
        threads = gr.Number(value=2, precision=0, label="Threads")
        preset_pick = gr.Dropdown(choices=preset_names(), value="quickstart", label="Preset")
    usable, broken = _importable_methods()
    methods = gr.CheckboxGroup(choices=usable, value=["fp32", "bnb-nf4"], label="Methods")
    if broken:  # one broken method module must not take the app down: say which, offer the rest
        gr.Markdown("**Unavailable methods:** " + "; ".join(f"{name} ({reason})" for name, reason in broken.items()))
    fields: list[tuple[str, str, Any]] = []
    inputs = []
    with gr.Accordion("Method options (generated from each method's typed options)", open=False):
        for name in usable:
            options = get_method(name).Options.model_fields
            if not options:
                continue
            with gr.Accordion(f"{name}: {get_method(name).summary}", open=False):
                for field_name, field in options.items():
                    inputs.append(_field_component(name, field_name, field))
                    fields.append((name, field_name, field))
    from_form = gr.Button("Write preset from the form")
    quickstart = PRESETS_DIR / "quickstart.yaml"  # the preset the picker shows at first, so Run works straight away
    yaml_box = gr.Code(value=quickstart.read_text() if quickstart.is_file() else None, language="yaml",
                       label="Preset (YAML): edit freely, this is what runs")
    with gr.Row():
        save_name = gr.Textbox(label="Save as", placeholder="my-preset", scale=3)
        save = gr.Button("Save preset", scale=1)
    with gr.Row():
        run = gr.Button("Run", variant="primary")
        cancel = gr.Button("Cancel")
        budget = gr.Number(value=None, label="Fits in N GB (peak memory)", info="variants above it are greyed")
    status = gr.Markdown()
    with gr.Accordion("Plan: estimated weights, peak memory and time, before anything loads", open=False):
        plan_button = gr.Button("Plan this preset")
        plan_box = gr.Markdown()
    progress = gr.Dataframe(label="Progress", interactive=False)
    results = gr.Dataframe(label="Results (MB, ms, tok/s; — means not applicable)", interactive=False)
    plots = [gr.Plot(label=label) for label in CHART_LABELS]
    with gr.Accordion("Per-block sensitivity and the suggested mixed-precision variant", open=True):
        suggestion = gr.Markdown()
        build_this = gr.Button("Build this: add the suggested variant to the preset")

    def load_preset_text(name: str) -> str:
        path = PRESETS_DIR / f"{name}.yaml"  # the picker lists presets/ only (preset_names)
        return path.read_text() if path.is_file() else ""

    def save_preset(name: str, text: str) -> str:
        if not name or not name.replace("-", "").replace("_", "").isalnum() or len(name) > 64:
            return "**Cannot save:** give a name of at most 64 letters, digits, '-' or '_'"
        try:
            gated_preset(text)  # a saved preset is one this app would run
        except (WorkbenchError, yaml.YAMLError) as exc:
            return f"**Cannot save:** {gate_message(exc)}"
        folder = workbench_home() / "presets"
        folder.mkdir(exist_ok=True)
        (folder / f"{name}.yaml").write_text(text)
        return f"saved {folder / (name + '.yaml')}"

    preset_pick.change(load_preset_text, preset_pick, yaml_box)
    from_form.click(lambda m, ms, t, *v: preset_from_form(m, ms, t, fields, list(v)), [model, methods, threads, *inputs],
                    yaml_box)
    save.click(save_preset, [save_name, yaml_box], status, api_name="save_preset")
    # Many calls may wait at once: the run queue (runqueue.py) orders them and shows each its place.
    run.click(run_preset, [yaml_box, budget, session], [status, progress, results, *plots, current_run],
              api_name="run_preset", concurrency_limit=None)
    cancel.click(cancel_run, session, status)
    plan_button.click(plan_preset_markdown, [yaml_box, budget], plan_box, api_name="plan_preset")

    def current(run_id: str | None, session_value: dict, request: gr.Request | None) -> dict | None:
        from workbench.ui.history import load_owned_run

        return load_owned_run(run_id, session_value, visitor_id(request)) if run_id else None

    def show_suggestion(run_id: str | None, session_value: dict, request: gr.Request) -> str:
        return suggestion_markdown(current(run_id, session_value, request))

    def build_suggested(text: str, run_id: str | None, session_value: dict, request: gr.Request) -> tuple[str, str]:
        return add_suggested_variant(text, current(run_id, session_value, request))

    # The run on the page (just run here, or opened in History) shows its suggestion; one click adds it to the editor.
    current_run.change(show_suggestion, [current_run, session], suggestion)
    build_this.click(build_suggested, [yaml_box, current_run, session], [yaml_box, status], api_name="build_suggested")
