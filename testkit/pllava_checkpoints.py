"""Small random PLLaVA checkpoints in the released layout, built with real PyTorch.

The weight tests load them under torch and the mindnlp tests under MindSpore: one builder, so both check the
same layout (PEFT-prefixed LM keys with LoRA, three shards and an index, as ermu2001/pllava-* publish).
"""

from __future__ import annotations

import json
from pathlib import Path

LORA_RANK = 4


def build_model(vocab_size: int = 24, image_token_index: int = 23, seed: int = 0):
    """A small random PllavaModel (real torch): 28 px frames -> 2x2 patches, pooled to (2, 1, 1)."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig

    from captioning_core.models.pllava_arch import PllavaConfig, PllavaModel

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                              image_size=28, patch_size=14, projection_dim=16)
    text = LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, bos_token_id=1, eos_token_id=2,
                       pad_token_id=0, tie_word_embeddings=False)
    config = PllavaConfig(vision, text, image_token_index=image_token_index, pooling_shape=(2, 1, 1),
                          frame_shape=(2, 2), num_frames=2, pad_token_id=0, extra={"register": False})
    return config, PllavaModel(config)


def randomise(model, seed: int, scale: float = 0.5) -> None:
    """Give every parameter (LoRA B included, which peft starts at zero) distinct random values."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)


def save_released(directory: Path, vocab_size: int = 24, image_token_index: int = 23, seed: int = 0,
                  scale: float = 0.5):
    """A checkpoint like ermu2001/pllava-*: PEFT-prefixed LM keys with LoRA, 3 shards + index, config.json."""
    from captioning_core.models.pllava_arch import apply_lora
    from captioning_core.models.pllava_weights import save_checkpoint

    config, model = build_model(vocab_size, image_token_index, seed)
    apply_lora(model, LORA_RANK, 32)
    randomise(model, seed, scale)
    state = model.state_dict()
    total = sum(v.numel() * v.element_size() for v in state.values())
    save_checkpoint(state, str(directory), shard_bytes=total // 3 + 1)
    (directory / "config.json").write_text(json.dumps(config.to_dict()))
    return config, model
