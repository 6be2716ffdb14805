"""Preset schema: every shipped preset round-trips, and each kind of bad input gets a specific message."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from workbench.cli import main
from workbench.errors import PresetError
from workbench.config.presets import dump_preset, load_preset, parse_preset, select_variants

PRESETS = sorted((Path(__file__).parent.parent / "presets").glob("*.yaml"))


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_every_preset_round_trips(path: Path) -> None:
    preset = load_preset(path)
    again = parse_preset(yaml.safe_load(dump_preset(preset)))
    assert again == preset


def test_a_null_that_differs_from_its_default_survives_the_round_trip() -> None:
    """target_ci: null (exactly `repeats` timed runs) is a choice against the default 0.05, so it must be written."""
    preset = parse_preset(_preset(latency={"target_ci": None}))
    dumped = yaml.safe_load(dump_preset(preset))
    assert dumped["latency"]["target_ci"] is None and "lm_eval" not in dumped  # default nulls stay out
    assert parse_preset(dumped).latency.target_ci is None


def _preset(**changes) -> dict:
    data = {"name": "t", "model": "bundled:smollm2-135m-instruct", "baseline": "fp32",
            "variants": [{"name": "fp32", "method": "fp32"}, {"name": "nf4", "method": "bnb-nf4"}]}
    data.update(changes)
    return data


BAD_PRESETS = [
    ("unknown method", _preset(variants=[{"name": "fp32", "method": "fp32"}, {"name": "x", "method": "bnb-nf5"}]),
     "unknown method 'bnb-nf5'; did you mean 'bnb-nf4'?"),
    ("unknown option", _preset(variants=[{"name": "fp32", "method": "fp32"},
                                         {"name": "x", "method": "bnb-nf4", "options": {"double_qaunt": True}}]),
     "unknown option 'double_qaunt'; did you mean 'double_quant'?"),
    ("wrong option type", _preset(variants=[{"name": "fp32", "method": "fp32"},
                                            {"name": "x", "method": "bnb-int8", "options": {"threshold": "high"}}]),
     "threshold: Input should be a valid number"),
    ("duplicate names", _preset(variants=[{"name": "fp32", "method": "fp32"}, {"name": "fp32", "method": "bf16"}]),
     "duplicate variant names: fp32"),
    ("baseline missing", _preset(baseline="fp16"), "baseline 'fp16' is not among the variants (fp32, nf4)"),
    ("threads zero", _preset(threads=0), "threads: Input should be greater than 0"),
    ("threads negative", _preset(threads=-2), "threads: Input should be greater than 0"),
    ("unknown top-level key", _preset(variantz=[]), "unknown option 'variantz'; did you mean 'variants'?"),
    ("stride above context", _preset(eval={"context": 128, "stride": 256}), "must not exceed eval.context"),
    ("method and pipeline", _preset(variants=[{"name": "fp32", "method": "fp32", "pipeline": [{"method": "bf16"}]}]),
     "needs exactly one of 'method' or 'pipeline'"),
]


@pytest.mark.parametrize("data,message", [(d, m) for _, d, m in BAD_PRESETS], ids=[c for c, _, _ in BAD_PRESETS])
def test_bad_preset_is_named_precisely(data: dict, message: str) -> None:
    with pytest.raises(PresetError) as error:
        parse_preset(data)
    assert message in str(error.value)


def test_cli_exits_2_with_the_message_for_a_bad_preset(tmp_path: Path, capsys) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(BAD_PRESETS[0][1]))
    assert main(["run", str(path)]) == 2
    assert "did you mean 'bnb-nf4'?" in capsys.readouterr().err


def test_cli_exits_2_for_a_missing_preset_file(tmp_path: Path, capsys) -> None:
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_only_keeps_the_baseline_and_names_unknown_variants() -> None:
    preset = parse_preset(_preset())
    assert [v.name for v in select_variants(preset, ["nf4"]).variants] == ["fp32", "nf4"]
    with pytest.raises(PresetError, match="unknown variants: nf5"):
        select_variants(preset, ["nf5"])


def test_list_methods_prints_names_options_defaults_and_help(capsys) -> None:
    assert main(["list-methods"]) == 0
    out = capsys.readouterr().out
    for name in ("fp32", "fp16", "bf16", "bnb-int8", "bnb-nf4", "bnb-fp4"):
        assert f"\n{name}  [" in f"\n{out}"
    assert "double_quant (default: True): Quantize the quantization constants too" in out
    assert "threshold (default: 6.0)" in out
