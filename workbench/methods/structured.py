"""Structured pruning: remove whole MLP channels and, optionally, whole attention KV-head groups.

Every decoder layer loses the same number of channels / groups, so the result is an ordinary, smaller
model of the same architecture: `intermediate_size`, `num_attention_heads` and `num_key_value_heads`
shrink in config.json and transformers loads it natively (honesty "real-kernel": fewer parameters,
fewer FLOPs). Channels are ranked by their activations on calibration text times their output weights
(or, data-free, by weight norms). No retraining, so quality drops quickly with the fraction removed.

    variants: [{name: mlp25, method: structured, options: {mlp_fraction: 0.25}}]
"""

from __future__ import annotations

from pathlib import Path
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from workbench.errors import WorkbenchError
from workbench.methods.base import BuildContext, Method, MethodOptions, SizeEstimate, SizeInput

if TYPE_CHECKING:
    from workbench.planning.modelshape import ModelShape
from workbench.methods.weights import load_float_model, save_hf, write_report


class StructuredOptions(MethodOptions):
    mlp_fraction: float = Field(
        0.25, ge=0, lt=1, description="Fraction of MLP intermediate channels removed in every layer."
    )
    heads_fraction: float = Field(
        0.0, ge=0, lt=1,
        description="Fraction of KV-head groups removed in every layer (a KV head together with all query heads "
        "that share it); rounded to whole groups.",
    )
    importance: Literal["activation", "l2", "l1"] = Field(
        "activation",
        description="How channels / groups are scored (lowest go): 'activation' = RMS of the channel's activation on "
        "calibration text x L2 norm of its output weights; 'l2' / 'l1' = product of the norms of its weight rows and "
        "columns (data-free; on SmolLM2-135M it removes a few channels the model depends on).",
    )
    calibration_tokens: int = Field(
        2048, gt=0, description="Tokens of calibration text (disjoint from the eval text) for importance 'activation'."
    )

    @model_validator(mode="after")
    def _removes_something(self) -> "StructuredOptions":
        if self.mlp_fraction == 0 and self.heads_fraction == 0:
            raise ValueError("mlp_fraction and heads_fraction are both 0: nothing would be removed")
        return self


def _norm(weight: Any, dim: int, importance: str) -> Any:
    return weight.abs().sum(dim=dim) if importance == "l1" else weight.norm(dim=dim)


def _linear(old: Any, weight: Any, bias: Any) -> Any:
    """A new Linear holding `weight` (out, in) and `bias`, same dtype and device as `old`."""
    import torch

    new = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype,
                          device=weight.device)
    new.weight.data = weight.clone()
    if bias is not None:
        new.bias.data = bias.clone()
    return new


def _removed_count(fraction: float, total: int, what: str, option: str) -> int:
    """Whole units removed for `fraction` of `total`; an error when that is all of them or none."""
    count = round(fraction * total)
    if count >= total:
        raise WorkbenchError(
            f"{option}={fraction:g} would remove all {total} {what} of each layer; at most {(total - 1) / total:.4g} "
            f"({total - 1} of {total}) can be removed"
        )
    if count == 0 and fraction > 0:
        raise WorkbenchError(
            f"{option}={fraction:g} removes no {what} (each layer has {total}); use at least {1 / total:.4g} "
            f"to remove one, or 0 to leave them"
        )
    return count


def activation_norms(model: Any, layers: Any, tokens: list[int], attention: bool) -> list[dict[str, Any]]:
    """Per layer, the L2 norm over calibration tokens of each input feature of down_proj (and of o_proj)."""
    import torch

    sums: list[dict[str, Any]] = [{} for _ in layers]

    def hook(index: int, key: str) -> Any:
        def record(_module: Any, args: tuple) -> None:
            squares = args[0].detach().float().reshape(-1, args[0].shape[-1]).pow(2).sum(0)
            sums[index][key] = sums[index].get(key, 0) + squares
        return record

    handles = [layer.mlp.down_proj.register_forward_pre_hook(hook(i, "mlp")) for i, layer in enumerate(layers)]
    if attention:
        handles += [layer.self_attn.o_proj.register_forward_pre_hook(hook(i, "attn")) for i, layer in enumerate(layers)]
    try:
        window = min(512, getattr(model.config, "max_position_embeddings", 512) or 512)
        with torch.no_grad():
            for start in range(0, len(tokens), window):
                model(input_ids=torch.tensor([tokens[start : start + window]]))
    finally:
        for handle in handles:
            handle.remove()
    return [{key: value.sqrt() for key, value in layer.items()} for layer in sums]


def prune_mlp(mlp: Any, keep_count: int, importance: str, activations: Any = None) -> float:
    """Keep the `keep_count` most important channels of a gated MLP; return the share of importance kept."""
    import torch

    gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
    if importance == "activation":  # what the channel actually writes: |activation| x |its down_proj column|
        score = activations * down.weight.norm(dim=0)
    else:
        score = _norm(gate.weight, 1, importance) * _norm(up.weight, 1, importance) * _norm(down.weight, 0, importance)
    keep = torch.topk(score, keep_count).indices.sort().values
    mlp.gate_proj = _linear(gate, gate.weight[keep], None if gate.bias is None else gate.bias[keep])
    mlp.up_proj = _linear(up, up.weight[keep], None if up.bias is None else up.bias[keep])
    mlp.down_proj = _linear(down, down.weight[:, keep], down.bias)
    return float(score[keep].sum() / score.sum())


def prune_kv_groups(attn: Any, heads: int, kv_heads: int, head_dim: int, remove: int, importance: str,
                    activations: Any = None) -> list[int]:
    """Drop the `remove` least important KV groups (k/v rows, their query heads' q rows and o columns)."""
    import torch

    per_group = heads // kv_heads  # query heads h use KV head h // per_group (transformers' repeat_kv)
    q = attn.q_proj.weight.view(kv_heads, per_group * head_dim, -1)
    k = attn.k_proj.weight.view(kv_heads, head_dim, -1)
    v = attn.v_proj.weight.view(kv_heads, head_dim, -1)
    o = attn.o_proj.weight.view(attn.o_proj.weight.shape[0], kv_heads, per_group * head_dim)
    flat = lambda w: w.reshape(w.shape[0], -1)  # noqa: E731  one row per group
    o_groups = o.transpose(0, 1).reshape(kv_heads, -1)
    if importance == "activation":  # the group's attention output (o_proj input) x its o_proj columns
        score = activations.view(kv_heads, -1).norm(dim=1) * o_groups.norm(dim=1)
    else:
        score = (_norm(flat(q), 1, importance) * _norm(flat(k), 1, importance) * _norm(flat(v), 1, importance)
                 * _norm(o_groups, 1, importance))
    dropped = torch.topk(score, remove, largest=False).indices.sort().values.tolist()
    groups = [g for g in range(kv_heads) if g not in dropped]

    def rows(size: int) -> Any:  # indices of the output rows of the kept groups, `size` rows per group
        return torch.cat([torch.arange(g * size, (g + 1) * size) for g in groups])

    q_rows, kv_rows = rows(per_group * head_dim), rows(head_dim)
    for name, index in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
        old = getattr(attn, name)
        setattr(attn, name, _linear(old, old.weight[index], None if old.bias is None else old.bias[index]))
    attn.o_proj = _linear(attn.o_proj, attn.o_proj.weight[:, q_rows], attn.o_proj.bias)
    for attr, value in (("num_heads", heads - remove * per_group), ("num_key_value_heads", kv_heads - remove)):
        if hasattr(attn, attr):  # older attention classes keep their own head counts
            setattr(attn, attr, value)
    return dropped


class Structured(Method):
    name = "structured"
    summary = "Structured pruning: whole MLP channels and KV-head groups removed; a smaller dense model."
    Options = StructuredOptions
    honesty = "real-kernel"
    accepts = frozenset({"hf"})
    produces = "hf"

    def reshape(self, shape: "ModelShape", rest: str, options: MethodOptions) -> tuple["ModelShape", str]:
        """Whole MLP channels and whole KV-head groups removed in every layer."""
        assert isinstance(options, StructuredOptions)
        kv = shape.kv_heads - round(options.heads_fraction * shape.kv_heads)
        return replace(shape, intermediate=shape.intermediate - round(options.mlp_fraction * shape.intermediate),
                       kv_heads=kv, heads=kv * (shape.heads // max(1, shape.kv_heads))), rest

    def estimate_size(self, options: MethodOptions, size: SizeInput) -> SizeEstimate:
        return SizeEstimate(size.dense_bytes(), f"{self.name} ({size.rest}, smaller shape)", size.rest)

    def build(self, input_dir: Path, out_dir: Path, options: MethodOptions, ctx: BuildContext) -> None:
        import torch

        assert isinstance(options, StructuredOptions)
        model = load_float_model(input_dir, ctx)
        config = model.config
        layers = getattr(getattr(model, "model", None), "layers", None)
        needed = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "self_attn.q_proj", "self_attn.k_proj",
                  "self_attn.v_proj", "self_attn.o_proj")
        missing = [n for n in needed if layers is not None and len(layers) and not _has(layers[0], n)]
        if layers is None or missing:
            raise WorkbenchError(
                f"structured pruning needs a Llama-style decoder (model.layers[i].mlp.gate_proj/up_proj/down_proj, "
                f"self_attn.q/k/v/o_proj); {type(model).__name__} lacks {', '.join(missing) or 'model.layers'}"
            )
        before = sum(p.numel() for p in model.parameters())
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        mlp_remove = _removed_count(options.mlp_fraction, config.intermediate_size, "MLP channels", "mlp_fraction") \
            if options.mlp_fraction else 0
        kv_remove = _removed_count(options.heads_fraction, kv_heads, "KV-head groups", "heads_fraction") \
            if options.heads_fraction else 0
        norms: list[dict[str, Any]] = [{} for _ in layers]
        if options.importance == "activation":
            from transformers import AutoTokenizer

            from workbench.data.evaltext import pydoc_calibration_text

            tokenizer = AutoTokenizer.from_pretrained(input_dir, trust_remote_code=ctx.trust_remote_code)
            tokens = tokenizer(pydoc_calibration_text(), add_special_tokens=False)["input_ids"]
            tokens = tokens[: options.calibration_tokens]
            ctx.emit(f"measuring channel activations on {len(tokens)} calibration tokens")
            norms = activation_norms(model, layers, tokens, attention=kv_remove > 0)
        ctx.emit(f"removing {mlp_remove} MLP channels and {kv_remove} KV-head groups per layer")
        report_layers = []
        with torch.no_grad():
            for index, layer in enumerate(layers):
                row: dict[str, Any] = {"layer": index}
                if mlp_remove:
                    row["mlp_importance_kept"] = prune_mlp(layer.mlp, config.intermediate_size - mlp_remove,
                                                           options.importance, norms[index].get("mlp"))
                if kv_remove:
                    row["kv_groups_removed"] = prune_kv_groups(layer.self_attn, heads, kv_heads, head_dim,
                                                               kv_remove, options.importance, norms[index].get("attn"))
                report_layers.append(row)
        config.intermediate_size -= mlp_remove
        if kv_remove:
            config.head_dim = head_dim  # hidden_size // heads would no longer be the head size
            config.num_attention_heads = heads - kv_remove * (heads // kv_heads)
            config.num_key_value_heads = kv_heads - kv_remove
        after = sum(p.numel() for p in model.parameters())
        save_hf(model, input_dir, out_dir, ctx)
        write_report(out_dir, {
            "mlp_channels_removed_per_layer": mlp_remove, "intermediate_size": config.intermediate_size,
            "kv_groups_removed_per_layer": kv_remove, "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": config.num_key_value_heads, "head_dim": head_dim,
            "importance": options.importance, "calibration_tokens": options.calibration_tokens
            if options.importance == "activation" else None, "parameters_before": before, "parameters_after": after,
            "layers": report_layers,
        })


def _has(module: Any, dotted: str) -> bool:
    try:
        module.get_submodule(dotted)
        return True
    except AttributeError:
        return False
