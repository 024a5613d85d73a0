"""Headless Chromium (Debian's package) for screenshots and rendered DOM of pages served on 127.0.0.1."""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from testkit.process import stop_process_group

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars"]


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    raise RuntimeError("chromium not found: `make setup` installs Debian's chromium")


def _run(url: str, extra: list[str], wait_ms: int, timeout: float) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        argv = [chromium(), *FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={wait_ms}", *extra, url]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def dump_dom(url: str, wait_ms: int = 15000, timeout: float = 120) -> str:
    """The DOM after scripts ran for ``wait_ms`` of virtual time."""
    proc = _run(url, ["--dump-dom"], wait_ms, timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"chromium failed on {url}: {proc.stderr[-2000:]}")
    return proc.stdout


def screenshot(url: str, path: Path | str, size: tuple[int, int] = (1400, 900), wait_ms: int = 15000,
               timeout: float = 120) -> Path:
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    proc = _run(url, [f"--screenshot={path}", f"--window-size={size[0]},{size[1]}"], wait_ms, timeout)
    if proc.returncode != 0 or not path.exists():
        raise RuntimeError(f"chromium screenshot of {url} failed: {proc.stderr[-2000:]}")
    return path


def visit(url: str, cookies: dict[str, str] | None = None, settle: float = 6.0, timeout: float = 120,
          screenshot: Path | str | None = None, size: tuple[int, int] = (1400, 900)) -> dict:
    """Load ``url`` in headless Chromium through the DevTools protocol, with ``cookies`` set for its origin
    first (how a logged-in user's browser arrives). Returns the page's ``title`` and ``html`` as rendered,
    and every ``responses`` entry (url, status, headers) and ``failures`` entry (url, reason) seen while it
    loaded and for ``settle`` seconds after; with ``screenshot``, a PNG of the page there. Chromium runs in a
    private profile, bound to 127.0.0.1, and is stopped by PID."""
    import json
    import time
    from urllib.parse import urlsplit
    from urllib.request import urlopen

    from websockets.sync.client import connect

    origin = "{0.scheme}://{0.netloc}".format(urlsplit(url))
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        proc = subprocess.Popen([chromium(), *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0",
                                 "--remote-debugging-address=127.0.0.1", "about:blank"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            port_file = Path(profile) / "DevToolsActivePort"
            deadline = time.monotonic() + 60
            while not (port_file.exists() and port_file.read_text().strip()) and time.monotonic() < deadline:
                time.sleep(0.2)
            port = int(port_file.read_text().split()[0])
            with urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30) as resp:
                page = next(t for t in json.loads(resp.read()) if t["type"] == "page")
            with connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=30) as ws:
                return _drive(ws, url, origin, cookies or {}, settle, timeout, screenshot, size)
        finally:  # the whole group: renderer and helper processes still write to the profile otherwise
            stop_process_group(proc, "chromium", steps=((signal.SIGTERM, 5.0),))


def _drive(ws, url: str, origin: str, cookies: dict[str, str], settle: float, timeout: float,
           screenshot: Path | str | None, size: tuple[int, int]) -> dict:
    import base64
    import json
    import time

    counter = iter(range(1, 1_000_000))
    events: list[dict] = []

    def call(method: str, **params):
        msg_id = next(counter)
        ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = json.loads(ws.recv(timeout=timeout))
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            events.append(msg)

    call("Network.enable")
    call("Page.enable")
    call("Emulation.setDeviceMetricsOverride", width=size[0], height=size[1], deviceScaleFactor=1, mobile=False)
    for name, value in cookies.items():
        call("Network.setCookie", name=name, value=value, url=origin, path="/")
    call("Page.navigate", url=url)
    deadline = time.monotonic() + timeout
    loaded_at = None
    while time.monotonic() < deadline:
        if loaded_at is None and any(e.get("method") == "Page.loadEventFired" for e in events):
            loaded_at = time.monotonic()
        if loaded_at is not None and time.monotonic() - loaded_at >= settle:
            break
        try:
            events.append(json.loads(ws.recv(timeout=0.5)))
        except TimeoutError:
            continue
    title = call("Runtime.evaluate", expression="document.title", returnByValue=True)["result"].get("value")
    html = call("Runtime.evaluate", expression="document.documentElement.outerHTML",
                returnByValue=True)["result"].get("value")
    if screenshot is not None:
        Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
        Path(screenshot).write_bytes(base64.b64decode(call("Page.captureScreenshot", format="png")["data"]))
    responses = [{"url": e["params"]["response"]["url"], "status": e["params"]["response"]["status"],
                  "headers": {k.lower(): v for k, v in e["params"]["response"]["headers"].items()}}
                 for e in events if e.get("method") == "Network.responseReceived"]
    failures = [{"id": e["params"].get("requestId"), "reason": e["params"].get("blockedReason")
                 or e["params"].get("errorText")} for e in events if e.get("method") == "Network.loadingFailed"]
    return {"title": title, "html": html or "", "responses": responses, "failures": failures}
