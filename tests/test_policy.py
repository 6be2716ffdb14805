"""The policy gate (workbench/config/policy.py): hostile presets refused in shared mode before any model loads.

The corpus goes through the CLI gate (`python -m workbench plan`, a subprocess with
WORKBENCH_SHARED=1, its own WORKBENCH_HOME, which must stay without a converted source or a run).
tests/test_shared_app.py sends the same corpus to the running app with gradio_client.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

from workbench.errors import WorkbenchError
from workbench.config.presets import parse_preset

ROOT = Path(__file__).parent.parent
BUNDLED = "bundled:smollm2-135m-instruct"


def base(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"name": "hostile", "model": BUNDLED, "device": "cpu", "threads": 1,
                            "eval": {"text": "pydoc", "max_tokens": 256, "context": 128, "stride": 128},
                            "latency": {"prompt_tokens": 8, "new_tokens": 3, "warmup": 0, "repeats": 1},
                            "baseline": "fp32", "variants": [{"name": "fp32", "method": "fp32"}]}
    data.update(changes)
    return data


def with_variant(variant: dict[str, Any], **changes: Any) -> dict[str, Any]:
    data = base(**changes)
    data["variants"] = [{"name": "fp32", "method": "fp32"}, variant]
    return data


def calibrated(method: str, **calibration: Any) -> dict[str, Any]:
    return with_variant({"name": "v", "method": method, "options": {"calibration": {"samples": 4, "seq_len": 64, **calibration}}})


# (id, preset data or raw YAML text, extra environment, what the refusal says)
HOSTILE: list[tuple[str, Any, dict[str, str], str]] = [
    ("model-absolute-folder", base(model="/etc"), {}, "model: local paths are disabled in shared mode (/etc)"),
    ("model-relative-path", base(model="./models/secret"), {}, "model: local paths are disabled in shared mode"),
    ("model-home-path", base(model="~/model"), {}, "model: local paths are disabled in shared mode (~/model)"),
    ("model-gguf-file", base(model="/tmp/other.gguf"), {}, "model: local paths are disabled in shared mode (/tmp/other.gguf)"),
    ("model-this-repo", base(model=str(ROOT)), {}, "model: local paths are disabled in shared mode"),
    ("eval-text-passwd", base(eval={"text": "/etc/passwd", "max_tokens": 256, "context": 128, "stride": 128}), {},
     "eval.text: local paths are disabled in shared mode (/etc/passwd)"),
    ("eval-text-traversal", base(eval={"text": "../../../../etc/hostname", "max_tokens": 256, "context": 128, "stride": 128}),
     {}, "eval.text: local paths are disabled in shared mode (../../../../etc/hostname)"),
    ("eval-text-home", base(eval={"text": "~/.bash_history", "max_tokens": 256, "context": 128, "stride": 128}), {},
     "eval.text: local paths are disabled in shared mode"),
    ("gptq-calibration-text", calibrated("gptq", text="/etc/shadow"), {},
     "variant 'v' (gptq) calibration.text: local paths are disabled in shared mode (/etc/shadow)"),
    ("awq-calibration-text", calibrated("awq", text="/proc/self/environ"), {},
     "variant 'v' (awq) calibration.text: local paths are disabled in shared mode (/proc/self/environ)"),
    ("sparsegpt-calibration-text", calibrated("sparsegpt", text="relative.txt"), {},
     "variant 'v' (sparsegpt) calibration.text: local paths are disabled in shared mode (relative.txt)"),
    ("wanda-in-pipeline-calibration-text",
     with_variant({"name": "v", "pipeline": [{"method": "wanda", "options": {"calibration": {"text": "/etc/group", "samples": 4, "seq_len": 64}}},
                                             {"method": "gguf", "options": {"quant": "Q8_0"}}]}), {},
     "variant 'v' stage 1 (wanda) calibration.text: local paths are disabled in shared mode (/etc/group)"),
    ("gguf-file-path", with_variant({"name": "v", "method": "gguf-file", "options": {"path": "/etc/passwd"}}), {},
     "variant 'v' (gguf-file) path: local paths are disabled in shared mode (/etc/passwd)"),
    ("gguf-file-in-pipeline", with_variant({"name": "v", "pipeline": [{"method": "gguf-file", "options": {"path": "x.gguf"}}]}), {},
     "variant 'v' stage 1 (gguf-file) path: local paths are disabled in shared mode (x.gguf)"),
    ("trust-remote-code", base(trust_remote_code=True), {}, "trust_remote_code: true is refused in shared mode"),
    ("allow-pickle", base(allow_pickle=True), {}, "allow_pickle: true is refused in shared mode"),
    ("threads-above-cores", base(threads=512), {}, f"threads: 512 is above the cap of {os.cpu_count()} (WORKBENCH_MAX_THREADS)"),
    ("threads-above-env-cap", base(threads=2), {"WORKBENCH_MAX_THREADS": "1"}, "threads: 2 is above the cap of 1"),
    ("eval-tokens", base(eval={"text": "pydoc", "max_tokens": 10_000_000, "context": 128, "stride": 128}), {},
     "eval.max_tokens: 10000000 tokens is above the cap of 4096 (WORKBENCH_MAX_EVAL_TOKENS)"),
    ("sensitivity-tokens", base(variants=[{"name": "fp32", "method": "fp32"}, {"name": "nf4", "method": "bnb-nf4"}],
                                sensitivity={"variant": "nf4", "max_tokens": 100_000}), {},
     "sensitivity.max_tokens: 100000 tokens is above the cap of 4096"),
    ("calibration-samples-x-length", calibrated("gptq", samples=4096, seq_len=4096), {},
     "calibration: 4096 samples x 4096 tokens = 16777216 is above the cap of 8192 (WORKBENCH_MAX_CALIBRATION_TOKENS)"),
    ("structured-calibration-tokens", with_variant({"name": "v", "method": "structured", "options": {"calibration_tokens": 10**9}}),
     {}, "variant 'v' (structured) calibration_tokens: 1000000000 is above the cap of 8192"),
    ("distill-time", with_variant({"name": "v", "method": "distill", "options": {"time_budget_s": 86400}}), {},
     "variant 'v' (distill) time_budget_s: 86400 s is above the cap of 300 (WORKBENCH_MAX_DISTILL_S)"),
    ("distill-batch", with_variant({"name": "v", "method": "distill", "options": {"seq_len": 4096, "batch_size": 64}}), {},
     "variant 'v' (distill) seq_len x batch_size = 262144 is above the cap of 8192"),
    ("lm-eval-all-items", base(lm_eval={"tasks": ["pydoc_lastword"], "limit": None}), {},
     "lm_eval.limit: null (every item) is refused here"),
    ("lm-eval-items", base(lm_eval={"tasks": ["pydoc_lastword"], "limit": 100_000}), {},
     "lm_eval: 100000 items x 1 task(s) is above the cap of 200 (WORKBENCH_MAX_LMEVAL_ITEMS)"),
    ("variants", base(variants=[{"name": f"v{i}", "method": "fp32"} for i in range(40)], baseline="v0"), {},
     "variants: 40 is above the cap of 6 (WORKBENCH_MAX_VARIANTS)"),
    ("latency-new-tokens", base(latency={"prompt_tokens": 8, "new_tokens": 1_000_000, "warmup": 0, "repeats": 1}), {},
     "latency.new_tokens: 1000000 is above the cap of 256 (WORKBENCH_MAX_NEW_TOKENS)"),
    ("sample-tokens", base(samples={"prompts": ["hi"], "new_tokens": 100_000}), {},
     "samples.new_tokens: 100000 is above the cap of 256"),
    ("latency-repeats", base(latency={"prompt_tokens": 8, "new_tokens": 3, "warmup": 5, "repeats": 10_000}), {},
     "latency.warmup + latency.repeats: 10005 is above the cap of 20 (WORKBENCH_MAX_REPEATS)"),
    ("many-prompts", base(samples={"prompts": ["hi"] * 500, "new_tokens": 4}), {}, "samples.prompts: 500 is above the cap of 20"),
    ("model-params", base(), {"WORKBENCH_MAX_PARAMS": "1e6"},
     "has about 135 M parameters; this app allows at most 1 M (WORKBENCH_MAX_PARAMS)"),
    ("unknown-hub-model", base(model="someone/huge-model-70b"), {},
     "it is not in the local cache and no hub is reachable; the size cap cannot be checked"),
    ("bundled-traversal", base(model="bundled:../../etc/passwd"), {}, "model: cannot read the configuration of bundled:../../etc/passwd"),
    ("oversized-float", base(eval={"text": "pydoc", "max_tokens": 1e30, "context": 128, "stride": 128}), {},
     "eval.max_tokens"),
    ("malformed-threads", base(threads="all of them"), {}, "threads: Input should be a valid integer"),
    ("malformed-not-a-mapping", "- just\n- a list\n", {}, "a preset is a YAML mapping, got list"),
    ("malformed-yaml", "name: [unclosed\n", {}, "not valid YAML"),
    ("malformed-cap-variable", base(), {"WORKBENCH_MAX_EVAL_TOKENS": "lots"}, "WORKBENCH_MAX_EVAL_TOKENS='lots' is not a number"),
    ("everything-at-once", base(model="/etc", trust_remote_code=True, threads=999,
                                eval={"text": "/etc/passwd", "max_tokens": 99_999, "context": 128, "stride": 128}), {},
     "model: local paths are disabled"),
]


def preset_text(data: Any) -> str:
    return data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False)


def _cli_plan(case: tuple[str, Any, dict[str, str], str], folder: Path) -> tuple[str, int, str, Path]:
    name, data, extra, _ = case
    home = folder / f"home-{name}"
    path = folder / f"{name}.yaml"
    path.write_text(preset_text(data))
    env = {**os.environ, "WORKBENCH_SHARED": "1", "WORKBENCH_HOME": str(home), "HF_HUB_OFFLINE": "1", **extra}
    done = subprocess.run([sys.executable, "-m", "workbench", "plan", str(path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    return name, done.returncode, done.stderr, home


def test_the_corpus_is_large_and_covers_every_path_field() -> None:
    assert len(HOSTILE) >= 25
    ids = [case[0] for case in HOSTILE]
    assert len(set(ids)) == len(ids)
    from workbench.config.policy import CAPS

    text = " ".join(case[3] for case in HOSTILE)
    for variable, _default, _what in CAPS.values():
        if variable != "WORKBENCH_MAX_PLAN_MINUTES":  # needs this machine's calibration: test_plan_time_cap
            assert variable in text or any(variable in case[2] for case in HOSTILE), variable


def test_hostile_presets_are_refused_by_the_cli_gate_before_any_model_loads(tmp_path) -> None:
    with ThreadPoolExecutor(max_workers=3) as pool:  # each case is its own interpreter: about a second of CPU
        results = list(pool.map(lambda case: _cli_plan(case, tmp_path), HOSTILE))
    expected = {case[0]: case[3] for case in HOSTILE}
    for name, code, err, home in results:
        assert code == 2, (name, code, err)
        assert expected[name] in err, (name, err)
        lines = err.strip().splitlines()
        assert lines and all(line.startswith("error: ") for line in lines), (name, err)  # one line per reason
        assert "Traceback" not in err and not any(line.rstrip().endswith("..") for line in lines), (name, err)
        # nothing was prepared: no converted source, no run folder, no artifact
        assert not any((home / sub).exists() for sub in ("sources", "runs", "artifacts")), name
    every = next(err for name, _c, err, _h in results if name == "everything-at-once")
    assert len(every.strip().splitlines()) == 5  # model, eval.text, remote code, threads, eval tokens: each its line


def test_gate_finds_every_path_marked_option_of_every_method() -> None:
    """A free-text option of any method is either marked as a path or known not to be one: none is missed."""
    import types
    import typing

    from pydantic import BaseModel

    from workbench.methods.registry import get_method, method_names
    from workbench.pathfield import path_keywords

    not_paths = {("sparsegpt", "mask"), ("wanda", "mask")}  # an N:M pattern, validated as such
    found = []

    def walk(method: str, model: type[BaseModel]) -> None:
        for name, info in model.model_fields.items():
            union = typing.get_origin(info.annotation) in (typing.Union, types.UnionType)
            args = typing.get_args(info.annotation) if union else (info.annotation,)  # list[str]: module names
            if any(isinstance(a, type) and issubclass(a, BaseModel) for a in args):
                walk(method, next(a for a in args if isinstance(a, type) and issubclass(a, BaseModel)))
            elif str in args:
                marked = path_keywords(info) is not None
                assert marked or (method, name) in not_paths, f"{method}.{name} is free text but not marked as a path"
                if marked:
                    found.append((method, name))

    for method in method_names():
        walk(method, get_method(method).Options)
    assert ("gguf-file", "path") in found and ("gptq", "text") in found and ("wanda", "text") in found


def test_allowed_folders_resolve_symlinks_and_traversal(tmp_path, monkeypatch) -> None:
    from workbench.config.policy import app_mode, refusals

    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "escape").symlink_to("/etc")
    monkeypatch.delenv("WORKBENCH_SHARED", raising=False)
    monkeypatch.setenv("WORKBENCH_ALLOWED_DIRS", str(allowed))
    cases = {str(allowed / "escape" / "passwd"): True, str(allowed / ".." / "outside.txt"): True,
             str(allowed / "inside.txt"): False}
    for text, refused in cases.items():
        preset = parse_preset(base(eval={"text": text, "max_tokens": 256, "context": 128, "stride": 128}))
        reasons = refusals(preset, app_mode(), estimate=False)
        assert bool(reasons) == refused, (text, reasons)
        if refused:
            assert "outside the allowed folders" in reasons[0] and str(allowed) in reasons[0]


def test_local_cli_reads_any_file_but_a_bundle_needs_allow_paths(tmp_path, monkeypatch) -> None:
    from workbench.config.policy import bundle_mode, cli_mode, refusals

    monkeypatch.delenv("WORKBENCH_SHARED", raising=False)
    monkeypatch.delenv("WORKBENCH_ALLOWED_DIRS", raising=False)
    text = tmp_path / "eval.txt"
    preset = parse_preset(base(eval={"text": str(text), "max_tokens": 256, "context": 128, "stride": 128},
                               trust_remote_code=True))
    assert refusals(preset, cli_mode(), estimate=False) == []
    reasons = refusals(preset, bundle_mode(allow_paths=False, trust_remote_code=False), estimate=False)
    assert reasons == [f"eval.text: local path {text} is refused (pass --allow-paths if you trust the bundle)",
                       "trust_remote_code: true is refused for a bundle from elsewhere; pass --trust-remote-code if "
                       "you trust the model's code"]
    assert refusals(preset, bundle_mode(allow_paths=True, trust_remote_code=True), estimate=False) == []


def test_shipped_small_presets_pass_the_shared_gate(monkeypatch) -> None:
    from workbench.config.policy import refusals, shared_mode
    from workbench.config.presets import load_preset

    monkeypatch.setenv("WORKBENCH_SHARED", "1")
    assert refusals(load_preset(ROOT / "presets" / "tiny-smoke.yaml"), shared_mode(), estimate=False) == []
    # The default preset a visitor's first click runs fits the shared caps; the full comparison does not.
    assert refusals(load_preset(ROOT / "presets" / "quickstart.yaml"), shared_mode(), estimate=False) == []
    full = refusals(load_preset(ROOT / "presets" / "full.yaml"), shared_mode(), estimate=False)
    assert full == ["variants: 8 is above the cap of 6 (WORKBENCH_MAX_VARIANTS)"]


def test_plan_time_cap(monkeypatch) -> None:
    """The planner's estimate (this machine's calibration, the model's GGUF metadata; no weights) is capped too."""
    from workbench.config.policy import PolicyError, enforce, shared_mode

    monkeypatch.setenv("WORKBENCH_SHARED", "1")
    monkeypatch.setenv("WORKBENCH_MAX_PLAN_MINUTES", "0.01")
    preset = parse_preset(base())
    with pytest.raises(PolicyError, match=r"the planner estimates [\d.]+ min for this run, above the cap of 0.01 "
                                          r"\(WORKBENCH_MAX_PLAN_MINUTES\)"):
        enforce(preset, shared_mode())
    monkeypatch.setenv("WORKBENCH_MAX_PLAN_MINUTES", "600")
    enforce(preset, shared_mode())  # the same preset fits a generous cap


def test_reproduce_shows_the_preset_and_refuses_paths_and_remote_code(write_preset, tmp_path, capsys) -> None:
    """A bundle's local model path and remote code are refused without the flags; nothing runs."""
    import json
    import zipfile

    from workbench import __version__
    from workbench.views.bundle import BUNDLE_FORMAT
    from workbench.cli import main

    preset = yaml.safe_load(write_preset([{"name": "fp32", "method": "fp32"}], name="foreign").read_text())
    preset["trust_remote_code"] = True
    bundle = tmp_path / "foreign.zip"
    with zipfile.ZipFile(bundle, "w") as archive:
        archive.writestr("bundle.json", json.dumps({"format": BUNDLE_FORMAT, "workbench": __version__, "run_id": "x"}))
        archive.writestr("preset.yaml", yaml.safe_dump(preset))
        archive.writestr("results.json", "{}")
        archive.writestr("eval_tokens.json", "[]")
    assert main(["reproduce", str(bundle)]) == 2
    out, err = capsys.readouterr()
    assert "the bundle's preset" in out and f"model: {preset['model']}" in out and "trust_remote_code: true" in out
    assert err.splitlines() == [f"error: model: local path {preset['model']} is refused (pass --allow-paths if you trust the bundle)",
                                "error: trust_remote_code: true is refused for a bundle from elsewhere; pass "
                                "--trust-remote-code if you trust the model's code"]


def test_local_folder_with_only_pickled_weights_needs_allow_pickle(tiny_model_dir, tmp_path) -> None:
    import shutil

    from workbench.data.sources import resolve_source

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, folder)
    weights = next(folder.glob("*.safetensors"))
    weights.rename(folder / "pytorch_model.bin")
    with pytest.raises(WorkbenchError, match=r"holds only pickled weights \(pytorch_model.bin\).*'allow_pickle: true'"):
        resolve_source(str(folder))
    assert resolve_source(str(folder), allow_pickle=True).kind == "local"


def test_cli_run_applies_the_shared_gate_too(tmp_path, monkeypatch, capsys) -> None:
    from workbench.cli import main

    monkeypatch.setenv("WORKBENCH_SHARED", "1")
    path = tmp_path / "p.yaml"
    path.write_text(preset_text(base(eval={"text": "/etc/passwd", "max_tokens": 256, "context": 128, "stride": 128})))
    assert main(["run", str(path)]) == 2
    assert main(["run", str(tmp_path / "p.yaml"), "--trust-remote-code"]) == 2
    err = capsys.readouterr().err
    assert err.count("eval.text: local paths are disabled in shared mode (/etc/passwd)") == 2
    assert "error: trust_remote_code: true is refused in shared mode" in err


def hostile_yaml() -> list[tuple[str, str, dict[str, str], str]]:
    """The corpus as YAML text, for the app tests."""
    return [(name, preset_text(copy.deepcopy(data)), extra, message) for name, data, extra, message in HOSTILE]
