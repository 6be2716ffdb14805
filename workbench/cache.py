"""Content-checked folder cache for converted sources and built artifacts.

Each entry is a folder named by a hash of what produced it, holding `manifest.json` with the size
and sha256 of every file. An entry whose files no longer match (a truncated download, a disk error,
a hand edit) is rebuilt instead of being measured, and the rebuild is announced.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

MANIFEST = "manifest.json"


def key_hash(material: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:24]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def folder_files(folder: Path) -> dict[str, dict[str, Any]]:
    return {
        str(path.relative_to(folder)): {"size": path.stat().st_size, "sha256": file_sha256(path)}
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }


def folder_bytes(folder: Path) -> int:
    """Bytes of every file under `folder` except the cache's own manifest."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def corruption(folder: Path) -> str | None:
    """Why a cache entry cannot be trusted, or None when every file matches its manifest."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return "its manifest is missing (an interrupted build?)"
    try:
        expected = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError):
        return "its manifest is unreadable"
    for rel, meta in expected.items():
        path = folder / rel
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != meta["size"]:
            return f"{rel} has {path.stat().st_size} bytes, expected {meta['size']}"
        if file_sha256(path) != meta["sha256"]:
            return f"{rel} does not match its checksum"
    return None


def cached_folder(
    root: Path,
    key: str,
    build: Callable[[Path], None],
    material: dict[str, Any],
    use_cache: bool = True,
    emit: Callable[[str], None] = lambda _m: None,
) -> tuple[Path, bool]:
    """Return (folder, was_cached). `build(tmp_dir)` fills a fresh folder that is then published atomically."""
    target = root / key
    if target.exists():
        reason = corruption(target) if use_cache else "--no-cache was given"
        if reason is None:
            return target, True
        emit(f"rebuilding cache entry {key}: {reason}")
        shutil.rmtree(target)
    tmp = root / f"{key}.tmp-{os.getpid()}-{time.monotonic_ns()}"
    tmp.mkdir(parents=True)
    try:
        build(tmp)
        manifest = {"files": folder_files(tmp), "material": material, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if target.exists():  # another process published the same entry meanwhile
            shutil.rmtree(tmp)
        else:
            try:
                tmp.rename(target)
            except OSError:  # lost the race to a concurrent build (a sweep's runs share the cache): keep theirs
                if not target.exists():
                    raise
                shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target, False
