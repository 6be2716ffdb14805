"""What every compression method provides: typed options, an honesty label and a build step.

A method turns one artifact folder (a Hugging Face model folder) into another. Heavy libraries are
imported inside `build`, never at module import, so listing methods and validating presets is quick.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

Honesty = Literal["real-kernel", "simulated", "dense-with-zeros"]
# What a stage's output folder is, so a pipeline can be checked before anything runs:
#   "hf"        a plain transformers folder of float weights: every weight method can take it
#   "quantized" a transformers folder with a quantization_config (bitsandbytes, compressed-tensors):
#               loadable, but its packed weights are not input for another compression
#   "custom"    float weights in a workbench layout that needs the method's own loader
#               (`workbench_loader.json`, see `custom_loader`), e.g. low-rank factors, k-means codebooks
#   "gguf"      a GGUF file for llama.cpp
ArtifactKind = Literal["hf", "quantized", "custom", "gguf"]
LOADER_FILE = "workbench_loader.json"


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


class Method:
    name: ClassVar[str]
    summary: ClassVar[str]
    Options: ClassVar[type[MethodOptions]] = NoOptions
    honesty: ClassVar[Honesty] = "real-kernel"
    runtime: ClassVar[str] = "torch"  # which runtime loads the artifact (runtimes/<runtime>.py)
    accepts: ClassVar[frozenset[str]] = frozenset({"hf"})  # artifact kinds this method can take as input
    produces: ClassVar[ArtifactKind] = "hf"

    def reuses_input(self, input_dir: Path, options: MethodOptions) -> bool:
        """True when the input folder already is this method's output (nothing to build or store)."""
        return False

    def build(self, input_dir: Path, out_dir: Path, options: MethodOptions, ctx: BuildContext) -> None:
        raise NotImplementedError


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
