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


class MethodOptions(BaseModel):
    """Base of every method's options: unknown keys are errors, every field carries help text."""

    model_config = ConfigDict(extra="forbid")


class NoOptions(MethodOptions):
    pass


@dataclass
class BuildContext:
    device: str  # "cpu" or "cuda"
    threads: int
    trust_remote_code: bool
    emit: Callable[[str], None]  # progress messages for the UI / CLI
    source_gguf: str | None = None  # the model's own GGUF file, when the source is one


class Method:
    name: ClassVar[str]
    summary: ClassVar[str]
    Options: ClassVar[type[MethodOptions]] = NoOptions
    honesty: ClassVar[Honesty] = "real-kernel"
    runtime: ClassVar[str] = "torch"  # which runtime loads the artifact (runtimes/<runtime>.py)

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
