"""PLLaVA's network, written against the ``torch`` namespace so one definition serves two runtimes.

Under mindnlp (captioning) ``torch`` is mindtorch on MindSpore; under real PyTorch (tools/train_tiny_pllava.py)
it is torch. Import this module only after ``runtime.import_mindnlp()`` when it must run on MindSpore.

The model is PLLaVA's composition (magic-research/PLLaVA ``PllavaForConditionalGeneration``, see
notes MODELS.md A.2): ``vision_tower`` = transformers' CLIPVisionModel, ``multi_modal_projector`` =
linear_1 -> act -> linear_2 on every frame token, then adaptive 3D average pooling of the (T, H, W) grid to
``pooling_shape``; ``language_model`` = the causal LM of ``text_config`` (Llama for 7B/13B). Parameter names
therefore match PLLaVA's checkpoints: ``vision_tower.vision_model.*``, ``multi_modal_projector.linear_{1,2}.*``,
``language_model.model.*``, ``language_model.lm_head.weight``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, LogitsProcessor
from transformers.activations import ACT2FN

# PllavaConfig's fallback vision tower when config.json has none: CLIP ViT-L/14 at 336 px.
DEFAULT_VISION = dict(model_type="clip_vision_model", intermediate_size=4096, hidden_size=1024, patch_size=14,
                      image_size=336, num_hidden_layers=24, num_attention_heads=16, vocab_size=32000,
                      projection_dim=768)
LORA_TARGETS = ("q_proj", "v_proj")


@dataclass
class PllavaConfig:
    """PLLaVA's config.json fields (``PllavaConfig``, model_type "llava") with HF sub-configs."""

    vision_config: Any
    text_config: Any
    image_token_index: int = 32000
    projector_hidden_act: str = "gelu"
    vision_feature_select_strategy: str = "default"
    vision_feature_layer: int = -2
    pooling_method: str = "avg"
    pooling_shape: tuple[int, int, int] = (8, 16, 16)
    frame_shape: tuple[int, int] = (24, 24)
    num_frames: int = 1
    use_pooling: bool = True
    pad_token_id: int | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.pooling_shape = tuple(int(v) for v in self.pooling_shape)
        self.frame_shape = tuple(int(v) for v in self.frame_shape)
        if self.pooling_method != "avg":
            raise ValueError(f"pooling_method {self.pooling_method!r}: PLLaVA only builds an average pool")
        if self.vision_feature_select_strategy != "default":
            raise ValueError(f"vision_feature_select_strategy {self.vision_feature_select_strategy!r} is not "
                             "implemented (PLLaVA supports only 'default': drop the CLS token)")
        if len(self.pooling_shape) != 3 or min(self.pooling_shape) < 1:
            raise ValueError(f"pooling_shape must be 3 positive ints, got {self.pooling_shape}")
        grid = self.vision_config.image_size // self.vision_config.patch_size
        if self.frame_shape[0] * self.frame_shape[1] != grid * grid:
            raise ValueError(f"frame_shape {self.frame_shape} does not match the vision tower's {grid}x{grid} patches")

    @classmethod
    def from_dict(cls, raw: dict) -> PllavaConfig:
        raw = dict(raw)
        vision = dict(raw.pop("vision_config", None) or DEFAULT_VISION)
        text = dict(raw.pop("text_config", None) or {"model_type": "llama"})
        vision_cfg = AutoConfig.for_model(vision.pop("model_type", "clip_vision_model"), **vision)
        text_cfg = AutoConfig.for_model(text.pop("model_type", "llama"), **text)
        known = {k: raw.pop(k) for k in list(raw) if k in cls.__dataclass_fields__ and k != "extra"}
        if known.get("pad_token_id") is None:
            known["pad_token_id"] = getattr(text_cfg, "pad_token_id", None)
        return cls(vision_cfg, text_cfg, **known, extra=raw)

    @classmethod
    def from_model_dir(cls, path: str, **overrides) -> PllavaConfig:
        """Read ``config.json``; ``overrides`` win, as load_pllava's pooling_shape/num_frames do."""
        with open(os.path.join(path, "config.json"), encoding="utf-8") as fh:
            raw = json.load(fh)
        raw.update(overrides)
        return cls.from_dict(raw)

    def to_dict(self) -> dict:
        """The released config.json layout (extra keys such as ``register`` are written back unchanged)."""
        out = {"architectures": ["PllavaForConditionalGeneration"], "model_type": "llava", **self.extra,
               "vision_config": self.vision_config.to_diff_dict(), "text_config": self.text_config.to_diff_dict(),
               "vocab_size": self.text_config.vocab_size, "ignore_index": -100}
        for name in self.__dataclass_fields__:
            if name not in ("vision_config", "text_config", "extra"):
                value = getattr(self, name)
                out[name] = list(value) if isinstance(value, tuple) else value
        return out

    @property
    def num_video_tokens(self) -> int:
        t, h, w = self.pooling_shape
        return t * h * w


def adaptive_pool_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) averaging weights of torch's adaptive pooling bins: [floor(i*n/m), ceil((i+1)*n/m))."""
    mat = np.zeros((n_out, n_in), dtype=np.float32)
    for i in range(n_out):
        start = (i * n_in) // n_out
        end = -(-((i + 1) * n_in) // n_out)
        mat[i, start:end] = 1.0 / (end - start)
    return mat


def _pool_axis(x, axis: int, n_out: int):
    """Adaptive average pooling of one axis as a 2-D matmul (mindtorch has no broadcasting matmul)."""
    n_in = x.shape[axis]
    if n_in == n_out:
        return x
    x = x.transpose(axis, -1)
    weights = torch.from_numpy(adaptive_pool_matrix(n_in, n_out).T.copy()).to(dtype=x.dtype, device=x.device)
    pooled = torch.matmul(x.reshape(-1, n_in), weights).reshape(*x.shape[:-1], n_out)
    return pooled.transpose(axis, -1)


def adaptive_avg_pool3d(x, output_size: tuple[int, int, int]):
    """``nn.AdaptiveAvgPool3d(output_size)`` on (N, C, T, H, W), which mindtorch lacks on CPU.

    A box average is the product of per-axis averages, so three 1-D poolings give exactly the 3-D bins for
    every size: divisions (24->12 is a 2x2 mean) as well as up-sampling (4 frames -> 16 repeats each 4x).
    """
    for axis, n_out in zip((2, 3, 4), output_size, strict=True):
        x = _pool_axis(x, axis, int(n_out))
    return x


class PllavaMultiModalProjector(nn.Module):
    """linear_1 -> act -> linear_2 per frame token, then the (T, H, W) grid pooled to ``pooling_shape``."""

    def __init__(self, config: PllavaConfig) -> None:
        super().__init__()
        self.frame_shape = config.frame_shape
        self.pooling_shape = config.pooling_shape
        self.linear_1 = nn.Linear(config.vision_config.hidden_size, config.text_config.hidden_size, bias=True)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(config.text_config.hidden_size, config.text_config.hidden_size, bias=True)

    def forward(self, frame_features, num_videos: int):
        """(videos*frames, h*w, vision_hidden) -> (videos, T'*H'*W', text_hidden), in t, h, w order."""
        hidden = self.linear_2(self.act(self.linear_1(frame_features)))
        total, _, dim = hidden.shape
        h, w = self.frame_shape
        video = hidden.reshape(num_videos, total // num_videos, h, w, dim).permute(0, 4, 1, 2, 3)
        pooled = adaptive_avg_pool3d(video, self.pooling_shape)
        return pooled.permute(0, 2, 3, 4, 1).reshape(num_videos, -1, dim)


class PllavaModel(nn.Module):
    """vision_tower + multi_modal_projector + language_model, with PLLaVA's parameter names."""

    def __init__(self, config: PllavaConfig, dtype=None) -> None:
        super().__init__()
        self.config = config
        self.index_dtype = torch.int64  # token ids and masks; int32 on Ascend
        kwargs = {"dtype": dtype} if dtype is not None else {}
        self.vision_tower = AutoModel.from_config(config.vision_config, **kwargs)
        self.multi_modal_projector = PllavaMultiModalProjector(config)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config, **kwargs)
        if dtype is not None:
            self.multi_modal_projector.to(dtype)

    @property
    def dtype(self):
        return self.multi_modal_projector.linear_1.weight.dtype

    def video_embeddings(self, pixel_values, num_videos: int):
        """(videos*frames, 3, S, S) -> (videos, num_video_tokens, text_hidden)."""
        if pixel_values.shape[0] % num_videos:
            raise ValueError(f"{pixel_values.shape[0]} frames do not split into {num_videos} videos")
        out = self.vision_tower(pixel_values.to(self.dtype), output_hidden_states=True)
        features = out.hidden_states[self.config.vision_feature_layer][:, 1:]  # "default": drop CLS
        return self.multi_modal_projector(features, num_videos)

    def splice(self, rows: list[list[int]], video_embeds, labels: list[list[int]] | None = None):
        """Token rows with one ``<image>`` each -> left-padded inputs_embeds, attention_mask (and labels).

        The image token is replaced by the video's embeddings in place, which is what PLLaVA's legacy LLaVA
        merge does to its prompt; label rows (same length as the token rows) get -100 over the video.
        """
        embed = self.language_model.get_input_embeddings()
        image = self.config.image_token_index
        n_video = video_embeds.shape[1]
        pieces, lengths = [], []
        for i, row in enumerate(rows):
            if row.count(image) != 1:
                raise ValueError(f"prompt must hold exactly one <image> token (id {image}); got {row.count(image)}")
            k = row.index(image)
            parts = [embed(torch.tensor([row[:k]], dtype=self.index_dtype))[0]] if k else []
            parts.append(video_embeds[i])
            if k + 1 < len(row):
                parts.append(embed(torch.tensor([row[k + 1:]], dtype=self.index_dtype))[0])
            pieces.append(torch.cat(parts, dim=0))
            lengths.append(len(row) - 1 + n_video)
        longest = max(lengths)
        pad_id = self.config.pad_token_id or 0
        pad = embed(torch.tensor([[pad_id]], dtype=self.index_dtype))[0]
        batch = [torch.cat([pad.expand(longest - n, pad.shape[-1]), p], dim=0) if n < longest else p
                 for p, n in zip(pieces, lengths, strict=True)]
        mask = torch.tensor([[0] * (longest - n) + [1] * n for n in lengths], dtype=self.index_dtype)
        embeds = torch.stack(batch, dim=0)
        if labels is None:
            return embeds, mask, None
        spliced = []
        for row, lab, n in zip(rows, labels, lengths, strict=True):
            k = row.index(image)
            spliced.append([-100] * (longest - n) + lab[:k] + [-100] * n_video + lab[k + 1:])
        return embeds, mask, torch.tensor(spliced, dtype=torch.int64)

    def forward(self, rows: list[list[int]], pixel_values, labels: list[list[int]]):
        """Training loss: ``labels`` aligned with ``rows`` (-100 where no loss)."""
        video = self.video_embeddings(pixel_values, len(rows))
        embeds, mask, spliced = self.splice(rows, video, labels)
        return self.language_model(inputs_embeds=embeds, attention_mask=mask, labels=spliced)

    def generate(self, rows: list[list[int]], pixel_values, **generate_kwargs):
        """New token ids only (HF generate given inputs_embeds returns no prompt tokens)."""
        video = self.video_embeddings(pixel_values, len(rows))
        embeds, mask, _ = self.splice(rows, video)
        return self.language_model.generate(inputs_embeds=embeds, attention_mask=mask, **generate_kwargs)


def apply_lora(model: PllavaModel, r: int, lora_alpha: float, dropout: float = 0.0) -> None:
    """Wrap the language model with peft LoRA on q_proj/v_proj, as load_pllava does (it uses r=128)."""
    from peft import LoraConfig, TaskType, get_peft_model

    cfg = LoraConfig(task_type=TaskType.CAUSAL_LM, inference_mode=False, target_modules=list(LORA_TARGETS),
                     r=r, lora_alpha=lora_alpha, lora_dropout=dropout)
    model.language_model = get_peft_model(model.language_model, cfg)


def to_numpy(tensor) -> np.ndarray:
    """A host numpy copy under either runtime."""
    if hasattr(tensor, "asnumpy"):
        return tensor.asnumpy()
    return tensor.detach().cpu().numpy()


class SeededSampling(LogitsProcessor):
    """Temperature + top-p sampling from a seeded numpy generator, for use with greedy search.

    It returns scores that are -inf except at the drawn token, so greedy search picks the draw. mindtorch's
    CPU random ops ignore torch.manual_seed, so HF's own sampling would differ on every run; this draw is
    reproducible (same seed, same batch -> same caption) under either runtime.
    """

    def __init__(self, temperature: float, top_p: float, seed: int) -> None:
        if temperature <= 0 or not 0 < top_p <= 1:
            raise ValueError(f"need temperature > 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
        self.temperature = temperature
        self.top_p = top_p
        self.rng = np.random.default_rng(seed)

    def __call__(self, input_ids, scores):
        logits = to_numpy(scores).astype(np.float64) / self.temperature
        out = np.full(logits.shape, -np.inf, dtype=np.float32)
        for row, values in enumerate(logits):
            order = np.argsort(-values, kind="stable")
            probs = np.exp(values[order] - values[order[0]])
            probs /= probs.sum()
            keep = min(len(probs), int(np.searchsorted(np.cumsum(probs), self.top_p)) + 1)  # mass >= top_p
            kept = probs[:keep] / probs[:keep].sum()
            out[row, order[self.rng.choice(keep, p=kept)]] = 0.0
        return torch.tensor(out, dtype=scores.dtype).to(scores.device)
