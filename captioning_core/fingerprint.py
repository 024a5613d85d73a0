"""The identity of what decides a caption, recorded on every journaled row and in the summary.

Two captions of the same video may be reused for each other only if the same model kind, checkpoint,
prompt, generation options, frame sampling, dtype, preprocessing code and model runtime made them. Batch size, device, world size and
prefetching are left out on purpose: they change speed, not the caption a row is meant to get.

The checkpoint is identified by content, not by path (a copied model directory keeps its identity): every
file's name, size and SHA-256 of all its bytes (file_digest.py). Sampling big files missed a fine-tune that
rewrote 3 MiB inside a 64 MiB shard; a full hash reads the whole checkpoint once per host (~10 CPU s of
SHA-256 for 15 GB in the page cache, the device's read time from disk: docs/BENCHMARKS.md, item 13), and
the host's digest cache makes every later fingerprint of unchanged files a stat per file.

Two more parts decide a caption without being options: ``preprocess``, the versions of the preprocessing code
(``models.base.SHARED_PREPROCESS_VERSION`` and the captioner's ``preprocess_version``, bumped by hand when a
change to sampling, resizing or prompting alters captions), and ``runtime``, the installed versions of
MindSpore, mindnlp and transformers, read from package metadata (``importlib.metadata``) without importing
them. The operator computes the fingerprint on the Airflow worker and the ranks in msrun; their runtime
versions agree because in this project the ranks run in the worker's own virtualenv (MsrunHook starts the
msrun beside ``sys.executable`` and puts that interpreter first on the ranks' PATH). A deployment whose
ranks ran another environment would see every output as made with other settings, never silently accept one.
Both also share the host's digest cache (the ranks inherit ``HOME``, ``XDG_CACHE_HOME`` and ``CAPTION_*``).

Which part an option belongs to is its declared role (``Option.role``, options.py), not a list of names here:
a new generation option lands in ``generation`` because its field says so. ``arguments.for_script_args`` lets
the operator compute, from the argv it passes to the caption script and without importing MindSpore, mindnlp,
torch or transformers, exactly the dict the ranks record.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from pathlib import Path

from captioning_core import file_digest, options
from captioning_core.config import RunConfig
from captioning_core.models import base as captioner_base
from captioning_core.options import CHECKPOINT, DTYPE, GENERATION, PROMPT, SAMPLING

SUMMARY_KEY = "fingerprint"
ID_LENGTH = 12
#: the distributions whose versions are part of the fingerprint (those that compute a caption)
RUNTIME_DISTRIBUTIONS = ("mindspore", "mindnlp", "transformers")
_IGNORED_FILES = (".", "README", "LICENSE")


def checkpoint_identity(model_dir: str | None) -> dict:
    """Names, sizes and full SHA-256 of every file of a model directory (recursively)."""
    if not model_dir:
        return {}
    root = Path(model_dir)
    if not root.is_dir():
        return {"missing": True}
    paths = [p for p in sorted(root.rglob("*")) if p.is_file() and not any(
        part.startswith(_IGNORED_FILES) for part in p.relative_to(root).parts)]
    hashed = file_digest.digests(paths)
    return {"files": [{"name": p.relative_to(root).as_posix(), "size": p.stat().st_size, "sha256": hashed[p]}
                      for p in paths]}


def runtime_versions() -> dict[str, str | None]:
    """Installed versions of the packages that compute captions (None if absent), without importing them."""
    found: dict[str, str | None] = {}
    for dist in RUNTIME_DISTRIBUTIONS:
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            found[dist] = None
    return found


def compute(cfg) -> dict:
    """The fingerprint of a RunConfig: ``{"id": short hex, "model", "checkpoint", "prompt", "generation",
    "sampling", "dtype", "preprocess", "runtime"}``. ``id`` is a hash of everything else."""
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
        "preprocess": {"shared": captioner_base.SHARED_PREPROCESS_VERSION, "model": _preprocess_version(cfg.model)},
        "runtime": runtime_versions(),
    }
    parts = _normalised(json.loads(json.dumps(parts, sort_keys=True, default=list)))  # tuples -> lists
    canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"))
    return {"id": hashlib.sha256(canonical.encode()).hexdigest()[:ID_LENGTH], **parts}


def _model_specs(model: str) -> dict[str, options.Option]:
    """The captioner's option specs by name (none for a model outside the registry, e.g. a test's)."""
    from captioning_core.models import CAPTIONERS, captioner_class

    options_cls = captioner_class(model).options_cls if model in CAPTIONERS else None
    return {o.name: o for o in options.specs(options_cls)} if options_cls else {}


def _preprocess_version(model: str) -> int | None:
    """The captioner's own preprocessing version (None for a model outside the registry, e.g. a test's)."""
    from captioning_core.models import CAPTIONERS, captioner_class

    return captioner_class(model).preprocess_version if model in CAPTIONERS else None


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

