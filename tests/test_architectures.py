"""The validity matrix: tiny models of several architectures, each as a Hugging Face folder and as a GGUF file,
through fp32, one bitsandbytes and one GGUF variant, with BOS as the model's metadata says, and the fp32
perplexity against a plain transformers computation with the same BOS policy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.architectures import ARCHS, build_hf_folder, plain_perplexity, write_gguf
from workbench.config.presets import load_preset
from workbench.running.runner import Runner

pytestmark = pytest.mark.slow

PROTOCOL = {"device": "cpu", "threads": 2,
            "eval": {"text": "pydoc", "max_tokens": 256, "context": 128, "stride": 128},
            # Speed is not what this matrix checks: the shortest timing the protocol allows, no interleaved pass.
            "latency": {"prompt_tokens": 8, "new_tokens": 2, "warmup": 0, "repeats": 1, "target_ci": None,
                        "interleave": False},
            "samples": {"prompts": ["What is a list?"], "new_tokens": 2}}
# qwen2 is left out: the converter's vocabulary check rejects this tiny config; qwen3 covers the family.
ARCH_NAMES = ["llama", "gemma3", "qwen3", "phi3", "gpt2"]


class BuiltModels:
    """Each architecture's folder and GGUF file, built the first time a test asks for it."""

    def __init__(self, factory: pytest.TempPathFactory):
        self.factory = factory
        self.built: dict[str, tuple[Path, Path]] = {}

    def __getitem__(self, name: str) -> tuple[Path, Path]:
        if name not in self.built:
            folder = build_hf_folder(ARCHS[name], self.factory.mktemp(name))
            self.built[name] = (folder, write_gguf(folder, self.factory.mktemp(f"{name}-gguf") / f"{name}.gguf"))
        return self.built[name]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> BuiltModels:
    return BuiltModels(tmp_path_factory)


def _run(model: str, variants: list[dict], out: Path) -> dict:
    preset = out.parent / f"{out.name}.yaml"
    preset.write_text(yaml.safe_dump({"name": out.name, "model": model, **PROTOCOL, "baseline": "fp32",
                                      "variants": variants}, sort_keys=False))
    return Runner(load_preset(preset), out_dir=out).run()


def _check_fp32_against_plain_transformers(run: dict, folder: Path, bos_expected: bool, model_path: Path) -> None:
    """`model_path`: what the run measured (the folder, or the GGUF file, whose weights are F16-rounded)."""
    protocol = run["protocol"]
    assert protocol["bos"] is bos_expected, protocol["bos_detail"]
    ids = json.loads((Path(run["out_dir"]) / "eval_tokens.json").read_text())
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    expected = plain_perplexity(model_path, ids, 128, tokenizer.bos_token_id if bos_expected else None)
    fp32 = next(r for r in run["variants"] if r["name"] == "fp32")
    assert fp32["metrics"]["perplexity"] == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("name", ARCH_NAMES)
def test_hf_folder(name: str, models, tmp_path: Path) -> None:
    folder, gguf = models[name]
    variants = [{"name": "fp32", "method": "fp32"}, {"name": "int8", "method": "bnb-int8"},
                {"name": "gguf", "method": "gguf-file", "options": {"path": str(gguf)}}]
    run = _run(str(folder), variants, tmp_path / f"{name}-hf")
    records = {r["name"]: r for r in run["variants"]}
    assert all(r["status"] == "ok" for r in records.values()), {n: r["error"] for n, r in records.items()}
    _check_fp32_against_plain_transformers(run, folder, ARCHS[name].adds_bos, folder)
    # Random weights do not predict the text: the baseline is flagged, never plainly ok.
    assert [f["code"] for f in records["fp32"]["flags"]] == ["implausible_perplexity"]
    assert records["int8"]["metrics"]["kld_mean"] is not None
    gguf_record = records["gguf"]
    assert gguf_record["tokenizer_agreement"]["matching_fraction"] == 1.0
    assert gguf_record["metrics"]["perplexity"] == pytest.approx(records["fp32"]["metrics"]["perplexity"], rel=2e-2)
    assert gguf_record["metrics"]["kld_mean"] < 0.01


@pytest.mark.parametrize("name", ARCH_NAMES)
def test_gguf_file(name: str, models, tmp_path: Path) -> None:
    folder, gguf = models[name]
    run = _run(str(gguf), [{"name": "fp32", "method": "fp32"}, {"name": "int8", "method": "bnb-int8"},
                           {"name": "q8", "method": "gguf", "options": {"quant": "Q8_0"}}], tmp_path / f"{name}-gguf")
    records = {r["name"]: r for r in run["variants"]}
    assert all(r["status"] == "ok" for r in records.values()), {n: r["error"] for n, r in records.items()}
    assert run["protocol"]["tokenizer_agreement"]["matching_fraction"] >= 0.99
    assert run["protocol"]["bos"] is ARCHS[name].adds_bos
    assert "tokenizer.ggml.add_bos_token" in run["protocol"]["bos_detail"]  # the file's own metadata decided
    _check_fp32_against_plain_transformers(run, folder, ARCHS[name].adds_bos, gguf)
    # The GGUF variant of a GGUF source is quantized from the file itself, keeping its tokenizer and metadata.
    assert records["q8"]["build"][-1]["report"]["intermediate"].startswith("none: the source GGUF file's tensors")
    assert records["q8"]["metrics"]["perplexity"] == pytest.approx(records["fp32"]["metrics"]["perplexity"], rel=2e-2)


def test_gguf_that_transformers_converts_with_the_wrong_shapes_is_refused(models, tmp_path: Path) -> None:
    """transformers' GGUF conversion ignores Qwen 3's key_length, so a head_dim other than its default comes back
    wrong and those weights would be re-initialised: refused before any variant, with the tensors named."""
    from workbench.errors import WorkbenchError

    _folder, gguf = models["qwen3-head16"]
    with pytest.raises(WorkbenchError, match=r"12 weights do not have the shapes its config implies .*k_norm"):
        _run(str(gguf), [{"name": "fp32", "method": "fp32"}], tmp_path / "qwen3-head16")
