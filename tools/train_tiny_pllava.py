"""Train the tiny PLLaVA (and a tiny LoRA adapter) that tests use, with real PyTorch, saved like real checkpoints.

The model is ``captioning_core.models.pllava_arch.PllavaModel`` (CLIP vision tower, PLLaVA projector with
adaptive 3D pooling, Llama LM) at toy size. It learns to caption the synthetic clips of ``testkit.clips``
("a red square moves left") from frames prepared by the production code (``captioning_core.models.pllava``)
and the production prompt (``--conv_mode plain``). Saved as:

- ``tiny_models/pllava``: config.json with PLLaVA's fields, model.safetensors with PLLaVA's parameter names,
  tokenizer files (``<image>`` as an added token), preprocessor_config.json, generation_config.json;
- ``tiny_models/pllava-lora``: the released layout (LM keys PEFT-prefixed with base_layer + lora_A/B, sharded
  model-0000k-of-0000N.safetensors + index), with a LoRA (q_proj/v_proj) trained to mirror the direction
  ("moves left" -> "moves right", "up" <-> "down"), so ``--use_lora --weight_dir`` changes captions visibly.

Every held-out clip (including all of testkit.demo_clips) must get the right caption from both, or the script
exits 1. Runs under real torch: never import mindnlp here (mindtorch computes no gradients).

    OMP_NUM_THREADS=1 python tools/train_tiny_pllava.py
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import logging
import random
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from captioning_core.models.pllava import (  # noqa: E402
    CONV_TEMPLATES,
    DEMO_SYSTEM,
    IMAGE_TOKEN,
    SYSTEM_RECAPTION,
    preprocess_frames,
    sample_frames,
)
from testkit.clips import COLORS, DIRECTIONS, SHAPES, ClipSpec, ensure_clip  # noqa: E402
from tools.tiny_vocab import CAPTION_WORDS, PROMPT_WORDS, word_level_tokenizer  # noqa: E402

log = logging.getLogger("train_tiny_pllava")

QUESTION = "Describe the video in details"  # the CLI default
TEMPLATE = CONV_TEMPLATES["plain"]  # the CLI default --conv_mode
NUM_FRAMES = 4
IMAGE_SIZE = 112
POOLING = (4, 4, 4)  # 8x8 patches per frame pooled 2x2, like 24x24 -> 12x12 at full size
MIRROR = {"left": "right", "right": "left", "up": "down", "down": "up"}
SIZES = [(320, 240), (240, 320), (426, 240), (352, 288), (640, 360), (400, 300), (480, 270), (288, 352),
         (1280, 720), (360, 640)]
VARIANTS = 10
H_FLIP = {"left": "right", "right": "left"}
V_FLIP = {"up": "down", "down": "up"}


def tokenizer():
    """Llama-like word-level tokenizer: <unk>=0 (also pad, as PLLaVA's pad_token_id 0), <s>=1 prepended,
    </s>=2, and ``<image>`` as the added token after the vocabulary (like PLLaVA's 32000)."""
    from tokenizers.processors import TemplateProcessing

    prompt_text = (DEMO_SYSTEM + SYSTEM_RECAPTION + " user assistant").lower()
    words = list(dict.fromkeys(CAPTION_WORDS + PROMPT_WORDS + re.findall(r"\w+|[^\w\s]+", prompt_text)))
    tok = word_level_tokenizer(["<unk>", "<s>", "</s>"], words, bos="<s>", eos="</s>", pad="<unk>")
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                              special_tokens=[("<s>", 1)])
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tok


def build_config(tok):
    from transformers import CLIPVisionConfig, LlamaConfig

    from captioning_core.models.pllava_arch import PllavaConfig

    vision = CLIPVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                              image_size=IMAGE_SIZE, patch_size=14, projection_dim=48)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                       tie_word_embeddings=False)
    grid = IMAGE_SIZE // 14
    return PllavaConfig(vision, text, image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
                        pooling_shape=POOLING, frame_shape=(grid, grid), num_frames=NUM_FRAMES, pad_token_id=0,
                        extra={"register": False, "gradient_checkpointing": False, "torch_dtype": "float32"})


def random_spec(rng: random.Random, color: str, direction: str, shape: str) -> ClipSpec:
    w, h = rng.choice(SIZES)
    return ClipSpec(color, direction, shape, w, h, fps=rng.choice([24, 25, 30]),
                    seconds=rng.choice([1.0, 1.5, 2.0, 3.0, 4.0]), gop=rng.choice([1, 12, 30, 250]))


def held_out_specs(rng: random.Random) -> list[ClipSpec]:
    """One unseen clip per caption, plus every clip the tests and the demo caption."""
    from testkit.demo_clips import DEMO_SPECS

    fresh = [random_spec(rng, *combo) for combo in itertools.product(COLORS, DIRECTIONS, SHAPES)]
    return list(dict.fromkeys(fresh + list(DEMO_SPECS)))


def mirrored(caption: str) -> str:
    head, _, direction = caption.rpartition(" ")
    return f"{head} {MIRROR[direction]}"


def augment(pixels, spec: ClipSpec, rng: random.Random):
    """A random mirror image and/or time reversal of a prepared clip, with the direction it then shows.

    Flipping the frames left-right swaps left/right, up-down swaps up/down, reversing the frames swaps both:
    exact label-preserving augmentations that stop the tiny model from memorising its few hundred clips.
    """
    direction = spec.direction
    if rng.random() < 0.5:
        pixels, direction = pixels.flip(3), H_FLIP.get(direction, direction)
    if rng.random() < 0.5:
        pixels, direction = pixels.flip(2), V_FLIP.get(direction, direction)
    if rng.random() < 0.5:
        pixels, direction = pixels.flip(0), MIRROR[direction]
    return pixels, f"a {spec.color} {spec.shape} moves {direction}"


class Trainer:
    """Single-example AdamW steps with warm-up and a linear tail (batches plateau at "colour only")."""

    def __init__(self, model, tok, image_processor) -> None:
        self.model, self.tok, self.processor = model, tok, image_processor
        self.prompt_ids = tok(TEMPLATE.prompt(QUESTION))["input_ids"]

    def pixels(self, path: Path):
        import torch

        return torch.tensor(preprocess_frames(sample_frames(str(path), NUM_FRAMES), self.processor))

    def example(self, caption: str) -> tuple[list[int], list[int]]:
        ids = self.tok(caption, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
        return self.prompt_ids + ids, [-100] * len(self.prompt_ids) + ids

    def fit(self, data: list, steps: int, lr: float, rng: random.Random, params, target=lambda c: c) -> None:
        import torch

        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        warm, tail = min(1000, steps // 10), max(1, int(0.3 * steps))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm, (steps - s) / tail))
        self.model.train()
        started, running = time.time(), 0.0
        for step in range(steps):
            pixels, caption = augment(*data[rng.randrange(len(data))], rng)
            row, labels = self.example(target(caption))
            loss = self.model([row], pixels, [labels]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
            running = 0.98 * running + 0.02 * loss.item()
            if step % 1000 == 0 or step == steps - 1:
                log.info("step %d loss %.4f (%.0fs)", step, running, time.time() - started)
        self.model.eval()

    def caption(self, pixels) -> str:
        import torch

        with torch.no_grad():
            out = self.model.generate([self.prompt_ids], pixels, max_new_tokens=8, do_sample=False, num_beams=1,
                                      eos_token_id=self.tok.eos_token_id, pad_token_id=self.tok.pad_token_id)
        text = self.tok.decode(out[0], skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return TEMPLATE.clean(text)

    def wrong(self, held: list, expect) -> list[tuple[str, str]]:
        bad = [(spec.filename, got) for pixels, spec in held if (got := self.caption(pixels)) != expect(spec)]
        log.info("held-out: %d/%d right", len(held) - len(bad), len(held))
        for item in bad:
            log.info("wrong: %s", item)
        return bad


def save_dir(out: Path, config, state: dict, tok, processor, shard_bytes: int | None = None) -> None:
    from transformers import GenerationConfig

    from captioning_core.models.pllava_weights import save_checkpoint

    out.mkdir(parents=True, exist_ok=True)
    for old in list(out.glob("model*.safetensors")) + list(out.glob("model.safetensors.index.json")):
        old.unlink()
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True))
    save_checkpoint(state, str(out), shard_bytes)
    tok.save_pretrained(out)
    processor.save_pretrained(out)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0).save_pretrained(out)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="tiny_models/pllava")
    parser.add_argument("--lora_out", default="tiny_models/pllava-lora")
    parser.add_argument("--steps", type=int, default=36000)
    parser.add_argument("--lora_steps", type=int, default=6000)
    parser.add_argument("--lr", type=float, default=4e-4)
    parser.add_argument("--lora_lr", type=float, default=1e-3)
    parser.add_argument("--lora_rank", type=int, default=8)
    parser.add_argument("--lora_alpha", type=float, default=32, help="the CLI's default --lora_alpha")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clip_cache", default=None, help="where to keep rendered clips (default: a temp dir)")
    args = parser.parse_args()

    import torch
    from transformers import CLIPImageProcessor

    from captioning_core.models.pllava_arch import PllavaModel, apply_lora

    if "mindnlp" in sys.modules:
        raise SystemExit("run under real torch: mindnlp must not be imported")
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    cache = Path(args.clip_cache or tempfile.mkdtemp(prefix="tiny-pllava-clips-"))
    tok = tokenizer()
    config = build_config(tok)
    processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                   crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    model = PllavaModel(config)
    log.info("model parameters: %d", sum(p.numel() for p in model.parameters()))
    trainer = Trainer(model, tok, processor)

    t0 = time.time()
    held_specs = held_out_specs(random.Random(args.seed + 1))
    held = [(trainer.pixels(ensure_clip(s, cache)), s) for s in held_specs]
    train = []
    for combo in itertools.product(COLORS, DIRECTIONS, SHAPES):
        for _ in range(VARIANTS):
            spec = random_spec(rng, *combo)
            if spec not in held_specs:
                train.append((trainer.pixels(ensure_clip(spec, cache)), spec))
    log.info("prepared %d training and %d held-out clips in %.1fs", len(train), len(held), time.time() - t0)

    t0 = time.time()
    trainer.fit(train, args.steps, args.lr, rng, list(model.parameters()))
    log.info("base training: %.0fs", time.time() - t0)
    wrong = trainer.wrong(held, lambda s: s.caption)
    save_dir(Path(args.out), config, model.state_dict(), tok, processor)
    log.info("saved to %s", args.out)

    lora_model = copy.deepcopy(model)
    for p in lora_model.parameters():
        p.requires_grad_(False)
    apply_lora(lora_model, args.lora_rank, args.lora_alpha)
    lora_params = [p for n, p in lora_model.named_parameters() if "lora_" in n]
    trainer.model = lora_model
    t0 = time.time()
    trainer.fit(train, args.lora_steps, args.lora_lr, rng, lora_params, target=mirrored)
    log.info("LoRA training: %.0fs", time.time() - t0)
    wrong += trainer.wrong(held, lambda s: mirrored(s.caption))
    state = lora_model.state_dict()
    shard = sum(v.numel() * v.element_size() for v in state.values()) // 2 + 1
    save_dir(Path(args.lora_out), config, state, tok, processor, shard_bytes=shard)
    log.info("saved LoRA checkpoint (released layout) to %s", args.lora_out)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
