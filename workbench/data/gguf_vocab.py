"""A Hugging Face tokenizer rebuilt from a GGUF file's own vocabulary, for when transformers' conversion is wrong.

transformers builds a GGUF file's tokenizer with a converter chosen by the model's architecture, which assumes
the architecture's usual vocabulary type (a Gemma file is assumed to carry SentencePiece scores, for
instance). A file whose vocabulary is byte-level BPE (`tokenizer.ggml.model = gpt2`: tokens and merges) can
be rebuilt exactly with the `tokenizers` library instead. Whether the result tokenizes like llama.cpp is
measured by the caller, never assumed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# llama.cpp's token types (llama-vocab.h, LLAMA_TOKEN_TYPE_*): control and user-defined tokens are matched whole.
_CONTROL, _USER_DEFINED = 3, 4


def token_strings(reader: Any, name: str) -> list[str] | None:
    """A string-array field of a gguf-py reader (e.g. `tokenizer.ggml.tokens`), decoded; None when absent."""
    field = reader.fields.get(name)
    if field is None:
        return None
    return [bytes(field.parts[index]).decode("utf-8", errors="replace") for index in field.data]


def _ints(reader: Any, name: str) -> list[int] | None:
    field = reader.fields.get(name)
    return None if field is None else [int(field.parts[index][0]) for index in field.data]


def tokenizer_from_gguf(path: Path) -> Any | None:
    """A PreTrainedTokenizerFast for a byte-level BPE vocabulary; None for other vocabulary types."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from workbench.data.gguf_info import gguf_field, gguf_reader

    reader = gguf_reader(path)
    if gguf_field(reader, "tokenizer.ggml.model") != "gpt2":
        return None
    tokens = token_strings(reader, "tokenizer.ggml.tokens") or []
    merges = token_strings(reader, "tokenizer.ggml.merges") or []
    types = _ints(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {token: index for index, token in enumerate(tokens)}
    pairs = [tuple(merge.split(" ", 1)) for merge in merges if " " in merge]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    special = [AddedToken(token, special=True, normalized=False)
               for token, kind in zip(tokens, types) if kind in (_CONTROL, _USER_DEFINED)]
    tokenizer.add_special_tokens(special)

    def token_for(key: str) -> str | None:
        index = gguf_field(reader, f"tokenizer.ggml.{key}_token_id")
        return tokens[index] if index is not None and 0 <= index < len(tokens) else None

    result = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=token_for("bos"), eos_token=token_for("eos"),
                                     unk_token=token_for("unknown"), pad_token=token_for("padding"))
    template = gguf_field(reader, "tokenizer.chat_template")
    if template:
        result.chat_template = template
    return result
