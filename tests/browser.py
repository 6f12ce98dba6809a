"""Open a local HTML page in headless Chromium over the DevTools protocol (through
``--remote-debugging-pipe``: no WebDriver, no websocket library) and report what a user
would see: console errors, failed loads, every <img>'s natural size, a screenshot."""
from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-extensions",
         "--disable-dev-shm-usage", "--remote-debugging-pipe", "--window-size=1280,2000"]


def find_chromium() -> Optional[str]:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class _Pipe:
    def __init__(self, write_fd: int, read_fd: int):
        self.write_fd, self.read_fd, self.buffer, self.next_id = write_fd, read_fd, b"", 0
        self.events: List[dict] = []

    def send(self, method: str, params: Optional[dict] = None, session: Optional[str] = None) -> int:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self.write_fd, json.dumps(message).encode() + b"\0")
        return self.next_id

    def read(self, deadline: float) -> dict:
        while b"\0" not in self.buffer:
            if time.monotonic() > deadline:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self.read_fd, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self.buffer += chunk
        message, _, self.buffer = self.buffer.partition(b"\0")
        return json.loads(message)

    def call(self, method: str, params: Optional[dict] = None, session: Optional[str] = None,
             timeout: float = 60) -> dict:
        wanted = self.send(method, params, session)
        deadline = time.monotonic() + timeout
        while True:
            message = self.read(deadline)
            if message.get("id") == wanted:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def wait_event(self, method: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        for index, event in enumerate(self.events):
            if event.get("method") == method:
                return self.events.pop(index)
        while True:
            message = self.read(deadline)
            if message.get("method") == method:
                return message
            self.events.append(message)


def inspect_page(page: Path, screenshot: Path, timeout: float = 120) -> Dict[str, object]:
    """Load ``page`` (file URL), wait for the load event, and return ``{"errors": [...],
    "images": [{"src", "complete", "naturalWidth"}], "title": str}``; write a full-page
    PNG screenshot to ``screenshot``."""
    chromium = find_chromium()
    if chromium is None:
        raise FileNotFoundError("chromium not found")
    profile = tempfile.mkdtemp(prefix="cnnviz-chromium-")
    to_child, from_parent = os.pipe()   # we write commands → Chromium reads fd 3
    to_parent, from_child = os.pipe()   # Chromium writes fd 4 → we read

    def child_fds():  # fd 3 / fd 4 of Chromium; moved high first so neither dup2 clobbers the other
        high_in, high_out = fcntl.fcntl(to_child, fcntl.F_DUPFD, 100), fcntl.fcntl(from_child, fcntl.F_DUPFD, 100)
        os.dup2(high_in, 3)
        os.dup2(high_out, 4)

    process = subprocess.Popen(
        [chromium, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        pass_fds=(3, 4), preexec_fn=child_fds)
    os.close(to_child)
    os.close(from_child)
    pipe = _Pipe(from_parent, to_parent)
    try:
        target = pipe.call("Target.createTarget", {"url": "about:blank"}, timeout=timeout)["targetId"]
        session = pipe.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            pipe.call(f"{domain}.enable", session=session)
        pipe.call("Page.navigate", {"url": page.resolve().as_uri()}, session=session)
        pipe.wait_event("Page.loadEventFired", timeout=timeout)
        result = pipe.call("Runtime.evaluate", {"expression": (
            "JSON.stringify({title: document.title, images: Array.from(document.images).map("
            "i => ({src: i.getAttribute('src'), complete: i.complete, naturalWidth: i.naturalWidth}))})"),
            "returnByValue": True}, session=session)
        found = json.loads(result["result"]["value"])
        metrics = pipe.call("Page.getLayoutMetrics", session=session)
        height = min(int(metrics["cssContentSize"]["height"]), 16000)
        shot = pipe.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                                    "clip": {"x": 0, "y": 0, "width": 1280, "height": height,
                                                             "scale": 1}}, session=session, timeout=timeout)
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        errors = []
        for event in pipe.events:
            params = event.get("params", {})
            if event.get("method") == "Runtime.exceptionThrown":
                errors.append(params["exceptionDetails"].get("text", "exception"))
            elif event.get("method") == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                errors.append(" ".join(str(a.get("value", a.get("description"))) for a in params.get("args", [])))
            elif event.get("method") == "Log.entryAdded" and params["entry"].get("level") == "error":
                errors.append(f"{params['entry'].get('text')} {params['entry'].get('url', '')}")
        found["errors"] = errors
        try:
            pipe.call("Browser.close", timeout=10)
        except (RuntimeError, TimeoutError):
            pass
        return found
    finally:
        os.close(from_parent)
        os.close(to_parent)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(profile, ignore_errors=True)
