"""Reproducibility bundles: pack a run so someone else can rerun it and compare figure by figure.

    python -m workbench bundle RUN_ID --out run.zip
    python -m workbench reproduce run.zip

A bundle holds `bundle.json` (format, workbench version), `preset.yaml`, `results.json` (with the
environment and protocol) and `eval_tokens.json`. `reproduce` reruns the preset here, checks the
eval tokens are the same ids, and compares every figure: quality figures must match tightly,
timings and process memory loosely (they depend on the machine and its load).
"""

from __future__ import annotations

import json
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from workbench import __version__
from workbench.errors import WorkbenchError

BUNDLE_FORMAT = 1

# metric -> relative tolerance. Quality figures come from deterministic CPU kernels on the same ids.
TIGHT = 1e-6
TOLERANCES: dict[str, float] = {
    **{m: TIGHT for m in ("perplexity", "kld_mean", "kld_p99", "top1_agreement", "sparsity", "weight_bytes", "disk_bytes")},
    "delta_p_mean": 1e-4,  # a mean of signed differences near 0: relative error is ill-conditioned
    **{m: 0.5 for m in ("load_s", "ttft_s", "prefill_tok_s", "decode_tok_s", "peak_rss_bytes")},
}


def write_bundle(run: dict[str, Any], run_dir: Path, out: Path) -> Path:
    tokens = run_dir / "eval_tokens.json"
    if not tokens.is_file():
        raise WorkbenchError(f"run {run['run_id']} has no eval_tokens.json in {run_dir}; it cannot be bundled")
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("bundle.json", json.dumps({"format": BUNDLE_FORMAT, "workbench": __version__,
                                                    "run_id": run["run_id"]}))
        archive.writestr("preset.yaml", yaml.safe_dump(run["preset"], sort_keys=False))
        archive.writestr("results.json", json.dumps(run, indent=1))
        archive.write(tokens, "eval_tokens.json")
        report = run_dir / "report.html"
        if report.is_file():
            archive.write(report, "report.html")
    return out


def read_bundle(path: Path) -> tuple[dict[str, Any], dict[str, Any], list[int]]:
    """(preset dict, original run, eval token ids); refuses bundles this version cannot read."""
    if not zipfile.is_zipfile(path):
        raise WorkbenchError(f"{path} is not a reproducibility bundle (not a zip file)")
    with zipfile.ZipFile(path) as archive:
        names = set(archive.namelist())
        missing = {"bundle.json", "preset.yaml", "results.json", "eval_tokens.json"} - names
        if missing:
            raise WorkbenchError(f"{path} is not a complete bundle: missing {', '.join(sorted(missing))}")
        meta = json.loads(archive.read("bundle.json"))
        if meta.get("format") != BUNDLE_FORMAT:
            raise WorkbenchError(
                f"{path} is bundle format {meta.get('format')} from workbench {meta.get('workbench')}; this is "
                f"workbench {__version__}, which reads format {BUNDLE_FORMAT} only"
            )
        return (yaml.safe_load(archive.read("preset.yaml")), json.loads(archive.read("results.json")),
                json.loads(archive.read("eval_tokens.json")))


@dataclass
class Comparison:
    variant: str
    metric: str
    original: float | None
    new: float | None
    tolerance: float

    @property
    def ok(self) -> bool:
        if self.original is None or self.new is None:
            return self.original is None and self.new is None
        scale = max(abs(self.original), 1e-12)
        return abs(self.new - self.original) <= self.tolerance * scale or (
            self.metric == "delta_p_mean" and abs(self.new - self.original) <= self.tolerance
        )


def compare_runs(original: dict[str, Any], new: dict[str, Any]) -> list[Comparison]:
    rows = []
    new_records = {r["name"]: r for r in new["variants"]}
    for record in original["variants"]:
        again = new_records.get(record["name"], {"metrics": {}})
        for metric, tolerance in TOLERANCES.items():
            if metric in record["metrics"]:
                rows.append(Comparison(record["name"], metric, record["metrics"][metric],
                                       again["metrics"].get(metric), tolerance))
    return rows


def reproduce(path: Path, out_dir: Path | None = None, on_event=lambda _e: None, allow_paths: bool = False,
              trust_remote_code: bool = False, show=lambda _text: None) -> tuple[list[Comparison], list[str]]:
    """Rerun a bundle here; return the figure comparisons and notes (tokens, model, environment).

    The bundle comes from someone else: its preset is shown (`show`) and passes the policy gate in
    bundle mode, so its local paths and remote code run only with `allow_paths` / `trust_remote_code`."""
    from workbench.config.policy import bundle_mode, enforce
    from workbench.config.presets import dump_preset, parse_preset
    from workbench.running.runner import Runner

    preset_data, original, tokens = read_bundle(path)
    preset = parse_preset(preset_data, f"{path}:preset.yaml")
    show(f"the bundle's preset ({path}):\n{dump_preset(preset).rstrip()}")
    enforce(preset, bundle_mode(allow_paths, trust_remote_code))
    with tempfile.TemporaryDirectory() as scratch:
        runner = Runner(preset, out_dir=out_dir or Path(scratch) / "run", on_event=on_event)
        new = runner.run()
        new_tokens = json.loads((runner.out_dir / "eval_tokens.json").read_text())
    notes = []
    if new_tokens != tokens:
        same = sum(a == b for a, b in zip(tokens, new_tokens))
        notes.append(f"eval tokens differ: {same} of {len(tokens)} ids match (tokenizer or text changed)")
    if new["model"]["fingerprint"] != original["model"]["fingerprint"]:
        notes.append(f"model fingerprint differs: {original['model']['fingerprint']} then, {new['model']['fingerprint']} now")
    for key in ("torch", "transformers", "bitsandbytes", "cpu", "threads"):
        if original["environment"].get(key) != new["environment"].get(key):
            notes.append(f"environment {key}: {original['environment'].get(key)} then, {new['environment'].get(key)} now")
    return compare_runs(original, new), notes
