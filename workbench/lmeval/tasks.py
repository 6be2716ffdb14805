"""Offline lm-eval tasks built from text Python ships, with their construction recipe.

`pydoc_lastword`: last-word prediction as 4-way multiple choice. From the *evaluation* topics of
`pydoc_data.topics` (so calibration text stays disjoint), take prose sentences of 8-40 words
ending in an alphabetic word of 4+ letters; the context is the sentence without its last word,
the choices are the true word and three other sentences' last words, shuffled with a fixed seed.

Rebuild the shipped JSONL (deterministic) with:

    python -m workbench.lmeval.tasks
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

TASK_DIR = Path(__file__).parent
SEED = 1234
ITEMS = 200
_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_ENDING = re.compile(r"^(?P<context>.+) (?P<word>[A-Za-z]{4,})\.$")


def build_pydoc_lastword(items: int = ITEMS, seed: int = SEED) -> list[dict[str, Any]]:
    from workbench.data.evaltext import pydoc_eval_text

    candidates: dict[str, tuple[str, str]] = {}
    for paragraph in pydoc_eval_text().split("\n\n"):
        if paragraph.startswith((" ", "\t")) or "\n   " in paragraph:  # code blocks and tables are not prose
            continue
        for sentence in _SENTENCE.split(" ".join(paragraph.split())):
            match = _ENDING.match(sentence)
            if match and 8 <= len(sentence.split()) <= 40 and not any(c in sentence for c in "*`|=>"):
                candidates.setdefault(sentence, (match["context"], match["word"]))
    rng = random.Random(seed)
    pool = sorted(candidates.values())
    rng.shuffle(pool)
    words = sorted({word for _, word in pool})
    docs = []
    for context, word in pool[:items]:
        distractors = rng.sample([w for w in words if w.lower() != word.lower()], 3)
        choices = [word, *distractors]
        rng.shuffle(choices)
        docs.append({"context": context, "choices": [" " + c + "." for c in choices], "gold": choices.index(word)})
    return docs


def local_task_configs() -> dict[str, dict[str, Any]]:
    """Task name -> lm-eval task config dict (data from the JSONL shipped beside this file)."""
    return {
        "pydoc_lastword": {
            "task": "pydoc_lastword",
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(TASK_DIR / "pydoc_lastword.jsonl")}},
            "test_split": "test",
            "output_type": "multiple_choice",
            "doc_to_text": "{{context}}",
            "doc_to_choice": "{{choices}}",
            "doc_to_target": "{{gold}}",
            "target_delimiter": "",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1.0},
        }
    }


def main() -> None:
    docs = build_pydoc_lastword()
    path = TASK_DIR / "pydoc_lastword.jsonl"
    path.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    print(f"wrote {len(docs)} items to {path}")


if __name__ == "__main__":
    main()
