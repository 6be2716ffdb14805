"""Compression methods keep their promise, measured independently of their own code.

One table, METHOD_CASES, drives one test: build the method on the tiny random Llama, load the result
through the runtime every variant goes through, check the promised property (zero fraction, distinct
values, shapes, parameter count) with plain torch, and check the model still runs. Adding a method
(or a configuration) adds a row; `requires` skips a row whose library is missing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest

from tests.requirements import require
import torch

from workbench.errors import PresetError, WorkbenchError
from workbench.methods.base import BuildContext
from workbench.methods.registry import get_method
from workbench.config.presets import parse_preset
from workbench.runtimes import load_variant


@dataclass
class Built:
    """What a check sees: the original float model, the loaded variant, its folder and build report."""

    original: Any
    variant: Any
    folder: Path
    source: Path

    @property
    def model(self) -> Any:
        return self.variant.model


@dataclass(frozen=True)
class Case:
    id: str
    method: str
    options: dict
    check: Callable[[Built], None]
    model: str = "tiny_model_dir"  # the fixture naming the input folder
    requires: str | None = None  # a module that must import, else the row is skipped
    marks: tuple = field(default_factory=tuple)  # extra pytest marks (slow, timeout, ...)


def _decoder_linears(model: Any) -> dict[str, torch.Tensor]:
    """Every decoder-layer Linear weight by module name (what targets: linear selects), read with plain torch."""
    return {name: module.weight.detach() for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and name.startswith("model.layers.")}


def _parameters(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields tied weights once


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def check_magnitude_half_per_layer(built: Built) -> None:
    original, pruned = _decoder_linears(built.original), _decoder_linears(built.model)
    assert pruned.keys() == original.keys()
    for name, weight in pruned.items():
        zeros = int((weight == 0).sum())
        assert abs(zeros - weight.numel() / 2) <= 1, (name, zeros, weight.numel())
        before, kept = original[name], weight != 0
        assert torch.equal(weight[kept], before[kept])  # survivors unchanged
        assert before[~kept].abs().max() <= before[kept].abs().min()  # the smallest magnitudes went
    assert int((built.model.lm_head.weight == 0).sum()) == 0  # not targeted by default
    assert int((built.model.model.embed_tokens.weight == 0).sum()) == 0


def check_magnitude_global(built: Built) -> None:
    pruned = _decoder_linears(built.model)
    zeros, total = sum(int((w == 0).sum()) for w in pruned.values()), sum(w.numel() for w in pruned.values())
    assert abs(zeros - 0.3 * total) <= 1
    assert int((built.model.model.layers[0].mlp.down_proj.weight == 0).sum()) > 0


def check_structured(built: Built) -> None:
    # tiny: hidden 64, MLP 128, 4 heads of 16 in 2 KV groups. mlp 0.25 -> 96; heads 0.5 -> 1 group (2 q heads).
    config = built.model.config
    assert (config.intermediate_size, config.num_attention_heads, config.num_key_value_heads) == (96, 2, 1)
    layer = built.model.model.layers[0]
    assert layer.mlp.gate_proj.weight.shape == (96, 64) and layer.mlp.down_proj.weight.shape == (64, 96)
    assert layer.self_attn.q_proj.weight.shape == (32, 64) and layer.self_attn.k_proj.weight.shape == (16, 64)
    assert layer.self_attn.v_proj.weight.shape == (16, 64) and layer.self_attn.o_proj.weight.shape == (64, 32)
    removed_per_layer = 3 * 32 * 64 + (32 + 16 + 16) * 64 + 64 * 32
    assert _parameters(built.model) == _parameters(built.original) - 2 * removed_per_layer
    kept_rows = built.original.model.layers[0].mlp.up_proj.weight
    assert all(any(torch.equal(row, r) for r in kept_rows) for row in layer.mlp.up_proj.weight)  # rows, not new values


def check_kmeans_4(built: Built) -> None:
    original = _decoder_linears(built.original)
    for name, weight in _decoder_linears(built.model).items():
        values = torch.unique(weight)
        assert len(values) <= 4, (name, len(values))
        # each weight holds its nearest shared value
        nearest = (original[name].flatten()[:, None] - values[None, :]).abs().min(dim=1).values
        assert torch.allclose((original[name] - weight).abs().flatten(), nearest, atol=1e-6)
    assert torch.equal(built.model.model.embed_tokens.weight, built.original.model.embed_tokens.weight)
    assert _folder_bytes(built.folder) < _folder_bytes(built.source)
    # 4 values -> 2-bit indices: the clustered weights take a quarter byte each on disk (plus fp16 codebooks)
    from safetensors import safe_open

    with safe_open(built.folder / "kmeans.safetensors", "pt") as stored:
        index_bytes = sum(stored.get_tensor(k).numel() for k in stored.keys() if k.endswith(".indices"))
    assert index_bytes == sum(-(-w.numel() // 4) for w in original.values())


def check_tied_head_survives(built: Built) -> None:
    model = built.model
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.model.embed_tokens.weight, built.original.model.embed_tokens.weight)


def check_lowrank_8(built: Built) -> None:
    original = _decoder_linears(built.original)
    # every decoder Linear (in, out) becomes r * (in + out) weights, biases (none here) unchanged
    expected = _parameters(built.original) - sum(w.numel() - 8 * sum(w.shape) for w in original.values())
    assert _parameters(built.model) == expected
    for name, weight in original.items():
        module = built.model.get_submodule(name)
        restored = module.expand.weight @ module.reduce.weight
        singular = torch.linalg.svdvals(weight)
        best_error = singular[8:].square().sum().sqrt()  # Eckart-Young: the optimum for rank 8
        assert torch.isclose((weight - restored).norm(), best_error, rtol=1e-3), name


def check_lowrank_energy(built: Built) -> None:
    factorised = 0
    for name, weight in _decoder_linears(built.original).items():
        energy = torch.cumsum(torch.linalg.svdvals(weight).double() ** 2, 0)
        energy = energy / energy[-1]
        rank = int((energy < 0.5 - 1e-9).sum()) + 1  # smallest rank keeping half the energy
        module = built.model.get_submodule(name)
        if rank * sum(weight.shape) < weight.numel():
            assert module.reduce.weight.shape == (rank, weight.shape[1]), name
            factorised += 1
        else:
            assert isinstance(module, torch.nn.Linear), name  # not worth factorising: left as it was
    assert factorised > 0


def check_same_logits_as_original(built: Built) -> None:
    """Nothing was worth changing: the custom loader must rebuild exactly the original model."""
    ids = torch.arange(3, 19)[None]
    with torch.no_grad():
        expected = built.original(input_ids=ids).logits[0]
    assert torch.allclose(torch.from_numpy(built.variant.logits(ids[0].tolist())), expected, atol=1e-5)
    assert _parameters(built.model) == _parameters(built.original)


METHOD_CASES = [
    Case("magnitude-50", "magnitude", {"sparsity": 0.5}, check_magnitude_half_per_layer),
    Case("magnitude-global-30", "magnitude", {"sparsity": 0.3, "scope": "global"}, check_magnitude_global),
    Case("structured", "structured", {"mlp_fraction": 0.25, "heads_fraction": 0.5, "calibration_tokens": 300},
         check_structured),
    Case("structured-l1", "structured", {"mlp_fraction": 0.25, "heads_fraction": 0.5, "importance": "l1"},
         check_structured),
    Case("kmeans-4", "kmeans", {"k": 4, "sample_size": 1000}, check_kmeans_4, requires="sklearn"),
    Case("kmeans-tied", "kmeans", {"k": 8}, check_tied_head_survives, model="tiny_tied_dir", requires="sklearn"),
    Case("lowrank-8", "lowrank", {"rank": 8}, check_lowrank_8),
    Case("lowrank-energy", "lowrank", {"energy": 0.5}, check_lowrank_energy),
    Case("lowrank-tied", "lowrank", {"rank": 4}, check_tied_head_survives, model="tiny_tied_dir"),
    Case("lowrank-lossless", "lowrank", {"energy": 1.0}, check_same_logits_as_original),  # no layer gets smaller
]


def _compressed_tensors_config(folder: Path) -> dict:
    import json

    return json.loads((folder / "config.json").read_text())["quantization_config"]


def check_packed_int4(built: Built) -> None:
    config = _compressed_tensors_config(built.folder)
    weights = config["config_groups"]["group_0"]["weights"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    assert weights["num_bits"] == 4 and weights["group_size"] == 32
    from safetensors import safe_open

    with safe_open(str(next(built.folder.glob("*.safetensors"))), "pt") as tensors:
        packed = [k for k in tensors.keys() if k.endswith("weight_packed")]
        assert len(packed) == 2 * 7 and tensors.get_tensor(packed[0]).dtype == torch.int32  # 8 int4 values per int32
    assert _folder_bytes(built.folder) < _folder_bytes(built.source)  # the packed checkpoint is smaller than fp32


def check_half_zeros_per_layer(built: Built) -> None:
    for name, weight in _decoder_linears(built.model).items():
        assert abs(int((weight == 0).sum()) / weight.numel() - 0.5) < 0.02, name


def check_two_of_four(built: Built) -> None:
    for name, weight in _decoder_linears(built.model).items():
        groups = (weight.reshape(weight.shape[0], -1, 4) == 0).sum(-1)  # consecutive input columns, per row
        assert int(groups.min()) >= 2, name


_CALIBRATION = {"samples": 4, "seq_len": 64}
METHOD_CASES += [
    Case("gptq-w4g32", "gptq", {"bits": 4, "group_size": 32, "calibration": _CALIBRATION}, check_packed_int4,
         requires="llmcompressor"),
    Case("awq-w4g32", "awq", {"bits": 4, "group_size": 32, "calibration": _CALIBRATION}, check_packed_int4,
         requires="llmcompressor"),
    Case("wanda-50", "wanda", {"sparsity": 0.5, "calibration": _CALIBRATION}, check_half_zeros_per_layer,
         requires="llmcompressor"),
    Case("sparsegpt-2of4", "sparsegpt", {"mask": "2:4", "calibration": _CALIBRATION}, check_two_of_four,
         requires="llmcompressor"),
    Case("wanda-2of4", "wanda", {"mask": "2:4", "calibration": _CALIBRATION}, check_two_of_four,
         requires="llmcompressor"),
]


def check_torchao_packed(built: Built) -> None:
    """Every decoder Linear and the head hold torchao tensors (the loader packed them); the embedding does not."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    for name, module in built.model.named_modules():
        if isinstance(module, torch.nn.Linear):
            assert is_traceable_wrapper_subclass(module.weight.data), name
    assert not is_traceable_wrapper_subclass(built.model.model.embed_tokens.weight.data)


def check_hqq_layers(built: Built) -> None:
    """Every decoder Linear became an HQQLinear holding packed integers; the head and embedding stay float."""
    from hqq.core.quantize import HQQLinear

    layers = [m for n, m in built.model.named_modules() if n.startswith("model.layers.") and isinstance(m, HQQLinear)]
    assert len(layers) == 2 * 7 and all(m.W_q.dtype in (torch.uint8, torch.int32) for m in layers)
    assert isinstance(built.model.lm_head, torch.nn.Linear)


METHOD_CASES += [
    Case("torchao-int8", "torchao", {"scheme": "int8-weight-only"}, check_torchao_packed, requires="torchao"),
    Case("torchao-int8-dynamic", "torchao", {"scheme": "int8-dynamic", "dtype": "float32"}, check_torchao_packed,
         requires="torchao"),
    Case("torchao-int4-tied", "torchao", {"scheme": "int4-weight-only", "group_size": 32}, check_torchao_packed,
         model="tiny_tied_dir", requires="torchao"),
    Case("hqq-3bit", "hqq", {"nbits": 3, "group_size": 32}, check_hqq_layers, requires="hqq"),
]


def build(method_name: str, source: Path, out: Path, options: dict) -> Path:
    method = get_method(method_name)()
    out.mkdir(parents=True, exist_ok=True)
    context = BuildContext(device="cpu", threads=1, trust_remote_code=False, emit=lambda _m: None)
    method.build(source, out, method.Options.model_validate(options), context)
    return out


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in METHOD_CASES])
def test_method_keeps_its_promise(case: Case, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    if case.requires:
        require(case.requires)
    source = request.getfixturevalue(case.model)
    folder = build(case.method, source, tmp_path / "artifact", case.options)
    assert not list(folder.rglob("*.bin")) and not list(folder.rglob("*.pt"))  # safetensors only, never pickle
    assert (folder / "stage_report.json").is_file()
    variant = load_variant(get_method(case.method).runtime, name=case.id, artifact_path=folder, device="cpu",
                           threads=1)
    try:
        original = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
        case.check(Built(original=original, variant=variant, folder=folder, source=source))
        ids = list(range(3, 19))
        logits = variant.logits(ids)
        assert logits.shape == (len(ids), original.config.vocab_size)
        assert bool(torch.isfinite(torch.from_numpy(logits)).all())
        tokens = list(variant.generate(ids, 4))
        assert len(tokens) == 4 and all(0 <= t < original.config.vocab_size for t in tokens)
        footprint = variant.footprint()
        assert footprint.weight_bytes > 0 and footprint.disk_bytes > 0
        assert any(True for _ in variant.weight_matrices())
    finally:
        variant.close()


def _preset(*variants: dict) -> dict:
    return {"name": "t", "model": "bundled:smollm2-135m-instruct", "baseline": "fp32",
            "variants": [{"name": "fp32", "method": "fp32"}, *variants]}


BAD_OPTIONS = [
    ("sparsity one", {"method": "magnitude", "options": {"sparsity": 1.0}}, "sparsity must be in [0, 1): got 1.0"),
    ("sparsity negative", {"method": "magnitude", "options": {"sparsity": -0.1}},
     "sparsity must be in [0, 1): got -0.1"),
    ("k one", {"method": "kmeans", "options": {"k": 1}}, "k must be at least 2 (got 1)"),
    ("k too big", {"method": "kmeans", "options": {"k": 300}}, "k must be at most 256 (got 300)"),
    ("rank and energy", {"method": "lowrank", "options": {"rank": 8, "energy": 0.9}},
     "give either rank (8) or energy (0.9), not both"),
    ("nothing to remove", {"method": "structured", "options": {"mlp_fraction": 0}}, "nothing would be removed"),
]


@pytest.mark.parametrize("variant,message", [(v, m) for _, v, m in BAD_OPTIONS], ids=[c for c, _, _ in BAD_OPTIONS])
def test_bad_options_are_named_in_the_preset(variant: dict, message: str) -> None:
    with pytest.raises(PresetError) as error:
        parse_preset(_preset({"name": "x", **variant}))
    assert message in str(error.value)


def test_rank_above_a_layer_names_its_max_rank(tiny_model_dir: Path, tmp_path: Path) -> None:
    # tiny k_proj / v_proj: 64 -> 2 KV heads x 16 = 32 outputs, so 32 is their max rank
    with pytest.raises(WorkbenchError, match=r"rank 40 is larger than layer model\.layers\.0\.self_attn\.k_proj "
                                             r"allows: its max rank is 32"):
        build("lowrank", tiny_model_dir, tmp_path / "out", {"rank": 40})


def test_structured_fraction_that_removes_everything_says_the_max(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(WorkbenchError, match=r"would remove all 2 KV-head groups.*at most 0\.5 \(1 of 2\)"):
        build("structured", tiny_model_dir, tmp_path / "out", {"mlp_fraction": 0, "heads_fraction": 0.9})


def test_custom_loader_refuses_tensors_that_do_not_fit(tiny_model_dir: Path, tmp_path: Path) -> None:
    import json

    folder = build("lowrank", tiny_model_dir, tmp_path / "out", {"rank": 8})
    details = json.loads((folder / "workbench_loader.json").read_text())
    details["ranks"].pop("model.layers.0.mlp.up_proj")  # the loader would build a plain Linear there
    (folder / "workbench_loader.json").write_text(json.dumps(details))
    with pytest.raises(WorkbenchError, match=r"missing: model\.layers\.0\.mlp\.up_proj\.weight; unexpected: "
                                             r"model\.layers\.0\.mlp\.up_proj\.expand\.weight"):
        load_variant("torch", name="x", artifact_path=folder, device="cpu", threads=1)


def test_tied_head_is_not_compressed_on_request(tiny_tied_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(WorkbenchError, match="ties lm_head to the input embeddings"):
        build("magnitude", tiny_tied_dir, tmp_path / "out", {"include_lm_head": True})


@pytest.mark.parametrize("k", [2, 3, 4, 16, 17, 200, 256])
def test_kmeans_indices_pack_into_log2_k_bits(k: int) -> None:
    from workbench.methods.kmeans import index_bits, pack, unpack

    indices = torch.randint(0, k, (37, 11), dtype=torch.uint8)
    packed = pack(indices, index_bits(k))
    assert packed.dtype == torch.uint8 and packed.numel() == -(-indices.numel() * index_bits(k) // 8)
    assert torch.equal(unpack(packed, index_bits(k), indices.numel()).view(37, 11), indices)


def test_custom_artifact_cannot_feed_bitsandbytes_but_a_pruned_one_can() -> None:
    with pytest.raises(PresetError) as error:
        parse_preset(_preset({"name": "x", "pipeline": [{"method": "lowrank", "options": {"rank": 8}},
                                                        {"method": "bnb-nf4"}]}))
    assert "stage 'bnb-nf4' cannot take the output of 'lowrank' (a custom artifact" in str(error.value)
    preset = parse_preset(_preset({"name": "x", "pipeline": [{"method": "magnitude", "options": {"sparsity": 0.5}},
                                                             {"method": "bnb-nf4"}]}))
    assert [s.method for s in preset.variant("x").stages()] == ["magnitude", "bnb-nf4"]


def test_heavy_libraries_are_not_imported_by_the_method_modules() -> None:
    import subprocess
    import sys

    code = ("import sys; from workbench.methods.registry import get_method\n"
            "for n in ('magnitude', 'structured', 'kmeans', 'lowrank'): get_method(n)\n"
            "print(sorted(m for m in ('torch', 'transformers', 'sklearn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ}, cwd=Path(__file__).parent.parent).stdout
    assert out.strip() == "[]"
