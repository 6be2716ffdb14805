"""Long-lived chat workers: one process per loaded variant, streaming tokens back over a pipe.

A variant loads once and answers prompt after prompt; if it crashes, only its panel shows the
error and the app keeps serving. Text is streamed as pieces (the decoded difference each new token
makes), so the UI can mark where two answers start to differ.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from pathlib import Path
from typing import Any, Iterator

from workbench.process import death_reason


def _serve(spec: dict[str, Any], conn: Any, log_path: str) -> None:
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    try:
        from workbench.runtimes import load_variant

        extra = {"n_ctx": 2048} if spec["runtime"] == "llamacpp" else {}
        variant = load_variant(spec["runtime"], name=spec["name"], artifact_path=Path(spec["artifact_path"]),
                               device="cpu", threads=spec["threads"], **extra)
        eos = variant.eos_ids()
        conn.send(("ready", None))
    except Exception as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}".splitlines()[0]))
        return
    try:
        while True:
            request = conn.recv()
            if request is None:
                return
            prompt, max_new_tokens = request
            tokens: list[int] = []
            text = ""
            for token in variant.generate(variant.chat_ids(prompt), max_new_tokens):
                if token in eos:
                    break
                tokens.append(token)
                new_text = variant.tokenizer.decode(tokens, skip_special_tokens=True)
                conn.send(("token", (token, new_text[len(text):])))
                text = new_text
            conn.send(("done", None))
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
        self.process.start()
        child.close()
        self.ready = False
        self.error: str | None = None

    def _receive(self, timeout_s: float) -> tuple[str, Any] | None:
        if self.conn.poll(timeout_s):
            try:
                return self.conn.recv()
            except EOFError:
                pass
        if not self.process.is_alive():
            self.process.join()
            return ("error", death_reason(self.process.exitcode))
        return None

    def wait_ready(self, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.ready and self.error is None and time.monotonic() < deadline:
            message = self._receive(0.2)
            if message:
                kind, value = message
                self.ready, self.error = kind == "ready", value if kind == "error" else None
        if not self.ready and self.error is None:
            self.error = "the variant did not load in time"

    def ask(self, prompt: str, max_new_tokens: int) -> None:
        self.conn.send((prompt, max_new_tokens))

    def poll(self) -> Iterator[tuple[str, Any]]:
        """Whatever this worker has sent since the last poll, without waiting."""
        while True:
            message = self._receive(0)
            if message is None:
                return
            yield message
            if message[0] in ("done", "error"):
                return

    def close(self) -> None:
        try:
            self.conn.send(None)
        except (BrokenPipeError, OSError):
            pass
        self.process.join(timeout=2)
        if self.process.is_alive():
            self.process.kill()
