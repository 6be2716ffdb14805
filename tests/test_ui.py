"""The browser workbench: the HTTP API with gradio_client, and a real Chromium driven by Playwright."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.app_server import app_server, chromium, watched_page

from workbench.errors import WorkbenchError



def tiny_yaml(model_dir: Path, name: str = "ui-tiny") -> str:
    return f"""name: {name}
model: {model_dir}
device: cpu
threads: 1
eval: {{text: pydoc, max_tokens: 256, context: 128, stride: 128}}
latency: {{prompt_tokens: 8, new_tokens: 3, warmup: 0, repeats: 1, target_ci: null, max_seconds: 2, interleave: false}}
samples: {{prompts: [Hello], new_tokens: 3}}
baseline: fp32
variants:
  - {{name: fp32, method: fp32}}
  - {{name: bf16, method: bf16}}
"""


@pytest.fixture(scope="module")
def app_url(tiny_model_dir, workbench_home):
    with app_server(workbench_home, "app-test", WORKBENCH_ALLOWED_DIRS=str(tiny_model_dir.parent)) as server:
        yield server.url


def test_api_runs_a_preset_and_streams_chat(app_url, tiny_model_dir) -> None:
    from gradio_client import Client

    client = Client(app_url, verbose=False)
    job = client.submit(tiny_yaml(tiny_model_dir), None, api_name="/run_preset")
    updates = list(job)
    status, progress, results = job.outputs()[-1][:3]
    assert len(updates) >= 2 and "(ok)" in status
    assert [row[0] for row in results["data"]] == ["fp32", "bf16"]
    # The tiny model's weights are random: its baseline perplexity is worse than the text's unigram perplexity, so
    # the table shows that row as flagged (validity.py), never as plain ok, and the note says why.
    assert [row[2] for row in results["data"]] == ["flagged", "ok"]
    assert "**fp32** flagged: baseline perplexity" in status
    run_id = status.split("`")[1]

    chat = client.submit(run_id, ["fp32", "bf16"], "What is a list?", api_name="/chat")
    chunks = [out for out in chat]
    final = chat.outputs()[-1]
    assert len(chunks) >= 2  # streamed, not one final answer
    assert "<h4>fp32</h4>" in final[0] and "tokens" in final[0] and "<h4>bf16</h4>" in final[1]


def test_api_bad_input_is_an_inline_message(app_url, tmp_path) -> None:
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(app_url, verbose=False)
    assert "Cannot run" in client.predict("name: [unclosed", None, api_name="/run_preset")[0]
    outside = tiny_yaml(Path("/etc"), "outside")
    assert "outside the allowed folders" in client.predict(outside, None, api_name="/run_preset")[0]
    with pytest.raises(AppError, match="the prompt is empty"):
        client.predict("any-run", ["a", "b"], "  ", api_name="/chat")


def test_shared_mode_hides_other_visitors_runs_and_local_paths(monkeypatch) -> None:
    from workbench.data.store import History
    from workbench.ui.common import check_model_allowed, limits
    from workbench.ui.history import visible_runs

    monkeypatch.setenv("WORKBENCH_SHARED", "1")
    history = History()
    for run_id in ("visitor-a-run", "visitor-b-run"):  # two visitors' runs in the one shared history file
        history.start_run({"run_id": run_id, "created_at": "2026-11-24T00:00:00", "preset": {"name": run_id},
                           "model": {"source": "bundled:smollm2-135m-instruct"}}, Path("/nonexistent"))
    alice, bob = {"run_ids": ["visitor-a-run"]}, {"run_ids": ["visitor-b-run"]}
    assert list(visible_runs(alice)["run_id"]) == ["visitor-a-run"]
    assert list(visible_runs(bob)["run_id"]) == ["visitor-b-run"]
    assert len(visible_runs({})) == 0  # a new visitor sees nothing of anyone's
    with pytest.raises(WorkbenchError, match="local paths are disabled in shared mode"):
        check_model_allowed("/tmp/model", limits())
    check_model_allowed("bundled:smollm2-135m-instruct", limits())


def test_model_size_cap_is_checked_from_the_config(monkeypatch, tiny_model_dir) -> None:
    from workbench.config.presets import parse_preset
    from workbench.ui.common import limits
    from workbench.ui.compare import check_model_size

    preset = parse_preset({"name": "t", "model": str(tiny_model_dir), "baseline": "fp32",
                           "variants": [{"name": "fp32", "method": "fp32"}]})
    monkeypatch.setenv("WORKBENCH_MAX_PARAMS", "1000")  # the tiny Llama has ~140 k parameters
    with pytest.raises(WorkbenchError, match=r"has about [\d,]+ parameters; this app allows at most 1,000 \(WORKBENCH_MAX_PARAMS\)"):
        check_model_size(preset, limits())
    monkeypatch.setenv("WORKBENCH_MAX_PARAMS", "1e6")
    check_model_size(preset, limits())


def test_browser_compare_chat_history(app_url, tiny_model_dir, tmp_path) -> None:
    shots = Path(os.environ.get("WORKBENCH_SCREENSHOTS", tmp_path))
    errors: list[str] = []
    with chromium() as browser:
        page = watched_page(browser, errors, console=True)
        page.goto(app_url)
        page.get_by_label("Model").first.fill(str(tiny_model_dir))
        page.get_by_role("button", name="Write preset from the form").click()
        page.wait_for_function(f"document.querySelector('.cm-content')?.innerText.includes('{tiny_model_dir.name}')")
        page.locator(".cm-content").click()  # replace the generated preset with a short protocol
        page.keyboard.press("Control+A")
        page.keyboard.insert_text(tiny_yaml(tiny_model_dir, "ui-browser"))
        page.get_by_role("button", name="Run", exact=True).click()
        page.locator(".js-plotly-plot:visible").first.wait_for(timeout=600_000)  # a loaded 2-core CI box is slow
        from workbench.views.plots import CHART_LABELS

        # Only the charts this run has data for are shown (issue #15), each box with its chart: no empty boxes.
        shown = [label for label in CHART_LABELS if page.get_by_text(label, exact=True).filter(visible=True).count()]
        assert len(shown) >= 4 and page.locator(".js-plotly-plot:visible").count() == len(shown)
        page.screenshot(path=str(shots / "compare.png"), full_page=True)

        page.get_by_role("tab", name="Chat").click()
        page.get_by_role("button", name="Refresh runs").click()
        page.wait_for_timeout(1500)
        page.get_by_label("Prompt").fill("What is a Python list?")
        page.get_by_role("button", name="Send to all").click()
        page.wait_for_function("[...document.querySelectorAll('.chat-panel small')]"
                               ".filter(e => e.innerText.includes('tokens')).length >= 2", timeout=600_000)
        page.screenshot(path=str(shots / "chat.png"), full_page=True)

        page.get_by_role("tab", name="History").click()
        page.get_by_role("button", name="Refresh").click()
        # Open only once the list holds this run: on a loaded machine Refresh can take longer than any fixed pause,
        # and the run picked before it would be another test's (or none).
        page.get_by_text("ui-browser", exact=True).filter(visible=True).first.wait_for(timeout=120_000)
        page.get_by_role("button", name="Open", exact=True).click()
        page.locator(".js-plotly-plot:visible").first.wait_for(timeout=120_000)
        page.screenshot(path=str(shots / "history.png"), full_page=True)
    assert errors == []


def test_build_this_adds_the_suggested_variant_as_a_valid_preset(tiny_model_dir) -> None:
    """The "Build this" callback: the sensitivity pass's suggestion lands in the editor's YAML, which parses."""
    import yaml
    from transformers.quantizers.quantizers_utils import should_convert_module

    from workbench.config.presets import parse_preset
    from workbench.analysis.sensitivity import most_sensitive, suggested_variant
    from workbench.ui.compare import add_suggested_variant, suggestion_markdown

    rows = [{"block": i, "name": f"model.layers.{i}", "kld_mean": kld, "kld_p99": kld, "top1_agreement": 0.9,
             "perplexity": 10.0} for i, kld in enumerate([0.01, 0.3])]
    stage = {"method": "bnb-nf4", "options": {"double_quant": False}}
    suggestion = suggested_variant("nf4-keep1", most_sensitive(rows, 1), stage)
    editor = tiny_yaml(tiny_model_dir)
    run = {"preset": yaml.safe_load(editor),
           "sensitivity": {"variant": "nf4", "rows": rows, "protocol": "p", "eval_tokens": 128, "error": None,
                           "mixed_precision_variant": suggestion}}
    assert "nf4-keep1" in suggestion_markdown(run) and "Build this" in suggestion_markdown(run)

    text, message = add_suggested_variant(editor, run)
    preset = parse_preset(yaml.safe_load(text))
    added = preset.variant("nf4-keep1")
    assert [v.name for v in preset.variants] == ["fp32", "bf16", "nf4-keep1"] and "added variant `nf4-keep1`" in message
    assert added.method == "bnb-nf4" and added.options["double_quant"] is False
    # The patterns keep exactly block 1 (not block 10 or 0) and the head unquantized, as transformers reads them.
    skips = added.options["skip_modules"]
    assert not should_convert_module("model.layers.1.mlp.up_proj", skips)
    assert should_convert_module("model.layers.10.mlp.up_proj", skips)
    assert should_convert_module("model.layers.0.self_attn.q_proj", skips)
    assert not should_convert_module("lm_head", skips)

    assert add_suggested_variant(text, run) == (text, "variant 'nf4-keep1' is already in the preset; press Run to build it")
    other = {**run, "sensitivity": {**run["sensitivity"], "mixed_precision_variant": {**suggestion, "options": {}}}}
    renamed, _ = add_suggested_variant(text, other)
    assert [v.name for v in parse_preset(yaml.safe_load(renamed)).variants][-1] == "nf4-keep1-2"
    from_run, _ = add_suggested_variant("", run)  # an empty editor starts from the run's own preset
    assert [v.name for v in parse_preset(yaml.safe_load(from_run)).variants] == ["fp32", "bf16", "nf4-keep1"]

    broken = "name: [unclosed"
    kept, message = add_suggested_variant(broken, run)
    assert kept == broken and message.startswith("**Cannot add:** the preset in the editor is not valid YAML")
    nothing, message = add_suggested_variant(editor, {"preset": run["preset"], "sensitivity": None})
    assert nothing == editor and message.startswith("**Nothing to add:**")
