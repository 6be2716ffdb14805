"""A method defined only here, registered with one call, goes everywhere a built-in one goes: the plan, a real
run on the tiny model (its build in a worker process), the stored record and the Compare tab's option form.

Nothing outside this file names it: the planner, the runner, the worker, the history and the UI read the class.
The figures are checked against what the test knows it wrote (the zeros it put into one layer).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import Field, field_validator

from workbench.methods import registry
from workbench.methods.base import (BuildContext, Method, MethodOptions, SizeEstimate, SizeInput, check_sparsity,
                                    dense_with_zeros)

NAME = "test-zero-smallest"
LAYER = "model.layers.1.mlp.down_proj"


class ZeroSmallestOptions(MethodOptions):
    layer: str = Field(LAYER, description="The Linear whose weights lose their smallest magnitudes.")
    fraction: float = Field(0.25, description="Fraction of that layer's weights set to zero, in [0, 1).")

    @field_validator("fraction")
    @classmethod
    def _in_range(cls, value: float) -> float:
        return check_sparsity(value)


def zeroed_count(elements: int, fraction: float) -> int:
    """How many weights the method zeroes; the test computes its expectations with the same rule."""
    return int(round(elements * fraction))


class ZeroSmallest(Method):
    """Zero the smallest-|w| fraction of one named Linear layer and keep the zeros dense."""

    name = NAME
    summary = "zeros the smallest weights of one layer (a method defined in a test)"
    Options = ZeroSmallestOptions
    honesty = "dense-with-zeros"

    def build(self, input_dir: Path, out_dir: Path, options: MethodOptions, ctx: BuildContext) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        assert isinstance(options, ZeroSmallestOptions)
        model = AutoModelForCausalLM.from_pretrained(input_dir, torch_dtype=torch.float32)
        weight = model.get_submodule(options.layer).weight
        count = zeroed_count(weight.numel(), options.fraction)
        with torch.no_grad():
            smallest = weight.abs().flatten().argsort()[:count]
            weight.view(-1)[smallest] = 0.0
        ctx.emit(f"zeroed {count} of {weight.numel()} weights in {options.layer}")
        model.save_pretrained(out_dir)
        AutoTokenizer.from_pretrained(input_dir).save_pretrained(out_dir)

    def estimate_size(self, options: MethodOptions, size: SizeInput) -> SizeEstimate:
        return dense_with_zeros(self.name, size)


@pytest.fixture
def zero_smallest_registered(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # later tests see the project's methods only
    registry.register_method(ZeroSmallest)  # the one line a new method needs
    yield
    registry.get_method.cache_clear()


def _source_weights(model_dir: Path) -> dict[str, Any]:
    """The tiny model's Linear and Embedding weights, read independently of the workbench (safetensors)."""
    from safetensors.torch import load_file

    tensors = load_file(str(model_dir / "model.safetensors"))
    return {name[: -len(".weight")]: t for name, t in tensors.items() if name.endswith(".weight") and t.dim() == 2}


def test_a_method_defined_here_plans_runs_is_recorded_and_gets_a_form(
        zero_smallest_registered: Any, write_preset: Any, tiny_model_dir: Path, tmp_path: Path, capsys: Any) -> None:
    from safetensors.torch import load_file

    from workbench.cli import main
    from workbench.config.presets import load_preset
    from workbench.data.store import History
    from workbench.planning.planner import plan_preset_file

    fraction = 0.4
    preset = write_preset([{"name": "fp32", "method": "fp32"},
                           {"name": "zeroed", "method": NAME, "options": {"fraction": fraction}}], name="new-method")

    # plan: the class's own estimate (dense zeros: every weight's float32 bytes), before anything loads
    assert main(["plan", str(preset)]) == 0
    assert "zeroed" in capsys.readouterr().out
    plans = {p.name: p for p in plan_preset_file(load_preset(preset), emit=lambda _m: None)[0]}
    all_params = sum(t.numel() for t in load_file(str(tiny_model_dir / "model.safetensors")).values())
    assert plans["zeroed"].format == f"{NAME} (float32, dense zeros)"
    assert plans["zeroed"].weight_bytes == plans["fp32"].weight_bytes == 4 * all_params

    # a real run: the build happens in a worker process, which imports this module by name
    out = tmp_path / "out"
    assert main(["run", str(preset), "--out", str(out)]) == 0
    run = json.loads((out / "results.json").read_text())
    record = next(r for r in run["variants"] if r["name"] == "zeroed")
    assert record["status"] == "ok", record.get("error")
    assert record["method"] == NAME and record["honesty"] == "dense-with-zeros"

    # the sparsity against what was written: `count` zeros in one layer, out of every Linear and Embedding weight
    weights = _source_weights(tiny_model_dir)
    count = zeroed_count(weights[LAYER].numel(), fraction)
    total = sum(t.numel() for t in weights.values())
    assert count > 0 and record["metrics"]["sparsity"] == pytest.approx(count / total, abs=0)
    by_layer = {row["name"]: row["sparsity"] for row in record["layers"]}
    assert by_layer[LAYER] == count / weights[LAYER].numel()
    assert all(value == 0 for name, value in by_layer.items() if name != LAYER)
    baseline = next(r for r in run["variants"] if r["name"] == "fp32")
    assert baseline["metrics"]["sparsity"] == 0
    for key in ("perplexity", "kld_mean", "weight_bytes", "decode_tok_s"):
        assert record["metrics"][key] is not None, key
    assert record["metrics"]["weight_bytes"] == baseline["metrics"]["weight_bytes"]  # zeros kept dense

    # the zeros sit exactly where the smallest magnitudes were, read back from the artifact itself
    built = load_file(str(Path(record["artifact_path"]) / "model.safetensors"))[LAYER + ".weight"]
    source = weights[LAYER]
    expected = source.abs().flatten().argsort()[:count]
    assert (built.flatten() == 0).nonzero().flatten().sort().values.tolist() == expected.sort().values.tolist()

    # the stored record: the history holds the same figures and the options as the preset gave them
    history = History()
    try:
        stored = history.load_run(run["run_id"])
    finally:
        history.close()
    assert stored is not None
    stored_record = next(r for r in stored["variants"] if r["name"] == "zeroed")
    assert stored_record["options"] == {"fraction": fraction}
    assert stored_record["metrics"]["sparsity"] == record["metrics"]["sparsity"]


def test_the_compare_tab_form_offers_its_options_with_their_defaults(zero_smallest_registered: Any) -> None:
    import gradio as gr
    import yaml

    from workbench.ui.compare import build_compare, preset_from_form

    with gr.Blocks() as app:
        build_compare(gr.State({}), gr.State(None))
    fields = {block.label: block for block in app.blocks.values()
              if isinstance(getattr(block, "label", None), str) and block.label.startswith(f"{NAME} · ")}
    assert set(fields) == {f"{NAME} · layer", f"{NAME} · fraction"}
    assert isinstance(fields[f"{NAME} · fraction"], gr.Number) and fields[f"{NAME} · fraction"].value == 0.25
    # text fields hold YAML (the form parses them back the same way)
    assert isinstance(fields[f"{NAME} · layer"], gr.Textbox) and yaml.safe_load(fields[f"{NAME} · layer"].value) == LAYER
    methods = next(b for b in app.blocks.values() if isinstance(b, gr.CheckboxGroup) and b.label == "Methods")
    assert NAME in [choice[1] if isinstance(choice, tuple) else choice for choice in methods.choices]

    # the form's untouched values are the defaults: the preset it writes gives the variant no options
    form = [(NAME, name, ZeroSmallestOptions.model_fields[name]) for name in ("layer", "fraction")]
    written = yaml.safe_load(preset_from_form("", ["fp32", NAME], 2, form, [fields[f"{NAME} · {n}"].value
                                                                            for _, n, _ in form]))
    assert written["variants"][1] == {"name": NAME, "method": NAME}
