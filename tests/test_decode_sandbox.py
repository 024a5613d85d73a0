"""Poison videos (issue 25 #2): decoding runs in decoder processes, so a video that crashes the native decoder,
gets it killed (as the OOM killer does) or hangs it fails its own row within ``--max_row_attempts`` tries, a
video whose decode would be huge is refused before decoding, and every other row publishes.

The crash is a real native crash in the decoder process (the ``decoder_crash`` fault reads address 0: SIGSEGV),
the kill a real SIGKILL, the hang a decoder that never answers; the huge decode is a real 4K clip of a few
hundred KB whose sampled frames need 1.5 GB. The rank loop is the production one (RankRunner on real S3).
"""

from __future__ import annotations

import numpy as np
import pytest

from captioning_core import video
from captioning_core.decode_sandbox import DecoderCrashed, DecoderKilled, DecodeSandbox
from captioning_core.runner import RankRunner
from captioning_core.sharding import RankInfo
from testkit.clips import ClipSpec, ensure_clip
from testkit.colour_captioner import ColourCaptioner, colour_config
from testkit.demo_clips import PARTITION_SPECS
from testkit.outputs import read_output
from testkit.partition import Row, meta_csv

pytestmark = pytest.mark.integration

HUGE = ClipSpec(color="blue", width=3840, height=2160, fps=2, seconds=30, gop=60)


@pytest.fixture(scope="module")
def poison_clips(tmp_path_factory):
    directory = tmp_path_factory.mktemp("poison")
    good = [ensure_clip(spec, directory) for spec in PARTITION_SPECS[:3]]
    named = {}
    for name, spec in (("crashme", PARTITION_SPECS[3]), ("killme", PARTITION_SPECS[4]),
                       ("hangme", PARTITION_SPECS[5])):
        src = ensure_clip(spec, directory)
        named[name] = src.with_name(f"{name}_{src.name}")
        named[name].write_bytes(src.read_bytes())
    named["huge"] = ensure_clip(HUGE, directory)
    return good, named


def test_the_decoder_process_gives_the_frames_decoding_here_gives(poison_clips):
    good, _ = poison_clips
    sandbox = DecodeSandbox(timeout=60)
    try:
        for path in good:
            opened = video.open_video(str(path))
            indices = list(range(0, len(opened), 3))
            here = video.read_frames_here(opened, indices)
            there = sandbox.read_frames(str(path), indices)
            assert there.dtype == here.dtype and np.array_equal(there, here)
        with pytest.raises(video.VideoError, match="cannot open video"):  # the child's own error, raised here
            sandbox.read_frames(str(good[0].with_name("missing.mp4")), [0])
    finally:
        sandbox.close()


def test_a_native_crash_a_kill_and_a_hang_fail_their_rows_not_the_rank(poison_clips, monkeypatch):
    _, named = poison_clips
    monkeypatch.setenv("CAPTION_FAULTS", "decoder_crash@*:crashme,decoder_kill@*:killme,decoder_hang@*:hangme")
    sandbox = DecodeSandbox(timeout=3)
    try:
        with pytest.raises(DecoderCrashed, match="SIGSEGV"):
            sandbox.read_frames(str(named["crashme"]), [0])
        with pytest.raises(DecoderKilled, match="SIGKILL"):
            sandbox.read_frames(str(named["killme"]), [0])
        with pytest.raises(DecoderKilled, match="took over the decode timeout"):
            sandbox.read_frames(str(named["hangme"]), [0])
        assert sandbox.read_frames(str(named["huge"]), [0]).shape == (1, 2160, 3840, 3)  # a new child decodes
    finally:
        sandbox.close()


def test_a_shard_with_poison_videos_publishes_within_max_row_attempts(poison_clips, tmp_path, monkeypatch):
    """Local files (the faults match the name the decoder opens; S3 videos arrive under random names)."""
    good, named = poison_clips
    rows = [Row(str(good[0]), PARTITION_SPECS[0]), Row(str(named["crashme"]), None, "crash"),
            Row(str(good[1]), PARTITION_SPECS[1]), Row(str(named["huge"]), None, "huge"),
            Row(str(named["killme"]), None, "kill"), Row(str(named["hangme"]), None, "hang"),
            Row(str(good[2]), PARTITION_SPECS[2])]
    meta = tmp_path / "meta.csv"
    meta.write_bytes(meta_csv(rows))
    monkeypatch.setenv("CAPTION_FAULTS", "decoder_crash@*:crashme,decoder_kill@*:killme,decoder_hang@*:hangme")
    cfg = colour_config(str(meta), max_row_attempts=2, decode_timeout=3, max_decode_bytes=256 << 20)
    first = RankRunner(cfg, RankInfo(0, 1), ColourCaptioner(cfg)).run()
    assert (first.captioned, first.failed, first.transient) == (3, 2, 2), first  # crash and huge: final
    second = RankRunner(cfg, RankInfo(0, 1), ColourCaptioner(cfg)).run()
    assert (second.rows_skipped, second.failed, second.transient) == (5, 2, 0), second
    out = read_output(None, cfg.output)
    got = dict(zip(out["path"], zip(out["caption_status"], out["text"], out["caption_error"], strict=True),
                   strict=True))
    for row in rows:
        status, text, error = got[row.path]
        if row.spec is not None:
            assert (status, text) == ("ok", row.spec.color)
            continue
        assert status == "failed" and text == ""
        expected = {"crash": "the decoder crashed on this video (SIGSEGV)",
                    "huge": "over --max_decode_bytes",
                    "kill": "gave up after 2 attempts: DecoderKilled: the decoder was killed (SIGKILL",
                    "hang": "gave up after 2 attempts: DecoderKilled: decoding"}[row.kind]
        assert expected in error, (row.kind, error)
