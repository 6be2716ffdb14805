"""What the runner hands its workers (build, measure), and what it gets back: one typed definition for both sides.

A worker runs in another process (or on a Ray node), so each hand-off crosses as a JSON-able dict:
the sender calls `to_payload()`, the receiver `from_payload()`. The preset's own models
(`LatencySpec`, `SamplesSpec`, `LmEvalSpec`) carry the protocol, so their defaults live once, in
presets.py.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from pydantic import BaseModel

from workbench.config.presets import LatencySpec, LmEvalSpec, SamplesSpec


def _plain(value: Any) -> Any:
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else value


@dataclass
class BuildRequest:
    """Build (or find in the cache) a variant's artifact by applying its stages in order (worker.build_artifact)."""

    stages: list[dict[str, Any]]  # [{method, options}], as the preset gives them
    source_dir: str  # the source's Hugging Face folder
    source_fingerprint: str  # keys every stage's cache entry (worker.stage_material)
    source_gguf: str | None  # the source's own GGUF file, when it is one
    threads: int
    device: str
    trust_remote_code: bool
    use_cache: bool = True
    # name -> "module:Class" of every stage's method, read from this process's registry when left empty, so the
    # worker finds methods registered at run time (registry.register_method) as well as the project's own.
    methods: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.methods:
            from workbench.methods.registry import method_target

            self.methods = {stage["method"]: method_target(stage["method"]) for stage in self.stages}

    def to_payload(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> "BuildRequest":
        return cls(**payload)


@dataclass
class StageBuild:
    method: str
    artifact_path: str
    cached: bool  # found in the cache (or the input reused as it is): nothing was built
    build_s: float | None  # None when cached
    report: dict[str, Any] | None = None  # what the method reported about its build (stage_report.json)


@dataclass
class BuildResult:
    artifact_path: str  # the last stage's folder
    stages: list[StageBuild]
    honesty: str  # the least real of the stages' labels
    runtime: str  # the runtime that loads the last stage's artifact

    def to_payload(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> "BuildResult":
        return cls(**{**payload, "stages": [StageBuild(**stage) for stage in payload["stages"]]})


@dataclass
class MeasureRequest:
    """Load one built artifact and measure it (worker.measure_variant)."""

    name: str
    runtime: str  # the registered runtime that loads the artifact (runtimes/__init__.py)
    artifact_path: str
    eval_tokens_path: str  # the run's eval token ids (JSON list), tokenized once for every variant
    threads: int
    device: str
    trust_remote_code: bool
    context: int  # perplexity window length
    stride: int
    latency: LatencySpec
    samples: SamplesSpec
    lm_eval: LmEvalSpec | None = None
    bos_id: int | None = None  # the run's BOS policy (validity.py): None means no BOS
    write_reference: str | None = None  # the baseline writes its log-probs here
    reference: str | None = None  # other variants compare against the baseline's, when it measured ok
    # False when the runner reuses stored quality figures (measure_cache.py): load, time and size only.
    measure_quality: bool = True

    def to_payload(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> "MeasureRequest":
        lm_eval = payload.get("lm_eval")
        return cls(**{**payload, "latency": LatencySpec.model_validate(payload["latency"]),
                      "samples": SamplesSpec.model_validate(payload["samples"]),
                      "lm_eval": LmEvalSpec.model_validate(lm_eval) if lm_eval is not None else None})


@dataclass
class RuntimeInfo:
    name: str
    threads: int  # the threads the engine really uses
    device: str
    pinned_cpus: list[int] | None  # cores the worker's threads were pinned to; None when not pinned
    node: dict[str, Any] | None = None  # {host, ray_node_id} when the step ran as a Ray task (scaleout.py adds it)
    node_exclusive: bool | None = None  # on Ray: whether the step held its node's timing resource

    def to_record(self) -> dict[str, Any]:
        """The record's `runtime`; the Ray fields only when the step ran on Ray."""
        return {k: v for k, v in asdict(self).items() if v is not None or k not in ("node", "node_exclusive")}


@dataclass
class MeasureResult:
    """What the measuring worker found; the runner copies it into the variant's record."""

    metrics: dict[str, Any]  # a subset of runner.METRIC_NAMES, plus lm_eval.<task>.<metric> figures
    layers: list[dict[str, Any]]  # per-layer sparsity rows
    samples: list[dict[str, Any]]  # {prompt, output, output_ids}
    quality_detail: dict[str, Any]
    runtime: RuntimeInfo
    weights_read: dict[str, Any] | None  # what one decoded token reads (roofline.py), None when unknown
    latency: dict[str, Any] = field(default_factory=dict)  # per-repeat timings and why timing stopped
    engine_perf: dict[str, Any] | None = None  # the engine's own clock (Variant.perf_counters), when it has one
    tokenizer_agreement: dict[str, Any] | None = None  # the engine's vocabulary vs the source's, when it has its own

    def to_payload(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> "MeasureResult":
        return cls(**{**payload, "runtime": RuntimeInfo(**payload["runtime"])})
