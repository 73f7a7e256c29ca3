"""The page at /ui in headless Chromium against a real server, Redis and tiny model.

Skipped when no Chromium is installed, unless SENAB_REQUIRE_BROWSER=1 (as in CI), where a
missing browser fails instead. The screenshot of a two-turn conversation is saved under
build/test-artifacts/ (or SENAB_TEST_ARTIFACTS).
"""

from __future__ import annotations

import os

import pytest

from tests.browser import ARTIFACTS, CONTRAST_SCRIPT, chromium, chromium_path
from tests.conftest import RedisServer, free_port
from tests.helpers import ServerProcess, save_model_and_bridge

API_KEY = "ui-test-key-0123456789"
TIMEOUT_MS = 30_000


def _require_browser() -> None:
    missing = None
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing = "the playwright package is not installed (pip install -e '.[test]')"
    if missing is None and chromium_path() is None:
        missing = "no Chromium executable found (run `make browser`, or set SENAB_CHROMIUM)"
    if missing is not None:
        if os.environ.get("SENAB_REQUIRE_BROWSER") == "1":
            pytest.fail(f"browser tests required but {missing}")
        pytest.skip(missing)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """A private Redis (stopped by the last test) and a server with an API key."""
    _require_browser()
    from playwright.sync_api import expect

    expect.set_options(timeout=TIMEOUT_MS)  # the default 5 s is short on a loaded 2-core machine
    root = tmp_path_factory.mktemp("ui")
    model_dir, bridge_dir = save_model_and_bridge(root)
    redis_server = RedisServer(port=free_port())
    redis_server.start()
    env = {"SENAB_MODEL": str(model_dir), "SENAB_BRIDGE": str(bridge_dir), "REDIS_URL": redis_server.url,
           "SENAB_API_KEYS": f"ui:{API_KEY}", "SENAB_DEFAULT_TEMPERATURE": "0", "SENAB_MAX_TOKENS_DEFAULT": "6"}
    server = None
    try:
        server = ServerProcess(env, root / "server.log")
        with chromium() as browser:
            yield browser, server, redis_server
    finally:
        if server is not None:
            server.stop()
        redis_server.stop()


def open_page(browser, server, *, key: str | None = API_KEY):
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1280, "height": 860})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(server.url + "/ui")
    if key is not None:
        page.get_by_label("API key", exact=True).fill(key)
        page.get_by_label("API key", exact=True).press("Enter")
        expect(page.locator("#status")).to_contain_text("Ready.")
    return page


def send(page, text: str, turns_on_page: int) -> None:
    from playwright.sync_api import expect

    page.get_by_label("Message", exact=True).fill(text)
    page.get_by_label("Message", exact=True).press("Enter")
    expect(page.locator("#messages li.assistant")).to_have_count(turns_on_page)
    expect(page.get_by_role("button", name="Send")).to_be_enabled()


def test_missing_key_is_shown(stack):
    from playwright.sync_api import expect

    browser, server, _ = stack
    page = open_page(browser, server, key=None)
    status = page.locator("#status")
    expect(status).to_contain_text("Could not list the models: 401")
    expect(status).to_have_class("error")
    page.get_by_label("API key", exact=True).fill(API_KEY)
    page.get_by_label("API key", exact=True).press("Enter")
    expect(status).to_contain_text("Ready.")
    expect(status).not_to_have_class("error")
    assert page.get_by_label("Model", exact=True).input_value() == "model+senab"
    page.close()


def test_two_turns_then_reset(stack):
    from playwright.sync_api import expect

    browser, server, _ = stack
    page = open_page(browser, server)
    send(page, "Hello there!", 1)
    session_id = page.get_by_label("Session", exact=True).input_value()
    assert session_id
    points = page.locator("#chart circle.point.distance")
    expect(points).to_have_count(1)
    send(page, "How is the weather?", 2)
    expect(points).to_have_count(2)
    expect(page.locator("#chart circle.point.arousal")).to_have_count(2)
    assert page.locator("#chart text.turn-label").all_text_contents() == ["1", "2"]
    expect(page.locator("#points-table tbody tr")).to_have_count(2)
    expect(page.locator("#latest")).to_contain_text("Turn 2:")
    expect(page.locator("#heatmap rect")).to_have_count(32)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "ui-two-turns.png"), full_page=True)
    assert (ARTIFACTS / "ui-two-turns.png").stat().st_size > 10_000

    page.get_by_role("button", name="Reset").press("Enter")
    expect(page.locator("#status")).to_contain_text(f"Session {session_id} is back at the set-point")
    expect(points).to_have_count(0)
    # The server's turn count starts again, so the page's conversation does too.
    expect(page.locator("#messages li")).to_have_count(0)
    expect(page.locator("#points-table tbody tr")).to_have_count(0)
    expect(page.locator("#latest")).to_have_text("No turns yet.")
    page.close()

    # Another tab opening the session reads the stored trajectory: empty after the reset.
    other = open_page(browser, server)
    other.get_by_label("Session", exact=True).fill(session_id)
    other.get_by_label("Session", exact=True).press("Enter")
    expect(other.locator("#status")).to_contain_text(f"Opened session {session_id} at turn 0")
    expect(other.locator("#chart circle.point")).to_have_count(0)
    other.close()


@pytest.mark.parametrize("session_id", ["../x", "a b", "..", "x" * 129])
def test_invalid_session_id_is_explained(stack, session_id):
    from playwright.sync_api import expect

    browser, server, _ = stack
    page = open_page(browser, server)
    page.get_by_label("Session", exact=True).fill(session_id)
    page.get_by_role("button", name="Open").click()
    status = page.locator("#status")
    expect(status).to_contain_text("Invalid session id")
    expect(status).to_contain_text("use 1 to 128 letters, digits")
    expect(status).to_have_class("error")
    assert page.get_by_label("Session", exact=True).get_attribute("aria-invalid") == "true"
    page.close()


def test_controls_tab_reachable_readable(stack):
    browser, server, _ = stack
    page = open_page(browser, server)
    page.locator("body").focus()
    reached = []
    for _ in range(20):
        page.keyboard.press("Tab")
        reached.append(page.evaluate("document.activeElement.id || document.activeElement.tagName"))
    for control in ("api-key", "model", "session-id", "open-session", "new-session", "reset-session",
                    "delete-session", "prompt", "send", "SUMMARY"):
        assert control in reached, (control, reached)
    for label in ("API key", "Model", "Session", "Message"):
        assert page.get_by_label(label, exact=True).count() == 1, label
    ratios = dict(page.evaluate(CONTRAST_SCRIPT, ["h1", "#status", "label[for=api-key]", "#send", "#new-session",
                                                  "#values summary", "#latest", "#api-key"]))
    for selector, ratio in ratios.items():
        assert ratio is not None and ratio >= 4.5, (selector, ratio)  # WCAG AA for normal text
    page.close()


def test_store_outage_is_shown(stack):
    """Runs last in this module: it stops the module's Redis."""
    from playwright.sync_api import expect

    browser, server, redis_server = stack
    page = open_page(browser, server)
    send(page, "Hello there!", 1)  # starts the live updates of this session
    expect(page.locator("#chart circle.point.distance")).to_have_count(1)
    redis_server.stop()
    page.get_by_label("Message", exact=True).fill("Are you there?")
    page.get_by_label("Message", exact=True).press("Enter")
    status = page.locator("#status")
    expect(status).to_contain_text("The message was not answered: 503")
    expect(status).to_have_class("error")
    # The event stream fails too; it reports on its own line and leaves the action's error visible.
    expect(page.locator("#live")).to_contain_text("Live updates paused")
    page.wait_for_timeout(2500)
    expect(status).to_contain_text("The message was not answered: 503")
    expect(page.locator("#messages li.assistant").last).to_contain_text("(no reply)")
    expect(page.get_by_role("button", name="Send")).to_be_enabled()
    # The text comes back for a retry.
    expect(page.get_by_label("Message", exact=True)).to_have_value("Are you there?")
    ratios = dict(page.evaluate(CONTRAST_SCRIPT, ["#status", "#live"]))
    assert ratios["#status"] >= 4.5
    assert ratios["#live"] >= 4.5
    page.close()
