"""Qwen2-VL (2B/7B/72B-Instruct, or the project's tiny model) through mindnlp on MindSpore."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, replace

import numpy as np

from captioning_core import runtime, video
from captioning_core.config import RunConfig
from captioning_core.models.base import Captioner, check_model_dir, pickled_weights_allowed
from captioning_core.options import SAMPLING, option

log = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
VIDEO_TOKEN = "<|video_pad|>"


@dataclass(frozen=True)
class Qwen2VLOptions:
    height: int = option(448, help="with --width, the pixel budget height*width per frame", role=SAMPLING)
    width: int = option(672, help="see --height", role=SAMPLING)
    fps: float = option(4.0, role=SAMPLING, help="frames sampled per second (the count is clamped to [4, 768] and "
                                                 "made even, as qwen-vl-utils)")
    min_pixels: int = option(video.VIDEO_MIN_PIXELS, help="lower pixel bound per frame, as qwen-vl-utils",
                             role=SAMPLING)
    max_video_tokens: int | None = option(  # None: no cap (the captioner sets one from the model's context)
        None, role=SAMPLING,
        help="cap on a video's tokens: long videos get smaller frames, then fewer frames (empty: the model's "
             "max_position_embeddings - max_new_tokens - 256; a 60 s clip at 448x672 and 4 fps needs ~44k "
             "tokens, beyond Qwen2-VL's 32k context)")

    def __post_init__(self) -> None:
        if self.height < 28 or self.width < 28:
            raise ValueError(f"--height/--width must be >= 28, got {self.height}x{self.width}")
        if self.fps <= 0:
            raise ValueError(f"--fps must be > 0, got {self.fps}")
        if not (0 < self.min_pixels <= self.height * self.width):
            raise ValueError(f"--min_pixels must be in (0, height*width], got {self.min_pixels}")
        if self.max_video_tokens is not None and self.max_video_tokens < 1:
            raise ValueError(f"--max_video_tokens must be >= 1, got {self.max_video_tokens}")

    @property
    def max_pixels(self) -> int:
        """The seed passes height*width as qwen-vl-utils' max_pixels: a budget, not an output size."""
        return self.height * self.width


@dataclass(frozen=True)
class PatchConfig:
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD

    @property
    def token_pixels(self) -> int:
        """Pixels of one frame that become one language-model token (a merged patch: 28x28)."""
        return (self.patch_size * self.merge_size) ** 2

    def temporal_groups(self, nframes: int) -> int:
        return -(-nframes // self.temporal_patch_size)

    @classmethod
    def from_model_dir(cls, path: str) -> PatchConfig:
        cfg_path = os.path.join(path, "preprocessor_config.json")
        if not os.path.exists(cfg_path):
            return cls()
        with open(cfg_path, encoding="utf-8") as fh:
            raw = json.load(fh)
        return cls(int(raw.get("patch_size", 14)), int(raw.get("temporal_patch_size", 2)),
                   int(raw.get("merge_size", 2)), tuple(raw.get("image_mean", CLIP_MEAN)),
                   tuple(raw.get("image_std", CLIP_STD)))


@dataclass
class PreparedVideo:
    pixel_values: np.ndarray  # (grid_t*grid_h*grid_w, C*tp*p*p) float32
    grid_thw: tuple[int, int, int]
    num_frames: int
    thumb_frames: np.ndarray | None = None
    sample_fps: float = 0.0  # frames per second of video time actually sampled (Qwen2.5-VL's time encoding)

    @property
    def num_tokens(self) -> int:
        t, h, w = self.grid_thw
        return t * h * w // 4


def patchify(frames: np.ndarray, pc: PatchConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Normalise uint8 (T, H, W, 3) frames and lay them out as Qwen2-VL's video patches.

    Same arithmetic as ``Qwen2VLImageProcessor`` (rescale 1/255, normalise, repeat the last frame to a
    multiple of the temporal patch, then the (t, h-block, w-block, merge-row, merge-col, C, tp, p, p)
    order); checked equal to it in tests/test_qwen_preprocess.py.
    """
    t, h, w, c = frames.shape
    p, tp, m = pc.patch_size, pc.temporal_patch_size, pc.merge_size
    if h % (p * m) or w % (p * m):
        raise ValueError(f"frame size {h}x{w} is not a multiple of {p * m}")
    x = frames.astype(np.float32) * np.float32(1 / 255)
    x -= np.asarray(pc.image_mean, np.float32)
    x /= np.asarray(pc.image_std, np.float32)
    x = x.transpose(0, 3, 1, 2)  # T, C, H, W
    if t % tp:
        x = np.concatenate([x, np.repeat(x[-1:], tp - t % tp, axis=0)], axis=0)
    gt, gh, gw = x.shape[0] // tp, h // p, w // p
    x = x.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return np.ascontiguousarray(x.reshape(gt * gh * gw, c * tp * p * p)), (gt, gh, gw)


def sample_frames(path: str, opts: Qwen2VLOptions, pc: PatchConfig | None = None) -> np.ndarray:
    """Decode the frames Qwen2-VL would see, resized to the pixel budget: uint8 (T, H', W', 3)."""
    return sample_video(path, opts, pc)[0]


def sample_video(path: str, opts: Qwen2VLOptions, pc: PatchConfig | None = None) -> tuple[np.ndarray, float]:
    """The frames Qwen2-VL would see (uint8 (T, H', W', 3), resized to the pixel budget), and the rate they
    sample the video at: ``frames * avg_fps / total_frames``, as qwen-vl-utils reports it.

    With ``opts.max_video_tokens`` a long video still fits the model: first each frame's pixel budget
    shrinks (as qwen-vl-utils does with its total-pixel cap), and if even ``min_pixels`` per frame is too
    much, fewer frames (evenly spaced among the sampled ones) are kept.
    """
    pc = pc or PatchConfig()
    reader = video.open_video(path)
    frames = video.read_frames(reader, video.qwen_sample_indices(reader, opts.fps))  # upright, evenly timed
    max_pixels = opts.max_pixels
    if opts.max_video_tokens:
        max_pixels = max(opts.min_pixels, min(max_pixels, opts.max_video_tokens * pc.token_pixels
                                              // pc.temporal_groups(len(frames))))
    height, width = video.qwen_target_size(frames.shape[1], frames.shape[2], max_pixels, opts.min_pixels)
    if opts.max_video_tokens:
        per_group = (height * width) // pc.token_pixels
        keep = max(1, opts.max_video_tokens // per_group) * pc.temporal_patch_size
        if keep < len(frames):
            frames = frames[np.linspace(0, len(frames) - 1, keep).round().astype(int)]
    total, avg_fps = len(reader), float(reader.get_avg_fps() or 0.0)
    sample_fps = len(frames) * avg_fps / total if total and avg_fps > 0 else opts.fps
    return video.resize_frames(frames, height, width), sample_fps


def context_video_tokens(model_dir: str, max_new_tokens: int, prompt_room: int = 256) -> int | None:
    """The video-token budget that keeps prompt + video + caption within the model's context window."""
    try:
        with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as fh:
            raw = json.load(fh)
    except (OSError, ValueError):
        return None
    limit = raw.get("max_position_embeddings") or (raw.get("text_config") or {}).get("max_position_embeddings")
    return max(1, int(limit) - max_new_tokens - prompt_room) if limit else None


class Qwen2VLCaptioner(Captioner):
    name = "qwen2vl"
    default_model_dir = "pretrained_models/Qwen2-VL-7B-Instruct"
    #: the transformers class that loads the checkpoint (mindnlp runs transformers' own modelling code)
    model_class: str = "Qwen2VLForConditionalGeneration"
    options_cls = Qwen2VLOptions

    #: the compiled engine (captioning_core.engine) implements Qwen2-VL, Qwen2.5-VL and Qwen3-VL
    engines = ("eager", "compiled")
    compiled = None  # the compiled engine, set by setup() when cfg.engine == "compiled"

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        self.opts = self.options_cls(**cfg.model_options)
        self.patch = PatchConfig.from_model_dir(self.model_dir) if os.path.isdir(self.model_dir) else PatchConfig()
        if self.opts.max_video_tokens is None:
            cap = context_video_tokens(self.model_dir, cfg.max_new_tokens)
            self.opts = replace(self.opts, max_video_tokens=cap)
        self._prompt_head = self._prompt_tail = ""

    def prepare(self, local_path: str) -> PreparedVideo:
        frames, sample_fps = sample_video(local_path, self.opts, self.patch)
        pixels, grid = patchify(frames, self.patch)
        picks = np.linspace(0, len(frames) - 1, min(4, len(frames))).round().astype(int)
        return PreparedVideo(pixels, grid, frames.shape[0], frames[picks], sample_fps)

    def setup(self) -> None:
        check_model_dir(self.model_dir, self.required_files)
        if self.cfg.engine == "compiled":
            self.setup_prompt()
            self.compiled = self.compiled_class().from_pretrained(self.model_dir, self.cfg.dtype, self.cfg.device_target)
            log.info("loaded %s into the compiled engine (%s, %s)", self.model_dir, self.cfg.device_target,
                     self.cfg.dtype)
            return
        runtime.import_mindnlp()
        from mindnlp import transformers

        self.setup_prompt()
        self.model = getattr(transformers, self.model_class).from_pretrained(
            self.model_dir, torch_dtype=runtime.torch_dtype(self.cfg.dtype), trust_remote_code=False,
            use_safetensors=not pickled_weights_allowed())
        runtime.own_parameters(self.model)  # no host copy of the weights left beside MindSpore's (item 11)
        self.model.eval()
        log.info("loaded %s (%s, %s)", self.model_dir, self.cfg.device_target, self.cfg.dtype)

    @classmethod
    def compiled_class(cls) -> type:
        """The compiled engine class for this model (``--engine compiled``)."""
        from captioning_core.engine.qwen2vl import CompiledQwen2VL

        return CompiledQwen2VL

    def setup_prompt(self) -> None:
        """Tokenizer and chat prompt, without the model (``setup`` calls it after importing mindnlp)."""
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir, trust_remote_code=False)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        template = load_chat_template(self.model_dir, self.tokenizer)
        messages = [{"role": "user", "content": [{"type": "video"},
                                                  {"type": "text", "text": self.cfg.question}]}]
        prompt = self.tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                    add_generation_prompt=True)
        if prompt.count(VIDEO_TOKEN) != 1:
            raise ValueError(f"chat template must place exactly one {VIDEO_TOKEN}; got {prompt!r}")
        self._prompt_head, _, self._prompt_tail = prompt.partition(VIDEO_TOKEN)

    def prompt_for_template(self) -> str:
        """The chat prompt with its one video placeholder unexpanded (what a Hugging Face processor expands)."""
        return self._prompt_head + VIDEO_TOKEN + self._prompt_tail

    def prompt_for(self, item: PreparedVideo) -> str:
        """The chat prompt with the one video placeholder expanded to the video's token count."""
        return self._prompt_head + VIDEO_TOKEN * item.num_tokens + self._prompt_tail

    def prefill_tokens(self, item: PreparedVideo) -> int:
        """The length of ``prompt_for(item)`` in tokens: the video's tokens plus the chat text around them
        (tokenized once: the special video tokens split the text, so the rest does not depend on the video)."""
        if getattr(self, "_text_tokens", None) is None:
            ids = self.tokenizer(self._prompt_head + VIDEO_TOKEN + self._prompt_tail)["input_ids"]
            self._text_tokens = len(ids) - 1
        return self._text_tokens + item.num_tokens

    def model_inputs(self, batch: list[PreparedVideo]) -> dict[str, np.ndarray]:
        """The batch as the model's keyword arguments, in numpy: left-padded prompts, patches, grids.

        (Also what the reference-parity test feeds to transformers on real PyTorch.)
        """
        enc = self.tokenizer([self.prompt_for(item) for item in batch], padding=True, return_tensors="np")
        int_dtype = np.int32 if self.cfg.device_target == "Ascend" else np.int64
        return {"input_ids": enc["input_ids"].astype(int_dtype),
                "attention_mask": enc["attention_mask"].astype(int_dtype),
                "pixel_values_videos": np.concatenate([b.pixel_values for b in batch]),
                "video_grid_thw": np.asarray([b.grid_thw for b in batch], dtype=int_dtype)}

    def generate(self, batch: list[PreparedVideo]) -> list[list[int]]:
        arrays = self.model_inputs(batch)
        if self.compiled is not None:
            rows = self.compiled.generate(arrays, self.cfg.max_new_tokens, eos_ids=self.compiled.eos_ids)
            return [trim_generated(row, self.stop_ids) for row in rows]
        import torch  # mindtorch under mindnlp

        inputs = {name: torch.tensor(value) for name, value in arrays.items()}
        inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(runtime.torch_dtype(self.cfg.dtype))
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=self.cfg.max_new_tokens)
        prompt_len = arrays["input_ids"].shape[1]
        ids = out.asnumpy() if hasattr(out, "asnumpy") else out.numpy()
        return [trim_generated(row[prompt_len:].tolist(), self.stop_ids) for row in ids]

    @property
    def stop_ids(self) -> set[int]:
        ids = {self.tokenizer.pad_token_id, self.tokenizer.eos_token_id}
        if self.compiled is not None:
            ids.update(self.compiled.eos_ids)
        else:
            gen_eos = getattr(self.model.generation_config, "eos_token_id", None)
            ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
        return {i for i in ids if i is not None}

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True,
                                     clean_up_tokenization_spaces=False).strip()


def trim_generated(ids: list[int], stop_ids: set[int]) -> list[int]:
    """Cut a generated row at its first stop token (eos, or padding of a shorter row in the batch)."""
    for i, tok in enumerate(ids):
        if tok in stop_ids:
            return ids[:i]
    return ids


def load_chat_template(model_dir: str, tokenizer) -> str:
    """The checkpoint's chat template: the tokenizer's, else ``chat_template.json``/``.jinja``."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    for name in ("chat_template.jinja", "chat_template.json"):
        path = os.path.join(model_dir, name)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
            return json.loads(text)["chat_template"] if name.endswith(".json") else text
    raise ValueError(f"{model_dir}: no chat template (tokenizer_config.json, chat_template.json/.jinja)")
