"""Reproducibility bundles: a bundle round-trips and reproduces its quality figures on the same machine."""

from __future__ import annotations

import json
import zipfile

import pytest

from workbench.views.bundle import compare_runs, read_bundle, reproduce
from workbench.cli import main
from workbench.errors import WorkbenchError
from workbench.config.presets import load_preset
from workbench.running.runner import Runner


def test_bundle_reproduces_quality_figures_exactly(write_preset, tmp_path, capsys) -> None:
    path = write_preset([{"name": "fp32", "method": "fp32"}, {"name": "nf4", "method": "bnb-nf4"}], name="bundle",
                        latency={"prompt_tokens": 8, "new_tokens": 3, "warmup": 1, "repeats": 2, "target_ci": None, "max_seconds": 2,
                                 "interleave": False})
    run = Runner(load_preset(path), out_dir=tmp_path / "run").run()
    bundle = tmp_path / "run.zip"
    assert main(["bundle", run["run_id"], "--out", str(bundle)]) == 0
    preset, original, tokens = read_bundle(bundle)
    assert original["run_id"] == run["run_id"] and tokens == json.loads((tmp_path / "run" / "eval_tokens.json").read_text())

    comparisons, notes = reproduce(bundle, allow_paths=True)  # the tiny model is a local folder
    assert notes == []
    quality = [c for c in comparisons if c.metric in ("perplexity", "kld_mean", "top1_agreement", "weight_bytes")]
    assert len(quality) == 8 and all(c.ok for c in quality)
    assert all(c.new == c.original for c in quality if c.metric in ("perplexity", "top1_agreement", "weight_bytes"))


def test_comparison_flags_a_changed_figure() -> None:
    original = {"variants": [{"name": "a", "metrics": {"perplexity": 10.0, "decode_tok_s": 100.0}}]}
    new = {"variants": [{"name": "a", "metrics": {"perplexity": 10.01, "decode_tok_s": 130.0}}]}
    verdict = {c.metric: c.ok for c in compare_runs(original, new)}
    assert verdict == {"perplexity": False, "decode_tok_s": True}


def test_bundle_from_an_incompatible_version_says_which(tmp_path) -> None:
    bundle = tmp_path / "old.zip"
    with zipfile.ZipFile(bundle, "w") as archive:
        archive.writestr("bundle.json", json.dumps({"format": 99, "workbench": "9.0.0"}))
        for name in ("preset.yaml", "results.json", "eval_tokens.json"):
            archive.writestr(name, "{}")
    with pytest.raises(WorkbenchError, match="bundle format 99 from workbench 9.0.0.*reads format 1 only"):
        read_bundle(bundle)
    (tmp_path / "not.zip").write_text("hello")
    assert main(["reproduce", str(tmp_path / "not.zip")]) == 2
