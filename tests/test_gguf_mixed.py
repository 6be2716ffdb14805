"""Importance matrices, per-tensor type overrides and gguf-auto's budgeted mixed precision."""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import smol_tokenizer_llama

from workbench.errors import WorkbenchError
from workbench.methods.base import BuildContext
from workbench.analysis.mixed_precision import BudgetError, Option, greedy, optimal, total_bytes, total_kld

CTX = BuildContext(device="cpu", threads=2, trust_remote_code=False, emit=lambda _m: None)
SMALL_CALIBRATION = {"samples": 4, "seq_len": 64, "text": "pydoc", "seed": 0}


# ---- the assignment, on synthetic tables -------------------------------------------------------------------


def _brute_force(table: dict[str, list[Option]], budget: int) -> float:
    """Least total KLD over every combination that fits: the reference the assignment must reach."""
    sums = [sum(o.kld for o in combo) for combo in itertools.product(*table.values())
            if sum(o.bytes for o in combo) <= budget]
    return min(sums)


def _table(seed: int, units: int = 4) -> dict[str, list[Option]]:
    rng = random.Random(seed)
    table = {}
    for unit in range(units):
        size, sensitivity = rng.randint(50, 200), rng.uniform(0.1, 3.0)
        table[f"blk.{unit}"] = [Option(t, int(size * bpw), sensitivity * error * rng.uniform(0.7, 1.3))
                                for t, bpw, error in (("Q8_0", 8.5, 0.01), ("Q6_K", 6.56, 0.05), ("Q5_0", 5.5, 0.12),
                                                      ("Q4_K", 4.5, 0.3), ("Q3_K", 3.44, 0.9))]
    return table


def test_greedy_meets_the_budget_and_is_optimal_on_a_small_case() -> None:
    # Three units whose KLD falls with diminishing returns per byte. The greedy walk's stops along the
    # KLD-per-byte order (180, 200, 220, 270, 290, 310, 360 bytes) are optimal for their budgets.
    table = {
        "blk.0": [Option("Q4", 40, 0.80), Option("Q6", 60, 0.30), Option("Q8", 80, 0.10)],
        "blk.1": [Option("Q4", 40, 0.20), Option("Q6", 60, 0.12), Option("Q8", 80, 0.05)],
        "token_embd": [Option("Q4", 100, 0.50), Option("Q6", 150, 0.20), Option("Q8", 200, 0.15)],
    }
    for budget in range(180, 361, 5):
        assert total_bytes(greedy(table, budget)) <= budget
        assert total_bytes(optimal(table, budget)) <= budget
        assert total_kld(optimal(table, budget)) == pytest.approx(_brute_force(table, budget)), budget
    for budget in (180, 200, 220, 270, 290, 310, 360):
        assert total_kld(greedy(table, budget)) == pytest.approx(_brute_force(table, budget)), budget
    assert greedy(table, 310)["blk.0"].type == "Q8" and greedy(table, 310)["token_embd"].type == "Q6"
    # Between stops the walk can miss the optimum (why gguf-auto assigns by dynamic programming and
    # records the walk beside it): at 250 bytes it stops at 240 with 0.72, while 0.70 fits.
    assert total_kld(greedy(table, 250)) == pytest.approx(0.72) and total_kld(optimal(table, 250)) == pytest.approx(0.70)
    # Fixed bytes (norms) count against the budget too.
    choice = greedy(table, 240, fixed_bytes=20)
    assert total_bytes(choice, 20) <= 240 and total_kld(choice) == pytest.approx(_brute_force(table, 220))


@pytest.mark.parametrize("seed", range(40))
def test_assignment_is_optimal_against_brute_force(seed: int) -> None:
    table = _table(seed)
    low = sum(min(o.bytes for o in options) for options in table.values())
    high = sum(max(o.bytes for o in options) for options in table.values())
    budget = random.Random(seed).randint(low, high)
    best = _brute_force(table, budget)
    exact, walk = optimal(table, budget), greedy(table, budget)
    assert total_bytes(exact) <= budget and total_bytes(walk) <= budget
    assert total_kld(exact) == pytest.approx(best, rel=1e-12, abs=1e-15)
    assert total_kld(walk) >= best - 1e-12  # the walk can only be worse, never below the optimum


def _keep_in_float_table(seed: int, blocks: int = 6, equal: bool = False) -> dict[str, list[Option]]:
    """bnb-auto's table: each block quantized (its KLD) or float (zero KLD, more bytes)."""
    rng = random.Random(seed)
    table = {}
    for block in range(blocks):
        quantized = 100 if equal else rng.randint(60, 140)
        table[f"model.layers.{block}"] = [Option("nf4", quantized, rng.uniform(0.001, 0.5)),
                                          Option("float", quantized * 7 if not equal else 700, 0.0)]
    return table


@pytest.mark.parametrize("seed", range(30))
def test_keep_in_float_choice_meets_the_budget_and_matches_brute_force(seed: int) -> None:
    """The two-option tables of bnb-auto: every budget from the all-quantized to the all-float size."""
    for equal in (True, False):
        table = _keep_in_float_table(seed, equal=equal)
        low = sum(o.bytes for o, _ in table.values())
        high = sum(f.bytes for _, f in table.values())
        for budget in range(low, high + 1, 37 if equal else 53):
            best = _brute_force(table, budget)
            exact, walk = optimal(table, budget, fixed_bytes=0), greedy(table, budget)
            assert total_bytes(exact) <= budget and total_bytes(walk) <= budget
            assert total_kld(exact) == pytest.approx(best, rel=1e-12, abs=1e-15), (equal, budget)
            if equal:  # blocks of one size: the KLD-per-byte walk keeps the most sensitive ones, which is optimal
                assert total_kld(walk) == pytest.approx(best, rel=1e-12, abs=1e-15), budget
                kept = {u for u, o in walk.items() if o.type == "float"}
                by_kld = sorted(table, key=lambda u: table[u][0].kld, reverse=True)
                assert kept == set(by_kld[: len(kept)]) and len(kept) == (budget - low) // 600
            else:
                assert total_kld(walk) >= best - 1e-12


def test_assignment_on_a_large_budget_uses_the_grid_and_still_fits() -> None:
    table = {f"blk.{i}": [Option(o.type, o.bytes * 10_007, o.kld) for o in _table(i, 1)["blk.0"]] for i in range(30)}
    budget = int(0.6 * sum(max(o.bytes for o in v) for v in table.values()))
    exact = optimal(table, budget)
    assert total_bytes(exact) <= budget
    assert total_kld(exact) <= total_kld(greedy(table, budget)) + 1e-9


def test_budget_below_the_smallest_candidate_is_refused() -> None:
    table = {"blk.0": [Option("Q4_K", 100, 0.3), Option("Q8_0", 200, 0.01)],
             "blk.1": [Option("Q4_K", 100, 0.2), Option("Q8_0", 200, 0.02)]}
    for assign in (greedy, optimal):
        with pytest.raises(BudgetError, match=r"a budget of 0.00 MB is below the smallest file the candidate types can "
                                              r"make \(0.00 MB with every unit at its cheapest type: Q4_K\)"):
            assign(table, 199)
        assert total_bytes(assign(table, 200)) == 200


def test_gguf_auto_options_need_exactly_one_target() -> None:
    from pydantic import ValidationError

    from workbench.methods.gguf_auto import GGUFAutoOptions

    with pytest.raises(ValidationError, match="exactly one of target_mb and target_bpw"):
        GGUFAutoOptions()
    with pytest.raises(ValidationError, match="exactly one of target_mb and target_bpw"):
        GGUFAutoOptions(target_mb=10, target_bpw=4)
    assert GGUFAutoOptions(target_bpw=4.5).candidates[0] == "Q8_0"


# ---- importance matrix -------------------------------------------------------------------------------------


def _plain_layer_inputs(model, ids: list[int]) -> dict[str, np.ndarray]:
    """Every decoder Linear's input, recomputed with plain tensor arithmetic from the weights (no hooks, no
    HF forward): RMSNorm, rope, causal softmax attention, SwiGLU, written out from the Llama definition."""
    import torch

    config = model.config
    layers = model.model.layers
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = config.hidden_size // heads
    theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta") or getattr(config, "rope_theta", 10000.0)
    eps = config.rms_norm_eps
    n = len(ids)
    positions = torch.arange(n, dtype=torch.float64)
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.cat([positions[:, None] * inv_freq[None]] * 2, dim=-1)  # [n, head_dim]
    cos, sin = angles.cos(), angles.sin()

    def rms(x, weight):
        return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps) * weight.double()

    def rope(x):  # [heads, n, head_dim]
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    inputs = {}
    with torch.no_grad():
        h = model.model.embed_tokens.weight.double()[torch.tensor(ids)]
        for index, layer in enumerate(layers):
            attn, mlp = layer.self_attn, layer.mlp
            x = rms(h, layer.input_layernorm.weight)
            for name in ("attn_q", "attn_k", "attn_v"):
                inputs[f"blk.{index}.{name}.weight"] = x
            q = (x @ attn.q_proj.weight.double().T).reshape(n, heads, head_dim).transpose(0, 1)
            k = (x @ attn.k_proj.weight.double().T).reshape(n, kv_heads, head_dim).transpose(0, 1)
            v = (x @ attn.v_proj.weight.double().T).reshape(n, kv_heads, head_dim).transpose(0, 1)
            q, k = rope(q), rope(k)
            k = k.repeat_interleave(heads // kv_heads, dim=0)
            v = v.repeat_interleave(heads // kv_heads, dim=0)
            scores = q @ k.transpose(1, 2) / math.sqrt(head_dim)
            scores = scores.masked_fill(torch.triu(torch.ones(n, n, dtype=torch.bool), 1), float("-inf"))
            context = (scores.softmax(-1) @ v).transpose(0, 1).reshape(n, heads * head_dim)
            inputs[f"blk.{index}.attn_output.weight"] = context
            h = h + context @ attn.o_proj.weight.double().T
            x = rms(h, layer.post_attention_layernorm.weight)
            inputs[f"blk.{index}.ffn_gate.weight"] = inputs[f"blk.{index}.ffn_up.weight"] = x
            gate = x @ mlp.gate_proj.weight.double().T
            hidden = torch.nn.functional.silu(gate) * (x @ mlp.up_proj.weight.double().T)
            inputs[f"blk.{index}.ffn_down.weight"] = hidden
            h = h + hidden @ mlp.down_proj.weight.double().T
    return {name: value.numpy() for name, value in inputs.items()}


def test_imatrix_values_equal_a_plain_recomputation(tiny_smol_dir) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workbench.data.calibration import CalibrationSpec, calibration_sequences
    from workbench.analysis.imatrix import collect_imatrix, hf_to_gguf_name_map

    model = AutoModelForCausalLM.from_pretrained(tiny_smol_dir, dtype=torch.float32).eval()
    sequences = calibration_sequences(AutoTokenizer.from_pretrained(tiny_smol_dir), CalibrationSpec(**SMALL_CALIBRATION))
    matrix, tokens = collect_imatrix(model, sequences, hf_to_gguf_name_map("llama", 2))
    assert tokens == 4 * 64
    captured = [_plain_layer_inputs(model, ids) for ids in sequences]
    expected = {name: np.concatenate([c[name] for c in captured]) for name in captured[0]}
    assert sorted(matrix) == sorted(expected) and len(matrix) == 14  # 7 matrices x 2 blocks, never the head
    for name, x in expected.items():
        plain = (x**2).sum(0) / x.shape[0]
        assert matrix[name].shape == (x.shape[1],)
        np.testing.assert_allclose(matrix[name], plain, rtol=2e-4, atol=1e-7, err_msg=name)
    # Different inputs, different columns: not a constant the check could pass by accident.
    assert matrix["blk.1.ffn_down.weight"].std() > 0.1 * matrix["blk.1.ffn_down.weight"].mean()


@pytest.fixture(scope="module")
def wide_smol_dir(tmp_path_factory, bundled_source) -> Path:
    """A 2-layer Llama 256 wide (K-quant and I-quant blocks fit every row) with SmolLM2's tokenizer."""
    return smol_tokenizer_llama(tmp_path_factory.mktemp("wide-smol"), bundled_source.hf_dir, 256, 512)


@pytest.fixture(scope="module")
def wide_f16(tmp_path_factory, wide_smol_dir) -> Path:
    from workbench.methods.gguf import convert_to_gguf

    path = tmp_path_factory.mktemp("wide-f16") / "f16.gguf"
    convert_to_gguf(wide_smol_dir, path, "F16")
    return path


def test_types_needing_an_imatrix_are_exactly_those_llama_cpp_refuses(wide_f16, tmp_path) -> None:
    """NEEDS_IMATRIX against the installed library: without a matrix, llama.cpp fails exactly these."""
    from workbench.methods.gguf import NEEDS_IMATRIX, QUANT_TYPES, quantize_gguf

    refused = []
    for quant in QUANT_TYPES:
        try:
            quantize_gguf(wide_f16, tmp_path / f"{quant}.gguf", quant, 2, False)
        except WorkbenchError:
            refused.append(quant)
    assert sorted(refused) == sorted(NEEDS_IMATRIX)


def test_imatrix_type_is_refused_without_and_built_with_a_matrix(wide_smol_dir, tmp_path) -> None:
    from workbench.data.gguf_info import GGUF_NAME
    from workbench.analysis.imatrix import IMATRIX_FILE, load_imatrix
    from workbench.methods.gguf import GGUF, GGUFOptions

    with pytest.raises(WorkbenchError, match="IQ2_XXS needs an importance matrix: add imatrix: .* types that work "
                                             "without one: Q8_0"):
        GGUF().build(wide_smol_dir, tmp_path, GGUFOptions(quant="IQ2_XXS"), CTX)
    with pytest.raises(WorkbenchError, match="tensor_types IQ1_S needs an importance matrix"):
        GGUF().build(wide_smol_dir, tmp_path, GGUFOptions(quant="Q4_K_M", tensor_types={"ffn_up": "IQ1_S"}), CTX)
    out = tmp_path / "iq2"
    out.mkdir()
    GGUF().build(wide_smol_dir, out, GGUFOptions(quant="IQ2_XXS", imatrix=SMALL_CALIBRATION), CTX)
    gguf = json.loads((out / "stage_report.json").read_text())["gguf"]
    assert gguf["tensor_types"].get("IQ2_XXS", 0) > 0
    record = gguf["imatrix"]
    assert {k: record[k] for k in SMALL_CALIBRATION} == SMALL_CALIBRATION and record["disjoint_from_eval"]
    assert record["tokens"] == 256 and record["entries"] == 14 and record["hash"].startswith("sha256:")
    assert sorted(load_imatrix(out / IMATRIX_FILE)) == [f"blk.{i}.{n}.weight" for i in range(2) for n in
                                                       sorted(("attn_k", "attn_output", "attn_q", "attn_v",
                                                               "ffn_down", "ffn_gate", "ffn_up"))]
    assert (out / GGUF_NAME).is_file() and not (out / "converted-f16.gguf").exists()


def test_imatrix_lowers_the_importance_weighted_error(wide_smol_dir, wide_f16, tmp_path) -> None:
    """The matrix reaches the quantizer: Q3_K rounding error weighted by the matrix falls when it is given."""
    import gguf

    from workbench.analysis.imatrix import compute_imatrix
    from workbench.methods.gguf import quantize_gguf
    from workbench.data.calibration import CalibrationSpec
    from workbench.methods.gguf_auto import dequantized, read_tensors

    matrix, _ = compute_imatrix(wide_smol_dir, wide_f16, CalibrationSpec(**SMALL_CALIBRATION), False)
    quantize_gguf(wide_f16, tmp_path / "plain.gguf", "Q3_K_S", 2, True)
    quantize_gguf(wide_f16, tmp_path / "weighted.gguf", "Q3_K_S", 2, True, imatrix=matrix)
    reference, plain, weighted = (read_tensors(p) for p in (wide_f16, tmp_path / "plain.gguf", tmp_path / "weighted.gguf"))
    lower = 0
    for name, importance in matrix.items():
        assert plain[name].tensor_type == weighted[name].tensor_type == gguf.GGMLQuantizationType.Q3_K
        w = dequantized(reference[name])
        error = [float((((dequantized(f[name]) - w) ** 2) * importance).sum()) for f in (plain, weighted)]
        lower += error[1] < error[0]
    assert lower >= len(matrix) - 1, f"the weighted error fell for only {lower} of {len(matrix)} tensors"


# ---- per-tensor overrides ----------------------------------------------------------------------------------


def test_overrides_change_exactly_the_tensors_their_patterns_name(tiny_smol_dir, tmp_path) -> None:
    from workbench.data.gguf_info import GGUF_NAME
    from workbench.planning.gguf_plan import predict
    from workbench.methods.gguf import GGUF, GGUFOptions
    from workbench.methods.gguf_auto import read_tensors
    from workbench.planning.modelshape import shape_from_folder

    overrides = {r"blk\.1\.ffn_down": "Q4_0", r"attn_v": "Q5_0", r"^token_embd\.weight$": "F16"}
    folders = {}
    for label, tensor_types in (("plain", {}), ("overridden", overrides)):
        folders[label] = tmp_path / label
        folders[label].mkdir()
        GGUF().build(tiny_smol_dir, folders[label], GGUFOptions(quant="Q8_0", tensor_types=tensor_types), CTX)
    plain, overridden = ({n: t.tensor_type.name for n, t in read_tensors(f / GGUF_NAME).items()} for f in folders.values())
    changed = {name for name in plain if plain[name] != overridden[name]}
    assert changed == {"blk.1.ffn_down.weight", "blk.0.attn_v.weight", "blk.1.attn_v.weight", "token_embd.weight"}
    assert overridden["blk.1.ffn_down.weight"] == "Q4_0" and overridden["token_embd.weight"] == "F16"
    assert overridden["blk.0.attn_v.weight"] == overridden["blk.1.attn_v.weight"] == "Q5_0"
    report = json.loads((folders["overridden"] / "stage_report.json").read_text())["gguf"]
    assert report["overrides"][r"attn_v"] == {"type": "Q5_0", "tensors": 2, "got": {"Q5_0": 2}}
    assert report["tensor_types"] == {"Q8_0": 11, "F32": 5, "Q5_0": 2, "Q4_0": 1, "F16": 1}
    # The planner predicts the overridden mix and its bytes exactly.
    predicted = predict(shape_from_folder(tiny_smol_dir), "Q8_0", overrides=overrides)
    assert predicted["tensor_types"] == report["tensor_types"] and predicted["tensor_bytes"] == report["tensor_bytes"]


def test_bad_override_pattern_or_float_file_is_refused() -> None:
    from workbench.errors import PresetError
    from workbench.config.presets import parse_preset

    base = {"name": "t", "model": "bundled:smollm2-135m-instruct", "baseline": "fp32"}
    with pytest.raises(PresetError, match=r"tensor_types pattern 'blk\\.\(' is not a regular expression"):
        parse_preset({**base, "variants": [{"name": "fp32", "method": "fp32"}, {
            "name": "q", "method": "gguf", "options": {"quant": "Q4_K_M", "tensor_types": {r"blk\.(": "Q8_0"}}}]})
    with pytest.raises(PresetError, match="tensor_types and imatrix need a quantized quant type, not F16"):
        parse_preset({**base, "variants": [{"name": "fp32", "method": "fp32"}, {
            "name": "q", "method": "gguf", "options": {"quant": "F16", "tensor_types": {"ffn": "Q8_0"}}}]})


# ---- gguf-auto on the tiny model ---------------------------------------------------------------------------


def test_torch_swap_reproduces_the_quantized_file(tiny_smol_dir, tmp_path) -> None:
    """The sensitivity pass's dequantized weights, placed in torch, give the logits llama.cpp gives for the file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workbench.data.gguf_info import GGUF_NAME
    from workbench.analysis.imatrix import gguf_tensor_names
    from workbench.methods.gguf import _finish, convert_to_gguf, quantize_gguf
    from workbench.methods.gguf_auto import TorchSlots, read_tensors
    from workbench.runtimes.llamacpp import LlamaCppVariant

    converted = tmp_path / "f16.gguf"
    convert_to_gguf(tiny_smol_dir, converted, "F16")
    quantize_gguf(converted, tmp_path / GGUF_NAME, "Q8_0", 2, True, overrides={r"\.weight$": "Q4_0"})
    _finish(tmp_path, tiny_smol_dir, CTX, 0, {})
    model = AutoModelForCausalLM.from_pretrained(tiny_smol_dir, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(tiny_smol_dir)("The quick brown fox jumps over the lazy dog. " * 4)["input_ids"]
    with torch.inference_mode():
        fp32 = model(torch.tensor([ids])).logits[0].numpy()
    slots = TorchSlots(model, read_tensors(converted), gguf_tensor_names(converted)[0])
    assert set(slots.permuted) == {"blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.1.attn_q.weight", "blk.1.attn_k.weight"}
    for name, tensor in read_tensors(tmp_path / GGUF_NAME).items():
        if name in slots.params:
            slots.params[name].data = slots.torch_values(name, tensor)
    with torch.inference_mode():
        swapped = model(torch.tensor([ids])).logits[0].numpy()
    llama = LlamaCppVariant.load("q4", tmp_path, "cpu", 2, n_ctx=256).logits(ids)
    # llama.cpp also rounds activations to 8 bits: a small gap, far below what Q4_0 itself moves the logits.
    assert np.abs(swapped - llama).mean() < 0.1 * np.abs(fp32 - llama).mean()


def test_block_replay_measures_what_a_full_forward_measures(tiny_smol_dir) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workbench.data.calibration import CalibrationSpec, calibration_sequences
    from workbench.analysis.sensitivity import KLDProbe

    model = AutoModelForCausalLM.from_pretrained(tiny_smol_dir, dtype=torch.float32).eval()
    sequences = calibration_sequences(AutoTokenizer.from_pretrained(tiny_smol_dir), CalibrationSpec(samples=2, seq_len=64))
    probe = KLDProbe(model, sequences)
    assert probe.kld() == pytest.approx(0, abs=1e-9) and probe.kld(0) == pytest.approx(0, abs=1e-6)
    weight = model.model.layers[1].mlp.down_proj.weight
    original = weight.data
    weight.data = original + 5.0 * torch.randn_like(original)  # the residual stream is large (embeddings x 20)
    full, replayed = probe.kld(), probe.kld(1)
    weight.data = original
    assert full > 1e-4 and replayed == pytest.approx(full, rel=1e-4)


def test_gguf_auto_meets_its_budget_and_records_its_choice(tiny_smol_dir, tmp_path) -> None:
    from workbench.data.gguf_info import GGUF_NAME
    from workbench.planning.gguf_plan import auto_floor
    from workbench.methods.gguf_auto import GGUFAuto, GGUFAutoOptions, read_tensors, unit_of
    from workbench.planning.modelshape import shape_from_folder

    candidates = ["Q8_0", "Q4_0"]
    options = {"candidates": candidates, "sensitivity": {"samples": 2, "seq_len": 64, "seed": 1}}
    shape = shape_from_folder(tiny_smol_dir)
    floor, ceiling = auto_floor(shape, candidates), auto_floor(shape, candidates, pick=max)
    target = (floor + 0.5 * (ceiling - floor)) / 1e6
    out = tmp_path / "auto"
    out.mkdir()
    GGUFAuto().build(tiny_smol_dir, out, GGUFAutoOptions(target_mb=target, **options), CTX)
    gguf = json.loads((out / "stage_report.json").read_text())["gguf"]
    auto = gguf["auto"]
    assert floor <= gguf["tensor_bytes"] == auto["tensor_bytes"] <= target * 1e6
    assert sorted(auto["choice"]) == ["blk.0", "blk.1", "token_embd"] and set(auto["choice"].values()) == set(candidates)
    for name, tensor in read_tensors(out / GGUF_NAME).items():  # every matrix holds its unit's chosen type
        if len(tensor.shape) >= 2:
            assert tensor.tensor_type.name == auto["choice"][unit_of(name)], name
    table = auto["sensitivity"]["table"]
    for unit, rows in table.items():  # 4 bits hurt more than 8, measured per unit
        kld = {row["type"]: row["kld"] for row in rows}
        assert kld["Q4_0"] > kld["Q8_0"] >= 0, unit
    assert auto["predicted_kld_sum"] <= auto["greedy"]["predicted_kld_sum"] + 1e-12
    assert not list(out.glob("candidate-*")) and not (out / "converted-f16.gguf").exists()
    # Below what the candidates can make: refused, with the floor in the message.
    low = tmp_path / "low"
    low.mkdir()
    with pytest.raises(WorkbenchError, match=rf"below the smallest file the candidate types can make "
                                             rf"\({floor / 1e6:.2f} MB with every unit at its cheapest type: Q4_0\)"):
        GGUFAuto().build(tiny_smol_dir, low, GGUFAutoOptions(target_mb=floor / 1e6 * 0.9, **options), CTX)


def test_plan_estimates_imatrix_overrides_and_auto_targets(tiny_smol_dir) -> None:
    from workbench.planning.gguf_plan import auto_floor
    from workbench.planning.modelshape import shape_from_folder
    from workbench.planning.weightsize import estimate_weights

    shape = shape_from_folder(tiny_smol_dir)
    overridden = estimate_weights(shape, [{"method": "gguf", "options": {"quant": "Q8_0", "tensor_types": {"ffn": "Q4_0"}}}])
    plain = estimate_weights(shape, [{"method": "gguf", "options": {"quant": "Q8_0"}}])
    assert overridden.weight_bytes < plain.weight_bytes and "overrides" in overridden.format
    iq = estimate_weights(shape, [{"method": "gguf", "options": {"quant": "IQ2_XXS", "imatrix": SMALL_CALIBRATION}}])
    assert iq.format == "gguf IQ2_XXS imatrix" and iq.weight_bytes > 0
    floor = auto_floor(shape, ["Q8_0", "Q4_0"])
    auto = estimate_weights(shape, [{"method": "gguf-auto", "options": {"target_mb": 3.0, "candidates": ["Q8_0", "Q4_0"]}}])
    assert auto.weight_bytes == min(3_000_000, auto_floor(shape, ["Q8_0", "Q4_0"], pick=max)) and auto.runtime == "llamacpp"
    low = estimate_weights(shape, [{"method": "gguf-auto", "options": {"target_mb": floor / 2e6, "candidates": ["Q4_0"]}}])
    assert any("the build will refuse it" in note for note in low.notes)


def test_gguf_auto_on_a_gguf_source_quantizes_the_file_itself(tiny_smol_dir, tmp_path) -> None:
    """With a GGUF source, the candidates and the final mix come from the source file (as for `gguf`): a unit left
    at the source's own type holds the source's bytes unchanged, and no F16 copy is written."""
    from dataclasses import replace

    from workbench.data.gguf_info import GGUF_NAME
    from workbench.data.sources import _convert_gguf
    from workbench.methods.gguf import GGUF, GGUFOptions
    from workbench.methods.gguf_auto import GGUFAuto, GGUFAutoOptions, read_tensors

    source = tmp_path / "source"
    source.mkdir()
    GGUF().build(tiny_smol_dir, source, GGUFOptions(quant="Q8_0"), CTX)
    folder = tmp_path / "fp32"  # what resolving a GGUF source makes: its weights dequantized by transformers
    _convert_gguf(source / GGUF_NAME, folder)
    ctx = replace(CTX, source_gguf=str(source / GGUF_NAME), source_dir=str(folder))
    original = read_tensors(source / GGUF_NAME)
    everything = sum(int(t.n_bytes) for t in original.values())
    out = tmp_path / "auto"
    out.mkdir()
    GGUFAuto().build(folder, out, GGUFAutoOptions(target_mb=everything * 0.8 / 1e6, candidates=["Q8_0", "Q4_0"],
                                                  sensitivity={"samples": 2, "seq_len": 64, "seed": 1}), ctx)
    auto = json.loads((out / "stage_report.json").read_text())["gguf"]["auto"]
    assert auto["tensor_bytes"] <= everything * 0.8 and set(auto["choice"].values()) == {"Q8_0", "Q4_0"}
    kept = [(name, t) for name, t in read_tensors(out / GGUF_NAME).items() if t.tensor_type.name == "Q8_0"]
    assert kept and all(np.array_equal(np.asarray(t.data), np.asarray(original[name].data)) for name, t in kept)
    assert (source / GGUF_NAME).is_file() and not list(out.glob("*.gguf.*")) and not (out / "converted-f16.gguf").exists()
