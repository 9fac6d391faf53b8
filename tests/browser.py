"""What the browser tests share: Debian's Chromium (driven by Playwright, which downloads no browser
of its own) and the flags it runs with on a closed network.

Where the browser or Playwright is missing a test is skipped, except under CI (the env var CI set
and non-empty): there the setup installs both, so a missing one fails the test instead of letting
the browser tests pass by not running (conftest.missing, the rule for every optional dependency).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import ModuleType

from conftest import missing, require

SETUP_HINT = "run `make setup-browser`"
# Flags for a closed network: without the background-networking ones Chromium keeps dialling out.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
_CANDIDATES = ("/usr/bin/chromium",)
_ON_PATH = ("chromium", "chromium-browser")


def sync_playwright_api(module_level: bool = True) -> ModuleType:
    """playwright.sync_api, or a skip (a failure under CI) where Playwright is not installed."""
    return require("playwright.sync_api", module_level)


def find_chromium() -> str | None:
    for path in _CANDIDATES:
        if Path(path).is_file() and os.access(path, os.X_OK):
            return path
    for name in _ON_PATH:
        path = shutil.which(name)
        if path is not None:
            return path
    return None


def chromium_executable() -> str:
    """The path of Debian's Chromium, or a skip (a failure under CI) where it is not installed."""
    path = find_chromium()
    if path is None:
        missing(f"Chromium not found (looked for {', '.join(_CANDIDATES)} and {', '.join(_ON_PATH)} "
                f"on PATH): {SETUP_HINT}")
    return path
