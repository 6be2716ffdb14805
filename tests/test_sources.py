"""Model sources: each way a source can be wrong gets a message naming what to do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from workbench.errors import SourceError
from workbench.data.evaltext import pydoc_calibration_text, pydoc_eval_text
from workbench.data.sources import resolve_source


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=f"path {tmp_path}/nope does not exist"):
        resolve_source(str(tmp_path / "nope"))
    with pytest.raises(SourceError, match="path model.gguf does not exist"):
        resolve_source("model.gguf")


def test_hub_id_offline_says_so() -> None:
    with pytest.raises(SourceError, match="model someone/not-cached-model is not in the local cache and no network is reachable"):
        resolve_source("someone/not-cached-model")


def test_encoder_folder_is_not_a_causal_lm(tmp_path: Path) -> None:
    from transformers import DistilBertConfig

    DistilBertConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=64).save_pretrained(tmp_path)
    with pytest.raises(SourceError, match="holds a 'distilbert' model, which is not a causal language model"):
        resolve_source(str(tmp_path))


def test_remote_code_model_names_the_flag_and_is_not_enabled(tmp_path: Path) -> None:
    config = {"model_type": "my-custom-lm", "auto_map": {"AutoModelForCausalLM": "modeling_custom.CustomLM"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(SourceError, match="needs trust_remote_code.*'trust_remote_code: true'.*--trust-remote-code"):
        resolve_source(str(tmp_path))


def test_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="has no config.json"):
        resolve_source(str(tmp_path))


def test_unknown_bundled_name() -> None:
    with pytest.raises(SourceError, match="the bundled model is 'bundled:smollm2-135m-instruct'"):
        resolve_source("bundled:tinyllama")


def test_local_folder_fingerprint_follows_content(tiny_model_dir: Path, tmp_path: Path) -> None:
    import shutil

    first = resolve_source(str(tiny_model_dir))
    assert first.kind == "local" and first.fingerprint.startswith("sha256:")
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    assert resolve_source(str(copy)).fingerprint == first.fingerprint
    config = json.loads((copy / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5 if config.get("rms_norm_eps") != 1e-5 else 1e-6
    (copy / "config.json").write_text(json.dumps(config))
    assert resolve_source(str(copy)).fingerprint != first.fingerprint


def test_calibration_text_is_disjoint_from_eval_text() -> None:
    # Several pydoc topics repeat paragraphs of others: the split must hold paragraph by paragraph.
    eval_paragraphs = {p.strip() for p in pydoc_eval_text().split("\n\n") if p.strip()}
    calibration_paragraphs = {p.strip() for p in pydoc_calibration_text().split("\n\n") if p.strip()}
    assert len(eval_paragraphs) > 100 and len(calibration_paragraphs) > 100
    assert not eval_paragraphs & calibration_paragraphs
