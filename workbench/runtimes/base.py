"""The Variant interface every runtime implements, and a DummyVariant with known logits for tests."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Protocol, Sequence, runtime_checkable

import numpy as np


@dataclass
class Footprint:
    weight_bytes: int  # bytes of parameters, buffers and quantization state held by the loaded model
    disk_bytes: int | None  # bytes of the artifact on disk; None when it was never stored


@runtime_checkable
class Variant(Protocol):
    name: str

    def logits(self, ids: Sequence[int]) -> np.ndarray:  # [len(ids), vocab] float32, one window
        ...

    def generate(self, ids: Sequence[int], max_new_tokens: int) -> Iterator[int]:  # greedy, streams ids
        ...

    def footprint(self) -> Footprint: ...

    def close(self) -> None: ...


class DummyVariant:
    """Logits are a fixed function of the position's token, so every metric has a hand-computable answer.

    `table[t]` is the logit row used after token t; generation repeats `table`'s argmax chain.
    """

    def __init__(self, name: str, table: np.ndarray, weight_bytes: int = 0, disk_bytes: int | None = None):
        self.name = name
        self.table = np.asarray(table, dtype=np.float32)
        self._footprint = Footprint(weight_bytes, disk_bytes)

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        return self.table[np.asarray(ids)]

    def generate(self, ids: Sequence[int], max_new_tokens: int) -> Iterator[int]:
        token = int(ids[-1])
        for _ in range(max_new_tokens):
            token = int(np.argmax(self.table[token]))
            yield token

    def footprint(self) -> Footprint:
        return self._footprint

    def close(self) -> None:
        pass


def chat_token_ids(tokenizer: Any, prompt: str) -> list[int]:
    """The prompt as one user turn of the tokenizer's chat template (plain text when it has none)."""
    if getattr(tokenizer, "chat_template", None):
        encoded = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                tokenize=True)
        return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)
    return list(tokenizer(prompt)["input_ids"])
