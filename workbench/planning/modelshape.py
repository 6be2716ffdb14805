"""A model's shape (hidden size, layers, heads, ...) read from config.json or GGUF metadata, never the weights.

    shape = read_shape("bundled:smollm2-135m-instruct")   # GGUF metadata when the HF folder is not there yet
    shape.params()                                         # 134,515,008 for SmolLM2-135M (tied embeddings)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

from workbench.errors import WorkbenchError

# Per-layer Linear layers of a Llama-like decoder: (HF suffix, GGUF name, n_in, n_out) as functions of the shape.
_LLAMA_LINEARS = (
    ("self_attn.q_proj", "attn_q", lambda s: s.hidden, lambda s: s.heads * s.head_dim),
    ("self_attn.k_proj", "attn_k", lambda s: s.hidden, lambda s: s.kv_heads * s.head_dim),
    ("self_attn.v_proj", "attn_v", lambda s: s.hidden, lambda s: s.kv_heads * s.head_dim),
    ("self_attn.o_proj", "attn_output", lambda s: s.heads * s.head_dim, lambda s: s.hidden),
    ("mlp.gate_proj", "ffn_gate", lambda s: s.hidden, lambda s: s.intermediate),
    ("mlp.up_proj", "ffn_up", lambda s: s.hidden, lambda s: s.intermediate),
    ("mlp.down_proj", "ffn_down", lambda s: s.intermediate, lambda s: s.hidden),
)
# model_type -> tie_word_embeddings default of its config class, when config.json leaves it out.
_TIE_DEFAULT = {"llama": False, "mistral": False, "qwen2": False, "qwen3": False, "gemma": True, "gemma2": True,
                "phi3": False, "gpt2": True, "olmo": False}


class ShapeError(WorkbenchError):
    """The model's configuration cannot be read, so nothing can be estimated."""


@dataclass(frozen=True)
class ModelShape:
    model_type: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied: bool
    gated: bool = True  # gate/up/down MLP (Llama) rather than fc/proj (GPT-2)
    attention_bias: bool = False
    mlp_bias: bool = False
    positions: int = 0  # learned position embeddings (GPT-2), 0 for rotary models
    dtype: str = "float32"  # how the source stores its weights
    origin: str = "config.json"

    def linears(self) -> list[tuple[str, str, int, int, int]]:
        """(HF name, GGUF name, layer, n_in, n_out) of every decoder Linear (Conv1D for GPT-2)."""
        rows = []
        for layer in range(self.layers):
            for hf, gg, n_in, n_out in _LLAMA_LINEARS:
                if not self.gated and hf == "mlp.gate_proj":
                    continue
                rows.append((f"model.layers.{layer}.{hf}", gg, layer, n_in(self), n_out(self)))
        return rows

    def linear_params(self) -> int:
        return sum(i * o for *_, i, o in self.linears())

    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    def other_params(self) -> int:
        """Norms, biases and position embeddings: everything but embeddings, head and Linear weights."""
        norms = (2 * self.layers + 1) * self.hidden * (2 if self.model_type == "gpt2" else 1)
        bias = sum(o for _hf, gg, _layer, _i, o in self.linears() if self._has_bias(gg))
        return norms + bias + self.positions * self.hidden

    def _has_bias(self, gguf_name: str) -> bool:
        if gguf_name.startswith("ffn"):
            return self.mlp_bias
        if gguf_name == "attn_output":  # Qwen2 has q/k/v biases only
            return self.attention_bias and self.model_type != "qwen2"
        return self.attention_bias

    def params(self) -> int:
        """Unique parameters (a tied head counted once)."""
        head = 0 if self.tied else self.embedding_params()
        return self.embedding_params() + head + self.linear_params() + self.other_params()

    def gguf_tensors(self) -> Iterator[tuple[str, int, int, int]]:
        """(GGUF name, layer, ne[0] = row length, rows) of every tensor llama.cpp's converter writes."""
        yield "token_embd", -1, self.hidden, self.vocab
        for layer in range(self.layers):
            yield "attn_norm", layer, self.hidden, 1
            yield "ffn_norm", layer, self.hidden, 1
        for _hf, gg, layer, n_in, n_out in self.linears():
            yield gg, layer, n_in, n_out
            if self._has_bias(gg):
                yield gg + "_bias", layer, n_out, 1
        yield "output_norm", -1, self.hidden, 1
        if not self.tied:
            yield "output", -1, self.hidden, self.vocab

    def shrunk(self, layers: int | None = None, intermediate: int | None = None) -> "ModelShape":
        return replace(self, layers=layers or self.layers, intermediate=intermediate or self.intermediate)


def shape_from_config(config: dict[str, Any], origin: str = "config.json") -> ModelShape:
    config = config.get("text_config") or config
    model_type = config.get("model_type", "unknown")

    def first(*keys: str, default: Any = None) -> Any:
        for key in keys:
            if config.get(key) is not None:
                return config[key]
        return default

    hidden = first("hidden_size", "n_embd", "d_model")
    layers = first("num_hidden_layers", "n_layer", "num_layers")
    heads = first("num_attention_heads", "n_head")
    vocab = first("vocab_size")
    missing = [k for k, v in (("hidden_size", hidden), ("num_hidden_layers", layers), ("num_attention_heads", heads),
                              ("vocab_size", vocab)) if not v]
    if missing:
        raise ShapeError(f"{origin} has no {', '.join(missing)}: cannot estimate this model's size")
    gpt2 = model_type == "gpt2"
    intermediate = first("intermediate_size", "n_inner", "ffn_dim") or 4 * hidden
    return ModelShape(
        model_type=model_type, vocab=int(vocab), hidden=int(hidden), layers=int(layers), heads=int(heads),
        kv_heads=int(first("num_key_value_heads", default=heads)), head_dim=int(first("head_dim", default=hidden // heads)),
        intermediate=int(intermediate), tied=bool(first("tie_word_embeddings", default=_TIE_DEFAULT.get(model_type, True))),
        gated=not gpt2, attention_bias=bool(first("attention_bias", default=gpt2 or model_type == "qwen2")),
        mlp_bias=bool(first("mlp_bias", default=gpt2)), positions=int(first("n_positions", default=0)) if gpt2 else 0,
        dtype=str(first("dtype", "torch_dtype", default="float32")), origin=origin,
    )


def shape_from_folder(folder: Path) -> ModelShape:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ShapeError(f"{folder} has no config.json: cannot read the model's configuration")
    try:
        return shape_from_config(json.loads(path.read_text()), str(path))
    except ValueError as exc:
        raise ShapeError(f"{path} is not valid JSON ({exc})") from None


def shape_from_gguf(path: Path) -> ModelShape:
    """The shape from a GGUF file's metadata and tensor table (memory-mapped; tensor data is never read)."""
    from workbench.data.gguf_info import check_gguf_readable, gguf_field, gguf_reader

    try:
        check_gguf_readable(path)
    except WorkbenchError as exc:
        raise ShapeError(str(exc)) from None
    try:
        reader = gguf_reader(path)
    except Exception as exc:
        raise ShapeError(f"{path} is a damaged GGUF file ({type(exc).__name__})") from None

    def field(name: str) -> Any:
        return gguf_field(reader, name)

    arch = field("general.architecture")
    tensors = {t.name for t in reader.tensors}
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    hidden, heads = field(f"{arch}.embedding_length"), field(f"{arch}.attention.head_count")
    if not hidden or not heads or not field(f"{arch}.block_count"):
        raise ShapeError(f"{path}: its '{arch}' metadata lacks embedding_length / block_count / head_count")
    return ModelShape(
        model_type=arch, vocab=len(tokens.data) if tokens is not None else 0, hidden=hidden,
        layers=field(f"{arch}.block_count"), heads=heads, kv_heads=field(f"{arch}.attention.head_count_kv") or heads,
        head_dim=field(f"{arch}.attention.key_length") or hidden // heads,
        intermediate=field(f"{arch}.feed_forward_length"), tied="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors, dtype="float32",  # the workbench converts GGUF sources to fp32
        origin=f"GGUF metadata of {Path(path).name}",
    )


def read_shape(model: str, trust_remote_code: bool = False) -> tuple[ModelShape, dict[str, Any]]:
    """(shape, where it came from) for a preset's `model`, reading no weights and converting nothing."""
    from workbench.data.sources import bundled_gguf_path, classify_model, hub_reachable

    ref = classify_model(model)
    if ref.kind == "bundled":
        gguf_path = bundled_gguf_path()
        return shape_from_gguf(gguf_path), {"kind": "bundled", "gguf_file": str(gguf_path)}
    if ref.kind == "gguf":
        assert ref.path is not None
        return shape_from_gguf(ref.path), {"kind": "gguf", "gguf_file": str(ref.path.resolve())}
    if ref.kind == "folder":
        assert ref.path is not None
        return shape_from_folder(ref.path), {"kind": "local", "hf_dir": str(ref.path.resolve())}
    if ref.kind == "other-file":
        raise ShapeError(f"cannot read the configuration of {model}: it is neither a model folder nor a .gguf file")
    if ref.kind != "hub":
        raise ShapeError(f"cannot read the configuration of {model}: no such file or folder")
    from huggingface_hub import hf_hub_download

    try:
        config = hf_hub_download(model, "config.json", local_files_only=True)
    except Exception:
        if not hub_reachable():
            raise ShapeError(f"cannot read the configuration of {model}: it is not in the local cache and no hub "
                             "is reachable") from None
        try:
            config = hf_hub_download(model, "config.json")
        except Exception as exc:
            raise ShapeError(f"cannot read the configuration of {model} from the hub ({type(exc).__name__})") from None
    return shape_from_folder(Path(config).parent), {"kind": "hub", "hf_dir": str(Path(config).parent)}
