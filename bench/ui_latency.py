"""How fast the browser workbench answers: page first paint, and chat time to first token of a Q4 GGUF variant.

    python bench/ui_latency.py [--page-repeats 5] [--chat-repeats 5] [--cold-repeats 3] [--rerun]

Set-up (once, cached): `python -m workbench run` of a small preset on the bundled model (fp32, Q4_K_M
made by llama.cpp, the Q4_1 file as shipped) into the bench home (`$SQUEEZE_BENCH_HOME`, default
`~/.cache/squeeze-bench-bench`), then `python app.py` on a free localhost port and Debian's Chromium
driven by Playwright.

(a) Page: each repeat opens a fresh browser context (empty cache) and goes to the app. First
contentful paint comes from the Paint Timing API (`performance.getEntriesByType('paint')`, measured
from navigation start, i.e. before the HTTP request); "app visible" is wall clock from `page.goto`
to the Gradio container and the app's title being visible. Target: < 3 s.
(b) Chat: the Chat tab exactly as a user drives it (choose the run, "Send to all" with fp32 and
q4km). Time to first token is measured inside the page, from the click to the first token shown
in the q4km panel (a MutationObserver; includes the queue, the worker pipe and the rendering).
The chat tab keeps one worker process per variant for the visitor's session, so "warm" is a
prompt sent after the variants are loaded and "cold" is the first prompt of a new page (both
workers start and load). Target (warm): < 1 s. The panel's own TTFT (worker asked -> token back
in the app process) is printed alongside. Medians over the repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import time

from _ui import LATENCY_PRESET, chromium, ensure_run, machine, serving_app, use_bench_home

PAGE_TARGET_S = 3.0
TTFT_TARGET_S = 1.0
PROMPTS = ["What is a Python list?", "Name three uses of a dictionary.", "What does a for loop do?",
           "Explain what a function is.", "What is a tuple?", "How do I read a file in Python?"]

# Click "Send to all" and resolve when the watched panel first shows a token: its stats gain "TTFT" and differ from
# the previous answer's final stats (the first-token line always does: "1 tokens").
SEND_AND_TIME = """(label) => new Promise((resolve, reject) => {
  const stats = () => [...document.querySelectorAll('.chat-panel')]
    .find(p => p.querySelector('h4')?.innerText.trim() === label)?.querySelector('small')?.innerText || '';
  const before = stats();
  const button = [...document.querySelectorAll('button')].find(b => b.innerText.trim() === 'Send to all');
  const start = performance.now();
  const observer = new MutationObserver(() => {
    const now = stats();
    if (now.includes('TTFT') && now !== before) { observer.disconnect(); resolve({ms: performance.now() - start, stats: now}); }
  });
  observer.observe(document.body, {subtree: true, childList: true, characterData: true});
  setTimeout(() => { observer.disconnect(); reject(new Error('no token within 300 s')); }, 300000);
  button.click();
})"""


def page_load(browser, url: str) -> dict:
    """One first visit: a new context has an empty cache and a new Gradio session."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    started = time.perf_counter()
    page.goto(url, wait_until="commit")
    page.locator(".gradio-container").first.wait_for(state="visible")
    container_s = time.perf_counter() - started
    page.get_by_role("heading", name="Squeeze Bench").wait_for(state="visible")
    visible_s = time.perf_counter() - started
    page.wait_for_function("performance.getEntriesByType('paint').some(e => e.name === 'first-contentful-paint')")
    timing = page.evaluate("""() => ({
        fcp: performance.getEntriesByType('paint').find(e => e.name === 'first-contentful-paint').startTime,
        ttfb: performance.getEntriesByType('navigation')[0].responseStart})""")
    context.close()
    return {"fcp_s": round(timing["fcp"] / 1000, 3), "ttfb_s": round(timing["ttfb"] / 1000, 3),
            "container_s": round(container_s, 3), "app_visible_s": round(visible_s, 3)}


def open_chat(browser, url: str, run_id: str):
    """A new page (a new session, so new chat workers) on the Chat tab with the run and its first two variants chosen."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.goto(url)
    page.get_by_role("tab", name="Chat").click()
    run_box = page.locator("input[aria-label='Run']:visible")
    run_box.fill(run_id)
    run_box.press("Enter")
    page.get_by_label("Prompt").click()  # leave the dropdown so its change event fires
    page.wait_for_function("document.querySelectorAll('.chat-panel').length > 0")
    page.wait_for_timeout(1500)  # the variant choices arrive from the server
    return context, page


def chat_ttft(page, label: str, prompt: str) -> dict:
    page.get_by_label("Prompt").fill(prompt)
    result = page.evaluate(SEND_AND_TIME, label)
    # Both answers are complete once the watched panel compares itself with the baseline's answer.
    page.wait_for_function("[...document.querySelectorAll('.chat-panel small')].some(e => /same as baseline|differs from/"
                           ".test(e.innerText))", timeout=300_000)
    page.wait_for_timeout(300)
    panel_ms = re.search(r"TTFT (\d+) ms", result["stats"])
    return {"ui_s": round(result["ms"] / 1000, 3), "panel_s": int(panel_ms.group(1)) / 1000 if panel_ms else None}


def verdict(value: float, target: float) -> str:
    return f"{'PASS' if value < target else 'FAIL'} (target < {target:g} s)"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--page-repeats", type=int, default=5)
    parser.add_argument("--chat-repeats", type=int, default=5)
    parser.add_argument("--cold-repeats", type=int, default=3)
    parser.add_argument("--watch", default="q4km", help="the Q4 GGUF variant whose panel is timed")
    parser.add_argument("--rerun", action="store_true", help="run the set-up preset again even if a run exists")
    args = parser.parse_args()

    home = use_bench_home()
    run_id = ensure_run(LATENCY_PRESET, rerun=args.rerun)
    load_before = os.getloadavg()[0]
    pages, warm, cold = [], [], []
    with serving_app() as url, chromium() as browser:
        version = browser.version
        for _ in range(args.page_repeats):
            pages.append(page_load(browser, url))
        for index in range(args.cold_repeats):
            context, page = open_chat(browser, url, run_id)
            cold.append(chat_ttft(page, args.watch, PROMPTS[index % len(PROMPTS)]))
            if index == args.cold_repeats - 1:  # the last session's workers stay loaded: time warm prompts there
                for repeat in range(args.chat_repeats):
                    warm.append(chat_ttft(page, args.watch, PROMPTS[(repeat + 1) % len(PROMPTS)]))
            context.close()
            time.sleep(1)

    def median(rows: list[dict], key: str) -> float | None:
        values = [r[key] for r in rows if r[key] is not None]
        return statistics.median(values) if values else None

    load = f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after (1 min)"
    result = {"machine": machine(), "load": load, "app_threads": "chat workers: 1 thread each (workbench/ui/chat.py)",
              "set_up_run": run_id, "workbench_home": str(home), "chromium": version,
              "page_repeats": args.page_repeats, "chat_warm_repeats": args.chat_repeats,
              "chat_cold_repeats": args.cold_repeats, "watched_variant": args.watch,
              "page": {key: median(pages, key) for key in pages[0]},
              "chat_warm": {key: median(warm, key) for key in ("ui_s", "panel_s")},
              "chat_cold": {key: median(cold, key) for key in ("ui_s", "panel_s")},
              "raw": {"page": pages, "chat_warm": warm, "chat_cold": cold}}
    print(json.dumps(result, indent=1))
    page, hot, first = result["page"], result["chat_warm"], result["chat_cold"]
    print(f"page first contentful paint: {page['fcp_s']:.3f} s  {verdict(page['fcp_s'], PAGE_TARGET_S)}")
    print(f"page goto -> app visible:    {page['app_visible_s']:.3f} s  {verdict(page['app_visible_s'], PAGE_TARGET_S)}")
    print(f"chat submit -> first {args.watch} token (warm): {hot['ui_s']:.3f} s  {verdict(hot['ui_s'], TTFT_TARGET_S)}"
          f"  (panel TTFT {hot['panel_s']:.3f} s)")
    print(f"chat submit -> first {args.watch} token (cold, both workers start and load): {first['ui_s']:.3f} s"
          f"  (panel TTFT {first['panel_s']:.3f} s)")
    print(f"protocol: {machine()}; {load}; app, chat workers (1 thread each) and Chromium on this machine; "
          f"medians of {args.page_repeats} page loads, {args.chat_repeats} warm and {args.cold_repeats} cold prompts")


if __name__ == "__main__":
    main()
