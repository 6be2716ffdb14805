"""The methods whose honesty label is measured (torchao, hqq): the label follows the decode figures, and a run on the
tiny Llama records the label its own stored figures give, with the planned bytes matching the measured ones."""

from __future__ import annotations

import json

import pytest

from tests.requirements import require
from workbench.running.honesty import NO_SPEEDUP, REAL, apply_speed_labels, label_from_speed


def _record(name: str, rate: float, ci: list[float], **extra) -> dict:
    return {"name": name, "status": "ok", "honesty": REAL,
            "metrics": {"decode_tok_s": rate, "decode_tok_s_ci95": ci}, **extra}


def test_the_label_is_real_kernel_only_when_the_measured_decode_is_faster() -> None:
    base = _record("fp32", 10.0, [9.5, 10.5])
    assert label_from_speed(_record("ao", 20.0, [19.0, 21.0]), base)[0] == REAL
    assert label_from_speed(_record("ao", 10.4, [10.0, 10.8]), base)[0] == NO_SPEEDUP  # overlapping intervals
    assert label_from_speed(_record("ao", 4.0, [3.8, 4.2]), base)[0] == NO_SPEEDUP
    # the paired ratio of the interleaved pass decides when there is one, whatever the sequential figures say
    paired = _record("ao", 4.0, [3.8, 4.2], interleaved={"decode_ratio": 1.4, "decode_ratio_ci95": [1.2, 1.6]})
    label, evidence = label_from_speed(paired, base)
    assert label == REAL and "1.40x" in evidence and "[1.20, 1.60]" in evidence
    assert label_from_speed(_record("ao", 20.0, [19.0, 21.0], interleaved={"decode_ratio": 1.1,
                                                                     "decode_ratio_ci95": [0.9, 1.3]}), base)[0] == NO_SPEEDUP
    assert label_from_speed(_record("ao", 20.0, [None, None]), base)[0] == NO_SPEEDUP  # nothing to show it
    # only methods that claim their speed are relabelled; a pipeline already "simulated" keeps its label
    records = {0: base, 1: _record("ao", 4.0, [3.8, 4.2]), 2: _record("nf4", 4.0, [3.8, 4.2]),
               3: {**_record("ao2", 20.0, [19, 21]), "honesty": "simulated"}}
    assert apply_speed_labels(records, "fp32", {"fp32": False, "ao": True, "nf4": False, "ao2": True})
    assert [records[i]["honesty"] for i in range(4)] == [REAL, NO_SPEEDUP, REAL, "simulated"]
    assert "sequential pass" in records[1]["honesty_evidence"]


def test_a_run_records_the_label_its_own_speed_figures_give_and_the_planned_bytes(write_preset, tmp_path) -> None:
    require("torchao")
    require("hqq")
    from workbench.config.presets import load_preset
    from workbench.running.runner import Runner

    path = write_preset([{"name": "fp32", "method": "fp32"},
                         {"name": "ao-int4", "method": "torchao", "options": {"scheme": "int4-weight-only"}},
                         {"name": "ao-int8", "method": "torchao", "options": {"scheme": "int8-weight-only"}},
                         {"name": "hqq-4", "method": "hqq", "options": {"nbits": 4, "group_size": 32}}])
    run = Runner(load_preset(path), out_dir=tmp_path / "out").run()
    records = {r["name"]: r for r in run["variants"]}
    assert run["status"] == "ok", [r["error"] for r in run["variants"]]
    assert records["fp32"]["honesty"] == "real-kernel" and "honesty_evidence" not in records["fp32"]
    for name in ("ao-int4", "ao-int8", "hqq-4"):
        record = records[name]
        assert record["honesty"] in (REAL, NO_SPEEDUP)
        # the label is the one the stored figures give, whichever it is on this machine
        assert (record["honesty"], record["honesty_evidence"]) == label_from_speed(record, records["fp32"])
        # the packed bytes, planned (hqq's few bytes of metadata a layer are not)
        assert record["estimate"]["weight_bytes"] == pytest.approx(record["metrics"]["weight_bytes"], rel=0.005)
        assert record["metrics"]["weight_bytes"] < records["fp32"]["metrics"]["weight_bytes"]
        assert record["metrics"]["kld_mean"] > 0  # quantized: not the baseline's logits
    stored = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {r["name"]: r["honesty"] for r in stored["variants"]} == {n: r["honesty"] for n, r in records.items()}
