"""The one interface every captioner implements.

``prepare`` runs in background threads (decode, sample, preprocess: CPU only, no model);
``setup`` loads weights once; ``generate`` turns a batch of prepared videos into new token ids;
``decode`` turns token ids into caption text. Splitting generate and decode lets the optional AllGather
path move token ids between ranks, as the seed scripts do.
"""

from __future__ import annotations

import argparse
import dataclasses
from abc import ABC, abstractmethod
from typing import Any, ClassVar

from captioning_core import options
from captioning_core.config import RunConfig

#: Version of the preprocessing every captioner shares (video.py: frame table, frame choice and decoding,
#: orientation and aspect handling), part of every fingerprint. Bump it in the commit whose change to that
#: code alters the frames a model gets (hence captions), so outputs and journal rows made before are
#: recaptioned instead of reused; a change that only makes it faster keeps it.
SHARED_PREPROCESS_VERSION = 1


class ModelDirError(ValueError):
    """The model directory is missing or incomplete (raised before any rank starts work)."""


class Captioner(ABC):
    name: ClassVar[str]
    #: the CLI's --pretrained_model_name_or_path default (the seed's layout of pretrained_models/)
    default_model_dir: ClassVar[str] = "pretrained_models/model"
    #: the dataclass of this model's own options, one ``options.option`` field each (the CLI's arguments,
    #: defaults and fingerprint roles come from it), if it has any
    options_cls: ClassVar[type | None] = None
    #: the ``--engine`` values this captioner runs ("compiled": captioning_core.engine), and its default
    engines: ClassVar[tuple[str, ...]] = ("eager",)
    default_engine: ClassVar[str] = "eager"
    #: version of this captioner's own preprocessing (frame sampling, resizing, prompt and chat template,
    #: what it feeds generate). Part of the fingerprint: bump it in the commit whose change alters this
    #: model's captions (a subclass changing what it inherits overrides it); not for speed-only changes
    preprocess_version: ClassVar[int] = 1
    #: files a local model directory must hold, checked before loading
    required_files: ClassVar[tuple[str, ...]] = ("config.json",)

    def __init__(self, cfg: RunConfig) -> None:
        self.check_engine(cfg.engine)
        self.cfg = cfg
        self.model_dir = cfg.pretrained_model_name_or_path
        self.model = None  # set by setup()
        self.tokenizer = None  # set by setup(); the runner checks it to know whether setup ran

    @classmethod
    def check_engine(cls, engine: str) -> None:
        """Refuse an engine this captioner does not have, rather than run another one in its place."""
        if engine not in cls.engines:
            raise ValueError(f"--engine {engine}: {cls.name} has no {engine} engine (it runs "
                             f"{', '.join(cls.engines)}); the compiled engine exists for qwen2vl, qwen2_5vl and qwen3vl")

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Model-specific CLI arguments (seed names and defaults), from ``options_cls``'s option specs."""
        if cls.options_cls is not None:
            options.add_arguments(parser, cls.options_cls)

    @classmethod
    def options_from_args(cls, args: argparse.Namespace) -> dict:
        """``cfg.model_options`` from parsed arguments, validated now (before any rank starts)."""
        if cls.options_cls is None:
            return {}
        return dataclasses.asdict(cls.options_cls(**options.values(cls.options_cls, args)))

    @abstractmethod
    def prepare(self, local_path: str) -> Any:
        """Decode and preprocess one video; raise VideoError (or anything) for a per-row failure."""

    def setup_preprocessing(self) -> None:  # noqa: B027 - an optional hook, empty by default
        """Whatever ``prepare`` needs, done in the main thread before background decoding starts (and so
        before ``setup``, which then loads the weights while the first batches decode)."""

    @abstractmethod
    def setup(self) -> None:
        """Load tokenizer and weights."""

    @abstractmethod
    def generate(self, batch: list[Any]) -> list[list[int]]:
        """New token ids (prompt trimmed) for each prepared video in ``batch``."""

    @abstractmethod
    def decode(self, token_ids: list[int]) -> str:
        """Caption text for one row's token ids."""

    def prefill_tokens(self, item: Any) -> int | None:
        """Prompt tokens of one prepared video as ``generate`` feeds it (video tokens plus the text around
        them), for batching by token budget; called after ``setup``. None: unknown, and the runner then
        batches by video count only (``--bs``, one video per call if that is unset)."""
        return None

    def thumbnail_frames(self, item: Any):
        """A few uint8 (T, H, W, 3) frames of a prepared video for the gallery, or None."""
        return getattr(item, "thumb_frames", None)


#: set to "1" (the operator's ``allow_pickled_weights=True``) to accept pickled ``*.bin`` weights
PICKLED_WEIGHTS_ENV = "CAPTION_ALLOW_PICKLED_WEIGHTS"


def pickled_weights_allowed() -> bool:
    """Pickled (``*.bin``) checkpoints run arbitrary code when loaded; they are refused unless explicitly
    allowed. ``from_pretrained`` gets ``use_safetensors=not pickled_weights_allowed()`` and never
    ``trust_remote_code``."""
    import os

    return os.environ.get(PICKLED_WEIGHTS_ENV) == "1"


def check_model_dir(path: str, required: tuple[str, ...] = ("config.json",), *,
                    allow_pickle: bool | None = None) -> None:
    """Fail early, naming what is missing, when a local model directory can't be loaded.

    Weights must be safetensors; pickled ``*.bin`` weights count only with ``allow_pickle`` (default: the
    ``CAPTION_ALLOW_PICKLED_WEIGHTS`` setting), because unpickling a file can execute code from it.
    """
    import glob
    import os

    allow_pickle = pickled_weights_allowed() if allow_pickle is None else allow_pickle

    if not os.path.isdir(path):
        raise ModelDirError(f"model directory not found: {path} (no model hub here: pass a local directory)")
    missing = [name for name in required if not os.path.exists(os.path.join(path, name))]
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        import json

        with open(index, encoding="utf-8") as fh:
            shards = sorted(set(json.load(fh).get("weight_map", {}).values()))
        missing += [s for s in shards if not os.path.exists(os.path.join(path, s))]
    elif not glob.glob(os.path.join(path, "*.safetensors")):
        if not glob.glob(os.path.join(path, "*.bin")):
            missing.append("model weights (*.safetensors)")
        elif not allow_pickle:
            missing.append("model weights (*.safetensors); the directory has only pickled *.bin weights, which "
                           "can execute code when loaded: convert them to safetensors, or accept that risk "
                           "explicitly with allow_pickled_weights=True")
    if not any(os.path.exists(os.path.join(path, n)) for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        missing.append("tokenizer (tokenizer.json, tokenizer.model or vocab.json)")
    if missing:
        raise ModelDirError(f"model directory {path} is incomplete; missing: {', '.join(missing)}")
