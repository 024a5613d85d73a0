"""PLLaVA checkpoints: find the weight files, map every key to the model explicitly, load, and save.

Two layouts exist (notes MODELS.md A.2/A.3):

- plain, as ``PllavaForConditionalGeneration`` names its parameters: ``vision_tower.vision_model.*``,
  ``multi_modal_projector.linear_{1,2}.*``, ``language_model.model.*``, ``language_model.lm_head.weight``;
- released (ermu2001/pllava-*), saved after peft wrapped the language model: LM keys carry the prefix
  ``language_model.base_model.model.``, LoRA targets hold ``<proj>.base_layer.weight`` plus
  ``<proj>.lora_A.default.weight`` / ``<proj>.lora_B.default.weight``; shards
  ``model-0000k-of-0000N.safetensors`` with ``model.safetensors.index.json``.

Every key is mapped to a model parameter or named in an error: nothing is skipped silently (PLLaVA itself loads
with ``strict=False``, which leaves its LM randomly initialised when the prefixes don't match).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field

from captioning_core.models.pllava_arch import LORA_TARGETS, PllavaModel, apply_lora

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
PEFT_PREFIX = "language_model.base_model.model."
_LORA = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.(?P<adapter>[^.]+)\.weight$")
# Non-persistent buffers that older transformers releases wrote into checkpoints: nothing to load.
_STALE = (re.compile(r"\.embeddings\.position_ids$"), re.compile(r"\.rotary_emb\.inv_freq$"))


class CheckpointError(ValueError):
    """A checkpoint that does not match the model exactly (missing, unexpected or misshapen keys)."""


@dataclass(frozen=True)
class Source:
    file: str
    key: str
    shape: tuple[int, ...]


@dataclass
class CheckpointKeys:
    """A checkpoint's keys by role, under the model's own (plain) names."""

    base: dict[str, Source] = field(default_factory=dict)
    lora: dict[str, Source] = field(default_factory=dict)  # "language_model.<module>.lora_A|B" -> source
    stale: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)


@dataclass
class LoadReport:
    files: list[str]
    tensors: int
    lora_modules: int = 0
    lora_rank: int | None = None
    lora_ignored: int = 0
    stale: list[str] = field(default_factory=list)


def weight_files(directory: str) -> list[str]:
    """The checkpoint's safetensors files: the index's shards, else ``model-0*`` shards, else model.safetensors.

    PLLaVA's load_pllava reads every ``model-0*`` file if any exists, else ``model.safetensors``; when an index
    is present it must name exactly the shards on disk.
    """
    if not os.path.isdir(directory):
        raise CheckpointError(f"checkpoint directory not found: {directory}")
    shards = sorted(n for n in os.listdir(directory) if n.startswith("model-0") and n.endswith(".safetensors"))
    index = os.path.join(directory, INDEX)
    if os.path.exists(index):
        with open(index, encoding="utf-8") as fh:
            named = sorted(set(json.load(fh)["weight_map"].values()))
        if named != shards:
            raise CheckpointError(f"{index} names shards {named} but {directory} holds {shards}")
        return [os.path.join(directory, n) for n in named]
    if shards:
        return [os.path.join(directory, n) for n in shards]
    if os.path.exists(os.path.join(directory, SINGLE)):
        return [os.path.join(directory, SINGLE)]
    raise CheckpointError(f"{directory}: no {SINGLE}, model-0000k-of-0000N.safetensors shards or {INDEX}")


def read_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape from a safetensors header (8-byte little-endian length, then JSON); no tensor is read."""
    with open(path, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(size))
    header.pop("__metadata__", None)
    return {key: tuple(meta["shape"]) for key, meta in header.items()}


def classify(key: str) -> tuple[str, str]:
    """(role, model name) of one checkpoint key; role is "base", "lora" or "stale"."""
    if any(p.search(key) for p in _STALE):
        return "stale", key
    if not key.startswith(PEFT_PREFIX):
        match = _LORA.match(key)
        return ("lora", f"{match['module']}.lora_{match['ab']}") if match else ("base", key)
    name = "language_model." + key[len(PEFT_PREFIX):]
    match = _LORA.match(name)
    if match:
        if match["adapter"] != "default":
            raise CheckpointError(f"{key}: LoRA adapter {match['adapter']!r}; PLLaVA saves one adapter, 'default'")
        return "lora", f"{match['module']}.lora_{match['ab']}"
    return "base", name.replace(".base_layer.", ".")


def read_keys(directory: str) -> CheckpointKeys:
    """Every key of the checkpoint in ``directory``, mapped to model names (duplicates are an error)."""
    out = CheckpointKeys(files=weight_files(directory))
    for path in out.files:
        for key, shape in read_shapes(path).items():
            role, name = classify(key)
            if role == "stale":
                out.stale.append(key)
                continue
            table = out.base if role == "base" else out.lora
            if name in table:
                raise CheckpointError(f"{key} and {table[name].key} both map to {name}")
            table[name] = Source(path, key, shape)
    return out


def _same_dir(a: str | None, b: str) -> bool:
    return a is None or os.path.realpath(a) == os.path.realpath(b)


def _check(expected: dict[str, tuple[int, ...]], found: dict[str, Source], what: str) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(expected) & set(found) if tuple(expected[k]) != found[k].shape)
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", [found[k].key for k in unexpected]),
                            ("wrong shape", [f"{k} {found[k].shape} != {tuple(expected[k])}" for k in wrong])):
            if keys:
                parts.append(f"{len(keys)} {label}: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}")
        raise CheckpointError(f"{what} does not match the model: " + "; ".join(parts))


def _expected(model) -> dict[str, tuple[int, ...]]:
    """State-dict names and shapes the checkpoint must provide (a tied lm_head comes with the embeddings)."""
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    lm = model.language_model
    if getattr(lm.config, "tie_word_embeddings", False):
        shapes.pop("language_model.lm_head.weight", None)
    return shapes


def _copy(model, plan: dict[str, Source]) -> None:
    """Copy every planned tensor into its parameter or buffer, one file at a time."""
    import torch
    from safetensors import safe_open

    targets = dict(model.named_parameters())
    targets.update(dict(model.named_buffers()))
    by_file: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for name, src in plan.items():
        by_file[src.file].append((name, src.key))
    with torch.no_grad():
        for path, items in by_file.items():
            with safe_open(path, framework="pt") as fh:
                for name, key in items:
                    target = targets[name]
                    target.data.copy_(fh.get_tensor(key).to(target.dtype))


def load_weights(model: PllavaModel, model_dir: str, weight_dir: str | None = None, use_lora: bool = False,
                 lora_alpha: float = 32) -> LoadReport:
    """Load ``model_dir`` (and ``weight_dir`` on top, as load_pllava does); with ``use_lora`` wrap the LM in peft
    LoRA (q_proj/v_proj, rank read from the weights) and load its A/B matrices from ``weight_dir``.

    Raises CheckpointError naming every missing, unexpected or misshapen key before any tensor is copied.
    """
    keys = read_keys(model_dir)
    extra = None if _same_dir(weight_dir, model_dir) else read_keys(weight_dir)
    base = {**keys.base, **(extra.base if extra else {})}
    lora_src = extra if extra else keys
    _check(_expected(model), base, f"checkpoint {model_dir}" + (f" + {weight_dir}" if extra else ""))
    _copy(model, base)
    report = LoadReport(keys.files + (extra.files if extra else []), len(base),
                        stale=keys.stale + (extra.stale if extra else []))
    if not use_lora:
        report.lora_ignored = len(keys.lora) + (len(extra.lora) if extra else 0)
        if report.lora_ignored:
            log.warning("checkpoint holds %d LoRA tensors; not applied without --use_lora (PLLaVA's authors run "
                        "with --use_lora --lora_alpha 4)", report.lora_ignored)
        return report
    modules = _lora_modules(lora_src.lora, weight_dir or model_dir)
    ranks = {lora_src.lora[f"{m}.lora_A"].shape[0] for m in modules}
    if len(ranks) != 1:
        raise CheckpointError(f"LoRA ranks differ between modules: {sorted(ranks)}")
    rank = ranks.pop()
    apply_lora(model, rank, lora_alpha)
    expected = {}
    for name, shape in _expected(model).items():
        role, plain = classify(name)
        if role == "lora":
            expected[plain] = shape
    _check(expected, lora_src.lora, f"LoRA weights in {weight_dir or model_dir}")
    targets = {}
    for name in model.state_dict():
        role, plain = classify(name)
        if role == "lora":
            targets[name] = lora_src.lora[plain]
    _copy(model, targets)
    report.lora_modules, report.lora_rank = len(modules), rank
    return report


def _lora_modules(lora: dict[str, Source], where: str) -> list[str]:
    """The LM modules with LoRA weights; each must be a q_proj/v_proj with both A and B."""
    if not lora:
        raise CheckpointError(f"--use_lora: no lora_A/lora_B weights in {where}")
    modules = sorted({name.rsplit(".lora_", 1)[0] for name in lora})
    for module in modules:
        if not module.startswith("language_model.") or module.rsplit(".", 1)[-1] not in LORA_TARGETS:
            raise CheckpointError(f"LoRA weights for {module}: PLLaVA applies LoRA only to {LORA_TARGETS}")
        if f"{module}.lora_A" not in lora or f"{module}.lora_B" not in lora:
            raise CheckpointError(f"LoRA weights for {module} lack lora_A or lora_B")
    return modules


def save_checkpoint(state: dict, directory: str, shard_bytes: int | None = None) -> list[str]:
    """Write a (real torch) state dict as ``model.safetensors``, or, with ``shard_bytes``, as
    ``model-0000k-of-0000N.safetensors`` shards plus ``model.safetensors.index.json`` (the released layout)."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    tensors = {k: v.detach().contiguous().clone() for k, v in state.items()}
    if not shard_bytes:
        save_file(tensors, os.path.join(directory, SINGLE), metadata={"format": "pt"})
        return [SINGLE]
    shards: list[dict] = [{}]
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards, strict=True):
        save_file(shard, os.path.join(directory, name), metadata={"format": "pt"})
        weight_map.update({key: name for key in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(directory, INDEX), "w", encoding="utf-8") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2)
    return names
