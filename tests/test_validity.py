"""The validity checks on their own: BOS policy, windows with BOS, unigram perplexity, density, sanity flags."""

from __future__ import annotations

import numpy as np
import pytest

from workbench.data import validity
from workbench.errors import SourceError


class FakeTokenizer:
    """Encodes any text as [bos?] + [7]: enough to tell whether the tokenizer adds BOS."""

    def __init__(self, bos_token_id: int | None, adds_bos: bool):
        self.bos_token_id = bos_token_id
        self.adds_bos = adds_bos

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        ids = [7]
        if add_special_tokens and self.adds_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return {"input_ids": ids}


def test_bos_from_gguf_metadata_wins_over_the_tokenizer() -> None:
    metadata = {"tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.bos_token_id": 2}
    policy = validity.bos_policy(FakeTokenizer(bos_token_id=5, adds_bos=False), metadata)
    assert (policy.add_bos, policy.bos_id) == (True, 2)
    assert "tokenizer.ggml.add_bos_token = true" in policy.reason
    off = validity.bos_policy(FakeTokenizer(5, True), {"tokenizer.ggml.add_bos_token": False, "tokenizer.ggml.bos_token_id": 2})
    assert (off.add_bos, off.bos_id) == (False, None)


def test_bos_from_the_tokenizer_and_the_preset_override() -> None:
    assert validity.bos_policy(FakeTokenizer(1, True), None).bos_id == 1
    assert validity.bos_policy(FakeTokenizer(1, False), None).add_bos is False
    assert validity.bos_policy(FakeTokenizer(None, True), None).add_bos is False
    forced = validity.bos_policy(FakeTokenizer(1, False), None, setting=True)
    assert (forced.add_bos, forced.bos_id, forced.reason) == (True, 1, "preset eval.bos: true")
    assert validity.bos_policy(FakeTokenizer(1, True), None, setting=False).bos_id is None
    with pytest.raises(SourceError, match="no BOS token"):
        validity.bos_policy(FakeTokenizer(None, False), None, setting=True)


def test_with_bos_replaces_the_first_token_only() -> None:
    assert validity.with_bos([10, 11, 12], 1) == [1, 11, 12]
    assert validity.with_bos([10, 11, 12], None) == [10, 11, 12]
    assert validity.with_bos([], 1) == []


def test_unigram_perplexity_against_numpy() -> None:
    ids = [1, 1, 2, 3, 3, 3, 4, 1]
    counts = np.bincount(ids)[1:]
    p = counts / counts.sum()
    assert validity.unigram_perplexity(ids) == pytest.approx(float(np.exp(-(p * np.log(p)).sum())), rel=1e-12)
    assert validity.unigram_perplexity([5] * 10) == pytest.approx(1.0)
    assert validity.unigram_perplexity(list(range(16))) == pytest.approx(16.0)


def test_a_tokenizer_that_splits_prose_into_characters_is_refused() -> None:
    text = "Python is a programming language that lets you work quickly."
    with pytest.raises(SourceError, match="characters per token"):
        validity.check_token_density(text, list(range(len(text))), "m")
    assert validity.check_token_density(text, list(range(len(text) // 4)), "m") == pytest.approx(4.0, rel=0.05)


def _record(perplexity: float | None = 10.0, agreement: dict | None = None) -> dict:
    return {"name": "v", "status": "ok", "metrics": {"perplexity": perplexity}, "tokenizer_agreement": agreement}


def test_sanity_flags() -> None:
    protocol = {"unigram_perplexity": 500.0}
    assert validity.sanity_flags(_record(12.0), True, protocol) == []
    bad = validity.sanity_flags(_record(3550.0), True, protocol)
    assert [f["code"] for f in bad] == ["implausible_perplexity"] and "3550" in bad[0]["message"]
    assert validity.sanity_flags(_record(3550.0), False, protocol) == []  # only the baseline is judged this way
    agreement = {"matching_fraction": 0.176, "vocab_matching_fraction": 1.0, "vocab_gguf": 10, "vocab_hf": 10}
    assert [f["code"] for f in validity.sanity_flags(_record(agreement=agreement), False, protocol)] == ["tokenizer_disagreement"]
    vocab = {"matching_fraction": 1.0, "vocab_matching_fraction": 0.5, "vocab_gguf": 20, "vocab_hf": 10}
    flags = validity.sanity_flags(_record(agreement=vocab), False, protocol)
    assert [f["code"] for f in flags] == ["vocabulary_differs"] and "not computed" in flags[0]["message"]


def test_a_flagged_variant_is_never_shown_as_ok() -> None:
    record = {**_record(), "flags": [{"code": "x", "message": "why"}]}
    assert validity.display_status(record) == "flagged"
    assert validity.display_status(_record()) == "ok"
    assert validity.display_status({"status": "failed", "flags": []}) == "failed"
    assert validity.flags_text({"variants": [record]}) == "flagged v: why"


def test_failure_lines_are_never_empty() -> None:
    from workbench.process import failure_line

    def bare_assert() -> None:
        raise AssertionError()  # what a bare `assert` raises outside pytest's rewriting

    try:
        bare_assert()
    except AssertionError as exc:
        line = failure_line(exc, "perplexity window 2/8")
    assert line.startswith("AssertionError: no message, raised at test_validity.py:")
    assert line.endswith("(while perplexity window 2/8)")
    assert failure_line(ValueError("bad shape\nmore"), "loading") == "ValueError: bad shape (while loading)"


# --- Refusals of whole models, before any variant is built ---------------------------------------------------


@pytest.mark.slow
def test_encoder_checkpoint_is_refused_before_any_variant_is_built(tmp_path, write_preset) -> None:
    """A BERT folder passes transformers' causal-LM mapping (bert -> BertLMHeadModel) with a random LM head."""
    import yaml
    from transformers import BertConfig, BertModel

    from tests.architectures import trained_tokenizer
    from workbench.errors import WorkbenchError
    from workbench.paths import artifacts_dir
    from workbench.config.presets import load_preset
    from workbench.running.runner import Runner

    folder = tmp_path / "bert"
    tokenizer = trained_tokenizer(adds_bos=False)
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert (folder / "model.safetensors").is_file()
    path = write_preset([{"name": "fp32", "method": "fp32"}, {"name": "nf4", "method": "bnb-nf4"}], name="bert",
                        model=str(folder))
    before = set(artifacts_dir().glob("*")) if artifacts_dir().exists() else set()
    with pytest.raises(WorkbenchError, match="no trained language-model head: .* weights the causal-LM class needs") as info:
        Runner(load_preset(path), out_dir=tmp_path / "out").run()
    assert "\n" not in str(info.value) and "cls.predictions" in str(info.value)
    after = set(artifacts_dir().glob("*")) if artifacts_dir().exists() else set()
    assert after == before  # nothing was built
    assert yaml.safe_load(path.read_text())["model"] == str(folder)


@pytest.mark.slow
def test_gguf_whose_vocabulary_splits_prose_into_characters_is_refused(tmp_path) -> None:
    """Both tokenizers agree here (the merges are gone from the file itself): the density check refuses it."""
    from tests.architectures import ARCHS, build_hf_folder, copy_gguf_with, write_gguf
    from workbench.running.worker import prepare_source

    folder = build_hf_folder(ARCHS["llama"], tmp_path / "llama")
    gguf = write_gguf(folder, tmp_path / "llama.gguf")
    broken = copy_gguf_with(gguf, tmp_path / "few-merges.gguf", {"tokenizer.ggml.merges": lambda merges: merges[:5]})
    payload = {"model": str(broken), "trust_remote_code": False, "device": "cpu",
               "eval": {"text": "pydoc", "max_tokens": 512, "context": 128, "stride": 128},
               "eval_tokens_path": str(tmp_path / "ids.json")}
    with pytest.raises(SourceError, match="characters per token.*most characters as tokens of their own"):
        prepare_source(payload, lambda _m: None)
    assert not (tmp_path / "ids.json").exists()


@pytest.mark.slow
def test_a_broken_transformers_tokenizer_for_a_gguf_is_replaced_by_one_that_agrees(tmp_path) -> None:
    """transformers' tokenizer is deliberately wrong (byte-level BPE with no merges: one token per byte); llama.cpp's
    tokenization of the file disagrees, so the workbench rebuilds the tokenizer from the file and measures it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tests.architectures import ARCHS, build_hf_folder, write_gguf
    from workbench.data.sources import _agreeing_tokenizer

    folder = build_hf_folder(ARCHS["qwen3"], tmp_path / "qwen3")
    gguf = write_gguf(folder, tmp_path / "qwen3.gguf")
    good = PreTrainedTokenizerFast.from_pretrained(folder)
    alphabet = {token: index for token, index in good.get_vocab().items() if len(token) == 1}
    broken_core = Tokenizer(models.BPE(vocab=alphabet, merges=[]))
    broken_core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    broken_core.decoder = decoders.ByteLevel()
    broken = PreTrainedTokenizerFast(tokenizer_object=broken_core)

    class BrokenAuto:
        @staticmethod
        def from_pretrained(*_args, **_kwargs):
            return broken

    tokenizer, origin = _agreeing_tokenizer(gguf, BrokenAuto, lambda _m: None)
    assert origin["origin"] == "rebuilt from the GGUF file's own vocabulary and merges"
    assert origin["tried"]["transformers"] < 0.6 and origin["agreement"] == 1.0
    text = "Python's lists are mutable sequences."
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == good(text, add_special_tokens=False)["input_ids"]


@pytest.mark.slow
def test_selfcheck_on_a_model_the_user_gives(tmp_path) -> None:
    """Each validity item as a selfcheck line; the random model's perplexity is correctly measured and correctly
    judged not to predict the text."""
    from tests.architectures import ARCHS, build_hf_folder
    from workbench.selfcheck import run_selfcheck

    folder = build_hf_folder(ARCHS["llama"], tmp_path / "llama")
    checks = {c.name: c for c in run_selfcheck(tokens=300, model=str(folder), emit=lambda _m: None)}
    assert checks["weights complete"].status == "pass"
    assert checks["tokenizer density"].status == "pass" and checks["tokenizer density"].value > 1.5
    assert checks["BOS policy"].value == 1.0 and "puts BOS first" in checks["BOS policy"].detail
    assert checks["fp32 perplexity: transformers labels/loss vs workbench"].status == "pass"
    assert "BOS first in every window" in checks["fp32 perplexity: transformers labels/loss vs workbench"].detail
    assert checks["baseline perplexity below the eval text's unigram perplexity"].status == "FAIL"


def test_gguf_summary_follows_a_moved_file_and_rereads_a_changed_one(tmp_path, monkeypatch) -> None:
    """The summary cache is keyed by the file's identity, not its path: a build reads it in its temporary folder
    and the measuring worker finds it after the folder is published; a rewritten file is read again."""
    import gguf

    from workbench.data import gguf_info

    path = tmp_path / "build" / "model.gguf"
    path.parent.mkdir()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    first = gguf_info.gguf_summary(path)
    assert first["tensors"] == 1 and first["parameters"] == 32 and first["tensor_types"] == {"F32": 1}

    reads: list[object] = []
    real_read = gguf_info._read_summary
    monkeypatch.setattr(gguf_info, "_read_summary", lambda reader: reads.append(reader) or real_read(reader))
    moved = tmp_path / "published" / "model.gguf"
    moved.parent.mkdir()
    path.rename(moved)
    assert gguf_info.gguf_summary(moved) == first and reads == []  # served from the cache
    with moved.open("ab") as handle:  # the file changes: its summary is read again
        handle.write(b"\0" * 32)
    gguf_info.gguf_summary(moved)
    assert len(reads) == 1
