"""Shared fixtures: an isolated WORKBENCH_HOME and a tiny random Llama with its own small tokenizer."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

TINY_VARIANT_DEFAULTS = {
    "eval": {"text": "pydoc", "max_tokens": 384, "context": 128, "stride": 128},
    # A short timing budget (adaptive repeats would otherwise spend up to a minute per variant on a busy box)
    # and no interleaved speed pass: tests/test_speed_noise.py runs that one.
    "latency": {"prompt_tokens": 16, "new_tokens": 4, "warmup": 1, "repeats": 2, "max_seconds": 2, "interleave": False},
    "samples": {"prompts": ["What is a list?"], "new_tokens": 4},
}


@pytest.fixture(scope="session", autouse=True)
def workbench_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One home for the whole session (tests and the worker processes they spawn share it, and its artifact cache);
    the real cache is untouched."""
    home = Path(os.environ.get("WORKBENCH_TEST_HOME") or tmp_path_factory.mktemp("workbench-home"))
    os.environ["WORKBENCH_HOME"] = str(home)
    os.environ["HF_HUB_OFFLINE"] = "1"  # tests never need a network
    return home


def _tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from workbench.evaltext import pydoc_calibration_text

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([pydoc_calibration_text()], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="</s>")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama (hidden 64) with random weights, saved as safetensors with its tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = _tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def write_preset(tmp_path: Path, tiny_model_dir: Path):
    """Write a preset YAML for the tiny model; keyword arguments override or add top-level keys."""

    def write(variants: list[dict[str, Any]], name: str = "tiny", **overrides: Any) -> Path:
        data: dict[str, Any] = {"name": name, "model": str(tiny_model_dir), "device": "cpu", "threads": 1,
                                **TINY_VARIANT_DEFAULTS, "baseline": variants[0]["name"], "variants": variants}
        data.update(overrides)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return write


@pytest.fixture(scope="session")
def bundled_source():
    """The bundled SmolLM2, converted once per test session (about 30 s)."""
    from workbench.sources import BUNDLED, resolve_source

    return resolve_source(BUNDLED)


@pytest.fixture(scope="session")
def tiny_smol_dir(tmp_path_factory: pytest.TempPathFactory, bundled_source) -> Path:
    """A tiny random Llama with SmolLM2's real tokenizer, which llama.cpp's converter recognises."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-smol")
    tokenizer = AutoTokenizer.from_pretrained(bundled_source.hf_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # sharper than random init's near-uniform outputs, so differences are visible
        model.model.embed_tokens.weight.mul_(20)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that need the bundled model (converted once, then minutes of work on it) belong to the slow set, so
    `pytest -m "not slow"` is a quick loop; CI runs everything."""
    for item in items:
        if {"bundled_source", "tiny_smol_dir"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
