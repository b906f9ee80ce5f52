"""The sweep report in a real browser: headless Chromium opens every page of a report written
from the synthetic sweep, and every image and plot must load with no console error.

Chromium is driven through its DevTools protocol with a small client over ``websocket-client``:
``--dump-dom`` and ``--screenshot`` alone cannot tell whether each ``<img>`` decoded
(``naturalWidth``) nor catch console messages, and chromedriver would add Selenium for nothing.
Screenshots of the summary and of a comparison page are kept under pytest's tmp dir (the test
prints their paths). CI installs Debian's ``chromium`` (see ``.ci/run``); elsewhere the test is
skipped when no Chromium is installed.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from loralab.sweep.report import write_report
from loralab.sweep.scoring import ScoringSettings, build_scorers, per_image_mean, score_sweep
from sweep_report_support import magenta_share, make_sweep

websocket = pytest.importorskip("websocket", reason="the browser test needs websocket-client (the test extra)")

CHROMIUM = next(
    (path for name in ("chromium", "chromium-browser", "google-chrome") if (path := shutil.which(name))), None
)
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-port=0",  # the browser picks a free port and writes it to DevToolsActivePort
    "--window-size=1280,900",
)
TIMEOUT = 60.0  # seconds; Chromium's first start on a busy 2-core machine is slow

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium installed (CI installs it: apt-get install chromium)"
)


class DevToolsPage:
    """One Chromium page driven over the DevTools protocol: navigate, evaluate, screenshot, and
    the console errors, uncaught exceptions and failed loads it reported."""

    def __init__(self, user_data_dir: Path, log_path: Path) -> None:
        self._log = open(log_path, "wb")
        port_file = user_data_dir / "DevToolsActivePort"
        port_file.unlink(missing_ok=True)  # a profile used before holds the port of a browser long gone
        self.process = subprocess.Popen(
            [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={user_data_dir}", "about:blank"],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        try:
            port = self._wait_for_port(port_file)
            targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=TIMEOUT))
            page = next(target for target in targets if target["type"] == "page")
            # No Origin header: Chromium refuses DevTools connections from origins it was not told to allow.
            self.socket = websocket.create_connection(
                page["webSocketDebuggerUrl"], timeout=TIMEOUT, suppress_origin=True
            )
        except BaseException:
            self._stop_browser(terminate=True)  # never leave a headless browser behind
            raise
        self._next_id = 0
        self.events: list[dict[str, Any]] = []
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable")

    def _wait_for_port(self, port_file: Path) -> int:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.process.returncode}; see {self._log.name}")
            if port_file.is_file() and port_file.read_text().strip():
                return int(port_file.read_text().split()[0])
            time.sleep(0.1)
        raise TimeoutError("chromium did not open its DevTools port")

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one command and return its result; events that arrive meanwhile are kept."""
        self._next_id += 1
        self.socket.send(json.dumps({"id": self._next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get("id") == self._next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def wait_for_event(self, method: str) -> dict[str, Any]:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            for index, event in enumerate(self.events):
                if event.get("method") == method:
                    return self.events.pop(index)
            self.events.append(json.loads(self.socket.recv()))
        raise TimeoutError(f"no {method} event")

    def open(self, url: str) -> None:
        """Navigate and wait until the page and all its images have loaded."""
        self.events.clear()
        self.call("Page.navigate", url=url)
        self.wait_for_event("Page.loadEventFired")

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and browser-logged errors (e.g. a file not found)."""
        found = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                found.append(f"console: {[arg.get('value') for arg in params.get('args', [])]}")
            elif method == "Runtime.exceptionThrown":
                found.append(f"exception: {params.get('exceptionDetails', {}).get('text')}")
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                entry = params["entry"]
                found.append(f"log: {entry.get('text')} {entry.get('url', '')}")
        return found

    def screenshot(self, path: Path, max_height: int = 8000) -> Path:
        """A PNG of the whole page (up to ``max_height`` CSS pixels)."""
        size = self.call("Page.getLayoutMetrics")["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], max_height), "scale": 1}
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True, clip=clip)["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except Exception:  # the browser may close the socket before it answers
            pass
        self.socket.close()
        self._stop_browser(terminate=False)

    def _stop_browser(self, *, terminate: bool) -> None:
        """Wait for the browser to exit (``terminate``: ask it to first); kill it if it will not."""
        if terminate and self.process.poll() is None:
            self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()


IMAGES_JS = (
    "JSON.stringify(Array.from(document.images).map(i => "
    "({src: i.getAttribute('src'), complete: i.complete, width: i.naturalWidth})))"
)


def test_report_opens_in_headless_chromium_with_every_image_and_no_error(tmp_path: Path) -> None:
    sweep = make_sweep(tmp_path)
    scorers = build_scorers(ScoringSettings())
    scorers.add("magenta", per_image_mean(magenta_share, trigger=True))
    score_sweep(sweep, scorers)
    index = write_report(sweep)
    pages = [index] + sorted(path for path in index.parent.glob("*.html") if path != index)
    assert len(pages) == 3  # the summary and the two comparisons

    browser = DevToolsPage(tmp_path / "chromium-profile", tmp_path / "chromium.log")
    try:
        shots = []
        for page_path in pages:
            browser.open(page_path.as_uri())
            images = json.loads(browser.evaluate(IMAGES_JS))
            assert browser.evaluate("document.title"), page_path
            if page_path != index:
                assert len(images) >= 3 + 4, f"{page_path.name}: plots and grids expected, found {len(images)} images"
            broken = [image["src"] for image in images if not image["complete"] or image["width"] <= 0]
            assert not broken, f"{page_path.name}: images that did not load: {broken}"
            assert browser.errors() == [], f"{page_path.name}: {browser.errors()}"
            if page_path == index or page_path.stem == "network_dim":
                shots.append(browser.screenshot(tmp_path / f"report-{page_path.stem}.png"))
    finally:
        browser.close()
    for shot in shots:
        assert shot.stat().st_size > 10_000
        print(f"report screenshot: {shot}")


def test_a_missing_image_is_caught_by_the_browser_check(tmp_path: Path) -> None:
    """The check above can fail: a report with one image removed shows up as broken."""
    sweep = make_sweep(tmp_path)
    index = write_report(sweep)
    victim = next((index.parent / "assets" / "network_dim").glob("grid-*.png"))
    victim.unlink()
    browser = DevToolsPage(tmp_path / "chromium-profile", tmp_path / "chromium.log")
    try:
        browser.open((index.parent / "network_dim.html").as_uri())
        images = json.loads(browser.evaluate(IMAGES_JS))
        broken = [image["src"] for image in images if image["width"] <= 0]
        errors = browser.errors()
    finally:
        browser.close()
    assert broken == [f"assets/network_dim/{victim.name}"]
    assert any(victim.name in error for error in errors), errors
