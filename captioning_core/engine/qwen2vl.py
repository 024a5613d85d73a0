"""The compiled Qwen2-VL / Qwen2.5-VL engine (one text decoder, either vision tower): load once, then ``generate`` a batch (vision, prefill, greedy decode).

What it takes and returns matches the eager captioner: ``generate(arrays, max_new_tokens)`` gets the numpy dict
``Qwen2VLCaptioner.model_inputs`` builds (left-padded ``input_ids``/``attention_mask``, concatenated
``pixel_values_videos``, ``video_grid_thw``) and returns each row's new token ids up to and including its first
stop token, as transformers' ``generate`` leaves them before the captioner's ``trim_generated``. The runner's
token accounting (prefill and padding tokens from ``prefill_tokens``, output tokens from the trimmed rows) is
therefore unchanged.

Shapes are padded to buckets (``buckets``): batch rows to a power of two (spare rows are all padding), the
prompt to a length bucket (more left padding: M-RoPE ids and deltas are computed over the padded row, as
transformers would), the vision grid to (groups, patches) buckets. One graph per bucket, compiled on first use
and kept (``compile_seconds`` says what each cost).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from captioning_core.engine import device, rope
from captioning_core.engine.buckets import Buckets
from captioning_core.engine.checkpoint import Checkpoint, Loader

log = logging.getLogger(__name__)


@dataclass
class EngineStats:
    compile_seconds: dict[str, float] = field(default_factory=dict)  # graph key -> first call (compile + run)
    generate_calls: int = 0
    decode_steps: int = 0


class CompiledQwen2VL:
    """Qwen2-VL as compiled MindSpore graphs. Not thread-safe (one generate at a time, as the runner calls it).

    A model family differs in ``_load`` (config, weights, tower), ``_cells`` (the text cells), ``_angles``,
    ``rope_index`` and ``_vision_inputs``; buckets, sessions and the greedy loop are this class's
    (``qwen3vl.CompiledQwen3VL`` overrides those five)."""

    #: the config.json ``model_type`` values this class runs
    model_types: tuple[str, ...] = ("qwen2_vl", "qwen2_5_vl")
    #: sessions (static KV caches with their two graphs) kept alive; the least recently used is dropped
    max_sessions = 4

    def __init__(self, model_dir: str, choice: device.DeviceChoice | None = None,
                 buckets: Buckets | None = None) -> None:
        self.choice = choice or device.choose()
        device.activate(self.choice)
        self.buckets = buckets or Buckets()
        with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as fh:
            raw = json.load(fh)
        self.model_type = raw.get("model_type", self.model_types[0])
        if self.model_type not in self.model_types:
            raise ValueError(f"{model_dir}: model_type {self.model_type!r}; {type(self).__name__} runs "
                             f"{', '.join(self.model_types)}")
        self.eos_ids, self.repetition_penalty = generation_settings(model_dir, raw)
        started = time.perf_counter()
        self._load(raw, Loader(Checkpoint(model_dir), self.choice.dtype))
        self.load_seconds = time.perf_counter() - started
        self._vision_fn = device.compile_cell(self.vision, self.choice)
        self._sessions: OrderedDict[tuple, _Session] = OrderedDict()
        self._seen: set[tuple] = set()
        self.stats = EngineStats()

    @classmethod
    def from_pretrained(cls, model_dir: str, dtype: str = "float32", target: str = "CPU",
                        buckets: Buckets | None = None) -> CompiledQwen2VL:
        return cls(model_dir, device.choose(target, dtype), buckets)

    def _load(self, raw: dict, load: Loader) -> None:
        """Config, text weights and vision tower of the checkpoint."""
        from captioning_core.engine import qwen2_5vl_vision, qwen2vl_vision
        from captioning_core.engine.qwen2vl_text import TextConfig, TextWeights

        text_raw = raw.get("text_config") or raw  # a legacy config keeps the text keys at the top level
        self.text_cfg = TextConfig(text_raw, bool(raw.get("tie_word_embeddings", False)))
        self.windowed = self.model_type == "qwen2_5_vl"
        vision = qwen2_5vl_vision if self.windowed else qwen2vl_vision
        self.vision_cfg = vision.VisionConfig(raw["vision_config"])
        self.tokens = rope.VisionTokens(int(raw.get("vision_start_token_id", 151652)),
                                        int(raw.get("image_token_id", 151655)),
                                        int(raw.get("video_token_id", 151656)), self.vision_cfg.merge)
        self.weights = TextWeights(load, self.text_cfg)
        self.vision = (vision.VisionTower(self.vision_cfg, load) if self.windowed
                       else vision.VisionTower(load.ck, self.vision_cfg, load))

    def _cells(self) -> tuple[type, type, type]:
        """The (Layer, Prefill, Step) cell classes of the text decoder."""
        from captioning_core.engine import qwen2vl_text

        return qwen2vl_text.Layer, qwen2vl_text.Prefill, qwen2vl_text.Step

    def _angles(self, positions: np.ndarray) -> np.ndarray:
        """[3, B, L] M-RoPE ids -> [B, L, head_dim/2] rotary angles (Qwen2-VL: one contiguous section per axis)."""
        return rope.section_positions(positions, self.text_cfg.mrope_section) * self.text_cfg.inv_freq()

    # ------------------------------------------------------------------------------------------- pieces
    def _timed(self, key: tuple, fn, *args):
        if key in self._seen:
            return fn(*args)
        started = time.perf_counter()
        out = fn(*args)
        _sync(out)
        self.stats.compile_seconds["/".join(map(str, key))] = round(time.perf_counter() - started, 3)
        self._seen.add(key)
        return out

    def vision_features(self, pixel_values: np.ndarray, grid_thw: np.ndarray):
        """The tower's output grid (a device Tensor [G*S/4, D]) and, per merged token in transformers' order,
        its row in it."""
        from mindspore import Tensor

        from captioning_core.engine import qwen2_5vl_vision, qwen2vl_vision

        grid = np.asarray(grid_thw).reshape(-1, 3)
        groups = self.buckets.groups(int(grid[:, 0].sum()))
        size = self.buckets.patches(int((grid[:, 1] * grid[:, 2]).max()))
        pixels = np.asarray(pixel_values, np.float32)
        if self.windowed:
            pix, ang, valid, window, rows = qwen2_5vl_vision.pack(pixels, grid, self.vision_cfg, groups, size)
            args = (Tensor(pix), Tensor(ang), Tensor(valid), Tensor(window))
        else:
            pix, ang, valid, rows = qwen2vl_vision.pack(pixels, grid, self.vision_cfg.head_dim,
                                                        self.vision_cfg.merge, groups, size)
            args = (Tensor(pix), Tensor(ang), Tensor(valid))
        out = self._timed(("vision", groups, size), self._vision_fn, *args)
        return out, rows

    def vision_numpy(self, pixel_values: np.ndarray, grid_thw: np.ndarray) -> np.ndarray:
        """The merged video tokens [n, D] as transformers' ``visual(pixels, grid_thw)`` returns them."""
        out, rows = self.vision_features(pixel_values, grid_thw)
        return out.asnumpy()[rows].astype(np.float32)

    def rope_index(self, input_ids: np.ndarray, attention_mask: np.ndarray, video_grid_thw: np.ndarray | None,
                   second_per_grid_ts: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """transformers' ``get_rope_index`` in numpy: position ids [3, B, L] and deltas [B]."""
        scale = None
        if self.windowed and video_grid_thw is not None:
            # transformers 4.57.1 casts each second_per_grid_t to int64 before the product (the module doc of
            # captioning_core.models.qwen2_5_vl); no seconds given means 1.0
            secs = np.ones(len(video_grid_thw)) if second_per_grid_ts is None else np.asarray(second_per_grid_ts)
            scale = secs.astype(np.int64) * self.vision_cfg.tokens_per_second
        return rope.mrope_positions(np.asarray(input_ids), np.asarray(attention_mask), self.tokens, video_grid_thw,
                                    video_time_scale=scale)

    def _session(self, slots: int, length: int, max_len: int) -> _Session:
        key = (slots, length, max_len)
        if key in self._sessions:
            self._sessions.move_to_end(key)
        else:
            while len(self._sessions) >= self.max_sessions:
                self._sessions.popitem(last=False)
            self._sessions[key] = _Session(self, slots, length, max_len)
        return self._sessions[key]

    def _prepare(self, arrays: dict, max_new_tokens: int):
        """Pad the batch to its buckets: (ids, mask, slots, length, real rows)."""
        ids = np.asarray(arrays["input_ids"])
        mask = np.asarray(arrays["attention_mask"])
        rows, length = ids.shape
        slots, bucket = self.buckets.batch(rows), self.buckets.length(length)
        pad_id = 0
        pids = np.full((slots, bucket), pad_id, np.int64)
        pmask = np.zeros((slots, bucket), np.int64)
        pids[:rows, bucket - length:] = ids
        pmask[:rows, bucket - length:] = mask
        return pids, pmask, slots, bucket, rows

    def _bias(self, eos_ids, suppress: bool) -> np.ndarray:
        bias = np.zeros(self.text_cfg.vocab, np.float32)
        if suppress and eos_ids:
            bias[list(eos_ids)] = -np.inf
        return bias

    def _place_vision(self, arrays: dict, pids: np.ndarray):
        """(the tower's output or None without video, vision_rows [B, L] int32, is_video [B, L] bool): which
        row of the tower's output each video token of the padded prompts takes."""
        grid = arrays.get("video_grid_thw")
        is_video = pids == self.tokens.video
        vision_rows = np.zeros(pids.shape, np.int32)
        if grid is None or not len(grid):
            return None, vision_rows, is_video
        out, merged_rows = self.vision_features(arrays["pixel_values_videos"], grid)
        if int(is_video.sum()) != len(merged_rows):
            raise ValueError(f"{int(is_video.sum())} video tokens in the prompts but {len(merged_rows)} "
                             "merged video patches")
        vision_rows[is_video] = merged_rows
        return out, vision_rows, is_video

    def _vision_inputs(self, arrays: dict, pids: np.ndarray) -> tuple:
        """The prefill graph's vision arguments: (vision [Nv, D], vision_rows, is_video)."""
        from mindspore import Tensor

        vis, vision_rows, is_video = self._place_vision(arrays, pids)
        if vis is None:
            vis = Tensor(np.zeros((1, self.text_cfg.hidden), np.float32))
        return vis, Tensor(vision_rows), Tensor(is_video)

    # ------------------------------------------------------------------------------------------- generate
    def prefill(self, arrays: dict, max_new_tokens: int, all_logits: bool = False,
                suppress_ids: set[int] | frozenset = frozenset()):
        """Vision tower + prompt: (session, first token [slots], logits, padded mask, real rows, deltas)."""
        from mindspore import Tensor

        pids, pmask, slots, bucket, rows = self._prepare(arrays, max_new_tokens)
        positions, deltas = self.rope_index(pids, pmask, arrays.get("video_grid_thw"),
                                            arrays.get("second_per_grid_ts"))
        angles = self._angles(positions)
        vision_args = self._vision_inputs(arrays, pids)
        session = self._session(slots, bucket, bucket + max_new_tokens)
        tok, logits = session.run_prefill(all_logits, Tensor(pids.astype(np.int32)), *vision_args,
                                          Tensor(angles.astype(np.float32)), Tensor(pmask.astype(np.float32)),
                                          Tensor(self._bias(suppress_ids, True)))
        return session, tok, logits, pmask, rows, deltas

    def generate(self, arrays: dict, max_new_tokens: int, eos_ids: set[int] | frozenset | list[int] = (),
                 min_new_tokens: int = 0, repetition_penalty: float | None = None) -> list[list[int]]:
        """Greedy tokens per row, each cut after its first token in ``eos_ids`` (kept, as transformers does),
        at most ``max_new_tokens``; ``eos_ids`` cannot be chosen in the first ``min_new_tokens`` steps.

        ``repetition_penalty`` (default: the checkpoint's generation config) is transformers' processor:
        every token already in the row (prompt padding included) has its logit divided by it if positive,
        multiplied if negative, before the arg-max; that choice is made on the host from the step's logits."""
        from mindspore import Tensor

        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        eos = set(eos_ids)
        penalty = self.repetition_penalty if repetition_penalty is None else float(repetition_penalty)
        self.stats.generate_calls += 1
        session, tok, logits, pmask, rows, deltas = self.prefill(
            arrays, max_new_tokens, suppress_ids=eos if min_new_tokens > 0 else frozenset())
        slots, bucket = pmask.shape
        start = Tensor((bucket - pmask.sum(1)).astype(np.int32))
        delta = Tensor(deltas.astype(np.int32))
        free, forced = self._bias(eos, False), self._bias(eos, True)
        seen = None
        if penalty != 1.0:
            seen = [set(row.tolist()) for row in np.asarray(arrays["input_ids"])]
        out = [[] for _ in range(rows)]
        done = np.zeros(rows, bool)
        bias = forced if min_new_tokens > 0 else free
        for step in range(max_new_tokens):
            if seen is None:
                host = tok.asnumpy()
            else:
                host = _penalised_argmax(logits.asnumpy(), seen, penalty, bias, slots)
                tok = Tensor(host)
            for r in np.flatnonzero(~done):
                out[r].append(int(host[r]))
                if seen is not None:
                    seen[r].add(int(host[r]))
                if int(host[r]) in eos:
                    done[r] = True
            if done.all() or step == max_new_tokens - 1:
                break
            bias = forced if step + 1 < min_new_tokens else free
            tok, logits = session.run_step(tok, Tensor(np.int32(bucket + step)), delta, start, Tensor(bias))
            self.stats.decode_steps += 1
        return out


def _penalised_argmax(logits: np.ndarray, seen: list[set[int]], penalty: float, bias: np.ndarray,
                      slots: int) -> np.ndarray:
    """[slots] int32: per real row the arg-max of its repetition-penalised logits (spare rows: 0)."""
    out = np.zeros(slots, np.int32)
    for r, tokens in enumerate(seen):
        row = logits[r].astype(np.float32) + bias
        idx = np.fromiter(tokens, np.int64)
        s = row[idx]
        row[idx] = np.where(s < 0, s * np.float32(penalty), s / np.float32(penalty))
        out[r] = int(row.argmax())
    return out


def generation_settings(model_dir: str, raw_config: dict) -> tuple[frozenset[int], float]:
    """The stop ids ``generate`` would use with the checkpoint's generation settings, which must amount to
    greedy decoding, optionally with a repetition penalty (``do_sample`` with ``top_k=1``, as the released
    Qwen2-VL-Instruct configs ask, is greedy too). Sampling, beams and n-gram blocking are not implemented:
    such a checkpoint is refused rather than captioned differently from the eager engine."""
    path = os.path.join(model_dir, "generation_config.json")
    gen = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            gen = json.load(fh)
    unsupported = []
    if gen.get("do_sample") and gen.get("top_k") != 1:
        unsupported.append(f"do_sample with top_k={gen.get('top_k')}")
    if gen.get("no_repeat_ngram_size"):
        unsupported.append(f"no_repeat_ngram_size={gen['no_repeat_ngram_size']}")
    if int(gen.get("num_beams", 1)) != 1:
        unsupported.append(f"num_beams={gen['num_beams']}")
    if unsupported:
        raise NotImplementedError(f"{model_dir}: generation_config.json asks for {', '.join(unsupported)}; the "
                                  "compiled engine decodes greedily only (use the eager engine)")
    eos = gen.get("eos_token_id", raw_config.get("eos_token_id"))
    if eos is None:
        eos = (raw_config.get("text_config") or {}).get("eos_token_id")
    ids = frozenset(eos if isinstance(eos, list) else [] if eos is None else [int(eos)])
    return ids, float(gen.get("repetition_penalty") or 1.0)


class _Session:
    """One static KV cache shape with its prefill and decode graphs."""

    def __init__(self, engine: CompiledQwen2VL, slots: int, length: int, max_len: int) -> None:
        from mindspore import nn

        Layer, Prefill, Step = engine._cells()  # noqa: N806
        cfg, w = engine.text_cfg, engine.weights
        dtype = device.ms_dtype(engine.choice.dtype)
        self.engine, self.key = engine, (slots, length, max_len)
        self.layers = nn.CellList([Layer(lw, cfg, slots, max_len, i, dtype) for i, lw in enumerate(w.layers)])
        self._prefill = {}
        self._prefill_cells = {flag: Prefill(w, cfg, self.layers, slots, length, max_len, dtype, flag)
                               for flag in (False, True)}
        self._step = device.compile_cell(Step(w, cfg, self.layers, slots, max_len), engine.choice)

    def run_prefill(self, all_logits: bool, *args):
        if all_logits not in self._prefill:
            self._prefill[all_logits] = device.compile_cell(self._prefill_cells[all_logits], self.engine.choice)
        key = ("prefill", *self.key, "all" if all_logits else "last")
        return self.engine._timed(key, self._prefill[all_logits], *args)

    def run_step(self, *args):
        return self.engine._timed(("decode", *self.key), self._step, *args)


def _sync(out) -> None:
    first = out[0] if isinstance(out, tuple) else out
    first.asnumpy()
