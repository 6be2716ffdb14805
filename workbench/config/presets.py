"""The preset schema (docs/architecture.md §5): pydantic models with extra="forbid", loaded from YAML.

A preset names one model, the measurement protocol and the variants to build. Every method name
and every option is checked against the method registry before anything heavy loads, so a typo
costs a second, not a model conversion.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from workbench.errors import PresetError
from workbench.pathfield import path_field

DEFAULT_SAMPLE_PROMPTS = (
    "What is the capital of France?",
    "Write a Python function that returns the square of a number.",
    "Explain in one sentence why the sky is blue.",
)


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EvalSpec(StrictModel):
    text: str = path_field(
        "pydoc", keywords=("pydoc", "wikitext2"),
        description="'pydoc' (English prose shipped with Python, offline), 'wikitext2' (needs a hub), "
        "or a path to a UTF-8 text file.",
    )
    max_tokens: int = Field(4096, gt=0, description="Tokens of evaluation text scored (truncated to this).")
    context: int = Field(512, gt=1, description="Window length in tokens for perplexity and KLD.")
    stride: int = Field(512, gt=0, description="Step between windows; < context overlaps windows.")
    bos: bool | None = Field(
        None,
        description="Start every window, latency prompt and lm-eval request with BOS. Unset: as the model's metadata "
        "says (GGUF tokenizer.ggml.add_bos_token, or whether the tokenizer adds BOS), as llama.cpp's perplexity does.",
    )

    @model_validator(mode="after")
    def _stride_fits(self) -> "EvalSpec":
        if self.stride > self.context:
            raise ValueError(f"eval.stride ({self.stride}) must not exceed eval.context ({self.context})")
        return self


class LatencySpec(StrictModel):
    prompt_tokens: int = Field(128, gt=0, description="Prompt length for the prefill measurement.")
    new_tokens: int = Field(32, ge=2, description="Tokens generated per repeat (greedy, EOS ignored).")
    warmup: int = Field(2, ge=0, description="Untimed repeats before measuring.")
    repeats: int = Field(5, gt=0, description="Minimum timed repeats; medians, min, max and 95 % intervals are reported.")
    target_ci: float | None = Field(0.05, gt=0, description="Repeat until both 95 % intervals (decode, TTFT) lie within "
                                    "+- this fraction of their medians (from 6 repeats on); null: exactly `repeats`.")
    max_seconds: float = Field(60.0, gt=0, description="Stop repeating once this many seconds of timing (warm-up "
                                                       "included) are spent, interval reached or not.")
    max_repeats: int = Field(500, gt=0, description="Stop repeating after this many timed repeats.")
    pin_threads: bool = Field(True, description="Pin the measuring worker's threads to a fixed set of cores.")
    interleave: bool | None = Field(None, description="After the run, time all variants again round-robin in one "
                                    "worker and report paired ratios to the baseline; null: when they fit in memory "
                                    "together, false: never (workbench/running/speedpass.py).")


class SamplesSpec(StrictModel):
    prompts: list[str] = Field(default_factory=lambda: list(DEFAULT_SAMPLE_PROMPTS))
    new_tokens: int = Field(48, gt=0, description="Greedy tokens per sample (stops early at EOS).")


class LmEvalSpec(StrictModel):
    tasks: list[str] = Field(min_length=1, description="lm-eval task names: local ones offline (pydoc_lastword), hub ones online.")
    limit: int | None = Field(100, gt=0, description="Items per task (None: all).")
    batch_size: int = Field(8, gt=0, description="Requests per forward pass.")


class SensitivitySpec(StrictModel):
    variant: str = Field(description="The compressed variant whose blocks are swapped in one at a time.")
    max_tokens: int = Field(1024, gt=1, description="Eval tokens used per block (a prefix of the run's).")
    keep: int = Field(2, ge=0, description="How many most sensitive blocks the suggested mixed-precision variant keeps.")


class Stage(StrictModel):
    method: str
    options: dict[str, Any] = Field(default_factory=dict)


class VariantSpec(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    method: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    pipeline: list[Stage] | None = None

    @model_validator(mode="after")
    def _method_or_pipeline(self) -> "VariantSpec":
        if (self.method is None) == (self.pipeline is None):
            raise ValueError(f"variant '{self.name}' needs exactly one of 'method' or 'pipeline'")
        if self.pipeline is not None and (self.options or not self.pipeline):
            raise ValueError(f"variant '{self.name}': a pipeline takes options per stage and at least one stage")
        return self

    def stages(self) -> list[Stage]:
        """The variant as a list of stages; a single method is a one-stage pipeline."""
        if self.pipeline is not None:
            return list(self.pipeline)
        return [Stage(method=self.method or "", options=self.options)]


class Preset(StrictModel):
    name: str
    model: str = Field(description="bundled:smollm2-135m-instruct, a hub id, a local HF folder or a .gguf path.")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = Field(default_factory=lambda: os.cpu_count() or 1, gt=0, description="CPU threads, pinned.")
    trust_remote_code: bool = Field(False, description="Run code shipped with the model (off unless you trust it).")
    allow_pickle: bool = Field(False, description="A local model folder may load pickled .bin weights (they can run "
                                                  "code when loaded); refused in shared mode. Otherwise safetensors only.")
    ray: str | None = Field(None, description="Run the variants as Ray tasks: auto (a running cluster), local, "
                            "ray://HOST:PORT or HOST:PORT; the CLI's --ray overrides it (docs/scale-out.md).")
    eval: EvalSpec = Field(default_factory=EvalSpec)
    latency: LatencySpec = Field(default_factory=LatencySpec)
    samples: SamplesSpec = Field(default_factory=SamplesSpec)
    lm_eval: LmEvalSpec | None = Field(None, description="Downstream tasks through lm-eval-harness, per variant.")
    sensitivity: SensitivitySpec | None = Field(None, description="Per-block KLD of one variant's compression.")
    memory_budget_gb: float | None = Field(None, gt=0, description="Warn (plan and run) about variants whose "
                                                                   "estimated peak memory exceeds this many GB.")
    baseline: str
    variants: list[VariantSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _names_and_baseline(self) -> "Preset":
        names = [v.name for v in self.variants]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate variant names: {', '.join(duplicates)} (each variant needs its own name)")
        if self.baseline not in names:
            raise ValueError(f"baseline '{self.baseline}' is not among the variants ({', '.join(names)})")
        if self.sensitivity and self.sensitivity.variant not in names:
            raise ValueError(f"sensitivity.variant '{self.sensitivity.variant}' is not among the variants ({', '.join(names)})")
        return self

    def variant(self, name: str) -> VariantSpec:
        return next(v for v in self.variants if v.name == name)


def parse_preset(data: Any, origin: str = "preset") -> Preset:
    """Validate a preset dict; raise PresetError with one readable line per problem."""
    if not isinstance(data, dict):
        raise PresetError(f"{origin}: a preset is a YAML mapping, got {type(data).__name__}")
    try:
        preset = Preset.model_validate(data)
    except ValidationError as exc:
        raise PresetError(f"{origin}: " + "; ".join(_describe(e, Preset) for e in exc.errors())) from None
    check_methods(preset, origin)
    check_lm_eval_tasks(preset, origin)
    return preset


def load_preset(path: str | Path) -> Preset:
    path = Path(path)
    if not path.is_file():
        raise PresetError(f"preset file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise PresetError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None  # one line
    return parse_preset(data, str(path))


def dump_preset(preset: Preset) -> str:
    return yaml.safe_dump(_without_default_nulls(preset, preset.model_dump(mode="json")), sort_keys=False)


def _without_default_nulls(model: BaseModel, data: dict[str, Any]) -> dict[str, Any]:
    """`data` (the model's dump) without the nulls that are the field's default: short YAML, and a null that is a
    choice (latency.target_ci: null means "exactly `repeats`", against a default of 0.05) survives the round trip."""
    kept: dict[str, Any] = {}
    for name, value in data.items():
        field = type(model).model_fields.get(name)
        if value is None and (field is None or field.default is None):
            continue
        attribute = getattr(model, name, None)
        if isinstance(attribute, BaseModel) and isinstance(value, dict):
            value = _without_default_nulls(attribute, value)
        elif isinstance(attribute, list) and isinstance(value, list):
            value = [_without_default_nulls(a, v) if isinstance(a, BaseModel) and isinstance(v, dict) else v
                     for a, v in zip(attribute, value)]
        kept[name] = value
    return kept


def check_methods(preset: Preset, origin: str = "preset") -> None:
    """Every stage names a registered method, and its options validate against that method's model."""
    from workbench.methods.registry import get_method, method_names

    problems = []
    for variant in preset.variants:
        for stage in variant.stages():
            if stage.method not in method_names():
                problems.append(f"variant '{variant.name}': unknown method '{stage.method}'" + _suggest(stage.method, method_names()))
                continue
            options_model = get_method(stage.method).Options
            try:
                options_model.model_validate(stage.options)
            except ValidationError as exc:
                details = "; ".join(_describe(e, options_model) for e in exc.errors())
                problems.append(f"variant '{variant.name}' ({stage.method}): {details}")
        problems += _pipeline_problems(variant)
    if problems:
        raise PresetError(f"{origin}: " + "; ".join(problems))


def _pipeline_problems(variant: VariantSpec) -> list[str]:
    """Each stage must take what the stage before it produces (the source is a plain HF folder)."""
    from workbench.methods.registry import get_method, method_names

    stages = [s for s in variant.stages() if s.method in method_names()]
    problems = []
    for before, after in zip(stages, stages[1:]):
        produced, method = get_method(before.method).produces, get_method(after.method)
        if produced not in method.accepts:
            takers = sorted(n for n in method_names() if produced in get_method(n).accepts)
            problems.append(
                f"variant '{variant.name}': stage '{after.method}' cannot take the output of '{before.method}' "
                f"(a {produced} artifact; {after.method} takes {'/'.join(sorted(method.accepts))}). "
                + (f"Methods that can follow {before.method}: {', '.join(takers)}" if takers
                   else f"Nothing can follow {before.method}: put it last")
            )
    return problems


def check_lm_eval_tasks(preset: Preset, origin: str = "preset") -> None:
    """Offline, only the local tasks can run: say which exist instead of failing every variant later."""
    if preset.lm_eval is None:
        return
    from workbench.lmeval.tasks import local_task_configs
    from workbench.data.sources import hub_reachable

    local = sorted(local_task_configs())
    remote = [t for t in preset.lm_eval.tasks if t not in local]
    if remote and not hub_reachable():
        raise PresetError(
            f"{origin}: lm-eval task(s) {', '.join(remote)} are not available offline (no hub is reachable); "
            f"offline tasks: {', '.join(local)}"
        )


def _describe(error: dict, model: type[BaseModel]) -> str:
    where = ".".join(str(part) for part in error["loc"]) or "preset"
    if error["type"] == "extra_forbidden":
        key = str(error["loc"][-1])
        valid = _valid_keys(model, error["loc"][:-1])
        hint = _suggest(key, valid) if valid else ""
        listing = f" (valid: {', '.join(valid)})" if valid else ""
        return f"unknown option '{where}'{hint}{listing}"
    message = error["msg"]
    if error["type"] not in ("value_error", "missing"):
        message += f", got {error.get('input')!r}"
    return f"{where}: {message}".replace("Value error, ", "")


def _valid_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the (nested) model that `loc` points into, for a did-you-mean hint."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        annotation = field.annotation
        args = getattr(annotation, "__args__", ()) or ()
        candidates = [annotation, *args] + [a for arg in args for a in getattr(arg, "__args__", ())]
        current = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if current is None:
            return []
    return list(current.model_fields)


def _suggest(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"; did you mean '{close[0]}'?" if close else ""



def select_variants(preset: Preset, names: list[str]) -> Preset:
    """The preset restricted to `names` (for --only); the baseline always stays, so KLD has a reference."""
    known = [v.name for v in preset.variants]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise PresetError(f"--only names unknown variants: {', '.join(unknown)} (variants: {', '.join(known)})")
    keep = set(names) | {preset.baseline}
    return preset.model_copy(update={"variants": [v for v in preset.variants if v.name in keep]})
