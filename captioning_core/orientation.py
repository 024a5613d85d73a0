"""How a decoded frame is shown: display orientation (rotation, flips), pixel aspect, and exact RGB conversion.

Phones store portrait video as landscape pixels plus a display matrix (or, in older files, a ``rotate`` tag)
that says how to turn them; some encoders store non-square pixels (a sample aspect ratio, SAR). Every captioner
must see the picture as a player shows it, so ``video.read_frames`` returns frames through ``Display.apply``:
SAR stretch first (it is defined on stored pixels), then the orientation, before any model resizing.

The orientation is one of the 8 axis-aligned maps, kept as (swap axes, flip rows, flip columns): numpy views,
so upright clips pay nothing and rotated ones one copy. It follows FFmpeg's display matrix exactly, flips
included (tests compare it with ffmpeg's own autorotation); the legacy ``rotate`` tag is clockwise degrees.

decord2 (the fallback reader) already rotates by the matrix's angle, or by the tag, but ignores flips:
``Display.from_decord`` undoes what it did, so both readers end in the same picture.

RGB: 8-bit YUV goes through one reused swscale context (fast; identical to decord and ffmpeg). Other formats
(10-bit, RGB, palettes...) go through an FFmpeg filter graph with ffmpeg's default ``scale``, which is what
the ffmpeg tool itself does and so matches its conversion exactly; PyAV's plain reformat differs there by up
to ~100 levels at colour edges (chroma interpolation).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# Formats the reusable swscale context converts exactly as ffmpeg does (checked in tests); others use a graph.
FAST_RGB_FORMATS = frozenset({"yuv420p", "yuvj420p", "yuv422p", "yuv444p"})


@dataclass(frozen=True)
class Orientation:
    """An axis-aligned display map on (rows, cols): optional transpose, then optional flips of the result."""

    swap: bool = False
    flip_rows: bool = False
    flip_cols: bool = False

    @property
    def identity(self) -> bool:
        return not (self.swap or self.flip_rows or self.flip_cols)

    @property
    def matrix(self) -> np.ndarray:
        """The 2x2 integer matrix ``[[a, b], [c, d]]`` acting on row vectors (x, y), FFmpeg's convention."""
        # x' = a*x + c*y, y' = b*x + d*y
        if self.swap:
            return np.array([[0, -1 if self.flip_rows else 1], [-1 if self.flip_cols else 1, 0]])
        return np.array([[-1 if self.flip_cols else 1, 0], [0, -1 if self.flip_rows else 1]])

    @classmethod
    def from_matrix(cls, m: np.ndarray) -> Orientation:
        a, b, c, d = (int(v) for v in np.asarray(m).reshape(-1))
        if a == 0 and d == 0 and b and c:
            return cls(True, b < 0, c < 0)
        if b == 0 and c == 0 and a and d:
            return cls(False, d < 0, a < 0)
        raise ValueError(f"not an axis-aligned display map: {[a, b, c, d]}")

    @classmethod
    def rotation_ccw(cls, degrees: int) -> Orientation:
        """Counter-clockwise rotation by a multiple of 90 degrees."""
        turns = round(degrees / 90) % 4
        return [cls(), cls(True, True, False), cls(False, True, True), cls(True, False, True)][turns]

    def then(self, other: Orientation) -> Orientation:
        """This map followed by ``other``."""
        return Orientation.from_matrix(self.matrix @ other.matrix)

    def inverse(self) -> Orientation:
        return Orientation.from_matrix(self.matrix.T)

    def apply(self, frames: np.ndarray) -> np.ndarray:
        """Map (T, H, W, C) frames; returns the input itself when this is the identity."""
        if self.identity:
            return frames
        t, _, _, c = frames.shape
        # move whole pixels (one C-byte item each): a transpose of 3-byte items is ~3x faster than of bytes
        pixels = np.ascontiguousarray(frames).view(np.dtype((np.void, c * frames.itemsize)))[..., 0]
        out = pixels.transpose(0, 2, 1) if self.swap else pixels
        if self.flip_rows:
            out = out[:, ::-1]
        if self.flip_cols:
            out = out[:, :, ::-1]
        out = np.ascontiguousarray(out)
        return out.view(frames.dtype).reshape(t, out.shape[1], out.shape[2], c)

    def size(self, height: int, width: int) -> tuple[int, int]:
        return (width, height) if self.swap else (height, width)


def _matrix_angle_ccw(m: np.ndarray) -> int:
    """The rotation angle FFmpeg reads from a display matrix (``av_display_rotation_get``), counter-clockwise."""
    a, b, _c, _d = (float(v) for v in np.asarray(m).reshape(-1))
    return round(-float(np.degrees(np.arctan2(b, a))) / 90) * 90 % 360


@dataclass(frozen=True)
class Display:
    """Everything needed to turn stored frames into displayed frames."""

    orientation: Orientation = Orientation()
    sar: Fraction = Fraction(1)
    decord_rotation_ccw: int = 0  # what decord2 applied already (the matrix angle, flips ignored, or the tag)

    @property
    def identity(self) -> bool:
        return self.orientation.identity and self.sar == 1

    def stored_width_shown(self, width: int) -> int:
        return max(1, round(width * self.sar)) if self.sar != 1 else width

    def size(self, height: int, width: int) -> tuple[int, int]:
        """Displayed (height, width) of a stored height x width picture."""
        return self.orientation.size(height, self.stored_width_shown(width))

    def apply(self, frames: np.ndarray) -> np.ndarray:
        """Stored uint8 (T, H, W, 3) frames -> displayed frames (SAR stretch, then orientation)."""
        if self.identity:
            return frames
        if self.sar != 1:
            frames = _resize_width(frames, self.stored_width_shown(frames.shape[2]))
        return self.orientation.apply(frames)

    def from_decord(self, frames: np.ndarray) -> np.ndarray:
        """decord's frames -> stored orientation (undo the rotation decord2 applies by itself)."""
        return Orientation.rotation_ccw(self.decord_rotation_ccw).inverse().apply(frames)


def _side_data(frame: Any) -> list[Any]:
    """A PyAV frame's side-data entries: 18.1.1 made ``frame.side_data`` a mapping of type -> entry (iterating
    it gives the types); 18.1.0 iterated the entries."""
    container = frame.side_data
    return list(container.values()) if hasattr(container, "values") else list(container)


def display_of(stream: Any, frame: Any) -> Display:
    """The Display of a PyAV video ``stream``, from its first decoded ``frame`` (side data) and its tags."""
    matrix = None
    for side in _side_data(frame):
        if getattr(side.type, "name", "") == "DISPLAYMATRIX":
            raw = np.frombuffer(bytes(side), dtype=np.int32)
            if raw.size >= 9:
                matrix = raw[[0, 1, 3, 4]].astype(np.float64) / 65536.0
    orientation, decord_rotation = Orientation(), 0
    if matrix is not None:
        try:
            orientation = Orientation.from_matrix(np.round(matrix).astype(int))
        except ValueError:
            log.warning("display matrix %s is not a multiple of 90 degrees; showing the stored frame", matrix)
        decord_rotation = _matrix_angle_ccw(matrix)
    else:
        tag = {k.lower(): v for k, v in (stream.metadata or {}).items()}.get("rotate")
        try:
            degrees = int(float(tag)) if tag is not None else 0
        except ValueError:
            degrees = 0
        if degrees % 90 == 0 and degrees % 360:
            orientation = Orientation.rotation_ccw(-degrees)  # the legacy tag turns clockwise
            decord_rotation = -degrees % 360
    sar = frame.sample_aspect_ratio if hasattr(frame, "sample_aspect_ratio") else None
    sar = sar or stream.sample_aspect_ratio or stream.codec_context.sample_aspect_ratio
    sar = Fraction(sar) if sar and sar > 0 else Fraction(1)
    return Display(orientation, sar, decord_rotation)


def probe_display(path: str) -> Display:
    """Display of the video stream PyAV (and decord) would pick; identity when PyAV cannot tell."""
    import av

    try:
        with av.open(path) as container:
            stream = pick_stream(container)
            for frame in container.decode(stream):
                return display_of(stream, frame)
    except Exception as err:  # noqa: BLE001 - decord decides readability; here only the display is missing
        log.debug("%s: no display information (%s)", path, err)
    return Display()


def pick_stream(container: Any) -> Any:
    """The video stream decord reads (FFmpeg's best stream), never cover art if a real video is there."""
    streams = [s for s in container.streams.video if not _attached_pic(s)] or list(container.streams.video)
    if not streams:
        raise ValueError("no video stream")
    try:
        best = container.streams.best("video")
    except Exception:  # noqa: BLE001
        best = None
    return best if best is not None and best in streams else streams[0]


def _attached_pic(stream: Any) -> bool:
    return "attached_pic" in str(stream.disposition).lower()


class RgbConverter:
    """Frame -> uint8 RGB array, exactly as the ffmpeg tool converts it; one per clip (contexts are reused)."""

    def __init__(self, stream: Any) -> None:
        from av.video.reformatter import VideoReformatter

        self._stream = stream
        self._reformatter = VideoReformatter()
        self._graph = None

    def __call__(self, frame: Any) -> np.ndarray:
        if frame.format.name in FAST_RGB_FORMATS:
            return self._reformatter.reformat(frame, format="rgb24").to_ndarray()
        if self._graph is None:
            self._graph = self._build_graph(frame)
        self._graph[1].push(frame)
        return self._graph[2].pull().to_ndarray()

    def _build_graph(self, frame: Any) -> tuple[Any, Any, Any]:
        import av.filter

        graph = av.filter.Graph()
        src = graph.add_buffer(width=frame.width, height=frame.height, format=frame.format.name,
                               time_base=self._stream.time_base)
        scale, fmt, sink = graph.add("scale"), graph.add("format", "rgb24"), graph.add("buffersink")
        src.link_to(scale)
        scale.link_to(fmt)
        fmt.link_to(sink)
        graph.configure()
        return graph, src, sink  # the graph must outlive its filters: they are freed with it


def _resize_width(frames: np.ndarray, width: int) -> np.ndarray:
    from PIL import Image

    out = np.empty((frames.shape[0], frames.shape[1], width, frames.shape[3]), dtype=np.uint8)
    for i, frame in enumerate(frames):
        out[i] = np.asarray(Image.fromarray(frame).resize((width, frames.shape[1]), Image.BICUBIC))
    return out
