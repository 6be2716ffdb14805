"""Bad arguments get one line and exit 2; late checks come early; killed runs become 'interrupted'."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from workbench.cli import main
from workbench.errors import WorkbenchError
from workbench.data.store import History

ROOT = Path(__file__).parent.parent
BUNDLED = "bundled:smollm2-135m-instruct"


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert not lines[0].rstrip().endswith(".."), err
    return lines[0]


def _stored_run(run_id: str) -> None:
    History().start_run({"run_id": run_id, "created_at": "2026-12-01T00:00:00", "preset": {"name": "x"},
                         "model": {"source": BUNDLED}}, Path("/nonexistent"))


def test_run_out_naming_a_file(write_preset, tmp_path, capsys) -> None:
    path = write_preset([{"name": "fp32", "method": "fp32"}], name="outfile")
    target = tmp_path / "results.txt"
    target.write_text("keep me")
    assert main(["run", str(path), "--out", str(target)]) == 2
    assert one_error_line(capsys.readouterr().err) == (f"error: --out {target} is a file; give a folder (new or existing) "
                                                       "for the run's outputs")
    assert target.read_text() == "keep me"


def test_run_out_in_a_read_only_place(write_preset, tmp_path, capsys) -> None:
    path = write_preset([{"name": "fp32", "method": "fp32"}], name="readonly")
    if os.geteuid() == 0:  # root writes through file modes; sysfs refuses new folders even to root
        target = Path("/sys/squeeze-bench-out")
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        target = locked / "out"
    assert main(["run", str(path), "--out", str(target)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: --out {target} cannot be written (") and line.endswith("choose a folder you can write to")


def test_export_into_a_folder_that_does_not_exist(tmp_path, capsys) -> None:
    _stored_run("export-missing-folder")
    for flag in ("--csv", "--json", "--html", "--markdown"):
        target = tmp_path / "no" / "such" / "folder" / "out.file"
        assert main(["export", "export-missing-folder", flag, str(target)]) == 2
        assert one_error_line(capsys.readouterr().err) == (f"error: {flag} {target}: the folder {target.parent} does not "
                                                           "exist; create it first or choose another")
    assert main(["export", "export-missing-folder", "--csv", str(tmp_path)]) == 2
    assert one_error_line(capsys.readouterr().err) == f"error: --csv {tmp_path} is a folder; give a file name"


def test_plan_of_a_cuda_preset_without_cuda(write_preset, capsys, monkeypatch) -> None:
    import torch

    from workbench.planning import machine

    assert not torch.cuda.is_available()  # the CI machines are CPU only: this is the case being tested
    path = write_preset([{"name": "fp32", "method": "fp32"}], name="cuda", device="cuda")

    def must_not_run(*_args, **_kwargs):
        raise AssertionError("the refusal must come before the machine calibration (the policy gate reads only config.json)")

    monkeypatch.setattr(machine, "machine_profile", must_not_run)
    assert main(["plan", str(path)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line == ("error: device: cuda was asked for, but torch sees no CUDA device on this machine; use device: cpu "
                    "or device: auto")


def test_run_of_a_cuda_preset_is_refused_before_the_model_is_prepared(tmp_path, capsys) -> None:
    """The bundled model would be converted (tens of seconds) first; the refusal comes before, without 'RuntimeError'."""
    path = tmp_path / "cuda.yaml"
    path.write_text(yaml.safe_dump({"name": "cuda", "model": BUNDLED, "device": "cuda", "threads": 1,
                                    "baseline": "fp32", "variants": [{"name": "fp32", "method": "fp32"}]}))
    sources = Path(os.environ["WORKBENCH_HOME"]) / "sources"
    before = set(sources.iterdir()) if sources.is_dir() else set()
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "device: cuda was asked for, but torch sees no CUDA device" in line and "RuntimeError" not in line
    assert (set(sources.iterdir()) if sources.is_dir() else set()) == before  # nothing converted


@pytest.mark.parametrize("command", ["plan", "run"])
def test_group_size_is_checked_against_the_model_widths_first(command, tmp_path, capsys) -> None:
    """SmolLM2's 576-wide layers take groups of 64, not 128: said from the GGUF metadata, before any preparing."""
    path = tmp_path / "gptq.yaml"
    path.write_text(yaml.safe_dump({"name": "g", "model": BUNDLED, "device": "cpu", "threads": 1, "baseline": "fp32",
                                    "variants": [{"name": "fp32", "method": "fp32"},
                                                 {"name": "g128", "method": "gptq", "options": {"group_size": 128}},
                                                 {"name": "a128", "method": "awq", "options": {"group_size": 128}}]}))
    assert main([command, str(path), *(["--out", str(tmp_path / "out")] if command == "run" else [])]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("error: variant 'g128' (gptq): group_size 128 does not divide the input width 576 of "
                               "model.layers.0.self_attn.q_proj")
    assert "valid group sizes for this model: 16, 32, 64" in lines[0] and lines[1].startswith("error: variant 'a128' (awq)")
    assert not (tmp_path / "out" / "results.json").exists()


@pytest.mark.parametrize("kind,content,what", [
    ("empty", b"", "it is empty (0 bytes)"),
    ("text", b"This is a text file, not model weights.\n" * 10, "400 bytes of a text file, starting with b'This is '"),
    ("truncated", None, "its header or tensor table cannot be read (truncated or corrupted"),
])
def test_damaged_gguf_model_is_described_as_damaged(kind, content, what, tmp_path, bundled_source) -> None:
    from workbench.data.sources import resolve_source

    bad = tmp_path / f"{kind}.gguf"
    bad.write_bytes(content if content is not None else Path(bundled_source.gguf_file).read_bytes()[:2_000_000])
    with pytest.raises(WorkbenchError) as error:
        resolve_source(str(bad))
    message = str(error.value)
    assert what in message and "damaged" in message and "gguf-file method" not in message and ".." not in message


def test_damaged_gguf_model_through_the_cli(tmp_path, capsys) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 20)
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump({"name": "b", "model": str(bad), "device": "cpu", "threads": 1, "baseline": "fp32",
                                    "variants": [{"name": "fp32", "method": "fp32"}]}))
    assert main(["plan", str(path)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{bad} is a damaged GGUF file: 24 bytes" in line and "could" not in line


def test_first_line_of_an_error_never_doubles_the_full_stop() -> None:
    from workbench.data.sources import _first_line

    assert _first_line(ValueError("GGUF model with architecture foo is not supported yet.\nmore")) == \
        "GGUF model with architecture foo is not supported yet"
    assert _first_line(ValueError("")) == "ValueError"


def test_table_shows_a_dash_for_missing_figures_when_every_variant_failed() -> None:
    from workbench.views.report import format_table
    from workbench.running.runner import METRIC_NAMES

    failed = {"name": "a", "method": "fp32", "status": "failed", "error": "build: boom", "honesty": None,
              "metrics": {m: None for m in METRIC_NAMES}}
    table = format_table({"variants": [failed, {**failed, "name": "b"}]})
    assert "None" not in table and "nan" not in table.lower() and table.count("—") >= 2 * 11
    ok = {**failed, "name": "c", "status": "ok", "error": None, "metrics": {**failed["metrics"], "perplexity": 12.345678}}
    assert "12.35" in format_table({"variants": [failed, ok]})


def test_memory_budget_verdict_after_the_table_and_in_results(write_preset, tmp_path, capsys) -> None:
    path = write_preset([{"name": "fp32", "method": "fp32"}], name="budget", memory_budget_gb=0.001)
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    table_end = printed.index("fp32  ")  # the table's row, then the verdict after it
    verdict = printed.index("memory budget 0.001 GB: 1 variant(s) over budget")
    assert verdict > table_end and "over budget: fp32: estimated peak" in printed
    run = json.loads((out / "results.json").read_text())
    assert run["memory_budget_gb"] == 0.001 and len(run["over_budget"]) == 1 and run["over_budget"][0].startswith("fp32: ")
    assert History().load_run(run["run_id"])["over_budget"] == run["over_budget"]


def test_kill_9_of_the_cli_leaves_the_run_interrupted(write_preset, tmp_path, capsys) -> None:
    path = write_preset([{"name": "fp32", "method": "fp32"}, {"name": "bf16", "method": "bf16"},
                         {"name": "fp16", "method": "fp16"}], name="killed")
    out = tmp_path / "out"
    cli = subprocess.Popen([sys.executable, "-m", "workbench", "run", str(path), "--out", str(out)], cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    database = Path(os.environ["WORKBENCH_HOME"]) / "history.sqlite"
    run_id = None
    deadline = time.monotonic() + 300
    while run_id is None and time.monotonic() < deadline and cli.poll() is None:  # the run is stored as running
        time.sleep(0.3)
        if database.exists():
            with sqlite3.connect(database) as db:
                row = db.execute("SELECT run_id FROM runs WHERE status = 'running' AND out_dir = ?", (str(out),)).fetchone()
            run_id = row[0] if row else None
    assert run_id is not None, "the CLI run never started"
    os.killpg(cli.pid, signal.SIGKILL)  # the CLI and its worker, as `kill -9` of the process group
    cli.wait(timeout=30)

    history = History()
    assert run_id in history.interrupted
    assert next(r for r in history.runs() if r["run_id"] == run_id)["status"] == "interrupted"
    stored = history.load_run(run_id)
    assert stored["status"] == "interrupted" and f"pid {cli.pid}" in stored["interrupted"]
    assert json.loads((out / "results.json").read_text())["status"] == "interrupted"
    assert main(["history"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith(run_id))
    assert "interrupted" in line
    assert History().interrupted == []  # found once; a second look changes nothing


def test_a_live_owner_keeps_its_run_running() -> None:
    history = History()
    history.start_run({"run_id": "alive-run", "created_at": "2026-12-01T00:00:00", "preset": {"name": "x"},
                       "model": {"source": BUNDLED}}, Path("/nonexistent"))
    assert "alive-run" not in History().interrupted  # this process owns it and is alive
    assert next(r for r in History().runs() if r["run_id"] == "alive-run")["status"] == "running"
