"""Frames decoded in a child process, so a video can fail its own row but never take the rank down.

A crafted or broken file can crash the native decoder (a segfault, ``std::bad_alloc`` and ``abort()``), make
it allocate without bound, or hang it. Decoded in the rank itself, any of these kills or stalls the whole rank
before the row is journaled, so every attempt dies on the same row. Here each decode runs in a long-lived
child (``python -m captioning_core.decode_sandbox``, one per concurrent decode, started on first use): the
parent sends the path and frame indices, the child opens the video, decodes exactly as
:func:`captioning_core.video.read_frames` does and writes the raw frames back over its stdout pipe.

- A child killed by a signal fails the row. SIGKILL (the kernel's OOM killer, which takes the child first:
  its ``oom_score_adj`` is raised to 1000) and a decode over ``timeout`` seconds are transient
  (:class:`DecoderKilled`): the row is retried by later attempts until ``--max_row_attempts``. Any other
  signal (SIGSEGV, SIGABRT) is the file's: :class:`DecoderCrashed`, a final ``failed`` row.
- The child is replaced after a failure; the other rows decode in their own children.
- A child exits when the rank does: its stdin closes, and a watchdog thread sees its parent change.

The byte cap (``--max_decode_bytes``) is checked in the child before it decodes anything
(:func:`captioning_core.video.check_decode_budget`).
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import threading
import time

import numpy as np

from captioning_core.errors import TransientError
from captioning_core.video import VideoError

_HEADER = struct.Struct("!Q")


class DecoderCrashed(VideoError):
    """The decoder process died on this video (a native crash): the file's fault, final."""


class DecoderKilled(TransientError):
    """The decoder process was killed (the OOM killer's SIGKILL) or overran its time: retried later."""


#: the rank's identity and device settings stay with the rank: a decoder is no rank and runs no MindSpore
_RANK_ONLY = ("MS_", "RANK", "LOCAL_RANK", "HCCL", "ASCEND", "DEVICE_ID")


class _Child:
    def __init__(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(_RANK_ONLY)}
        self.proc = subprocess.Popen([sys.executable, "-m", "captioning_core.decode_sandbox"], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)

    def call(self, path: str, indices: list[int], max_bytes: int, timeout: float) -> np.ndarray:
        """The frames, or the child's own exception raised here (a VideoError, MemoryError, OSError...)."""
        request = pickle.dumps((path, indices, max_bytes))
        self.proc.stdin.write(_HEADER.pack(len(request)) + request)
        deadline = time.monotonic() + timeout if timeout > 0 else None
        size = _HEADER.unpack(self._read(_HEADER.size, deadline, path))[0]
        reply = pickle.loads(self._read(size, deadline, path))
        if reply[0] == "raise":
            raise reply[1]
        _, shape, dtype = reply
        frames = np.empty(shape, dtype=dtype)
        self._read_into(memoryview(frames).cast("B"), deadline, path)
        return frames

    def _read(self, count: int, deadline: float | None, path: str) -> bytes:
        buf = bytearray(count)
        self._read_into(memoryview(buf), deadline, path)
        return bytes(buf)

    def _read_into(self, view: memoryview, deadline: float | None, path: str) -> None:
        fd = self.proc.stdout.fileno()
        got = 0
        while got < len(view):
            wait = None if deadline is None else deadline - time.monotonic()
            if wait is not None and (wait <= 0 or not select.select([fd], [], [], wait)[0]):
                self.kill()
                raise DecoderKilled(f"decoding {path} took over the decode timeout; the decoder was killed")
            n = os.readv(fd, [view[got:]])
            if n == 0:
                raise self._died(path)
            got += n

    def _died(self, path: str) -> Exception:
        code = self.proc.wait()
        if code < 0 and -code == signal.SIGKILL:
            return DecoderKilled(f"the decoder was killed (SIGKILL: out of memory?) while decoding {path}")
        name = signal.Signals(-code).name if code < 0 else f"exit code {code}"
        return DecoderCrashed(f"the decoder crashed on this video ({name})")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=5)
        except Exception:
            self.kill()


class DecodeSandbox:
    """Decodes in child processes; thread-safe (one child per concurrent caller, reused while healthy)."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._idle: list[_Child] = []
        self._lock = threading.Lock()
        self._closed = False

    def read_frames(self, path: str, indices: list[int], max_bytes: int = 0) -> np.ndarray:
        with self._lock:
            if self._closed:
                raise RuntimeError("the decode sandbox is closed")
            child = self._idle.pop() if self._idle else None
        child = child or _Child()
        try:
            frames = child.call(path, [int(i) for i in indices], max_bytes, self.timeout)
        except (DecoderKilled, DecoderCrashed):
            child.kill()
            raise
        except Exception:  # the child answered with its error: it is healthy, reuse it
            self._give_back(child)
            raise
        except BaseException:
            child.kill()
            raise
        self._give_back(child)
        return frames

    def _give_back(self, child: _Child) -> None:
        with self._lock:
            if not self._closed and child.proc.poll() is None:
                self._idle.append(child)
                return
        child.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for child in idle:
            child.close()


# -- the child ------------------------------------------------------------------------------------------
def _read_exactly(stream, count: int) -> bytes | None:
    data = b""
    while len(data) < count:
        chunk = stream.read(count - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _watch_parent(parent: int) -> None:
    while True:
        if os.getppid() != parent:
            os._exit(1)
        time.sleep(1.0)


def _serve() -> None:
    from captioning_core import faults, video

    parent = os.getppid()
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    try:
        with open("/proc/self/oom_score_adj", "w") as fh:  # the OOM killer takes a decoder before its rank
            fh.write("1000")
    except OSError:
        pass
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        header = _read_exactly(stdin, _HEADER.size)
        if header is None:
            return
        path, indices, max_bytes = pickle.loads(_read_exactly(stdin, _HEADER.unpack(header)[0]))
        faults.decoder_fault(path)
        try:
            frames = np.ascontiguousarray(video.read_frames_here(video.open_video(path), indices, max_bytes))
            reply = pickle.dumps(("ok", frames.shape, frames.dtype.str))
        except Exception as err:  # sent back and raised in the rank, where errors.classify judges it
            frames = None
            try:
                reply = pickle.dumps(("raise", err))
            except Exception:  # an exception that does not pickle: its text
                reply = pickle.dumps(("raise", VideoError(f"{type(err).__name__}: {err}")))
        stdout.write(_HEADER.pack(len(reply)) + reply)
        if frames is not None:
            stdout.write(memoryview(frames).cast("B"))
        stdout.flush()


if __name__ == "__main__":
    _serve()
