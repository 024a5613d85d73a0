"""Phone-style variants of the synthetic clips: how users' footage really arrives.

A ClipSpec says what a player should show (upright, at ``width`` x ``height``); this module stores it the way
cameras and muxers do: turned by the inverse of a display rotation/flip (then marked with a display matrix, or
the legacy clockwise ``rotate`` tag), squeezed to non-square pixels (SAR), with variable frame timing, in
10-bit or 4:2:2/4:4:4 pixels with colour tags, or beside cover art / a decoy video stream. The tests then
check that reading gives back the upright picture; ffmpeg's own decode (autorotate on) is the referee.
"""

from __future__ import annotations

import functools
import os
import subprocess
from fractions import Fraction
from pathlib import Path

import numpy as np

from testkit.clips import ClipSpec, _iter_reused_frames, ffmpeg_exe


@functools.lru_cache(maxsize=64)
def vfr_times(fps: int, seconds: float) -> tuple[float, ...]:
    """Frame times of a VFR clip: ``fps`` normally, a burst at 3x fps over 25-45% of the clip, and a pause
    (one frame held for 15% of the clip) at 60%; times are multiples of 1/90000 s (the mp4 timebase)."""
    times, t, paused = [], 0.0, False
    while t < seconds - 1e-9:
        times.append(round(t * 90000) / 90000)
        u = t / seconds
        step = 1 / (3 * fps) if 0.25 <= u < 0.45 else 1 / fps
        if u >= 0.6 and not paused:
            step, paused = 0.15 * seconds, True
        t += step
    return tuple(times)


def stored_frame(spec: ClipSpec, upright: np.ndarray) -> np.ndarray:
    """The pixels to encode so that the display transform of ``spec`` shows ``upright``.

    ffmpeg's display matrix shows ``hflip(rot90_ccw(stored, rotation))``; the legacy tag (clockwise degrees)
    is written as ``-rotation``, so it shows ``rot90_ccw(stored, rotation)`` too.
    """
    frame = upright[:, ::-1] if spec.hflip else upright
    frame = np.rot90(frame, -(spec.rotation // 90) % 4)
    height, width = spec.stored_size
    if frame.shape[1] != width:  # non-square pixels: store the picture squeezed to the stored width
        from PIL import Image

        frame = np.asarray(Image.fromarray(np.ascontiguousarray(frame)).resize((width, height), Image.BICUBIC))
    return np.ascontiguousarray(frame)


def _encode_args(spec: ClipSpec) -> list[str]:
    args = ["-pix_fmt", spec.pix_fmt]
    if spec.color_range:
        args += ["-color_range", spec.color_range]
    if spec.colorspace:
        primaries = {"bt709": "bt709", "bt470bg": "bt470bg", "smpte170m": "smpte170m"}[spec.colorspace]
        args += ["-colorspace", spec.colorspace, "-color_primaries", primaries]
    if spec.sar != (1, 1):
        args += ["-vf", f"setsar={spec.sar[0]}/{spec.sar[1]}"]
    return args


def _encode_cfr(spec: ClipSpec, path: Path) -> None:
    height, width = spec.stored_size
    argv = [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-nostdin", "-y",
            "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", str(spec.fps), "-i", "pipe:0",
            "-an", "-c:v", "libx264", "-preset", "ultrafast", *_encode_args(spec),
            "-g", str(spec.gop), "-keyint_min", str(spec.gop), "-sc_threshold", "0", "-r", str(spec.fps),
            "-f", "mp4", str(path)]  # fmt: skip
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stdin is not None and proc.stderr is not None
    try:
        for frame in _iter_reused_frames(spec):
            proc.stdin.write(memoryview(stored_frame(spec, frame)).cast("B"))
        proc.stdin.close()
    except BrokenPipeError:
        pass
    stderr = proc.stderr.read().decode(errors="replace")
    if proc.wait() != 0:
        raise RuntimeError(f"ffmpeg failed encoding {spec}: {stderr[-2000:]}")


def _encode_vfr(spec: ClipSpec, path: Path) -> None:
    """VFR needs a timestamp per frame, which a raw pipe cannot carry: encode with PyAV's libx264."""
    import av

    if spec.pix_fmt != "yuv420p" or spec.sar != (1, 1) or spec.color_range or spec.colorspace:
        raise ValueError("a VFR clip is plain yuv420p in this factory")
    height, width = spec.stored_size
    time_base = Fraction(1, 90000)
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=spec.fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.time_base = stream.codec_context.time_base = time_base
        stream.codec_context.gop_size = spec.gop
        stream.options = {"preset": "ultrafast", "keyint_min": str(spec.gop), "sc_threshold": "0"}
        for t, frame in zip(spec.times, _iter_reused_frames(spec), strict=True):
            vf = av.VideoFrame.from_ndarray(stored_frame(spec, frame), format="rgb24")
            vf.pts, vf.time_base = round(t / time_base), time_base
            for packet in stream.encode(vf):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def _finish(spec: ClipSpec, encoded: Path, path: Path) -> None:
    """Remux into the container with the display matrix or tag, and the extra stream, as asked."""
    real = 1 if spec.extra_stream == "second_video" else 0  # output index of the real video
    pre, inputs, post = [], ["-i", str(encoded)], []
    rotation = spec.rotation % 360
    if rotation and spec.rotate_tag:
        post += [f"-metadata:s:v:{real}", f"rotate={-rotation % 360}"]
    elif rotation or spec.hflip:  # input options: they apply to the real video, input 0
        pre += ["-display_rotation:v:0", str(rotation)] + (["-display_hflip:v:0"] if spec.hflip else [])
    if spec.extra_stream == "second_video":  # a bigger decoy first; the real video carries the default flag
        height, width = spec.stored_size
        inputs += ["-f", "lavfi", "-i", f"testsrc=s={2 * width}x{2 * height}:r=10:d=1"]
        maps = ["-map", "1:v:0", "-map", "0:v:0"]
        post += ["-c:v:0", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-c:v:1", "copy",
                 "-disposition:v:0", "0", "-disposition:v:1", "default"]
    elif spec.extra_stream == "cover":
        cover = encoded.with_name(encoded.name + ".cover.png")
        _cover_png(cover, spec)
        if spec.container == "mkv":  # Matroska cover art is an attachment, demuxed as an attached picture
            maps = ["-map", "0:v:0"]
            post += ["-c", "copy", "-attach", str(cover), "-metadata:s:t", "mimetype=image/png",
                     "-metadata:s:t", "filename=cover.png"]
        else:
            inputs += ["-i", str(cover)]
            maps = ["-map", "0:v:0", "-map", "1:v:0"]
            post += ["-c:v:0", "copy", "-c:v:1", "png", "-disposition:v:1", "attached_pic"]
    else:
        maps, post = ["-map", "0:v:0"], [*post, "-c", "copy"]
    argv = [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-nostdin", "-y", *pre, *inputs, *maps, *post,
            "-f", "matroska" if spec.container == "mkv" else "mp4", str(path)]
    result = subprocess.run(argv, capture_output=True)
    if result.returncode != 0:
        raise RuntimeError(f"ffmpeg failed remuxing {spec}: {result.stderr.decode()[-2000:]}")


def _cover_png(path: Path, spec: ClipSpec) -> None:
    from PIL import Image

    side = 2 * max(spec.width, spec.height)  # bigger than the video, so "largest stream" would be wrong
    Image.new("RGB", (side, side), (0, 200, 200)).save(path)


def write_footage(spec: ClipSpec, path: Path) -> Path:
    """Encode a phone-style ``spec`` at ``path`` (atomically: a temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    encoded = path.with_name(f".{path.name}.{os.getpid()}.enc.mp4")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        (_encode_vfr if spec.vfr else _encode_cfr)(spec, encoded)
        _finish(spec, encoded, tmp)
        os.replace(tmp, path)
    finally:
        for leftover in (encoded, tmp, encoded.with_name(encoded.name + ".cover.png")):
            leftover.unlink(missing_ok=True)
    return path
