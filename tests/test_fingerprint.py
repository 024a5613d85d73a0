"""The fingerprint: what decides a caption changes it, what only changes speed does not, and the operator can
compute the ranks' fingerprint from the caption script's argv without importing any model runtime.

The checkpoint part hashes every byte (a change the old header-plus-samples hash missed changes it), through
the host's digest cache (file_digest.py): a hit reads no model file, the key sees a rewrite that keeps size and
mtime, a corrupt cache is ignored, and processes hashing at once hash each file once. Each test gets its own
cache file."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from captioning_core import arguments, file_digest, fingerprint
from captioning_core.cli import build_parser, config_from_args
from testkit.option_values import CHANGED

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tiny_models" / "qwen2vl"
# Options that change how fast or where a run goes, never the caption a row is meant to get.
SPEED_ONLY = {"bs", "batch_tokens", "output", "device_target", "gather", "pad_length", "max_row_attempts", "video_root",
              "allowed_roots", "prefetch_workers", "prefetch_batches", "log_every", "prefetch_bytes",
              "journal_flush_rows", "journal_flush_seconds", "max_consecutive_errors", "skip_if_existing",
              "decode_timeout", "max_decode_bytes",
              "engine"}  # engine: equal greedy tokens, tests/test_engine_qwen2vl.py


@pytest.fixture(autouse=True)
def digest_cache(tmp_path_factory, monkeypatch):
    """Each test its own host digest cache (the default is the user's cache directory)."""
    monkeypatch.setenv("CAPTION_DIGEST_CACHE", str(tmp_path_factory.mktemp("digests") / "file-digests.json"))


def _fp(*argv: str, model: str = "qwen2vl") -> dict:
    # dtype explicit: its default follows --device_target (float16 on Ascend, float32 on CPU)
    return arguments.for_script_args(model, ["m.csv", "--pretrained_model_name_or_path", str(TINY),
                                             "--dtype", "float32", *argv])


def test_every_caption_deciding_option_changes_the_fingerprint_and_no_other_does():
    base = _fp()
    for action in build_parser("qwen2vl")._actions:
        if not action.option_strings or action.dest in ("help", "pretrained_model_name_or_path"):
            continue
        argv = [action.option_strings[0]] + ([] if action.dest == "skip_if_existing" else [CHANGED[action.dest]])
        changed = _fp(*argv)["id"] != base["id"]
        assert changed == (action.dest not in SPEED_ONLY), action.dest


def test_the_same_settings_spelled_differently_give_the_same_fingerprint():
    assert _fp()["id"] == _fp("--fps", "4", "--max_new_tokens", "200")["id"]
    assert _fp("--fps", "4.0")["id"] == _fp()["id"]
    assert _fp("--device_target", "CPU")["id"] == _fp()["id"]


def test_checkpoint_identity_is_content_not_path(tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(TINY, copy)
    same = _fp("--pretrained_model_name_or_path", str(copy))
    assert same["id"] == _fp()["id"]
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte of one tensor: same names, same sizes, same header
    weights.write_bytes(bytes(data))
    fine_tuned = _fp("--pretrained_model_name_or_path", str(copy))
    assert fine_tuned["id"] != same["id"]
    assert {f["name"] for f in fine_tuned["checkpoint"]["files"]} >= {"config.json", "model.safetensors"}


def _safetensors(path: Path, size: int) -> bytearray:
    """A safetensors-shaped file of ``size`` bytes (header, then pseudo-random tensor bytes), written."""
    header = b'{"t":{"dtype":"U8","shape":[%d],"data_offsets":[0,%d]}}' % (size, size)
    data = bytearray(len(header).to_bytes(8, "little") + header)
    data += random.Random(size).randbytes(size - len(data))
    path.write_bytes(bytes(data))
    return data


def _read_bytes_so_far() -> int:
    """Bytes this process has read through read(2) and friends (the kernel's count, /proc/self/io)."""
    return int(Path("/proc/self/io").read_text().split("rchar:")[1].split()[0])


def _aged(*paths: Path) -> None:
    """Wait until the files' last change is older than the digest cache's racy window."""
    newest = max(max(p.stat().st_mtime_ns, p.stat().st_ctime_ns) for p in paths)
    time.sleep(max(0.0, newest / 1e9 + file_digest.RACY_SECONDS + 0.05 - time.time()))


def test_rewriting_3_mib_inside_a_large_weight_file_changes_the_fingerprint(tmp_path):
    data = _safetensors(tmp_path / "model-00001-of-00002.safetensors", 64 * 1024 * 1024)
    (tmp_path / "config.json").write_text("{}")
    before = fingerprint.checkpoint_identity(str(tmp_path))
    mib = 1024 * 1024
    data[30 * mib:33 * mib] = random.Random(1).randbytes(3 * mib)  # a fine-tune of one tensor's slice
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(bytes(data))
    after = fingerprint.checkpoint_identity(str(tmp_path))
    assert after != before
    assert after["files"][1]["sha256"] == hashlib.sha256(data).hexdigest()  # every byte, no sampling


def test_one_byte_changed_in_a_large_tokenizer_json_changes_the_fingerprint(tmp_path):
    vocab = {f"tok{i}": i for i in range(400_000)}
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text(json.dumps({"model": {"vocab": vocab}}))
    assert tokenizer.stat().st_size > 6 * 1024 * 1024
    before = fingerprint.checkpoint_identity(str(tmp_path))
    data = bytearray(tokenizer.read_bytes())
    at = data.index(b'"tok211111": 211111')
    data[at + 4] = ord("9")  # "tok211111" becomes "tok291111": one merge rule, another token
    tokenizer.write_bytes(bytes(data))
    assert fingerprint.checkpoint_identity(str(tmp_path)) != before


def test_the_second_fingerprint_reads_no_model_file_and_a_rewrite_keeping_size_and_mtime_is_seen(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    weights = model / "model.safetensors"
    data = _safetensors(weights, 16 * 1024 * 1024)
    _aged(weights)
    first = fingerprint.checkpoint_identity(str(model))
    read = _read_bytes_so_far()
    again = fingerprint.checkpoint_identity(str(model))
    assert again == first and _read_bytes_so_far() - read < 1024 * 1024  # only the small cache file
    # the cache is trusted while the file's key is unchanged: a digest planted for that key is what we get
    cache = json.loads(file_digest.cache_path().read_bytes())
    cache["files"][os.path.realpath(weights)][-1] = "0" * 64
    file_digest.cache_path().write_text(json.dumps(cache))
    assert fingerprint.checkpoint_identity(str(model))["files"][0]["sha256"] == "0" * 64
    # ... and the key holds ctime, which os.utime cannot set back: same size, same mtime_ns, other bytes
    stat = weights.stat()
    data[-1] ^= 0xFF
    with weights.open("r+b") as fh:
        fh.write(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (weights.stat().st_size, weights.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    assert fingerprint.checkpoint_identity(str(model))["files"][0]["sha256"] == hashlib.sha256(data).hexdigest()


def test_a_file_changed_just_now_is_hashed_but_not_cached(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    fingerprint.checkpoint_identity(str(tmp_path))
    assert not file_digest.cache_path().exists()  # racy: a write in the same timestamp tick would go unseen
    _aged(tmp_path / "config.json")
    fingerprint.checkpoint_identity(str(tmp_path))
    assert os.path.realpath(tmp_path / "config.json") in json.loads(file_digest.cache_path().read_text())["files"]


@pytest.fixture(scope="module")
def aged_tiny(tmp_path_factory) -> Path:
    """A copy of the tiny model whose files are past the racy window (so their digests are cached)."""
    model = tmp_path_factory.mktemp("aged") / "model"
    shutil.copytree(TINY, model)
    _aged(*model.iterdir())
    return model


@pytest.mark.parametrize("content", [b"\x00garbage{", b'{"format": 1, "files": {', b'[1, 2]',
                                     b'{"format": 1, "files": {"/x": [1, 2]}}', b'{"format": 99, "files": {}}'])
def test_a_corrupt_cache_is_ignored_and_replaced(aged_tiny, content):
    model = aged_tiny
    file_digest.cache_path().parent.mkdir(parents=True, exist_ok=True)
    file_digest.cache_path().write_bytes(content)
    got = fingerprint.checkpoint_identity(str(model))
    assert got["files"] == [{**f, "sha256": hashlib.sha256((model / f["name"]).read_bytes()).hexdigest()}
                            for f in got["files"]]
    assert len(json.loads(file_digest.cache_path().read_text())["files"]) == len(got["files"])


def test_an_unusable_cache_location_is_not_fatal(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text("{}")
    _aged(tmp_path / "config.json")
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv(file_digest.CACHE_ENV, str(blocker / "cache.json"))  # its parent is a file
    assert fingerprint.checkpoint_identity(str(tmp_path))["files"][0]["sha256"] == hashlib.sha256(b"{}").hexdigest()
    monkeypatch.setenv(file_digest.CACHE_ENV, "off")
    assert file_digest.cache_path() is None and fingerprint.checkpoint_identity(str(tmp_path))["files"]


_RANK_LIKE = """
import json, sys, time
from pathlib import Path
from captioning_core import fingerprint

def rchar():
    return int(Path("/proc/self/io").read_text().split("rchar:")[1].split()[0])

start, shared, own = float(sys.argv[1]), sys.argv[2], sys.argv[3]
time.sleep(max(0.0, start - time.time()))  # every process begins at the same instant
before = rchar()
fingerprint.checkpoint_identity(shared)
print(json.dumps({"shared_read": rchar() - before}))
fingerprint.checkpoint_identity(own)
"""


def test_processes_fingerprinting_at_once_hash_each_file_once_and_leave_one_whole_cache(tmp_path):
    mib = 1024 * 1024
    dirs = [tmp_path / name for name in ("shared", "own0", "own1", "own2", "own3")]
    for i, d in enumerate(dirs):
        d.mkdir()
        for j in range(3):
            (d / f"model-{j}.safetensors").write_bytes(random.Random(i * 10 + j).randbytes(8 * mib))
    _aged(*(p for d in dirs for p in d.iterdir()))
    start = time.time() + 3.0
    procs = [subprocess.Popen([sys.executable, "-c", _RANK_LIKE, str(start), str(dirs[0]), str(own)], cwd=REPO,
                              stdout=subprocess.PIPE, text=True) for own in dirs[1:]]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4
    assert time.time() > start + 0.05  # they did run together (none was done before the start)
    # one process read the shared checkpoint (24 MiB); the three others waited on the lock and reused its digests
    assert sum(json.loads(out)["shared_read"] for out in outs) < 2 * 24 * mib
    files = json.loads(file_digest.cache_path().read_text())["files"]  # whole JSON, every process's entries
    assert {os.path.realpath(p) for d in dirs for p in d.iterdir()} <= set(files)
    assert not list(file_digest.cache_path().parent.glob(".*.json.*"))  # no temp file left behind


def test_preprocessing_and_runtime_versions_are_parts_of_the_fingerprint(monkeypatch):
    from captioning_core.models import base
    from captioning_core.models.qwen2_vl import Qwen2VLCaptioner

    fp = _fp()
    assert fp["preprocess"] == {"shared": base.SHARED_PREPROCESS_VERSION, "model": Qwen2VLCaptioner.preprocess_version}
    assert fp["runtime"] == {d: importlib.metadata.version(d) for d in ("mindspore", "mindnlp", "transformers")}
    monkeypatch.setattr(Qwen2VLCaptioner, "preprocess_version", Qwen2VLCaptioner.preprocess_version + 1)
    bumped = _fp()
    assert bumped["id"] != fp["id"] and bumped["preprocess"]["model"] == fp["preprocess"]["model"] + 1
    monkeypatch.undo()
    monkeypatch.setattr(base, "SHARED_PREPROCESS_VERSION", base.SHARED_PREPROCESS_VERSION + 1)
    assert _fp()["id"] != fp["id"]
    assert _fp(model="pllava")["preprocess"]["model"] is not None


def test_for_script_args_imports_no_model_runtime_and_matches_the_ranks():
    code = ("import json, sys\nfrom captioning_core import arguments\n"
            f"fp = arguments.for_script_args('qwen2vl', ['m.csv', '--pretrained_model_name_or_path', {str(TINY)!r},"
            " '--question', 'What moves?'])\n"
            "heavy = [m for m in ('mindspore', 'mindnlp', 'torch', 'transformers', 'decord', 'av') if m in sys.modules]\n"
            "print(json.dumps({'fp': fp, 'heavy': heavy}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO,
                         check=True)
    got = json.loads(out.stdout)
    assert got["heavy"] == []
    args = build_parser("qwen2vl").parse_args(["m.csv", "--pretrained_model_name_or_path", str(TINY),
                                               "--question", "What moves?"])
    assert got["fp"] == fingerprint.compute(config_from_args("qwen2vl", args))  # what RankRunner records
    assert got["fp"]["prompt"]["question"] == "What moves?" and len(got["fp"]["id"]) == fingerprint.ID_LENGTH
    assert fingerprint.SUMMARY_KEY == "fingerprint"
