"""Reference self-check: independent perplexity paths agree on the tiny model, and a wrong figure fails."""

from __future__ import annotations

import pytest

from workbench.metrics.windows import plan_windows
from workbench.selfcheck import (compare, gguf_checks, gpt2_large_check, guide_windows, perplexity_check,
                                 workbench_perplexity)


def _tiny_ids(model_dir, n: int = 384) -> list[int]:
    from transformers import AutoTokenizer

    from workbench.data.evaltext import pydoc_eval_text

    return AutoTokenizer.from_pretrained(model_dir)(pydoc_eval_text()[:20000], add_special_tokens=False)["input_ids"][:n]


@pytest.mark.parametrize("n,context,stride", [(384, 128, 128), (384, 128, 64), (300, 128, 48), (129, 128, 128)])
def test_guide_windows_score_the_same_tokens_as_the_workbench_plan(n, context, stride) -> None:
    guide = {t for begin, end, keep in guide_windows(n, context, stride) for t in range(max(keep, begin + 1), end)}
    plan = {t for w in plan_windows(n, context, stride) for t in range(w.first_target, w.end)}
    # Every token once, except each window's first when windows do not overlap (nothing before it in the window).
    unscored = set(range(0, n, stride)) if stride == context else {0}
    assert guide == plan == set(range(n)) - unscored


def test_perplexity_check_passes_on_the_tiny_model(tiny_model_dir) -> None:
    check = perplexity_check(tiny_model_dir, _tiny_ids(tiny_model_dir), context=128, stride=64, threads=1)
    assert check.status == "pass", check.line()
    assert check.reference == pytest.approx(check.value, rel=1e-4)
    assert "relative 0.0001" in check.line() and "stride 64" in check.line()


def test_a_deliberately_wrong_figure_fails(tiny_model_dir) -> None:
    ids = _tiny_ids(tiny_model_dir)
    # The workbench figure computed with a different window convention (no overlap) is not the reference's.
    wrong = perplexity_check(tiny_model_dir, ids, context=128, stride=64, threads=1,
                             candidate=lambda: workbench_perplexity("torch", tiny_model_dir, ids, 128, 128, 1))
    assert wrong.status == "FAIL", wrong.line()
    off_by_a_hair = compare("x", 10.0, 10.0 * (1 + 2e-4), 1e-4, "")
    assert off_by_a_hair.status == "FAIL" and compare("x", 10.0, 10.0 * (1 + 5e-5), 1e-4, "").status == "pass"
    assert compare("x", 10.0, float("nan"), 1e-4, "").status == "FAIL"


def test_gguf_check_agrees_with_llama_cpp_python_on_a_tiny_file(tmp_path, tiny_smol_dir) -> None:
    from workbench.data.gguf_info import GGUF_NAME
    from workbench.methods.base import BuildContext
    from workbench.methods.gguf import GGUF, GGUFOptions

    GGUF().build(tiny_smol_dir, tmp_path, GGUFOptions(quant="Q8_0"),
                 BuildContext(device="cpu", threads=1, trust_remote_code=False, emit=lambda _m: None))
    ids = _tiny_ids(tiny_smol_dir, 300)
    checks = gguf_checks(tmp_path / GGUF_NAME, tiny_smol_dir, ids, context=128, stride=64, threads=1)
    assert checks[0].status == "pass", checks[0].line()
    assert checks[1].status == "info" and checks[1].value > 1 and "second half scored" in checks[1].detail


def test_published_gpt2_large_check_is_skipped_offline_with_a_reason() -> None:
    check = gpt2_large_check(full=False, emit=lambda _m: None, threads=1)  # conftest sets HF_HUB_OFFLINE=1
    assert check.status == "skipped" and "no hub is reachable" in check.detail
    assert check.reference == 16.44
