"""Calibration data for methods that need activations (GPTQ, AWQ, SparseGPT, Wanda): token sequences
cut from a text that never overlaps the evaluation text.

Texts: `pydoc` (the later pydoc topics, see workbench/data/evaltext.py), `pydoc-a` / `pydoc-b` (its two
disjoint halves, so calibration robustness can compare two different texts), `wikitext2` (train split,
needs a hub) or a UTF-8 file. `seed` picks which sequences are used, so seeds are a second way to
measure how much a result depends on its calibration set.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from workbench.errors import EvalTextError
from workbench.pathfield import path_field

CALIBRATION_TEXTS = ("pydoc", "pydoc-a", "pydoc-b", "wikitext2")  # built in; anything else names a file

# A paragraph shorter than this may legitimately repeat (headings, "Changed in version 3.x").
_OVERLAP_MIN_CHARS = 80


class CalibrationSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    samples: int = Field(32, gt=0, description="Number of calibration sequences.")
    seq_len: int = Field(256, gt=1, description="Tokens per calibration sequence.")
    text: str = path_field("pydoc", keywords=CALIBRATION_TEXTS,
                           description="pydoc | pydoc-a | pydoc-b | wikitext2 (online) | path to a UTF-8 text file; "
                                       "never overlaps the eval text.")
    seed: int = Field(0, description="Which sequences are drawn from the text (a different seed, a different set).")


def calibration_text(spec: str) -> str:
    from workbench.data.evaltext import pydoc_calibration_text

    if spec in ("pydoc", "pydoc-a", "pydoc-b"):
        text = pydoc_calibration_text()
        if spec == "pydoc":
            return text
        paragraphs = list(dict.fromkeys(text.split("\n\n")))  # some topics repeat paragraphs: halves share none
        half = len(paragraphs) // 2
        return "\n\n".join(paragraphs[:half] if spec == "pydoc-a" else paragraphs[half:])
    if spec == "wikitext2":
        try:
            from datasets import load_dataset

            return "\n".join(load_dataset("wikitext", "wikitext-2-raw-v1", split="train")["text"])
        except Exception as exc:
            raise EvalTextError(f"WikiText-2 calibration text is unavailable here ({type(exc).__name__}); "
                                "use text: pydoc offline") from None
    path = Path(spec).expanduser()
    if not path.is_file():
        raise EvalTextError(f"calibration text must be pydoc, pydoc-a, pydoc-b, wikitext2 or a text file; {spec} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise EvalTextError(f"calibration text file {path} is not UTF-8 text") from None
    _refuse_overlap(text, path)
    return text


def _refuse_overlap(text: str, path: Path) -> None:
    """A user's file must not contain evaluation paragraphs: calibrating on the test text flatters the result."""
    from workbench.data.evaltext import pydoc_eval_text

    shared = [p for p in pydoc_eval_text().split("\n\n") if len(p.strip()) >= _OVERLAP_MIN_CHARS and p.strip() in text]
    if shared:
        raise EvalTextError(f"calibration file {path} contains {len(shared)} paragraph(s) of the evaluation text "
                            f"(first: {shared[0].strip()[:60]!r}...); calibration and evaluation text must be disjoint")


def calibration_sequences(tokenizer: Any, spec: CalibrationSpec) -> list[list[int]]:
    """`spec.samples` non-overlapping sequences of `spec.seq_len` tokens, chosen by `spec.seed`."""
    ids = tokenizer(calibration_text(spec.text), add_special_tokens=False)["input_ids"]
    available = len(ids) // spec.seq_len
    if available < spec.samples:
        raise EvalTextError(
            f"calibration text '{spec.text}' has {len(ids)} tokens: enough for {available} sequences of {spec.seq_len}, "
            f"but samples={spec.samples} were asked for; lower samples or seq_len"
        )
    starts = random.Random(spec.seed).sample(range(available), spec.samples)
    return [ids[s * spec.seq_len : (s + 1) * spec.seq_len] for s in sorted(starts)]


def describe(spec: CalibrationSpec) -> dict:
    return {**spec.model_dump(), "disjoint_from_eval": True}
