"""Reuse a variant's stored figures when nothing that shaped them has changed.

A rerun of an unchanged preset on an unchanged machine and software spends most of its time recomputing
figures that cannot differ: perplexity, KLD and the rest are deterministic functions of the same weights,
tokens and code. The runner therefore stores each measured record under a key made of everything that
shaped it and, on a later run, takes the quality figures from there while timing the variant again.
Speed figures are reused only when asked (`--reuse-speed`): they depend on what else the machine is doing,
which no key can capture.

The key is strict on purpose: the source's content fingerprint, the variant's stages, the baseline's
stages (KLD and top-1 are relative to it), the eval token ids, the measuring protocol, threads and device,
the library versions and CPU (`environment.py`), and a hash of the workbench's own source files, so any
code change measures afresh.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

from workbench.cache import MANIFEST, file_sha256, key_hash
from workbench.paths import PACKAGE_DIR, workbench_home

CACHE_VERSION = 1

# Record fields that are functions of weights, tokens and code alone: taken from the stored record when
# only quality is reused. Everything else in a record (timings, peak memory, load time) is measured again.
# (Samples are generated again: a few greedy tokens, and peak memory's protocol includes them.)
QUALITY_RECORD_FIELDS = ("layers", "quality_detail", "tokenizer_agreement")
SPEED_METRICS = frozenset({
    "peak_rss_bytes", "gpu_peak_bytes", "load_s", "ttft_s", "ttft_s_min", "ttft_s_max", "prefill_tok_s",
    "decode_tok_s", "decode_tok_s_min", "decode_tok_s_max", "decode_tok_s_ci95", "ttft_s_ci95", "latency_repeats",
    "speed_noisy", "contention",
})


def is_quality_metric(name: str) -> bool:
    """Every metric that is not a speed or memory figure: sizes, sparsity, quality, lm-eval, agreement."""
    return name not in SPEED_METRICS


def code_files() -> list[Path]:
    """Every .py file of the workbench package (all subpackages: metrics, runtimes, methods, ...)."""
    return sorted(PACKAGE_DIR.rglob("*.py"))


@functools.lru_cache(maxsize=1)
def code_hash() -> str:
    """sha256 over the workbench package's .py files (paths and contents): any code change misses the cache.

    Computed once per process: the sources do not change under a running workbench."""
    digest = hashlib.sha256()
    for path in code_files():
        digest.update(str(path.relative_to(PACKAGE_DIR)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def measurement_key(material: dict[str, Any]) -> str:
    return key_hash({"cache_version": CACHE_VERSION, "code": code_hash(), **material})


def _entry_path(key: str) -> Path:
    folder = workbench_home() / "measurements"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{key}.json"


def artifact_identity(artifact_path: str | None) -> str | None:
    """What the figures were measured on: the sha256 of the artifact's cache manifest (every file's sha256 and
    its build time), or for a folder or file outside the cache (a local model measured as is) its files' names,
    sizes and modification times. A rebuilt, replaced or edited artifact has another identity, so figures
    measured on the old one are not reused for it."""
    if not artifact_path:
        return None
    path = Path(artifact_path)
    try:
        if (path / MANIFEST).is_file():
            return file_sha256(path / MANIFEST)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        stats = [(str(p.relative_to(path)) if path.is_dir() else p.name, p.stat().st_size, p.stat().st_mtime_ns)
                 for p in files]
    except OSError:
        return None
    return key_hash({"unmanaged": stats}) if stats else None


def load_entry(key: str) -> dict[str, Any] | None:
    """The stored {run_id, artifact, record} for this key when its artifact is still the one it measured;
    None otherwise (absent, unreadable, or the artifact was rebuilt or removed since: measured afresh)."""
    path = _entry_path(key)
    try:
        entry = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(entry, dict) or not isinstance(entry.get("record"), dict):
        return None
    artifact = entry.get("artifact")
    if artifact is None or artifact_identity(entry["record"].get("artifact_path")) != artifact:
        return None
    return entry


def store_entry(key: str, run_id: str, record: dict[str, Any]) -> None:
    artifact = artifact_identity(record.get("artifact_path"))
    if artifact is None:  # the artifact is gone: nothing to tie the figures to
        return
    path = _entry_path(key)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"run_id": run_id, "artifact": artifact, "record": record}))
    tmp.replace(path)


def merge_quality(fresh: dict[str, Any], stored: dict[str, Any]) -> dict[str, Any]:
    """`fresh` (timed now, quality skipped) with the stored record's quality figures and their details."""
    merged = dict(fresh)
    merged["metrics"] = {**fresh["metrics"],
                         **{k: v for k, v in stored["metrics"].items() if is_quality_metric(k)}}
    for field in QUALITY_RECORD_FIELDS:
        if field in stored:
            merged[field] = stored[field]
    return merged
