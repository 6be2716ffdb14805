"""End-to-end runs on a tiny random Llama: records, files, history, failures, cancel and the cache."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

from workbench.cli import main
from workbench.metrics.windows import plan_windows
from workbench.config.presets import load_preset
from workbench.running.runner import Runner
from workbench.data.store import History


def _plain_perplexity(model_dir: str, tokens: list[int], context: int, stride: int) -> float:
    """Independent truth: plain transformers, labels shifted by the model's own loss."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    nll, count = 0.0, 0
    for w in plan_windows(len(tokens), context, stride):
        ids = torch.tensor([tokens[w.start : w.end]])
        labels = ids.clone()
        labels[0, : w.first_target - w.start] = -100  # tokens scored in an earlier window
        with torch.no_grad():
            loss = model(input_ids=ids, labels=labels).loss
        n = w.end - w.first_target
        nll += float(loss) * n
        count += n
    return float(torch.exp(torch.tensor(nll / count)))


# The results.json contract (ARCHITECTURE §2.2), written out here rather than read from workbench.running.runner, so a
# metric dropped from (or renamed in) the runner's list fails this test instead of silently leaving the record.
CONTRACT_METRICS = {
    "disk_bytes", "weight_bytes", "peak_rss_bytes", "gpu_peak_bytes", "load_s", "ttft_s", "ttft_s_min", "ttft_s_max",
    "prefill_tok_s", "decode_tok_s", "decode_tok_s_min", "decode_tok_s_max", "sparsity", "perplexity",
    "kld_mean", "kld_p99", "top1_agreement", "delta_p_mean",
    "kld_mean_stderr", "kld_median", "kld_p90", "kld_p95", "kld_p999", "kld_max", "top1_agreement_stderr",
    "delta_p_mean_stderr", "delta_p_rms", "delta_p_rms_stderr", "delta_p_p01", "delta_p_p05", "delta_p_p50",
    "delta_p_p95", "delta_p_p99", "ln_ppl_ratio_mean", "ln_ppl_ratio_stderr", "ln_ppl_correlation",
    "ppl_ratio", "ppl_ratio_ci95", "ppl_indistinguishable", "samples_exact_match", "samples_first_diff_mean",
    "decode_tok_s_ci95", "ttft_s_ci95", "latency_repeats", "speed_noisy", "contention",
}
# Null even in a variant measured ok on a CPU: no GPU; the baseline has no baseline of its own to agree with;
# the first differing sample position has no mean when every sample matches.
MAY_BE_NULL = {"gpu_peak_bytes", "samples_exact_match", "samples_first_diff_mean"}

# The tiny Llama of conftest.tiny_model_dir: vocab V, hidden 64, 2 layers, 4 heads of 16, 2 KV heads, MLP 128.
ZEROED_COLUMNS = 5  # the first columns of every Linear and Embedding weight are written as exact zeros


def _tiny_llama_matrices(vocab: int) -> list[tuple[int, int]]:
    """(rows, columns) of every Linear and Embedding weight, from the architecture, not from a loaded model."""
    per_layer = [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)]  # q k v o gate up down
    return [(vocab, 64)] + per_layer * 2 + [(vocab, 64)]  # embed_tokens, 2 decoder layers, untied lm_head


@pytest.fixture(scope="module")
def zeroed_model_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny Llama with a known number of exact zeros written into its weights, so sparsity has a known answer."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    matrices = [m.weight for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))]
    assert sum(int((w == 0).sum()) for w in matrices) == 0  # random init: no zeros before ours
    with torch.no_grad():
        for weight in matrices:
            weight[:, :ZEROED_COLUMNS] = 0.0
    folder = tmp_path_factory.mktemp("zeroed-llama")
    shutil.copytree(tiny_model_dir, folder, dirs_exist_ok=True)  # the tokenizer files; the weights are replaced next
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, zeroed_model_dir):
    """One run of six variants, one of which is killed with SIGKILL while it is measured."""
    import yaml

    from tests.conftest import TINY_VARIANT_DEFAULTS

    folder = tmp_path_factory.mktemp("tiny-run")
    variants = [{"name": "fp32", "method": "fp32"}, {"name": "fp32-again", "method": "fp32"},
                {"name": "bf16", "method": "bf16"}, {"name": "victim", "method": "fp16"},
                {"name": "int8", "method": "bnb-int8"}, {"name": "nf4", "method": "bnb-nf4"}]
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump({"name": "tiny", "model": str(zeroed_model_dir), "device": "cpu", "threads": 1,
                                    **TINY_VARIANT_DEFAULTS, "baseline": "fp32", "variants": variants}))
    events = []
    runner: Runner

    def on_event(event) -> None:
        events.append(event)
        if event.variant == "victim" and event.phase == "measuring" and event.message == "loading":
            os.kill(runner.worker_pid, signal.SIGKILL)

    runner = Runner(load_preset(path), out_dir=folder / "out", on_event=on_event)
    run = runner.run()
    return run, {r["name"]: r for r in run["variants"]}, events, folder / "out"


def test_killed_worker_fails_only_its_variant(tiny_run) -> None:
    run, records, _, _ = tiny_run
    assert records["victim"]["status"] == "failed"
    assert "SIGKILL" in records["victim"]["error"] and "\n" not in records["victim"]["error"]
    assert all(records[n]["status"] == "ok" for n in records if n != "victim"), {n: r["error"] for n, r in records.items()}
    assert run["status"] == "failed"
    assert all(v is None for v in records["victim"]["metrics"].values())


def test_record_carries_every_contract_metric_and_protocol(tiny_run) -> None:
    run, records, _, out = tiny_run
    for name, record in records.items():
        assert set(record["metrics"]) == CONTRACT_METRICS, name
        if record["status"] == "ok":  # measured, so every figure that applies on a CPU has a value
            missing = {k for k, v in record["metrics"].items() if v is None} - MAY_BE_NULL
            assert not missing, (name, missing)
    for name in ("fp32-again", "bf16", "int8", "nf4"):  # compared with the baseline's samples
        assert records[name]["metrics"]["samples_exact_match"] is not None, name
    fp32 = records["fp32"]["metrics"]
    assert fp32["gpu_peak_bytes"] is None  # CPU: does not apply
    assert fp32["disk_bytes"] > 0 and fp32["weight_bytes"] > 0 and fp32["peak_rss_bytes"] > fp32["weight_bytes"]
    assert fp32["decode_tok_s_min"] <= fp32["decode_tok_s"] <= fp32["decode_tok_s_max"]
    assert records["fp32"]["runtime"]["threads"] == 1
    protocol = run["protocol"]
    assert (protocol["context"], protocol["stride"], protocol["scored"]) == (128, 128, "all")
    saved = json.loads((out / "results.json").read_text())
    assert saved["run_id"] == run["run_id"] and len(saved["variants"]) == 6
    tokens = json.loads((out / "eval_tokens.json").read_text())
    assert len(tokens) == protocol["eval_tokens"] == 384
    assert not (out / "baseline_logprobs.npy").exists()  # large and derivable: removed after the run


def test_perplexity_matches_plain_transformers(tiny_run) -> None:
    run, records, _, out = tiny_run
    tokens = json.loads((out / "eval_tokens.json").read_text())
    expected = _plain_perplexity(records["fp32"]["artifact_path"], tokens, 128, 128)
    assert records["fp32"]["metrics"]["perplexity"] == pytest.approx(expected, rel=1e-4)


def test_divergence_baseline_and_independent_reload(tiny_run) -> None:
    _, records, _, _ = tiny_run
    base, again = records["fp32"]["metrics"], records["fp32-again"]["metrics"]
    assert base["kld_mean"] < 1e-6 and base["top1_agreement"] == 1.0
    assert again["kld_mean"] < 1e-6 and again["top1_agreement"] == 1.0
    assert again["perplexity"] == pytest.approx(base["perplexity"], rel=1e-5)
    for name in ("bf16", "int8", "nf4"):
        assert records[name]["metrics"]["kld_mean"] > 0


def test_quantized_weights_are_smaller_and_artifacts_load(tiny_run) -> None:
    from transformers import AutoModelForCausalLM

    _, records, _, _ = tiny_run
    size = {n: records[n]["metrics"]["weight_bytes"] for n in ("fp32", "bf16", "int8", "nf4")}
    assert size["nf4"] < size["int8"] < size["fp32"] and size["bf16"] < size["fp32"]
    for name in ("bf16", "nf4"):
        model = AutoModelForCausalLM.from_pretrained(records[name]["artifact_path"])
        assert model.config.vocab_size > 0


def test_sparsity_is_the_exact_zero_count(tiny_run, zeroed_model_dir) -> None:
    _, records, _, _ = tiny_run
    vocab = json.loads((zeroed_model_dir / "config.json").read_text())["vocab_size"]
    matrices = _tiny_llama_matrices(vocab)
    zeros = sum(rows * ZEROED_COLUMNS for rows, _ in matrices)  # what zeroed_model_dir wrote, nothing else
    total = sum(rows * columns for rows, columns in matrices)
    assert records["fp32"]["metrics"]["sparsity"] == pytest.approx(zeros / total, rel=1e-12)
    assert records["fp32-again"]["metrics"]["sparsity"] == pytest.approx(zeros / total, rel=1e-12)
    assert len(records["fp32"]["layers"]) == len(matrices) == 16


def test_history_keeps_every_variant_and_exports(tiny_run, tmp_path, capsys) -> None:
    run, _, _, _ = tiny_run
    stored = History().load_run(run["run_id"])
    assert [v["name"] for v in stored["variants"]] == ["fp32", "fp32-again", "bf16", "victim", "int8", "nf4"]
    assert stored["variants"][3]["status"] == "failed"
    assert main(["history"]) == 0
    assert run["run_id"] in capsys.readouterr().out
    assert main(["export", run["run_id"], "--csv", str(tmp_path / "r.csv")]) == 0
    import pandas as pd

    table = pd.read_csv(tmp_path / "r.csv")
    assert list(table["variant"]) == ["fp32", "fp32-again", "bf16", "victim", "int8", "nf4"]
    assert "perplexity" in table.columns and table.loc[3, "status"] == "failed"
    assert main(["export", "no-such-run", "--csv", str(tmp_path / "x.csv")]) == 2


def test_progress_events_cover_building_and_measuring(tiny_run) -> None:
    _, _, events, _ = tiny_run
    phases = {(e.variant, e.phase) for e in events}
    assert ("nf4", "building") in phases and ("nf4", "measuring") in phases and ("nf4", "ok") in phases
    assert events[-1].phase == "done"


def test_cancel_marks_the_rest_cancelled(write_preset, tmp_path) -> None:
    path = write_preset([{"name": "fp32", "method": "fp32"}, {"name": "bf16", "method": "bf16"},
                         {"name": "fp16", "method": "fp16"}], name="cancel")
    runner: Runner

    def on_event(event) -> None:
        if event.variant == "bf16" and event.phase == "building":
            runner.cancel()

    runner = Runner(load_preset(path), out_dir=tmp_path / "out", on_event=on_event)
    run = runner.run()
    statuses = [v["status"] for v in run["variants"]]
    assert statuses == ["ok", "cancelled", "cancelled"] and run["status"] == "cancelled"
    assert [v["status"] for v in History().load_run(run["run_id"])["variants"]] == statuses


def test_corrupted_cache_entry_is_rebuilt_and_no_cache_rebuilds(write_preset, tmp_path) -> None:
    path = write_preset([{"name": "bf16", "method": "bf16"}], name="cache",
                        latency={"prompt_tokens": 8, "new_tokens": 2, "warmup": 0, "repeats": 1, "target_ci": None, "max_seconds": 2,
                                 "interleave": False})
    first = Runner(load_preset(path), out_dir=tmp_path / "a").run()
    artifact = Path(first["variants"][0]["artifact_path"])
    weights = artifact / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated, as by a full disk

    messages = []
    second = Runner(load_preset(path), out_dir=tmp_path / "b", on_event=lambda e: messages.append(e.message)).run()
    assert second["variants"][0]["status"] == "ok"
    assert any("rebuilding cache entry" in m and "model.safetensors" in m for m in messages)
    assert second["variants"][0]["metrics"]["perplexity"] == pytest.approx(first["variants"][0]["metrics"]["perplexity"])
    assert second["variants"][0]["build"][0]["cached"] is False  # rebuilt, not reused

    cached = Runner(load_preset(path), out_dir=tmp_path / "c").run()
    assert cached["variants"][0]["build"][0]["cached"] is True
    rebuilt = Runner(load_preset(path), out_dir=tmp_path / "d", use_cache=False).run()
    assert rebuilt["variants"][0]["build"][0]["cached"] is False


def test_bitsandbytes_unavailable_fails_only_bnb_variants(write_preset, tmp_path, monkeypatch) -> None:
    fake = tmp_path / "fake-site" / "bitsandbytes"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('libbitsandbytes_cpu.so: cannot open shared object file')\n")
    # Spawned workers start from the parent's sys.path, so the broken package goes first there.
    monkeypatch.syspath_prepend(str(fake.parent))
    path = write_preset([{"name": "fp32", "method": "fp32"}, {"name": "nf4", "method": "bnb-nf4"}], name="nobnb",
                        latency={"prompt_tokens": 8, "new_tokens": 2, "warmup": 0, "repeats": 1, "target_ci": None, "max_seconds": 2,
                                 "interleave": False})
    run = Runner(load_preset(path), out_dir=tmp_path / "out", use_cache=False).run()
    fp32, nf4 = run["variants"]
    assert fp32["status"] == "ok"
    assert nf4["status"] == "failed" and "bitsandbytes is unavailable" in nf4["error"] and "pip install" in nf4["error"]


def test_eval_text_shorter_than_one_window_is_refused(write_preset, tmp_path, capsys) -> None:
    short = tmp_path / "short.txt"
    short.write_text("Only a handful of words here.")
    path = write_preset([{"name": "fp32", "method": "fp32"}], name="short",
                        eval={"text": str(short), "max_tokens": 256, "context": 128, "stride": 128})
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "fewer than one window (eval.context=128)" in capsys.readouterr().err


def test_ctrl_c_in_the_cli_cancels_and_keeps_what_was_measured(write_preset, tmp_path) -> None:
    import subprocess
    import sys
    import time

    path = write_preset([{"name": "fp32", "method": "fp32"}, {"name": "bf16", "method": "bf16"},
                         {"name": "fp16", "method": "fp16"}], name="interrupt")
    out = tmp_path / "out"
    cli = subprocess.Popen([sys.executable, "-m", "workbench", "run", str(path), "--out", str(out)],
                           cwd=Path(__file__).parent.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (out / "results.json").exists() and time.monotonic() < deadline:  # the first variant is done
        time.sleep(0.2)
    cli.send_signal(signal.SIGINT)
    _, err = cli.communicate(timeout=120)
    assert cli.returncode == 1, err
    run = json.loads((out / "results.json").read_text())
    statuses = [v["status"] for v in run["variants"]]
    assert statuses[0] == "ok" and statuses[-1] == "cancelled" and run["status"] == "cancelled"
    assert [v["status"] for v in History().load_run(run["run_id"])["variants"]] == statuses
