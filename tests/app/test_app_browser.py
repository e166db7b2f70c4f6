"""The web chat in a real browser: Debian's Chromium driven by Playwright against the app on
localhost with the tiny model. Upload two images, ask, watch the reply stream in, ask about
image 2, stop a long reply, retry it, undo, clear the chat while a reply streams, close the tab
while one streams. Screenshots go to test-artifacts/browser/.

The engine is slowed down (30 ms a pass) and never stops at end-of-sequence, so a long reply
lasts long enough to press Stop in the middle of it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from app_testing import free_port, image_files, is_growing, is_idle, make_loop, wait_until

from app.chat import ChatSettings
from app.screenshot import CHROMIUM, VIEWPORT, launch_browser
from app.ui import EXAMPLES_DIR, build_app
from serving.engine import EngineLoop

pytestmark = pytest.mark.browser

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "browser"
SHORT = 24  # tokens in a normal reply: about 1 s
LONG = 400  # a reply to stop: about 12 s
TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[str, EngineLoop]]:
    loop = make_loop(step_delay=0.03, ignore_eos=True)
    demo = build_app(loop, settings=ChatSettings(max_tokens=SHORT))
    _, url, _ = demo.launch(
        server_name="127.0.0.1",
        server_port=free_port(),
        prevent_thread_lock=True,
        quiet=True,
        allowed_paths=[str(EXAMPLES_DIR)],
    )
    yield url, loop
    demo.close()
    loop.shutdown()


def require_browser():
    """Playwright's sync API; fails (never skips) when the browser test cannot run."""
    if not Path(CHROMIUM).exists():
        pytest.fail(
            f"Debian's chromium is missing ({CHROMIUM}): run `make test`, which installs it "
            "(apt-get install -y chromium)",
            pytrace=False,
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(
            "the playwright package is missing: run `make test` (it installs the dev extra)",
            pytrace=False,
        )
    return sync_playwright


def open_chat(page, url: str) -> None:
    """Load the chat in page and wait for its textbox."""
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    page.locator("textarea").first.wait_for()


def bot_texts(page) -> list[str]:
    return page.locator("[data-testid='bot']").all_inner_texts()


def watch_reply(page, num_replies: int) -> list[str]:
    """The last reply's text, sampled while it streams, until the Submit button is back."""
    page.locator("button.stop-button").wait_for()  # the reply has started
    seen: list[str] = []
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    while time.monotonic() < deadline:
        texts = bot_texts(page)
        if len(texts) == num_replies and texts[-1] and (not seen or texts[-1] != seen[-1]):
            seen.append(texts[-1])
        if seen and page.locator("button.submit-button").is_visible():
            return seen
        time.sleep(0.03)
    raise AssertionError(f"reply {num_replies} did not finish; saw {seen[-1:]!r}")


def send(page, text: str, files: list[str] = ()) -> None:
    if files:
        page.locator("input[data-testid='file-upload']").set_input_files(list(files))
        page.locator("[data-testid='file-upload'] ~ *, .thumbnail-item").first.wait_for()
    page.locator("textarea").first.fill(text)
    page.locator("button.submit-button").click()


def set_max_tokens(page, value: int) -> None:
    """Type the value and make sure the slider has kept it before the next message is sent.

    In a fresh clean-clone `make test` the first value typed right after the Settings accordion
    opened was lost (the slider showed its default again, so the "long" reply ended before Stop
    could be pressed); typing again until the value holds for half a second fixes that."""
    box = page.get_by_label("number input for Max new tokens")
    slider = page.get_by_label("range slider for Max new tokens")
    slider.wait_for()

    def holds() -> bool:
        return box.input_value() == str(value) and slider.input_value() == str(value)

    for _ in range(10):
        box.fill(str(value))
        box.press("Enter")
        box.blur()
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and not holds():
            time.sleep(0.05)
        time.sleep(0.5)
        if holds():
            return
    raise AssertionError(f"the max-tokens slider did not keep {value}")


def press_reply_button(page, name: str) -> None:
    """Press one of the last reply's buttons (Retry, Undo). Gradio 6 shows them under the last
    reply without hovering. When the chat is not scrolled to the bottom, Gradio floats a "Scroll
    down" button over the chat's lower edge, where the last reply's buttons are: press it first,
    as a person would. (A CI run once spent 90 s failing to hover a stopped reply; Playwright's
    own error, which the click below reports, says what takes the pointer if it happens again.)"""
    scroll_down = page.get_by_role("button", name="Scroll down")
    if scroll_down.is_visible():
        scroll_down.click()
        scroll_down.wait_for(state="hidden")
    page.get_by_role("button", name=name).last.click()


def status_overlays(page) -> list[str]:
    """What the status trackers show over the components ("Error" when an event failed)."""
    texts = page.locator("[data-testid='status-tracker']").all_inner_texts()
    return [text.strip() for text in texts if text.strip()]


def describe_page(page) -> str:
    """What a person would see that could explain a failure; saves failed.png beside the rest."""
    try:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)  # the slow test takes no other screenshot
        page.screenshot(path=str(ARTIFACTS / "failed.png"))
        seen = {
            "toasts": page.locator(".toast-body").all_inner_texts(),
            "status overlays": status_overlays(page),
            "bot replies": [text[:80] for text in bot_texts(page)],
            "buttons": page.locator("button:visible").evaluate_all(
                "els => els.map(e => e.getAttribute('aria-label') || e.innerText.trim())"
            ),
        }
    except Exception as err:  # the page itself may be what broke
        return f"(could not read the page: {err})"
    return repr(seen)


def test_chat_in_the_browser(served: tuple[str, EngineLoop], tmp_path: Path) -> None:
    sync_playwright = require_browser()
    url, loop = served
    images = image_files(tmp_path)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = launch_browser(playwright)
        page = browser.new_page(viewport=VIEWPORT)
        try:
            open_chat(page, url)
            page.screenshot(path=str(ARTIFACTS / "01-empty.png"))

            # two images and a question; the reply streams in piece by piece
            send(page, "Compare the two images.", [images["red"], images["green"]])
            first = watch_reply(page, 1)
            assert len(first) > 1 and is_growing(first), first
            # both images shown, each under the number the model knows it by
            assert page.locator("[data-testid='user'] img").count() == 2
            for label in ("Image 1", "Image 2"):
                assert page.get_by_text(label, exact=True).is_visible()
            page.screenshot(path=str(ARTIFACTS / "02-first-reply.png"))

            # a follow-up about image 2, no new image
            send(page, "What colour is image 2?")
            second = watch_reply(page, 2)
            assert second[-1] and len(bot_texts(page)) == 2
            page.screenshot(path=str(ARTIFACTS / "03-follow-up.png"))

            # a long reply, stopped in the middle: generation ends and the engine frees it
            page.get_by_text("Settings", exact=True).first.click()
            set_max_tokens(page, LONG)
            send(page, "Describe both images at length.")
            page.locator("button.stop-button").wait_for()
            wait_until(lambda: len(bot_texts(page)) == 3 and len(bot_texts(page)[-1]) > 8)
            page.locator("button.stop-button").click()
            page.locator("button.submit-button").wait_for()
            wait_until(lambda: is_idle(loop))
            stopped = bot_texts(page)[-1]
            time.sleep(0.5)
            assert bot_texts(page)[-1] == stopped  # nothing more arrives
            assert loop.engine.requests == {}
            # The reply ended like any other: no "Error" over the chat (Gradio's own cancel
            # left one there about one Stop in ten; see app.chat.ReplyControl).
            assert status_overlays(page) == []
            page.screenshot(path=str(ARTIFACTS / "04-stopped.png"))

            # Retry the stopped reply, short this time: the same question, a new complete reply
            set_max_tokens(page, SHORT)
            press_reply_button(page, "Retry")
            retried = watch_reply(page, 3)
            assert retried[-1] and len(bot_texts(page)) == 3
            page.screenshot(path=str(ARTIFACTS / "05-retried.png"))

            # Undo: the exchange goes, its question comes back into the box
            press_reply_button(page, "Undo")
            wait_until(lambda: len(bot_texts(page)) == 2)
            box = page.locator("textarea").first
            wait_until(lambda: box.input_value() == "Describe both images at length.")
            page.screenshot(path=str(ARTIFACTS / "06-undone.png"))

            # Clear while a long reply streams: the chat empties and stays empty, and the
            # engine frees the reply
            set_max_tokens(page, LONG)
            send(page, "Describe both images once more.")
            wait_until(lambda: len(bot_texts(page)) == 3 and len(bot_texts(page)[-1]) > 8)
            page.get_by_role("button", name="Clear").first.click()
            page.locator("button.submit-button").wait_for()
            wait_until(lambda: is_idle(loop) and bot_texts(page) == [])
            time.sleep(0.5)
            assert bot_texts(page) == [] and status_overlays(page) == []
            page.screenshot(path=str(ARTIFACTS / "07-cleared.png"))

            # Close the tab while a reply streams: the engine aborts it
            send(page, "Describe both images once more.")
            wait_until(lambda: len(bot_texts(page)) == 1 and len(bot_texts(page)[-1]) > 8)
            assert len(loop.engine.requests) == 1
            page.close()
            wait_until(lambda: is_idle(loop), timeout=10)
        except Exception as err:
            # CI shows only the message: say what the page showed (toasts, status overlays,
            # the chat), since that is what a failed click or wait was up against.
            raise AssertionError(f"{err}\n\nthe page then: {describe_page(page)}") from err
        finally:
            browser.close()
    wait_until(lambda: is_idle(loop))


@pytest.mark.slow
def test_stopping_many_replies_never_leaves_an_error(served: tuple[str, EngineLoop]) -> None:
    """Stop, again and again. When Stop cancelled the reply's Gradio event, about one Stop in ten
    (5 of 62 here) left Gradio's "Error" panel over the chat; twenty Stops would have shown it
    with odds of about four in five."""
    sync_playwright = require_browser()
    url, loop = served
    with sync_playwright() as playwright:
        browser = launch_browser(playwright)
        page = browser.new_page(viewport=VIEWPORT)
        try:
            open_chat(page, url)
            page.get_by_text("Settings", exact=True).first.click()
            set_max_tokens(page, LONG)
            for attempt in range(20):
                send(page, f"Tell me a long story, number {attempt}.")
                wait_until(lambda: bot_texts(page) and len(bot_texts(page)[-1]) > 8)
                page.locator("button.stop-button").click()
                page.locator("button.submit-button").wait_for()
                wait_until(lambda: is_idle(loop))
                time.sleep(0.3)  # the failed event's panel came within a few tens of ms
                assert status_overlays(page) == [], f"after Stop {attempt + 1}"
                page.get_by_role("button", name="Clear").first.click()
                wait_until(lambda: bot_texts(page) == [])
        except Exception as err:
            raise AssertionError(f"{err}\n\nthe page then: {describe_page(page)}") from err
        finally:
            browser.close()
