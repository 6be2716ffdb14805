"""Per-block sensitivity: an unchanged block costs exactly nothing, a changed one costs KLD."""

from __future__ import annotations

import shutil

import torch

from workbench.analysis.sensitivity import block_sensitivity, most_sensitive


def test_unchanged_block_has_zero_sensitivity(tiny_model_dir, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    changed = tmp_path / "changed"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():  # perturb block 1 only, as a compression of that block would
        for module in model.model.layers[1].modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.add_(torch.randn_like(module.weight) * module.weight.std())
    model.save_pretrained(changed)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, changed / name)

    tokens = torch.randint(0, model.config.vocab_size, (256,), generator=torch.Generator().manual_seed(0)).tolist()
    rows = block_sensitivity(str(tiny_model_dir), str(changed), tokens, context=64, stride=64)
    assert [r["block"] for r in rows] == [0, 1]
    assert rows[0]["kld_mean"] == 0.0 and rows[0]["top1_agreement"] == 1.0
    assert rows[1]["kld_mean"] > 0 and rows[0]["linears_swapped"] == rows[1]["linears_swapped"] == 7
    assert most_sensitive(rows, 1) == ["model.layers.1"]


def test_run_reports_sensitivity_and_a_mixed_precision_variant(write_preset, tmp_path) -> None:
    from workbench.config.presets import load_preset
    from workbench.running.runner import Runner

    path = write_preset([{"name": "fp32", "method": "fp32"}, {"name": "nf4", "method": "bnb-nf4"}], name="sens",
                        sensitivity={"variant": "nf4", "max_tokens": 128, "keep": 1})
    run = Runner(load_preset(path), out_dir=tmp_path / "out").run()
    sensitivity = run["sensitivity"]
    assert sensitivity["error"] is None and len(sensitivity["rows"]) == 2
    assert all(r["kld_mean"] > 0 for r in sensitivity["rows"])
    mixed = sensitivity["mixed_precision_variant"]
    assert mixed["method"] == "bnb-nf4" and mixed["options"]["skip_modules"][-1] == "lm_head"
    assert mixed["options"]["skip_modules"][0] == sensitivity["most_sensitive"][0].replace(".", "\\.") + "\\."
