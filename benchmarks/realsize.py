"""Released model layouts at real size, for benchmark item 11 (data and child-process code only).

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
    "min_pixels": 3136,
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


# Real PyTorch child: random-weight checkpoint from the released config, saved as the release is.
BUILD = """
import json, os, sys, time
sys.path.insert(0, {repo!r})
import torch
from transformers import AutoConfig, AutoModelForImageTextToText
from transformers.modeling_utils import no_init_weights
from benchmarks.realsize import MODELS, QWEN_SPECIAL_IDS, SHARD_SIZE

layout = MODELS[{key!r}]
repo_id, released, preprocessor = layout.repo_id, layout.config, layout.preprocessor
out = {out!r}
os.makedirs(out, exist_ok=True)
with open(os.path.join(out, "config.json"), "w") as fh:
    json.dump(released, fh, indent=2)
t0 = time.perf_counter()
config = AutoConfig.from_pretrained(out)
with no_init_weights():  # skip the per-tensor random init (normal_ over 2-4 G values: ~30-45 s here)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
model.tie_weights()
# Cheap deterministic fill: tile one random block (values ~N(0, 0.02)); norms 1, biases 0, so activations
# stay finite. Speed and memory do not depend on the values.
block = (torch.randn(1 << 22, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
with torch.no_grad():
    for i, (name, p) in enumerate(model.named_parameters()):
        if p.dim() == 1:
            p.fill_(1.0 if name.endswith("weight") and ("norm" in name or "ln_q" in name) else 0.0)
            continue
        flat, pos, off = p.view(-1), 0, (i * 7919) % block.numel()
        while pos < flat.numel():
            n = min(flat.numel() - pos, block.numel() - off)
            flat[pos:pos + n].copy_(block[off:off + n])
            pos, off = pos + n, 0
built = time.perf_counter() - t0
t0 = time.perf_counter()
model.save_pretrained(out, max_shard_size=SHARD_SIZE)
saved = time.perf_counter() - t0
params = sum(p.numel() for p in model.parameters())
del model
# the released config.json and preprocessor_config.json, not transformers 4.57's re-serialisation
with open(os.path.join(out, "config.json"), "w") as fh:
    json.dump(released, fh, indent=2)
with open(os.path.join(out, "preprocessor_config.json"), "w") as fh:
    json.dump(preprocessor, fh, indent=2)

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from tools.tiny_vocab import CAPTION_WORDS, PROMPT_WORDS, QWEN_CHAT_TEMPLATE
vocab = {{}}
for word in ["<unk>", *CAPTION_WORDS, *PROMPT_WORDS]:
    vocab.setdefault(word, len(vocab))
by_id = {{i: t for t, i in QWEN_SPECIAL_IDS.items()}}
for i in range(len(vocab), max(by_id) + 1):
    vocab[by_id.get(i, f"<filler_{{i}}>")] = i
tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
tk.normalizer, tk.pre_tokenizer, tk.decoder = normalizers.Lowercase(), pre_tokenizers.Whitespace(), decoders.WordPiece()
tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<unk>",
                              additional_special_tokens=[t for t in QWEN_SPECIAL_IDS if t not in ("<|endoftext|>", "<|im_end|>")],
                              model_input_names=["input_ids", "attention_mask"])
tok.chat_template = QWEN_CHAT_TEMPLATE
tok.save_pretrained(out)
assert all(tok.convert_tokens_to_ids(t) == i for t, i in QWEN_SPECIAL_IDS.items())
index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
shards = sorted(set(index["weight_map"].values()))
print(json.dumps({{"build_s": built, "save_s": saved, "params": params, "repo_id": repo_id,
                  "weights_bytes": sum(os.path.getsize(os.path.join(out, s)) for s in shards),
                  "shard_bytes": [os.path.getsize(os.path.join(out, s)) for s in shards],
                  "index_total_size": index["metadata"]["total_size"],
                  "hwm_gib": int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 2**20}}))
"""

# mindnlp child: the production path (captioner_class -> setup_preprocessing, prepare, setup, generate).
LOAD = """
import json, sys, time, traceback
sys.path.insert(0, {repo!r})
from captioning_core import runtime
runtime.setup_device("CPU")
from captioning_core.config import RunConfig
from captioning_core.models import captioner_class

def mem():
    status = open("/proc/self/status").read()
    return {{k: int(status.split(k + ":")[1].split()[0]) / 2**20 for k in ("VmHWM", "VmRSS")}}

def failure(err):
    # the exception's own first lines plus the innermost frame in transformers/mindtorch/mindspore code
    lines = [l.strip() for l in str(err).splitlines() if l.strip() and not set(l.strip()) <= set("-")]
    lines = [l[l.index("but get"):] if "but get" in l else l for l in lines[:3]]  # MindSpore lists every supported type
    frames = traceback.extract_tb(err.__traceback__)
    def last(*parts):
        hits = [f for f in frames if any(p in f.filename for p in parts)]
        return hits[-1].filename.split("site-packages/")[-1] + ":" + str(hits[-1].lineno) + " " + hits[-1].name if hits else ""
    where = [w for w in (last("transformers/"), last("mindtorch/", "mindspore/")) if w]
    return {{"error": type(err).__name__ + ": " + "; ".join(lines)[:400], "where": " -> ".join(where)}}

out = {{"model": {name!r}, "dtype": {dtype!r}}}
cls = captioner_class({name!r})
cfg = RunConfig(meta_path={meta!r}, model={name!r}, pretrained_model_name_or_path={model_dir!r}, device_target="CPU",
                dtype={dtype!r}, max_new_tokens=8,
                model_options={{"height": 112, "width": 112, "fps": 2, "min_pixels": 3136}})
cap = cls(cfg)
cap.setup_preprocessing()
item = cap.prepare({clip!r})
out["video_tokens"] = item.num_tokens
t0 = time.perf_counter()
runtime.import_mindnlp()
out["import_s"] = time.perf_counter() - t0
out["after_import"] = mem()

def progress(phase):  # one JSON line per phase: a parent that stops this process still knows where it was
    print(json.dumps({{**out, "phase": phase}}), flush=True)

progress("loading")
try:
    t0 = time.perf_counter()
    cap.setup()
    out["load_s"] = time.perf_counter() - t0
    out["after_load"] = mem()
except Exception as err:
    out["load_failed"] = failure(err)
else:
    progress("generating")
    try:
        t0 = time.perf_counter()
        ids = cap.generate([item])
        out["generate_s"] = time.perf_counter() - t0
        out["new_tokens"] = len(ids[0])
    except Exception as err:
        out["generate_failed"] = failure(err)
out["end"] = mem()
progress("done")
"""
