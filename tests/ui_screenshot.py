"""Take docs/ui-dashboard.png: the page at /ui after a real conversation with the real model.

Run by `make screenshot`. It starts `senab serve` with the default model and its shipped
bridge checkpoint on a free loopback port. The server uses the Redis at REDIS_URL (default
127.0.0.1:6379) under a key prefix of its own, deleted afterwards. The script then drives the
page in headless Chromium: neutral messages, one hostile message, neutral ones again.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import uuid
from pathlib import Path

from tests.app.conftest import delete_prefix
from tests.browser import chromium
from tests.helpers import ServerProcess

CONVERSATION = [
    "Hi! How are you today?",
    "Can you recommend a good book for a rainy afternoon?",
    "You are useless and stupid. I hate talking to you, this is terrible and awful!",
    "What is the capital of France?",
    "How many days are in a week?",
    "Thanks, have a nice day!",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/ui-dashboard.png", help="PNG to write (default docs/ui-dashboard.png)")
    parser.add_argument("--max-tokens", type=int, default=48, help="tokens per reply (default 48)")
    args = parser.parse_args()
    from playwright.sync_api import expect

    expect.set_options(timeout=180_000)  # a real reply on a CPU takes seconds
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    prefix = f"senab-screenshot-{uuid.uuid4().hex}"
    env = {"REDIS_URL": redis_url, "SENAB_REDIS_PREFIX": prefix, "SENAB_DEFAULT_TEMPERATURE": "0",
           "SENAB_MAX_TOKENS_DEFAULT": str(args.max_tokens)}
    with tempfile.TemporaryDirectory() as scratch:
        server = ServerProcess(env, Path(scratch) / "server.log")
        try:
            with chromium() as browser:
                page = browser.new_page(viewport={"width": 1360, "height": 900})
                page.set_default_timeout(180_000)
                page.goto(server.url + "/ui")
                expect(page.locator("#status")).to_contain_text("Ready.")
                for turn, message in enumerate(CONVERSATION, 1):
                    page.get_by_label("Message", exact=True).fill(message)
                    page.get_by_label("Message", exact=True).press("Enter")
                    expect(page.locator("#messages li.assistant")).to_have_count(turn)
                    expect(page.get_by_role("button", name="Send")).to_be_enabled()
                    expect(page.locator("#chart circle.point.distance")).to_have_count(turn)
                    print(f"turn {turn}: {page.locator('#latest').inner_text()}", flush=True)
                page.locator("#values summary").click()
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=args.out, full_page=True)
        finally:
            server.stop()
            delete_prefix(redis_url, prefix)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
