"""PLLaVA (7B/13B/34B, or the project's tiny model) through mindnlp on MindSpore.

Frames: ``--num_frames`` at segment centres (PLLaVA's ``get_index``), PllavaProcessor's per-video resize, then
the checkpoint's CLIPImageProcessor. Prompt: PLLaVA's conversation templates (``--conv_mode``). Model: see
``pllava_arch`` (network) and ``pllava_weights`` (checkpoint layouts, LoRA), imported only in ``setup`` so
that nothing here imports torch before mindnlp.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
from dataclasses import dataclass

import numpy as np

from captioning_core import runtime, video
from captioning_core.config import RunConfig
from captioning_core.models.base import Captioner, check_model_dir
from captioning_core.models.qwen2_vl import trim_generated
from captioning_core.options import CHECKPOINT, GENERATION, PROMPT, SAMPLING, option

log = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
TOP_P = 0.9  # PLLaVA's answer()/pllava_answer() default, used when --temperature enables sampling
DEMO_SYSTEM = (
    "You are a powerful Video Magic ChatBot, a large vision-language assistant. \n"
    "You are able to understand the video content that the user provides and assist the user in a "
    "video-language related task.\n"
    "The user might provide you with the video and maybe some extra noisy information to help you out or ask "
    "you a question. Make use of the information in a proper way to be competent for the job.\n"
    "### INSTRUCTIONS:\n1. Follow the user's instruction.\n2. Be critical yet believe in yourself.\n")
SYSTEM_RECAPTION = (
    "You are a powerful Video Magic ChatBot, a large vision-language assistant. \n"
    "You are able to understand the video content that the user provides and assist the user in a video "
    "recaptioning task.\n"
    "The user will provide you with the video and maybe some extra noisy information to help you out. Make use "
    "of the information in a proper way to be competent for the recaption job\n"
    "### INSTRUCTIONS:\n1. Follow the user's instruction.\n2. Be critical yet believe in yourself.\n")
VIDEOQA_PRE = ("The input consists of a sequence of key frames from a video. Answer the question concisely first "
               "and followed by significant events, characters, or objects that appear throughout the frames. "
               "Question:")
_LLAVANEXT = dict(roles=("<|im_start|>user\n", "<|im_start|>assistant\n"), seps=("<|im_end|>\n", "<|im_end|>\n"),
                  split_tag="<|im_start|> assistant\n")


@dataclass(frozen=True)
class Template:
    """One of PLLaVA's ``conv_templates`` (eval_utils.Conversation), plus how the seed's flow uses it."""

    roles: tuple[str, str] = ("USER: ", "ASSISTANT:")
    seps: tuple[str, str] = (" ", "</s>")
    mm_token: str = "<image>\n"
    mm_alone: bool = True  # MM_ALONE: the video is its own user message; else MM_INTERLEAF
    system: str = ""
    pre_query: str | None = None
    post_query: str | None = None
    answer_prompt: str | None = None
    video_first_chat: bool = False  # ChatPllava: video uploaded as its own message, then the question
    split_tag: str | None = None  # decoding inserts a space into "<|im_start|>assistant"

    def messages(self, question: str) -> list[tuple[str, str]]:
        user, assistant = self.roles
        if self.video_first_chat:  # upload_video: user_query("", is_mm=True); ask: user_query(question)
            return [(user, f"{self.mm_token} "), (user, question)]
        query = question
        if self.post_query is not None:
            query = f"{query} {self.post_query}"
        if self.pre_query is not None:
            query = f"{self.pre_query} {query}"
        out = []
        if self.mm_alone:
            out.append((user, self.mm_token))
        elif self.mm_token not in query:
            query = f"{self.mm_token} {query}"
        out.append((user, query))
        if self.answer_prompt is not None:
            out.append((assistant, self.answer_prompt))
        return out

    def prompt(self, question: str) -> str:
        """Conversation.get_prompt: system+sep, role+message+sep per turn, the assistant role last."""
        sep = dict(zip(self.roles, self.seps, strict=True))
        text = self.system + sep[self.roles[0]] if self.system else ""
        turns = self.messages(question)
        for i, (role, message) in enumerate(turns):
            text += role + message
            if i + 1 < len(turns):
                text += sep[role]
            elif role != self.roles[-1]:
                text += sep[role] + self.roles[-1]
        return text

    def clean(self, text: str) -> str:
        """pllava_answer's cleanup: keep what follows the last assistant role, drop the trailing sep, strip."""
        text = text.split(self.split_tag or self.roles[-1])[-1]
        return text.removesuffix(self.seps[1]).strip()


CONV_TEMPLATES: dict[str, Template] = {
    # the seed's (and the demo's) ChatPllava flow on conv_plain_v1, whose empty system ChatPllava.ask replaces
    "plain": Template(roles=("USER:", "ASSISTANT:"), mm_token=IMAGE_TOKEN, mm_alone=False, system=DEMO_SYSTEM,
                      video_first_chat=True),
    "eval_recaption": Template(system=SYSTEM_RECAPTION),
    "eval_recaption_llavanext": Template(system=SYSTEM_RECAPTION, **_LLAVANEXT),
    "eval_videoqabench": Template(mm_alone=False, pre_query=VIDEOQA_PRE, post_query="\n",
                                  answer_prompt="\nAnswer: In the video,"),
    "eval_videoqa_llavanext": Template(mm_alone=False, system="<|im_start|>system\nAnswer the question.",
                                       pre_query=VIDEOQA_PRE, post_query="\n",
                                       answer_prompt="\nAnswer: In the video,", **_LLAVANEXT),
}
DEFAULT_CONV_MODE = "plain"


def parse_pooling_shape(text: str | tuple | list) -> tuple[int, int, int]:
    """"16-12-12", "(16,12,12)", "16,12,12", "[16, 12, 12]" or "16x12x12" -> (16, 12, 12)."""
    if isinstance(text, tuple | list):
        parts = [str(v) for v in text]
    else:
        parts = [p for p in re.split(r"[\s,x\-]+", str(text).strip().strip("()[]").strip()) if p]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"pooling shape must be three positive ints like 16-12-12, got {text!r}")
    return shape  # type: ignore[return-value]


@dataclass(frozen=True)
class PllavaOptions:
    num_frames: int = option(4, help="frames sampled at segment centres (PLLaVA's get_index)", role=SAMPLING)
    pooling_shape: tuple[int, int, int] = option(
        (16, 12, 12), role=SAMPLING, parse=parse_pooling_shape,
        help="adaptive 3D average pool of the (frames, 24, 24) feature grid, e.g. 16-12-12; with 4 frames, 16 "
             "repeats each frame 4x (2304 video tokens) as load_pllava's default does, 4-12-12 gives 576 "
             "(Open-Sora's choice)")
    use_lora: bool = option(False, role=CHECKPOINT,
                            help="wrap the language model in peft LoRA (q_proj/v_proj, rank read from the weights) "
                                 "and load its lora_A/lora_B from --weight_dir")
    weight_dir: str | None = option(None, role=CHECKPOINT, by_content=True,
                                    help="checkpoint whose weights are loaded over the model dir's, as load_pllava "
                                         "does (default with --use_lora: the model dir itself)")
    lora_alpha: float = option(32, role=CHECKPOINT,
                               help="LoRA scale numerator: scale = lora_alpha / rank (load_pllava's default 32; "
                                    "PLLaVA's own eval scripts pass 4)")
    conv_mode: str = option(DEFAULT_CONV_MODE, role=PROMPT, choices=tuple(sorted(CONV_TEMPLATES)),
                            help="PLLaVA conversation template; 'plain' is the seed's ChatPllava flow with the demo "
                                 "system prompt, the eval_* ones are PLLaVA's evaluation templates")
    num_beams: int = option(1, help="beam search with this many beams (1: greedy)", role=GENERATION)
    temperature: float = option(1.0, role=GENERATION,
                                help="1.0: greedy decoding (the seed passes do_sample=False, so its temperature did "
                                     "nothing). Any other value samples with this temperature and top-p 0.9, from a "
                                     "generator seeded by --seed each generate call: reruns give the same captions. "
                                     "Not combinable with --num_beams > 1")
    seed: int = option(0, help="seed of --temperature sampling", role=GENERATION)

    def __post_init__(self) -> None:
        object.__setattr__(self, "pooling_shape", parse_pooling_shape(self.pooling_shape))
        if self.num_frames < 1:
            raise ValueError(f"--num_frames must be >= 1, got {self.num_frames}")
        if self.conv_mode not in CONV_TEMPLATES:
            raise ValueError(f"--conv_mode must be one of {sorted(CONV_TEMPLATES)}, got {self.conv_mode!r}")
        if self.num_beams < 1:
            raise ValueError(f"--num_beams must be >= 1, got {self.num_beams}")
        if self.temperature <= 0:
            raise ValueError(f"--temperature must be > 0, got {self.temperature}")
        if self.sampling and self.num_beams > 1:
            raise ValueError("--temperature != 1.0 samples; it cannot be combined with --num_beams > 1")
        if self.lora_alpha < 0:
            raise ValueError(f"--lora_alpha must be >= 0, got {self.lora_alpha}")
        if self.weight_dir is not None and not self.weight_dir:
            raise ValueError("--weight_dir must not be empty")

    @property
    def sampling(self) -> bool:
        return self.temperature != 1.0

    @property
    def template(self) -> Template:
        return CONV_TEMPLATES[self.conv_mode]


@dataclass
class PreparedVideo:
    pixel_values: np.ndarray  # (num_frames, 3, S, S) float32, CLIP-normalised
    thumb_frames: np.ndarray | None = None  # the sampled uint8 frames, for the gallery


def preresize_size(height: int, width: int, clip_resolution: int) -> tuple[int, int]:
    """(h, w) that PllavaProcessor.resize_crop_longshort resizes one video's frames to before CLIP.

    Short side = max(min(short, int(min(640, long) / (long/short))), clip_resolution); long side by
    transformers' get_resize_output_image_size (int truncation). E.g. 1080x1920 at 336 -> (360, 640).
    """
    short, long = min(height, width), max(height, width)
    rate = long / short
    target = max(min(short, int(min(640, long) / rate)), clip_resolution)
    new_long = int(target * long / short)
    return (target, new_long) if height <= width else (new_long, target)


def preprocess_frames(frames: np.ndarray, image_processor) -> np.ndarray:
    """uint8 (T, H, W, 3) frames -> float32 (T, 3, S, S) pixel values, as PllavaProcessor does for one video:
    its long/short resize (BICUBIC, transformers' resize), then the checkpoint's CLIPImageProcessor."""
    from transformers.image_transforms import resize
    from transformers.image_utils import ChannelDimension, PILImageResampling

    _, height, width, _ = frames.shape
    size = preresize_size(height, width, int(image_processor.size["shortest_edge"]))
    images = list(frames)
    if size != (height, width):
        images = [resize(f, size, resample=PILImageResampling.BICUBIC, input_data_format=ChannelDimension.LAST)
                  for f in images]
    return image_processor(images=images, return_tensors="np")["pixel_values"].astype(np.float32)


def load_image_processor(model_dir: str, image_size: int):
    """The checkpoint's CLIPImageProcessor (slow class, as PllavaProcessor names it), else CLIP defaults at
    the vision tower's size (PLLaVA falls back to llava-1.5's processor, which is that at 336)."""
    from transformers import CLIPImageProcessor

    if os.path.exists(os.path.join(model_dir, "preprocessor_config.json")):
        processor = CLIPImageProcessor.from_pretrained(model_dir)
    else:
        log.warning("%s has no preprocessor_config.json; using CLIP defaults at %d px", model_dir, image_size)
        processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                       crop_size={"height": image_size, "width": image_size})
    crop = processor.crop_size
    if (crop["height"], crop["width"]) != (image_size, image_size):
        raise ValueError(f"preprocessor crop {crop} does not match the vision tower's {image_size} px")
    return processor


def sample_frames(path: str, num_frames: int) -> np.ndarray:
    """uint8 (num_frames, H, W, 3) at PLLaVA's segment centres (frames repeat when the clip is shorter)."""
    reader = video.open_video(path)
    return video.read_frames(reader, video.pllava_frame_indices(len(reader), num_frames))


class PllavaCaptioner(Captioner):
    name = "pllava"
    default_model_dir = "./pretrained_models/pllava"
    options_cls = PllavaOptions

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        self.opts = PllavaOptions(**cfg.model_options)
        self.image_processor = None
        self.prompt_ids: list[int] = []
        self.load_report = None

    def prepare(self, local_path: str) -> PreparedVideo:
        if self.image_processor is None:
            raise RuntimeError("PllavaCaptioner.setup() must run before prepare()")
        frames = sample_frames(local_path, self.opts.num_frames)
        return PreparedVideo(preprocess_frames(frames, self.image_processor), frames)

    def setup_preprocessing(self) -> None:
        runtime.import_mindnlp()
        if self.image_processor is None:
            with open(os.path.join(self.model_dir, "config.json"), encoding="utf-8") as fh:
                vision = json.load(fh).get("vision_config") or {}
            self.image_processor = load_image_processor(self.model_dir, int(vision.get("image_size", 336)))

    def setup(self) -> None:
        check_model_dir(self.model_dir, self.required_files)
        runtime.import_mindnlp()
        import torch  # mindtorch under mindnlp
        from transformers import AutoTokenizer, GenerationConfig
        from transformers.modeling_utils import no_init_weights

        from captioning_core.models import pllava_arch, pllava_weights

        opts = self.opts
        config = pllava_arch.PllavaConfig.from_model_dir(self.model_dir, num_frames=opts.num_frames,
                                                          pooling_shape=list(opts.pooling_shape))
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir, trust_remote_code=False)
        if self.image_processor is None:
            self.image_processor = load_image_processor(self.model_dir, config.vision_config.image_size)
        prompt = opts.template.prompt(self.cfg.question)
        self.prompt_ids = self.tokenizer(prompt)["input_ids"]
        if self.prompt_ids.count(config.image_token_index) != 1:
            raise ValueError(f"prompt must tokenize to exactly one {IMAGE_TOKEN} (id {config.image_token_index}): "
                             f"{prompt!r}")
        dtype = runtime.torch_dtype(self.cfg.dtype)
        with torch.no_grad(), no_init_weights():  # every tensor is loaded below, or loading fails
            model = pllava_arch.PllavaModel(config, dtype=dtype)
        if self.cfg.device_target == "Ascend":
            model.index_dtype = torch.int32
        with torch.no_grad():
            if os.path.exists(os.path.join(self.model_dir, "generation_config.json")):
                model.language_model.generation_config = GenerationConfig.from_pretrained(self.model_dir)
            weight_dir = opts.weight_dir or (self.model_dir if opts.use_lora else None)
            report = pllava_weights.load_weights(model, self.model_dir, weight_dir, opts.use_lora, opts.lora_alpha)
        self.model = model.eval()
        self.load_report = report
        log.info("loaded %s: %d tensors from %d files, no key unmatched%s (%s, %s)", self.model_dir,
                 report.tensors, len(report.files),
                 f"; LoRA rank {report.lora_rank} on {report.lora_modules} modules from {weight_dir}, "
                 f"alpha {opts.lora_alpha}" if opts.use_lora else "", self.cfg.device_target, self.cfg.dtype)
        frames_in, frames_out = opts.num_frames, opts.pooling_shape[0]
        log.info("%d frames pooled to %s: %d video tokens per video%s", frames_in, opts.pooling_shape,
                 config.num_video_tokens,
                 f" (each frame repeated {frames_out / frames_in:g}x)" if frames_out > frames_in else "")

    def prefill_tokens(self, item: PreparedVideo) -> int:
        """Every video pools to the same number of tokens, which replace the prompt's one ``<image>``."""
        return len(self.prompt_ids) - 1 + self.model.config.num_video_tokens

    def generation_kwargs(self) -> dict:
        """Arguments for HF generate: greedy or beam search; seeded sampling when --temperature != 1."""
        from transformers import LogitsProcessorList

        from captioning_core.models.pllava_arch import SeededSampling

        kwargs = {"max_new_tokens": self.cfg.max_new_tokens, "num_beams": self.opts.num_beams, "do_sample": False}
        if self.opts.sampling:
            kwargs["logits_processor"] = LogitsProcessorList(
                [SeededSampling(self.opts.temperature, TOP_P, self.opts.seed)])
        return kwargs

    def generate(self, batch: list[PreparedVideo]) -> list[list[int]]:
        import torch  # mindtorch under mindnlp

        from captioning_core.models.pllava_arch import to_numpy

        pixels = torch.tensor(np.concatenate([b.pixel_values for b in batch]))
        with torch.no_grad():
            out = self.model.generate([list(self.prompt_ids) for _ in batch], pixels, **self.generation_kwargs())
        return [trim_generated(row.tolist(), self.stop_ids) for row in to_numpy(out)]

    @property
    def stop_ids(self) -> set[int]:
        ids = {self.tokenizer.pad_token_id, self.tokenizer.eos_token_id}
        gen_eos = getattr(self.model.language_model.generation_config, "eos_token_id", None)
        ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
        return {i for i in ids if i is not None}

    def decode(self, token_ids: list[int]) -> str:
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return self.opts.template.clean(text)
