"""The one policy gate: every refusal of a parsed preset in a mode, before anything loads.

    reasons = refusals(preset, app_mode())          # [] means the preset may run here
    enforce(preset, cli_mode())                     # raises PolicyError (one line per reason)

Every entry point calls it: the app's Run, Plan and Save buttons and Chat's load, and the CLI's
`run`, `plan`, `sweep` and `reproduce`. It checks

- every field that names a file (the model, `eval.text`, calibration texts and any method option
  marked with `pathfield.path_field`) is resolved and lies in the allowed folders; in shared mode no
  local path is accepted at all (only the bundled model and hub ids), and a bundle's paths need
  `--allow-paths`;
- `trust_remote_code` and `allow_pickle` (refused in shared mode; a bundle's remote code needs
  `--trust-remote-code`);
- the caps of shared mode (environment variables, defaults in CAPS) on threads, eval tokens,
  calibration tokens, distillation time, lm-eval items, generated tokens, variants, model size and
  the planner's estimated total time;
- what each method refuses on the model's shape (`Method.refusals`, the shape read from config.json or
  GGUF metadata: a group size that does not divide a width, a budget below the smallest model), so a
  bad option costs a second instead of a calibration.

Caps are read when the mode is made, so a running app follows the environment it was started with.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from pydantic import BaseModel

from workbench.errors import PresetError, WorkbenchError
from workbench.pathfield import path_keywords

# name -> (environment variable, default in shared mode, what it limits). The README lists these.
CAPS: dict[str, tuple[str, float, str]] = {
    "threads": ("WORKBENCH_MAX_THREADS", float(os.cpu_count() or 1), "threads (never more than this machine's cores)"),
    "eval_tokens": ("WORKBENCH_MAX_EVAL_TOKENS", 4096, "eval.max_tokens and sensitivity.max_tokens"),
    "calibration_tokens": ("WORKBENCH_MAX_CALIBRATION_TOKENS", 8192,
                           "calibration samples x seq_len per stage (and structured's calibration_tokens)"),
    "distill_s": ("WORKBENCH_MAX_DISTILL_S", 300, "distill time_budget_s per stage"),
    "lm_eval_items": ("WORKBENCH_MAX_LMEVAL_ITEMS", 200, "lm_eval limit x tasks (limit: null is refused)"),
    "new_tokens": ("WORKBENCH_MAX_NEW_TOKENS", 256, "latency.new_tokens, latency.prompt_tokens and samples.new_tokens"),
    "repeats": ("WORKBENCH_MAX_REPEATS", 20, "latency.warmup + latency.repeats, and the number of sample prompts"),
    "variants": ("WORKBENCH_MAX_VARIANTS", 6, "variants in one run (16 when not shared)"),
    "params": ("WORKBENCH_MAX_PARAMS", 5e8, "model parameters, read from its config (1e11 when not shared)"),
    "plan_minutes": ("WORKBENCH_MAX_PLAN_MINUTES", 30, "the planner's estimated total time of the run, in minutes"),
}
LOCAL_CAPS = {"variants": 16, "params": 1e11}  # the app's limits when it is not shared


class PolicyError(PresetError):
    """One or more refusals; `reasons` holds one line each."""

    def __init__(self, reasons: list[str]):
        self.reasons = reasons
        super().__init__("; ".join(reasons))


@dataclass(frozen=True)
class Mode:
    """Where a preset is about to run, and what that place allows."""

    name: str  # shared | app | cli | bundle
    shared: bool = False
    allowed_dirs: tuple[Path, ...] | None = None  # None: any folder (your own CLI); (): no local path at all
    remote_code: bool = True  # may a preset turn trust_remote_code on
    pickle: bool = True  # may a preset turn allow_pickle on
    caps: dict[str, float] = field(default_factory=dict)
    path_hint: str = ""  # how to allow a refused path here

    def cap(self, name: str) -> float | None:
        return self.caps.get(name)


def shared_env() -> bool:
    return os.environ.get("WORKBENCH_SHARED") == "1"


def _read_caps(names: list[str], defaults: dict[str, float] | None = None) -> dict[str, float]:
    caps = {}
    for name in names:
        variable, default, _ = CAPS[name]
        raw = os.environ.get(variable)
        if raw is None or raw.strip() == "":
            caps[name] = (defaults or {}).get(name, default)
            continue
        try:
            caps[name] = float(raw)
        except ValueError:
            raise WorkbenchError(f"{variable}={raw!r} is not a number") from None
        if caps[name] <= 0:
            raise WorkbenchError(f"{variable}={raw!r} must be above 0")
    if "threads" in caps:  # a visitor never gets more threads than there are cores, whatever the variable says
        caps["threads"] = min(caps["threads"], float(os.cpu_count() or 1))
    return caps


def shared_mode() -> Mode:
    return Mode("shared", shared=True, allowed_dirs=(), remote_code=False, pickle=False, caps=_read_caps(list(CAPS)),
                path_hint="shared mode accepts only the bundled model, hub ids and the built-in texts")


def _allowed_dirs_env(default: tuple[Path, ...] | None) -> tuple[Path, ...] | None:
    allowed = os.environ.get("WORKBENCH_ALLOWED_DIRS")
    if not allowed:
        return default
    return tuple(Path(p).expanduser().resolve() for p in allowed.split(os.pathsep) if p)


def app_mode() -> Mode:
    """The browser app: shared when WORKBENCH_SHARED=1, else local files only inside WORKBENCH_ALLOWED_DIRS (default: cwd)."""
    if shared_env():
        return shared_mode()
    return Mode("app", allowed_dirs=_allowed_dirs_env((Path.cwd().resolve(),)),
                caps=_read_caps(["variants", "params"], LOCAL_CAPS), path_hint="set WORKBENCH_ALLOWED_DIRS to allow more")


def cli_mode() -> Mode:
    """The CLI on your own machine reads any file, unless WORKBENCH_ALLOWED_DIRS narrows it; shared mode as the app."""
    if shared_env():
        return shared_mode()
    return Mode("cli", allowed_dirs=_allowed_dirs_env(None), path_hint="set WORKBENCH_ALLOWED_DIRS to allow more")


def bundle_mode(allow_paths: bool, trust_remote_code: bool) -> Mode:
    """Someone else's bundle: its paths and remote code run only when asked for by flag (never in shared mode)."""
    if shared_env():
        return shared_mode()
    dirs = _allowed_dirs_env(None) if allow_paths else ()
    return Mode("bundle", allowed_dirs=dirs, remote_code=trust_remote_code,
                path_hint="pass --allow-paths if you trust the bundle")


# ---- the gate ------------------------------------------------------------------------------------------


def refusals(preset: Any, mode: Mode, estimate: bool = True) -> list[str]:
    """Every reason `preset` may not run in `mode`, one line each; [] when it may.

    The checks that read nothing come first; only when they all pass are the model's config (its
    size, widths) and, in shared mode, the planner's time estimate consulted, so a hostile preset
    never makes the server read a file or a model."""
    reasons = _path_refusals(preset, mode)
    if preset.trust_remote_code and not mode.remote_code:
        reasons.append("trust_remote_code: true is refused " + (
            "in shared mode (it would run code from the hub on this server)" if mode.shared
            else "for a bundle from elsewhere; pass --trust-remote-code if you trust the model's code"))
    if preset.allow_pickle and not mode.pickle:
        reasons.append("allow_pickle: true is refused in shared mode (pickled weights can run code when loaded)")
    reasons += _cap_refusals(preset, mode)
    if reasons or not estimate:
        return reasons
    return _model_refusals(preset, mode)


def enforce(preset: Any, mode: Mode, estimate: bool = True) -> None:
    reasons = refusals(preset, mode, estimate)
    if reasons:
        raise PolicyError(reasons)


def path_fields(preset: Any) -> Iterator[tuple[str, str]]:
    """(where, value) of every file-naming field in the preset that holds a path rather than a keyword."""
    from workbench.methods.registry import get_method, method_names

    from workbench.data.sources import classify_model

    if classify_model(preset.model).is_local:
        yield "model", preset.model
    yield from _marked(preset.eval, "", "eval.")
    for variant in preset.variants:
        for index, stage in enumerate(variant.stages()):
            if stage.method not in method_names():
                continue  # parse_preset has refused it already
            where = f"variant '{variant.name}'" + (f" stage {index + 1}" if variant.pipeline else "") + f" ({stage.method})"
            options = get_method(stage.method).Options.model_validate(stage.options)
            yield from _marked(options, where)


def _marked(model: BaseModel, where: str, prefix: str = "") -> Iterator[tuple[str, str]]:
    """Walk a validated options model (nested models and lists of them too) for path-marked fields."""
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        keywords = path_keywords(info)
        if keywords is not None:
            if isinstance(value, str) and value not in keywords:
                yield f"{where} {prefix}{name}".strip(), value
        elif isinstance(value, BaseModel):
            yield from _marked(value, where, f"{prefix}{name}.")
        elif isinstance(value, list):
            for index, item in enumerate(value):
                if isinstance(item, BaseModel):
                    yield from _marked(item, where, f"{prefix}{name}[{index}].")


def _path_refusals(preset: Any, mode: Mode) -> list[str]:
    reasons = []
    for where, value in path_fields(preset):
        if mode.allowed_dirs is None:
            continue
        if not mode.allowed_dirs:
            reasons.append(f"{where}: local path {value} is refused ({mode.path_hint})" if not mode.shared else
                           f"{where}: local paths are disabled in shared mode ({value}); {mode.path_hint}")
            continue
        try:
            resolved = Path(value).expanduser().resolve()  # symlinks and '..' resolved: where it really points
        except (OSError, RuntimeError) as exc:
            reasons.append(f"{where}: path {value} cannot be resolved ({exc})")
            continue
        if not any(resolved == d or d in resolved.parents for d in mode.allowed_dirs):
            reasons.append(f"{where}: path {value} is outside the allowed folders "
                           f"({', '.join(map(str, mode.allowed_dirs))}); {mode.path_hint}")
    return reasons


def _over(value: float, cap: float | None) -> bool:
    return cap is not None and value > cap


def _cap_text(name: str, cap: float) -> str:
    return f"{cap:g} ({CAPS[name][0]})"


def _cap_refusals(preset: Any, mode: Mode) -> list[str]:
    c = mode.cap
    reasons = []
    if _over(preset.threads, c("threads")):
        reasons.append(f"threads: {preset.threads} is above the cap of {_cap_text('threads', c('threads'))}")
    for where, value in (("eval.max_tokens", preset.eval.max_tokens),
                         ("sensitivity.max_tokens", preset.sensitivity.max_tokens if preset.sensitivity else 0)):
        if _over(value, c("eval_tokens")):
            reasons.append(f"{where}: {value} tokens is above the cap of {_cap_text('eval_tokens', c('eval_tokens'))}")
    for where, value in (("latency.new_tokens", preset.latency.new_tokens), ("latency.prompt_tokens", preset.latency.prompt_tokens),
                         ("samples.new_tokens", preset.samples.new_tokens)):
        if _over(value, c("new_tokens")):
            reasons.append(f"{where}: {value} is above the cap of {_cap_text('new_tokens', c('new_tokens'))}")
    for where, value in (("latency.warmup + latency.repeats", preset.latency.warmup + preset.latency.repeats),
                         ("samples.prompts", len(preset.samples.prompts))):
        if _over(value, c("repeats")):
            reasons.append(f"{where}: {value} is above the cap of {_cap_text('repeats', c('repeats'))}")
    if preset.lm_eval is not None and c("lm_eval_items") is not None:
        if preset.lm_eval.limit is None:
            reasons.append(f"lm_eval.limit: null (every item) is refused here; give a limit, at most "
                           f"{_cap_text('lm_eval_items', c('lm_eval_items'))} items over all tasks")
        elif _over(preset.lm_eval.limit * len(preset.lm_eval.tasks), c("lm_eval_items")):
            reasons.append(f"lm_eval: {preset.lm_eval.limit} items x {len(preset.lm_eval.tasks)} task(s) is above the cap "
                           f"of {_cap_text('lm_eval_items', c('lm_eval_items'))}")
    if _over(len(preset.variants), c("variants")):
        reasons.append(f"variants: {len(preset.variants)} is above the cap of {_cap_text('variants', c('variants'))}")
    for variant in preset.variants:
        for stage in variant.stages():
            reasons += _stage_caps(variant.name, stage.method, stage.options, mode)
    return reasons


def _stage_caps(name: str, method: str, options: dict[str, Any], mode: Mode) -> list[str]:
    from workbench.methods.registry import get_method, method_names

    if method not in method_names():
        return []
    parsed = get_method(method).Options.model_validate(options)
    reasons = []
    calibration = getattr(parsed, "calibration", None)
    cap = mode.cap("calibration_tokens")
    if calibration is not None and _over(calibration.samples * calibration.seq_len, cap):
        reasons.append(f"variant '{name}' ({method}) calibration: {calibration.samples} samples x {calibration.seq_len} "
                       f"tokens = {calibration.samples * calibration.seq_len} is above the cap of "
                       f"{_cap_text('calibration_tokens', cap)}")  # type: ignore[arg-type]
    if _over(getattr(parsed, "calibration_tokens", 0), cap):
        reasons.append(f"variant '{name}' ({method}) calibration_tokens: {parsed.calibration_tokens} is above the cap of "
                       f"{_cap_text('calibration_tokens', cap)}")  # type: ignore[arg-type, attr-defined]
    if method == "distill":
        budget = mode.cap("distill_s")
        if _over(parsed.time_budget_s, budget):  # type: ignore[attr-defined]
            reasons.append(f"variant '{name}' (distill) time_budget_s: {parsed.time_budget_s:g} s is above the cap of "  # type: ignore[attr-defined]
                           f"{_cap_text('distill_s', budget)}")  # type: ignore[arg-type]
        if _over(parsed.seq_len * parsed.batch_size, cap):  # type: ignore[attr-defined]
            reasons.append(f"variant '{name}' (distill) seq_len x batch_size = {parsed.seq_len * parsed.batch_size} "  # type: ignore[attr-defined]
                           f"is above the cap of {_cap_text('calibration_tokens', cap)}")  # type: ignore[arg-type]
    return reasons


def _model_refusals(preset: Any, mode: Mode) -> list[str]:
    """Checks that read the model's config (never its weights): size cap, group sizes, the planner's time."""
    from workbench.planning.modelshape import ShapeError, read_shape

    try:
        shape, _info = read_shape(preset.model, preset.trust_remote_code)
    except ShapeError as exc:
        if mode.shared or mode.cap("params") is not None:
            return [f"model: {exc}; the size cap cannot be checked, so it is refused here"]
        return []  # the run itself will say what is wrong with the model
    except WorkbenchError as exc:
        return [f"model: {exc}"]
    reasons = shape_refusals(preset, shape)
    params = shape.params()
    if _over(params, mode.cap("params")):
        reasons.append(f"model: {preset.model} has about {_count(params)} parameters; this app allows at most "
                       f"{_count(mode.cap('params'))} (WORKBENCH_MAX_PARAMS)")  # type: ignore[arg-type]
    if reasons or mode.cap("plan_minutes") is None:
        return reasons
    from workbench.planning.planner import plan_preset_file

    try:
        plans, _context = plan_preset_file(preset, emit=lambda _m: None)
    except WorkbenchError as exc:
        return [f"the run's time cannot be estimated ({exc}), so it is refused here"]
    times = [p.time_s for p in plans]
    if any(t is None for t in times):
        return ["the run's time cannot be estimated on this machine, so it is refused here"]
    minutes = sum(times) / 60  # type: ignore[arg-type]
    if _over(minutes, mode.cap("plan_minutes")):
        reasons.append(f"the planner estimates {minutes:.1f} min for this run, above the cap of "
                       f"{_cap_text('plan_minutes', mode.cap('plan_minutes'))}; "  # type: ignore[arg-type]
                       "fewer variants or eval tokens would fit")
    return reasons


def shape_refusals(preset: Any, shape: Any) -> list[str]:
    """What each stage's method refuses on a model of this shape (`Method.refusals`), one line per reason.

    Every stage sees its own input: the config's shape passed through the earlier stages' `reshape`."""
    from workbench.methods.base import DTYPE_BYTES, ShapeCheck
    from workbench.planning.weightsize import stage_methods

    reasons = []
    for variant in preset.variants:
        try:
            pairs = stage_methods([s.model_dump() for s in variant.stages()])
        except ValueError:  # invalid options: the preset check says which
            continue
        current, rest = shape, shape.dtype if shape.dtype in DTYPE_BYTES else "float32"
        for index, (method, options) in enumerate(pairs):
            check = ShapeCheck(model=preset.model, shape=current, rest=rest, last=index == len(pairs) - 1)
            reasons += [f"variant '{variant.name}' ({method.name}): {reason}" for reason in method.refusals(options, check)]
            current, rest = method.reshape(current, rest, options)
    return reasons


def _count(n: float) -> str:
    return f"{n / 1e9:.1f} B" if n >= 1e9 else f"{n / 1e6:.0f} M" if n >= 1e6 else f"{n:,.0f}"


def caps_table() -> list[tuple[str, str, str]]:
    """(variable, shared-mode default, what it limits) for the README and `--help` texts."""
    return [(variable, f"{default:g}", what) for variable, default, what in CAPS.values()]
