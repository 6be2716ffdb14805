"""Is a model measured correctly here? Checks made while the source is prepared, and flags on records.

Every figure is relative to one baseline on one token sequence, so three things must hold before a
number can be called valid, and each is checked before any variant is built:

- weights: every weight the causal-LM class needs is in the checkpoint (an encoder checkpoint loads
  into a causal-LM class with a randomly initialised head, and its "perplexity" means nothing);
- tokenizer: the ids the workbench scores are the ids the model was trained on (for a GGUF file,
  llama.cpp's own tokenizer is the reference), and the tokenizer does not split prose into characters;
- BOS: windows start with BOS exactly when the model's metadata asks for it, as llama.cpp's
  `llama-perplexity` does.

After measuring, `sanity_flags` marks figures the workbench cannot stand behind.
"""

from __future__ import annotations

import math
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass
from difflib import SequenceMatcher
from pathlib import Path
from typing import Any, Sequence

from workbench.errors import SourceError

# A tokenizer below this many characters per token on English prose splits most characters into tokens
# of their own (SmolLM2's BPE gives about 3.9 on the pydoc eval text, a byte/character fallback about 1.0).
MIN_CHARS_PER_TOKEN = 1.5
# Below this fraction of the source tokenizer's ids reproduced by the GGUF file's own tokenizer, the two
# do not tokenize the same way, and scoring the HF ids would measure a text the model never sees.
MIN_TOKENIZER_AGREEMENT = 0.99



@dataclass(frozen=True)
class BosPolicy:
    """Whether every window (and latency prompt, lm-eval request) starts with BOS, and why."""

    add_bos: bool
    bos_id: int | None
    reason: str  # where the decision came from: the GGUF metadata, the tokenizer, or the preset

    def to_record(self) -> dict[str, Any]:
        return {"bos": self.add_bos, "bos_id": self.bos_id, "bos_reason": self.reason}


def bos_policy(tokenizer: Any, gguf_metadata: dict[str, Any] | None, setting: bool | None = None) -> BosPolicy:
    """llama.cpp adds BOS when the vocabulary says `tokenizer.ggml.add_bos_token`; a Hugging Face tokenizer
    says it by putting BOS first when it encodes with special tokens. The preset's `eval.bos` overrides both."""
    bos_id = tokenizer.bos_token_id
    if gguf_metadata is not None and gguf_metadata.get("tokenizer.ggml.bos_token_id") is not None:
        bos_id = int(gguf_metadata["tokenizer.ggml.bos_token_id"])
    if setting is not None:
        if setting and bos_id is None:
            raise SourceError("eval.bos is true but this tokenizer has no BOS token")
        return BosPolicy(setting, bos_id if setting else None, f"preset eval.bos: {str(setting).lower()}")
    if gguf_metadata is not None and "tokenizer.ggml.add_bos_token" in gguf_metadata:
        add = bool(gguf_metadata["tokenizer.ggml.add_bos_token"]) and bos_id is not None
        return BosPolicy(add, bos_id if add else None,
                         f"GGUF tokenizer.ggml.add_bos_token = {str(bool(gguf_metadata['tokenizer.ggml.add_bos_token'])).lower()}")
    if bos_id is None:
        return BosPolicy(False, None, "the tokenizer has no BOS token")
    probe = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    add = bool(probe) and probe[0] == bos_id
    return BosPolicy(add, bos_id if add else None,
                     "the tokenizer " + ("puts" if add else "does not put") + " BOS first when it encodes with special tokens")


def with_bos(ids: Sequence[int], bos_id: int | None) -> list[int]:
    """A window as llama.cpp's perplexity feeds it: its first token replaced by BOS (tools/perplexity/perplexity.cpp,
    `tokens[batch_start] = llama_vocab_bos(vocab)` when the vocabulary adds BOS). The first position of a window is
    never scored, so the scored tokens and the window length stay the same with or without BOS."""
    ids = list(ids)
    if bos_id is None or not ids:
        return ids
    return [bos_id] + ids[1:]


def unigram_perplexity(ids: Sequence[int]) -> float:
    """Perplexity of the eval text's own token frequencies (fitted on the same text, so optimistic). A language
    model that predicts this text at all does far better; one that does worse is not predicting it."""
    counts = Counter(ids)
    n = len(ids)
    entropy = -sum(c / n * math.log(c / n) for c in counts.values())
    return math.exp(entropy)


def chars_per_token(text: str, n_tokens: int) -> float:
    return len(text) / max(n_tokens, 1)


def check_token_density(text: str, ids: Sequence[int], spec: str) -> float:
    """Refuse a tokenizer that maps most characters of the prose eval text to tokens of their own."""
    density = chars_per_token(text, len(ids))
    if density < MIN_CHARS_PER_TOKEN:
        raise SourceError(
            f"{spec}: its tokenizer splits the eval text into {len(ids)} tokens for {len(text)} characters "
            f"({density:.2f} characters per token, below {MIN_CHARS_PER_TOKEN}): it treats most characters as tokens of "
            "their own, so it is not the tokenizer this model was trained with"
        )
    return density


def check_weights(hf_dir: Path, spec: str, trust_remote_code: bool) -> dict[str, Any]:
    """Load once with transformers' loading report; refuse a checkpoint lacking weights the causal-LM class needs.

    Tied weights (an output layer sharing the embedding) are not missing: transformers ties them and does not
    list them. Anything listed is initialised at random by transformers, and no figure of that model means much.
    """
    import torch
    from transformers import AutoModelForCausalLM

    # ignore_mismatched_sizes: a mismatch is reported (and refused below with the tensors named) instead of raising
    # transformers' generic "see the report above".
    model, info = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, output_loading_info=True,
                                                       ignore_mismatched_sizes=True, trust_remote_code=trust_remote_code)
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(info.get("mismatched_keys") or [])
    del model
    if mismatched:
        name, checkpoint_shape, model_shape = mismatched[0][:3]
        raise SourceError(
            f"{spec}: {len(mismatched)} weights do not have the shapes its config implies (e.g. {name}: "
            f"{tuple(checkpoint_shape)} in the checkpoint, {tuple(model_shape)} from the config); the config and "
            "the weights disagree (for a .gguf file: transformers' conversion lost a setting such as head_dim), so "
            "transformers would initialise those weights at random"
        )
    if missing:
        head = [name for name in missing if any(part in name for part in ("lm_head", "cls.", "predictions", "output"))]
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        what = "no trained language-model head" if head else "weights missing from the checkpoint"
        raise SourceError(
            f"{spec}: {what}: {len(missing)} weights the causal-LM class needs are not in the checkpoint ({shown}); "
            "transformers would initialise them at random, so no figure of this model would mean anything"
        )
    return {"missing_keys": 0, "mismatched_keys": 0, "unexpected_keys": len(info.get("unexpected_keys") or [])}


def llamacpp_tokenization(gguf_file: Path, text: str) -> tuple[list[int] | None, list[str] | None, str | None]:
    """(llama.cpp's ids for `text`, the file's token texts id by id as llama.cpp read them, error).

    Runs in a separate process: llama.cpp's tokenizer aborts the process on some vocabularies. A plain
    interpreter (spawn), not the preloaded fork server: the helper needs llama.cpp, not torch.
    """
    from workbench.process import run_in_worker

    with tempfile.TemporaryDirectory() as scratch:
        outcome = run_in_worker("workbench.runtimes.llamacpp:native_tokenize", {"gguf": str(gguf_file), "text": text},
                                Path(scratch) / "tokenize.log", start_method="spawn")
    if not outcome.ok:
        return None, None, f"llama.cpp could not tokenize the eval text with this file's vocabulary: {outcome.error}"
    return outcome.result["ids"], outcome.result["vocabulary"], None


def id_agreement(ids: Sequence[int], native: list[int] | None, error: str | None) -> dict[str, Any]:
    """How many of the workbench's ids llama.cpp's own tokenization reproduces (the record's fields)."""
    if native is None:
        return {"hf_tokens": len(ids), "gguf_tokens": None, "matching_fraction": None, "error": error}
    matcher = SequenceMatcher(None, list(ids), native, autojunk=False)
    matched = sum(block.size for block in matcher.get_matching_blocks())
    # Matched over the longer of the two: a tokenizer that splits into characters matches few of llama.cpp's ids.
    return {"hf_tokens": len(ids), "gguf_tokens": len(native), "matching_fraction": matched / max(len(ids), len(native), 1),
            "error": None}


def gguf_tokenizer_agreement(gguf_file: Path, text: str, ids: Sequence[int]) -> dict[str, Any]:
    """llama.cpp's own tokenization of `text` with the file's vocabulary, compared with the workbench's ids."""
    native, _vocabulary, error = llamacpp_tokenization(gguf_file, text)
    return id_agreement(ids, native, error)


def check_gguf_tokenizer(agreement: dict[str, Any], spec: str) -> None:
    if agreement["error"]:
        raise SourceError(f"{spec}: {agreement['error']}")
    if agreement["matching_fraction"] < MIN_TOKENIZER_AGREEMENT:
        raise SourceError(
            f"{spec}: the tokenizer transformers built from this GGUF disagrees with the file's own (llama.cpp) tokenizer: "
            f"{agreement['hf_tokens']} vs {agreement['gguf_tokens']} tokens on the eval text, "
            f"{agreement['matching_fraction']:.1%} of ids matching (at least {MIN_TOKENIZER_AGREEMENT:.0%} needed), "
            "so its figures would score a tokenization the model never sees"
        )


@dataclass(frozen=True)
class Flag:
    code: str
    message: str

    def to_record(self) -> dict[str, str]:
        return asdict(self)


def sanity_flags(record: dict[str, Any], is_baseline: bool, protocol: dict[str, Any]) -> list[dict[str, str]]:
    """Figures of an `ok` variant that the workbench cannot stand behind, each with the reason."""
    flags: list[Flag] = []
    metrics = record.get("metrics") or {}
    unigram = protocol.get("unigram_perplexity")
    if is_baseline and metrics.get("perplexity") is not None and unigram and metrics["perplexity"] > unigram:
        flags.append(Flag("implausible_perplexity",
                          f"baseline perplexity {metrics['perplexity']:.4g} is worse than {unigram:.4g}, the perplexity of "
                          "the eval text's own token frequencies: the model is not predicting this text (wrong "
                          "tokenizer, untrained weights or a missing BOS), so every figure relative to it is suspect"))
    agreement = record.get("tokenizer_agreement") or {}
    fraction = agreement.get("matching_fraction")
    if fraction is not None and fraction < MIN_TOKENIZER_AGREEMENT:
        flags.append(Flag("tokenizer_disagreement",
                          f"the GGUF file's own tokenizer reproduces only {fraction:.1%} of the scored ids (below "
                          f"{MIN_TOKENIZER_AGREEMENT:.0%}): the variant is scored on a tokenization it would not produce"))
    elif agreement.get("error"):
        flags.append(Flag("tokenizer_unchecked", agreement["error"]))
    vocab_fraction = agreement.get("vocab_matching_fraction")
    if vocab_fraction is not None and vocab_fraction < 1.0:
        flags.append(Flag("vocabulary_differs",
                          f"its vocabulary differs from the baseline's ({agreement.get('vocab_gguf')} vs "
                          f"{agreement.get('vocab_hf')} tokens, {vocab_fraction:.1%} identical): KLD, top-1 and delta-p "
                          "compare unlike tokens, so they are not computed"))
    return [flag.to_record() for flag in flags]


def display_status(record: dict[str, Any]) -> str:
    """The status a view shows: an `ok` variant with sanity flags is shown as flagged, never as plain ok."""
    return "flagged" if record.get("status") == "ok" and record.get("flags") else record.get("status", "—")


def flags_text(run: dict[str, Any]) -> str:
    """One line per flag, for the terminal and the report; empty when nothing is flagged."""
    return "\n".join(f"flagged {record['name']}: {flag['message']}"
                     for record in run.get("variants", []) for flag in record.get("flags") or [])
