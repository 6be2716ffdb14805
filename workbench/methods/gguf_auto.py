"""`gguf-auto`: a GGUF file whose tensor types are chosen per block to meet a size budget with the least KLD.

Units are the decoder blocks (`blk.N.*`), the token embedding and the output head (tied models have one
tensor for both). How the sensitivities are measured, and why this way:

1. The float file (the converter's F16 output; for a GGUF source, the source file itself, dequantized by
   llama.cpp as the `gguf` method does) is quantized once per candidate type with llama.cpp itself (every matrix to
   that type through a tensor-type override, with the importance matrix when one is asked for), so each
   unit's bits are exactly the bits the final file will hold, fallbacks included (a 576-wide tensor
   asked for Q4_K is stored Q5_0 by llama.cpp, and its bytes and error are those of Q5_0).
2. Those tensors are dequantized with gguf-py (a port of ggml's dequantization) and swapped, one unit at
   a time, into the float32 torch model; the KLD to the unmodified model is measured on a short slice of
   calibration text (never the eval text). A file per (unit, type) run by llama.cpp would measure the
   same weights at the cost of one quantize pass and one model load per pair; the swap costs one forward.
   As for workbench/analysis/sensitivity.py this measures weight error, not llama.cpp's activation rounding.
3. Types are assigned by `workbench.analysis.mixed_precision` (exact dynamic programming over the measured table;
   the greedy KLD-per-byte walk's result is recorded next to it), and the file is written with one
   override per unit. Its tensor bytes equal the table's prediction, which the build checks.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import Field, model_validator

from workbench.data.calibration import CalibrationSpec, calibration_sequences, describe
from workbench.errors import WorkbenchError
from workbench.data.gguf_info import GGUF_NAME, gguf_reader
from workbench.methods.base import BuildContext, BuildSpeed, Method, MethodOptions, SizeEstimate, SizeInput
from workbench.methods.gguf import (TENSOR_TYPES_NEEDING_IMATRIX, TensorType, _finish, convert_and_quantize_s,
                                    convert_to_gguf, imatrix_for, imatrix_s, is_source_gguf_input, quantize_gguf,
                                    quantize_pass_s)
from workbench.analysis.mixed_precision import Option, check_budget, greedy, optimal, total_bytes, total_kld
from workbench.analysis.sensitivity import KLDProbe, sensitivity_cache  # noqa: F401  (KLDProbe: shared with bnb-auto)

if TYPE_CHECKING:
    from workbench.planning.modelshape import ModelShape

SENSITIVITY_DEFAULT = CalibrationSpec(samples=2, seq_len=256, text="pydoc", seed=1)
# Any quantized file type: every matrix gets its type from an override, so this only makes llama.cpp
# apply overrides at all (it skips them for float file types) and names the file type in the metadata.
CARRIER_FTYPE = "Q8_0"


class GGUFAutoOptions(MethodOptions):
    target_mb: float | None = Field(None, gt=0, description="Budget: tensor bytes of the file in MB (1e6 bytes), "
                                                            "the weights figure the workbench reports.")
    target_bpw: float | None = Field(None, gt=0, description="Budget in bits per weight (tensor bytes * 8 / parameters).")
    candidates: list[TensorType] = Field(
        default_factory=lambda: ["Q8_0", "Q6_K", "Q5_K", "Q5_0", "Q4_K", "Q4_0", "Q3_K"], min_length=1,
        description="Types each block may get; one llama.cpp quantize pass and one forward pass per block each.")
    imatrix: CalibrationSpec | None = Field(None, description="Importance matrix for every candidate (as for gguf).")
    sensitivity: CalibrationSpec = Field(default_factory=lambda: SENSITIVITY_DEFAULT.model_copy(),
                                         description="Calibration tokens the per-block KLD is measured on.")
    n_gpu_layers: int = Field(0, ge=-1, description="Layers offloaded to a GPU when device is cuda (-1: all).")

    @model_validator(mode="after")
    def _one_target(self) -> "GGUFAutoOptions":
        if (self.target_mb is None) == (self.target_bpw is None):
            raise ValueError("give exactly one of target_mb and target_bpw")
        if len(set(self.candidates)) != len(self.candidates):
            raise ValueError(f"candidates repeat a type: {self.candidates}")
        return self


# ---- units and their tensors ------------------------------------------------------------------------------


def unit_of(tensor_name: str) -> str:
    """'blk.3.attn_q.weight' -> 'blk.3'; 'token_embd.weight' -> 'token_embd'."""
    match = re.match(r"blk\.(\d+)\.", tensor_name)
    return f"blk.{match.group(1)}" if match else tensor_name.removesuffix(".weight")


def unit_pattern(unit: str) -> str:
    """The override regex that names exactly the unit's tensors (llama.cpp searches, so anchor both ends)."""
    return rf"^{re.escape(unit)}\." if unit.startswith("blk.") else rf"^{re.escape(unit)}\.weight$"


def read_tensors(path: Path) -> dict[str, Any]:
    """{name: gguf ReaderTensor} of a file (memory-mapped: nothing is read until used)."""
    return {t.name: t for t in gguf_reader(path).tensors}


def matrices(tensors: dict[str, Any]) -> list[str]:
    return [name for name, t in tensors.items() if len(t.shape) >= 2]


def dequantized(tensor: Any) -> np.ndarray:
    """Float32 values of a GGUF tensor, rows first (as numpy and torch see weights)."""
    from gguf.quants import dequantize

    return np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)


def _unpermute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Undo convert_hf_to_gguf.py's `LlamaModel.permute` (rows of attn_q / attn_k reordered for rope)."""
    rows = weights.shape[0]
    return weights.reshape(n_head, rows // n_head // 2, 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


class TorchSlots:
    """Where each GGUF matrix lives in the torch model, and how its rows map back (checked on the float or source file)."""

    def __init__(self, model: Any, converted: dict[str, Any], arch: str) -> None:
        import torch

        from workbench.analysis.imatrix import gguf_name, hf_to_gguf_name_map

        n_blocks = 1 + max((int(n.split(".")[1]) for n in converted if n.startswith("blk.")), default=-1)
        name_map = hf_to_gguf_name_map(arch, n_blocks)
        params = dict(model.named_parameters())
        config = model.config
        heads = {"attn_q": config.num_attention_heads,
                 "attn_k": getattr(config, "num_key_value_heads", None) or config.num_attention_heads}
        self.params: dict[str, torch.nn.Parameter] = {}
        self.permuted: dict[str, int] = {}
        for hf_name, param in params.items():
            target = gguf_name(name_map, hf_name)
            if target in converted and len(converted[target].shape) >= 2:
                self.params[target] = param
        missing = [n for n in matrices(converted) if n not in self.params]
        if missing:
            raise WorkbenchError(f"gguf-auto cannot place {len(missing)} GGUF tensors in the torch model "
                                 f"(first: {missing[0]}); this architecture is not supported")
        for name, param in self.params.items():  # learn each tensor's row order from the float (or source) file itself
            reference = param.detach().float().numpy().astype(np.float16).astype(np.float32)
            stored = dequantized(converted[name]).reshape(reference.shape)
            if np.allclose(stored, reference, rtol=1e-3, atol=1e-6):
                continue
            kind = name.split(".")[-2]
            if kind in heads and np.allclose(_unpermute(stored, heads[kind]), reference, rtol=1e-3, atol=1e-6):
                self.permuted[name] = heads[kind]
                continue
            raise WorkbenchError(f"gguf-auto: the converted {name} does not match the torch weight it came from")

    def torch_values(self, name: str, tensor: Any) -> Any:
        import torch

        values = dequantized(tensor).reshape(tuple(self.params[name].shape))
        if name in self.permuted:
            values = _unpermute(values, self.permuted[name])
        return torch.from_numpy(np.ascontiguousarray(values))


# ---- measuring --------------------------------------------------------------------------------------------


def measure_table(slots: TorchSlots, probe: KLDProbe, candidate_files: dict[str, Path], units: dict[str, list[str]],
                  emit: Any) -> dict[str, list[Option]]:
    """{unit: [Option(type, bytes, kld) per distinct result]}: each unit alone at each candidate type."""
    table: dict[str, list[Option]] = {unit: [] for unit in units}
    seen: dict[str, set] = {unit: set() for unit in units}
    for type_name, path in candidate_files.items():
        tensors = read_tensors(path)
        for index, (unit, names) in enumerate(units.items()):
            stored = tuple((n, tensors[n].tensor_type.name) for n in names)
            if stored in seen[unit]:  # fallbacks made this type identical to an earlier one for this unit
                continue
            seen[unit].add(stored)
            emit(f"sensitivity {type_name}: {unit} ({index + 1}/{len(units)})")
            originals = {n: slots.params[n].data for n in names}
            try:
                for n in names:
                    slots.params[n].data = slots.torch_values(n, tensors[n])
                kld = probe.kld(int(unit.split(".")[1]) if unit.startswith("blk.") else None)
            finally:
                for n, data in originals.items():
                    slots.params[n].data = data
            table[unit].append(Option(type_name, sum(int(tensors[n].n_bytes) for n in names), max(kld, 0.0)))
    return table


# ---- the method -------------------------------------------------------------------------------------------


class GGUFAuto(Method):
    name = "gguf-auto"
    summary = ("GGUF with a tensor type per block chosen to meet target_mb / target_bpw with the least measured KLD "
               "(candidates quantized by llama.cpp, per-block KLD on calibration text); runs on llama.cpp.")
    Options = GGUFAutoOptions
    honesty = "real-kernel"
    runtime = "llamacpp"
    produces = "gguf"

    def build(self, input_dir: Path, out_dir: Path, options: MethodOptions, ctx: BuildContext) -> None:
        from workbench.analysis.imatrix import gguf_tensor_names

        assert isinstance(options, GGUFAutoOptions)
        needing = [t for t in options.candidates if t in TENSOR_TYPES_NEEDING_IMATRIX]
        if needing and options.imatrix is None:
            raise WorkbenchError(f"candidates {', '.join(needing)} need an importance matrix: add imatrix: "
                                 "{samples: 32, seq_len: 256, text: pydoc} to the options, or drop them")
        timings: dict[str, float] = {}
        started = time.perf_counter()
        from_source_file = is_source_gguf_input(input_dir, ctx)  # as for `gguf`: no F16 copy of a GGUF source
        if from_source_file:
            converted = Path(str(ctx.source_gguf))
        else:
            converted = out_dir / "converted-f16.gguf"
            ctx.emit("converting to GGUF F16")
            convert_to_gguf(input_dir, converted, "F16")
        timings["convert_s"] = time.perf_counter() - started
        arch, _shapes = gguf_tensor_names(converted)
        base = read_tensors(converted)
        units: dict[str, list[str]] = {}
        for name in matrices(base):
            units.setdefault(unit_of(name), []).append(name)
        fixed = sum(int(t.n_bytes) for name, t in base.items() if len(t.shape) < 2)  # norms: F32 in every file
        parameters = sum(int(t.n_elements) for t in base.values())
        budget = int(options.target_mb * 1e6) if options.target_mb is not None else int(options.target_bpw * parameters / 8)

        extra: dict[str, Any] = {}
        matrix = None
        if options.imatrix is not None:
            started = time.perf_counter()
            matrix, extra["imatrix"] = imatrix_for(input_dir, converted, out_dir, options.imatrix, ctx)
            timings["imatrix_s"] = time.perf_counter() - started

        started = time.perf_counter()
        candidate_files = _quantize_candidates(converted, out_dir, options.candidates, matrix, ctx, from_source_file)
        timings["candidates_s"] = time.perf_counter() - started
        # The smallest file the candidates allow is known now: refuse an impossible budget before measuring.
        stored = {t: read_tensors(p) for t, p in candidate_files.items()}
        cheapest = {unit: [Option(t, sum(int(stored[t][n].n_bytes) for n in names), 0.0) for t in stored]
                    for unit, names in units.items()}
        del stored
        try:
            check_budget(cheapest, budget, fixed)
        except WorkbenchError:
            for path in candidate_files.values():
                path.unlink()
            raise

        started = time.perf_counter()
        table, cached = _sensitivity_table(input_dir, options, extra.get("imatrix", {}).get("hash"), base, arch,
                                           candidate_files, units, ctx, quantized_from=converted.name)
        if cached:
            timings["sensitivity_cached"] = True
        timings["sensitivity_s"] = time.perf_counter() - started

        chosen = optimal(table, budget, fixed)
        walk = greedy(table, budget, fixed)
        ctx.emit(f"writing the mix: predicted {total_bytes(chosen, fixed) / 1e6:.2f} MB of tensors for a "
                 f"{budget / 1e6:.2f} MB budget")
        started = time.perf_counter()
        quantize_gguf(converted, out_dir / GGUF_NAME, CARRIER_FTYPE, ctx.threads, True, imatrix=matrix,
                      overrides={unit_pattern(unit): option.type for unit, option in chosen.items()},
                      allow_requantize=from_source_file)
        timings["quantize_s"] = time.perf_counter() - started
        for path in (*candidate_files.values(), *([] if from_source_file else [converted])):
            path.unlink()
        written = sum(int(t.n_bytes) for t in read_tensors(out_dir / GGUF_NAME).values())
        if written != total_bytes(chosen, fixed):
            raise WorkbenchError(f"gguf-auto: the file holds {written} tensor bytes, the table predicted "
                                 f"{total_bytes(chosen, fixed)}; llama.cpp chose other types than measured")
        extra["auto"] = {
            "budget_bytes": budget, "target_mb": options.target_mb, "target_bpw": options.target_bpw,
            "candidates": options.candidates, "fixed_bytes": fixed, "tensor_bytes": written,
            "choice": {unit: option.type for unit, option in chosen.items()},
            "predicted_kld_sum": total_kld(chosen),
            "greedy": {"choice": {u: o.type for u, o in walk.items()}, "tensor_bytes": total_bytes(walk, fixed),
                       "predicted_kld_sum": total_kld(walk)},
            "sensitivity": {**describe(options.sensitivity), "tokens": options.sensitivity.samples * options.sensitivity.seq_len,
                            "table": {u: [o.__dict__ for o in opts] for u, opts in table.items()}},
            "allocation": "exact dynamic programming over the measured table (units' KLDs assumed additive)",
        }
        _finish(out_dir, input_dir, ctx, options.n_gpu_layers, {"requested": "auto", **timings}, extra)

    def estimate_size(self, options: MethodOptions, size: SizeInput) -> SizeEstimate:
        """The budget, within what the candidates can make: the chosen mix is known only after measuring, and
        it fills the budget from below; a budget under the smallest possible file is refused at build time."""
        from workbench.planning.gguf_plan import auto_floor

        assert isinstance(options, GGUFAutoOptions)
        shape, candidates = size.shape, list(options.candidates)
        parameters = sum(nx * ny for *_, nx, ny in shape.gguf_tensors())
        if options.target_mb is not None:
            budget, label = int(options.target_mb * 1e6), f"{options.target_mb:g} MB"
        else:
            budget, label = int(float(options.target_bpw or 0) * parameters / 8), f"{options.target_bpw} bpw"
        floor = auto_floor(shape, candidates)
        ceiling = auto_floor(shape, candidates, pick=max)
        size.notes.append(f"gguf-auto fills a {label} budget ({budget / 1e6:.1f} MB of tensors) from candidates "
                          f"{', '.join(candidates)}: at most the budget")
        if budget < floor:
            size.notes.append(f"the budget is below the smallest file these candidates make ({floor / 1e6:.1f} MB): "
                              "the build will refuse it")
        return SizeEstimate(min(max(budget, floor), ceiling), f"gguf-auto {label}", "gguf")

    def estimate_build_s(self, options: MethodOptions, shape: "ModelShape", speed: BuildSpeed) -> float:
        """One conversion, one quantize pass per candidate, one forward per (unit, candidate) on the sensitivity tokens."""
        assert isinstance(options, GGUFAutoOptions)
        n_candidates = len(options.candidates)
        tokens = options.sensitivity.samples * options.sensitivity.seq_len
        units = shape.layers + (1 if shape.tied else 2)
        return (convert_and_quantize_s(shape, speed) + imatrix_s(options.imatrix, shape, speed)
                + n_candidates * quantize_pass_s(shape, speed)
                + n_candidates * units * (speed.forward_s(tokens, shape.params()) + shape.params() * 2e-9))


def _quantize_candidates(converted: Path, out_dir: Path, candidates: list[str], matrix: Any,
                         ctx: BuildContext, allow_requantize: bool) -> dict[str, Path]:
    """Every matrix quantized to each candidate type, one file per type: the blocks the sensitivities swap in."""
    files = {}
    for type_name in candidates:
        ctx.emit(f"quantizing every matrix to {type_name}")
        path = out_dir / f"candidate-{type_name}.gguf"
        quantize_gguf(converted, path, CARRIER_FTYPE, ctx.threads, True, imatrix=matrix,
                      overrides={r"\.weight$": type_name}, allow_requantize=allow_requantize)
        files[type_name] = path
    return files


def _sensitivity_table(input_dir: Path, options: GGUFAutoOptions, imatrix_hash: str | None, base: dict, arch: str,
                       candidate_files: dict[str, Path], units: dict[str, list[str]],
                       ctx: BuildContext, quantized_from: str) -> tuple[dict[str, list[Option]], bool]:
    """(per-unit options with their measured KLD, whether the table came from the cache). The same input,
    candidates, matrix and calibration tokens give the same table, so it is cached under those."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workbench.environment import library_versions

    material = {"input": str(input_dir), "quantized_from": quantized_from, "candidates": options.candidates, "imatrix": imatrix_hash,
                "sensitivity": options.sensitivity.model_dump(), "versions": library_versions()}
    cache = sensitivity_cache("gguf-auto", material)
    if cache.is_file():
        ctx.emit("per-block sensitivities from the cache")
        raw = json.loads(cache.read_text())
        return {unit: [Option(**o) for o in options_] for unit, options_ in raw["table"].items()}, True
    tokenizer = AutoTokenizer.from_pretrained(input_dir, trust_remote_code=ctx.trust_remote_code)
    sequences = calibration_sequences(tokenizer, options.sensitivity)
    model = AutoModelForCausalLM.from_pretrained(input_dir, dtype=torch.float32, trust_remote_code=ctx.trust_remote_code)
    model.eval()
    table = measure_table(TorchSlots(model, base, arch), KLDProbe(model, sequences), candidate_files, units, ctx.emit)
    cache.write_text(json.dumps({"material": material, "table": {u: [o.__dict__ for o in opts] for u, opts in table.items()}}))
    return table, False
