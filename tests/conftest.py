"""Shared fixtures: an isolated WORKBENCH_HOME and a tiny random Llama with its own small tokenizer."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

TINY_VARIANT_DEFAULTS = {
    "eval": {"text": "pydoc", "max_tokens": 384, "context": 128, "stride": 128},
    # Exactly `repeats` timed runs (target_ci: null): the adaptive repeats would go on for up to max_seconds per
    # variant, and speed is not what these runs check. No interleaved speed pass: tests/test_speed_noise.py runs
    # the adaptive timing and that pass.
    "latency": {"prompt_tokens": 16, "new_tokens": 4, "warmup": 1, "repeats": 2, "target_ci": None, "interleave": False},
    "samples": {"prompts": ["What is a list?"], "new_tokens": 4},
}


@pytest.fixture(scope="session", autouse=True)
def workbench_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One home for the whole session (tests and the worker processes they spawn share it, and its artifact cache);
    the real cache is untouched."""
    home = Path(os.environ.get("WORKBENCH_TEST_HOME") or tmp_path_factory.mktemp("workbench-home"))
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker and os.environ.get("WORKBENCH_TEST_HOME"):
        # One home per pytest-xdist worker: tests such as test_shared_app compare the home's folders before and
        # after, which the other worker's runs would change under them.
        home = home / worker
    os.environ["WORKBENCH_HOME"] = str(home)
    os.environ["HF_HUB_OFFLINE"] = "1"  # tests never need a network
    if worker:
        _calibrate_once(home)
    return home


def _calibrate_once(home: Path) -> None:
    """Under pytest-xdist the other test worker keeps the cores busy, so every run's machine calibration would see
    contention and, by design (planning.machine.machine_profile), not be cached: each run would calibrate again, a worker
    process and several seconds per run. Calibrate once per session for the thread counts the tests use, in a real
    worker process, and store the result as the cached profile, as an uncontended first run would have. Tests of
    the contention rule itself (test_roofline.py) use their own home and fake machines."""
    import json

    from workbench.process import run_in_worker
    from workbench.planning.machine import PROFILE_FILE, _profile_key

    (home / "logs").mkdir(parents=True, exist_ok=True)
    outcome = run_in_worker("tests.worker_targets:calibrate_thread_counts", {"threads": [1, 2]},
                            home / "logs" / "session-calibrate.log")
    if outcome.ok:  # otherwise the runs calibrate as usual
        profiles = {_profile_key(threads): {**profile, "calibrations": 1} for threads, profile in outcome.result.items()}
        (home / PROFILE_FILE).write_text(json.dumps(profiles, indent=1))


def _tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from workbench.data.evaltext import pydoc_calibration_text

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


@pytest.fixture(scope="session")
def tiny_tied_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with lm_head tied to the embeddings, as SmolLM2 has it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("tiny-tied")
    untied = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    config = AutoConfig.from_pretrained(tiny_model_dir, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {n: t for n, t in untied.state_dict().items() if n != "lm_head.weight"}
    model.load_state_dict(state, strict=False)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
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
def bundled_source(tmp_path_factory: pytest.TempPathFactory):
    """The bundled SmolLM2, converted once per test session (about 30 s on an idle machine, minutes on a busy one).

    Under pytest-xdist the workers have homes of their own, so the first worker to need it converts it and leaves a
    copy in the run's shared temporary folder; the others copy that into their own cache instead of converting
    again. Copies, not links: a test that damages a file in its cache must not reach another worker's."""
    import fcntl
    import shutil

    from workbench.paths import sources_dir
    from workbench.data.sources import BUNDLED, resolve_source

    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return resolve_source(BUNDLED)
    shared = tmp_path_factory.getbasetemp().parent / "bundled-source"  # the controller's basetemp: this run only
    with open(shared.with_name("bundled-source.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the second worker waits for the first one's conversion
        if shared.is_dir():
            for entry in shared.iterdir():
                if not (sources_dir() / entry.name).exists():
                    shutil.copytree(entry, sources_dir() / entry.name)
        source = resolve_source(BUNDLED)  # finds the copy (its manifest checked) or converts
        if not shared.is_dir():
            partial = shared.with_name("bundled-source.partial")
            shutil.copytree(source.hf_dir, partial / source.hf_dir.name)
            partial.rename(shared)
    return source


def smol_tokenizer_llama(folder: Path, tokenizer_dir: Path, hidden: int, intermediate: int) -> Path:
    """A 2-layer random Llama of the given widths with SmolLM2's real tokenizer (which llama.cpp's converter
    recognises), saved in `folder`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # sharper than random init's near-uniform outputs, so differences are visible
        model.model.embed_tokens.weight.mul_(20)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_smol_dir(tmp_path_factory: pytest.TempPathFactory, bundled_source) -> Path:
    """A tiny random Llama (64 wide) with SmolLM2's real tokenizer."""
    return smol_tokenizer_llama(tmp_path_factory.mktemp("tiny-smol"), bundled_source.hf_dir, 64, 128)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that need the bundled model (converted once, then minutes of work on it) belong to the slow set, so
    `pytest -m "not slow"` is a quick loop; CI runs everything."""
    for item in items:
        if {"bundled_source", "tiny_smol_dir"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    if os.environ.get("PYTEST_XDIST_WORKER"):  # every worker sorts alike, so their collections still agree
        rank = {module: i for i, module in enumerate(LONG_MODULES)}
        items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))


# Modules that share something process-wide beyond one test worker's home: both start Ray (a local instance, a
# two-node Cluster), so pytest-xdist runs them one after the other on the same worker.
SERIAL_GROUPS = {"tests/test_scaleout.py": "ray", "tests/test_scaleout_nodes.py": "ray"}
# The longest modules (minutes each on 2 cores), started first under pytest-xdist so that neither worker is left
# with a long module at the end while the other idles.
LONG_MODULES = ["tests/test_architectures.py", "tests/test_bundled.py", "tests/test_llmcompressor.py",
                "tests/test_gguf.py", "tests/test_runner.py", "tests/test_shared_app.py", "tests/test_ui.py"]


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """One module per work unit (as --dist loadfile: a module's scoped fixtures, such as a shared run, are built
    once), with the Ray modules as one unit."""
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return SERIAL_GROUPS.get(module, module)

    return ModuleScheduling(config, log)
