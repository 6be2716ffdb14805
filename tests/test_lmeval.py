"""lm-eval integration: the local task's accuracy equals a hand computation from the model's logits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from workbench.errors import PresetError
from workbench.lmeval.harness import run_tasks
from workbench.lmeval.tasks import TASK_DIR, build_pydoc_lastword
from workbench.config.presets import load_preset, parse_preset
from workbench.running.runner import Runner
from workbench.runtimes.base import DummyVariant


def _hand_accuracy(model, tokenizer, docs: list[dict]) -> float:
    """Sum of continuation log-probs per choice (context and context+choice tokenized as lm-eval does)."""
    correct = 0
    for doc in docs:
        scores = []
        for choice in doc["choices"]:
            context_ids = tokenizer(doc["context"], add_special_tokens=False)["input_ids"]
            whole_ids = tokenizer(doc["context"] + choice, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([whole_ids])).logits[0].double(), -1)
            scores.append(sum(float(logp[i - 1, whole_ids[i]]) for i in range(len(context_ids), len(whole_ids))))
        correct += int(np.argmax(scores) == doc["gold"])
    return correct / len(docs)


def test_local_task_accuracy_equals_hand_computation(tiny_model_dir) -> None:
    from workbench.runtimes.torch import TorchVariant

    variant = TorchVariant.load("fp32", tiny_model_dir, "cpu", 1)
    figures = run_tasks(variant, ["pydoc_lastword"], limit=40, batch_size=4, device="cpu")
    assert figures["lm_eval_error"] is None
    docs = [json.loads(line) for line in (TASK_DIR / "pydoc_lastword.jsonl").read_text().splitlines()[:40]]
    assert figures["lm_eval.pydoc_lastword.acc"] == pytest.approx(_hand_accuracy(variant.model, variant.tokenizer, docs))
    assert figures["lm_eval.pydoc_lastword.acc_stderr"] > 0


def test_shipped_task_file_matches_its_construction_script() -> None:
    shipped = [json.loads(line) for line in (TASK_DIR / "pydoc_lastword.jsonl").read_text().splitlines()]
    assert shipped == build_pydoc_lastword()
    assert all(len(d["choices"]) == 4 and 0 <= d["gold"] < 4 for d in shipped)


def test_unknown_task_offline_names_the_available_ones() -> None:
    data = {"name": "t", "model": "bundled:smollm2-135m-instruct", "baseline": "fp32",
            "variants": [{"name": "fp32", "method": "fp32"}], "lm_eval": {"tasks": ["arc_easyy"]}}
    with pytest.raises(PresetError, match="arc_easyy are not available offline.*offline tasks: pydoc_lastword"):
        parse_preset(data)


def test_lm_eval_failing_inside_a_variant_only_nulls_its_metrics() -> None:
    figures = run_tasks(DummyVariant("d", np.zeros((4, 4))), ["pydoc_lastword"], 5, 1, "cpu")
    assert figures["lm_eval.pydoc_lastword.acc"] is None
    assert "no lm-eval adapter for the DummyVariant runtime" in figures["lm_eval_error"]


def test_run_records_lm_eval_metrics(write_preset, tmp_path) -> None:
    path = write_preset([{"name": "fp32", "method": "fp32"}], name="lmeval",
                        lm_eval={"tasks": ["pydoc_lastword"], "limit": 8, "batch_size": 4})
    run = Runner(load_preset(path), out_dir=tmp_path / "out").run()
    record = run["variants"][0]
    assert record["status"] == "ok" and record["quality_detail"]["lm_eval_error"] is None
    assert 0 <= record["metrics"]["lm_eval.pydoc_lastword.acc"] <= 1
    assert run["protocol"]["lm_eval"]["limit"] == 8
