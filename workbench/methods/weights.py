"""Shared helpers for the plain-torch methods that rewrite Linear weights (magnitude, structured, k-means, low-rank).

They pick the targeted Linear layers the same way, save tensors as safetensors (one copy of tied
weights) and rebuild a model from its config for the methods whose folders need their own loader.
Heavy libraries are imported inside the functions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

from pydantic import Field

from workbench.errors import WorkbenchError
from workbench.methods.base import BuildContext

if TYPE_CHECKING:
    import torch

# Which Linear layers a method touches; the output head only on request (it is the most sensitive
# layer and, in tied models such as SmolLM2, it is the embedding matrix too).
Targets = Literal["linear", "mlp", "attention"]


# Declared at the end of each method's options (`targets: Targets = TARGETS`), after its main knobs.
TARGETS: Any = Field(
    "linear",
    description="Which decoder Linear layers to compress: 'linear' (all of them), 'mlp' or 'attention' "
    "(embeddings and the output head are never included by this option).",
)
INCLUDE_LM_HEAD: Any = Field(
    False, description="Also compress the output head (lm_head); refused when it is tied to the embeddings."
)


def load_float_model(input_dir: Path, ctx: BuildContext) -> Any:
    """The input folder as a float32 model on the CPU (weights are rewritten in place)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = json.loads((Path(input_dir) / "config.json").read_text())
    if "quantization_config" in config:
        raise WorkbenchError(
            f"{input_dir} holds quantized weights ({config['quantization_config'].get('quant_method', '?')}); "
            "these methods need float weights: put them before any quantization stage"
        )
    model = AutoModelForCausalLM.from_pretrained(input_dir, dtype=torch.float32,
                                                 trust_remote_code=ctx.trust_remote_code)
    return model.eval()


def head_is_tied(model: Any) -> bool:
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and embed is not None and head.weight.data_ptr() == embed.weight.data_ptr()


def target_linears(model: Any, targets: Targets, include_lm_head: bool) -> list[tuple[str, "torch.nn.Linear"]]:
    """(name, module) of every Linear the options select, in model order."""
    import torch

    head = model.get_output_embeddings()
    if include_lm_head and head_is_tied(model):
        raise WorkbenchError(
            "include_lm_head: this model ties lm_head to the input embeddings (tie_word_embeddings), so compressing "
            "it would change the embeddings too; leave include_lm_head off for this model"
        )
    words = {"linear": None, "mlp": ("mlp", "feed_forward", "ffn"), "attention": ("attn", "attention")}[targets]
    chosen = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if module is head:
            if include_lm_head:
                chosen.append((name, module))
            continue
        if words is None or any(w in part for part in name.split(".") for w in words):
            chosen.append((name, module))
    if not chosen:
        raise WorkbenchError(f"targets={targets!r} selects no Linear layer in this model ({type(model).__name__})")
    return chosen


def set_module(model: Any, name: str, module: Any) -> None:
    """Replace the submodule at dotted path `name`."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def save_tokenizer(input_dir: Path, out_dir: Path, ctx: BuildContext) -> None:
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(input_dir, trust_remote_code=ctx.trust_remote_code).save_pretrained(out_dir)


def save_config(model: Any, out_dir: Path) -> None:
    """config.json (+ generation_config.json, which carries the EOS ids) for a custom-layout folder."""
    model.config.save_pretrained(out_dir)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out_dir)


def input_dtype(input_dir: Path) -> Any:
    """The torch dtype the input folder stores its weights in (float32 when the config does not say)."""
    import torch

    from workbench.methods.dtypes import stored_dtype

    return getattr(torch, stored_dtype(Path(input_dir)) or "float32", torch.float32)


def save_hf(model: Any, input_dir: Path, out_dir: Path, ctx: BuildContext) -> None:
    """A plain transformers folder in the input's dtype (a bf16 input is not stored back as fp32) + tokenizer."""
    model.to(input_dtype(input_dir)).save_pretrained(out_dir)
    save_tokenizer(input_dir, out_dir, ctx)


def plain_state(model: Any, input_dir: Path) -> dict[str, "torch.Tensor"]:
    """The model's state, one name per storage (safetensors refuses tied tensors that share memory), with
    float tensors in the dtype the input folder stored them in (a bf16 input is not stored back as fp32)."""
    dtype = input_dtype(input_dir)
    seen: set[int] = set()
    state = {}
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        state[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return state


def save_tensors(tensors: dict[str, "torch.Tensor"], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({n: t.detach().contiguous().cpu() for n, t in tensors.items()}, str(path), metadata={"format": "pt"})


def model_from_config(folder: Path, trust_remote_code: bool) -> Any:
    """An float32 model of the folder's architecture (weights still to be loaded), with its generation config."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    try:  # every weight is overwritten by the strict load: skip random init (135M params: ~5 s of a ~7 s load)
        from transformers.initialization import no_init_weights
    except ImportError:
        from contextlib import nullcontext as no_init_weights
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
    model.tie_weights()  # init_weights, skipped above, is where transformers ties the output head
    if (Path(folder) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model


def load_tensors(model: Any, names: list[str], tensor: Callable[[str], Any], folder: Path) -> None:
    """Put every stored tensor into the model (`tensor(name)` reads one), checking strictly that stored and
    expected names match; a name stored once because it is tied takes the tensor of its twin."""
    state = model.state_dict()
    stored = set(names)
    by_storage: dict[int, set[str]] = {}
    for name, value in state.items():
        by_storage.setdefault(value.data_ptr(), set()).add(name)
    missing = sorted(n for n in state if n not in stored and not (by_storage[state[n].data_ptr()] & stored))
    unexpected = sorted(stored - set(state))
    if missing or unexpected:
        raise WorkbenchError(
            f"{folder}: the stored tensors do not fit the model its config describes (missing: "
            f"{', '.join(missing[:5]) or 'none'}; unexpected: {', '.join(unexpected[:5]) or 'none'}); "
            "rebuild the artifact"
        )
    loaded = {}
    for name in names:
        value = tensor(name)
        loaded[name] = value.to(state[name].dtype)  # bf16 / fp16 storage becomes the model's float32
    for name in state:
        if name not in loaded:
            loaded[name] = loaded[sorted(by_storage[state[name].data_ptr()] & stored)[0]]
    # assign=True adopts the loaded tensors instead of copying into the (never touched) allocated ones:
    # half the memory traffic, and a load about as fast as from_pretrained's.
    model.load_state_dict(loaded, strict=True, assign=True)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()  # assign replaced the shared parameter in each module separately


def write_report(out_dir: Path, report: dict) -> None:
    (Path(out_dir) / "stage_report.json").write_text(json.dumps(report))
