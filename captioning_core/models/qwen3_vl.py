"""Qwen3-VL (2B/4B/8B/32B-Instruct, or the project's tiny model) through mindnlp on MindSpore.

What differs from Qwen2-VL, and so lives here (everything else is ``qwen2_vl``'s code):

- The video processor: 16-px patches merged 2x2 into 32-px tokens, mean/std 0.5, ``fps`` sampling with
  ``min_frames``/``max_frames`` and *no* rounding to an even count (the last frame is repeated to fill the
  temporal patch), and a pixel budget over the whole video (frames x height x width) rather than per frame.
  Defaults come from the checkpoint's ``video_preprocessor_config.json``, else from transformers'
  ``Qwen3VLVideoProcessor``; tests/test_qwen3_preprocess.py checks our numpy path against transformers' own.
- The prompt: the processor writes every temporal group of the video as ``<t seconds>`` text followed by
  ``<|vision_start|>`` + its ``<|video_pad|>`` tokens + ``<|vision_end|>``, where ``t`` is the mean time of
  the group's frames. The model learned those times, so the prompt must carry them.
- mindnlp 0.5.1 cannot run two of transformers' Qwen3-VL functions (``apply_interleaved_mrope`` on configs
  whose M-RoPE slices run past the last frequency, and ``_deepstack_process`` always): the captioner installs
  equivalent formulations (``interleaved_mrope``, ``deepstack_process``) before it loads the model.
  ``--engine compiled`` (``captioning_core.engine.qwen3vl``) runs neither mindnlp nor these functions.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field, replace

import numpy as np

from captioning_core import runtime, video
from captioning_core.config import RunConfig
from captioning_core.models.base import Captioner
from captioning_core.models.qwen2_vl import (
    VIDEO_TOKEN,
    PatchConfig,
    PreparedVideo,
    Qwen2VLCaptioner,
    context_video_tokens,
    patchify,
)
from captioning_core.options import SAMPLING, option

log = logging.getLogger(__name__)

VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
QWEN3_MEAN = QWEN3_STD = (0.5, 0.5, 0.5)
# transformers 4.57.1 Qwen3VLVideoProcessor class defaults (size is over the whole video: t * h * w)
DEFAULT_FPS = 2.0
DEFAULT_MIN_FRAMES, DEFAULT_MAX_FRAMES = 4, 768
DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS = 128 * 32 * 32, 32 * 32 * 768
VIDEO_CONFIG = "video_preprocessor_config.json"


@dataclass(frozen=True)
class Qwen3VLOptions:
    """Sampling and pixel budget; None means the checkpoint's video processor setting."""

    fps: float | None = option(None, role=SAMPLING,
                               help=f"frames sampled per second (default: the checkpoint's, else {DEFAULT_FPS:g})")
    min_frames: int | None = option(None, role=SAMPLING,
                                    help=f"fewest frames sampled (default: the checkpoint's, else {DEFAULT_MIN_FRAMES})")
    max_frames: int | None = option(None, role=SAMPLING,
                                    help=f"most frames sampled (default: the checkpoint's, else {DEFAULT_MAX_FRAMES})")
    min_pixels: int | None = option(None, role=SAMPLING,
                                    help=f"lower bound on frames*height*width (default: the checkpoint's, else "
                                         f"{DEFAULT_MIN_PIXELS})")
    max_pixels: int | None = option(None, role=SAMPLING,
                                    help=f"upper bound on frames*height*width (default: the checkpoint's, else "
                                         f"{DEFAULT_MAX_PIXELS})")
    height: int | None = option(None, role=SAMPLING,  # with width: an extra per-frame budget, as Qwen2-VL's
                                help="with --width, also cap each frame at height*width pixels (default: no "
                                     "per-frame cap)")
    width: int | None = option(None, help="see --height", role=SAMPLING)
    max_video_tokens: int | None = option(  # None: no cap (the captioner sets one from the model's context)
        None, role=SAMPLING,
        help="cap on a video's tokens: long videos get smaller frames, then fewer frames (default: the model's "
             "max_position_embeddings - max_new_tokens - 256)")

    def __post_init__(self) -> None:
        if (self.height is None) != (self.width is None):
            raise ValueError("--height and --width go together")
        if self.height is not None and (self.height < 32 or self.width < 32):
            raise ValueError(f"--height/--width must be >= 32, got {self.height}x{self.width}")
        if self.fps is not None and self.fps <= 0:
            raise ValueError(f"--fps must be > 0, got {self.fps}")
        for name in ("min_frames", "max_frames", "min_pixels", "max_pixels", "max_video_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be >= 1, got {value}")
        if self.min_frames and self.max_frames and self.min_frames > self.max_frames:
            raise ValueError(f"--min_frames {self.min_frames} > --max_frames {self.max_frames}")
        if self.min_pixels and self.max_pixels and self.min_pixels > self.max_pixels:
            raise ValueError(f"--min_pixels {self.min_pixels} > --max_pixels {self.max_pixels}")


@dataclass(frozen=True)
class VideoProcessorConfig:
    """The Qwen3-VL video processor settings that decide what the model sees."""

    patch: PatchConfig = PatchConfig(16, 2, 2, QWEN3_MEAN, QWEN3_STD)
    fps: float = DEFAULT_FPS
    min_frames: int = DEFAULT_MIN_FRAMES
    max_frames: int = DEFAULT_MAX_FRAMES
    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = DEFAULT_MAX_PIXELS

    @classmethod
    def from_model_dir(cls, path: str) -> VideoProcessorConfig:
        """``video_preprocessor_config.json`` as transformers reads it (keys missing: the class defaults)."""
        cfg_path = os.path.join(path, VIDEO_CONFIG)
        if not os.path.exists(cfg_path):
            return cls()
        with open(cfg_path, encoding="utf-8") as fh:
            raw = json.load(fh)
        size = raw.get("size") or {}
        base = cls()
        return cls(PatchConfig(int(raw.get("patch_size", 16)), int(raw.get("temporal_patch_size", 2)),
                               int(raw.get("merge_size", 2)), tuple(raw.get("image_mean", QWEN3_MEAN)),
                               tuple(raw.get("image_std", QWEN3_STD))),
                   float(raw.get("fps", base.fps)), int(raw.get("min_frames", base.min_frames)),
                   int(raw.get("max_frames", base.max_frames)),
                   int(size.get("shortest_edge", base.min_pixels)), int(size.get("longest_edge", base.max_pixels)))

    def with_options(self, opts: Qwen3VLOptions) -> VideoProcessorConfig:
        """These settings with the command line's overrides."""
        given = {k: getattr(opts, k) for k in ("fps", "min_frames", "max_frames", "min_pixels", "max_pixels")}
        return replace(self, **{k: v for k, v in given.items() if v is not None})

    def to_json(self) -> dict:
        """The ``video_preprocessor_config.json`` that makes transformers' processor use these settings."""
        p = self.patch
        return {"video_processor_type": "Qwen3VLVideoProcessor", "patch_size": p.patch_size,
                "temporal_patch_size": p.temporal_patch_size, "merge_size": p.merge_size,
                "image_mean": list(p.image_mean), "image_std": list(p.image_std), "fps": self.fps,
                "min_frames": self.min_frames, "max_frames": self.max_frames, "do_sample_frames": True,
                "size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels}}


@dataclass
class Qwen3PreparedVideo(PreparedVideo):
    timestamps: tuple[float, ...] = field(default=())  # seconds, one per temporal group


def frame_count(total_frames: int, video_fps: float, vp: VideoProcessorConfig) -> int:
    """How many frames Qwen3VLVideoProcessor samples (``int(duration * fps)`` in [min, max], <= the video's)."""
    if total_frames < 1:
        raise video.VideoError("video has no frames")
    if video_fps <= 0:
        raise video.VideoError(f"video reports fps {video_fps}")
    n = int(total_frames / video_fps * vp.fps)
    return min(min(max(n, vp.min_frames), vp.max_frames), total_frames)


def target_size(num_frames: int, height: int, width: int, vp: VideoProcessorConfig,
                max_pixels: int | None = None) -> tuple[int, int]:
    """(h, w) in multiples of 32 with frames*h*w in the video budget: transformers' Qwen3-VL ``smart_resize``
    arithmetic (checked equal in tests), written out so decode threads need no transformers/torch import."""
    factor = vp.patch.patch_size * vp.patch.merge_size
    tf = vp.patch.temporal_patch_size
    max_pixels = vp.max_pixels if max_pixels is None else max_pixels
    if height < factor or width < factor:
        raise video.VideoError(f"frame {height}x{width} is smaller than {factor} pixels")
    if max(height, width) / min(height, width) > 200:
        raise video.VideoError(f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}")
    n = max(num_frames, tf)  # transformers refuses fewer; we repeat a 1-frame video's frame
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    t_bar = round(n / tf) * tf
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt(n * height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < vp.min_pixels:
        beta = math.sqrt(vp.min_pixels / (n * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def group_timestamps(indices: list[int], video_fps: float, merge: int = 2) -> tuple[float, ...]:
    """Seconds of each temporal group: the mean of its first and last frame's ``index / fps``.

    As ``Qwen3VLProcessor._calculate_timestamps`` (it groups by the processor's ``merge_size``, which equals
    the temporal patch in every released config), padding with the last index like the frames.
    """
    idx = list(indices)
    if len(idx) % merge:
        idx += [idx[-1]] * (merge - len(idx) % merge)
    times = [i / video_fps for i in idx]
    return tuple((times[i] + times[i + merge - 1]) / 2 for i in range(0, len(times), merge))


def sample_indices(reader: video.Video, vp: VideoProcessorConfig) -> list[int]:
    """Qwen3-VL's frame indices: ``linspace(0, total-1, n).round()``; on variable-rate clips the frames nearest
    evenly spaced times instead (as our Qwen2-VL sampling), so a burst gets no more samples than a pause."""
    total = len(reader)
    fps = float(reader.get_avg_fps() or 0.0)
    try:
        times = video.frame_times(reader) if total >= 3 else np.zeros(0)
    except video.VideoError:
        times = np.zeros(0)
    if video.is_constant_rate(times) or not np.all(np.diff(times) > 0):
        return video.qwen_frame_indices(total, frame_count(total, fps, vp))
    step = float(np.median(np.diff(times)))
    duration = float(times[-1] - times[0]) + step
    return video.qwen_time_indices(times, frame_count(total, total / duration, vp))


def sample_frames(path: str, vp: VideoProcessorConfig, opts: Qwen3VLOptions | None = None
                  ) -> tuple[np.ndarray, tuple[float, ...]]:
    """The frames Qwen3-VL sees, resized (uint8 (T, H', W', 3)), and each temporal group's time in seconds.

    ``opts.height*width`` caps each frame's pixels; ``opts.max_video_tokens`` caps the video's tokens: first
    frames shrink, then (if even the minimum is too much) fewer frames, evenly spaced, are kept.
    """
    opts = opts or Qwen3VLOptions()
    reader = video.open_video(path)
    indices = sample_indices(reader, vp)
    fps = float(reader.get_avg_fps() or 0.0) or 24.0  # transformers' fallback when fps is unknown
    frames = video.read_frames(reader, indices)
    return fit_frames(frames, indices, fps, vp, opts)


def fit_frames(frames: np.ndarray, indices: list[int], video_fps: float, vp: VideoProcessorConfig,
               opts: Qwen3VLOptions) -> tuple[np.ndarray, tuple[float, ...]]:
    """Resize sampled frames to the budget (and drop frames beyond the token cap); also their group times."""
    pc = vp.patch
    n = len(frames)
    groups = pc.temporal_groups(n)
    budget = vp.max_pixels
    if opts.height is not None:
        budget = min(budget, groups * pc.temporal_patch_size * opts.height * opts.width)
    if opts.max_video_tokens:
        budget = max(vp.min_pixels, min(budget, opts.max_video_tokens * pc.token_pixels * pc.temporal_patch_size))
    height, width = target_size(n, frames.shape[1], frames.shape[2], vp, budget)
    if opts.max_video_tokens:
        keep = max(1, opts.max_video_tokens // ((height * width) // pc.token_pixels)) * pc.temporal_patch_size
        if keep < n:
            picks = np.linspace(0, n - 1, keep).round().astype(int)
            frames, indices = frames[picks], [indices[i] for i in picks]
    return video.resize_frames_float(frames, height, width), group_timestamps(indices, video_fps, pc.merge_size)


def video_prompt(grid_thw: tuple[int, int, int], timestamps: tuple[float, ...], merge: int = 2) -> str:
    """A video as Qwen3VLProcessor writes it: ``<t seconds>`` + vision_start + pads + vision_end per group."""
    t, h, w = grid_thw
    pads = VIDEO_TOKEN * (h * w // (merge * merge))
    return "".join(f"<{timestamps[i]:.1f} seconds>{VISION_START}{pads}{VISION_END}" for i in range(t))


def expand_video(prompt: str, grid_thw: tuple[int, int, int], timestamps: tuple[float, ...], merge: int = 2) -> str:
    """The chat prompt's one video placeholder replaced as the processor does: the whole
    ``<|vision_start|><|video_pad|><|vision_end|>`` if the template wrote it, else the bare pad token."""
    wrapped = VISION_START + VIDEO_TOKEN + VISION_END
    body = video_prompt(grid_thw, timestamps, merge)
    return prompt.replace(wrapped, body, 1) if wrapped in prompt else prompt.replace(VIDEO_TOKEN, body, 1)


def interleaved_mrope(self, freqs, mrope_section):
    """``Qwen3VLTextRotaryEmbedding.apply_interleaved_mrope`` without strided slice assignment.

    The original writes ``freqs_t[..., offset:length:3] = freqs[dim, ..., offset:length:3]`` for H and W,
    with ``length = 3 * mrope_section[dim]``. When that stop runs past the last frequency (any config where
    ``3 * max(mrope_section[1:]) > head_dim // 2``, e.g. the tiny model's [2, 3, 3] with 8 frequencies),
    mindtorch's slice assignment (mindnlp 0.5.1, ``strided_slice_update``) sizes the target from the
    unclamped stop and raises in BroadcastTo (``a = torch.zeros(8); a[2:9:3] = torch.arange(8.)[2:9:3]``:
    value (2,), target (3,)); PyTorch clamps the stop first. Released Qwen3-VL configs ([24, 20, 20], 64
    frequencies) stay in range and run either way. The same selection as a per-frequency choice of T/H/W,
    taken with ``where``, gives identical values on every backend.
    """
    import torch

    n = freqs.shape[-1]
    source = np.zeros(n, dtype=np.int64)  # 0: T, 1: H, 2: W
    for dim, offset in ((1, 1), (2, 2)):
        source[offset:min(mrope_section[dim] * 3, n):3] = dim
    is_h = torch.tensor(source == 1).to(freqs.device)
    is_w = torch.tensor(source == 2).to(freqs.device)
    return torch.where(is_w, freqs[2], torch.where(is_h, freqs[1], freqs[0]))


def deepstack_process(self, hidden_states, visual_pos_masks, visual_embeds):
    """``Qwen3VLTextModel._deepstack_process`` without assignment through a 2-D boolean mask.

    The original adds the deepstack features at the visual positions with
    ``hidden_states[visual_pos_masks, :] = hidden_states[visual_pos_masks, :] + visual_embeds``, where the mask
    is (batch, seq). mindtorch (mindnlp 0.5.1) reads through such a mask but cannot assign through it
    (``NotImplementedError: Need rank 1 for bool index``). The same sums, written back with
    ``masked_scatter`` (which Qwen2-VL's own embedding merge uses), give identical values. Not in place: the
    caller uses the returned tensor.
    """
    mask = visual_pos_masks.to(hidden_states.device)
    visual_embeds = visual_embeds.to(hidden_states.device, hidden_states.dtype)
    updated = hidden_states[mask, :] + visual_embeds
    return hidden_states.masked_scatter(mask.unsqueeze(-1).expand_as(hidden_states), updated)


def install_mindnlp_workarounds() -> None:
    """Make transformers' Qwen3-VL classes use ``interleaved_mrope`` and ``deepstack_process`` (idempotent)."""
    from transformers.models.qwen3_vl import modeling_qwen3_vl

    modeling_qwen3_vl.Qwen3VLTextRotaryEmbedding.apply_interleaved_mrope = interleaved_mrope
    modeling_qwen3_vl.Qwen3VLTextModel._deepstack_process = deepstack_process


class Qwen3VLCaptioner(Qwen2VLCaptioner):
    """Qwen2-VL's captioner with Qwen3-VL's video processor, timestamped prompt and model class."""

    name = "qwen3vl"
    default_model_dir = "pretrained_models/Qwen3-VL-8B-Instruct"
    model_class = "Qwen3VLForConditionalGeneration"
    options_cls = Qwen3VLOptions
    engines = ("eager", "compiled")  # compiled: captioning_core.engine.qwen3vl (tests/test_engine_qwen3vl.py)

    def __init__(self, cfg: RunConfig) -> None:
        Captioner.__init__(self, cfg)
        self.opts = Qwen3VLOptions(**cfg.model_options)
        base = VideoProcessorConfig.from_model_dir(self.model_dir) if os.path.isdir(self.model_dir) \
            else VideoProcessorConfig()
        self.vp = base.with_options(self.opts)
        self.patch = self.vp.patch
        if self.opts.max_video_tokens is None:
            self.opts = replace(self.opts, max_video_tokens=context_video_tokens(self.model_dir, cfg.max_new_tokens))
        self._prompt_head = self._prompt_tail = ""

    def prepare(self, local_path: str) -> Qwen3PreparedVideo:
        frames, stamps = sample_frames(local_path, self.vp, self.opts)
        pixels, grid = patchify(frames, self.patch)
        picks = np.linspace(0, len(frames) - 1, min(4, len(frames))).round().astype(int)
        return Qwen3PreparedVideo(pixels, grid, frames.shape[0], frames[picks], timestamps=stamps)

    def setup(self) -> None:
        if self.cfg.engine != "compiled":  # the compiled engine's process never imports mindnlp
            runtime.import_mindnlp()
            install_mindnlp_workarounds()
        super().setup()

    @classmethod
    def compiled_class(cls) -> type:
        from captioning_core.engine.qwen3vl import CompiledQwen3VL

        return CompiledQwen3VL

    def prompt_for(self, item: Qwen3PreparedVideo) -> str:
        """The chat prompt with its video written out per temporal group, timestamps included."""
        return expand_video(self._prompt_head + VIDEO_TOKEN + self._prompt_tail, item.grid_thw, item.timestamps,
                            self.patch.merge_size)
