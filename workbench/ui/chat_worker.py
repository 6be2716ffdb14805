"""Long-lived chat workers: one process per loaded variant, streaming tokens back over a pipe.

A variant loads once and answers prompt after prompt; if it crashes, only its panel shows the
error, and the next prompt starts a fresh worker (chat._workers). Each token comes with the visible
text decoded so far, which the UI compares and marks.

Messages from the worker (kind, value):
    ("progress", str)           while loading: what it is doing now
    ("ready", load_s)           loaded
    ("note", (rid, str))        about one answer (e.g. the prompt was truncated to fit the context)
    ("token", (rid, id, text))  one generated token and the whole visible text so far
    ("done", (rid, stats))      the answer ended; stats are the generation's own timing, measured once
    ("failed", (rid, str))      this answer failed (the worker stays loaded); one line
    ("error", str)              loading failed; one line
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from pathlib import Path
from typing import Any, Iterator

from workbench.process import death_reason

# Special tokens that end an assistant turn in common chat templates. Some models' config names only
# `<|endoftext|>` as EOS while their template closes turns with `<|im_end|>` (or the other way round), and
# llama.cpp reads its own EOS from the GGUF metadata; stopping at every one of them that the vocabulary has
# makes every runtime stop at the same place.
END_OF_TURN = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>", "<|end|>",
               "</s>", "<|return|>")
DEFAULT_CONTEXT = 2048


def stop_ids(variant: Any) -> set[int]:
    """Every id that ends this variant's turn: its runtime's EOS, the generation config's, the end-of-turn
    specials its tokenizer knows, and llama.cpp's own EOS/EOT."""
    ids = set(variant.eos_ids())
    tokenizer = getattr(variant, "tokenizer", None)
    if tokenizer is not None:
        vocab = tokenizer.get_vocab()
        ids |= {int(vocab[t]) for t in END_OF_TURN if t in vocab}
        generation = getattr(getattr(variant, "model", None), "generation_config", None)
        eos = getattr(generation, "eos_token_id", None)
        ids |= {int(i) for i in (eos if isinstance(eos, list) else [eos]) if i is not None}
    llm = getattr(variant, "llm", None)
    for getter in ("token_eos", "token_eot"):
        method = getattr(getattr(llm, "_model", None), getter, None) or getattr(llm, getter, None)
        try:
            value = method() if method else None
        except Exception:  # an older llama-cpp-python without that getter: the other ids still stop it
            value = None
        if value is not None and value >= 0:
            ids.add(int(value))
    return ids


def context_limit(variant: Any) -> int | None:
    """The most positions (prompt + answer) the loaded variant can take; None when unknown."""
    llm = getattr(variant, "llm", None)
    if llm is not None:
        return int(llm.n_ctx())
    config = getattr(getattr(variant, "model", None), "config", None)
    limit = getattr(config, "max_position_embeddings", None)
    return int(limit) if limit else None


def fit_prompt(variant: Any, prompt: str, max_new_tokens: int) -> tuple[list[int], int, str | None]:
    """(prompt ids, new tokens, note): the prompt cut at its end to fit the context with room for an answer.

    A long prompt used to reach llama.cpp as is and crash the worker; now it is truncated (the note says by
    how much), and the answer is shortened only when even a short prompt leaves no room."""
    ids = variant.chat_ids(prompt)
    limit = context_limit(variant)
    if limit is None or len(ids) + max_new_tokens <= limit:
        return ids, max_new_tokens, None
    new_tokens = min(max_new_tokens, max(1, limit // 4))
    budget = limit - new_tokens
    tokenizer = getattr(variant, "tokenizer", None)
    if tokenizer is None:  # ids are the text: keep the first ones
        return ids[:budget], new_tokens, f"the prompt was cut to {budget} of {len(ids)} tokens to fit the context of {limit}"
    text_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    keep = max(0, len(text_ids) - (len(ids) - budget))  # the template's own tokens stay
    while True:
        cut = variant.chat_ids(tokenizer.decode(text_ids[:keep]))
        if len(cut) <= budget or keep == 0:
            break
        keep = max(0, keep - max(1, len(cut) - budget))
    note = (f"the prompt has {len(ids)} tokens and the context holds {limit}: it was cut to its first {keep} "
            f"tokens, and the answer to at most {new_tokens}")
    return cut[:budget], new_tokens, note


def answer(variant: Any, stops: set[int], prompt: str, max_new_tokens: int, send: Any, rid: int) -> None:
    """Generate one answer, sending its tokens; the timing is taken here, from the generation alone."""
    start = time.perf_counter()
    ids, new_tokens, note = fit_prompt(variant, prompt, max_new_tokens)
    if note:
        send(("note", (rid, note)))
    tokens: list[int] = []
    text = ""
    first = last = None
    generated = 0  # every token the model produced, the stop token included: each took one step
    for token in variant.generate(ids, new_tokens):
        last = time.perf_counter()
        first = first or last
        generated += 1
        if token in stops:
            break
        tokens.append(token)
        # The whole visible text so far, not a difference: a token that ends inside a multi-byte character
        # decodes to "\ufffd" until the next one completes it, which changes text already shown.
        text = variant.decode(tokens)
        send(("token", (rid, token, text)))
    # tok/s over the tokens after the first: the first one's time is the prompt's (TTFT). Measured once, here.
    decode_s = (last - first) if first is not None and last is not None else 0.0
    steps = generated - 1
    send(("done", (rid, {"tokens": len(tokens), "ttft_s": (first - start) if first else None,
                         "tok_s": steps / decode_s if steps > 0 and decode_s > 0 else None, "text": text})))


def _serve(spec: dict[str, Any], conn: Any, log_path: str) -> None:
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    started = time.perf_counter()
    try:
        conn.send(("progress", f"importing the {spec['runtime']} runtime"))
        from workbench.runtimes import load_variant, runtime_class

        runtime_class(spec["runtime"])  # the slow import (torch, llama.cpp), apart from the weights
        conn.send(("progress", "loading the weights"))
        variant = load_variant(spec["runtime"], name=spec["name"], artifact_path=Path(spec["artifact_path"]),
                               device="cpu", threads=spec["threads"], n_ctx=spec.get("n_ctx", DEFAULT_CONTEXT))
        stops = stop_ids(variant)
        conn.send(("ready", time.perf_counter() - started))
    except Exception as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}".splitlines()[0]))
        return
    try:
        while True:
            request = conn.recv()
            if request is None:
                return
            rid, prompt, max_new_tokens = request
            try:
                answer(variant, stops, prompt, max_new_tokens, conn.send, rid)
            except (EOFError, OSError):
                raise
            except Exception as exc:  # one bad answer: say why, and stay loaded for the next prompt
                conn.send(("failed", (rid, f"{type(exc).__name__}: {exc}".splitlines()[0])))
    except (EOFError, OSError):  # the app went away (stopped, or the visitor's session ended): nobody to answer
        return
    finally:
        variant.close()


class ChatWorker:
    def __init__(self, spec: dict[str, Any], log_dir: Path):
        context = mp.get_context("spawn")
        self.name = spec["name"]
        self.conn, child = context.Pipe()
        log_dir.mkdir(parents=True, exist_ok=True)
        self.process = context.Process(target=_serve, args=(spec, child, str(log_dir / f"chat-{spec['name']}.log")),
                                       daemon=True)
        self.started = time.perf_counter()
        self.process.start()
        child.close()
        self.ready = False
        self.load_s: float | None = None
        self.stage = "starting a worker process"
        self.error: str | None = None
        self._rid = 0

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def alive(self) -> bool:
        return self.error is None and self.process.is_alive()

    def _receive(self, timeout_s: float) -> tuple[str, Any] | None:
        if self.error is not None:
            return None
        if self.conn.poll(timeout_s):
            try:
                return self.conn.recv()
            except (EOFError, OSError):
                pass
        if not self.process.is_alive():
            self.process.join()
            self.error = death_reason(self.process.exitcode)
            return ("error", self.error)
        return None

    def poll_loading(self) -> None:
        """Take the loading messages that have arrived, without waiting (ready, error or a new stage)."""
        while not self.ready and self.error is None:
            message = self._receive(0)
            if message is None:
                return
            kind, value = message
            if kind == "progress":
                self.stage = value
            elif kind == "ready":
                self.ready, self.load_s = True, value
            elif kind == "error":
                self.error = value

    def wait_ready(self, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.ready and self.error is None and time.monotonic() < deadline:
            self.poll_loading()
            time.sleep(0.05)
        if not self.ready and self.error is None:
            self.error = "the variant did not load in time"

    def ask(self, prompt: str, max_new_tokens: int) -> int:
        """Send a prompt; returns its request id (messages of earlier, abandoned answers are skipped by poll)."""
        self._rid += 1
        try:
            self.conn.send((self._rid, prompt, max_new_tokens))
        except (BrokenPipeError, OSError):
            self.process.join(timeout=2)
            self.error = death_reason(self.process.exitcode) if not self.process.is_alive() else "the worker stopped answering"
        return self._rid

    def poll(self) -> Iterator[tuple[str, Any]]:
        """Whatever this worker has sent about the current answer since the last poll, without waiting."""
        while True:
            message = self._receive(0)
            if message is None:
                return
            kind, value = message
            if kind in ("token", "note", "done", "failed"):
                if value[0] != self._rid:
                    continue  # the rest of an answer nobody waits for any more
                value = value[1:] if kind == "token" else value[1]
                kind = "error" if kind == "failed" else kind
            yield kind, value
            if kind in ("done", "error"):
                return

    def close(self) -> None:
        try:
            self.conn.send(None)
        except (BrokenPipeError, OSError):
            pass
        self.process.join(timeout=2)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=2)
