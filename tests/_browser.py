"""Headless chromium for the dashboard: the browser tests' setup, and a screenshot of a run.

Debian's `chromium` and `chromium-driver`, driven by Selenium (scripts/_env.sh installs them for
the dev extra). Every request that is not for 127.0.0.1 goes to a proxy that refuses it, so a
page that needed a CDN or a web font could not draw at all.

    .venv/bin/python -m tests._browser RUN [PNG]   # PNG defaults to docs/dashboard.png

serves RUN's dashboard on a free port of 127.0.0.1, waits until every panel has drawn and saves
the whole page (the README's picture is taken this way from the demo's run, `runs/demo`).
"""

from __future__ import annotations

import argparse
import shutil
import socket
import sys
import threading
from typing import Any

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
WINDOW = (1400, 1000)


def closed_port() -> int:
    """A port of 127.0.0.1 nobody listens on (connections to it are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_browser() -> Any:
    """A headless chromium that can reach 127.0.0.1 only (RuntimeError when not installed)."""
    if not (CHROMIUM and DRIVER):
        raise RuntimeError("chromium and chromium-driver are not installed (apt-get install chromium "
                           "chromium-driver; scripts/_env.sh does it for the dev extra)")
    from selenium import webdriver

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={WINDOW[0]},{WINDOW[1]}", "--no-first-run", "--disable-extensions",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-default-apps", "--disable-domain-reliability", "--metrics-recording-only",
                f"--proxy-server=http://127.0.0.1:{closed_port()}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(DRIVER), options=opts)
    driver.set_page_load_timeout(60)
    return driver


def serve(run: str, token: str | None = None) -> Any:
    """RUN's dashboard on a free port of 127.0.0.1, in a thread (call .shutdown() and
    .server_close())."""
    from elastickit.dashboard.logs import RunSources
    from elastickit.dashboard.server import make_server
    from elastickit.dashboard.summary import Dashboard

    server = make_server(Dashboard(RunSources.from_run_dir(run), min_interval_s=0.2), port=0, token=token)
    server.dashboard.summary()  # read once before the page asks (imports torch once)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def wait_for_panels(driver: Any, timeout: float = 60.0) -> None:
    """Until every panel has drawn its first data."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from elastickit.dashboard.summary import PANELS

    def drawn(d: Any) -> bool:
        return all(d.find_element(By.CSS_SELECTOR, f'section[data-panel="{p}"]').get_attribute("data-version")
                   for p in PANELS)

    WebDriverWait(driver, timeout, poll_frequency=0.1).until(drawn)


def full_page_screenshot(driver: Any, path: str) -> None:
    """The whole page, top to bottom (at most 4000 px), saved as PNG at `path`."""
    driver.execute_script("window.scrollTo(0, 0)")
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(WINDOW[0], min(height + 40, 4000))
    try:
        driver.save_screenshot(path)
    finally:
        driver.set_window_size(*WINDOW)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Save a screenshot of a run's dashboard (headless chromium).")
    p.add_argument("run", help="the run directory (e.g. runs/demo after ./scripts/demo)")
    p.add_argument("png", nargs="?", default="docs/dashboard.png", help="where to save it")
    a = p.parse_args(argv)
    try:
        driver = start_browser()
    except RuntimeError as e:
        print(f"tests._browser: {e}", file=sys.stderr)
        return 2
    server = serve(a.run)
    try:
        driver.get(server.url)
        wait_for_panels(driver)
        full_page_screenshot(driver, a.png)
    finally:
        driver.quit()
        server.shutdown()
        server.server_close()
    print(f"saved {a.png} ({server.url} on {a.run})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
