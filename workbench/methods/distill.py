"""Knowledge distillation into a smaller student built from the teacher's own weights.

The student keeps evenly spaced teacher layers (fewer layers) and/or the most important MLP
channels (narrower MLP), then trains on calibration text (disjoint from the eval text) with
    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, next token)
until the time budget or the step limit runs out. The loss curve is saved with the artifact
(`stage_report.json`) and lands in the record's `build` list. The result is a real, smaller model.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from workbench.errors import WorkbenchError
from workbench.methods.base import BuildContext, BuildSpeed, Method, MethodOptions, SizeEstimate, SizeInput

if TYPE_CHECKING:
    from workbench.planning.modelshape import ModelShape


class DistillOptions(MethodOptions):
    student_layers: int | None = Field(None, gt=0, description="Decoder layers kept (evenly spaced); default: half.")
    intermediate_size: int | None = Field(None, gt=0, description="MLP width of the student; default: the teacher's.")
    temperature: float = Field(2.0, gt=0, description="Softmax temperature T of the distillation KL.")
    alpha: float = Field(0.5, ge=0, le=1, description="Weight of the KL term; 1 - alpha weighs cross-entropy.")
    time_budget_s: float = Field(120.0, gt=0, description="Wall-clock budget for training.")
    max_steps: int = Field(200, gt=0, description="Upper bound on optimizer steps.")
    seq_len: int = Field(128, gt=1, description="Tokens per training sequence.")
    batch_size: int = Field(4, gt=0, description="Sequences per step.")
    learning_rate: float = Field(1e-4, gt=0, description="AdamW learning rate.")
    seed: int = Field(0, description="Seed for initial choices and batch order.")


def student_layer_count(options: DistillOptions, teacher_layers: int) -> int:
    return options.student_layers or max(1, teacher_layers // 2)  # the option's documented default: half


def _kept_layers(teacher_layers: int, student_layers: int) -> list[int]:
    """Evenly spaced indices, always keeping the first and last layer."""
    if student_layers == 1:
        return [0]
    return sorted({round(i * (teacher_layers - 1) / (student_layers - 1)) for i in range(student_layers)})


def build_student(teacher: Any, student_layers: int, intermediate_size: int) -> Any:
    """A smaller model of the teacher's class, initialised from the teacher's weights."""
    import copy

    import torch

    config = teacher.config
    if student_layers > config.num_hidden_layers or intermediate_size > config.intermediate_size:
        raise WorkbenchError(
            f"the student ({student_layers} layers, MLP {intermediate_size}) would not be smaller than the teacher "
            f"({config.num_hidden_layers} layers, MLP {config.intermediate_size})"
        )
    student = copy.deepcopy(teacher)
    keep = _kept_layers(config.num_hidden_layers, student_layers)
    student.model.layers = torch.nn.ModuleList([student.model.layers[i] for i in keep])
    for index, layer in enumerate(student.model.layers):
        layer.self_attn.layer_idx = index  # the KV cache is indexed by position in the new stack
        if intermediate_size < config.intermediate_size:
            _narrow_mlp(layer.mlp, intermediate_size)
    student.config = copy.deepcopy(config)
    student.config.num_hidden_layers = len(keep)
    student.config.intermediate_size = intermediate_size
    if getattr(student.config, "layer_types", None):
        student.config.layer_types = [student.config.layer_types[i] for i in keep]
    return student


def _narrow_mlp(mlp: Any, width: int) -> None:
    """Keep the `width` channels whose up/gate rows and down column carry the most weight (L2 norm product)."""
    import torch

    score = mlp.up_proj.weight.norm(dim=1) * mlp.gate_proj.weight.norm(dim=1) * mlp.down_proj.weight.norm(dim=0)
    keep = torch.topk(score, width).indices.sort().values
    for name in ("gate_proj", "up_proj"):
        old = getattr(mlp, name)
        new = torch.nn.Linear(old.in_features, width, bias=old.bias is not None)
        new.weight.data = old.weight.data[keep].clone()
        setattr(mlp, name, new)
    old = mlp.down_proj
    new = torch.nn.Linear(width, old.out_features, bias=old.bias is not None)
    new.weight.data = old.weight.data[:, keep].clone()
    if old.bias is not None:
        new.bias.data = old.bias.data.clone()
    mlp.down_proj = new


def distill(teacher: Any, student: Any, tokens: list[int], options: DistillOptions, emit=lambda _m: None) -> list[dict]:
    """Train `student` towards `teacher` in place; return the loss curve."""
    import torch
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(options.seed)
    data = torch.tensor(tokens)
    if len(data) < options.seq_len + 1:
        raise WorkbenchError(f"calibration text has {len(data)} tokens, fewer than one sequence of {options.seq_len}")
    optimizer = torch.optim.AdamW(student.parameters(), lr=options.learning_rate)
    teacher.eval()
    student.train()
    temperature, alpha = options.temperature, options.alpha
    curve: list[dict] = []
    started = time.perf_counter()
    for step in range(1, options.max_steps + 1):
        starts = torch.randint(0, len(data) - options.seq_len, (options.batch_size,), generator=generator)
        batch = torch.stack([data[s : s + options.seq_len] for s in starts])
        with torch.no_grad():
            teacher_logits = teacher(batch).logits
        student_logits = student(batch).logits
        kl = F.kl_div(F.log_softmax(student_logits / temperature, -1), F.log_softmax(teacher_logits / temperature, -1),
                      log_target=True, reduction="batchmean") * temperature**2 / options.seq_len
        ce = F.cross_entropy(student_logits[:, :-1].reshape(-1, student_logits.shape[-1]), batch[:, 1:].reshape(-1))
        loss = alpha * kl + (1 - alpha) * ce
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        elapsed = time.perf_counter() - started
        curve.append({"step": step, "loss": float(loss), "kl": float(kl), "ce": float(ce), "elapsed_s": elapsed})
        if step == 1 and elapsed > options.time_budget_s:
            raise WorkbenchError(
                f"time_budget_s={options.time_budget_s:g} is too small to take one step (one step took {elapsed:.1f} s)"
            )
        if step % 10 == 0:
            emit(f"distillation step {step}: loss {float(loss):.3f}")
        if elapsed + elapsed / step > options.time_budget_s:  # the next step would overrun the budget
            break
    student.eval()
    return curve


class Distill(Method):
    name = "distill"
    summary = "Knowledge distillation into a smaller student (fewer layers / narrower MLP) initialised from the teacher."
    Options = DistillOptions
    honesty = "real-kernel"

    def reshape(self, shape: "ModelShape", rest: str, options: MethodOptions) -> tuple["ModelShape", str]:
        assert isinstance(options, DistillOptions)
        return shape.shrunk(layers=student_layer_count(options, shape.layers),
                            intermediate=options.intermediate_size), rest

    def estimate_size(self, options: MethodOptions, size: SizeInput) -> SizeEstimate:
        return SizeEstimate(size.dense_bytes(), f"{self.name} ({size.rest}, smaller shape)", size.rest)

    def estimate_build_s(self, options: MethodOptions, shape: "ModelShape", speed: BuildSpeed) -> float:
        assert isinstance(options, DistillOptions)
        return speed.io_s() + options.time_budget_s  # training stops at its wall-clock budget

    def build(self, input_dir: Path, out_dir: Path, options: MethodOptions, ctx: BuildContext) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from workbench.data.evaltext import pydoc_calibration_text

        assert isinstance(options, DistillOptions)
        torch.manual_seed(options.seed)
        teacher = AutoModelForCausalLM.from_pretrained(input_dir, dtype=torch.float32,
                                                       trust_remote_code=ctx.trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(input_dir, trust_remote_code=ctx.trust_remote_code)
        config = teacher.config
        layers = student_layer_count(options, config.num_hidden_layers)
        width = options.intermediate_size or config.intermediate_size
        student = build_student(teacher, layers, width)
        tokens = tokenizer(pydoc_calibration_text(), add_special_tokens=False)["input_ids"]
        ctx.emit(f"distilling into {layers} layers, MLP {width}")
        curve = distill(teacher, student, tokens, options, ctx.emit)
        student.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        (out_dir / "stage_report.json").write_text(json.dumps({
            "student_layers": layers, "intermediate_size": width,
            "teacher_parameters": sum(p.numel() for p in teacher.parameters()),
            "student_parameters": sum(p.numel() for p in student.parameters()),
            "steps": len(curve), "loss_curve": curve,
        }))
