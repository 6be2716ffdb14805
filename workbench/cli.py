"""The `python -m workbench` command line.

Exit codes of `run`: 0 every variant ok, 1 some variant failed or was cancelled, 2 bad preset or arguments.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from workbench.errors import WorkbenchError


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on bad arguments, 0 on --help
        return int(exc.code or 0)
    try:
        return {"run": cmd_run, "list-methods": cmd_list_methods, "history": cmd_history, "export": cmd_export,
                "bundle": cmd_bundle, "plan": cmd_plan, "selfcheck": cmd_selfcheck,
                "reproduce": cmd_reproduce, "sweep": cmd_sweep, "export-model": cmd_export_model}[args.command](args)
    except WorkbenchError as exc:
        from workbench.config.policy import PolicyError

        for reason in exc.reasons if isinstance(exc, PolicyError) else [str(exc)]:  # one line per reason
            print(f"error: {reason}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    """Every subcommand with its arguments, in the order `--help` lists them."""
    parser = argparse.ArgumentParser(prog="python -m workbench", description="Squeeze Bench: compare compressed LLM variants.")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_run_parsers(commands)
    _add_record_parsers(commands)
    _add_check_parsers(commands)
    _add_export_parsers(commands)
    return parser


def _add_run_parsers(commands) -> None:
    """`run` and `sweep`: presets that build and measure variants."""
    run = commands.add_parser("run", help="build and measure every variant of a preset")
    run.add_argument("preset", help="path to a preset YAML file (see presets/)")
    run.add_argument("--out", type=Path, help="output folder (default: $WORKBENCH_HOME/runs/RUN_ID)")
    run.add_argument("--only", help="comma-separated variant names to run (the baseline is always kept)")
    fresh_or_reused = run.add_mutually_exclusive_group()  # argparse refuses both together (exit 2)
    fresh_or_reused.add_argument("--no-cache", action="store_true",
                                 help="rebuild artifacts and measure every figure again, even when nothing changed")
    fresh_or_reused.add_argument("--reuse-speed", action="store_true",
                                 help="also reuse stored speed figures of unchanged variants (by default only their "
                                      "quality figures are reused and speed is timed again)")
    run.add_argument("--trust-remote-code", action="store_true", help="allow model code shipped with the weights")
    run.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                     help="run the variants as Ray tasks: auto, local, ray://HOST:PORT or HOST:PORT (docs/scale-out.md)")
    run.add_argument("--ray-retries", type=int, default=2, help="Ray retries of a task whose node was lost (default 2)")

    sweep = commands.add_parser("sweep", help="several presets (x models), each its own run; concurrent on Ray")
    sweep.add_argument("presets", nargs="+", help="preset YAML files")
    sweep.add_argument("--models", help="comma-separated models; every preset runs once per model")
    sweep.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                       help="auto, local, ray://HOST:PORT or HOST:PORT; without it the runs go one after another here")
    sweep.add_argument("--ray-retries", type=int, default=2, help="Ray retries of a task whose node was lost (default 2)")
    sweep.add_argument("--trust-remote-code", action="store_true", help="allow model code shipped with the weights")


def _add_record_parsers(commands) -> None:
    """The methods and the stored runs: `list-methods`, `history`, `bundle`, `reproduce`."""
    commands.add_parser("list-methods", help="methods with their options, defaults and help")
    commands.add_parser("history", help="runs stored in the history database")

    bundle = commands.add_parser("bundle", help="pack a stored run into a reproducibility bundle (zip)")
    bundle.add_argument("run_id")
    bundle.add_argument("--out", type=Path, required=True, help="the .zip file to write")

    reproduce = commands.add_parser("reproduce", help="rerun a bundle here and compare every figure")
    reproduce.add_argument("bundle", type=Path)
    reproduce.add_argument("--allow-paths", action="store_true",
                           help="let the bundle's preset read local files (model, eval or calibration text, GGUF paths)")
    reproduce.add_argument("--trust-remote-code", action="store_true",
                           help="let the bundle's model run code shipped with its weights")


def _add_check_parsers(commands) -> None:
    """Checks before and beside a run: `plan` (estimates) and `selfcheck` (reference figures)."""
    plan = commands.add_parser("plan", help="estimate each variant's weight memory and time before anything loads")
    plan.add_argument("preset", help="path to a preset YAML file")
    plan.add_argument("--memory-budget-gb", type=float, help="flag variants whose estimated peak memory exceeds this "
                                                             "(default: the preset's memory_budget_gb)")
    plan.add_argument("--recalibrate", action="store_true", help="measure this machine's bandwidth and matmul speed again")
    plan.add_argument("--trust-remote-code", action="store_true", help="allow model code shipped with the weights")

    selfcheck = commands.add_parser("selfcheck", help="recompute reference figures by independent code paths")
    selfcheck.add_argument("--tokens", type=int, default=1024, help="eval tokens scored (a prefix of the pydoc text)")
    selfcheck.add_argument("--model", help="check this model (hub id, HF folder or .gguf file) instead of the bundled one")
    selfcheck.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code to run")
    selfcheck.add_argument("--full", action="store_true",
                           help="also run the gpt2-large WikiText-2 check on a CPU (hours; it runs on a GPU anyway)")


def _add_export_parsers(commands) -> None:
    """`export` (a stored run's tables and report) and `export-model` (a variant's weights)."""
    export = commands.add_parser("export", help="export a stored run")
    export.add_argument("run_id")
    export.add_argument("--csv", type=Path, help="write one row per variant to this CSV file")
    export.add_argument("--json", type=Path, help="write the whole run document to this JSON file")
    export.add_argument("--markdown", type=Path, help="write the summary table and protocol as Markdown")
    export.add_argument("--html", type=Path, help="write a standalone HTML report (charts embedded, opens offline)")

    export_model = commands.add_parser("export-model", help="save a torch variant of a stored run as safetensors shards")
    export_model.add_argument("run_id")
    export_model.add_argument("variant")
    export_model.add_argument("--out", type=Path, required=True, help="an empty or new folder")
    export_model.add_argument("--max-shard-size", default="200MB", help="largest shard, e.g. 200MB, 1GB (default 200MB)")


def _gate(preset):
    """The policy gate every CLI entry point passes (policy.py); shared mode when WORKBENCH_SHARED=1."""
    from workbench.config.policy import cli_mode, enforce

    enforce(preset, cli_mode())
    return preset


def _output_folder(out: Path) -> None:
    """--out must be a folder this process can create and write, said in one line before anything runs."""
    if out.exists() and not out.is_dir():
        raise WorkbenchError(f"--out {out} is a file; give a folder (new or existing) for the run's outputs")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise WorkbenchError(f"--out {out} cannot be written ({exc.strerror or type(exc).__name__}); "
                             "choose a folder you can write to") from None


def _output_file(path: Path, flag: str) -> None:
    """An export target: its folder must exist and the path must not be a folder."""
    if path.is_dir():
        raise WorkbenchError(f"{flag} {path} is a folder; give a file name")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise WorkbenchError(f"{flag} {path}: the folder {parent} does not exist; create it first or choose another")


def cmd_run(args: argparse.Namespace) -> int:
    from workbench.config.presets import load_preset, select_variants

    preset = load_preset(args.preset)
    if args.only:
        preset = select_variants(preset, [n.strip() for n in args.only.split(",") if n.strip()])
    if args.trust_remote_code:
        preset = preset.model_copy(update={"trust_remote_code": True})
    _gate(preset)
    if args.out is not None:
        _output_folder(args.out)
    if preset.device == "cuda":  # said here, before the progress bar and the preparing worker start
        from workbench.runtimes.torch import pick_device

        pick_device("cuda")

    from tqdm import tqdm

    from workbench.running.runner import Runner

    address = args.ray if args.ray is not None else preset.ray
    if address is not None and args.out is not None and not args.out.is_absolute():
        raise WorkbenchError(f"--out {args.out} is relative; Ray tasks need an absolute path (a shared one on a cluster)")
    executor_for, started_ray = _ray_executor(address, [preset], args.ray_retries)
    bar = tqdm(total=len(preset.variants), unit="variant", dynamic_ncols=True)

    def show(event) -> None:
        label = f"{event.variant}: {event.phase}" if event.variant else event.phase
        bar.set_description_str(f"{label} - {event.message}"[:90])
        if event.variant and event.phase in ("ok", "failed", "cancelled"):
            bar.update(1)
            bar.write(f"{event.variant}: {event.phase}: {event.message}")  # each variant's figures as it finishes

    runner = Runner(preset, out_dir=args.out, use_cache=not args.no_cache, reuse_speed=args.reuse_speed, on_event=show,
                    executor=executor_for(preset) if executor_for else None)
    # Ctrl-C cancels: the worker in flight is stopped, the rest are recorded as cancelled and stored.
    previous = signal.signal(signal.SIGINT, lambda *_: runner.cancel())
    try:
        result = runner.run()
    finally:
        signal.signal(signal.SIGINT, previous)
        bar.close()
        if started_ray:
            from workbench.running.scaleout import shutdown

            shutdown()
    print(run_report_text(result))
    print(f"run {result['run_id']}: results in {runner.out_dir / 'results.json'}")
    return 0 if result["status"] == "ok" else 1


def run_report_text(result: dict) -> str:
    """What `run` prints after the progress lines: the table, then every note on how to read it."""
    from workbench.analysis.robustness import calibration_groups, robustness_text
    from workbench.data.validity import flags_text
    from workbench.planning.planner import estimate_vs_actual
    from workbench.planning.roofline import roofline_text
    from workbench.views.report import budget_verdict, format_table, protocol_summary, sensitivity_text, speed_note

    groups = calibration_groups(result)
    parts = [f"note: {result['model']['note']}" if result["model"].get("note") else None, format_table(result),
             flags_text(result), budget_verdict(result), protocol_summary(result), speed_note(result),
             roofline_text(result), estimate_vs_actual(result),
             sensitivity_text(result["sensitivity"]) if result.get("sensitivity") else None,
             robustness_text(groups) if groups else None]
    return "\n".join(part for part in parts if part)


def _ray_executor(address: str | None, presets: list, retries: int):
    """(executor factory per preset, whether Ray was started here) for --ray / a preset's `ray:`; (None, False) without."""
    if address is None:
        named = sorted({p.ray for p in presets if p.ray})
        if len(named) > 1:
            raise WorkbenchError(f"the presets name different Ray clusters ({', '.join(named)}); choose one with --ray")
        address = named[0] if named else None
    if address is None:
        return None, False
    if retries < 0:
        raise WorkbenchError("--ray-retries must be 0 or more")
    from workbench.running import scaleout

    scaleout.task_environment()  # refuses a relative WORKBENCH_HOME before connecting
    started = scaleout.connect(address)
    return (lambda preset: scaleout.RayExecutor.for_preset(preset, max_retries=retries)), started


def cmd_sweep(args: argparse.Namespace) -> int:
    import threading

    from workbench.config.presets import load_preset
    from workbench.running.sweep import expand, run_sweep, summary_table

    presets = [load_preset(path) for path in args.presets]
    if args.trust_remote_code:
        presets = [p.model_copy(update={"trust_remote_code": True}) for p in presets]
    models = None
    if args.models is not None:
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        if not models:
            raise WorkbenchError("--models needs at least one model, e.g. --models bundled:smollm2-135m-instruct,gpt2")
    presets = [_gate(p) for p in expand(presets, models)]
    executor_for, started_ray = _ray_executor(args.ray, presets, args.ray_retries)
    lock = threading.Lock()

    def show(item, event) -> None:
        if event.variant and event.phase in ("ok", "failed", "cancelled"):
            line = f"{event.variant}: {event.phase}" + (f": {event.message}" if event.phase != "ok" else "")
        elif event.message.startswith("running on ") or (event.variant is None and event.phase == "done"):
            line = f"{event.variant}: {event.phase}: {event.message}" if event.variant else event.message
        else:
            return
        with lock:
            print(f"[{item.label}] {line}", flush=True)

    cancel = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: cancel.set())  # Ctrl-C cancels every run, keeps what was measured
    print(f"sweep: {len(presets)} run(s)" + (" on Ray" if executor_for else " one after another on this machine"), flush=True)
    try:
        runs = run_sweep(presets, executor_for, on_event=show, cancel=cancel)
    finally:
        signal.signal(signal.SIGINT, previous)
        if started_ray:
            from workbench.running.scaleout import shutdown

            shutdown()
    print(summary_table(runs))
    return 0 if all(item.status == "ok" for item in runs) else 1


def cmd_plan(args: argparse.Namespace) -> int:
    from workbench.planning.planner import plan_preset_file, plan_text
    from workbench.config.presets import load_preset

    preset = load_preset(args.preset)
    if args.trust_remote_code:
        preset = preset.model_copy(update={"trust_remote_code": True})
    _gate(preset)
    plans, context = plan_preset_file(preset, recalibrate=args.recalibrate, emit=lambda m: print(m, file=sys.stderr))
    budget = args.memory_budget_gb or preset.memory_budget_gb
    print(plan_text(preset, plans, context, budget))
    return 0


def cmd_selfcheck(args: argparse.Namespace) -> int:
    from workbench.selfcheck import run_selfcheck

    checks = run_selfcheck(tokens=args.tokens, full=args.full, emit=lambda m: print(m, file=sys.stderr), model=args.model,
                           trust_remote_code=args.trust_remote_code)
    for check in checks:
        print(check.line())
    failed = [c for c in checks if c.status == "FAIL"]
    print(f"{sum(c.status == 'pass' for c in checks)} passed, {len(failed)} failed, "
          f"{sum(c.status == 'skipped' for c in checks)} skipped")
    return 1 if failed else 0


def cmd_list_methods(_args: argparse.Namespace) -> int:
    from workbench.methods.registry import get_method, method_names

    for name in method_names():
        method = get_method(name)
        label = "real-kernel if measured faster, else no-speedup" if method.honesty_from_speed else method.honesty
        print(f"{name}  [{label}]  {method.summary}")
        for field_name, field in method.Options.model_fields.items():
            given = "required" if field.is_required() else f"default: {field.get_default(call_default_factory=True)!r}"
            print(f"    {field_name} ({given}): {field.description}")
    return 0


def cmd_history(_args: argparse.Namespace) -> int:
    from workbench.data.store import History

    history = History()
    runs = history.runs()
    if not runs:
        print(f"no runs stored yet in {history.path}")
        return 0
    for run in runs:
        print(f"{run['run_id']}  {run['created_at']}  {run['name']:<16} {run['status']:<9} "
              f"{run['ok'] or 0}/{run['variants']} ok  {run['model']}")
    return 0


def _stored_run(run_id: str) -> dict:
    from workbench.data.store import History

    run = History().load_run(run_id)
    if run is None:
        raise WorkbenchError(f"no run '{run_id}' in the history (see python -m workbench history)")
    return run


def cmd_bundle(args: argparse.Namespace) -> int:
    from workbench.views.bundle import write_bundle

    run = _stored_run(args.run_id)
    write_bundle(run, Path(run["out_dir"]), args.out)
    print(f"wrote {args.out}")
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from workbench.views.bundle import reproduce

    if not args.bundle.is_file():
        raise WorkbenchError(f"bundle {args.bundle} does not exist")
    comparisons, notes = reproduce(args.bundle, allow_paths=args.allow_paths, trust_remote_code=args.trust_remote_code,
                                   show=print)
    for note in notes:
        print(f"note: {note}")
    print(f"{'variant':<14} {'metric':<16} {'original':>14} {'new':>14} {'tolerance':>10}  result")
    for row in comparisons:
        original = "—" if row.original is None else f"{row.original:.6g}"
        new = "—" if row.new is None else f"{row.new:.6g}"
        print(f"{row.variant:<14} {row.metric:<16} {original:>14} {new:>14} {row.tolerance:>10.0e}  "
              f"{'ok' if row.ok else 'DIFFERS'}")
    failed = [row for row in comparisons if not row.ok]
    print(f"{len(comparisons) - len(failed)} of {len(comparisons)} figures within tolerance")
    return 0 if not failed else 1


def cmd_export(args: argparse.Namespace) -> int:
    from workbench.views.report import export_csv, export_html, export_json, markdown_table, protocol_summary

    if not (args.csv or args.json or args.markdown or args.html):
        raise WorkbenchError("export needs --csv, --json, --markdown and/or --html FILE")
    targets = [(args.csv, "--csv"), (args.json, "--json"), (args.html, "--html"), (args.markdown, "--markdown")]
    for path, flag in targets:
        if path is not None:
            _output_file(path, flag)
    run = _stored_run(args.run_id)
    if args.csv:
        export_csv(run, args.csv)
        print(f"wrote {args.csv}")
    if args.json:
        export_json(run, args.json)
        print(f"wrote {args.json}")
    if args.html:
        export_html(run, args.html)
        print(f"wrote {args.html}")
    if args.markdown:
        args.markdown.write_text(markdown_table(run) + "\n\n" + protocol_summary(run) + "\n")
        print(f"wrote {args.markdown}")
    return 0


def cmd_export_model(args: argparse.Namespace) -> int:
    from workbench.views.export_model import export_model

    summary = export_model(_stored_run(args.run_id), args.variant, args.out, args.max_shard_size)
    print(f"wrote {len(summary['shards'])} safetensors shard(s) to {summary['out_dir']}"
          + (f" with {summary['index']} ({summary['total_size']} bytes of tensors)" if summary["index"] else ""))
    return 0

