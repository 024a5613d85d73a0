"""The identity of what decides a caption, recorded on every journaled row and in the summary.

Two captions of the same video may be reused for each other only if the same model kind, checkpoint,
prompt, generation options, frame sampling and dtype made them. Batch size, device, world size and
prefetching are left out on purpose: they change speed, not the caption a row is meant to get.

The checkpoint is identified by content, not by path (a copied model directory keeps its identity):
every file's name and size, a full SHA-256 of small files (configs, tokenizer) and, for large weight
files, a SHA-256 of the safetensors header plus 16 evenly spaced 64 KiB samples. That reads ~1 MiB per
weight file whatever its size, so computing it on a 15 GB checkpoint costs milliseconds, and a fine-tuned
checkpoint with the same tensor shapes still changes it.

Which part an option belongs to is its declared role (``Option.role``, options.py), not a list of names here:
a new generation option lands in ``generation`` because its field says so. ``arguments.for_script_args`` lets
the operator compute, from the argv it passes to the caption script and without importing MindSpore, mindnlp,
torch or transformers, exactly the dict the ranks record.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from captioning_core import options
from captioning_core.config import RunConfig
from captioning_core.options import CHECKPOINT, DTYPE, GENERATION, PROMPT, SAMPLING

SUMMARY_KEY = "fingerprint"
ID_LENGTH = 12
FULL_HASH_LIMIT = 4 * 1024 * 1024  # files up to this size are hashed whole
SAMPLES = 16
SAMPLE_BYTES = 64 * 1024
_IGNORED_FILES = (".", "README", "LICENSE")


def _file_hash(path: Path, size: int) -> str:
    """SHA-256 of the whole file if small; else of its safetensors header and evenly spaced samples."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        if size <= FULL_HASH_LIMIT:
            digest.update(fh.read())
            return digest.hexdigest()
        if path.suffix == ".safetensors":
            head = fh.read(8)
            header_len = int.from_bytes(head, "little") if len(head) == 8 else 0
            digest.update(head + fh.read(min(header_len, FULL_HASH_LIMIT)))
        for i in range(SAMPLES):
            fh.seek(max(0, (size - SAMPLE_BYTES) * i // (SAMPLES - 1)))
            digest.update(fh.read(SAMPLE_BYTES))
    return "sampled:" + digest.hexdigest()


def checkpoint_identity(model_dir: str | None) -> dict:
    """Names, sizes and cheap hashes of every file of a model directory (recursively)."""
    if not model_dir:
        return {}
    root = Path(model_dir)
    if not root.is_dir():
        return {"missing": True}
    files = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if any(part.startswith(_IGNORED_FILES) for part in rel.split("/")):
            continue
        size = path.stat().st_size
        files.append({"name": rel, "size": size, "sha256": _file_hash(path, size)})
    return {"files": files}


def compute(cfg) -> dict:
    """The fingerprint of a RunConfig: ``{"id": short hex, "model", "checkpoint", "prompt", "generation",
    "sampling", "dtype"}``. ``id`` is a hash of everything else."""
    shared = {role: {o.name: getattr(cfg, o.name) for o in options.specs(RunConfig) if o.role == role}
              for role in (PROMPT, GENERATION, SAMPLING)}
    specs = _model_specs(cfg.model)
    own = _by_role(specs, cfg.model_options)
    checkpoint_opts = own[CHECKPOINT]
    by_content = [n for n, spec in specs.items() if spec.by_content and spec.role == CHECKPOINT]
    parts = {
        "model": cfg.model,
        "checkpoint": {**checkpoint_identity(cfg.pretrained_model_name_or_path), **(
            {"options": checkpoint_opts, **{n: checkpoint_identity(checkpoint_opts.get(n)) for n in by_content}}
            if checkpoint_opts else {})},
        "prompt": {**shared[PROMPT], **own[PROMPT]},
        "generation": {**shared[GENERATION], **own[GENERATION]},
        "sampling": {**shared[SAMPLING], **own[SAMPLING]},
        "dtype": cfg.dtype,
    }
    parts = _normalised(json.loads(json.dumps(parts, sort_keys=True, default=list)))  # tuples -> lists
    canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"))
    return {"id": hashlib.sha256(canonical.encode()).hexdigest()[:ID_LENGTH], **parts}


def _model_specs(model: str) -> dict[str, options.Option]:
    """The captioner's option specs by name (none for a model outside the registry, e.g. a test's)."""
    from captioning_core.models import CAPTIONERS, captioner_class

    options_cls = captioner_class(model).options_cls if model in CAPTIONERS else None
    return {o.name: o for o in options.specs(options_cls)} if options_cls else {}


def _by_role(specs: dict[str, options.Option], model_options: dict) -> dict[str, dict]:
    """The model's options split by their declared role; a value without a spec counts as sampling."""
    parts: dict[str, dict] = {role: {} for role in options.ROLES}
    for name, value in model_options.items():
        role = specs[name].role if name in specs else SAMPLING
        if role == DTYPE:
            raise TypeError(f"model option {name!r}: the dtype part is RunConfig.dtype's alone")
        parts[role][name] = value
    return parts


def _normalised(value):
    """``--fps 4`` and ``--fps 4.0`` are the same setting: integral floats become ints."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _normalised(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_normalised(v) for v in value]
    return value


def describe(fp: dict) -> str:
    """One line for logs and errors: id, model, prompt and the main options."""
    return (f"{fp.get('id')} ({fp.get('model')}, dtype {fp.get('dtype')}, question "
            f"{json.dumps(fp.get('prompt', {}).get('question'))}, {json.dumps(fp.get('generation'))})")

