"""Loopback port helpers: pick free ports and list what a process listens on."""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
from collections.abc import Iterable

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """Return a TCP port that is free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def is_port_free(port: int) -> bool:
    """True if ``port`` can be bound on 127.0.0.1 and on all interfaces (what SeaweedFS checks)."""
    for host in (LOOPBACK, ""):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError:
                return False
    return True


def free_port_with_offset(offset: int, exclude: Iterable[int] = (), attempts: int = 200) -> int:
    """Return a free port ``p`` such that ``p + offset`` is free too (for servers that derive a second port)."""
    taken = set(exclude)
    for _ in range(attempts):
        port = free_port()
        other = port + offset
        if port in taken or other in taken or not 1024 < other < 65536:
            continue
        if is_port_free(other):
            return port
    raise RuntimeError(f"no free port pair with offset {offset} after {attempts} attempts")


def free_ports(count: int) -> list[int]:
    """Return ``count`` distinct free ports on 127.0.0.1."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def listening_tcp(pids: Iterable[int]) -> list[tuple[str, int, int]]:
    """(address, port, pid) of every TCP listening socket owned by ``pids``, parsed from ``ss -ltnpH``."""
    ss = shutil.which("ss")
    if ss is None:
        raise RuntimeError("`ss` (iproute2) is not on PATH; install iproute2 to inspect listening sockets")
    wanted = set(pids)
    out = subprocess.run([ss, "-ltnpH"], check=True, capture_output=True, text=True).stdout
    found: list[tuple[str, int, int]] = []
    for line in out.splitlines():
        fields = line.split()
        if len(fields) < 6:
            continue
        local = fields[3]
        addr, _, port = local.rpartition(":")
        for pid in _pids_in_users(fields[5]):
            if pid in wanted:
                found.append((addr.strip("[]"), int(port), pid))
    return found


def _pids_in_users(users: str) -> list[int]:
    """Parse ``users:(("weed",pid=12,fd=3),...)`` into pids."""
    pids = []
    for part in users.split("pid=")[1:]:
        digits = part.split(",", 1)[0].rstrip(")")
        if digits.isdigit():
            pids.append(int(digits))
    return pids
