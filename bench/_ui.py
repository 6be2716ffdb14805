"""Shared set-up for the browser benchmarks: a bench home with a stored run, the app on a free port, Chromium.

The benchmarks never touch the user's `~/.cache/squeeze-bench`: they use `$SQUEEZE_BENCH_HOME`
(default `~/.cache/squeeze-bench-bench`) as `WORKBENCH_HOME`, where artifacts stay cached between runs.
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.app_server import app_server, chromium  # noqa: E402  (after the path insert; chromium is re-exported)
BENCH_HOME = Path(os.environ.get("SQUEEZE_BENCH_HOME") or Path.home() / ".cache" / "squeeze-bench-bench")

# The bundled model, a short protocol: the fp32 baseline, Q4_K_M made by llama.cpp, and the Q4_1 file as shipped.
LATENCY_PRESET = """name: ui-latency
model: bundled:smollm2-135m-instruct
device: cpu
threads: 2
eval: {text: pydoc, max_tokens: 1024, context: 512, stride: 512}
latency: {prompt_tokens: 64, new_tokens: 16, warmup: 1, repeats: 3}
samples: {new_tokens: 16}
baseline: fp32
variants:
  - {name: fp32, method: fp32}
  - {name: q4km, method: gguf, options: {quant: Q4_K_M}}
  - {name: q4_1-shipped, method: gguf-file, options: {path: source}}
"""


def use_bench_home() -> Path:
    """Point this process (and every process it starts) at the bench home."""
    BENCH_HOME.mkdir(parents=True, exist_ok=True)
    os.environ["WORKBENCH_HOME"] = str(BENCH_HOME)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return BENCH_HOME


def ensure_run(preset_yaml: str, rerun: bool = False) -> str:
    """The id of the newest complete run of this preset in the bench home; runs the CLI first if there is none."""
    import yaml

    from workbench.data.store import History

    name = yaml.safe_load(preset_yaml)["name"]

    def newest() -> str | None:
        history = History()
        try:
            rows = [r for r in history.runs() if r["name"] == name and r["status"] == "ok" and r["ok"] == r["variants"]]
        finally:
            history.close()
        return rows[0]["run_id"] if rows else None

    if not rerun and (run_id := newest()):
        return run_id
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
        handle.write(preset_yaml)
    print(f"set-up: python -m workbench run {name} (WORKBENCH_HOME={BENCH_HOME}) ...", flush=True)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "workbench", "run", handle.name], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    os.unlink(handle.name)
    run_id = newest()
    if run_id is None:
        raise SystemExit(f"the set-up run of {name} did not finish with every variant ok; see {BENCH_HOME / 'runs'}")
    print(f"set-up: run {run_id} in {time.perf_counter() - started:.0f} s", flush=True)
    return run_id


@contextlib.contextmanager
def serving_app() -> Iterator[str]:
    """`python app.py` on a free localhost port in its own process, with the bench home; yields its URL (the tests'
    own starter, tests/app_server.py, so the benchmarks start the app exactly as the browser tests do)."""
    with app_server(BENCH_HOME, "app-bench") as server:
        yield server.url


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {os.cpu_count()} logical cores visible, Python {platform.python_version()}"
