"""Reused measurements (measure_cache.py): a rerun of an unchanged preset reuses the quality figures and times
the variants again; --reuse-speed reuses everything; any change to what shaped a figure measures it afresh."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from workbench.cli import main
from workbench.config.presets import load_preset
from workbench.running.runner import Runner

QUALITY = ("perplexity", "kld_mean", "kld_p99", "top1_agreement", "delta_p_rms", "weight_bytes")
VARIANTS = [{"name": "fp32", "method": "fp32"}, {"name": "bf16", "method": "bf16"}]


def _run(path: Path, out: Path, **kwargs) -> tuple[dict, list[str]]:
    messages: list[str] = []
    run = Runner(load_preset(path), out_dir=out, on_event=lambda e: messages.append(e.message), **kwargs).run()
    return run, messages


def _by_name(run: dict) -> dict[str, dict]:
    return {r["name"]: r for r in run["variants"]}


@pytest.fixture(scope="module")
def own_home(workbench_home, tmp_path_factory):
    """A home of this module's own: it counts what a run reuses, and other modules' runs of the tiny model in the
    session's home (same protocol, e.g. an fp16 variant) would be found in that home's measurement cache."""
    import shutil

    from workbench.planning.machine import PROFILE_FILE

    home = tmp_path_factory.mktemp("reuse-home")
    if (workbench_home / PROFILE_FILE).exists():  # the session's machine calibration, as in every other test
        shutil.copy(workbench_home / PROFILE_FILE, home / PROFILE_FILE)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WORKBENCH_HOME", str(home))
        yield home


@pytest.fixture(scope="module")
def first_and_rerun(own_home, tmp_path_factory, tiny_model_dir):
    """One fresh run of fp32 + bf16, then the same preset again (nothing changed)."""
    import yaml

    from tests.conftest import TINY_VARIANT_DEFAULTS

    folder = tmp_path_factory.mktemp("reuse")
    path = folder / "reuse.yaml"
    path.write_text(yaml.safe_dump({"name": "reuse", "model": str(tiny_model_dir), "device": "cpu", "threads": 1,
                                    **TINY_VARIANT_DEFAULTS, "baseline": "fp32", "variants": VARIANTS}))
    first, first_messages = _run(path, folder / "first")
    rerun, rerun_messages = _run(path, folder / "rerun")
    return path, folder, first, first_messages, rerun, rerun_messages


def test_a_rerun_reuses_quality_and_times_every_variant_again(first_and_rerun) -> None:
    _path, _folder, first, first_messages, rerun, rerun_messages = first_and_rerun
    assert "perplexity and divergence" in first_messages  # the first run computed quality
    assert "perplexity and divergence" not in rerun_messages  # the rerun did not...
    assert rerun_messages.count("latency") == 2  # ...but timed both variants again
    for name, record in _by_name(rerun).items():
        assert record["status"] == "ok"
        assert record["reused"] == {"run_id": first["run_id"], "figures": "quality"}
        assert record["latency"]["repeats"] != _by_name(first)[name]["latency"]["repeats"]  # fresh timings
        for key in QUALITY:
            assert record["metrics"][key] == _by_name(first)[name]["metrics"][key]


def test_reused_quality_equals_a_fresh_measurement(first_and_rerun) -> None:
    """The independent check: --no-cache recomputes every figure from the weights; the reused ones must agree."""
    path, folder, _first, _m, rerun, _rm = first_and_rerun
    fresh, messages = _run(path, folder / "fresh", use_cache=False)
    assert "perplexity and divergence" in messages
    for name, record in _by_name(fresh).items():
        assert "reused" not in record
        for key in QUALITY:
            assert record["metrics"][key] == pytest.approx(_by_name(rerun)[name]["metrics"][key], rel=1e-9, abs=1e-12)


def test_reuse_speed_runs_no_worker_for_stored_variants(first_and_rerun, capsys) -> None:
    path, folder, _first, _m, _rerun, _rm = first_and_rerun
    out = folder / "speed"
    assert main(["run", str(path), "--reuse-speed", "--out", str(out)]) == 0
    run = json.loads((out / "results.json").read_text())
    logs = sorted(p.name for p in (out / "logs").iterdir())
    assert not [name for name in logs if name.endswith(("-build.log", "-measure.log"))], logs
    runs = {doc["run_id"]: doc for doc in (json.loads(p.read_text()) for p in folder.glob("*/results.json"))}
    for name, record in _by_name(run).items():
        assert record["reused"]["figures"] == "quality and speed"
        source = _by_name(runs[record["reused"]["run_id"]])[name]  # the latest run that measured it, in this folder
        assert "reused" not in source or source["reused"]["figures"] == "quality"
        assert record["metrics"]["decode_tok_s"] == source["metrics"]["decode_tok_s"]
        assert record["latency"] == source["latency"]
    assert "reused from run" in capsys.readouterr().out  # each variant's line says where its figures came from
    assert main(["run", str(path), "--reuse-speed", "--no-cache"]) == 2  # a contradiction: refused by argparse
    assert "not allowed with argument" in capsys.readouterr().err


def test_a_changed_protocol_measures_everything_again(first_and_rerun) -> None:
    path, folder, _first, _m, _rerun, _rm = first_and_rerun
    preset = load_preset(path)
    preset.eval.max_tokens = 256  # fewer eval tokens: other token ids, other figures
    messages: list[str] = []
    run = Runner(preset, out_dir=folder / "changed", on_event=lambda e: messages.append(e.message)).run()
    assert messages.count("perplexity and divergence") == 2
    assert all("reused" not in record for record in run["variants"])


def test_a_new_variant_gets_a_fresh_baseline_and_the_others_reuse(first_and_rerun) -> None:
    path, folder, _first, _m, rerun, _rm = first_and_rerun
    preset = load_preset(path)
    preset.variants.append(preset.variants[1].model_copy(update={"name": "fp16", "method": "fp16"}))
    run = Runner(preset, out_dir=folder / "added").run()
    records = _by_name(run)
    assert "reused" not in records["fp32"]  # measured afresh: fp16's KLD needs its log-probs in this run
    assert records["bf16"]["reused"]["figures"] == "quality"
    assert "reused" not in records["fp16"] and records["fp16"]["metrics"]["kld_mean"] is not None


def test_a_stored_entry_whose_artifact_was_rebuilt_is_not_reused(first_and_rerun) -> None:
    path, folder, _first, _m, rerun, _rm = first_and_rerun
    artifact = Path(_by_name(rerun)["bf16"]["artifact_path"])
    (artifact / "manifest.json").write_text((artifact / "manifest.json").read_text().replace('"created"', '"created" ', 1))
    run, messages = _run(path, folder / "rebuilt")
    records = _by_name(run)
    assert "reused" not in records["bf16"] and "reused" not in records["fp32"]
    assert records["bf16"]["metrics"]["kld_mean"] is not None


def test_the_code_hash_covers_every_source_file_of_the_package() -> None:
    """A change anywhere in workbench/ (metrics, runtimes, methods, not only running/) must miss the cache."""
    import os

    import workbench
    from workbench.running.measure_cache import code_files

    package = Path(workbench.__file__).resolve().parent
    walked = {Path(root, name) for root, _dirs, names in os.walk(package) for name in names if name.endswith(".py")}
    assert set(code_files()) == walked
    assert package / "metrics" / "quality.py" in walked and package / "cli.py" in walked
