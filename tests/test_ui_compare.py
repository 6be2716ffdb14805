"""The Compare tab (issue #15): empty state, form and editor in step, rounded table with "—", "fits in N GB"
greying, YAML errors with line and column, and Plan refusing exactly what Run refuses.

Plain functions are tested directly; the page is driven in Debian's chromium by Playwright (its own browser download
cannot work here), against an app started on the tiny model of tests/conftest.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.app_server import app_server, chromium, watched_page

from workbench.running.runner import METRIC_NAMES

ROOT = Path(__file__).parent.parent


def record(name: str, status: str = "ok", **metrics: Any) -> dict[str, Any]:
    """A variant record as runner.py writes it: every metric present, null unless given."""
    return {"name": name, "method": "fp32" if name == "fp32" else "bf16", "status": status, "honesty": "real-kernel",
            "error": None if status == "ok" else "it broke", "flags": [], "layers": [], "samples": [],
            "metrics": {**{m: None for m in METRIC_NAMES}, **metrics}}


def fake_run() -> dict[str, Any]:
    """Two measured variants (sizes and perplexity only) and a failed one."""
    return {"run_id": "r1", "status": "failed", "model": {"source": "tiny"}, "preset": {"baseline": "fp32"},
            "variants": [record("fp32", disk_bytes=541_615_500, weight_bytes=538_000_000, peak_rss_bytes=1_164_087_300,
                                perplexity=12.3456789),
                         record("bf16", disk_bytes=270_800_000, weight_bytes=269_000_000, peak_rss_bytes=700_000_000,
                                perplexity=12.35),
                         record("broken", status="failed")]}


# ---- the table's cells ----------------------------------------------------------------------------------


def test_cells_are_rounded_to_four_significant_digits_and_null_is_a_dash() -> None:
    from workbench.ui.common import DASH, format_cell

    assert [format_cell(v) for v in (541.6155, 1164.0873, 0.000123456, 12345.6, 0.0, 3, True)] == [
        "541.6", "1164", "0.0001235", "12350", "0", "3", "yes"]
    assert [format_cell(v) for v in (None, float("nan"), "", "  ")] == [DASH] * 4
    assert format_cell("ok") == "ok"


def test_display_table_has_units_in_headers_no_blanks_and_a_fits_column() -> None:
    from workbench.ui.common import DASH, display_table

    table = display_table(fake_run(), budget_gb=1.0)
    row = dict(zip(table.columns, table.iloc[0]))
    assert row["disk MB"] == "541.6" and row["peak RSS MB"] == "1164" and row["perplexity"] == "12.35"
    assert row["TTFT ms"] == DASH and row["decode tok/s"] == DASH  # not measured: a dash, never a blank
    assert {"weights MB", "load s", "TTFT ms", "decode tok/s"} <= set(table.columns)
    assert list(table["fits 1 GB"]) == ["NO", "yes", DASH]  # the failed variant has no peak: neither yes nor no
    assert not (table == "").any().any() and not table.isna().any().any()


def test_rows_and_chart_points_over_the_budget_are_greyed() -> None:
    from workbench.views.plots import OVER_BUDGET_OPACITY
    from workbench.ui.common import GREYED_CSS, charts, over_budget, styled_table

    run = fake_run()
    assert over_budget(run, 1.0) == {"fp32"} and over_budget(run, None) == set()
    html = styled_table(run, 1.0).to_html()
    assert html.count(GREYED_CSS.split(";")[0]) >= 1  # fp32's row carries the grey style
    styles = styled_table(run, 1.0)._compute().ctx  # (row, column) -> css of each styled cell
    assert {row for (row, _col), css in styles.items() if css} == {0}

    built = charts(run, 1.0)
    scatter = built["size_vs_perplexity"].data[0]
    assert list(scatter.marker.opacity) == [OVER_BUDGET_OPACITY, 1.0]
    memory_bars = built["memory"].data[0]
    assert list(memory_bars.x) == ["fp32", "bf16"] and list(memory_bars.marker.opacity) == [OVER_BUDGET_OPACITY, 1.0]


def test_only_charts_with_data_are_built() -> None:
    from workbench.ui.common import charts

    assert charts(None) == {}
    assert set(charts(fake_run())) == {"size_vs_perplexity", "memory"}  # no latency, KLD, layers in this run
    nothing_ok = {**fake_run(), "variants": [record("broken", status="failed")]}
    assert charts(nothing_ok) == {}


# ---- form and editor --------------------------------------------------------------------------------------


def _form_parts() -> tuple[list[str], list[tuple[str, str, Any]]]:
    from workbench.methods.registry import get_method
    from workbench.ui.compare import _importable_methods

    usable, _broken = _importable_methods()
    return usable, [(n, f, info) for n in usable for f, info in get_method(n).Options.model_fields.items()]


def test_the_form_follows_a_preset_and_the_preset_follows_the_form() -> None:
    from workbench.config.presets import parse_preset
    from workbench.ui.compare import form_from_preset, preset_with_form

    usable, fields = _form_parts()
    text = (ROOT / "presets" / "full.yaml").read_text()
    form = form_from_preset(text, usable, fields)
    methods = {v["method"] for v in yaml.safe_load(text)["variants"]}
    assert set(form["methods"]) == methods
    nf4_double = fields.index(next(f for f in fields if f[0] == "bnb-nf4" and f[1] == "double_quant"))
    assert form["values"][nf4_double] is True  # the first nf4 variant's option as written

    # Unchanged form: the same preset (formatting aside). Ticking adds a variant, unticking removes every variant
    # that uses the method; the protocol and the other variants stay.
    same = preset_with_form(text, form["model"], form["methods"], form["threads"], usable, fields, form["values"])
    assert parse_preset(yaml.safe_load(same)).model_dump() == parse_preset(yaml.safe_load(text)).model_dump()
    ticked = preset_with_form(text, form["model"], form["methods"] + ["magnitude"], 1, usable, fields, form["values"])
    data = yaml.safe_load(ticked)
    assert data["variants"][-1] == {"name": "magnitude", "method": "magnitude"} and data["threads"] == 1
    assert data["latency"] == yaml.safe_load(text)["latency"]
    unticked = yaml.safe_load(preset_with_form(text, form["model"], [m for m in form["methods"] if m not in ("gguf", "fp32")],
                                               2, usable, fields, form["values"]))
    assert [v["name"] for v in unticked["variants"]] == ["bf16", "int8", "nf4", "fp4", "q4_1-shipped"]
    assert unticked["baseline"] == "bf16"  # fp32 went, so the first variant is the baseline
    assert form_from_preset(ticked, usable, fields)["methods"] == sorted(methods | {"magnitude"}, key=usable.index)

    values = list(form["values"])
    values[nf4_double] = False  # an option changed in the form lands in the first nf4 variant, written options stay
    changed = yaml.safe_load(preset_with_form(text, form["model"], form["methods"], 2, usable, fields, values))
    assert next(v for v in changed["variants"] if v["name"] == "nf4")["options"] == {"double_quant": False,
                                                                                   "compute_dtype": "float32"}
    assert form_from_preset("name: [unclosed", usable, fields) is None  # unfinished YAML leaves the form alone


def test_yaml_errors_say_line_and_column_and_validation_errors_name_the_field() -> None:
    from workbench.ui.compare import check_markdown

    message = check_markdown("name: x\nvariants:\n  - {name: a, method: [b}\n")
    assert "line 3, column 25" in message and "while parsing a flow sequence at line 3, column 23" in message
    message = check_markdown("name: [unclosed")
    # the whole message, with '<stream end>' escaped so Markdown shows it instead of dropping it as a tag
    assert message.endswith("YAML error at line 1, column 16: expected ',' or ']', but got '&lt;stream end&gt;' "
                            "(while parsing a flow sequence at line 1, column 7)")
    bad_threads = "name: x\nmodel: m\nthreads: many\nbaseline: a\nvariants: [{name: a, method: fp32}]\n"
    assert "threads: Input should be a valid integer" in check_markdown(bad_threads)


# ---- Plan refuses exactly what Run refuses ----------------------------------------------------------------


def _preset_text(model: str, variants: int = 2, **extra: Any) -> str:
    names = ["fp32"] + [f"bf16-{i}" for i in range(variants - 1)]
    return yaml.safe_dump({"name": "t", "model": model, "device": "cpu", "threads": 1, "baseline": "fp32",
                           "eval": {"text": "pydoc", "max_tokens": 256, "context": 128, "stride": 128},
                           "variants": [{"name": n, "method": "fp32" if n == "fp32" else "bf16"} for n in names], **extra},
                          sort_keys=False)


def _run_answer(text: str) -> str:
    from workbench.ui.compare import run_preset

    return next(run_preset(text, None, {}))[0]  # a refused preset: the first update is the refusal, nothing ran


@pytest.mark.parametrize("shared", [False, True])
def test_plan_refuses_exactly_what_run_refuses(shared: bool, monkeypatch, tiny_model_dir) -> None:
    from workbench.ui.compare import plan_preset

    monkeypatch.setenv("WORKBENCH_ALLOWED_DIRS", str(tiny_model_dir.parent))
    if shared:
        monkeypatch.setenv("WORKBENCH_SHARED", "1")
    model = "bundled:smollm2-135m-instruct" if shared else str(tiny_model_dir)
    refused = [_preset_text(model, variants=20),  # the issue's case: above the variants cap (16 here, 6 shared)
               _preset_text("/etc"), "name: [unclosed", "name: x\n"]
    if shared:  # caps and refusals of shared mode only
        refused += [_preset_text(model, threads=999), _preset_text(model, trust_remote_code=True)]
    for text in refused:
        plan_text, rows = plan_preset(text, None)
        reason = plan_text.removeprefix("**Cannot plan:** ")
        assert rows is None and reason != plan_text
        assert _run_answer(text) == f"**Cannot run:** {reason}"
    if not shared:  # and what Plan accepts, Run's gate accepts: the largest preset the cap allows plans
        from workbench.ui.compare import gated_preset

        allowed = _preset_text(model, variants=16)
        assert plan_preset(allowed, None)[1] is not None
        gated_preset(allowed)


# ---- the page in chromium ---------------------------------------------------------------------------------


def tiny_yaml(model_dir: Path) -> str:
    return _preset_text(str(model_dir))


@pytest.fixture(scope="module")
def app_url(tiny_model_dir, workbench_home):
    with app_server(workbench_home, "app-compare-test", WORKBENCH_ALLOWED_DIRS=str(tiny_model_dir.parent)) as server:
        yield server.url


@pytest.fixture()
def page(app_url):
    errors: list[str] = []
    with chromium() as browser:
        tab = watched_page(browser, errors, 1200, 1600)
        tab.goto(app_url)
        tab.get_by_role("button", name="Run", exact=True).wait_for()
        yield tab
    assert errors == []


def _editor(page) -> str:
    return page.evaluate("document.querySelector('.cm-content').innerText")


def _set_editor(page, text: str) -> None:
    page.locator(".cm-content").click()
    page.keyboard.press("Control+A")
    page.keyboard.insert_text(text)


def _ticked(page) -> set[str]:
    group = page.locator("fieldset, .block").filter(has_text="Methods").filter(has=page.locator("input[type=checkbox]"))
    return set(group.first.locator("input[type=checkbox]:checked").evaluate_all(
        "els => els.map(e => e.closest('label').innerText.trim())"))


def test_page_opens_without_empty_chart_boxes_or_tables(page) -> None:
    from workbench.views.plots import CHART_LABELS

    assert page.locator(".js-plotly-plot:visible").count() == 0
    assert page.locator("table:visible").count() == 0  # no "1 2 3" placeholder tables
    for label in CHART_LABELS + ["Progress", "Plan chart"]:
        assert page.get_by_text(label, exact=True).filter(visible=True).count() == 0, label
    # the form agrees with the preset the editor opens with
    methods = {v["method"] for v in yaml.safe_load((ROOT / "presets" / "quickstart.yaml").read_text())["variants"]}
    assert _ticked(page) == methods


def test_picking_a_preset_sets_the_form_and_ticking_a_box_rewrites_the_yaml(page) -> None:
    page.get_by_label("Preset").click()
    page.get_by_role("option", name="full", exact=True).click()
    page.wait_for_function("document.querySelector('.cm-content').innerText.includes('name: full')")
    full = {v["method"] for v in yaml.safe_load((ROOT / "presets" / "full.yaml").read_text())["variants"]}
    page.wait_for_function(f"document.querySelectorAll('input[type=checkbox]:checked').length >= {len(full)}")
    assert _ticked(page) == full

    page.get_by_label("magnitude", exact=True).check()
    page.wait_for_function("document.querySelector('.cm-content').innerText.includes('method: magnitude')")
    page.get_by_label("gguf", exact=True).uncheck()
    page.wait_for_function("!document.querySelector('.cm-content').innerText.includes('q8_0')")
    data = yaml.safe_load(_editor(page))
    assert {v["method"] for v in data["variants"]} == (full - {"gguf"}) | {"magnitude"}
    assert data["name"] == "full"  # the rest of the preset is kept

    _set_editor(page, tiny_yaml(Path("/tmp/m")))  # typing in the editor sets the form too
    page.wait_for_function("document.querySelectorAll('input[type=checkbox]:checked').length == 2")
    assert _ticked(page) == {"fp32", "bf16"}
    assert page.get_by_label("Model").first.input_value() == "/tmp/m"


def test_fits_in_n_gb_greys_plan_rows_live(page, tiny_model_dir) -> None:
    _set_editor(page, tiny_yaml(tiny_model_dir))
    page.get_by_role("button", name="Plan this preset").click()
    page.get_by_text("Plan for").wait_for(timeout=300_000)  # the first plan calibrates this machine (seconds; minutes when busy)
    rows = page.locator("#plan-table .virtual-row")  # gradio draws the body rows as divs, one style per cell
    rows.first.wait_for()

    def greyed() -> list[bool]:
        return rows.evaluate_all("rs => rs.map(r => [...r.querySelectorAll('[role=gridcell]')].some(cell => "
                                 "(cell.getAttribute('style') || '').includes('background-color')))")

    assert greyed() == [False, False]
    budget = page.get_by_label("Fits in N GB (peak memory)")
    budget.fill("0.000001")  # 1 kB: every variant is over
    budget.press("Tab")
    page.wait_for_function("document.querySelectorAll('#plan-table .virtual-row [style*=\"background-color\"]').length > 0")
    assert greyed() == [True, True]
    fits = rows.evaluate_all("rs => rs.map(r => [...r.querySelectorAll('[role=gridcell]')].pop().innerText.trim())")
    assert fits == ["NO", "NO"]  # the last column says why the row is grey
    budget.fill("1000")  # live back: everything fits
    budget.press("Tab")
    page.wait_for_function("document.querySelectorAll('#plan-table .virtual-row [style*=\"background-color\"]').length == 0")
    assert greyed() == [False, False]
    # The plan chart, now that there is a plan: the budget change re-renders it, so wait for it to be drawn again.
    page.locator(".js-plotly-plot").first.wait_for(state="visible")
    assert page.locator(".js-plotly-plot:visible").count() == 1


def test_a_yaml_error_shows_line_and_column_in_full(page) -> None:
    _set_editor(page, "name: x\nvariants:\n  - {name: a, method: [b}\n")
    check = page.locator("#preset-check")
    check.get_by_text("line 3, column 25").wait_for()
    assert "while parsing a flow sequence at line 3, column 23)" in check.inner_text()
    _set_editor(page, "name: [unclosed")
    page.get_by_role("button", name="Plan this preset").click()
    answer = page.locator("#plan-box")
    answer.get_by_text("Cannot plan:").wait_for()
    assert answer.inner_text().strip().endswith("YAML error at line 1, column 16: expected ',' or ']', but got '<stream end>' "
                                        "(while parsing a flow sequence at line 1, column 7)")
