"""Take the README's screenshot of the web chat: launch it on a model, click the example that asks
about two bundled images, wait for the streamed reply to finish, save a PNG.

    python -m app.screenshot [MODEL] [--out docs/webchat.png]

MODEL is a checkpoint folder (default: the embedded model). The browser is Debian's Chromium,
driven by Playwright (`apt-get install -y chromium`; `make test` installs it).
"""

from __future__ import annotations

import argparse
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
VIEWPORT = {"width": 1200, "height": 900}


def launch_browser(playwright, chromium: str = CHROMIUM):
    """Debian's Chromium under Playwright (never a browser Playwright downloads)."""
    if not Path(chromium).exists():
        raise FileNotFoundError(
            f"{chromium} is missing: install Debian's chromium (`make test` does, with "
            "apt-get install -y chromium)"
        )
    return playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)


def wait_for_reply(page, timeout_ms: float) -> None:
    """Until a reply has appeared and the textbox shows its submit button again (not Stop)."""
    page.locator("[data-testid='bot']").last.wait_for(timeout=timeout_ms)
    page.locator("button.submit-button").wait_for(timeout=timeout_ms)


def take_screenshot(url: str, out: Path, chromium: str = CHROMIUM, timeout_s: float = 600) -> None:
    from playwright.sync_api import sync_playwright

    from app.ui import EXAMPLES

    with sync_playwright() as playwright:
        browser = launch_browser(playwright, chromium)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.goto(url)
            question = next(text for text, names in EXAMPLES if len(names) == 2)
            page.get_by_text(question).first.click()
            wait_for_reply(page, timeout_s * 1000)
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out))
        finally:
            browser.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default=None, help="checkpoint (default: embedded)")
    parser.add_argument("--out", type=Path, default=Path("docs/webchat.png"))
    parser.add_argument("--chromium", default=CHROMIUM)
    parser.add_argument("--max-tokens", type=int, default=96, help="length of the reply shown")
    args = parser.parse_args(argv)

    from app.chat import ChatSettings
    from app.launch import launch_ui

    print(f"loading {args.model or 'the embedded default model'} ...", file=sys.stderr)
    running = launch_ui(
        args.model,
        port=_free_port(),
        block=False,
        quiet=True,
        settings=ChatSettings(max_tokens=args.max_tokens),
    )
    try:
        take_screenshot(running.url, args.out, args.chromium)
    finally:
        running.close()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
