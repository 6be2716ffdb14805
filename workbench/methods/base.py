"""What every compression method provides: typed options, an honesty label, a build step, and its estimates.

A method turns one artifact folder (a Hugging Face model folder) into another. Heavy libraries are
imported inside `build`, never at module import, so listing methods and validating presets is quick.

Everything other code needs to know about a method is declared on its class, so the planner and the
size estimator (workbench/planning/) hold no method names: option defaults live in its `Options`
model, which options name files in its path fields (pathfield.py), its estimates in `reshape`,
`estimate_size`, `estimate_build_s` and `skips_build`, and what it refuses from the model's shape in
`refusals` (the runner and the policy gate ask it before anything is prepared).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from workbench.planning.modelshape import ModelShape

# "no-speedup": stored and run in the compressed format, but its decode was not measured faster than the
# baseline's on this machine (only a method with `honesty_from_speed` gets it; running/honesty.py).
Honesty = Literal["real-kernel", "simulated", "dense-with-zeros", "no-speedup"]
# What a stage's output folder is, so a pipeline can be checked before anything runs:
#   "hf"        a plain transformers folder of float weights: every weight method can take it
#   "quantized" a transformers folder with a quantization_config (bitsandbytes, compressed-tensors):
#               loadable, but its packed weights are not input for another compression
#   "custom"    float weights in a workbench layout that needs the method's own loader
#               (`workbench_loader.json`, see `custom_loader`), e.g. low-rank factors, k-means codebooks
#   "gguf"      a GGUF file for llama.cpp
ArtifactKind = Literal["hf", "quantized", "custom", "gguf"]
LOADER_FILE = "workbench_loader.json"
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


class MethodOptions(BaseModel):
    """Base of every method's options: unknown keys are errors, every field carries help text."""

    model_config = ConfigDict(extra="forbid")


def check_sparsity(value: float) -> float:
    """Shared by every pruning method's `sparsity` option: a fraction of weights that leaves some behind."""
    if not 0 <= value < 1:
        raise ValueError(f"sparsity must be in [0, 1): got {value}")
    return value


class NoOptions(MethodOptions):
    pass


@dataclass
class BuildContext:
    device: str  # "cpu" or "cuda"
    threads: int
    trust_remote_code: bool
    emit: Callable[[str], None]  # progress messages for the UI / CLI
    source_gguf: str | None = None  # the model's own GGUF file, when the source is one
    source_dir: str | None = None  # the source's HF folder: a stage whose input is this folder sees the unmodified source


@dataclass
class SizeInput:
    """What a method's weight-size estimate starts from."""

    shape: "ModelShape"  # after the earlier stages' `reshape`
    rest: str  # float dtype of the weights this stage leaves as they are
    notes: list[str]  # the method appends the caveats of its estimate
    gguf_files: dict[str, str]  # GGUF files by name ('source': the preset model's own file), for gguf-file

    def dense_bytes(self, dtype: str | None = None) -> int:
        return self.shape.params() * DTYPE_BYTES[dtype or self.rest]

    def embedding_bytes(self, dtype: str | None = None) -> int:
        return self.shape.embedding_params() * DTYPE_BYTES[dtype or self.rest]


@dataclass
class ShapeCheck:
    """What a method's `refusals` reads: its stage's input, known from the model's config (never its weights)."""

    model: str  # the preset's model string, for the messages
    shape: "ModelShape"  # after the earlier stages' `reshape`
    rest: str  # float dtype of the weights the earlier stages left as they were
    last: bool  # this stage is the variant's last


@dataclass
class SizeEstimate:
    weight_bytes: int  # bytes held in memory while the variant runs (what `Footprint.weight_bytes` measures)
    format: str  # a short label: fp32, bnb-int8 (+fp32 rest), gguf Q4_K_M, ...
    family: str  # key of the planner's speed and memory tables: a float dtype, bnb-int8, bnb-4bit or gguf
    embedding_bytes: int | None = None  # the input embedding table as stored; None: dense in the float dtype


@dataclass
class BuildSpeed:
    """This machine's speeds as build-time estimates use them (from planning/machine.py)."""

    flops_s: float  # FLOP/s a method's own forward passes reach (below the calibrated matmul's)
    disk_bytes_s: float  # reading and writing safetensors
    source_bytes: int  # the source model's weights as stored

    def io_s(self) -> float:
        """Load the source and save a model of its size."""
        return 2 * self.source_bytes / self.disk_bytes_s

    def forward_s(self, tokens: int, params: int) -> float:
        return tokens * 2 * params / self.flops_s


class Method:
    name: ClassVar[str]
    summary: ClassVar[str]
    Options: ClassVar[type[MethodOptions]] = NoOptions
    honesty: ClassVar[Honesty] = "real-kernel"
    # True when "real-kernel" is a claim about speed that this method's kernels may not keep on every machine
    # (torchao, HQQ on a CPU): the runner then keeps the label only if the measured decode speed shows it.
    honesty_from_speed: ClassVar[bool] = False
    runtime: ClassVar[str] = "torch"  # which runtime loads the artifact (runtimes/<runtime>.py)
    accepts: ClassVar[frozenset[str]] = frozenset({"hf"})  # artifact kinds this method can take as input
    produces: ClassVar[ArtifactKind] = "hf"

    def reuses_input(self, input_dir: Path, options: MethodOptions) -> bool:
        """True when the input folder already is this method's output (nothing to build or store)."""
        return False

    def build(self, input_dir: Path, out_dir: Path, options: MethodOptions, ctx: BuildContext) -> None:
        raise NotImplementedError

    # ---- estimates, before anything loads (workbench/planning/) ---------------------------------------------

    def reshape(self, shape: "ModelShape", rest: str, options: MethodOptions) -> tuple["ModelShape", str]:
        """The shape and float dtype of this stage's output, for the stages after it (default: unchanged)."""
        return shape, rest

    def estimate_size(self, options: MethodOptions, size: SizeInput) -> SizeEstimate:
        """Weight bytes of a variant whose last stage is this method (`size.shape` is already reshaped)."""
        size.notes.append(f"no size model for '{self.name}': dense {size.rest} assumed")
        return SizeEstimate(size.dense_bytes(), f"{self.name} (dense?)", size.rest)

    def estimate_build_s(self, options: MethodOptions, shape: "ModelShape", speed: BuildSpeed) -> float:
        """Seconds this stage's build takes on top of the worker's start-up (default: load, a light pass, save)."""
        return speed.io_s() + shape.params() * 1e-8

    def skips_build(self, source_dtype: str, options: MethodOptions) -> bool:
        """True when, as the only stage, the source folder itself is this method's output (nothing to build)."""
        return False

    # ---- refusals, before anything is prepared (config/policy.py) -------------------------------------------

    def refusals(self, options: MethodOptions, check: ShapeCheck) -> list[str]:
        """Why this stage would fail on a model of this shape, one reason per line (default: none).

        Asked before the run prepares the source, so options the model cannot take (a group size that does not
        divide a width, a budget below the smallest model) cost seconds, not a calibration's minutes. The
        build still checks exactly; this only has the config's shape."""
        return []

    @classmethod
    def checks_shape(cls) -> bool:
        """True when the method overrides `refusals`: only then does the runner read the model's shape first."""
        return cls.refusals is not Method.refusals


def dense_with_zeros(name: str, size: SizeInput) -> SizeEstimate:
    """Pruned weights kept dense: the zeros take the bytes of the values they replaced."""
    size.notes.append("zeros stored densely: same bytes as the dense model")
    return SizeEstimate(size.dense_bytes(), f"{name} ({size.rest}, dense zeros)", size.rest)


def load_and_save(input_dir: Path, out_dir: Path, ctx: BuildContext, **load_kwargs: Any) -> None:
    """Load `input_dir` the way `load_kwargs` say (dtype, quantization) and save model + tokenizer as safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(input_dir, trust_remote_code=ctx.trust_remote_code, **load_kwargs)
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(input_dir, trust_remote_code=ctx.trust_remote_code).save_pretrained(out_dir)


def write_custom_loader(out_dir: Path, loader: str, **details: Any) -> None:
    """Mark `out_dir` as needing `loader` ("module:function(folder, device, trust_remote_code) -> model")."""
    import json

    (out_dir / LOADER_FILE).write_text(json.dumps({"loader": loader, **details}))


def custom_loader(folder: Path) -> Callable[..., Any] | None:
    """The loader a method registered for this artifact folder, or None for plain transformers folders."""
    import importlib
    import json

    path = Path(folder) / LOADER_FILE
    if not path.is_file():
        return None
    module_name, attr = json.loads(path.read_text())["loader"].split(":")
    if not module_name.startswith("workbench.methods."):  # the file names code to run: only our own
        raise ValueError(f"{path}: loader {module_name} is not a workbench method module")
    return getattr(importlib.import_module(module_name), attr)
