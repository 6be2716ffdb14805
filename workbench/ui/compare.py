"""Compare tab: pick a model and methods (forms generated from each method's typed options), run, see charts."""

from __future__ import annotations

import queue
import threading
import time
import typing
from dataclasses import dataclass
from typing import Any

import gradio as gr
import pandas as pd
import yaml

from workbench.errors import WorkbenchError
from workbench.methods.registry import get_method, method_names
from workbench.paths import workbench_home
from workbench.views.plots import CHART_LABELS
from workbench.data.sources import BUNDLED
from workbench.ui.common import (DASH, PRESETS_DIR, figures, format_cell, gate_message, greyed, limits, preset_names,
                                 run_note, styled_table, visitor_id)
from workbench.ui.runqueue import RUNS


def _default(field: Any) -> Any:
    """A field's default as plain data (a nested options model, e.g. a calibration spec, as its dict); None
    for a required field (bnb-auto's target_mb), which the form leaves empty until it is filled in."""
    if field.is_required():
        return None
    default = field.get_default(call_default_factory=True)
    return default.model_dump() if hasattr(default, "model_dump") else default


def _field_kind(field: Any) -> tuple[str, Any]:
    """(kind, base type) of an option: 'choice' (a Literal), 'choices' (a list of one), 'bool', 'number' or 'text'
    (anything else, as YAML)."""
    annotation = field.annotation
    if typing.get_origin(annotation) is list and typing.get_origin(typing.get_args(annotation)[0]) is typing.Literal:
        return "choices", typing.get_args(annotation)[0]  # e.g. gguf-auto's candidates: several of a fixed set
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    base = args[0] if len(args) == 1 else annotation
    if typing.get_origin(base) is typing.Literal:
        return "choice", base
    if base is bool:
        return "bool", base
    if base in (int, float):
        return "number", base
    return "text", base


def _field_component(method: str, name: str, field: Any, value: Any = None) -> gr.components.Component:
    """One input per option, chosen from its type; help text from the field's description; `value` as the form
    shows it (_form_value), the default when None."""
    kind, base = _field_kind(field)
    shown = _form_value(field, _default(field)) if value is None else value
    label = f"{method} · {name}"
    if kind == "choices":
        return gr.Dropdown(choices=list(typing.get_args(base)), value=shown, multiselect=True, label=label,
                           info=field.description)
    if kind == "choice":
        return gr.Dropdown(choices=list(typing.get_args(base)), value=shown, label=label, info=field.description)
    if kind == "bool":
        return gr.Checkbox(value=shown, label=label, info=field.description)
    if kind == "number":
        return gr.Number(value=shown, label=label, info=field.description, precision=0 if base is int else None)
    return gr.Textbox(value=shown, label=label, info=f"{field.description} (YAML)")


def _form_value(field: Any, value: Any) -> Any:
    """An option's value as its input holds it: text options as one line of YAML ('' for none)."""
    if _field_kind(field)[0] == "text":
        return "" if value is None else yaml.safe_dump(value, default_flow_style=True).strip()
    return value


def _option_value(field: Any, value: Any) -> Any:
    if isinstance(value, str) and not (typing.get_origin(field.annotation) is typing.Literal):
        return yaml.safe_load(value) if value.strip() else None
    if isinstance(value, float) and field.annotation in (int, int | None) and value is not None:
        return int(value)
    return value


def _form_options(method: str, fields: list[tuple[str, str, Any]], values: list,
                  keep: dict[str, Any] | None = None) -> dict[str, Any]:
    """The options the form holds for `method`: those that differ from the defaults, and those `keep` (the stage's
    options as written) names, so an explicit default stays written (a YAML text option that does not parse raises
    yaml.YAMLError). Keys of `keep` the method does not know stay, for the preset check to name."""
    known = {name for owner, name, _field in fields if owner == method}
    options = {k: v for k, v in (keep or {}).items() if k not in known}
    for (owner, name, field), value in zip(fields, values):
        if owner == method:
            value = _option_value(field, value)
            if value != _default(field) or name in (keep or {}):
                options[name] = value
    return options


def preset_from_form(model: str, methods: list[str], threads: float, fields: list[tuple[str, str, Any]], values: list) -> str:
    """A preset YAML from the form: fp32 baseline plus one variant per checked method, options that differ from defaults."""
    variants = [{"name": "fp32", "method": "fp32"}]
    for method in methods:
        if method == "fp32":
            continue
        options = _form_options(method, fields, values)
        variants.append({"name": method, "method": method, **({"options": options} if options else {})})
    data = {"name": "custom", "model": model.strip() or BUNDLED, "device": "auto", "threads": int(threads or 2),
            "baseline": "fp32", "variants": variants}
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None)


def _stages(variant: dict[str, Any]) -> list[dict[str, Any]]:
    """A YAML variant's stages as dicts: its pipeline, or the variant itself for one method."""
    if isinstance(variant.get("pipeline"), list):
        return [s for s in variant["pipeline"] if isinstance(s, dict)]
    return [variant]


def _preset_data(yaml_text: str) -> dict[str, Any] | None:
    """The editor's YAML as a mapping with a variants list, or None (invalid YAML, or not a preset's shape)."""
    try:
        data = yaml.safe_load(yaml_text or "")
    except yaml.YAMLError:
        return None
    if not isinstance(data, dict):
        return None
    if not isinstance(data.get("variants"), list):
        data["variants"] = []
    data["variants"] = [v for v in data["variants"] if isinstance(v, dict)]
    return data


def form_from_preset(yaml_text: str, usable: list[str], fields: list[tuple[str, str, Any]]) -> dict[str, Any] | None:
    """What the form shows for the editor's preset, so the two never disagree; None when the YAML is no preset yet.

    Methods: every usable method any stage uses. Options of a method: those of its first stage in the preset (the one
    the form edits), defaults where the preset leaves them out or does not use the method."""
    data = _preset_data(yaml_text)
    if data is None:
        return None
    first: dict[str, dict[str, Any]] = {}
    for variant in data["variants"]:
        for stage in _stages(variant):
            if stage.get("method") in usable and stage["method"] not in first:
                first[stage["method"]] = stage.get("options") if isinstance(stage.get("options"), dict) else {}
    values = [_form_value(field, first.get(method, {}).get(name, _default(field))) for method, name, field in fields]
    threads = data.get("threads")
    return {"model": str(data.get("model") or ""), "threads": threads if isinstance(threads, int) else None,
            "methods": [m for m in usable if m in first], "values": values}


def preset_with_form(yaml_text: str, model: str, methods: list[str], threads: float | None, usable: list[str],
                     fields: list[tuple[str, str, Any]], values: list) -> str:
    """The editor's preset changed as the form says, everything else (protocol, names, pipelines) kept.

    model and threads are set; a variant that uses an unticked method goes; a ticked method no variant uses gets a
    variant of its own; the first stage of each ticked method takes the form's options; the baseline moves to fp32
    (else the first variant) when its variant went. YAML that is no preset yet is replaced by preset_from_form."""
    data = _preset_data(yaml_text)
    if data is None:
        return preset_from_form(model, methods, threads or 2, fields, values)
    data["model"] = model.strip() or BUNDLED
    if threads:
        data["threads"] = int(threads)
    unticked = set(usable) - set(methods)
    data["variants"] = [v for v in data["variants"] if not any(s.get("method") in unticked for s in _stages(v))]
    names = {v.get("name") for v in data["variants"]}
    used = {s.get("method") for v in data["variants"] for s in _stages(v)}
    for method in methods:
        if method not in used:
            name, number = method, 2
            while name in names:
                name, number = f"{method}-{number}", number + 1
            names.add(name)
            data["variants"].append({"name": name, "method": method})
    done: set[str] = set()
    for variant in data["variants"]:
        for stage in _stages(variant):
            method = stage.get("method")
            if method in methods and method not in done:
                done.add(method)
                written = stage.get("options") if isinstance(stage.get("options"), dict) else {}
                options = _form_options(method, fields, values, keep=written)
                if options:
                    stage["options"] = options
                else:
                    stage.pop("options", None)
    if not any(v.get("name") == data.get("baseline") for v in data["variants"]):
        names_now = [v.get("name") for v in data["variants"]]
        data["baseline"] = "fp32" if "fp32" in names_now else (names_now[0] if names_now else None)
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None)


def check_markdown(yaml_text: str) -> str:
    """The editor's live check: parse and validate (no policy, nothing read), or the error with its line and field."""
    from workbench.config.presets import parse_preset

    try:
        preset = parse_preset(yaml.safe_load(yaml_text or ""), "preset")
    except (WorkbenchError, yaml.YAMLError) as exc:
        return f"**Not a valid preset:** {gate_message(exc)}"
    return f"valid preset: {len(preset.variants)} variant(s), baseline `{preset.baseline}`"


def gated_preset(yaml_text: str, estimate: bool = True) -> Any:
    """Parse the editor's YAML and pass it through the policy gate (policy.py) in the app's mode.

    The one check of Plan, Run and Save: what Plan accepts, Run accepts (tests/test_ui_compare.py holds them to it)."""
    from workbench.config.policy import app_mode, enforce
    from workbench.config.presets import parse_preset

    preset = parse_preset(yaml.safe_load(yaml_text or ""), "preset")
    enforce(preset, app_mode(), estimate=estimate)
    return preset


def run_preset(yaml_text: str, budget_gb: float | None, session: dict, request: gr.Request = None):
    """Validate, then run in a background thread, streaming per-variant progress; finish with table and charts."""
    from workbench.running.runner import Runner

    # results table, every chart, current run id, the run shown; then the progress and results boxes, which stay
    # hidden until they have rows (the tables' own values stay plain, so API clients get tables, not updates).
    empty = [gr.skip()] * (3 + len(CHART_LABELS))
    hide_progress = [gr.Column(visible=False), gr.skip()]
    unchanged = [gr.skip(), gr.skip()]
    try:
        preset = gated_preset(yaml_text)
    except (WorkbenchError, yaml.YAMLError) as exc:
        yield [f"**Cannot run:** {gate_message(exc)}", None] + empty + hide_progress
        return
    visitor = visitor_id(request) or f"anonymous-{id(session)}"  # an API call without a session is its own visitor
    try:
        ticket = RUNS.join(visitor)
    except WorkbenchError as exc:
        yield [f"**Cannot run:** {exc}", None] + empty + hide_progress
        return
    session["ticket"] = ticket
    runner = None
    try:
        while (ahead := RUNS.ahead(ticket)) > 0:  # the page shows the place in the line while it waits
            if ticket.cancelled.is_set():
                yield ["cancelled while waiting in the queue; nothing ran", None] + empty + hide_progress
                return
            yield [f"waiting in the queue: {ahead} run(s) ahead of yours", None] + empty + unchanged
            time.sleep(1.0)
        if ticket.cancelled.is_set():
            yield ["cancelled while waiting in the queue; nothing ran", None] + empty + hide_progress
            return
        events: queue.Queue = queue.Queue()
        # Shared mode measures every run afresh: a reused record would name another visitor's run.
        runner = Runner(preset, on_event=events.put, visitor=visitor_id(request), reuse_measurements=not limits().shared)
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
        yield [status, table] + empty + [gr.Column(visible=True), gr.skip()]
    if "error" in outcome:
        yield [f"**Run failed:** {outcome['error']}", gr.skip()] + empty + [gr.skip(), gr.skip()]
        return
    run = outcome["run"]
    session.setdefault("run_ids", []).append(run["run_id"])
    table = pd.DataFrame([{"variant": r["name"], "phase": r["status"], "detail": r["error"] or DASH} for r in run["variants"]])
    yield [run_note(run), table, styled_table(run, budget_gb), *figures(run, budget_gb), run["run_id"], run,
           gr.Column(visible=True), gr.Column(visible=True)]


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
    return plan_preset(yaml_text, budget_gb)[0]


def plan_preset(yaml_text: str, budget_gb: float | None) -> tuple[str, list[dict[str, Any]] | None]:
    """(the plan as Markdown or why there is none, one estimate per variant for the plan table and chart)."""
    from workbench.planning.planner import plan_markdown, plan_preset_file

    try:
        preset = gated_preset(yaml_text)  # the very check Run makes (gated_preset), so Plan accepts what Run accepts
        plans, context = plan_preset_file(preset, emit=lambda _m: None)
    except (WorkbenchError, yaml.YAMLError) as exc:
        return f"**Cannot plan:** {gate_message(exc)}", None
    rows = [{"name": p.name, "method": p.method, "format": p.format, "weight_bytes": p.weight_bytes,
             "peak_bytes": p.peak_bytes, "build_s": None if p.cached else p.build_s, "cached": p.cached,
             "measure_s": p.measure_s} for p in plans]
    text = plan_markdown(preset, plans, context, budget_gb or preset.memory_budget_gb)
    # The estimates themselves go to the plan table below (rounded, greyed live); the Markdown keeps the heading
    # and the notes, so the page does not show the same numbers twice.
    text = "\n".join(line for line in text.splitlines() if not line.startswith("|"))
    return text, rows


def plan_over_budget(rows: list[dict[str, Any]], budget_gb: float | None) -> list[bool]:
    """Per plan row: is its estimated peak above the budget (an unknown peak is not greyed)."""
    return [bool(budget_gb) and r["peak_bytes"] is not None and r["peak_bytes"] > budget_gb * 1e9 for r in rows]


def plan_table(rows: list[dict[str, Any]], budget_gb: float | None = None) -> Any:
    """The plan's estimates as a table (MB, s in the headers), rows over the budget greyed."""
    frame = pd.DataFrame([{
        "variant": r["name"], "method": r["method"], "format": r["format"], "est. weights MB": r["weight_bytes"] / 1e6,
        "est. peak MB": None if r["peak_bytes"] is None else r["peak_bytes"] / 1e6,
        "build s": "cached" if r["cached"] else r["build_s"], "measure s": r["measure_s"],
        **({f"fits {budget_gb:g} GB": None if r["peak_bytes"] is None else
            ("yes" if r["peak_bytes"] <= budget_gb * 1e9 else "NO")} if budget_gb else {}),
    } for r in rows])
    return greyed(frame.astype(object).map(format_cell), plan_over_budget(rows, budget_gb))


def plan_outputs(yaml_text: str, budget_gb: float | None) -> list[Any]:
    """The Plan button: Markdown, the estimates table and chart (hidden when there is no plan), the estimates."""
    from workbench.views.plots import grey_over_budget, plan_chart

    text, rows = plan_preset(yaml_text, budget_gb)
    if not rows:
        return [text, gr.Dataframe(value=None, visible=False), gr.Plot(value=None, visible=False), None]
    over = {r["name"] for r, o in zip(rows, plan_over_budget(rows, budget_gb)) if o}
    return [text, gr.Dataframe(value=plan_table(rows, budget_gb), visible=True),
            gr.Plot(value=grey_over_budget(plan_chart(rows, budget_gb), over), visible=True), rows]


def restyle_for_budget(budget_gb: float | None, run: dict[str, Any] | None, rows: list[dict[str, Any]] | None) -> list[Any]:
    """"Fits in N GB" changed: grey again the results and charts of the run shown, and the plan's table and chart."""
    from workbench.views.plots import grey_over_budget, plan_chart

    out: list[Any] = []
    if run:
        out += [styled_table(run, budget_gb), *figures(run, budget_gb)]
    else:
        out += [gr.skip()] * (1 + len(CHART_LABELS))
    if rows:
        over = {r["name"] for r, o in zip(rows, plan_over_budget(rows, budget_gb)) if o}
        out += [gr.Dataframe(value=plan_table(rows, budget_gb), visible=True),
                gr.Plot(value=grey_over_budget(plan_chart(rows, budget_gb), over), visible=True)]
    else:
        out += [gr.skip(), gr.skip()]
    return out


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


# Keeps the results and plan tables inside the page: a wide table scrolls sideways in its own box.
TABLE_CSS = """<style>
.compare-table { max-width: 100%; min-width: 0; }
.compare-table .table-wrap, .compare-table .table-container { max-width: 100%; overflow-x: auto; }
</style>"""


@dataclass
class _Form:
    """The Compare tab's input side: the form generated from the methods' options, the YAML editor, the buttons."""

    usable: list[str]
    fields: list[tuple[str, str, Any]]
    model: Any
    threads: Any
    preset_pick: Any
    methods: Any
    inputs: list[Any]
    from_form: Any
    yaml_box: Any
    check: Any
    save_name: Any
    save: Any
    run: Any
    cancel: Any
    budget: Any
    status: Any

    @property
    def components(self) -> list[Any]:
        """The form's inputs in the order form_from_preset / preset_with_form use."""
        return [self.model, self.threads, self.methods, *self.inputs]


@dataclass
class _Outputs:
    """The Compare tab's result side: plan, progress, results, charts, and the sensitivity suggestion."""

    plan_button: Any
    plan_box: Any
    plan_frame: Any
    plan_plot: Any
    progress_box: Any
    progress: Any
    results_box: Any
    results: Any
    plots: list[Any]
    shown_run: Any  # the run document in the results table, for restyling when the budget changes
    plan_rows: Any  # the last plan's estimates, likewise
    suggestion: Any
    build_this: Any


def build_compare(session: gr.State, current_run: gr.State) -> None:
    form = _build_form()
    outputs = _build_outputs()
    _wire_form(form)
    _wire_run(form, outputs, session, current_run)


def _build_form() -> _Form:
    lim = limits()
    usable, broken = _importable_methods()
    fields: list[tuple[str, str, Any]] = [(name, field_name, field) for name in usable
                                          for field_name, field in get_method(name).Options.model_fields.items()]
    quickstart = PRESETS_DIR / "quickstart.yaml"  # the preset the picker shows at first, so Run works straight away
    start_text = quickstart.read_text() if quickstart.is_file() else ""
    # The form starts as the editor's preset says (form_from_preset), so the two agree from the first paint.
    start = form_from_preset(start_text, usable, fields) or {"model": BUNDLED, "threads": 2, "methods": ["fp32"],
                                                              "values": [None] * len(fields)}
    gr.HTML(TABLE_CSS, padding=False)
    with gr.Row():
        model = gr.Textbox(value=start["model"] or BUNDLED, label="Model", info="bundled:smollm2-135m-instruct, a hub id"
                           + ("" if lim.shared else ", or a local folder / .gguf inside the allowed folders"))
        threads = gr.Number(value=start["threads"] or 2, precision=0, label="Threads")
        preset_pick = gr.Dropdown(choices=preset_names(), value="quickstart" if start_text else None, label="Preset")
    methods = gr.CheckboxGroup(choices=usable, value=start["methods"], label="Methods",
                               info="the methods the preset's variants use; ticking one adds a variant, unticking removes its variants")
    if broken:  # one broken method module must not take the app down: say which, offer the rest
        gr.Markdown("**Unavailable methods:** " + "; ".join(f"{name} ({reason})" for name, reason in broken.items()))
    inputs = []
    with gr.Accordion("Method options (generated from each method's typed options; they edit each method's first "
                      "variant in the preset)", open=False):
        for name in usable:
            options = [(i, f) for i, f in enumerate(fields) if f[0] == name]
            if not options:
                continue
            with gr.Accordion(f"{name}: {get_method(name).summary}", open=False):
                for index, (_owner, field_name, field) in options:
                    inputs.append(_field_component(name, field_name, field, start["values"][index]))
    from_form = gr.Button("Write preset from the form")
    yaml_box = gr.Code(value=start_text or None, language="yaml",
                       label="Preset (YAML): edit freely, this is what runs; the form above follows it")
    check = gr.Markdown(check_markdown(start_text) if start_text else "", elem_id="preset-check")
    with gr.Row():
        save_name = gr.Textbox(label="Save as", placeholder="my-preset", scale=3)
        save = gr.Button("Save preset", scale=1)
    with gr.Row():
        run = gr.Button("Run", variant="primary")
        cancel = gr.Button("Cancel")
        budget = gr.Number(value=None, label="Fits in N GB (peak memory)",
                           info="variants above it are greyed in the tables and charts, planned or measured")
    status = gr.Markdown()
    return _Form(usable, fields, model, threads, preset_pick, methods, inputs, from_form, yaml_box, check, save_name,
                 save, run, cancel, budget, status)


def _build_outputs() -> _Outputs:
    from workbench.views.plots import CHART_SPECS

    with gr.Accordion("Plan: estimated weights, peak memory and time, before anything loads", open=True):
        plan_button = gr.Button("Plan this preset")
        plan_box = gr.Markdown(elem_id="plan-box")
        plan_frame = gr.Dataframe(label="Plan (estimates)", interactive=False, visible=False,
                                  elem_classes=["compare-table"], elem_id="plan-table")
        plan_plot = gr.Plot(label="Plan chart", visible=False)
    with gr.Column(visible=False) as progress_box:
        progress = gr.Dataframe(label="Progress", interactive=False)
    with gr.Column(visible=False) as results_box:
        results = gr.Dataframe(label="Results (units in the headers; — means not applicable)", interactive=False,
                               elem_classes=["compare-table"], elem_id="results-table")
    plots: list[gr.Plot] = []
    labels = [spec[0] for spec in CHART_SPECS.values()]
    for start_index in range(0, len(labels), 2):  # a grid, two charts a row; a chart without data stays hidden
        with gr.Row(equal_height=False):
            for label in labels[start_index:start_index + 2]:
                plots.append(gr.Plot(label=label, visible=False))
    shown_run, plan_rows = gr.State(None), gr.State(None)
    with gr.Accordion("Per-block sensitivity and the suggested mixed-precision variant", open=True):
        suggestion = gr.Markdown()
        build_this = gr.Button("Build this: add the suggested variant to the preset")
    return _Outputs(plan_button, plan_box, plan_frame, plan_plot, progress_box, progress, results_box, results, plots,
                    shown_run, plan_rows, suggestion, build_this)


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


def _wire_form(form: _Form) -> None:
    """One source of truth: picking a preset or typing in the editor sets the form; the form rewrites the editor.
    `.input` fires on the visitor's own changes only, so one side updating the other never loops back."""
    usable, fields, components = form.usable, form.fields, form.components

    def form_updates(text: str) -> list[Any]:
        """The form as the editor's preset says (skips when the YAML is no preset yet, so typing is not undone)."""
        shown = form_from_preset(text, usable, fields)
        if shown is None:
            return [gr.skip()] * len(components)
        return [shown["model"] or gr.skip(), shown["threads"] if shown["threads"] else gr.skip(), shown["methods"],
                *shown["values"]]

    def load_preset_text(name: str) -> list[Any]:
        path = PRESETS_DIR / f"{name}.yaml"  # the picker lists presets/ only (preset_names)
        text = path.read_text() if path.is_file() else ""
        return [text, check_markdown(text), *form_updates(text)]

    def editor_changed(text: str) -> list[Any]:
        return [check_markdown(text), *form_updates(text)]

    def form_changed(text: str, model_value: str, threads_value: float | None, ticked: list[str], *values: Any) -> list[Any]:
        try:
            new = preset_with_form(text, model_value, ticked or [], threads_value, usable, fields, list(values))
        except yaml.YAMLError as exc:  # an option's YAML text is unfinished: the editor stays as it was
            return [gr.skip(), f"**Not applied:** an option's YAML does not parse ({gate_message(exc)})"]
        return [new, check_markdown(new)]

    def written_from_form(model_value: str, ticked: list[str], threads_value: float, *values: Any) -> tuple[str, str]:
        text = preset_from_form(model_value, ticked, threads_value, fields, list(values))
        return text, check_markdown(text)

    form.preset_pick.input(load_preset_text, form.preset_pick, [form.yaml_box, form.check, *components])
    form.yaml_box.input(editor_changed, form.yaml_box, [form.check, *components], trigger_mode="always_last",
                        show_progress="hidden")
    for component in components:
        component.input(form_changed, [form.yaml_box, *components], [form.yaml_box, form.check],
                        trigger_mode="always_last", show_progress="hidden")
    form.from_form.click(written_from_form, [form.model, form.methods, form.threads, *form.inputs],
                         [form.yaml_box, form.check])
    form.save.click(save_preset, [form.save_name, form.yaml_box], form.status, api_name="save_preset")


def _wire_run(form: _Form, out: _Outputs, session: gr.State, current_run: gr.State) -> None:
    """Run, cancel, plan, the budget's live greying, and the sensitivity suggestion of the run on the page."""
    # Many calls may wait at once: the run queue (runqueue.py) orders them and shows each its place.
    form.run.click(run_preset, [form.yaml_box, form.budget, session],
                   [form.status, out.progress, out.results, *out.plots, current_run, out.shown_run, out.progress_box,
                    out.results_box],
                   api_name="run_preset", concurrency_limit=None)
    form.cancel.click(cancel_run, session, form.status)
    out.plan_button.click(plan_outputs, [form.yaml_box, form.budget], [out.plan_box, out.plan_frame, out.plan_plot,
                                                                       out.plan_rows], api_name="plan_preset")
    form.budget.change(restyle_for_budget, [form.budget, out.shown_run, out.plan_rows],
                       [out.results, *out.plots, out.plan_frame, out.plan_plot], show_progress="hidden")

    def current(run_id: str | None, session_value: dict, request: gr.Request | None) -> dict | None:
        from workbench.ui.history import load_owned_run

        return load_owned_run(run_id, session_value, visitor_id(request)) if run_id else None

    def show_suggestion(run_id: str | None, session_value: dict, request: gr.Request) -> str:
        return suggestion_markdown(current(run_id, session_value, request))

    def build_suggested(text: str, run_id: str | None, session_value: dict, request: gr.Request) -> tuple[str, str]:
        return add_suggested_variant(text, current(run_id, session_value, request))

    # The run on the page (just run here, or opened in History) shows its suggestion; one click adds it to the editor.
    current_run.change(show_suggestion, [current_run, session], out.suggestion)
    out.build_this.click(build_suggested, [form.yaml_box, current_run, session], [form.yaml_box, form.status],
                         api_name="build_suggested")
