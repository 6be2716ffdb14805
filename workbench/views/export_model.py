"""`python -m workbench export-model RUN_ID VARIANT --out DIR [--max-shard-size 200MB]`: a stored torch
variant saved as safetensors shards with an index (`model.safetensors.index.json`), plus its tokenizer,
so it can be shared or loaded by plain transformers.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from workbench.errors import WorkbenchError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(KB|MB|GB|KIB|MIB|GIB)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> str:
    """Check a shard size such as 200MB / 1GB / 500MiB and return it in the form transformers takes."""
    match = _SIZE.match(text)
    if not match or float(match.group(1)) <= 0:
        raise WorkbenchError(f"--max-shard-size must look like 200MB, 1GB or 500MiB: got '{text}'")
    return f"{match.group(1)}{(match.group(2) or 'MB').upper()}"


def export_model(run: dict, variant_name: str, out_dir: Path, max_shard_size: str = "200MB") -> dict:
    """Save the variant's model as sharded safetensors in `out_dir`; return the index's summary."""
    from workbench.methods.base import custom_loader
    from workbench.runtimes import load_variant

    records = {v["name"]: v for v in run["variants"]}
    if variant_name not in records:
        raise WorkbenchError(f"run {run['run_id']} has no variant '{variant_name}' (it has {', '.join(records)})")
    record = records[variant_name]
    if record["status"] != "ok" or not record.get("artifact_path"):
        raise WorkbenchError(f"variant '{variant_name}' did not finish ({record['status']}): nothing to export")
    artifact = Path(record["artifact_path"])
    if not artifact.is_dir():
        raise WorkbenchError(f"the artifact of '{variant_name}' ({artifact}) is no longer in the cache; rerun the preset")
    if (record.get("runtime") or {}).get("name") == "llamacpp":
        raise WorkbenchError(f"'{variant_name}' is a GGUF file for llama.cpp, not a torch model: copy "
                             f"{next(artifact.glob('*.gguf'), artifact)} instead")
    if custom_loader(artifact) is not None:
        raise WorkbenchError(f"'{variant_name}' is stored in a workbench layout (low-rank factors or k-means codebooks) "
                             "that plain transformers cannot load; export a torch variant with standard layers")
    size = parse_size(max_shard_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    if any(out_dir.iterdir()):
        raise WorkbenchError(f"{out_dir} is not empty; choose a new folder")
    variant = load_variant("torch", name=variant_name, artifact_path=artifact, device="cpu", threads=1)
    variant.model.save_pretrained(out_dir, max_shard_size=size, safe_serialization=True)
    variant.tokenizer.save_pretrained(out_dir)
    variant.close()
    index_path = out_dir / "model.safetensors.index.json"
    shards = sorted(p.name for p in out_dir.glob("*.safetensors"))
    total = json.loads(index_path.read_text())["metadata"].get("total_size") if index_path.is_file() else None
    return {"out_dir": str(out_dir), "shards": shards, "index": index_path.name if index_path.is_file() else None,
            "total_size": total}


