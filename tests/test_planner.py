"""Budget planner: weight estimates against bytes measured with the real methods, shapes, messages, run records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from workbench.cli import main
from workbench.methods.base import BuildContext
from workbench.planning.modelshape import ShapeError, read_shape, shape_from_folder, shape_from_gguf
from workbench.config.presets import dump_preset, load_preset, parse_preset
from workbench.planning.weightsize import estimate_weights

CTX = BuildContext(device="cpu", threads=1, trust_remote_code=False, emit=lambda _m: None)

# (method, options) built for real on the tiny model; the estimate must be within 10 % of the loaded bytes.
TORCH_CASES = [
    ("fp32", {}),
    ("bf16", {}),
    ("bnb-int8", {}),
    ("bnb-nf4", {"double_quant": True}),
    ("bnb-fp4", {"double_quant": False}),
]


def _measured_weight_bytes(source: Path, out: Path, method_name: str, options: dict) -> int:
    from workbench.methods.registry import get_method
    from workbench.runtimes.torch import TorchVariant

    method = get_method(method_name)()
    method.build(source, out, method.Options.model_validate(options), CTX)
    variant = TorchVariant.load(method_name, out, "cpu", 1)
    try:
        return variant.footprint().weight_bytes
    finally:
        variant.close()


@pytest.mark.parametrize("method,options", TORCH_CASES, ids=[c[0] for c in TORCH_CASES])
def test_weight_estimate_matches_the_loaded_model(tmp_path, tiny_model_dir, method, options) -> None:
    measured = _measured_weight_bytes(tiny_model_dir, tmp_path / method, method, options)
    estimate = estimate_weights(shape_from_folder(tiny_model_dir), [{"method": method, "options": options}])
    assert estimate.weight_bytes == pytest.approx(measured, rel=0.10), (estimate.format, measured)
    # The formats are modelled byte for byte (bnb scales, absmax blocks, code books): far inside the 10 %.
    assert estimate.weight_bytes == pytest.approx(measured, rel=0.01)


def test_q4_k_m_estimate_predicts_llama_cpp_mix_and_bytes(tmp_path, tiny_smol_dir) -> None:
    """Hidden 64 is not a multiple of 256: llama.cpp falls back per tensor, and the planner must say which way."""
    from workbench.data.gguf_info import GGUF_NAME, gguf_summary
    from workbench.methods.gguf import GGUF, GGUFOptions

    GGUF().build(tiny_smol_dir, tmp_path, GGUFOptions(quant="Q4_K_M"), CTX)
    actual = gguf_summary(tmp_path / GGUF_NAME)
    shape = shape_from_folder(tiny_smol_dir)
    estimate = estimate_weights(shape, [{"method": "gguf", "options": {"quant": "Q4_K_M"}}])
    assert estimate.weight_bytes == pytest.approx(actual["tensor_bytes"], rel=0.10)
    from workbench.planning.gguf_plan import predict

    assert predict(shape, "Q4_K_M")["tensor_types"] == actual["tensor_types"]
    assert any("fall back" in note for note in estimate.notes)
    # The GGUF file's own metadata gives the same shape as config.json (no weights read).
    from_file = shape_from_gguf(tmp_path / GGUF_NAME)
    for name in ("vocab", "hidden", "layers", "heads", "kv_heads", "head_dim", "intermediate", "tied"):
        assert getattr(from_file, name) == getattr(shape, name), name


def test_unreadable_config_gives_a_clear_message(tmp_path, write_preset, capsys) -> None:
    with pytest.raises(ShapeError, match="has no config.json"):
        read_shape(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 10}))
    with pytest.raises(ShapeError, match="no hidden_size, num_hidden_layers, num_attention_heads"):
        read_shape(str(tmp_path))
    with pytest.raises(ShapeError, match="no such file or folder"):
        read_shape(str(tmp_path / "missing.gguf"))
    preset = write_preset([{"name": "fp32", "method": "fp32"}], model=str(tmp_path))
    assert main(["plan", str(preset)]) == 2
    assert "cannot estimate this model's size" in capsys.readouterr().err


def test_plan_command_prints_the_table_and_budget_warnings(write_preset, capsys) -> None:
    preset = write_preset([{"name": "fp32", "method": "fp32"}, {"name": "nf4", "method": "bnb-nf4"},
                           {"name": "q8", "method": "gguf", "options": {"quant": "Q8_0"}}])
    assert main(["plan", str(preset), "--memory-budget-gb", "0.0001"]) == 0
    out = capsys.readouterr().out
    assert "weights MB" in out and "nf4 dq (+float32 rest)" in out and "gguf Q8_0" in out
    assert "warning: fp32: estimated peak" in out and "exceeds the 0.0001 GB budget" in out


def test_structured_and_distill_estimates_shrink_the_shape(tiny_model_dir) -> None:
    shape = shape_from_folder(tiny_model_dir)
    dense = estimate_weights(shape, [{"method": "fp32"}]).weight_bytes
    pruned = estimate_weights(shape, [{"method": "structured", "options": {"mlp_fraction": 0.5}}])
    student = estimate_weights(shape, [{"method": "distill", "options": {"student_layers": 1}}])
    mlp = 3 * shape.hidden * shape.intermediate * shape.layers * 4
    assert dense - pruned.weight_bytes == mlp // 2
    assert student.shape.layers == 1 and student.weight_bytes < dense
    # A pipeline takes its format from the last stage, its shape from all of them.
    both = estimate_weights(shape, [{"method": "structured", "options": {"mlp_fraction": 0.5}}, {"method": "bf16"}])
    assert both.weight_bytes == pruned.weight_bytes // 2


def test_memory_budget_is_an_optional_preset_field_that_round_trips(write_preset) -> None:
    path = write_preset([{"name": "fp32", "method": "fp32"}], memory_budget_gb=1.5)
    preset = load_preset(path)
    assert preset.memory_budget_gb == 1.5
    assert parse_preset(yaml.safe_load(dump_preset(preset))) == preset


@pytest.fixture(scope="module")
def planned_run(tmp_path_factory, tiny_model_dir):
    from tests.conftest import TINY_VARIANT_DEFAULTS
    from workbench.running.runner import Runner

    folder = tmp_path_factory.mktemp("planned-run")
    path = folder / "p.yaml"
    path.write_text(yaml.safe_dump({"name": "planned", "model": str(tiny_model_dir), "device": "cpu", "threads": 1,
                                    **TINY_VARIANT_DEFAULTS, "baseline": "fp32",
                                    "variants": [{"name": "fp32", "method": "fp32"}, {"name": "nf4", "method": "bnb-nf4"}]}))
    return Runner(load_preset(path), out_dir=folder / "out").run()


def test_run_records_estimate_beside_metrics_and_the_cli_compares_them(planned_run) -> None:
    from workbench.planning.planner import estimate_vs_actual

    assert planned_run["status"] == "ok", [r["error"] for r in planned_run["variants"]]
    for record in planned_run["variants"]:
        estimate = record["estimate"]
        assert "estimate" not in record["metrics"] and set(estimate) >= {"weight_bytes", "time_s"}
        assert estimate["weight_bytes"] == pytest.approx(record["metrics"]["weight_bytes"], rel=0.10)
        assert estimate["time_s"] > 0 and record["timing"]["measure_s"] > 0
    assert planned_run["variants"][0]["estimate"]["build_cached"] is True  # fp32 of an fp32 source: no build
    text = estimate_vs_actual(planned_run)
    assert "fp32" in text and "nf4" in text and "%" in text


def test_run_records_a_roofline_for_every_cpu_variant(planned_run, tiny_model_dir) -> None:
    from workbench.views.report import markdown_table

    shape = shape_from_folder(tiny_model_dir)
    bandwidth = planned_run["machine_profile"]["bandwidth"]["bandwidth_bytes_s"]
    for record in planned_run["variants"]:
        roof = record["roofline"]
        assert roof["bandwidth_bytes_s"] == bandwidth
        # untied tiny model: the input embedding table (float32 in both) is read one row per token, not whole
        embedding = shape.vocab * shape.hidden * 4
        assert roof["bytes_per_token"] == record["metrics"]["weight_bytes"] - embedding + shape.hidden * 4
        assert roof["decode_tok_s_limit"] == pytest.approx(bandwidth / roof["bytes_per_token"])
        assert roof["fraction"] == pytest.approx(record["metrics"]["decode_tok_s"] / roof["decode_tok_s_limit"])
    assert "decode limit tok/s" in markdown_table(planned_run) and "of limit" in markdown_table(planned_run)


def test_a_second_plan_knows_which_artifacts_are_cached(planned_run) -> None:
    from workbench.planning.planner import cached_variants

    preset = parse_preset(planned_run["preset"])
    cached = cached_variants(preset, planned_run["model"]["fingerprint"], "cpu", "float32")
    assert cached == {"fp32": True, "nf4": True}
    assert cached_variants(preset, "sha256:another-source", "cpu", "float32") == {"fp32": True, "nf4": False}
