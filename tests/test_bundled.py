"""Integration: the bundled SmolLM2 through the CLI, as a new user runs it (converted once per session)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from workbench.cli import main

PRESET = Path(__file__).parent.parent / "presets" / "tiny-smoke.yaml"


# bundled_source: the session's one conversion of the bundled model (shared with the other tests that need it),
# which also puts this test in the slow set, where a multi-minute run on the bundled model belongs.
@pytest.mark.usefixtures("bundled_source")
def test_bundled_smoke_run_through_the_cli(tmp_path: Path, capsys) -> None:
    assert main(["run", str(PRESET), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Q4_1 weights dequantized" in out  # the baseline's provenance is said wherever figures appear
    run = json.loads((tmp_path / "results.json").read_text())
    records = {r["name"]: r["metrics"] for r in run["variants"]}
    assert records["nf4"]["weight_bytes"] < records["int8"]["weight_bytes"] < records["fp32"]["weight_bytes"]
    assert records["fp32"]["kld_mean"] < 1e-4 and records["fp32"]["top1_agreement"] == 1.0
    # Quantization costs quality; 1 % slack covers int8's near-lossless noise.
    assert records["fp32"]["perplexity"] <= records["int8"]["perplexity"] * 1.01
    assert records["int8"]["perplexity"] <= records["nf4"]["perplexity"] * 1.01
    assert 5 < records["fp32"]["perplexity"] < 40  # SmolLM2-135M on Python's docs, not a broken model
    assert run["model"]["note"] and "dequantized" in run["model"]["note"]
    samples = run["variants"][0]["samples"]
    assert len(samples) == 3 and all(s["output"].strip() for s in samples)
