"""llama.cpp runtime (llama-cpp-python): a GGUF file fed with the source's HF token ids.

The artifact folder holds `model.gguf` (or a link to it), the source's Hugging Face tokenizer and
`runtime.json` (n_gpu_layers). Text is never tokenized by llama.cpp: windows and prompts arrive as
token ids, so every variant sees identical input. Batches are decoded through llama-cpp-python's
context wrapper so a window asks for logits at every position while generation asks only for the
last one, as `model.generate` does on the torch side.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from workbench.cache import folder_bytes
from workbench.data.gguf_info import GGUF_NAME, check_gguf_file, gguf_reader, gguf_summary
from workbench.runtimes.base import Footprint, Variant

BATCH = 512  # tokens per llama.cpp decode call; longer windows go in several calls


class LlamaCppVariant(Variant):
    def __init__(self, name: str, llm: Any, tokenizer: Any, artifact_path: Path, summary: dict[str, Any]):
        self.name = name
        self.llm = llm
        self.tokenizer = tokenizer
        self.artifact_path = artifact_path
        self.summary = summary
        self.n_vocab = llm.n_vocab()

    @classmethod
    def load(cls, name: str, artifact_path: Path, device: str, threads: int, trust_remote_code: bool = False,
             n_ctx: int = 2048) -> "LlamaCppVariant":
        """`n_ctx`: the longest sequence the protocol feeds (window, prompt + new tokens)."""
        from llama_cpp import Llama
        from transformers import AutoTokenizer

        gguf_path = Path(artifact_path) / GGUF_NAME
        check_gguf_file(gguf_path)
        summary = gguf_summary(gguf_path)  # refuses damaged files before native code reads them
        settings = json.loads((Path(artifact_path) / "runtime.json").read_text())
        gpu_layers = settings.get("n_gpu_layers", 0) if device == "cuda" else 0
        llm = Llama(str(gguf_path), n_ctx=n_ctx, n_batch=BATCH, n_ubatch=BATCH, n_threads=threads,
                    n_threads_batch=threads, n_gpu_layers=gpu_layers, verbose=False)
        tokenizer = AutoTokenizer.from_pretrained(artifact_path, trust_remote_code=trust_remote_code)
        return cls(name, llm, tokenizer, Path(artifact_path), summary)

    def _decode(self, ids: Sequence[int], n_past: int, all_positions: bool) -> np.ndarray:
        """Run ids after `n_past` cached positions; logits [len(ids) or 1, vocab] (a copy)."""
        llm, parts = self.llm, []
        for start in range(0, len(ids), BATCH):
            chunk = list(ids[start : start + BATCH])
            llm._batch.set_batch(batch=chunk, n_past=n_past + start, logits_all=all_positions)
            llm._ctx.decode(llm._batch)
            rows = len(chunk) if all_positions else 1
            if all_positions or start + BATCH >= len(ids):
                logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(rows * self.n_vocab,))
                parts.append(logits.reshape(rows, self.n_vocab).copy())
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def _clear(self) -> None:
        self.llm._ctx.kv_cache_seq_rm(-1, 0, -1)

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        if len(ids) > self.llm.n_ctx():
            raise ValueError(f"a window of {len(ids)} tokens exceeds the llama.cpp context of {self.llm.n_ctx()}")
        self._clear()
        return self._decode(ids, 0, all_positions=True).astype(np.float32, copy=False)

    def generate(self, ids: Sequence[int], max_new_tokens: int) -> Iterator[int]:
        """Greedy tokens one at a time; never stops at EOS (the caller decides when to stop)."""
        self._clear()
        token = self._next_token(ids, 0)
        n_past = len(ids)
        for step in range(max_new_tokens):
            yield token
            if step + 1 < max_new_tokens:  # no decode after the last token: it would count in the timing
                token = self._next_token([token], n_past)
                n_past += 1

    def _next_token(self, ids: Sequence[int], n_past: int) -> int:
        """Decode `ids` and take the argmax of the last position's logits in place (no copy on the hot path)."""
        llm = self.llm
        for start in range(0, len(ids), BATCH):
            llm._batch.set_batch(batch=list(ids[start : start + BATCH]), n_past=n_past + start, logits_all=False)
            llm._ctx.decode(llm._batch)
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(self.n_vocab,))))

    def footprint(self) -> Footprint:
        # Weight bytes: the tensors as stored (llama.cpp memory-maps them and computes on them as they are).
        return Footprint(weight_bytes=self.summary["tensor_bytes"], disk_bytes=folder_bytes(self.artifact_path))

    def perf_counters(self) -> dict[str, float]:
        """llama.cpp's own timing of prompt and token evaluation since the last reset."""
        import llama_cpp

        data = llama_cpp.llama_perf_context(self.llm._ctx.ctx)
        return {"prompt_eval_ms": data.t_p_eval_ms, "prompt_tokens": data.n_p_eval,
                "eval_ms": data.t_eval_ms, "eval_tokens": data.n_eval}

    def reset_perf_counters(self) -> None:
        import llama_cpp

        llama_cpp.llama_perf_context_reset(self.llm._ctx.ctx)

    def tokenizer_agreement(self, ids: Sequence[int]) -> dict[str, Any]:
        """Does the file's own vocabulary equal the source tokenizer's, and does its tokenizer give the same ids?

        Vocabulary: token strings compared id by id (this gates KLD / top-1). Text: the eval ids decoded
        and re-tokenized by llama.cpp in a separate process (its tokenizer aborts the process on some
        vocabularies), reported as the fraction of the HF ids it reproduces. That process also reads the
        vocabulary (llama.cpp's token texts are the file's `tokenizer.ggml.tokens`), which is 10x faster than
        gguf-py's reader; gguf-py reads it only when the process failed.
        """
        from workbench.data.validity import id_agreement, llamacpp_tokenization

        native, vocabulary, error = llamacpp_tokenization(self.artifact_path / GGUF_NAME, self.tokenizer.decode(list(ids)))
        gguf_tokens = vocabulary if vocabulary is not None else self.summary_tokens()
        hf_tokens = self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))
        same = sum(a == b for a, b in zip(gguf_tokens, hf_tokens))
        return {"vocab_hf": len(hf_tokens), "vocab_gguf": len(gguf_tokens),
                "vocab_matching_fraction": same / max(len(hf_tokens), len(gguf_tokens), 1),
                **id_agreement(ids, native, error)}

    def summary_tokens(self) -> list[str]:
        from workbench.data.gguf_vocab import token_strings

        return token_strings(gguf_reader(self.artifact_path / GGUF_NAME), "tokenizer.ggml.tokens") or []

    def eos_ids(self) -> set[int]:
        return {int(i) for i in (self.llm.token_eos(), self.tokenizer.eos_token_id) if i is not None and i >= 0}

    def weights_read(self) -> dict[str, Any]:
        from workbench.planning.roofline import gguf_weights_read

        return gguf_weights_read(self.artifact_path / GGUF_NAME)

    def lm_eval_model(self, device: str, batch_size: int, bos_id: int | None = None) -> Any:
        """The workbench's own lm-eval adapter over `logits` (lm-eval has no llama.cpp class for token ids)."""
        from workbench.lmeval.adapter import VariantLM

        return VariantLM(self, max_length=min(self.llm.n_ctx(), 2048), bos_id=bos_id)

    def close(self) -> None:
        self.llm.close()


def native_tokenize(payload: dict, emit: Any) -> dict[str, list]:
    """Worker-process entry: llama.cpp's own tokenization of a text and its vocabulary's token texts (the
    file's `tokenizer.ggml.tokens`, id by id), from the vocabulary alone (no weights)."""
    import llama_cpp
    from llama_cpp import Llama

    llm = Llama(payload["gguf"], vocab_only=True, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    vocabulary = [llama_cpp.llama_vocab_get_text(vocab, i).decode("utf-8", errors="replace")
                  for i in range(llama_cpp.llama_vocab_n_tokens(vocab))]
    return {"ids": llm.tokenize(payload["text"].encode("utf-8"), add_bos=False, special=False), "vocabulary": vocabulary}
