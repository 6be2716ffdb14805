"""README screenshots of the three tabs on the bundled model: Compare after the quickstart run, Chat, History.

    python bench/screenshots.py [--out assets] [--preset presets/quickstart.yaml] [--chat fp32,q4km] [--skip-compare]

Starts `python app.py` on a free port with the bench home (`$SQUEEZE_BENCH_HOME`, default
`~/.cache/squeeze-bench-bench`), drives Debian's Chromium with Playwright like a user (paste the
preset, Run, wait for the charts; Chat with the chosen variants; History, Open), and writes
compare.png, chat.png and history.png. PNGs above 400 KB are re-saved with a 256-colour palette.
Browser console errors are printed and make the script exit 1. The run takes as long as the preset
does (the quickstart: several minutes on 2 cores; artifacts are cached for a second go).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _ui import ROOT, chromium, serving_app, use_bench_home

MAX_BYTES = 400_000


def shrink(path: Path) -> int:
    """Re-save a large screenshot with an adaptive palette (UI colours survive; size drops several-fold)."""
    from PIL import Image

    if path.stat().st_size > MAX_BYTES:
        with Image.open(path) as image:
            image.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    return path.stat().st_size


def choose_variants(page, names: list[str]) -> None:
    """Make the Chat tab's multiselect hold exactly `names`: clear it, then tick each option."""
    box = page.get_by_label("Variants (2-4)")
    page.locator("div.container", has=box).locator("[title='Clear']").click()
    for name in names:  # typing filters the options; Enter ticks the first match
        box.click()
        box.fill(name)
        box.press("Enter")
    box.press("Escape")  # close the option list, which covers the prompt box
    box.blur()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=ROOT / "assets")
    parser.add_argument("--preset", type=Path, default=ROOT / "presets" / "quickstart.yaml")
    parser.add_argument("--chat", default="fp32,q4km,q4_1-shipped", help="variants that answer in the Chat shot")
    parser.add_argument("--skip-compare", action="store_true",
                        help="keep compare.png; Chat and History use the newest stored run")
    parser.add_argument("--prompt", default="What is a Python list? Answer in two sentences.")
    args = parser.parse_args()

    use_bench_home()
    args.out.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    with serving_app() as url, chromium() as browser:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(url)
        if not args.skip_compare:
            page.locator(".cm-content").click()
            page.keyboard.press("Control+A")
            page.keyboard.insert_text(args.preset.read_text())
            started = time.perf_counter()
            page.get_by_role("button", name="Run", exact=True).click()
            page.locator(".js-plotly-plot:visible").first.wait_for(timeout=7_200_000)
            page.wait_for_timeout(2000)
            print(f"compare: the run took {time.perf_counter() - started:.0f} s in the browser", flush=True)
            page.screenshot(path=str(args.out / "compare.png"), full_page=True)

        page.get_by_role("tab", name="Chat").click()
        page.get_by_role("button", name="Refresh runs").click()
        page.wait_for_timeout(2000)
        names = [n.strip() for n in args.chat.split(",") if n.strip()]
        choose_variants(page, names)
        page.get_by_label("Prompt").fill(args.prompt)
        page.get_by_role("button", name="Send to all").click()
        page.wait_for_function(f"[...document.querySelectorAll('.chat-panel small')].filter(e => e.innerText.includes("
                               f"'tokens')).length >= {len(names)} && !document.querySelector('.pending')",
                               timeout=600_000)
        page.wait_for_timeout(1500)
        page.screenshot(path=str(args.out / "chat.png"), full_page=True)

        page.get_by_role("tab", name="History").click()
        page.get_by_role("button", name="Refresh").click()
        page.wait_for_timeout(1500)
        page.get_by_role("button", name="Open", exact=True).click()
        page.locator(".js-plotly-plot:visible").first.wait_for()
        page.wait_for_timeout(2000)
        page.screenshot(path=str(args.out / "history.png"), full_page=True)
    for name in ("compare.png", "chat.png", "history.png"):
        if (args.out / name).exists():
            print(f"{args.out / name}: {shrink(args.out / name) / 1000:.0f} KB")
    if errors:
        print("browser console errors:", *errors, sep="\n  ")
        raise SystemExit(1)


if __name__ == "__main__":
    main()
