"""torchao on the tiny Llama, checked against plain torch: the packed weights are the quantization written out
here, the logits are those of a float model holding those weights, the bytes held are the packed ones, and the
speed-measured honesty label follows the measured figures."""

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
from workbench.runtimes.torch import unpacked_weight

IDS = list(range(3, 35))


def _build(source: Path, out: Path, **options) -> Path:
    require("torchao")
    method = get_method("torchao")
    out.mkdir(parents=True)
    method().build(source, out, method.Options.model_validate(options),
                   BuildContext(device="cpu", threads=1, trust_remote_code=False, emit=lambda _m: None))
    return out


def _load(folder: Path):
    return load_variant("torch", name="ao", artifact_path=folder, device="cpu", threads=1)


def _float_model(source: Path, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(source, dtype=dtype).eval()


def _int8_rows(weight: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 per output row, written out: scale = max|w| / 127.5 (torchao's symmetric mapping spreads the
    range over (127 - (-128)) / 2, quant_primitives.py `_choose_qparams_affine`), q = round(w / scale) clamped to
    [-128, 127], w' = q * scale. Multiplied by 1 / scale as torchao's quantize_affine does: the row's largest weight
    sits on the tie w / scale = -127.5, which the two roundings of a division and a reciprocal settle differently."""
    scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.5
    return (weight * (1.0 / scale)).round().clamp(-128, 127) * scale


def test_int8_weights_are_the_plain_per_row_quantization_and_the_logits_follow(tiny_model_dir, tmp_path) -> None:
    folder = _build(tiny_model_dir, tmp_path / "a", scheme="int8-weight-only", dtype="float32")
    variant = _load(folder)
    try:
        original = _float_model(tiny_model_dir)
        reference = _float_model(tiny_model_dir)  # the same model with the quantized values put in by hand
        packed = 0
        with torch.no_grad():
            for name, module in reference.named_modules():
                if isinstance(module, torch.nn.Linear) and (name.startswith("model.layers.") or name == "lm_head"):
                    module.weight.copy_(_int8_rows(module.weight))
                    mine = unpacked_weight(variant.model.get_submodule(name).weight).float()
                    assert torch.allclose(mine, module.weight, atol=1e-6, rtol=1e-5), name
                    packed += 1
        assert packed == 2 * 7 + 1  # two layers of seven Linears, and the head
        got = torch.from_numpy(variant.logits(IDS))
        with torch.no_grad():
            expected = reference(input_ids=torch.tensor([IDS])).logits[0]
            source = original(input_ids=torch.tensor([IDS])).logits[0]
        assert torch.allclose(got, expected, atol=2e-3), float((got - expected).abs().max())
        # ... and int8 moved them: the test would pass vacuously on an unquantized model otherwise
        assert float((got - source).abs().max()) > 10 * float((got - expected).abs().max())
        # bytes held: int8 values, a float32 scale and an int8 zero point (0: symmetric) per row, float32 for the rest
        float_bytes = sum(p.numel() * 4 for p in original.parameters())
        linear = [m.weight for n, m in original.named_modules()
                  if isinstance(m, torch.nn.Linear) and (n.startswith("model.layers.") or n == "lm_head")]
        expected_bytes = float_bytes - sum(w.numel() * 3 - w.shape[0] * 5 for w in linear)
        assert variant.footprint().weight_bytes == expected_bytes
        assert sum(1 for _ in variant.weight_matrices()) == packed + 1  # and the embedding
        report = json.loads((folder / "stage_report.json").read_text())["torchao"]
        assert report["packed_layers"] == packed and report["head"] is True
    finally:
        variant.close()


def test_int4_groups_stay_within_half_a_step_and_the_tied_embedding_stays_float(tiny_tied_dir, tmp_path) -> None:
    folder = _build(tiny_tied_dir, tmp_path / "a", scheme="int4-weight-only", group_size=32, dtype="bfloat16")
    variant = _load(folder)
    try:
        original = _float_model(tiny_tied_dir)
        model = variant.model
        assert not model.config.tie_word_embeddings  # untied so the lookup keeps its own bfloat16 table
        assert torch.equal(model.model.embed_tokens.weight.float(), original.model.embed_tokens.weight.bfloat16().float())
        for name, module in original.named_modules():
            if not (isinstance(module, torch.nn.Linear) and (name.startswith("model.layers.") or name == "lm_head")):
                continue
            weight = module.weight.detach().bfloat16().float()
            groups = weight.reshape(weight.shape[0], -1, 32)
            step = (groups.amax(-1) - groups.amin(-1)) / 15  # 16 levels spanning each group's range
            error = (unpacked_weight(model.get_submodule(name).weight).float().reshape_as(groups) - groups).abs()
            # half a step, plus the bfloat16 rounding of the scale and zero point
            assert bool((error <= step[..., None] * 0.5 + 0.02 * groups.abs().amax(-1, keepdim=True) + 1e-3).all()), name
        bf16_bytes = sum(p.numel() * 2 for p in original.parameters())  # tied: the table once
        assert variant.footprint().weight_bytes < bf16_bytes  # the packed head costs less than the float copy saves
        logits = torch.from_numpy(variant.logits(IDS))
        with torch.no_grad():
            source = original(input_ids=torch.tensor([IDS])).logits[0]
        agree = float((logits.argmax(-1) == source.argmax(-1)).float().mean())
        assert agree >= 0.5 and bool(torch.isfinite(logits).all())
    finally:
        variant.close()


def test_int4_group_size_that_does_not_divide_a_width_is_refused_before_building(tiny_model_dir) -> None:
    method = get_method("torchao")
    shape, _ = read_shape(str(tiny_model_dir))
    check = ShapeCheck(model="tiny", shape=shape, rest="float32", last=True)
    reasons = method().refusals(method.Options(scheme="int4-weight-only", group_size=256), check)
    assert reasons and "group_size 256 does not divide the input widths 64, 128" in reasons[0]
    assert method().refusals(method.Options(scheme="int4-weight-only", group_size=32), check) == []
    with pytest.raises(ValueError, match="group_size applies to int4-weight-only only"):
        method.Options(scheme="int8-weight-only", group_size=64)
