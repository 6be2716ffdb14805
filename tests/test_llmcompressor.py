"""llm-compressor methods (GPTQ, Wanda) on the bundled model, their bad input, sharded export, and the
calibration-robustness grouping. The per-method property checks on a tiny model live in test_methods.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from workbench.cli import main
from workbench.errors import WorkbenchError


def _bundled_preset(tmp_path: Path, variants: list[dict]) -> Path:
    data = {"name": "llmc", "model": "bundled:smollm2-135m-instruct", "device": "cpu", "threads": 2,
            "eval": {"text": "pydoc", "max_tokens": 1024, "context": 512, "stride": 512},
            "latency": {"prompt_tokens": 16, "new_tokens": 4, "warmup": 1, "repeats": 2, "target_ci": None, "max_seconds": 2,
                        "interleave": False},
            "samples": {"prompts": ["What is a list?"], "new_tokens": 8},
            "baseline": "fp32", "variants": variants}
    path = tmp_path / "llmc.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def bundled_llmc_run(tmp_path_factory, bundled_source) -> dict:
    """fp32, GPTQ W4 (group 64) and Wanda 50 % of the bundled model with a small calibration set."""
    out = tmp_path_factory.mktemp("llmc-run")
    calibration = {"samples": 8, "seq_len": 128}
    preset = _bundled_preset(out, [
        {"name": "fp32", "method": "fp32"},
        {"name": "gptq4", "method": "gptq", "options": {"bits": 4, "group_size": 64, "calibration": calibration}},
        {"name": "wanda50", "method": "wanda", "options": {"sparsity": 0.5, "calibration": calibration}},
    ])
    assert main(["run", str(preset), "--out", str(out / "run")]) == 0
    return json.loads((out / "run" / "results.json").read_text())


def _record(run: dict, name: str) -> dict:
    return next(r for r in run["variants"] if r["name"] == name)


def test_gptq_checkpoint_is_packed_smaller_and_loads_back(bundled_llmc_run) -> None:
    fp32, gptq = _record(bundled_llmc_run, "fp32"), _record(bundled_llmc_run, "gptq4")
    assert gptq["status"] == "ok", gptq["error"]
    artifact = Path(gptq["artifact_path"])
    config = json.loads((artifact / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    weights = config["quantization_config"]["config_groups"]["group_0"]["weights"]
    assert weights["num_bits"] == 4 and weights["group_size"] == 64
    # Packed int4 + scales of every decoder Linear: well under half of fp32 (embeddings stay float).
    assert gptq["metrics"]["disk_bytes"] < 0.5 * fp32["metrics"]["disk_bytes"]
    # Measured after loading back: a working model, not far from fp32 (4 bits cost some quality).
    assert fp32["metrics"]["perplexity"] < gptq["metrics"]["perplexity"] < 1.5 * fp32["metrics"]["perplexity"]
    assert gptq["metrics"]["kld_mean"] > 0 and gptq["honesty"] == "simulated"


def test_wanda_zeroes_half_of_every_targeted_layer(bundled_llmc_run) -> None:
    wanda = _record(bundled_llmc_run, "wanda50")
    assert wanda["status"] == "ok", wanda["error"]
    import torch
    from safetensors import safe_open

    artifact = Path(wanda["artifact_path"])
    with safe_open(str(next(artifact.glob("*.safetensors"))), "pt") as tensors:
        decoder = [k for k in tensors.keys() if k.startswith("model.layers.") and k.endswith("proj.weight")]
        assert len(decoder) == 30 * 7
        for key in decoder:  # counted here, independently of the workbench's sparsity metric
            weight = tensors.get_tensor(key)
            assert abs((weight == 0).sum().item() / weight.numel() - 0.5) < 0.01, key
        embedding = tensors.get_tensor("model.embed_tokens.weight")  # tied to lm_head, which is ignored
    source = Path(_record(bundled_llmc_run, "fp32")["artifact_path"])
    with safe_open(str(next(source.glob("*.safetensors"))), "pt") as tensors:
        assert torch.equal(embedding, tensors.get_tensor("model.embed_tokens.weight"))  # untouched, its own zeros only
    assert wanda["honesty"] == "dense-with-zeros"
    assert 0.3 < wanda["metrics"]["sparsity"] < 0.5  # embeddings and norms are not pruned


def test_export_model_writes_shards_that_transformers_loads(bundled_llmc_run, tmp_path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path / "export"
    assert main(["export-model", bundled_llmc_run["run_id"], "fp32", "--out", str(out), "--max-shard-size", "100MB"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 5 and set(index["weight_map"].values()) == {p.name for p in shards}
    embedding_bytes = 49152 * 576 * 4  # one tensor cannot be split: the 113 MB embedding gets a shard of its own
    assert all(p.stat().st_size <= max(100 * 10**6, embedding_bytes) * 1.01 for p in shards)
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    original = AutoModelForCausalLM.from_pretrained(_record(bundled_llmc_run, "fp32")["artifact_path"], dtype=torch.float32)
    ids = torch.tensor([[1, 520, 2, 900, 33]])
    with torch.no_grad():
        assert torch.equal(exported(ids).logits, original(ids).logits)
    assert main(["export-model", bundled_llmc_run["run_id"], "nope", "--out", str(tmp_path / "x")]) == 2


def test_group_size_that_does_not_divide_names_the_valid_sizes() -> None:
    from workbench.methods.llmcompressor import check_group_size

    widths = {f"model.layers.{i}.mlp.down_proj": 1536 for i in range(2)} | {"model.layers.0.self_attn.q_proj": 576}
    with pytest.raises(WorkbenchError, match=r"group_size 128 does not divide the input width 576 .* valid group "
                                             r"sizes for this model: 16, 32, 64"):
        check_group_size(widths, 128)
    check_group_size(widths, 64)
    check_group_size(widths, None)


def test_group_size_error_is_refused_before_anything_runs(write_preset, tmp_path, capsys) -> None:
    """The widths come from the model's config, so a group size that cannot work is refused at preset check."""
    preset = write_preset([{"name": "fp32", "method": "fp32"},
                           {"name": "gptq", "method": "gptq", "options": {"group_size": 256,
                                                                         "calibration": {"samples": 2, "seq_len": 32}}}])
    assert main(["run", str(preset), "--out", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err
    assert "group_size 256 does not divide the input width 64" in error
    assert "valid group sizes for this model: 16, 32, 64" in error
    assert not (tmp_path / "run" / "results.json").exists()  # nothing was prepared or built


def test_calibration_too_short_for_the_samples_is_refused(tiny_model_dir) -> None:
    from transformers import AutoTokenizer

    from workbench.data.calibration import CalibrationSpec, calibration_sequences

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    with pytest.raises(WorkbenchError, match=r"enough for \d+ sequences of 4096, but samples=10000"):
        calibration_sequences(tokenizer, CalibrationSpec(samples=10000, seq_len=4096))
    sequences = calibration_sequences(tokenizer, CalibrationSpec(samples=3, seq_len=16, seed=1))
    assert len(sequences) == 3 and all(len(s) == 16 for s in sequences)
    assert sequences != calibration_sequences(tokenizer, CalibrationSpec(samples=3, seq_len=16, seed=2))


def test_calibration_text_never_overlaps_the_eval_text(tmp_path) -> None:
    from workbench.data.calibration import calibration_text
    from workbench.data.evaltext import pydoc_eval_text

    eval_paragraphs = {p.strip() for p in pydoc_eval_text().split("\n\n") if len(p.strip()) > 80}
    for spec in ("pydoc", "pydoc-a", "pydoc-b"):
        calibration = calibration_text(spec)
        assert len(calibration) > 50_000 and not any(p in calibration for p in eval_paragraphs), spec
    a, b = set(calibration_text("pydoc-a").split("\n\n")), set(calibration_text("pydoc-b").split("\n\n"))
    assert not (a & b) - {""}  # the two halves are different texts
    leaky = tmp_path / "leaky.txt"
    # A set's order follows the string hash seed; a fixed paragraph keeps the test deterministic. The count is
    # not pinned to 1: the check may find a long paragraph's parts as several paragraphs of the eval text.
    leaky.write_text("my notes\n\n" + sorted(eval_paragraphs)[0])
    with pytest.raises(WorkbenchError, match=r"contains [1-9]\d* paragraph\(s\) of the evaluation text"):
        calibration_text(str(leaky))


@pytest.mark.parametrize("options, message", [
    ({"sparsity": 1.0}, "sparsity must be in [0, 1): got 1.0"),
    ({"sparsity": -0.1}, "sparsity must be in [0, 1): got -0.1"),
    ({"mask": "4:2"}, "needs 0 < N < M"),
    ({"mask": "half"}, "mask must be 'unstructured' or N:M"),
])
def test_bad_sparsity_options_are_refused_in_the_preset(write_preset, options, message) -> None:
    from workbench.errors import PresetError
    from workbench.config.presets import load_preset

    path = write_preset([{"name": "fp32", "method": "fp32"}, {"name": "w", "method": "wanda", "options": options}])
    with pytest.raises(PresetError) as caught:
        load_preset(path)
    assert message in str(caught.value) and "variant 'w' (wanda)" in str(caught.value)


def test_a_stage_that_cannot_take_the_previous_output_is_refused(write_preset) -> None:
    from workbench.errors import PresetError
    from workbench.config.presets import load_preset

    path = write_preset([{"name": "fp32", "method": "fp32"},
                         {"name": "bad", "pipeline": [{"method": "gptq"}, {"method": "gguf"}]}])
    with pytest.raises(PresetError, match=r"stage 'gguf' cannot take the output of 'gptq' \(a quantized artifact.*"
                                          r"Nothing can follow gptq: put it last"):
        load_preset(path)
    ok = write_preset([{"name": "fp32", "method": "fp32"},
                       {"name": "good", "pipeline": [{"method": "wanda"}, {"method": "gguf"}]}], name="ok")
    assert [s.method for s in load_preset(ok).variant("good").stages()] == ["wanda", "gguf"]


def test_calibration_groups_report_the_spread() -> None:
    from workbench.analysis.robustness import calibration_groups, robustness_text

    def variant(name, text, ppl):
        return {"name": name, "method": "gptq", "options": {"bits": 4, "calibration": {"text": text}}}, \
            {"name": name, "status": "ok", "metrics": {"perplexity": ppl, "kld_mean": 0.1, "top1_agreement": 0.9}}

    specs, records = zip(variant("a", "pydoc-a", 10.0), variant("b", "pydoc-b", 12.0),
                         ({"name": "other", "method": "gptq", "options": {"bits": 8}},
                          {"name": "other", "status": "ok", "metrics": {"perplexity": 9.0}}))
    run = {"preset": {"variants": list(specs)}, "variants": list(records)}
    (group,) = calibration_groups(run)
    assert [m["name"] for m in group["members"]] == ["a", "b"]
    spread = group["spread"]["perplexity"]
    assert (spread["min"], spread["max"], spread["mean"]) == (10.0, 12.0, 11.0)
    assert spread["relative_range"] == pytest.approx(2 / 11)
    assert "perplexity: 10 .. 12" in robustness_text([group])


def test_a_gguf_only_source_says_which_method_can_take_it(tmp_path) -> None:
    import gguf
    import numpy as np

    from workbench.errors import SourceError
    from workbench.data.sources import resolve_source

    path = tmp_path / "exotic.gguf"
    writer = gguf.GGUFWriter(str(path), "exotic-arch")  # an architecture transformers has no loader for
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(SourceError) as caught:
        resolve_source(str(path))
    message = str(caught.value)
    assert "llama.cpp can still run it" in message and "gguf-file" in message
    assert "gptq" in message and "magnitude" in message
