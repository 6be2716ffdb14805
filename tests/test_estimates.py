"""Each fact in one place: estimates read options through each method's own options model, the sources'
cache keys come from sources.py alone, and one function decides what a model string names.

No model is built here: the tiny model's config gives the shape, and a test-defined method shows that the
planner and the size estimator need nothing but the method class.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from workbench.data.calibration import CalibrationSpec
from workbench.methods.base import Method, MethodOptions, SizeEstimate, SizeInput
from workbench.methods.registry import get_method, method_names, register_method
from workbench.planning.modelshape import shape_from_config
from workbench.planning.planner import estimate_build_s, plan_preset
from workbench.planning.weightsize import estimate_weights

SHAPE = shape_from_config({"model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
                           "num_key_value_heads": 3, "intermediate_size": 1536, "vocab_size": 49152,
                           "tie_word_embeddings": True, "torch_dtype": "float32"})
PROFILE = {"import_s": 3.0, "matmul": {"flops_s": 5e10}}
REQUIRED = {"gguf-auto": {"target_mb": 80}, "bnb-auto": {"target_mb": 80}}  # options a method has no default for


def _build_s(method: str, options: dict[str, Any]) -> float:
    return estimate_build_s([{"method": method, "options": options}], SHAPE, PROFILE)


def test_kmeans_build_estimate_follows_k() -> None:
    """k is KMeansOptions' knob; an estimate that read other names (iterations, bits) would not move."""
    times = [_build_s("kmeans", {"k": k}) for k in (4, 16, 64, 256)]
    assert times == sorted(times) and len(set(times)) == 4
    assert _build_s("kmeans", {}) == _build_s("kmeans", {"k": get_method("kmeans").Options().k})


CALIBRATED = [(name, field) for name in method_names() for field, info in get_method(name).Options.model_fields.items()
              if info.annotation in (CalibrationSpec, CalibrationSpec | None)]


@pytest.mark.parametrize("method,field", CALIBRATED, ids=[f"{m}.{f}" for m, f in CALIBRATED])
def test_calibration_tokens_default_as_the_options_model_says(method: str, field: str) -> None:
    """A calibration given in part takes the rest from CalibrationSpec: the estimate with seq_len left out equals
    the one with CalibrationSpec's seq_len written out, and a longer seq_len costs more."""
    base = REQUIRED.get(method, {})
    default_len = CalibrationSpec().seq_len
    partial = _build_s(method, {**base, field: {"samples": 8}})
    assert partial == _build_s(method, {**base, field: {"samples": 8, "seq_len": default_len}})
    assert partial < _build_s(method, {**base, field: {"samples": 8, "seq_len": 4 * default_len}})
    model_default = get_method(method).Options.model_validate(base).model_dump()[field]
    if model_default is not None:  # the calibration the method uses when the preset gives none
        assert _build_s(method, base) == _build_s(method, {**base, field: model_default})


@pytest.mark.parametrize("method", method_names())
def test_estimates_equal_with_defaults_left_out_or_written_out(method: str) -> None:
    """Every default the estimates use is the options model's own: writing them all out changes nothing."""
    minimal = REQUIRED.get(method, {})
    written = get_method(method).Options.model_validate(minimal).model_dump()
    short = estimate_weights(SHAPE, [{"method": method, "options": minimal}])
    full = estimate_weights(SHAPE, [{"method": method, "options": written}])
    assert (short.weight_bytes, short.format, short.family, short.runtime) == \
        (full.weight_bytes, full.format, full.family, full.runtime)
    assert _build_s(method, minimal) == _build_s(method, written)


class HalfOptions(MethodOptions):
    keep: float = 0.5


class Half(Method):
    """A method defined here: the planner and the size estimator know it only through this class."""

    name = "test-half"
    summary = "keeps a fraction of the bytes (a test double)"
    Options = HalfOptions

    def estimate_size(self, options: MethodOptions, size: SizeInput) -> SizeEstimate:
        assert isinstance(options, HalfOptions)
        return SizeEstimate(int(size.dense_bytes() * options.keep), f"half {options.keep}", size.rest)


@pytest.fixture
def half_registered() -> Any:
    from workbench.methods import registry

    register_method(Half)  # the one line a new method needs
    yield
    registry._REGISTRY.pop("test-half")  # later tests list the project's methods only
    get_method.cache_clear()


def test_a_method_defined_in_a_test_plans_with_its_own_estimate(tiny_model_dir: Path, half_registered: Any) -> None:
    from workbench.planning.modelshape import shape_from_folder
    from workbench.config.presets import parse_preset

    preset = parse_preset({"name": "t", "model": str(tiny_model_dir), "baseline": "fp32",
                           "variants": [{"name": "fp32", "method": "fp32"},
                                        {"name": "quarter", "method": "test-half", "options": {"keep": 0.25}}]})
    shape = shape_from_folder(tiny_model_dir)
    plans = {p.name: p for p in plan_preset(preset, shape, None)}
    assert plans["quarter"].weight_bytes == int(shape.params() * 4 * 0.25)
    assert plans["quarter"].format == "half 0.25" and plans["fp32"].weight_bytes == shape.params() * 4


# ---- model strings and source cache keys ------------------------------------------------------------------


def test_one_function_classifies_model_strings(tmp_path: Path, tiny_model_dir: Path) -> None:
    from workbench.data.sources import BUNDLED, classify_model

    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    (tmp_path / "notes.txt").write_text("x")
    expected = {BUNDLED: ("bundled", False), "bundled:other": ("unknown-bundled", False),
                str(tmp_path / "m.gguf"): ("gguf", True), str(tiny_model_dir): ("folder", True),
                str(tmp_path / "notes.txt"): ("other-file", True), str(tmp_path / "absent"): ("missing-path", True),
                "absent.gguf": ("missing-path", True), "HuggingFaceTB/SmolLM2-135M": ("hub", False),
                "not a model": ("invalid", False)}
    for spec, (kind, local) in expected.items():
        ref = classify_model(spec)
        assert (ref.kind, ref.is_local) == (kind, local), spec


def test_planner_fingerprint_of_a_folder_is_the_one_the_source_gets(tiny_model_dir: Path) -> None:
    from workbench.planning.planner import _source_state
    from workbench.data.sources import resolve_source

    assert _source_state(str(tiny_model_dir)) == (resolve_source(str(tiny_model_dir)).fingerprint, None)


def test_planner_sees_a_converted_gguf_source_as_prepared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The conversion's cache key is computed in sources.py only: once resolve_source has converted a GGUF
    source, the plan finds the folder (the conversion itself is replaced by a stub writing one file)."""
    import workbench.data.gguf_info
    import workbench.data.sources as sources
    from workbench.planning.planner import _source_state

    gguf = tmp_path / "stub.gguf"
    gguf.write_bytes(b"GGUF not a real model " + tmp_path.name.encode())  # a fingerprint no other test shares
    monkeypatch.setattr(workbench.data.gguf_info, "check_gguf_readable", lambda _path: None)
    monkeypatch.setattr(sources, "_convert_gguf", lambda _gguf, out, _emit=None: (out / "config.json").write_text("{}"))
    fingerprint, note = _source_state(str(gguf))
    assert note is not None and "converted" in note  # not converted yet
    source = sources.resolve_source(str(gguf))
    assert _source_state(str(gguf)) == (source.fingerprint, None) == (fingerprint, None)
