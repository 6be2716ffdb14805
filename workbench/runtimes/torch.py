"""Torch runtime: a Hugging Face model folder loaded by transformers, greedy decoding with a KV cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from workbench.cache import folder_bytes
from workbench.errors import PresetError
from workbench.runtimes.base import Footprint, Variant


def pick_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise PresetError("device: cuda was asked for, but torch sees no CUDA device on this machine; "
                          "use device: cpu or device: auto")
    return requested


class TorchVariant(Variant):
    def __init__(self, name: str, model: Any, tokenizer: Any, artifact_path: Path, device: str):
        self.name = name
        self.model = model
        self.tokenizer = tokenizer
        self.artifact_path = artifact_path
        self.device = device

    @classmethod
    def load(cls, name: str, artifact_path: Path, device: str, threads: int, trust_remote_code: bool = False,
             n_ctx: int = 2048) -> "TorchVariant":
        """`n_ctx` is not needed: the KV cache grows as tokens come."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from workbench.methods.base import custom_loader

        torch.set_num_threads(threads)
        loader = custom_loader(artifact_path)
        if loader is not None:  # low-rank factors, k-means codebooks: the method rebuilds its own modules
            model = loader(Path(artifact_path), device, trust_remote_code)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                artifact_path, dtype="auto", device_map={"": device}, trust_remote_code=trust_remote_code
            )
        model.eval()
        tokenizer = AutoTokenizer.from_pretrained(artifact_path, trust_remote_code=trust_remote_code)
        return cls(name, model, tokenizer, Path(artifact_path), device)

    @torch.inference_mode()
    def logits(self, ids: Sequence[int]) -> np.ndarray:
        input_ids = torch.tensor([list(ids)], device=self.device)
        return self.model(input_ids=input_ids).logits[0].float().cpu().numpy()

    @torch.inference_mode()
    def generate(self, ids: Sequence[int], max_new_tokens: int) -> Iterator[int]:
        """Greedy tokens one at a time; never stops at EOS (the caller decides when to stop)."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        input_ids = torch.tensor([list(ids)], device=self.device)
        for _ in range(max_new_tokens):
            # logits_to_keep=1: only the last position's logits are needed, as in model.generate.
            out = self.model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            token = out.logits[0, -1].argmax()
            yield int(token)
            input_ids = token.view(1, 1)

    def footprint(self) -> Footprint:
        return Footprint(weight_bytes=state_bytes(self.model), disk_bytes=folder_bytes(self.artifact_path))

    def weight_matrices(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, dense float weight) of every Linear and Embedding, dequantizing bnb, torchao and hqq layers."""
        seen: set[int] = set()
        for name, module in self.model.named_modules():
            if hasattr(module, "W_q") and callable(getattr(module, "dequantize", None)):  # hqq's HQQLinear
                yield name, module.dequantize()
                continue
            weight = getattr(module, "weight", None)
            if not isinstance(module, (torch.nn.Linear, torch.nn.Embedding)) or weight is None:
                continue
            if storage_id(weight) in seen:  # tied input/output embeddings are one matrix
                continue
            seen.add(storage_id(weight))
            yield name, dense_weight(module)

    def eos_ids(self) -> set[int]:
        """The generation config's end tokens (chat models end a turn with their own) and the tokenizer's."""
        ids = self.model.generation_config.eos_token_id if self.model.generation_config else None
        ids = ids if isinstance(ids, list) else [ids]
        return {int(i) for i in ids + [self.tokenizer.eos_token_id] if i is not None}

    def threads_used(self, requested: int) -> int:
        return torch.get_num_threads()  # torch's own pool size, which it may cap below the request

    def weights_read(self) -> dict[str, Any]:
        embedding = self.model.get_input_embeddings().weight
        output = self.model.get_output_embeddings()
        tied = output is not None and getattr(output, "weight", None) is not None \
            and storage_id(output.weight) == storage_id(embedding)
        return {"embedding_bytes": embedding.numel() * embedding.element_size(), "embedding_rows": embedding.shape[0],
                "tied": bool(tied)}

    def lm_eval_model(self, device: str, batch_size: int, bos_id: int | None = None) -> Any:
        """lm-eval's own HFLM around the loaded model object."""
        from lm_eval.models.huggingface import HFLM

        return HFLM(pretrained=self.model, tokenizer=self.tokenizer, device=device, batch_size=batch_size,
                    add_bos_token=bos_id is not None)

    def close(self) -> None:
        self.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _storages(tensor: torch.Tensor) -> Iterator[torch.Tensor]:
    """The plain tensors that hold a tensor's bytes: itself, or for a wrapper subclass (torchao's packed int8 and
    int4 weights) its inner tensors, whose logical shape times the float element size is not what they store."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        for name in names:
            yield from _storages(getattr(tensor, name))
    else:
        yield tensor


def storage_id(tensor: torch.Tensor) -> int:
    """Where a tensor's (first) storage lives: equal for tied weights, defined for wrapper subclasses too."""
    return next(_storages(tensor)).data_ptr()


def state_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's state (weights, buffers, quantization scales), each storage counted once."""
    seen: set[int] = set()
    total = 0
    for value in model.state_dict().values():
        if not isinstance(value, torch.Tensor):
            continue
        for tensor in _storages(value):
            if tensor.data_ptr() in seen:
                continue
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


def dense_weight(module: torch.nn.Module) -> torch.Tensor:
    weight = module.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:  # bitsandbytes 4-bit: packed nibbles + absmax
        import bitsandbytes.functional as bnb_functional

        return bnb_functional.dequantize_4bit(weight.data, quant_state)
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(weight.data):  # torchao's packed int8 / int4 tensors
        return unpacked_weight(weight.data)
    # bitsandbytes int8 keeps int8 values (zero means zero); float weights are used as they are.
    return weight.data


def unpacked_weight(weight: torch.Tensor) -> torch.Tensor:
    """A packed weight subclass as a plain [out, in] tensor: its own `dequantize`, or where the layout has none
    (torchao's CPU int4 layout) the weight applied to the identity: linear(I, W) = W^T, values as its kernel sees them."""
    try:
        return weight.dequantize()
    except NotImplementedError:
        with torch.inference_mode():
            identity = torch.eye(weight.shape[1], dtype=weight.dtype, device=weight.device)
            return torch.nn.functional.linear(identity, weight).T.contiguous()


def float_weight(module: torch.nn.Module) -> torch.Tensor:
    """The weight as float32 values, undoing bitsandbytes' int8 row scaling (W = q * SCB / 127)."""
    weight = dense_weight(module)
    scale = getattr(module.weight, "SCB", None)
    if weight.dtype == torch.int8 and scale is not None:
        return weight.float() * (scale.float()[:, None] / 127.0)
    return weight.float()
