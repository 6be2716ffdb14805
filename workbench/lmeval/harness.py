"""Run lm-eval tasks on an already loaded variant and return flat `lm_eval.<task>.<metric>` figures.

The variant supplies its lm-eval model (`Variant.lm_eval_model`: lm-eval's own HFLM around a loaded
torch model, the workbench's adapter for llama.cpp), so nothing loads twice. A failure inside lm-eval
(a task that needs a hub offline, a runtime without an lm-eval model) leaves only these metrics null,
with the reason, never the variant.
"""

from __future__ import annotations

import os
from typing import Any

from workbench.runtimes.base import Variant


def task_specs(names: list[str]) -> list[Any]:
    """Local task configs for local names; other names pass through for lm-eval to resolve (hub tasks)."""
    from workbench.lmeval.tasks import local_task_configs

    local = local_task_configs()
    return [local.get(name, name) for name in names]


def item_correctness(samples: dict[str, list[dict]]) -> dict[str, dict[str, bool]]:
    """{task: {doc_id: correct}} from lm-eval's logged samples, by each item's `acc` (tasks without it are left out).

    The per-item results are what flips and McNemar's test pair across variants (metrics/agreement.py).
    """
    items: dict[str, dict[str, bool]] = {}
    for task, logged in samples.items():
        scored = {str(s["doc_id"]): bool(s["acc"]) for s in logged if isinstance(s.get("acc"), (int, float))}
        if scored:
            items[task] = scored
    return items


def run_tasks(variant: Variant, tasks: list[str], limit: int | None, batch_size: int, device: str,
              bos_id: int | None = None) -> dict[str, Any]:
    """{'lm_eval.<task>.<metric>': value, ...}, `lm_eval_items` ({task: {doc_id: correct}}) and `lm_eval_error`.

    `bos_id`: requests start with BOS (the run's BOS policy, validity.py)."""
    names = [f"lm_eval.{task}.{metric}" for task in tasks for metric in ("acc", "acc_stderr")]
    try:
        from lm_eval import simple_evaluate

        os.environ.setdefault("HF_DATASETS_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "0"))
        results = simple_evaluate(model=variant.lm_eval_model(device, batch_size, bos_id), tasks=task_specs(tasks), limit=limit,
                                  log_samples=True, bootstrap_iters=1000, random_seed=0)
    except Exception as exc:  # lm-eval's own failure: only its metrics become null
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return {**{name: None for name in names}, "lm_eval_items": {},
                "lm_eval_error": f"{type(exc).__name__}: {message}"}
    figures: dict[str, Any] = {"lm_eval_error": None, "lm_eval_items": item_correctness(results.get("samples") or {})}
    for task, values in results["results"].items():
        for key, value in values.items():
            if "," not in key or not isinstance(value, (int, float)):
                continue
            metric, _filter = key.split(",", 1)
            figures[f"lm_eval.{task}.{metric}"] = float(value)
    return figures
