"""Headless Chromium (Debian's package) for screenshots and rendered DOM of pages served on 127.0.0.1."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

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
