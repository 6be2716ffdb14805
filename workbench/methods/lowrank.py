"""Low-rank factorisation: each targeted Linear W (out x in) becomes two, W ~ B @ A with rank r (truncated SVD).

    W = U S V^T  ->  A = sqrt(S_r) V_r^T  (r x in),  B = U_r sqrt(S_r)  (out x r)

The rank is fixed (`rank`) or the smallest that keeps a fraction `energy` of sum(S^2) per layer. A layer
is only factorised when r * (in + out) < in * out, i.e. when it really saves parameters; the others are
kept and listed as skipped. The folder holds the factors (safetensors) and the ranks, and its loader
rebuilds the same modules: real parameter and FLOP reduction with plain matmuls (honesty "real-kernel").

    variants: [{name: svd90, method: lowrank, options: {energy: 0.9}}]
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field, model_validator

from workbench.errors import WorkbenchError
from workbench.methods.base import (DTYPE_BYTES, BuildContext, Method, MethodOptions, SizeEstimate, SizeInput,
                                    write_custom_loader)
from workbench.methods.weights import (INCLUDE_LM_HEAD, TARGETS, Targets, load_float_model, load_tensors,
                                       model_from_config, plain_state, save_config, save_tensors, save_tokenizer,
                                       set_module, target_linears, write_report)

if TYPE_CHECKING:
    from workbench.planning.modelshape import ModelShape

WEIGHTS_FILE = "lowrank.safetensors"
DEFAULT_ENERGY = 0.95


class LowRankOptions(MethodOptions):
    rank: int | None = Field(
        None, gt=0, description="Rank r of every factorised layer (give rank or energy, not both)."
    )
    energy: float | None = Field(
        None, gt=0, le=1,
        description=f"Per layer, the smallest rank keeping this fraction of sum(singular values^2), in (0, 1] "
        f"(default {DEFAULT_ENERGY} when rank is not given).",
    )

    targets: Targets = TARGETS
    include_lm_head: bool = INCLUDE_LM_HEAD

    @model_validator(mode="after")
    def _rank_or_energy(self) -> "LowRankOptions":
        if self.rank is not None and self.energy is not None:
            raise ValueError(f"give either rank ({self.rank}) or energy ({self.energy}), not both")
        if self.rank is None and self.energy is None:
            self.energy = DEFAULT_ENERGY
        return self


@cache
def low_rank_linear() -> type:
    """The LowRankLinear class, defined on first use so importing this module does not import torch."""
    import torch

    class LowRankLinear(torch.nn.Module):
        """x -> expand(reduce(x)): Linear(in, r, no bias) then Linear(r, out, the original bias)."""

        def __init__(self, in_features: int, out_features: int, rank: int, bias: bool) -> None:
            super().__init__()
            self.in_features, self.out_features, self.rank = in_features, out_features, rank
            self.reduce = torch.nn.Linear(in_features, rank, bias=False)
            self.expand = torch.nn.Linear(rank, out_features, bias=bias)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.expand(self.reduce(x))

    return LowRankLinear


def spectrum(weight: Any) -> tuple[Any, Any, bool]:
    """(singular values descending, singular vectors of the short side, wide?) from the float64 Gram matrix.

    eigh of the (min x min) Gram matrix is several times faster on CPU than an SVD of the rectangular
    weight (measured 3-8x for 576x1536 on 2 cores), and float64 keeps the top of the spectrum accurate.
    """
    import torch

    w = weight.detach().double()
    wide = w.shape[0] <= w.shape[1]
    eigenvalues, vectors = torch.linalg.eigh(w @ w.T if wide else w.T @ w)
    return eigenvalues.flip(0).clamp(min=0).sqrt(), vectors.flip(1), wide


def energy_rank(singular: Any, energy: float) -> int:
    """Smallest r with sum(S[:r]^2) >= energy * sum(S^2)."""
    import torch

    cumulative = torch.cumsum(singular.double() ** 2, 0)
    return int(torch.searchsorted(cumulative, energy * cumulative[-1] * (1 - 1e-12))) + 1


def factorise(module: Any, rank: int, parts: tuple[Any, Any, bool]) -> Any:
    """A LowRankLinear equal to the best rank-`rank` approximation of `module` (from its `spectrum`).

    With U (or V) the top singular vectors of W: expand @ reduce = U U^T W (or W V V^T), the truncated SVD,
    each factor carrying sqrt(S) so neither is badly scaled.
    """
    import torch

    singular, vectors, wide = parts
    w = module.weight.detach().double()
    root = singular[:rank].clamp(min=max(float(singular[0]) * 1e-12, 1e-30)).sqrt()
    basis = vectors[:, :rank]
    if wide:  # basis = U (out x r)
        reduce, expand = (basis.T @ w) / root[:, None], basis * root
    else:  # basis = V (in x r)
        reduce, expand = root[:, None] * basis.T, (w @ basis) / root
    new = low_rank_linear()(module.in_features, module.out_features, rank, module.bias is not None)
    with torch.no_grad():
        new.reduce.weight.copy_(reduce)
        new.expand.weight.copy_(expand)
        if module.bias is not None:
            new.expand.bias.copy_(module.bias)
    return new


def replace_with_factors(model: Any, ranks: dict[str, int]) -> None:
    """Swap each named Linear for an (untrained) LowRankLinear of the recorded rank: the loader's skeleton."""
    for name, rank in ranks.items():
        old = model.get_submodule(name)
        set_module(model, name, low_rank_linear()(old.in_features, old.out_features, rank, old.bias is not None))


class LowRank(Method):
    name = "lowrank"
    summary = "Low-rank (truncated SVD) factorisation of Linear layers, by fixed rank or kept energy."
    Options = LowRankOptions
    honesty = "real-kernel"
    accepts = frozenset({"hf"})
    produces = "custom"

    def estimate_size(self, options: MethodOptions, size: SizeInput) -> SizeEstimate:
        """Factorised layers hold r * (in + out) values; a layer where that saves nothing stays dense."""
        assert isinstance(options, LowRankOptions)
        shape, rest = size.shape, size.rest
        if options.rank is None:
            size.notes.append("lowrank by energy: each layer's rank comes from its SVD, unknown before the build; "
                              "dense bytes assumed (an upper bound)")
            return SizeEstimate(size.dense_bytes(), f"lowrank ({rest})", rest)
        linear = 0
        for _hf, gg, _layer, i, o in shape.linears():
            targeted = options.targets == "linear" or (options.targets == "mlp") == gg.startswith("ffn")
            linear += min(options.rank * (i + o), i * o) if targeted else i * o
        return SizeEstimate((shape.params() - shape.linear_params() + linear) * DTYPE_BYTES[rest], f"lowrank ({rest})", rest)

    def build(self, input_dir: Path, out_dir: Path, options: MethodOptions, ctx: BuildContext) -> None:
        assert isinstance(options, LowRankOptions)
        model = load_float_model(input_dir, ctx)
        layers = target_linears(model, options.targets, options.include_lm_head)
        if options.rank is not None:  # check every layer before spending time on any SVD
            name, module = min(layers, key=lambda item: min(item[1].weight.shape))
            if options.rank > min(module.weight.shape):
                raise WorkbenchError(
                    f"rank {options.rank} is larger than layer {name} allows: its max rank is "
                    f"{min(module.weight.shape)} (a {module.out_features}x{module.in_features} weight); "
                    f"use rank <= {min(module.weight.shape)} or energy instead"
                )
        before = sum(p.numel() for p in model.parameters())
        ranks: dict[str, int] = {}
        rows, skipped = [], []
        how = f"rank {options.rank}" if options.rank is not None else f"energy {options.energy}"
        ctx.emit(f"factorising {len(layers)} Linear layers ({how})")
        for number, (name, module) in enumerate(layers, 1):
            out_features, in_features = module.weight.shape
            parts = spectrum(module.weight)
            s = parts[0]
            rank = options.rank if options.rank is not None else energy_rank(s, options.energy or DEFAULT_ENERGY)
            kept = float((s[:rank] ** 2).sum() / (s**2).sum().clamp(min=1e-30))
            if rank * (in_features + out_features) >= in_features * out_features:
                skipped.append({"name": name, "rank": rank, "max_useful_rank":
                                (in_features * out_features - 1) // (in_features + out_features), "energy": kept})
                continue
            set_module(model, name, factorise(module, rank, parts))
            ranks[name] = rank
            rows.append({"name": name, "rank": rank, "max_rank": min(in_features, out_features), "energy": kept,
                         "parameters_before": in_features * out_features,
                         "parameters_after": rank * (in_features + out_features)})
            if number % 20 == 0:
                ctx.emit(f"factorised {number}/{len(layers)} layers")
        if not ranks:
            ctx.emit("no layer would be smaller as factors: the model is stored unchanged")
        after = sum(p.numel() for p in model.parameters())
        save_tensors(plain_state(model, input_dir), out_dir / WEIGHTS_FILE)
        save_config(model, out_dir)
        save_tokenizer(input_dir, out_dir, ctx)
        write_custom_loader(out_dir, "workbench.methods.lowrank:load_model", weights=WEIGHTS_FILE, ranks=ranks)
        write_report(out_dir, {
            "rank": options.rank, "energy": options.energy, "factorised_layers": len(rows),
            "skipped_layers": len(skipped), "parameters_before": before, "parameters_after": after,
            "layers": rows, "skipped": skipped,
        })


def load_model(folder: Path, device: str, trust_remote_code: bool) -> Any:
    """Rebuild the model from its config, swap in factors of the recorded ranks, then load every tensor strictly."""
    import json

    from safetensors import safe_open

    from workbench.methods.base import LOADER_FILE

    details = json.loads((Path(folder) / LOADER_FILE).read_text())
    model = model_from_config(folder, trust_remote_code)
    replace_with_factors(model, details["ranks"])
    with safe_open(str(Path(folder) / details["weights"]), "pt") as stored:
        load_tensors(model, list(stored.keys()), stored.get_tensor, folder)
    return model.to(device).eval()
