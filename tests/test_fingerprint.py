"""The fingerprint: what decides a caption changes it, what only changes speed does not, and the operator can
compute the ranks' fingerprint from the caption script's argv without importing any model runtime."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from captioning_core import arguments, fingerprint
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


def test_sampled_hash_of_large_weights_sees_header_and_samples(tmp_path):
    big = tmp_path / "w.safetensors"
    header = b'{"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    body = bytearray(len(header).to_bytes(8, "little") + header + bytes(6 * 1024 * 1024))
    big.write_bytes(bytes(body))
    first = fingerprint.checkpoint_identity(str(tmp_path))["files"][0]
    assert first["sha256"].startswith("sampled:")
    body[len(body) - 10] ^= 1  # inside the last sample
    big.write_bytes(bytes(body))
    assert fingerprint.checkpoint_identity(str(tmp_path))["files"][0]["sha256"] != first["sha256"]


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
