"""Item 13: what the full-content checkpoint fingerprint costs, first read vs the host's cached digests.

There is no 15 GB checkpoint here, so the item writes ``fingerprint_gib`` GiB of random bytes as sharded
safetensors (plus config and a 7 MiB tokenizer.json), then fingerprints the directory three ways:

- first read, cold: each file's pages are dropped from the page cache first (fsync, then
  ``posix_fadvise(DONTNEED)``, which needs no root); the bytes the kernel fetched from the device
  (``/proc/self/io`` read_bytes) are printed, so a cold read that was not cold shows;
- first read, warm: the same with the pages in memory (hashing only; no digest cache);
- cached digests: the host's digest cache already holds every file (a stat per file).

Seconds are extrapolated linearly to 15 GB. Also measured side by side: SHA-256 vs BLAKE2b over the same
in-memory bytes (why file_digest uses SHA-256).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from benchmarks.common import report

GB15 = 15e9
SHARD_GIB = 1


def _write_checkpoint(root: Path, gib: float) -> int:
    """Shards of random bytes (safetensors-shaped), config.json and tokenizer.json; returns total bytes."""
    root.mkdir(parents=True)
    shards = max(1, round(gib / SHARD_GIB))
    size = int(gib * 2**30) // shards
    chunk = 16 * 2**20
    for i in range(shards):
        header = json.dumps({"w": {"dtype": "BF16", "shape": [size // 2], "data_offsets": [0, size]}}).encode()
        with (root / f"model-{i + 1:05d}-of-{shards:05d}.safetensors").open("wb") as fh:
            fh.write(len(header).to_bytes(8, "little") + header)
            for done in range(0, size, chunk):
                fh.write(os.urandom(min(chunk, size - done)))
    (root / "config.json").write_text(json.dumps({"model_type": "qwen2_vl", "hidden_size": 1536}))
    (root / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {f"t{i}": i for i in range(500_000)}}}))
    return sum(p.stat().st_size for p in root.iterdir())


def _drop_page_cache(root: Path) -> None:
    for p in root.iterdir():
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _io() -> dict[str, int]:
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return {k: int(v) for k, v in fields.items()}


def _timed_fingerprint(root: Path) -> tuple[float, float, int]:
    """Wall and CPU seconds (all threads) of one ``checkpoint_identity`` of ``root``, and the bytes read from
    the device meanwhile. CPU seconds say what it costs on an idle core when the machine is shared."""
    from captioning_core import fingerprint

    before, cpu, t = _io()["read_bytes"], time.process_time(), time.perf_counter()
    fingerprint.checkpoint_identity(str(root))
    return time.perf_counter() - t, time.process_time() - cpu, _io()["read_bytes"] - before


def _hash_rates(mib: int = 256) -> dict[str, float]:
    data = os.urandom(mib * 2**20)
    rates = {}
    for name in ("sha256", "blake2b"):
        t = time.thread_time()  # CPU seconds: a shared machine's load does not enter the ratio
        hashlib.new(name, data).hexdigest()
        rates[name] = mib / 1024 / (time.thread_time() - t)
    return rates


def bench_fingerprint(work: Path, fingerprint_gib: float = 4.0, rounds: int = 3) -> None:
    from captioning_core import file_digest

    root = work / "checkpoint"
    total = _write_checkpoint(root, fingerprint_gib)
    scale = GB15 / total
    env, threads = os.environ.get(file_digest.CACHE_ENV), file_digest.HASH_THREADS
    try:
        time.sleep(file_digest.RACY_SECONDS + 0.1)  # fresh files are hashed but not cached (file_digest.py)
        os.environ[file_digest.CACHE_ENV] = "off"
        _drop_page_cache(root)
        cold, cold_cpu, cold_read = _timed_fingerprint(root)
        warm: dict[int, list[tuple[float, float, int]]] = {1: [], threads: []}
        for _ in range(rounds):  # one file at a time vs HASH_THREADS at once, alternated
            for n in warm:
                file_digest.HASH_THREADS = n
                warm[n].append(_timed_fingerprint(root))
        os.environ[file_digest.CACHE_ENV] = str(work / "digests.json")
        _timed_fingerprint(root)  # fills the cache
        cached = sorted(_timed_fingerprint(root)[0] for _ in range(rounds))[rounds // 2]
    finally:
        file_digest.HASH_THREADS = threads
        if env is None:
            os.environ.pop(file_digest.CACHE_ENV, None)
        else:
            os.environ[file_digest.CACHE_ENV] = env
    med = {n: sorted(ts)[rounds // 2][0] for n, ts in warm.items()}
    warm_cpu = sorted(cpu for _, cpu, _ in warm[1])[rounds // 2]
    gib, files = total / 2**30, len(list(root.iterdir()))
    report(f"13 checkpoint fingerprint (every byte hashed), {gib:.1f} GiB in {files} files: first read with a cold "
           f"page cache ({cold_read / 2**30:.2f} GiB read from the device) vs warm page cache vs the host's cached "
           f"digests; seconds extrapolated to 15 GB",
           f"cold {cold:.1f} s ({total / cold / 1e9:.2f} GB/s, {cold_cpu:.1f} CPU s) -> {cold * scale:.0f} s per 15 GB; "
           f"warm {med[threads]:.1f} s ({threads} files at once; {med[1]:.1f} s one at a time, {warm_cpu:.1f} CPU s) -> "
           f"{med[threads] * scale:.0f} s per 15 GB ({warm_cpu * scale:.0f} CPU s); cached {cached * 1000:.1f} ms (a stat per file, whatever the size)", "cached <= 1 s",
           cached <= 1.0)
    rates = _hash_rates()
    report("13 SHA-256 vs BLAKE2b, 256 MiB in memory (one thread, per CPU second)",
           f"{rates['sha256']:.2f} vs {rates['blake2b']:.2f} GiB/s", "report", None)
