"""Phone-style footage read as a player shows it: display rotation and flips, VFR, pixel formats, SAR, extra streams.

Every clip is a real file made by the clip factory (testkit/footage.py) and read by real decord and PyAV.
The referee for orientation and colour conversion is the ffmpeg tool itself (autorotate on, its own RGB
conversion); for content, the same scene encoded upright.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from captioning_core import gallery, orientation, video
from testkit.clips import ClipSpec, ensure_clip, ffmpeg_exe, render_frames, render_frames_at
from testkit.footage import stored_frame
from testkit.profile import TINY_ARGS

pytestmark = pytest.mark.integration

# portrait display, like a phone; the shape starts off-centre along its motion, so every flip shows
BASE = {d: ClipSpec("red", d, "square", 240, 320, 25, 1.0, 12) for d in ("left", "up")}
ORIENTATIONS = [(r, h) for r in (0, 90, 180, 270) for h in (False, True) if (r, h) != (0, False)]
CODEC_NOISE = 1.5  # mean absolute difference (0-255) allowed between two encodings of one scene


@pytest.fixture(scope="module")
def footage_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("footage")


def _frames(path: Path, indices: list[int]) -> np.ndarray:
    return video.read_frames(video.open_video(str(path)), indices)


def _ffmpeg_rgb(path: Path, index: int) -> np.ndarray:
    """Frame ``index`` as the ffmpeg tool decodes it (autorotate, its own conversion to RGB)."""
    probe = subprocess.run([ffmpeg_exe(), "-v", "error", "-i", str(path), "-map", "0:v:0", "-vf",
                            f"select=eq(n\\,{index})", "-frames:v", "1", "-c:v", "ppm", "-f", "image2pipe", "-"],
                           capture_output=True, check=True)
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(probe.stdout)).convert("RGB"))


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


# -- orientation ------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("rotation", "hflip"), ORIENTATIONS)
def test_rotated_and_flipped_clips_read_upright(footage_dir, rotation, hflip):
    indices = [0, 12, 24]
    telling = 0  # scenes whose stored pixels differ from the upright picture (so the check can fail)
    for direction in ("left", "up"):  # a horizontal move shows turns and hflips, a vertical one vflips
        spec = dataclasses.replace(BASE[direction], rotation=rotation, hflip=hflip)
        turned = ensure_clip(spec, footage_dir)
        want = _frames(ensure_clip(BASE[direction], footage_dir), indices)
        got = _frames(turned, indices)
        assert got.shape == want.shape == (3, 320, 240, 3)  # displayed size, portrait
        assert _mad(got, want) < CODEC_NOISE, direction
        # the factory is right too: ffmpeg's own autorotation shows the scene upright
        assert _mad(_ffmpeg_rgb(turned, 12), render_frames(spec)[12]) < CODEC_NOISE, direction
        scene = render_frames(spec)[indices]
        stored = np.stack([stored_frame(spec, frame) for frame in scene])
        telling += stored.shape != scene.shape or _mad(stored, scene) > 3 * CODEC_NOISE
    assert telling >= 1


@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_legacy_rotate_tag_is_honoured(footage_dir, rotation):
    spec = dataclasses.replace(BASE["left"], rotation=rotation, rotate_tag=True, container="mkv")
    got = _frames(ensure_clip(spec, footage_dir), [0, 24])
    assert _mad(got, _frames(ensure_clip(BASE["left"], footage_dir), [0, 24])) < CODEC_NOISE


FALLBACK_SPECS = [
    dataclasses.replace(BASE["up"], rotation=90),
    dataclasses.replace(BASE["up"], rotation=180, hflip=True),
    dataclasses.replace(BASE["up"], rotation=270, hflip=True),
    dataclasses.replace(BASE["up"], hflip=True),
    dataclasses.replace(BASE["up"], rotation=90, rotate_tag=True, container="mkv"),
    ClipSpec("blue", "right", "circle", 320, 240, 25, 1.0, 12, sar=(4, 3)),
]


@pytest.mark.parametrize("spec", FALLBACK_SPECS, ids=lambda s: s.filename)
def test_decord_fallback_gives_the_same_upright_frames(footage_dir, monkeypatch, spec):
    """decord2 rotates by itself but ignores flips (and SAR); the fallback path must end in the same picture."""
    path = ensure_clip(spec, footage_dir)
    indices = [0, 7, 24]
    via_pyav = _frames(path, indices)

    def mismatch(*_args):
        raise video._TableMismatch("forced")

    monkeypatch.setattr(video, "_read_pyav", mismatch)
    assert np.array_equal(_frames(path, indices), via_pyav)


def test_orientation_algebra_matches_numpy():
    img = np.arange(2 * 3 * 4).reshape(1, 3, 4, 2)
    rot = orientation.Orientation.rotation_ccw
    assert np.array_equal(rot(90).apply(img), np.rot90(img, 1, axes=(1, 2)))
    assert np.array_equal(rot(270).apply(img), np.rot90(img, -1, axes=(1, 2)))
    for turns in range(4):
        o = rot(90 * turns)
        assert o.then(o.inverse()).identity
        assert np.array_equal(o.inverse().apply(o.apply(img)), img)
    frames = np.random.default_rng(0).integers(0, 255, (2, 6, 8, 3), dtype=np.uint8)
    for swap in (False, True):
        for flip_rows in (False, True):
            for flip_cols in (False, True):
                want = frames.transpose(0, 2, 1, 3) if swap else frames
                want = want[:, ::-1] if flip_rows else want
                want = want[:, :, ::-1] if flip_cols else want
                assert np.array_equal(orientation.Orientation(swap, flip_rows, flip_cols).apply(frames), want)


def test_model_preprocessing_sees_the_upright_frame(footage_dir):
    """Qwen2-VL's pixel budget (and PLLaVA's frames) work on the displayed picture: portrait stays portrait."""
    from captioning_core.models import pllava, qwen2_vl

    upright = ClipSpec("green", "up", "square", 360, 640, 25, 2.0, 12)
    rotated = ensure_clip(dataclasses.replace(upright, rotation=90), footage_dir)
    opts = qwen2_vl.Qwen2VLOptions(height=448, width=672, fps=4.0)
    want = qwen2_vl.sample_frames(str(ensure_clip(upright, footage_dir)), opts)
    got = qwen2_vl.sample_frames(str(rotated), opts)
    assert got.shape == want.shape and got.shape[1] > got.shape[2]  # e.g. (8, 728, 392, 3), portrait
    assert _mad(got, want) < CODEC_NOISE
    frames = pllava.sample_frames(str(rotated), 4)
    assert frames.shape == (4, 640, 360, 3)


# -- probe: displayed size ------------------------------------------------------------------------------

@pytest.mark.parametrize(("spec", "size"), [
    (dataclasses.replace(BASE["up"], rotation=90), (320, 240)),
    (dataclasses.replace(BASE["up"], rotation=270, hflip=True), (320, 240)),
    (dataclasses.replace(BASE["left"], rotation=90, rotate_tag=True, container="mkv"), (320, 240)),
    (ClipSpec("blue", "right", "circle", 320, 240, 25, 1.0, 12, sar=(4, 3)), (240, 320)),
    (ClipSpec("blue", "right", "circle", 320, 240, 25, 1.0, 12, extra_stream="second_video", container="mkv"),
     (240, 320)),
])
def test_probe_reports_displayed_size(footage_dir, spec, size):
    info = video.probe(str(ensure_clip(spec, footage_dir)))
    assert (info.height, info.width) == size
    assert info.num_frames == spec.num_frames


# -- variable frame rate --------------------------------------------------------------------------------

VFR = ClipSpec("yellow", "right", "circle", 320, 240, 25, 4.0, 12, vfr=True)


def test_vfr_samples_are_evenly_spaced_in_time(footage_dir):
    path = ensure_clip(VFR, footage_dir)
    reader = video.open_video(str(path))
    times = video.frame_times(reader)
    assert np.allclose(times, VFR.times, atol=1e-3)  # decord's table holds the factory's timestamps
    assert not video.is_constant_rate(times)
    for fps in (2, 4):
        indices = video.qwen_sample_indices(reader, fps)
        duration = VFR.times[-1] + 1 / VFR.fps
        assert len(indices) == round(duration * fps / 2) * 2
        targets = np.linspace(times[0], times[-1], len(indices))
        for target, index in zip(targets, indices, strict=True):
            after = int(np.searchsorted(times, target))
            before = max(0, after - 1)
            after = min(after, len(times) - 1)
            half_frame = (times[after] - times[before]) / 2 if after > before else 0.0
            assert abs(times[index] - target) <= half_frame + 1e-6, (fps, target, index)
        # index-based sampling (the CFR formula) would land far from the targets on this clip
        naive = video.qwen_frame_indices(len(times), len(indices))
        assert max(abs(times[i] - t) for i, t in zip(naive, targets, strict=True)) > 3 / VFR.fps
        # the decoded frames are the ones shown at those times
        assert _mad(video.read_frames(reader, indices), render_frames_at(VFR, indices)) < CODEC_NOISE


def test_cfr_clips_keep_the_index_formula(standard_clips, clip_dir):
    clips = [path for path, _ in standard_clips[:7]]
    ntsc = clip_dir / "sampling_ntsc_29.97.mp4"
    if not ntsc.exists():
        subprocess.run([ffmpeg_exe(), "-v", "error", "-y", "-i", str(clips[1]), "-r", "30000/1001", "-c:v",
                        "libx264", "-preset", "ultrafast", str(ntsc)], check=True)
    mkv = clip_dir / "sampling_30fps.mkv"  # Matroska keeps times in whole milliseconds: 33, 33, 34, ...
    if not mkv.exists():
        subprocess.run([ffmpeg_exe(), "-v", "error", "-y", "-i", str(standard_clips[2][0]), "-c", "copy", str(mkv)],
                       check=True)
    for path in [*clips, ntsc, mkv]:
        reader = video.open_video(str(path))
        assert video.is_constant_rate(video.frame_times(reader)), path
        for fps in (2, 4):
            n = len(reader)
            want = video.qwen_frame_indices(n, video.qwen_frame_count(n, reader.get_avg_fps(), fps))
            assert video.qwen_sample_indices(reader, fps) == want, (path, fps)


# -- pixel formats and ranges -----------------------------------------------------------------------------

FORMATS = [
    dict(pix_fmt="yuv420p10le"),
    dict(pix_fmt="yuv420p10le", color_range="tv", colorspace="bt709"),
    dict(pix_fmt="yuv422p10le", color_range="pc"),
    dict(pix_fmt="yuv444p10le", colorspace="bt470bg"),
    dict(pix_fmt="yuv422p"),
    dict(pix_fmt="yuv444p", color_range="pc", colorspace="bt709"),
    dict(color_range="pc"),
    dict(color_range="pc", colorspace="bt709"),
    dict(color_range="tv", colorspace="bt709"),
    dict(colorspace="smpte170m"),
]


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: "-".join(f.values()))
def test_pixel_formats_match_ffmpeg_rgb(footage_dir, fmt):
    spec = ClipSpec("yellow", "down", "circle", 320, 240, 25, 1.0, 12, **fmt)
    path = ensure_clip(spec, footage_dir)
    indices = [0, 13, 24]
    ours = _frames(path, indices)
    for k, index in enumerate(indices):
        ref = _ffmpeg_rgb(path, index)
        diff = np.abs(ours[k].astype(np.int16) - ref.astype(np.int16))
        assert diff.mean() < 0.25 and diff.max() <= 4, (fmt, index, diff.mean(), diff.max())
    assert _mad(ours, render_frames(spec)[indices]) < 2 * CODEC_NOISE  # and it is the scene


# -- non-square pixels ------------------------------------------------------------------------------------

def test_sar_clip_is_shown_and_thumbnailed_at_display_aspect(footage_dir):
    from PIL import Image

    spec = ClipSpec("blue", "right", "circle", 320, 240, 25, 1.0, 12, sar=(4, 3))  # stored 240x240
    path = ensure_clip(spec, footage_dir)
    assert spec.stored_size == (240, 240)
    frames = _frames(path, [0, 12, 24])
    assert frames.shape == (3, 240, 320, 3)
    assert _mad(frames, render_frames(spec)[[0, 12, 24]]) < 2 * CODEC_NOISE  # the circle is round again
    strip = Image.open(io.BytesIO(gallery.thumbnail_strip(frames, height=72, count=3)))
    assert strip.size == (3 * 96 + 2 * 3, 72)  # three 4:3 tiles and two 3-pixel rules


# -- several video streams ------------------------------------------------------------------------------

@pytest.mark.parametrize(("extra", "container"), [("cover", "mp4"), ("cover", "mkv"), ("second_video", "mkv"),
                                                  ("second_video", "mp4")])
def test_the_real_video_stream_is_used(footage_dir, extra, container, caplog):
    spec = ClipSpec("green", "left", "circle", 320, 240, 25, 1.0, 12, extra_stream=extra, container=container)
    path = ensure_clip(spec, footage_dir)
    caplog.set_level(logging.DEBUG, logger="captioning_core.video")
    reader = video.open_video(str(path))
    assert len(reader) == spec.num_frames
    frames = video.read_frames(reader, [0, 12, 24])
    assert _mad(frames, render_frames(spec)[[0, 12, 24]]) < CODEC_NOISE
    assert "get_batch" not in caplog.text  # PyAV found the same stream as decord


# -- the demo's rotated portrait clip, captioned by the real tiny Qwen2-VL ------------------------------

def test_tiny_qwen2vl_captions_the_rotated_demo_clip(footage_dir, tmp_path):
    """Upright handling decides the caption: the same pixels without the display matrix read sideways."""
    import pandas as pd

    from testkit.demo_clips import DAG_SPECS

    spec = next(s for s in DAG_SPECS if s.rotation)
    rotated = ensure_clip(spec, footage_dir)
    sideways = tmp_path / "sideways.mp4"  # the stored pixels, shown as stored (what the model saw before)
    subprocess.run([ffmpeg_exe(), "-v", "error", "-y", "-display_rotation", "0", "-i", str(rotated), "-c", "copy",
                    str(sideways)], check=True)
    assert (video.probe(str(sideways)).height, video.probe(str(sideways)).width) == spec.stored_size
    meta = tmp_path / "meta.csv"
    pd.DataFrame({"path": [str(rotated), str(sideways)]}).to_csv(meta, index=False)
    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-m", "captioning_core.caption_qwen2vl", str(meta), "--pretrained_model_name_or_path",
         str(repo / "tiny_models" / "qwen2vl"), *TINY_ARGS],
        capture_output=True, text=True, cwd=repo, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    out = pd.read_csv(tmp_path / "meta_caption_qwen2vl.csv", dtype=str, keep_default_na=False)
    assert out["caption_status"].tolist() == ["ok", "ok"]
    assert out["text"].tolist()[0] == spec.caption
    assert out["text"].tolist()[1] != spec.caption  # sideways, the circle moves up or down


def test_phone_style_spec_validation():
    with pytest.raises(ValueError, match="multiple of 90"):
        ClipSpec(rotation=45)
    with pytest.raises(ValueError, match="needs mkv"):
        ClipSpec(rotation=90, rotate_tag=True)  # mp4 keeps no rotate tag
    with pytest.raises(ValueError, match="sar"):
        ClipSpec(width=320, sar=(3, 2))  # 320 / 1.5 is not a whole even width
    with pytest.raises(ValueError, match="pix_fmt"):
        ClipSpec(pix_fmt="rgb24")
    spec = ClipSpec("red", "up", "square", 360, 640, rotation=90, hflip=True)
    assert spec.stored_size == (360, 640) and spec.filename.endswith("_r90_hflip.mp4")
    assert ClipSpec().filename == "red_square_left_320x240_25fps_2s_g12.mp4"  # plain clips keep their names
