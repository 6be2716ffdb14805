"""AutoRound: GGUF files checked against the source weights and run by llama.cpp, its own checkpoint run by torch.

The truth here is never AutoRound's word: the GGUF blocks are read with gguf-py (an independent reader of
llama.cpp's formats), every weight is compared with the float source on the file's own grid, logits come from
llama.cpp and from plain transformers, and weight bytes from the loaded model.

The model: the 2-layer Llama of tests/conftest.py's `tiny_model_dir` (hidden 64, intermediate 128, untied head),
but with SmolLM2's tokenizer rebuilt from the bundled GGUF file's own vocabulary (workbench/data/gguf_vocab.py,
seconds): the llama.cpp converter AutoRound bundles knows BPE tokenizers only by hash and refuses the tiny model's
own trained one (the last test checks that refusal). Embeddings are scaled by 20, so the block outputs, and with
them AutoRound's tuning loss, are large enough to show in its log.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from tests.requirements import require
from workbench.errors import WorkbenchError
from workbench.methods.autoround import (
    EXPORT_DIR, GGUF_TYPES, AutoRound, AutoRoundGGUFOptions, AutoRoundNative, AutoRoundNativeOptions,
)
from workbench.methods.base import BuildContext, ShapeCheck, SizeInput

CTX = BuildContext(device="cpu", threads=1, trust_remote_code=False, emit=lambda _m: None)
CALIBRATION = {"samples": 2, "seq_len": 32, "text": "pydoc", "seed": 0}
HF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
            "ffn_down": "mlp.down_proj"}
Q4_0_BLOCK_BYTES = 18  # ggml's block_q4_0: a float16 scale d, then 32 4-bit values (weight = d * (q - 8))


@pytest.fixture(scope="module")
def smol_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_model_dir's shape with a tokenizer llama.cpp's converter recognises (SmolLM2's, from the bundled file)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from workbench.data.gguf_vocab import tokenizer_from_gguf
    from workbench.data.sources import bundled_gguf_path

    folder = tmp_path_factory.mktemp("smol-vocab-llama")
    tokenizer = tokenizer_from_gguf(bundled_gguf_path())
    assert tokenizer is not None
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(20)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def rtn_gguf(smol_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    require("auto_round")
    out = tmp_path_factory.mktemp("autoround-rtn")
    AutoRound().build(smol_llama, out, AutoRoundGGUFOptions(gguf_type="q4_0", iters=0), CTX)
    return out


@pytest.fixture(scope="module")
def tuned_gguf(smol_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    require("auto_round")
    out = tmp_path_factory.mktemp("autoround-tuned")
    AutoRound().build(smol_llama, out, AutoRoundGGUFOptions(gguf_type="Q4_0", iters=5, calibration=CALIBRATION), CTX)
    return out


def _report(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "stage_report.json").read_text())


def _source_matrix(source: dict[str, np.ndarray], gguf_name: str) -> np.ndarray:
    """The float weight a GGUF matrix was made from, rows in the file's order: llama.cpp's converter permutes the
    rows of attn_q / attn_k for its rotary layout (LlamaModel.permute: heads, then the two halves interleaved)."""
    _blk, layer, part, _weight = gguf_name.split(".")
    weight = source[f"model.layers.{layer}.{HF_NAMES[part]}.weight"].astype(np.float32)
    if part in ("attn_q", "attn_k"):
        heads = 4 if part == "attn_q" else 2  # num_attention_heads, num_key_value_heads
        rows, cols = weight.shape
        weight = weight.reshape(heads, 2, rows // heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)
    return weight


def _q4_0_blocks(path: Path, source_dir: Path) -> dict[str, dict[str, np.ndarray]]:
    """Per block matrix: the source weights over the file's scale d (w/d) and the file's integers q - 8, per block
    of 32, read with gguf-py (gguf.quants.dequantize and the raw block bytes), never with AutoRound."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.numpy import load_file

    source = load_file(str(source_dir / "model.safetensors"))
    out = {}
    for tensor in GGUFReader(path).tensors:
        if not tensor.name.startswith("blk.") or len(tensor.shape) < 2:
            continue
        assert tensor.tensor_type.name == "Q4_0", (tensor.name, tensor.tensor_type.name)
        weight = _source_matrix(source, tensor.name)
        raw = np.asarray(tensor.data).reshape(-1, Q4_0_BLOCK_BYTES)
        scale = raw[:, :2].copy().view(np.float16).astype(np.float32)[:, 0]
        assert (scale != 0).all()
        values = dequantize(tensor.data, tensor.tensor_type).reshape(weight.shape)
        out[tensor.name] = {"w_over_d": weight.reshape(-1, 32) / scale[:, None],
                            "q": np.round(values.reshape(-1, 32) / scale[:, None]),
                            "values": values, "weight": weight}
    return out


def _off_nearest(block: dict[str, np.ndarray]) -> float:
    """Fraction of weights whose integer is not the nearest one on the file's own grid (clipped to q4_0's -8..7).

    Weights within 1 % of a step of a half-way point are left out: the file stores d as float16, so a quantizer
    that rounded with its float32 scale may land on either side there (measured: up to 0.003 of a step)."""
    ratio, q = block["w_over_d"], block["q"]
    nearest = np.clip(np.round(ratio), -8, 7)
    tie = np.abs(np.abs(ratio - np.floor(ratio)) - 0.5) < 0.01
    return float(((nearest != q) & ~tie).mean())


def _eval_ids(source_dir: Path, n: int = 128) -> list[int]:
    from transformers import AutoTokenizer

    from workbench.data.evaltext import pydoc_eval_text

    return AutoTokenizer.from_pretrained(source_dir)(pydoc_eval_text()[:4000])["input_ids"][:n]


def _float_logits(source_dir: Path, ids: list[int], replace: dict[str, Any] | None = None) -> np.ndarray:
    """Logits of plain transformers in float32; `replace`: {Linear name: weight} put in first."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32)
    with torch.no_grad():
        for name, weight in (replace or {}).items():
            model.get_submodule(name).weight.copy_(weight)
        return model(torch.tensor([ids])).logits[0].numpy()


def _relative_error(logits: np.ndarray, reference: np.ndarray) -> float:
    """|logits - reference| over the spread of the reference's logits (each position centred: a constant shift of
    all logits changes no probability)."""
    centred = reference - reference.mean(-1, keepdims=True)
    shifted = logits - logits.mean(-1, keepdims=True)
    return float(np.linalg.norm(shifted - centred) / np.linalg.norm(centred))


def _llamacpp_logits(folder: Path, ids: list[int]) -> np.ndarray:
    from workbench.runtimes import load_variant

    variant = load_variant("llamacpp", name="autoround", artifact_path=folder, device="cpu", threads=1, n_ctx=256)
    try:
        return variant.logits(ids)
    finally:
        variant.close()


# ---- options, before anything loads -------------------------------------------------------------------------------


def test_bad_options_say_what_is_accepted() -> None:
    with pytest.raises(ValidationError, match="AutoRound exports the GGUF types Q4_0.*not 'iq4_xs'.*gguf method"):
        AutoRoundGGUFOptions(gguf_type="iq4_xs")
    with pytest.raises(ValidationError, match="format native is the method autoround-native"):
        AutoRoundGGUFOptions.model_validate({"format": "native"})
    with pytest.raises(ValidationError, match="lr .* needs iters > 0"):
        AutoRoundGGUFOptions(iters=0, lr=0.01)
    with pytest.raises(ValidationError, match="optimized_rtn .* needs iters 0"):
        AutoRoundNativeOptions(iters=10, optimized_rtn=True)
    with pytest.raises(ValidationError, match="only sym: true.*auto-round-lib"):
        AutoRoundNativeOptions.model_validate({"sym": False})
    assert AutoRoundNativeOptions.model_validate({"sym": True}) == AutoRoundNativeOptions()
    assert AutoRoundGGUFOptions(gguf_type="gguf:q4_k_m").gguf_type == "Q4_K_M"


def test_native_group_size_must_divide_every_decoder_width(tiny_model_dir: Path) -> None:
    from workbench.planning.modelshape import shape_from_folder

    check = ShapeCheck(model="tiny", shape=shape_from_folder(tiny_model_dir), rest="float32", last=True)
    (reason,) = AutoRoundNative().refusals(AutoRoundNativeOptions(group_size=48), check)
    assert "group_size 48 does not divide the input width 64" in reason and "16, 32, 64" in reason
    assert AutoRoundNative().refusals(AutoRoundNativeOptions(group_size=64), check) == []


def test_the_module_imports_no_heavy_library() -> None:
    code = ("import sys, workbench.methods.autoround\n"
            "print(sorted(m for m in ('torch', 'transformers', 'auto_round', 'gguf') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ}, cwd=Path(__file__).parent.parent).stdout
    assert out.strip() == "[]"


def test_gguf_types_are_what_the_installed_auto_round_exports() -> None:
    require("auto_round")
    from auto_round.export.formats.backends.gguf import GGUFFormat

    assert set(GGUF_TYPES) <= {scheme.split(":")[1] for scheme in GGUFFormat.support_schemes}


# ---- GGUF ---------------------------------------------------------------------------------------------------------


def test_round_to_nearest_gguf_is_the_nearest_grid_and_runs_in_llama_cpp(rtn_gguf: Path, smol_llama: Path) -> None:
    from workbench.planning.modelshape import shape_from_folder

    report = _report(rtn_gguf)
    assert report["requested"] == "Q4_0" and report["autoround"]["algorithm"] == "round-to-nearest"
    assert report["autoround"]["version"] == "0.15.1" and report["calibration"].startswith("none")
    assert not (rtn_gguf / EXPORT_DIR).exists() and (rtn_gguf / "runtime.json").is_file()
    # Every decoder matrix is Q4_0 (the helper asserts it); the head, whose 64-wide rows cannot hold a Q6_K block,
    # is Q8_0 as llama.cpp would make it, and the norms stay F32.
    assert report["gguf"]["tensor_types"] == {"Q4_0": 15, "F32": 5, "Q8_0": 1}
    blocks = _q4_0_blocks(rtn_gguf / "model.gguf", smol_llama)
    assert len(blocks) == 14
    for name, block in blocks.items():
        assert _off_nearest(block) == 0, name  # round-to-nearest, checked weight by weight
    # A 4-bit grid whose step is max|w|/8 per 32 weights: the rounding error is about step/sqrt(12), 7-9 % of the
    # weights' RMS for Gaussian weights (measured 8.3-8.8 % here).
    error = np.sqrt(sum(((b["values"] - b["weight"]) ** 2).sum() for b in blocks.values())
                    / sum((b["weight"] ** 2).sum() for b in blocks.values()))
    assert 0.06 < error < 0.11
    # llama.cpp's logits against plain transformers on the float model. Every matrix (embedding included) carries
    # that relative error, and the normalised layers pass it on at the same order, so the logits may move by a
    # small multiple of it (measured 0.087, i.e. 1.0x); 2.5x is the bound.
    ids = _eval_ids(smol_llama)
    logits, reference = _llamacpp_logits(rtn_gguf, ids), _float_logits(smol_llama, ids)
    assert logits.shape == reference.shape == (len(ids), 49152)
    assert _relative_error(logits, reference) < 2.5 * error
    assert (logits.argmax(-1) == reference.argmax(-1)).mean() >= 0.7  # measured 0.88 on near-uniform logits
    # The size estimate is llama.cpp's mix for Q4_0, which is what AutoRound wrote, to the byte.
    size = SizeInput(shape=shape_from_folder(smol_llama), rest="float32", notes=[], gguf_files={})
    assert AutoRound().estimate_size(AutoRoundGGUFOptions(gguf_type="Q4_0"), size).weight_bytes \
        == report["gguf"]["tensor_bytes"]


def test_tuning_moves_the_rounding_off_nearest_where_it_lowered_the_loss(tuned_gguf: Path, rtn_gguf: Path,
                                                                          smol_llama: Path) -> None:
    from transformers import AutoTokenizer

    from workbench.data.calibration import CalibrationSpec, calibration_sequences
    from workbench.data.evaltext import pydoc_eval_text

    report = _report(tuned_gguf)
    tuning = report["autoround"]
    assert tuning["algorithm"] == "SignRound" and tuning["iters"] == 5 and tuning["lr"] == pytest.approx(0.2)
    assert report["calibration"] == {**CALIBRATION, "disjoint_from_eval": True}
    losses = tuning["block_losses"]
    assert len(losses) == 2 and any(block["best_iter"] > 0 for block in losses), losses
    tuned, plain = _q4_0_blocks(tuned_gguf / "model.gguf", smol_llama), _q4_0_blocks(rtn_gguf / "model.gguf", smol_llama)
    for name, block in tuned.items():
        layer = int(name.split(".")[1])
        if losses[layer]["best_iter"] == 0:  # AutoRound kept its round-to-nearest start: the same file contents
            assert np.array_equal(block["values"], plain[name]["values"]), name
        else:  # learned rounding offsets: some weights rounded away from the nearest integer (measured 28-40 %)
            assert _off_nearest(block) > 0.01, name
            assert (block["values"] != plain[name]["values"]).mean() > 0.01, name
    # The calibration the report names, drawn again: no 80-character stretch of it is in the evaluation text (the
    # length below which workbench/data/calibration.py lets paragraphs repeat).
    tokenizer = AutoTokenizer.from_pretrained(smol_llama)
    eval_text = pydoc_eval_text()
    for sequence in calibration_sequences(tokenizer, CalibrationSpec(**CALIBRATION)):
        text = tokenizer.decode(sequence).strip()
        windows = [text[i : i + 80] for i in range(0, len(text) - 79, 10)]
        assert windows and not any(window in eval_text for window in windows), text
    assert np.isfinite(_llamacpp_logits(tuned_gguf, _eval_ids(smol_llama, 16))).all()


def test_a_tokenizer_the_converter_does_not_know_is_refused_before_tuning(tiny_model_dir: Path, tmp_path: Path) -> None:
    require("auto_round")
    started = time.perf_counter()
    options = AutoRoundGGUFOptions(gguf_type="Q4_0", iters=200, calibration=CALIBRATION)
    with pytest.raises(WorkbenchError, match="does not recognise this model's BPE pre-tokenizer.*autoround-native"):
        AutoRound().build(tiny_model_dir, tmp_path, options, CTX)
    assert not (tmp_path / EXPORT_DIR).exists()  # refused before AutoRound started
    assert time.perf_counter() - started < 60  # 200 steps per block would take minutes


# ---- native -------------------------------------------------------------------------------------------------------


def test_native_checkpoint_is_safetensors_that_torch_loads_and_runs(smol_llama: Path, tmp_path: Path) -> None:
    require("auto_round")
    import torch

    from workbench.planning.modelshape import shape_from_folder
    from workbench.runtimes import load_variant

    # AutoRound's importance-weighted round-to-nearest: its scales come from the calibration data (the GGUF tests
    # cover plain round-to-nearest and tuning).
    options = AutoRoundNativeOptions(bits=4, group_size=32, iters=0, optimized_rtn=True, calibration=CALIBRATION)
    AutoRoundNative().build(smol_llama, tmp_path, options, CTX)
    assert not list(tmp_path.rglob("*.bin")) and not list(tmp_path.rglob("*.pt"))
    assert (tmp_path / "model.safetensors").is_file() and not (tmp_path / EXPORT_DIR).exists()
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "auto-round" and config["bits"] == 4 and config["group_size"] == 32
    report = _report(tmp_path)
    assert report["format"] == "native" and report["autoround"]["algorithm"] == "optimized round-to-nearest"
    assert report["calibration"] == {**CALIBRATION, "disjoint_from_eval": True}

    variant = load_variant("torch", name="native", artifact_path=tmp_path, device="cpu", threads=1)
    model = variant.model
    source = _float_state(smol_llama)
    # Each packed Linear, applied to the identity, gives its dequantized weight (transposed): the source's weights on
    # a 4-bit grid of 32-weight groups, 5-12 % off in RMS (measured 8.5-8.7 %, as the GGUF file's grid), never floats.
    dequantized = {}
    for layer in range(2):
        for part in HF_NAMES.values():
            name = f"model.layers.{layer}.{part}"
            module = model.get_submodule(name)
            assert not isinstance(module, torch.nn.Linear), name  # packed, not float
            with torch.no_grad():
                dequantized[name] = module(torch.eye(module.infeatures, dtype=model.dtype)).T.float()
            weight = source[name + ".weight"]
            error = np.linalg.norm(dequantized[name].numpy() - weight) / np.linalg.norm(weight)
            assert 0.05 < error < 0.12, (name, error)
    ids = _eval_ids(smol_llama)
    logits, reference = variant.logits(ids), _float_logits(smol_llama, ids)
    # What the checkpoint should compute: the float model with exactly those weights, in float32. The packed model
    # runs in float16, so it may differ by float16 rounding only (measured 0.0006), and it is much closer to that
    # than to the float source (measured 0.0033 away: the 4-bit rounding, small here because the embeddings, 20x
    # the blocks' scale and kept in float16, dominate every position's state).
    expected = _float_logits(smol_llama, ids, replace=dequantized)
    assert _relative_error(logits, expected) < 0.005
    assert _relative_error(logits, expected) < 0.5 * _relative_error(logits, reference)
    assert (logits.argmax(-1) == reference.argmax(-1)).mean() >= 0.9  # measured 1.0
    # Weight bytes as loaded against the estimate (packed int32 weights, float16 scales and zero points, the rest
    # float16 as AutoRound's CPU backend converts it, which `reshape` tells the stages after): equal to the byte.
    assert model.dtype == torch.float16
    assert AutoRoundNative().reshape(shape_from_folder(smol_llama), "float32", options)[1] == "float16"
    size = SizeInput(shape=shape_from_folder(smol_llama), rest="float32", notes=[], gguf_files={})
    assert variant.footprint().weight_bytes == AutoRoundNative().estimate_size(options, size).weight_bytes
    variant.close()


def _float_state(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return {n: t.astype(np.float32) for n, t in load_file(str(folder / "model.safetensors")).items()}
