"""The Variant interface every runtime implements, and a DummyVariant with known logits for tests.

A Variant is one loaded model behind one inference engine. Everything the measuring code (worker.py,
speedpass.py, lmeval/, roofline.py, the chat tab) asks of a variant is declared here:

- required (abstract): `load`, `logits`, `generate`, `footprint`, `close`;
- text: `tokenizer` (the source's Hugging Face tokenizer), from which `chat_ids`, `decode` and
  `eos_ids` have working defaults; a runtime without a tokenizer overrides those three;
- `threads_used` (by default the threads it was given);
- optional capabilities, with defaults that mean "this runtime has none" (the measuring code then
  records null, never 0): `weight_matrices` (None: no per-weight values to count),
  `perf_counters` (None: no engine clock) with `reset_perf_counters` (no-op),
  `tokenizer_agreement` (None: the runtime uses the source tokenizer itself), `weights_read`
  (None: unknown, the roofline then counts every weight byte) and `lm_eval_model` (raises
  `CapabilityMissing`, which the lm-eval step reports as that runtime's lm-eval error).

A new runtime subclasses `Variant`, implements the abstract methods and overrides the capabilities it
has; `runtimes/__init__.py` registers it by name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from workbench.errors import WorkbenchError


@dataclass
class Footprint:
    weight_bytes: int  # bytes of parameters, buffers and quantization state held by the loaded model
    disk_bytes: int | None  # bytes of the artifact on disk; None when it was never stored


class CapabilityMissing(WorkbenchError):
    """A runtime was asked for something its engine cannot do (e.g. an lm-eval model); the message says which."""


class Variant(ABC):
    name: str
    tokenizer: Any = None  # the source's Hugging Face tokenizer: every variant sees the same token ids

    # ---- required ------------------------------------------------------------------------------------

    @classmethod
    @abstractmethod
    def load(cls, name: str, artifact_path: Path, device: str, threads: int, trust_remote_code: bool = False,
             n_ctx: int = 2048) -> "Variant":
        """Load an artifact folder. `n_ctx`: the longest sequence the protocol feeds (window, prompt + new
        tokens); an engine that sizes its context up front (llama.cpp) needs it, others may ignore it."""

    @abstractmethod
    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """[len(ids), vocab] float32 logits of one window, every position."""

    @abstractmethod
    def generate(self, ids: Sequence[int], max_new_tokens: int) -> Iterator[int]:
        """Greedy token ids one at a time; never stops at EOS (the caller decides when to stop)."""

    @abstractmethod
    def footprint(self) -> Footprint:
        """Weight bytes as held in memory, and the artifact's bytes on disk."""

    @abstractmethod
    def close(self) -> None:
        """Release the model (memory, native handles)."""

    # ---- text: defaults through `tokenizer` ------------------------------------------------------------

    def _require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise CapabilityMissing(f"variant {self.name} ({type(self).__name__}) has no tokenizer: it must override "
                                    "chat_ids, decode and eos_ids")
        return self.tokenizer

    def chat_ids(self, prompt: str) -> list[int]:
        """The prompt as one user turn of the chat template (plain text when there is none)."""
        return chat_token_ids(self._require_tokenizer(), prompt)

    def decode(self, ids: Sequence[int]) -> str:
        return self._require_tokenizer().decode(list(ids), skip_special_tokens=True)

    def eos_ids(self) -> set[int]:
        """Token ids that end a sample (generation itself never stops on them)."""
        eos = self._require_tokenizer().eos_token_id
        return {int(eos)} if eos is not None else set()

    # ---- optional capabilities: the defaults say "this runtime has none" ----------------------------------

    def threads_used(self, requested: int) -> int:
        """The threads the engine really computes with (recorded); by default the ones it was given."""
        return requested

    def weight_matrices(self) -> Iterator[tuple[str, Any]] | None:
        """(name, dense weight) of every Linear and Embedding for the sparsity count; None when the format
        has no per-weight values to count (packed GGUF blocks)."""
        return None

    def reset_perf_counters(self) -> None:
        """Start the engine's own clock (perf_counters) from zero; no-op without one."""

    def perf_counters(self) -> dict[str, float] | None:
        """The engine's own timing since the last reset ({prompt_eval_ms, prompt_tokens, eval_ms, eval_tokens}),
        or None when the engine keeps none."""
        return None

    def tokenizer_agreement(self, ids: Sequence[int]) -> dict[str, Any] | None:
        """How far the engine's own vocabulary agrees with the source tokenizer's (it gates KLD / top-1);
        None when the runtime uses the source tokenizer itself, so they agree by construction."""
        return None

    def weights_read(self) -> dict[str, Any] | None:
        """{'embedding_bytes', 'embedding_rows', 'tied'}: what one decoded token reads (roofline.py); None when unknown."""
        return None

    def lm_eval_model(self, device: str, batch_size: int, bos_id: int | None = None) -> Any:
        """An lm-eval `LM` scoring this loaded variant (no second load)."""
        raise CapabilityMissing(f"no lm-eval adapter for the {type(self).__name__} runtime")


class DummyVariant(Variant):
    """Logits are a fixed function of the position's token, so every metric has a hand-computable answer.

    `table[t]` is the logit row used after token t; generation repeats `table`'s argmax chain. Without a
    tokenizer, text is the ids written out ("3 7 1") and no id ends a sample.
    """

    def __init__(self, name: str, table: np.ndarray, weight_bytes: int = 0, disk_bytes: int | None = None):
        self.name = name
        self.table = np.asarray(table, dtype=np.float32)
        self._footprint = Footprint(weight_bytes, disk_bytes)

    @classmethod
    def load(cls, name: str, artifact_path: Path, device: str, threads: int, trust_remote_code: bool = False,
             n_ctx: int = 2048) -> "DummyVariant":
        """An artifact folder holding `table.npy` (and optionally `footprint.json`)."""
        import json

        folder = Path(artifact_path)
        sizes = json.loads((folder / "footprint.json").read_text()) if (folder / "footprint.json").is_file() else {}
        return cls(name, np.load(folder / "table.npy"), **sizes)

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

    def chat_ids(self, prompt: str) -> list[int]:
        return [int(word) for word in prompt.split()]

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(str(int(i)) for i in ids)

    def eos_ids(self) -> set[int]:
        return set()


def chat_token_ids(tokenizer: Any, prompt: str) -> list[int]:
    """The prompt as one user turn of the tokenizer's chat template (plain text when it has none)."""
    if getattr(tokenizer, "chat_template", None):
        encoded = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                tokenize=True)
        return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)
    return list(tokenizer(prompt)["input_ids"])
