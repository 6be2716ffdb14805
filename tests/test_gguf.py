"""GGUF through llama.cpp: logits against torch, quantized round trips, tokenizer agreement, bad files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from workbench.errors import PresetError, WorkbenchError
from workbench.methods.base import BuildContext
from workbench.methods.gguf import GGUF, GGUFOptions
from workbench.config.presets import load_preset, parse_preset
from workbench.running.runner import Runner

CTX = BuildContext(device="cpu", threads=2, trust_remote_code=False, emit=lambda _m: None)
SHORT = {"eval": {"text": "pydoc", "max_tokens": 256, "context": 128, "stride": 128},
         "latency": {"prompt_tokens": 16, "new_tokens": 4, "warmup": 1, "repeats": 2, "target_ci": None, "max_seconds": 2,
                     "interleave": False},
         "samples": {"prompts": ["Hello"], "new_tokens": 4}}


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny_smol_dir):
    """The tiny SmolLM2-tokenizer Llama as GGUF F16 and Q8_0, built by the real converter and quantizer."""
    built = {}
    for quant in ("F16", "Q8_0"):
        out = tmp_path_factory.mktemp(f"gguf-{quant}")
        GGUF().build(tiny_smol_dir, out, GGUFOptions(quant=quant), CTX)
        built[quant] = out
    return built


def _ids(tiny_smol_dir) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_smol_dir)("The quick brown fox jumps over the lazy dog. " * 6)["input_ids"]


def test_f16_logits_match_torch_fp32(tiny_gguf, tiny_smol_dir) -> None:
    from workbench.runtimes.llamacpp import LlamaCppVariant
    from workbench.runtimes.torch import TorchVariant

    ids = _ids(tiny_smol_dir)
    gguf = LlamaCppVariant.load("f16", tiny_gguf["F16"], "cpu", 2, n_ctx=256).logits(ids)
    torch_logits = TorchVariant.load("fp32", tiny_smol_dir, "cpu", 2).logits(ids)
    assert gguf.shape == torch_logits.shape == (len(ids), 49152)
    # F16 weights round to 11 significant bits: logits (mean |x| about 2.5) move by < 0.05, argmax never.
    assert np.abs(gguf - torch_logits).max() < 0.05
    assert (gguf.argmax(-1) == torch_logits.argmax(-1)).all()


def test_q8_0_round_trip_records_its_real_type_mix(tiny_gguf, tiny_smol_dir) -> None:
    from workbench.runtimes.llamacpp import LlamaCppVariant

    report = json.loads((tiny_gguf["Q8_0"] / "stage_report.json").read_text())
    assert report["requested"] == "Q8_0" and report["gguf"]["tensor_types"].get("Q8_0", 0) > 0
    assert 8 <= report["gguf"]["bits_per_weight"] < 16
    variant = LlamaCppVariant.load("q8", tiny_gguf["Q8_0"], "cpu", 2, n_ctx=256)
    ids = _ids(tiny_smol_dir)
    tokens = list(variant.generate(ids[:10], 5))
    assert len(tokens) == 5 and all(0 <= t < 49152 for t in tokens)
    assert variant.footprint().weight_bytes == report["gguf"]["tensor_bytes"]
    # Generation is greedy over the same logits the window path returns.
    assert tokens[0] == int(variant.logits(ids[:10])[-1].argmax())


def test_bundled_file_as_shipped_and_f16_next_to_fp32(bundled_source, tmp_path) -> None:
    # bundled_source: the session's one conversion, and the slow set (minutes of work on the bundled model).
    path = tmp_path / "bundled.yaml"
    path.write_text(json.dumps({"name": "gguf-bundled", "model": "bundled:smollm2-135m-instruct", "device": "cpu",
                                "threads": 2, **SHORT, "baseline": "fp32",
                                "variants": [{"name": "fp32", "method": "fp32"},
                                             {"name": "f16", "method": "gguf", "options": {"quant": "F16"}},
                                             {"name": "q8", "method": "gguf", "options": {"quant": "Q8_0"}},
                                             {"name": "shipped", "method": "gguf-file"}]}))
    run = Runner(load_preset(path), out_dir=tmp_path / "out").run()
    records = {r["name"]: r for r in run["variants"]}
    assert all(r["status"] == "ok" for r in records.values()), {n: r["error"] for n, r in records.items()}
    fp32, f16, shipped = (records[n]["metrics"] for n in ("fp32", "f16", "shipped"))
    assert f16["perplexity"] == pytest.approx(fp32["perplexity"], rel=5e-3) and f16["kld_mean"] < 1e-3
    # Q8_0 straight from the shipped Q4_1 tensors (llama.cpp dequantizes them to float32 first): close to fp32.
    q8 = records["q8"]
    assert q8["build"][-1]["report"]["intermediate"].startswith("none: the source GGUF file's tensors")
    assert q8["gguf"]["tensor_types"].get("Q8_0", 0) > 0 and q8["metrics"]["kld_mean"] < 0.01
    assert records["shipped"]["tokenizer_agreement"]["matching_fraction"] == 1.0
    assert records["shipped"]["gguf"]["tensor_types"]["Q4_1"] > 0 and shipped["kld_mean"] is not None
    assert shipped["disk_bytes"] < f16["disk_bytes"] < fp32["disk_bytes"]
    assert records["f16"]["engine_perf"]["eval_tokens"] > 0 and records["f16"]["runtime"]["name"] == "llamacpp"


BAD_FILES = [
    ("truncated", lambda src: src.read_bytes()[:4_000_000], "damaged GGUF file"),
    ("not-gguf", lambda src: b"PK\x03\x04 this is a zip, not a model", "is not a GGUF file"),
]


@pytest.fixture(scope="module")
def gguf_file_run(tmp_path_factory, tiny_model_dir, bundled_source) -> dict:
    """One run of the tiny model (its own 512-token vocabulary) next to GGUF files it cannot share logits with: the
    bundled file (another vocabulary) and the two bad files. One run serves the vocabulary and the bad-file tests,
    which each started the same tiny baseline before."""
    import yaml

    from tests.conftest import TINY_VARIANT_DEFAULTS

    folder = tmp_path_factory.mktemp("gguf-files")
    variants = [{"name": "fp32", "method": "fp32"}]
    for kind, content, _message in BAD_FILES:
        bad = folder / f"{kind}.gguf"
        bad.write_bytes(content(Path(bundled_source.gguf_file)))
        variants.append({"name": kind, "method": "gguf-file", "options": {"path": str(bad)}})
    # Measured after both failures: a failed variant leaves the ones after it alone.
    variants.append({"name": "other", "method": "gguf-file", "options": {"path": str(bundled_source.gguf_file)}})
    path = folder / "files.yaml"
    path.write_text(yaml.safe_dump({"name": "gguf-files", "model": str(tiny_model_dir), "device": "cpu", "threads": 1,
                                    **TINY_VARIANT_DEFAULTS, "baseline": "fp32", "variants": variants}, sort_keys=False))
    run = Runner(load_preset(path), out_dir=folder / "out").run()
    return {r["name"]: r for r in run["variants"]}


def test_vocabulary_mismatch_is_reported_and_divergence_skipped(gguf_file_run) -> None:
    other = gguf_file_run["other"]
    assert other["status"] == "ok", other["error"]
    assert other["tokenizer_agreement"]["vocab_matching_fraction"] < 1.0
    assert other["metrics"]["kld_mean"] is None and other["metrics"]["top1_agreement"] is None
    assert "differ" in other["quality_detail"]["divergence_note"]


@pytest.mark.parametrize("kind,message", [(b[0], b[2]) for b in BAD_FILES], ids=[b[0] for b in BAD_FILES])
def test_bad_gguf_file_fails_only_its_variant(kind, message, gguf_file_run) -> None:
    assert gguf_file_run["fp32"]["status"] == "ok" and gguf_file_run["other"]["status"] == "ok"
    assert gguf_file_run[kind]["status"] == "failed" and message in gguf_file_run[kind]["error"]


def test_unknown_quant_type_lists_the_valid_ones() -> None:
    data = {"name": "t", "model": "bundled:smollm2-135m-instruct", "baseline": "fp32",
            "variants": [{"name": "fp32", "method": "fp32"}, {"name": "q", "method": "gguf", "options": {"quant": "Q4_K_X"}}]}
    with pytest.raises(PresetError, match="quant: Input should be 'F32', 'F16', 'BF16', 'Q8_0'.*'Q4_K_M'.*got 'Q4_K_X'"):
        parse_preset(data)


def test_quant_type_needing_an_importance_matrix(tiny_smol_dir, tmp_path) -> None:
    with pytest.raises(WorkbenchError, match="IQ2_XXS needs an importance matrix.*types that work without one: Q8_0"):
        GGUF().build(tiny_smol_dir, tmp_path, GGUFOptions(quant="IQ2_XXS"), CTX)


def test_architecture_the_converter_does_not_support(tiny_model_dir, tmp_path) -> None:
    import shutil

    from transformers import OPTConfig, OPTForCausalLM

    model_dir = tmp_path / "opt"
    OPTForCausalLM(OPTConfig(vocab_size=512, hidden_size=32, num_hidden_layers=1, ffn_dim=64, num_attention_heads=2,
                             word_embed_proj_dim=32, max_position_embeddings=128)).save_pretrained(model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, model_dir / name)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(WorkbenchError, match="the llama.cpp converter does not support OPTForCausalLM"):
        GGUF().build(model_dir, out, GGUFOptions(quant="F16"), CTX)


def test_llamacpp_lm_eval_adapter_equals_the_variants_logits(tiny_gguf, tiny_smol_dir) -> None:
    from lm_eval.api.instance import Instance

    from workbench.runtimes.llamacpp import LlamaCppVariant

    variant = LlamaCppVariant.load("f16", tiny_gguf["F16"], "cpu", 2, n_ctx=512)
    adapter = variant.lm_eval_model("cpu", 1)
    context, continuation = "The quick brown fox", " jumps over the lazy dog."
    request = Instance("loglikelihood", {}, (context, continuation), 0)
    (total, greedy), = adapter.loglikelihood([request])
    context_ids = variant.tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = variant.tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    logits = variant.logits(whole).astype(np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    expected = sum(logp[i - 1, whole[i]] for i in range(len(context_ids), len(whole)))
    assert total == pytest.approx(expected, abs=1e-4) and isinstance(greedy, bool)
    rolling, = adapter.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (context + continuation,), 0)])
    assert rolling == pytest.approx(sum(logp[i - 1, whole[i]] for i in range(1, len(whole))), abs=1e-4)
    text, = adapter.generate_until([Instance("generate_until", {}, (context, {"until": ["\n"], "max_gen_toks": 4}), 0)])
    assert isinstance(text, str)


def test_llamacpp_vocabulary_equals_gguf_py_reading_of_the_file(bundled_source) -> None:
    """The tokenizer check takes the file's token texts from llama.cpp's helper process; gguf-py reads the same
    field independently, and llama.cpp's ids for a text are the HF tokenizer's on the bundled file."""
    import gguf
    from transformers import AutoTokenizer

    from workbench.data.validity import llamacpp_tokenization

    path = Path(bundled_source.gguf_file)
    field = gguf.GGUFReader(path).fields["tokenizer.ggml.tokens"]
    expected = [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
    text = "The quick brown fox jumps over the lazy dog. A list is a mutable sequence."
    ids = AutoTokenizer.from_pretrained(bundled_source.hf_dir)(text)["input_ids"]
    native, vocabulary, error = llamacpp_tokenization(path, text)
    assert error is None and len(expected) == 49152 and vocabulary == expected
    assert native == ids


def test_transformers_loads_a_gguf_the_same_with_the_file_parsed_once(tiny_gguf) -> None:
    """gguf_parsed_once() shares one parse of the file (and gguf-py's name map) across transformers' loads: the
    weights are bit-identical to a plain load, the file is parsed once for two loads and a tokenizer, and gguf-py's
    own names are back afterwards."""
    import gguf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workbench.data import gguf_info

    path = tiny_gguf["F16"] / "model.gguf"
    originals = (gguf.GGUFReader, gguf.get_tensor_name_map)
    plain = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).state_dict()
    gguf_info._cached_reader.cache_clear()
    with gguf_info.gguf_parsed_once():
        shared = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).state_dict()
        AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert gguf_info._cached_reader.cache_info().misses == 1
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == originals
    assert plain.keys() == shared.keys() and all(torch.equal(plain[k], shared[k]) for k in plain)


def test_requantizing_a_quantized_file_needs_allow_requantize(tiny_gguf, tmp_path) -> None:
    """A GGUF source that is already quantized is re-quantized directly (llama.cpp dequantizes to float32 first);
    without allow_requantize llama.cpp refuses it, and a type the file already has is copied unchanged."""
    from workbench.data.gguf_info import gguf_reader
    from workbench.methods.gguf import quantize_gguf

    source = tiny_gguf["Q8_0"] / "model.gguf"
    with pytest.raises(WorkbenchError, match="llama_model_quantize failed for Q4_0"):
        quantize_gguf(source, tmp_path / "refused.gguf", "Q4_0", threads=1, pure=True)
    quantize_gguf(source, tmp_path / "q4_0.gguf", "Q4_0", threads=1, pure=True, allow_requantize=True)
    quantize_gguf(source, tmp_path / "q8_0.gguf", "Q8_0", threads=1, pure=True, allow_requantize=True)
    original = {t.name: t for t in gguf_reader(source).tensors}
    q4 = {t.name: t for t in gguf_reader(tmp_path / "q4_0.gguf").tensors}
    q8 = {t.name: t for t in gguf_reader(tmp_path / "q8_0.gguf").tensors}
    matrices = [name for name, t in original.items() if t.tensor_type.name == "Q8_0"]
    assert matrices and all(q4[name].tensor_type.name == "Q4_0" for name in matrices)
    assert all(np.array_equal(np.asarray(q8[name].data), np.asarray(original[name].data)) for name in matrices)
