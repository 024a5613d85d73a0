"""Released model layouts at real size, for benchmark item 11 (data only; its children are
``benchmarks.child_realsize_build`` and ``benchmarks.child_realsize_load``).

No weights can be downloaded here, so the item builds a random-weight checkpoint from the *released*
``config.json`` of each model (the values below are the published configs, key for key), saved the way the
released repositories are: bf16 safetensors in 4 GB shards plus ``model.safetensors.index.json``. Real
PyTorch builds and saves it with transformers, as the releases were made; then a fresh mindnlp process
loads it through the production captioner. The two steps run in separate interpreters because real torch
and mindtorch cannot share one process.

The tokenizer is the project's word-level tiny vocabulary, with Qwen's special tokens moved to their real
ids (151643...) and filler entries in between, so the prompt's video/vision ids are the ones the released
config names; ids outside the tiny words only matter for decoding, which this item does not judge.
"""

from __future__ import annotations

from typing import NamedTuple

# Qwen/Qwen2-VL-2B-Instruct config.json (legacy flat layout: transformers builds text_config from the top level)
QWEN2_VL_2B_INSTRUCT = {
    "architectures": ["Qwen2VLForConditionalGeneration"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "hidden_act": "silu",
    "hidden_size": 1536,
    "initializer_range": 0.02,
    "intermediate_size": 8960,
    "max_position_embeddings": 32768,
    "max_window_layers": 28,
    "model_type": "qwen2_vl",
    "num_attention_heads": 12,
    "num_hidden_layers": 28,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.41.2",
    "use_cache": True,
    "use_sliding_window": False,
    "vision_config": {
        "depth": 32,
        "embed_dim": 1280,
        "mlp_ratio": 4,
        "num_heads": 16,
        "in_chans": 3,
        "hidden_size": 1536,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "temporal_patch_size": 2,
    },
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vocab_size": 151936,
}

# Qwen/Qwen2.5-VL-3B-Instruct config.json
QWEN2_5_VL_3B_INSTRUCT = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 11008,
    "max_position_embeddings": 128000,
    "max_window_layers": 70,
    "model_type": "qwen2_5_vl",
    "num_attention_heads": 16,
    "num_hidden_layers": 36,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.41.2",
    "use_cache": True,
    "use_sliding_window": False,
    "vision_config": {
        "depth": 32,
        "hidden_act": "silu",
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "in_chans": 3,
        "out_hidden_size": 2048,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
        "temporal_patch_size": 2,
    },
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vocab_size": 151936,
}

# preprocessor_config.json of both releases (the 2.5 one names its own processor class)
_PREPROCESSOR = {
    "min_pixels": 3136,  # the released floor (56x56), not the tiny profile (testkit.profile.TINY)
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
}

class Layout(NamedTuple):
    captioner: str  # captioning_core.models registry name
    repo_id: str  # the released repository
    config: dict  # its config.json
    preprocessor: dict  # its preprocessor_config.json
    released_gb: float  # its weight shards in GB, as listed by the repository (for the memory check)


#: ``--realsize`` names
MODELS = {
    "qwen2vl-2b": Layout("qwen2vl", "Qwen/Qwen2-VL-2B-Instruct", QWEN2_VL_2B_INSTRUCT,
                         {**_PREPROCESSOR, "processor_class": "Qwen2VLProcessor"}, 3.99 + 0.429),
    "qwen2_5vl-3b": Layout("qwen2_5vl", "Qwen/Qwen2.5-VL-3B-Instruct", QWEN2_5_VL_3B_INSTRUCT,
                           {**_PREPROCESSOR, "processor_class": "Qwen2_5_VLProcessor"}, 3.98 + 3.53),
}

#: the released repositories' shard size (Qwen2-VL-2B: 3.99 GB + 429 MB; Qwen2.5-VL-3B: 3.98 GB + 3.53 GB)
SHARD_SIZE = "4GB"

QWEN_SPECIAL_IDS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
                    "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|vision_pad|>": 151654,
                    "<|image_pad|>": 151655, "<|video_pad|>": 151656}


def mem_available_gib() -> float:
    with open("/proc/meminfo") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("MemAvailable:")) / 2**20

