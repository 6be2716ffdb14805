"""Evaluation and calibration text, tokenized once by the source's tokenizer.

Offline text is the English prose every Python ships in `pydoc_data.topics`, split by topic:
- evaluation: the first EVAL_TOPICS topics in sorted key order, joined by blank lines;
- calibration (for methods that need data): the later topics' paragraphs, leaving out any paragraph
  the evaluation text holds too (several topics repeat paragraphs of others), so the two never
  share a paragraph.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from workbench.errors import EvalTextError

EVAL_TOPICS = 40
PYDOC_DESCRIPTION = (
    f"pydoc_data.topics: topics 0-{EVAL_TOPICS - 1} in sorted key order joined by blank lines "
    "(calibration uses the later topics)"
)


def _pydoc_topics() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[key].strip() for key in sorted(topics)]


def pydoc_eval_text() -> str:
    return "\n\n".join(_pydoc_topics()[:EVAL_TOPICS])


def pydoc_calibration_text() -> str:
    """Later topics' paragraphs, minus any paragraph the eval text also holds (some topics repeat others)."""
    taken = {p.strip() for p in pydoc_eval_text().split("\n\n")}
    paragraphs = [p.strip() for topic in _pydoc_topics()[EVAL_TOPICS:] for p in topic.split("\n\n")]
    return "\n\n".join(p for p in paragraphs if p and p not in taken)


def eval_text(spec: str) -> tuple[str, str]:
    """(text, description) for an eval.text setting: 'pydoc', 'wikitext2' or a file path."""
    if spec == "pydoc":
        return pydoc_eval_text(), PYDOC_DESCRIPTION
    if spec == "wikitext2":
        return _wikitext2(), "WikiText-2 raw v1, test split, lines joined by newlines"
    path = Path(spec).expanduser()
    if not path.is_file():
        raise EvalTextError(f"eval.text must be 'pydoc', 'wikitext2' or a text file; {spec} does not exist")
    try:
        return path.read_text(encoding="utf-8"), f"file {path}"
    except UnicodeDecodeError:
        raise EvalTextError(f"eval text file {path} is not UTF-8 text") from None


def _wikitext2() -> str:
    try:
        from datasets import load_dataset

        rows = load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
    except Exception as exc:
        raise EvalTextError(
            f"WikiText-2 is unavailable here ({type(exc).__name__}); it needs the 'datasets' package and a "
            "reachable hub. Use eval.text: pydoc for the offline text"
        ) from None
    return "\n".join(rows["text"])


def eval_token_ids(tokenizer: Any, text: str, max_tokens: int, context: int) -> list[int]:
    """The scored token ids: the text tokenized without special tokens, cut to max_tokens."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])[:max_tokens]
    if len(ids) < context:
        raise EvalTextError(
            f"the eval text has {len(ids)} tokens, fewer than one window (eval.context={context}); "
            "lower eval.context or use a longer text"
        )
    return ids
