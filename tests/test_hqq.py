"""HQQ on the tiny Llama, checked against plain torch: every stored group reconstructs within half a
quantization step of its own scale, the stored file is safetensors holding the packed integers, the reloaded
model computes what the quantized one did, and the bytes held and planned are the packed ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.requirements import require
from workbench.methods.base import BuildContext, ShapeCheck
from workbench.methods.registry import get_method
from workbench.planning.modelshape import read_shape
from workbench.runtimes import load_variant

IDS = list(range(3, 35))


def _build(source: Path, out: Path, **options) -> Path:
    require("hqq")
    method = get_method("hqq")
    out.mkdir(parents=True)
    method().build(source, out, method.Options.model_validate(options),
                   BuildContext(device="cpu", threads=1, trust_remote_code=False, emit=lambda _m: None))
    return out


@pytest.mark.parametrize("nbits", [4, 2])
def test_groups_reconstruct_within_half_a_step_and_reload_computes_the_same(tiny_model_dir, tmp_path, nbits) -> None:
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    folder = _build(tiny_model_dir, tmp_path / "a", nbits=nbits, group_size=32)
    assert not list(folder.glob("*.pt")) and not list(folder.glob("*.bin"))
    with safe_open(str(folder / "model.safetensors"), "pt") as stored:
        packed = stored.get_tensor("model.layers.0.mlp.down_proj.W_q")
    assert packed.dtype == torch.uint8 and packed.numel() == 128 * 64 * nbits // 8  # 8 / nbits values per byte
    variant = load_variant("torch", name="hqq", artifact_path=folder, device="cpu", threads=1)
    try:
        original = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
        matrices = dict(variant.weight_matrices())
        linears = [n for n, m in original.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")]
        assert len(linears) == 14 and set(linears) <= set(matrices)
        levels = 2 ** nbits - 1
        for name in linears:
            weight = original.get_submodule(name).weight.detach()
            groups = weight.reshape(-1, 32)
            error = (matrices[name].reshape(-1, 32) - groups).abs()
            # HQQ moves each group's zero point off min/max (its solver), but its scale spans the group's range:
            # no value ends further than a step from its integer grid, a step being (max - min) / levels
            step = (groups.amax(-1) - groups.amin(-1)) / levels
            assert bool((error <= step[:, None] * 1.0 + 1e-6).all()), name
            assert float(error.mean()) <= float(step.mean()) / 2, name  # on average within half a step
        # the float model holding the reconstructed weights computes the variant's logits
        with torch.no_grad():
            for name in linears:
                original.get_submodule(name).weight.copy_(matrices[name])
            expected = original(input_ids=torch.tensor([IDS])).logits[0]
        assert torch.allclose(torch.from_numpy(variant.logits(IDS)), expected, atol=1e-4)
        # bytes held: the packed integers, a float32 scale and zero per group, hqq's metadata (encoded as small
        # uint8 tensors), float32 for the rest
        held = variant.footprint().weight_bytes
        plain = sum(p.numel() * 4 for n, p in original.named_parameters()
                    if not n.startswith("model.layers.") or not n.endswith("proj.weight"))
        values = sum(original.get_submodule(n).weight.numel() for n in linears)
        assert plain + values * nbits // 8 + values // 32 * 8 <= held <= plain + values * nbits // 8 + values // 32 * 8 + 14 * 128  # metadata: under 128 B a layer
        report = json.loads((folder / "stage_report.json").read_text())["hqq"]
        assert report["nbits"] == nbits and report["layers"] == 14
    finally:
        variant.close()


def test_a_tied_model_stores_one_table_and_ties_it_again(tiny_tied_dir, tmp_path) -> None:
    from safetensors import safe_open

    folder = _build(tiny_tied_dir, tmp_path / "a", nbits=4, group_size=32)
    with safe_open(str(folder / "model.safetensors"), "pt") as stored:
        assert "lm_head.weight" not in stored.keys()
    variant = load_variant("torch", name="hqq", artifact_path=folder, device="cpu", threads=1)
    try:
        assert variant.model.lm_head.weight is variant.model.model.embed_tokens.weight
        assert bool(torch.isfinite(torch.from_numpy(variant.logits(IDS))).all())
    finally:
        variant.close()


def test_group_size_that_does_not_divide_a_width_is_refused(tiny_model_dir) -> None:
    method = get_method("hqq")
    shape, _ = read_shape(str(tiny_model_dir))
    check = ShapeCheck(model="tiny", shape=shape, rest="float32", last=True)
    assert "hqq group_size 256 does not divide the input widths 64, 128" in method().refusals(
        method.Options(group_size=256), check)[0]
    assert method().refusals(method.Options(group_size=32), check) == []
