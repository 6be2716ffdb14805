"""Shared set-up for the benchmarks: the preset's model, its eval token ids, and built artifacts."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def prepared(preset_path: str) -> tuple[Any, Any, list[int]]:
    """(preset, source, eval token ids) exactly as a run would tokenize them."""
    from transformers import AutoTokenizer

    from workbench.data.evaltext import eval_text, eval_token_ids
    from workbench.config.presets import load_preset
    from workbench.data.sources import resolve_source

    preset = load_preset(preset_path)
    source = resolve_source(preset.model)
    tokenizer = AutoTokenizer.from_pretrained(source.hf_dir)
    tokens = eval_token_ids(tokenizer, eval_text(preset.eval.text)[0], preset.eval.max_tokens, preset.eval.context)
    return preset, source, tokens


def built_artifact(source: Any, method: str, options: dict, threads: int) -> Path:
    """The artifact a run would build (and cache) for one method."""
    from workbench.running.handoff import BuildRequest, BuildResult
    from workbench.running.worker import build_artifact

    request = BuildRequest(stages=[{"method": method, "options": options}], source_dir=str(source.hf_dir),
                           source_fingerprint=source.fingerprint,
                           source_gguf=str(source.gguf_file) if source.gguf_file else None, threads=threads,
                           device="cpu", trust_remote_code=False)
    return Path(BuildResult.from_payload(build_artifact(request.to_payload(), lambda _m: None)).artifact_path)
