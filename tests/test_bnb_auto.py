"""bnb-auto: bitsandbytes with the most sensitive blocks kept float within target_mb, on the tiny random Llama.

The shared assignment (workbench.analysis.mixed_precision) is checked against brute force in tests/test_gguf_mixed.py
(`test_keep_in_float_choice_meets_the_budget_and_matches_brute_force` covers bnb-auto's two-option tables).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.requirements import require
from workbench.methods.base import BuildContext

CTX = BuildContext(device="cpu", threads=1, trust_remote_code=False, emit=lambda _m: None)
SENSITIVITY = {"samples": 2, "seq_len": 64, "text": "pydoc", "seed": 1}


def _weight_bytes(folder: Path) -> int:
    """The weights figure of an artifact as the workbench measures it (loaded state dict, each storage once)."""
    from workbench.runtimes.torch import TorchVariant

    variant = TorchVariant.load("v", folder, "cpu", 1)
    try:
        return variant.footprint().weight_bytes
    finally:
        variant.close()


@pytest.fixture(scope="module")
def sizes(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    """Independent ends of the range: plain bnb-nf4 / bnb-int8 builds (every block quantized) and fp32."""
    require("bitsandbytes")
    from workbench.methods.registry import get_method

    found = {"float": _weight_bytes(tiny_model_dir)}
    for method in ("bnb-nf4", "bnb-int8"):
        out = tmp_path_factory.mktemp(method)
        built = get_method(method)()
        built.build(tiny_model_dir, out, built.Options(), CTX)
        found[method.removeprefix("bnb-")] = _weight_bytes(out)
    return found


def _build(source: Path, out: Path, **options) -> dict:
    from workbench.methods.bnb_auto import BnbAuto, BnbAutoOptions

    out.mkdir()
    BnbAuto().build(source, out, BnbAutoOptions(sensitivity=SENSITIVITY, **options), CTX)
    return json.loads((out / "stage_report.json").read_text())["bnb"]["auto"]


def _linears_by_block(folder: Path) -> dict[str, list[type]]:
    """{'model.layers.N' or the module name: [module types of its Linears]}, read with plain torch."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, device_map={"": "cpu"})
    found: dict[str, list[type]] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):  # bitsandbytes' Linear4bit / Linear8bitLt subclass it
            unit = ".".join(name.split(".")[:3]) if name.startswith("model.layers.") else name
            found.setdefault(unit, []).append(type(module))
    return found


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_bnb_auto_keeps_exactly_the_chosen_blocks_in_float_within_the_budget(quant, sizes, tiny_model_dir,
                                                                             tmp_path) -> None:
    import torch

    floor, ceiling = sizes[quant], sizes["float"]
    # Room for one of the two blocks in float, not for both.
    target = floor + 0.6 * (ceiling - floor)
    auto = _build(tiny_model_dir, tmp_path / "auto", target_mb=target / 1e6, quant=quant)
    # The ends of the range are those of the plain builds, measured independently.
    assert auto["smallest_bytes"] == floor and auto["float_bytes"] == ceiling
    table = auto["sensitivity"]["table"]
    assert sorted(table) == ["model.layers.0", "model.layers.1"]
    klds = {unit: next(o["kld"] for o in options if o["type"] == quant) for unit, options in table.items()}
    assert all(k > 0 for k in klds.values())  # quantizing a block moves the output distribution
    assert auto["kept_float"] == [max(klds, key=klds.get)]  # the more sensitive block is the one kept
    assert auto["choice"] == {u: ("float" if u in auto["kept_float"] else quant) for u in table}
    assert auto["sensitivity"]["disjoint_from_eval"] and auto["sensitivity"]["tokens"] == 2 * 64

    linears = _linears_by_block(tmp_path / "auto")
    kept = auto["kept_float"][0]
    other = next(u for u in table if u != kept)
    assert linears[kept] and all(t is torch.nn.Linear for t in linears[kept])
    assert linears[other] and all(t is not torch.nn.Linear for t in linears[other])
    assert {t.__name__ for t in linears[other]} == {"Linear8bitLt" if quant == "int8" else "Linear4bit"}
    assert linears["lm_head"] == [torch.nn.Linear]  # transformers' default skip is kept

    measured = _weight_bytes(tmp_path / "auto")
    assert measured == auto["weight_bytes"] and floor < measured <= target


def test_budget_below_the_all_quantized_size_is_refused_with_the_smallest_size(sizes, tiny_model_dir, tmp_path) -> None:
    from workbench.analysis.mixed_precision import BudgetError

    floor = sizes["nf4"]
    with pytest.raises(BudgetError, match=rf"^a budget of {floor * 0.995 / 1e6:.2f} MB is below the smallest model "
                                          rf"bnb-auto can make from this input \({floor / 1e6:.2f} MB with every unit "
                                          r"at its cheapest type: nf4\); raise target_mb"):
        _build(tiny_model_dir, tmp_path / "low", target_mb=floor * 0.995 / 1e6)
    assert not (tmp_path / "low" / "config.json").exists()


def test_budget_holding_every_block_in_float_says_nothing_needs_quantizing(sizes, tiny_model_dir, tmp_path) -> None:
    import torch

    auto = _build(tiny_model_dir, tmp_path / "big", target_mb=10 * sizes["float"] / 1e6)
    assert "nothing needs quantizing" in auto["note"]
    assert set(auto["choice"].values()) == {"float"}
    assert all(t is torch.nn.Linear for types in _linears_by_block(tmp_path / "big").values() for t in types)
    assert _weight_bytes(tmp_path / "big") == sizes["float"]


def test_too_small_budget_is_a_bad_argument_before_anything_runs(write_preset, capsys, tmp_path) -> None:
    from workbench.cli import main

    preset = write_preset([{"name": "fp32", "method": "fp32"},
                           {"name": "auto", "method": "bnb-auto", "options": {"target_mb": 0.01}}])
    assert main(["run", str(preset), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: variant 'auto' (bnb-auto): target_mb 0.01 is below the "
                                               "smallest model bnb-auto can make from ")
    assert "with every block nf4); raise target_mb" in err[0]
    assert not (tmp_path / "out" / "results.json").exists()


def test_options_are_typed_and_refuse_options_of_the_other_type() -> None:
    from workbench.errors import PresetError
    from workbench.config.presets import parse_preset

    base = {"name": "t", "model": "bundled:smollm2-135m-instruct", "baseline": "fp32"}
    cases = [({"quant": "nf4"}, "target_mb"), ({"target_mb": 50, "quant": "int4"}, "quant"),
             ({"target_mb": 50, "quant": "int8", "double_quant": False}, "double_quant apply to nf4/fp4, not quant: int8"),
             ({"target_mb": 50, "threshold": 4.0}, "threshold applies to quant: int8, not nf4"),
             ({"target_mb": 50, "sensitivity": {"samples": 2, "text": "pydoc", "bogus": 1}}, "bogus")]
    for options, message in cases:
        with pytest.raises(PresetError, match=message):
            parse_preset({**base, "variants": [{"name": "fp32", "method": "fp32"},
                                               {"name": "a", "method": "bnb-auto", "options": options}]})


def test_plan_estimates_bnb_auto_within_its_bounds(tiny_model_dir) -> None:
    from workbench.planning.modelshape import shape_from_folder
    from workbench.planning.weightsize import estimate_weights

    shape = shape_from_folder(tiny_model_dir)
    nf4 = estimate_weights(shape, [{"method": "bnb-nf4"}]).weight_bytes
    dense = estimate_weights(shape, [{"method": "fp32"}]).weight_bytes

    def auto(target_mb: float, **options):
        return estimate_weights(shape, [{"method": "bnb-auto", "options": {"target_mb": target_mb, **options}}])

    middle = auto((nf4 + dense) / 2e6)
    assert middle.weight_bytes == int((nf4 + dense) / 2) and middle.family == "bnb-4bit" and middle.runtime == "torch"
    low = auto(nf4 / 2e6)
    assert low.weight_bytes == nf4 and any("the build will refuse it" in n for n in low.notes)
    high = auto(dense * 2 / 1e6)
    assert high.weight_bytes == dense and any("nothing will be quantized" in n for n in high.notes)
    int8 = auto(0.001, quant="int8")
    assert int8.weight_bytes == estimate_weights(shape, [{"method": "bnb-int8"}]).weight_bytes and int8.family == "bnb-int8"
