"""Distillation: the student is really smaller and training lowers its KL to the teacher."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from workbench.errors import WorkbenchError
from workbench.methods.distill import DistillOptions, build_student, distill


@pytest.fixture
def teacher(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():  # random init predicts almost uniformly; sharpen it so there is something to learn
        model.lm_head.weight.mul_(40)
    return model


def _kl_to_teacher(teacher, student, batch: torch.Tensor) -> float:
    with torch.no_grad():
        t = F.log_softmax(teacher(batch).logits, -1)
        s = F.log_softmax(student(batch).logits, -1)
    return float((t.exp() * (t - s)).sum(-1).mean())


def test_student_is_smaller_and_refuses_to_grow(teacher) -> None:
    student = build_student(teacher, student_layers=1, intermediate_size=64)
    assert student.config.num_hidden_layers == 1 and len(student.model.layers) == 1
    assert student.model.layers[0].mlp.up_proj.weight.shape == (64, 64)
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in teacher.parameters())
    with pytest.raises(WorkbenchError, match="would not be smaller than the teacher"):
        build_student(teacher, student_layers=3, intermediate_size=64)
    with pytest.raises(WorkbenchError, match="would not be smaller than the teacher"):
        build_student(teacher, student_layers=1, intermediate_size=256)


def test_distillation_lowers_kl_to_the_teacher(teacher) -> None:
    torch.manual_seed(0)
    student = build_student(teacher, student_layers=1, intermediate_size=64)
    tokens = torch.randint(0, teacher.config.vocab_size, (4000,)).tolist()
    held_out = torch.randint(0, teacher.config.vocab_size, (4, 64))
    before = _kl_to_teacher(teacher, student, held_out)
    options = DistillOptions(alpha=1.0, max_steps=40, seq_len=64, batch_size=4, learning_rate=3e-4, time_budget_s=120)
    curve = distill(teacher, student, tokens, options)
    after = _kl_to_teacher(teacher, student, held_out)
    assert len(curve) == 40 and after < 0.8 * before
    assert sum(p["kl"] for p in curve[-5:]) < sum(p["kl"] for p in curve[:5])


def test_time_budget_too_small_for_one_step(teacher) -> None:
    student = build_student(teacher, student_layers=1, intermediate_size=64)
    options = DistillOptions(time_budget_s=1e-6, seq_len=32, batch_size=2)
    with pytest.raises(WorkbenchError, match="too small to take one step"):
        distill(teacher, student, list(range(100)) * 5, options)


def test_distilled_variant_runs_and_records_its_loss_curve(write_preset, tmp_path) -> None:
    from workbench.config.presets import load_preset
    from workbench.running.runner import Runner

    path = write_preset([{"name": "fp32", "method": "fp32"},
                         {"name": "student", "method": "distill",
                          "options": {"student_layers": 1, "max_steps": 5, "seq_len": 32, "batch_size": 2}}],
                        name="distill")
    run = Runner(load_preset(path), out_dir=tmp_path / "out").run()
    teacher_record, student_record = run["variants"]
    assert student_record["status"] == "ok", student_record["error"]
    report = student_record["build"][0]["report"]
    assert report["steps"] == 5 and len(report["loss_curve"]) == 5
    assert report["student_parameters"] < report["teacher_parameters"]
    assert student_record["metrics"]["weight_bytes"] < teacher_record["metrics"]["weight_bytes"]
