"""Recompute reference figures by independent code paths and say pass / FAIL per check, with its tolerance.

    python -m workbench selfcheck [--tokens 1024] [--full]

(a) perplexity of the bundled model's fp32 folder: plain transformers (`model(ids, labels=...)`, windows
    as in the transformers perplexity guide) vs the workbench's TorchVariant + metrics.quality path;
(b) the bundled GGUF file as shipped: llama-cpp-python's own `Llama.eval` + `scores` (its public API,
    numpy log-softmax, the guide's windows) vs the workbench's llama.cpp runtime + metrics.quality.
    llama-cpp-python does not expose llama.cpp's `llama-perplexity` tool, so its convention (chunks of
    n_ctx, BOS first when the vocabulary adds one, only the second half of each chunk scored) is
    computed from the same logits and printed for reference, not compared (different windows);
(c) gpt2-large on WikiText-2 (test split joined by blank lines, context 1024, stride 512) against the
    16.44 published in the transformers perplexity guide: needs a hub, and runs on a GPU or with --full.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

Emit = Callable[[str], None]
GPT2_LARGE_PUBLISHED = 16.44  # huggingface.co/docs/transformers/perplexity (older versions of the page: 16.45)


@dataclass
class Check:
    name: str
    status: str  # pass | FAIL | skipped | info
    reference: float | None
    value: float | None
    tolerance: str
    detail: str

    def line(self) -> str:
        if self.status == "info":
            return f"[   info] {self.name}: {self.value:.6g}. {self.detail}"
        ref = "—" if self.reference is None else f"{self.reference:.6g}"
        val = "—" if self.value is None else f"{self.value:.6g}"
        return f"[{self.status:>7}] {self.name}: reference {ref}, workbench {val} (tolerance {self.tolerance}). {self.detail}"


def compare(name: str, reference: float, value: float, rel_tol: float, detail: str) -> Check:
    ok = math.isfinite(value) and abs(value - reference) <= rel_tol * abs(reference)
    return Check(name, "pass" if ok else "FAIL", reference, value, f"relative {rel_tol:g}", detail)


def guide_windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first label kept) as in the transformers perplexity guide's loop (written independently)."""
    windows, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + context, n_tokens)
        windows.append((begin, end, max(prev_end, begin)))  # labels before prev_end were scored already
        prev_end = end
        if end == n_tokens:
            break
    return windows


def _nll_from_logits(logits: np.ndarray, ids: Sequence[int], begin: int, keep_from: int) -> tuple[float, int]:
    """Sum of -log p(ids[t]) for t > begin and t >= keep_from, from a window's logits (position p predicts p + 1)."""
    logits = np.asarray(logits, dtype=np.float64)
    shift = logits[:-1]
    log_z = np.log(np.exp(shift - shift.max(-1, keepdims=True)).sum(-1)) + shift.max(-1)
    targets = np.asarray(ids[begin + 1 : begin + len(logits)])
    positions = np.arange(begin + 1, begin + len(logits))
    mask = positions >= keep_from
    nll = (log_z - shift[np.arange(len(targets)), targets])[mask]
    return float(nll.sum()), int(mask.sum())


def transformers_perplexity(model_dir: Path, ids: Sequence[int], context: int, stride: int) -> float:
    """The guide's recipe: labels = inputs with already-scored positions set to -100; the model's own loss."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    nll, count = 0.0, 0
    for begin, end, keep in guide_windows(len(ids), context, stride):
        input_ids = torch.tensor([list(ids[begin:end])])
        labels = input_ids.clone()
        labels[0, : keep - begin] = -100
        scored = int((labels[0, 1:] != -100).sum())  # the model shifts labels by one
        with torch.no_grad():
            loss = model(input_ids=input_ids, labels=labels).loss
        nll += float(loss) * scored
        count += scored
    return math.exp(nll / count)


def workbench_perplexity(runtime: str, artifact: Path, ids: Sequence[int], context: int, stride: int, threads: int) -> float:
    from workbench.metrics.quality import evaluate_quality
    from workbench.runtimes import load_variant

    extra = {"n_ctx": context} if runtime == "llamacpp" else {}
    variant = load_variant(runtime, name="selfcheck", artifact_path=Path(artifact), device="cpu", threads=threads,
                           trust_remote_code=False, **extra)
    try:
        return float(evaluate_quality(variant.logits, ids, context, stride)["perplexity"])
    finally:
        variant.close()


def perplexity_check(model_dir: Path, ids: Sequence[int], context: int, stride: int, threads: int = 2,
                     candidate: Callable[[], float] | None = None, rel_tol: float = 1e-4) -> Check:
    """(a): plain transformers vs the workbench's torch path; `candidate` replaces the workbench figure (tests)."""
    reference = transformers_perplexity(model_dir, ids, context, stride)
    value = candidate() if candidate else workbench_perplexity("torch", model_dir, ids, context, stride, threads)
    return compare("fp32 perplexity: transformers labels/loss vs workbench", reference, value, rel_tol,
                   f"{len(ids)} tokens, context {context}, stride {stride}, each token scored once (transformers "
                   "guide convention); fp32 on CPU")


def llama_eval_perplexities(gguf: Path, ids: Sequence[int], context: int, stride: int, threads: int) -> tuple[float, float, int]:
    """(guide-window perplexity, llama-perplexity-convention perplexity, its scored tokens) via Llama.eval + scores."""
    from llama_cpp import Llama

    llm = Llama(str(gguf), n_ctx=context, n_batch=context, logits_all=True, n_threads=threads,
                n_threads_batch=threads, verbose=False)
    try:
        def logits(window: Sequence[int]) -> np.ndarray:
            llm.reset()
            llm.eval(list(window))
            return np.array(llm.scores[: len(window)])

        nll, count = 0.0, 0
        for begin, end, keep in guide_windows(len(ids), context, stride):
            part, n = _nll_from_logits(logits(ids[begin:end]), ids, begin, keep)
            nll, count = nll + part, count + n
        guide = math.exp(nll / count)
        # llama-perplexity: non-overlapping chunks of n_ctx, BOS in place of each chunk's first token when the
        # vocabulary adds one, tokens after the first half of the chunk scored.
        bos = llm.token_bos() if str(llm.metadata.get("tokenizer.ggml.add_bos_token", "false")).lower() == "true" else None
        nll, count, first = 0.0, 0, context // 2
        for start in range(0, len(ids) - context + 1, context):
            chunk = list(ids[start : start + context])
            if bos is not None:
                chunk[0] = bos
            part, n = _nll_from_logits(logits(chunk), chunk, 0, first + 1)
            nll, count = nll + part, count + n
        return guide, (math.exp(nll / count) if count else float("nan")), count
    finally:
        llm.close()


def gguf_checks(gguf: Path, hf_dir: Path, ids: Sequence[int], context: int, stride: int, threads: int) -> list[Check]:
    """(b): llama-cpp-python's public eval API vs the workbench's llama.cpp runtime, on the same token ids."""
    import tempfile

    from workbench.gguf_info import GGUF_NAME

    guide, convention, count = llama_eval_perplexities(gguf, ids, context, stride, threads)
    with tempfile.TemporaryDirectory() as scratch:  # a llama.cpp artifact folder: the file (linked) + tokenizer
        folder = Path(scratch)
        (folder / GGUF_NAME).symlink_to(Path(gguf).resolve())
        (folder / "runtime.json").write_text('{"n_gpu_layers": 0}')
        for path in Path(hf_dir).iterdir():  # tokenizer and config files, never the weights
            if path.suffix in (".json", ".jinja", ".txt", ".model") and path.name != "manifest.json":
                (folder / path.name).symlink_to(path)
        value = workbench_perplexity("llamacpp", folder, ids, context, stride, threads)
    return [
        compare(f"GGUF {Path(gguf).name} perplexity: Llama.eval + scores vs workbench llama.cpp runtime", guide, value,
                1e-3, f"{len(ids)} tokens, context {context}, stride {stride}, guide windows, HF token ids; llama.cpp "
                "may split reductions differently between its batch paths"),
        Check("same file by llama-perplexity's convention", "info", None, convention, "—",
              f"chunks of {context}, BOS first if the vocabulary adds one, second half scored ({count} tokens): "
              "comparable with llama.cpp's own tool, not with the windows above"),
    ]


def gpt2_large_check(full: bool, emit: Emit, threads: int) -> Check:
    """(c): the published gpt2-large WikiText-2 figure through the workbench's torch path."""
    from workbench.sources import hub_reachable

    name = "gpt2-large WikiText-2 (context 1024, stride 512) vs the transformers guide"
    tolerance = "absolute 0.05"
    if not hub_reachable():
        return Check(name, "skipped", GPT2_LARGE_PUBLISHED, None, tolerance,
                     "no hub is reachable (offline or HF_HUB_OFFLINE=1): gpt2-large and WikiText-2 cannot be fetched")
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not full:
        return Check(name, "skipped", GPT2_LARGE_PUBLISHED, None, tolerance,
                     "287k tokens through a 774M model takes hours on a CPU: pass --full to run it anyway")
    from datasets import load_dataset
    from huggingface_hub import snapshot_download
    from transformers import AutoTokenizer

    from workbench.metrics.quality import evaluate_quality
    from workbench.runtimes.torch import TorchVariant

    emit("downloading gpt2-large and WikiText-2 (test split)")
    folder = Path(snapshot_download("openai-community/gpt2-large", allow_patterns=["*.json", "*.safetensors", "*.txt"]))
    text = "\n\n".join(load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"])
    ids = AutoTokenizer.from_pretrained(folder)(text)["input_ids"]
    variant = TorchVariant.load("gpt2-large", folder, device, threads)
    emit(f"scoring {len(ids)} tokens on {device}")
    value = float(evaluate_quality(variant.logits, ids, 1024, 512,
                                   on_window=lambda i, n: emit(f"window {i}/{n}") if i % 50 == 0 else None)["perplexity"])
    ok = abs(value - GPT2_LARGE_PUBLISHED) <= 0.05
    return Check(name, "pass" if ok else "FAIL", GPT2_LARGE_PUBLISHED, value, tolerance,
                 f"{len(ids)} tokens (the guide's tokenization: test split joined by blank lines), fp32 on {device}")


def run_selfcheck(tokens: int = 1024, full: bool = False, emit: Emit = print, threads: int = 2) -> list[Check]:
    import torch
    from transformers import AutoTokenizer

    from workbench.evaltext import pydoc_eval_text
    from workbench.sources import BUNDLED, resolve_source

    torch.set_num_threads(threads)
    emit("preparing the bundled model (converted to fp32 once)")
    source = resolve_source(BUNDLED, emit=emit)
    ids = AutoTokenizer.from_pretrained(source.hf_dir)(pydoc_eval_text(), add_special_tokens=False)["input_ids"][:tokens]
    context, stride = 512, 256  # overlapping windows, so the scoring of each token once is exercised too
    emit("(a) fp32 perplexity, two ways")
    checks = [perplexity_check(source.hf_dir, ids, context, stride, threads)]
    emit("(b) the shipped GGUF file, two ways")
    try:
        checks += gguf_checks(source.gguf_file, source.hf_dir, ids, context, stride, threads)
    except ImportError as exc:
        checks.append(Check("GGUF perplexity", "skipped", None, None, "—", f"llama-cpp-python is unavailable ({exc})"))
    emit("(c) published gpt2-large figure")
    checks.append(gpt2_large_check(full, emit, threads))
    return checks
