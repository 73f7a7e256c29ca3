"""Headless Chromium for the page's tests, driven by Playwright.

Playwright's own browser download does not work on machines without internet access, so
the tests drive the system's Chromium (Debian's `chromium` package, installed by
`make browser`). SENAB_CHROMIUM names another executable.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Without the background-networking switches Chromium keeps trying to reach Google's
# services, which a closed network refuses.
CHROMIUM_ARGS = ["--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]

ARTIFACTS = Path(os.environ.get("SENAB_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "build" / "test-artifacts"))


def chromium_path() -> str | None:
    """Return the Chromium executable to drive, or None when none is installed."""
    for candidate in (os.environ.get("SENAB_CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and Path(candidate).exists():
            return candidate
    return None


@contextmanager
def chromium() -> Iterator[object]:
    """Yield a headless Playwright Browser on the system's Chromium."""
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    if executable is None:
        raise FileNotFoundError("no Chromium found: run `make browser` or set SENAB_CHROMIUM")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


# Contrast ratio of each selected element's text against the first opaque background
# behind it (WCAG 2 relative luminance).
CONTRAST_SCRIPT = """
(selectors) => {
  const parse = (css) => {
    const values = css.match(/rgba?\\(([^)]+)\\)/)[1].split(/[ ,\\/]+/).filter(Boolean).map(Number);
    return values.length === 3 ? [...values, 1] : values;
  };
  const channel = (x) => { x /= 255; return x <= 0.03928 ? x / 12.92 : ((x + 0.055) / 1.055) ** 2.4; };
  const luminance = ([r, g, b]) => 0.2126 * channel(r) + 0.7152 * channel(g) + 0.0722 * channel(b);
  const background = (element) => {
    for (let e = element; e; e = e.parentElement) {
      const colour = parse(getComputedStyle(e).backgroundColor);
      if (colour[3] > 0) return colour;
    }
    return [255, 255, 255, 1];
  };
  return selectors.map((selector) => {
    const element = document.querySelector(selector);
    if (!element) return [selector, null];
    const [high, low] = [luminance(parse(getComputedStyle(element).color)), luminance(background(element))]
      .sort((a, b) => b - a);
    return [selector, (high + 0.05) / (low + 0.05)];
  });
}
"""
