"""One side of a reference-parity check: the production captioner under mindnlp, or the reference on real PyTorch.

mindnlp replaces ``torch`` inside the process that imports it, so the two sides run as separate processes:

    python -m testkit.parity mindnlp qwen2vl MODEL_DIR CLIP WORKDIR   # writes WORKDIR/inputs.npz, mindnlp.npz
    python -m testkit.parity torch   qwen2vl MODEL_DIR CLIP WORKDIR   # reads inputs.npz, writes torch.npz

The mindnlp side is the production path (the captioner's ``prepare`` and ``setup``, fp32 on MindSpore CPU).
It saves the exact model inputs it built, so the reference sees the same preprocessed tensors. Each side writes
the logits of one forward pass over the prompt and the ids of a greedy generate. The generate is forced to
``STEPS`` new tokens (``min_new_tokens``), so a short caption still compares every step.
Reference for the Qwen models: transformers' own class (``TRANSFORMERS_REFERENCE``). For PLLaVA, which transformers
does not ship, it is the project's own PLLaVA modules on real PyTorch, the same code the tiny models were
trained with: the check is then mindtorch's arithmetic against PyTorch's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from testkit.profile import TINY

STEPS = 32
# Sampling settings small enough for the tiny models on a CPU.
QWEN_OPTIONS = {**TINY.model_options(), "max_video_tokens": None}
# Options per model where its CLI defaults don't suit a tiny model (others: their CLI defaults).
MODEL_OPTIONS = {"qwen2vl": QWEN_OPTIONS, "qwen2_5vl": QWEN_OPTIONS}
# Model -> the transformers class that is its reference on real PyTorch (HF-format models only).
TRANSFORMERS_REFERENCE = {"qwen2vl": "Qwen2VLForConditionalGeneration",
                          "qwen2_5vl": "Qwen2_5_VLForConditionalGeneration",
                          "qwen3vl": "Qwen3VLForConditionalGeneration"}


def _config(model: str, model_dir: str):
    from captioning_core.config import RunConfig
    from captioning_core.models import captioner_class

    cls = captioner_class(model)
    options = MODEL_OPTIONS.get(model)
    if options is None:
        import argparse

        parser = argparse.ArgumentParser()
        cls.add_arguments(parser)
        options = cls.options_from_args(parser.parse_args([]))
    return RunConfig(meta_path="parity.csv", model=model, pretrained_model_name_or_path=model_dir,
                     max_new_tokens=STEPS, device_target="CPU", dtype="float32", model_options=options)


def run_mindnlp(model: str, model_dir: str, clip: str, workdir: Path) -> None:
    from captioning_core.models import captioner_class

    cap = captioner_class(model)(_config(model, model_dir))
    cap.setup_preprocessing()
    item = cap.prepare(clip)
    cap.setup()
    import torch  # mindtorch, now that the captioner imported mindnlp

    from captioning_core.models.pllava_arch import to_numpy

    with torch.no_grad():
        if model in TRANSFORMERS_REFERENCE:
            arrays = cap.model_inputs([item])
            inputs = {k: torch.tensor(v) for k, v in arrays.items()}
            logits = cap.model(**inputs).logits
            ids = cap.model.generate(**inputs, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False)
            ids = to_numpy(ids)[:, arrays["input_ids"].shape[1]:]
        else:
            arrays = {"prompt_ids": np.asarray([cap.prompt_ids]), "pixel_values": item.pixel_values}
            logits, ids = _pllava_outputs(cap.model, arrays)
            ids = to_numpy(ids)
    np.savez(workdir / "inputs.npz", **arrays)
    np.savez(workdir / "mindnlp.npz", logits=to_numpy(logits).astype(np.float32), ids=ids)


def _pllava_outputs(model, arrays: dict):
    import torch

    rows = [arrays["prompt_ids"][0].tolist()]
    pixels = torch.tensor(arrays["pixel_values"])
    video = model.video_embeddings(pixels, 1)
    embeds, mask, _ = model.splice(rows, video)
    logits = model.language_model(inputs_embeds=embeds, attention_mask=mask).logits
    ids = model.generate(rows, pixels, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False)
    return logits, ids


def run_torch(model: str, model_dir: str, workdir: Path) -> None:
    if "mindnlp" in sys.modules:
        raise RuntimeError("the reference side must run on real PyTorch, without mindnlp")
    import torch

    arrays = dict(np.load(workdir / "inputs.npz"))
    with torch.no_grad():
        if model in TRANSFORMERS_REFERENCE:
            import transformers

            ref_cls = getattr(transformers, TRANSFORMERS_REFERENCE[model])
            ref = ref_cls.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
            inputs = {k: torch.from_numpy(v) for k, v in arrays.items()}
            logits = ref(**inputs).logits
            ids = ref.generate(**inputs, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False)
            ids = ids[:, arrays["input_ids"].shape[1]:]
        else:
            from captioning_core.models import pllava_arch, pllava_weights

            opts = _config(model, model_dir).model_options
            config = pllava_arch.PllavaConfig.from_model_dir(model_dir, num_frames=opts["num_frames"],
                                                              pooling_shape=list(opts["pooling_shape"]))
            ref = pllava_arch.PllavaModel(config)
            pllava_weights.load_weights(ref, model_dir)
            logits, ids = _pllava_outputs(ref.eval(), arrays)
    np.savez(workdir / "torch.npz", logits=logits.float().numpy(), ids=ids.numpy())


def main(argv: list[str]) -> int:
    backend, model, model_dir, clip, workdir = argv
    if backend == "mindnlp":
        run_mindnlp(model, model_dir, clip, Path(workdir))
    elif backend == "torch":
        run_torch(model, model_dir, Path(workdir))
    else:
        raise SystemExit(f"backend must be mindnlp or torch, got {backend!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
