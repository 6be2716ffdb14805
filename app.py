"""Squeeze Bench in the browser: Compare, Chat arena and History tabs (also the Hugging Face Space entry).

    python app.py [--port 7860] [--host 127.0.0.1] [--share]

Environment: WORKBENCH_HOME (caches, history), WORKBENCH_SHARED=1 (public mode: no local paths,
capped variants, each visitor sees only their own runs), WORKBENCH_ALLOWED_DIRS (local folders a
non-shared app may read models from; default: the current folder). Importing this file is quick:
torch and the quantizers load when a run or a chat starts, in worker processes.
"""

from __future__ import annotations

import argparse
import os

import gradio as gr

from workbench.ui.chat import build_chat, close_workers
from workbench.ui.common import limits
from workbench.ui.compare import build_compare, end_session as end_runs
from workbench.ui.history import build_history

CSS = ".chat-panel mark { background: #ffe08a; } .chat-panel { min-height: 6em; }"


def end_session(session: dict) -> None:
    """A visitor left: cancel their queued or running run and close their chat workers."""
    end_runs(session)
    close_workers(session)


def build_app() -> gr.Blocks:
    lim = limits()
    with gr.Blocks(title="Squeeze Bench") as app:
        gr.Markdown("# Squeeze Bench\nCompress a causal LM several ways and compare the variants on the same tokens."
                    + ("\n\n*Shared mode: local paths are off; you see only your own runs.*" if lim.shared else ""))
        # Per visitor: runner in flight, own run ids, chat workers (ended with the visitor's session).
        session = gr.State({}, delete_callback=end_session)
        current_run = gr.State(None)
        with gr.Tab("Compare"):
            build_compare(session, current_run)
        with gr.Tab("Chat"):
            build_chat(session, current_run, app)
        with gr.Tab("History"):
            build_history(session, current_run, app)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve the Squeeze Bench workbench.")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    parser.add_argument("--share", action="store_true", help="ask Gradio for a public link (needs internet)")
    args = parser.parse_args()
    build_app().queue(default_concurrency_limit=1).launch(server_name=args.host, server_port=args.port, share=args.share,
                                                          css=CSS, show_error=False)


if __name__ == "__main__":
    main()
