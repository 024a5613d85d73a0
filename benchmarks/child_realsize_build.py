"""Child of item 11, real PyTorch: a random-weight checkpoint from a released config, saved as the release is.

    python -m benchmarks.child_realsize_build '{"key": "qwen2vl-2b", "out": ...}'

Runs under real torch + transformers (never beside mindtorch: see benchmarks/realsize.py). Writes the bf16
sharded safetensors, the released ``config.json`` and ``preprocessor_config.json``, and a tokenizer whose
special tokens sit at Qwen's real ids. Prints one JSON line: build/save seconds, parameter count, shard
bytes and this process's peak RSS.
"""

from __future__ import annotations

import json
import os
import sys
import time


def build(key: str, out: str) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText
    from transformers.modeling_utils import no_init_weights

    from benchmarks.realsize import MODELS, SHARD_SIZE

    layout = MODELS[key]
    released, preprocessor = layout.config, layout.preprocessor
    os.makedirs(out, exist_ok=True)
    _write_json(os.path.join(out, "config.json"), released)
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
    _write_json(os.path.join(out, "config.json"), released)
    _write_json(os.path.join(out, "preprocessor_config.json"), preprocessor)
    _save_tokenizer(out)
    with open(os.path.join(out, "model.safetensors.index.json")) as fh:
        index = json.load(fh)
    shards = sorted(set(index["weight_map"].values()))
    with open("/proc/self/status") as fh:
        hwm_kib = int(next(line for line in fh if line.startswith("VmHWM")).split()[1])
    return {"build_s": built, "save_s": saved, "params": params, "repo_id": layout.repo_id,
            "weights_bytes": sum(os.path.getsize(os.path.join(out, s)) for s in shards),
            "shard_bytes": [os.path.getsize(os.path.join(out, s)) for s in shards],
            "index_total_size": index["metadata"]["total_size"], "hwm_gib": hwm_kib / 2**20}


def _write_json(path: str, value: dict) -> None:
    with open(path, "w") as fh:
        json.dump(value, fh, indent=2)


def _save_tokenizer(out: str) -> None:
    """The project's word-level tiny vocabulary, with Qwen's special tokens moved to their real ids."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from benchmarks.realsize import QWEN_SPECIAL_IDS
    from tools.tiny_vocab import CAPTION_WORDS, PROMPT_WORDS, QWEN_CHAT_TEMPLATE

    vocab: dict[str, int] = {}
    for word in ["<unk>", *CAPTION_WORDS, *PROMPT_WORDS]:
        vocab.setdefault(word, len(vocab))
    by_id = {i: t for t, i in QWEN_SPECIAL_IDS.items()}
    for i in range(len(vocab), max(by_id) + 1):
        vocab[by_id.get(i, f"<filler_{i}>")] = i
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.normalizer, tk.pre_tokenizer, tk.decoder = (normalizers.Lowercase(), pre_tokenizers.Whitespace(),
                                                   decoders.WordPiece())
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  unk_token="<unk>",
                                  additional_special_tokens=[t for t in QWEN_SPECIAL_IDS
                                                             if t not in ("<|endoftext|>", "<|im_end|>")],
                                  model_input_names=["input_ids", "attention_mask"])
    tok.chat_template = QWEN_CHAT_TEMPLATE
    tok.save_pretrained(out)
    assert all(tok.convert_tokens_to_ids(t) == i for t, i in QWEN_SPECIAL_IDS.items())


if __name__ == "__main__":
    print(json.dumps(build(**json.loads(sys.argv[1]))))
