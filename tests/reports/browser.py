"""Open a page in real headless Chromium, offline, and report what a person would notice: requests that
left the machine or failed, console errors and warnings, uncaught exceptions; plus a full-page screenshot.

Chromium is driven through its DevTools protocol over a websocket (``websockets``' sync client), so no
browser download or driver is needed: Debian's ``chromium`` package is the browser. Networking is cut
with the protocol's offline emulation, and every request the page makes is recorded: a page that
needs anything but file:, data: or about: URLs fails the check, whether or not the request would
have succeeded.

    with Chromium.launch(tmp_path / "profile") as browser:
        page = browser.open(path, ready="document.images.length > 0")
        page.problems()            # [] when the page loaded cleanly
        page.evaluate("document.title")
        page.screenshot(artifacts / "report.png")
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

# Flags of a quiet, isolated, offline-friendly headless browser (no sync, updates, pings or first-run UI).
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--no-default-browser-check", "--disable-extensions",
         "--disable-default-apps", "--mute-audio", "--hide-scrollbars", "--remote-debugging-port=0"]
LOCAL_SCHEMES = ("file:", "data:", "about:", "blob:")
ALLOW_MISSING = "MOE_LAB_ALLOW_NO_BROWSER"  # set to 1 to skip (not fail) the browser tests without Chromium
INSTALL = "apt-get install -y --no-install-recommends chromium"


def find_chromium() -> str | None:
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and (path := shutil.which(name)):
            return path
    return None


@dataclass
class PageLog:
    requests: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    console: list[str] = field(default_factory=list)  # errors and warnings
    exceptions: list[str] = field(default_factory=list)


class Page:
    def __init__(self, browser: "Chromium", session: str):
        self.browser, self.session, self.log = browser, session, PageLog()

    def send(self, method: str, **params):
        return self.browser.call(method, params, self.session)

    def _on_event(self, method: str, params: dict) -> None:
        log = self.log
        if method == "Network.requestWillBeSent":
            log.requests.append(params["request"]["url"])
        elif method == "Network.loadingFailed" and not params.get("canceled"):
            log.failed.append(f"{params.get('type', '?')} {params.get('errorText', '')} (request {params['requestId']})")
        elif method == "Network.responseReceived" and params["response"].get("status", 200) >= 400:
            log.failed.append(f"HTTP {params['response']['status']} {params['response']['url']}")
        elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "warning", "assert"):
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
            log.console.append(f"console.{params['type']}: {text}")
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            log.exceptions.append(details.get("exception", {}).get("description") or details.get("text", "?"))
        elif method == "Log.entryAdded" and params["entry"]["level"] in ("error", "warning"):
            entry = params["entry"]
            log.console.append(f"{entry['source']} {entry['level']}: {entry['text']} {entry.get('url', '')}".strip())

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression!r} raised {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def problems(self) -> list[str]:
        """Everything that says the page did not work offline and cleanly."""
        log = self.log
        remote = [u for u in log.requests if not u.startswith(LOCAL_SCHEMES)]
        return ([f"request to the network: {u}" for u in remote] + [f"failed request: {f}" for f in log.failed]
                + log.console + [f"uncaught exception: {e}" for e in log.exceptions])

    def screenshot(self, path: Path, width: int = 1280) -> Path:
        """The whole page (the viewport grown to the content's height), as PNG."""
        height = int(self.evaluate("Math.ceil(document.documentElement.scrollHeight)"))
        self.send("Emulation.setDeviceMetricsOverride", width=width, height=min(max(height, 200), 16000),
                  deviceScaleFactor=1, mobile=False)
        data = self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path


class Chromium:
    """One headless browser process (its own temporary profile), talked to over one websocket."""

    def __init__(self, proc: subprocess.Popen, ws, profile: Path):
        self.proc, self.ws, self.profile = proc, ws, profile
        self.next_id, self.pages = 0, {}

    @classmethod
    def launch(cls, profile: Path, executable: str | None = None, timeout: float = 30) -> "Chromium":
        from websockets.sync.client import connect

        executable = executable or find_chromium()
        if executable is None:
            raise FileNotFoundError(f"no chromium on PATH: install it with `{INSTALL}`")
        profile = Path(profile)
        profile.mkdir(parents=True, exist_ok=True)
        port_file = profile / "DevToolsActivePort"
        port_file.unlink(missing_ok=True)  # left by an earlier browser on this profile
        log = open(profile / "chromium.log", "w")
        proc = subprocess.Popen([executable, *FLAGS, f"--user-data-dir={profile}", "about:blank"], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + timeout
        while not (port_file.exists() and len(port_file.read_text().split()) >= 2):  # Chromium writes port, then path
            if proc.poll() is not None or time.time() > deadline:
                cls._stop(proc)
                raise RuntimeError(f"chromium did not start: {(profile / 'chromium.log').read_text()[-2000:]}")
            time.sleep(0.1)
        port, path = port_file.read_text().split()[:2]
        try:
            ws = connect(f"ws://127.0.0.1:{port}{path}", max_size=64 * 2**20, open_timeout=timeout)
        except Exception:
            cls._stop(proc)
            raise
        return cls(proc, ws, profile)

    def call(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30):
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        self.ws.send(json.dumps(message))
        deadline = time.time() + timeout
        while True:
            reply = self._receive(max(deadline - time.time(), 0.01))
            if reply is None:
                raise TimeoutError(f"{method}: no reply in {timeout} s")
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def _receive(self, timeout: float) -> dict | None:
        try:
            reply = json.loads(self.ws.recv(timeout=timeout))
        except TimeoutError:
            return None
        if "method" in reply and reply.get("sessionId") in self.pages:
            self.pages[reply["sessionId"]]._on_event(reply["method"], reply.get("params", {}))
        return reply

    def pump(self, seconds: float) -> None:
        """Deliver the events that arrive within ``seconds``."""
        deadline = time.time() + seconds
        while time.time() < deadline:
            self._receive(max(deadline - time.time(), 0.01))

    def open(self, target: Path | str, ready: str = "true", timeout: float = 30, settle: float = 0.5) -> Page:
        """A new tab, offline, showing ``target`` (a path or URL); returns once the load event fired and
        the JavaScript expression ``ready`` is true (then ``settle`` seconds more for late messages)."""
        url = Path(target).resolve().as_uri() if not str(target).startswith(("file:", "http:", "https:")) else str(target)
        target_id = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target_id, "flatten": True})["sessionId"]
        page = self.pages[session] = Page(self, session)
        for domain in ("Network", "Runtime", "Log", "Page"):
            page.send(f"{domain}.enable")
        page.send("Network.emulateNetworkConditions", offline=True, latency=0, downloadThroughput=-1, uploadThroughput=-1)
        page.send("Emulation.setDeviceMetricsOverride", width=1280, height=900, deviceScaleFactor=1, mobile=False)
        page.send("Page.navigate", url=url)
        deadline = time.time() + timeout
        while not page.evaluate(f"document.readyState === 'complete' && Boolean({ready})"):
            if time.time() > deadline:
                raise TimeoutError(f"{url}: not ready ({ready}) after {timeout} s; problems: {page.problems()}")
            self.pump(0.2)
        self.pump(settle)
        return page

    @staticmethod
    def _stop(proc: subprocess.Popen) -> None:
        """TERM the browser's process group (it and the renderers it started: its own session), KILL it
        if it has not exited after 10 s."""
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, None)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            self._stop(self.proc)

    def __enter__(self) -> "Chromium":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
