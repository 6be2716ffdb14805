"""Recompute reference figures by independent code paths and say pass / FAIL per check, with its tolerance.

    python -m workbench selfcheck [--model M] [--tokens 1024] [--full]

For any model (`--model`, default the bundled one) it first asks "is this model measured correctly here?"
with the checks a run makes while preparing the source (validity.py): weights complete, tokenizer not
splitting prose into characters, a GGUF file's tokenizer agreeing with llama.cpp's own, the BOS policy,
and a baseline perplexity better than the eval text's unigram perplexity. Then:

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
from typing import Any, Callable, Sequence

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


def transformers_perplexity(model_dir: Path, ids: Sequence[int], context: int, stride: int,
                            bos_id: int | None = None) -> float:
    """The guide's recipe: labels = inputs with already-scored positions set to -100; the model's own loss.
    With `bos_id`, each window's first input token is BOS (llama-perplexity's rule; that position is never a label)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    nll, count = 0.0, 0
    for begin, end, keep in guide_windows(len(ids), context, stride):
        input_ids = torch.tensor([list(ids[begin:end])])
        labels_source = input_ids.clone()
        if bos_id is not None:
            input_ids[0, 0] = bos_id
        labels = labels_source
        labels[0, : keep - begin] = -100
        scored = int((labels[0, 1:] != -100).sum())  # the model shifts labels by one
        with torch.no_grad():
            loss = model(input_ids=input_ids, labels=labels).loss
        nll += float(loss) * scored
        count += scored
    return math.exp(nll / count)


def workbench_perplexity(runtime: str, artifact: Path, ids: Sequence[int], context: int, stride: int, threads: int,
                         bos_id: int | None = None) -> float:
    from workbench.metrics.quality import evaluate_quality
    from workbench.runtimes import load_variant

    extra = {"n_ctx": context} if runtime == "llamacpp" else {}
    variant = load_variant(runtime, name="selfcheck", artifact_path=Path(artifact), device="cpu", threads=threads,
                           trust_remote_code=False, **extra)
    try:
        return float(evaluate_quality(variant.logits, ids, context, stride, bos_id=bos_id)["perplexity"])
    finally:
        variant.close()


def perplexity_check(model_dir: Path, ids: Sequence[int], context: int, stride: int, threads: int = 2,
                     candidate: Callable[[], float] | None = None, rel_tol: float = 1e-4,
                     bos_id: int | None = None) -> Check:
    """(a): plain transformers vs the workbench's torch path; `candidate` replaces the workbench figure (tests)."""
    reference = transformers_perplexity(model_dir, ids, context, stride, bos_id)
    value = candidate() if candidate else workbench_perplexity("torch", model_dir, ids, context, stride, threads, bos_id)
    return compare("fp32 perplexity: transformers labels/loss vs workbench", reference, value, rel_tol,
                   f"{len(ids)} tokens, context {context}, stride {stride}, each token scored once (transformers "
                   f"guide convention), {'BOS first in every window' if bos_id is not None else 'no BOS'}; fp32 on CPU")


def llama_eval_perplexities(gguf: Path, ids: Sequence[int], context: int, stride: int, threads: int,
                            bos_id: int | None = None) -> tuple[float, float, int]:
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
            window = list(ids[begin:end])
            if bos_id is not None:
                window[0] = bos_id
            part, n = _nll_from_logits(logits(window), ids, begin, keep)
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


def gguf_checks(gguf: Path, hf_dir: Path, ids: Sequence[int], context: int, stride: int, threads: int,
                bos_id: int | None = None) -> list[Check]:
    """(b): llama-cpp-python's public eval API vs the workbench's llama.cpp runtime, on the same token ids."""
    import tempfile

    from workbench.data.gguf_info import GGUF_NAME

    guide, convention, count = llama_eval_perplexities(gguf, ids, context, stride, threads, bos_id)
    with tempfile.TemporaryDirectory() as scratch:  # a llama.cpp artifact folder: the file (linked) + tokenizer
        folder = Path(scratch)
        (folder / GGUF_NAME).symlink_to(Path(gguf).resolve())
        (folder / "runtime.json").write_text('{"n_gpu_layers": 0}')
        for path in Path(hf_dir).iterdir():  # tokenizer and config files, never the weights
            if path.suffix in (".json", ".jinja", ".txt", ".model") and path.name != "manifest.json":
                (folder / path.name).symlink_to(path)
        value = workbench_perplexity("llamacpp", folder, ids, context, stride, threads, bos_id)
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
    from workbench.data.sources import hub_reachable

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


def validity_checks(source: Any, tokens: int, trust_remote_code: bool, emit: Emit) -> tuple[list[Check], Any, list[int]]:
    """The checks a run makes while preparing this source (validity.py), as pass / FAIL lines.

    Returns the checks, the BOS policy (None when a check failed before it could be decided) and the eval ids."""
    from transformers import AutoTokenizer

    from workbench.data import validity
    from workbench.errors import SourceError
    from workbench.data.evaltext import pydoc_eval_text
    from workbench.data.gguf_info import gguf_metadata

    checks: list[Check] = []
    emit("weights: loading once with transformers' loading report")
    try:
        validity.check_weights(source.hf_dir, source.spec, trust_remote_code)
        checks.append(Check("weights complete", "pass", None, None, "no missing weight",
                            "every weight the causal-LM class needs is in the checkpoint"))
    except SourceError as exc:
        return [*checks, Check("weights complete", "FAIL", None, None, "no missing weight", str(exc))], None, []
    tokenizer = AutoTokenizer.from_pretrained(source.hf_dir, trust_remote_code=trust_remote_code)
    ids = list(tokenizer(pydoc_eval_text(), add_special_tokens=False)["input_ids"][:tokens])
    text = tokenizer.decode(ids)
    density = validity.chars_per_token(text, len(ids))
    checks.append(Check("tokenizer density", "pass" if density >= validity.MIN_CHARS_PER_TOKEN else "FAIL",
                        validity.MIN_CHARS_PER_TOKEN, density, f"at least {validity.MIN_CHARS_PER_TOKEN} characters per token",
                        f"{len(text)} characters of English prose in {len(ids)} tokens"))
    metadata = None
    if source.gguf_file:
        agreement = validity.gguf_tokenizer_agreement(Path(source.gguf_file), text, ids)
        fraction = agreement["matching_fraction"]
        checks.append(Check("tokenizer agrees with the GGUF file's own (llama.cpp)",
                            "pass" if fraction is not None and fraction >= validity.MIN_TOKENIZER_AGREEMENT else "FAIL",
                            validity.MIN_TOKENIZER_AGREEMENT, fraction, f"matching fraction >= {validity.MIN_TOKENIZER_AGREEMENT}",
                            agreement["error"] or f"{agreement['hf_tokens']} workbench ids vs {agreement['gguf_tokens']} llama.cpp ids"))
        metadata = gguf_metadata(Path(source.gguf_file))
    bos = validity.bos_policy(tokenizer, metadata)
    checks.append(Check("BOS policy", "info", None, float(bos.add_bos), "—",
                        f"{'BOS first in every window' if bos.add_bos else 'no BOS'} because {bos.reason}"))
    return checks, bos, ids


def run_selfcheck(tokens: int = 1024, full: bool = False, emit: Emit = print, threads: int = 2, model: str | None = None,
                  trust_remote_code: bool = False) -> list[Check]:
    import torch

    from workbench.data.sources import BUNDLED, resolve_source
    from workbench.data.validity import unigram_perplexity

    torch.set_num_threads(threads)
    emit(f"preparing {model or 'the bundled model'} (a GGUF file is converted to fp32 once)")
    source = resolve_source(model or BUNDLED, trust_remote_code, emit=emit)
    checks, bos, ids = validity_checks(source, tokens, trust_remote_code, emit)
    if bos is None or any(c.status == "FAIL" for c in checks):
        return checks  # the figures below would be meaningless for this model
    context, stride = min(512, len(ids)), min(256, len(ids))  # overlapping windows: scoring each token once is exercised
    emit("(a) fp32 perplexity, two ways")
    fp32 = perplexity_check(source.hf_dir, ids, context, stride, threads, bos_id=bos.bos_id)
    checks.append(fp32)
    unigram = unigram_perplexity(ids)
    checks.append(Check("baseline perplexity below the eval text's unigram perplexity",
                        "pass" if fp32.value is not None and fp32.value < unigram else "FAIL", unigram, fp32.value,
                        "workbench < reference", "a model that predicts the text does far better than its own token "
                        "frequencies; one that does worse has a wrong tokenizer, untrained weights or a missing BOS"))
    if source.gguf_file:
        emit("(b) the GGUF file, two ways")
        try:
            checks += gguf_checks(source.gguf_file, source.hf_dir, ids, context, stride, threads, bos.bos_id)
        except ImportError as exc:
            checks.append(Check("GGUF perplexity", "skipped", None, None, "—", f"llama-cpp-python is unavailable ({exc})"))
    if model is None:
        emit("(c) published gpt2-large figure")
        checks.append(gpt2_large_check(full, emit, threads))
    return checks
