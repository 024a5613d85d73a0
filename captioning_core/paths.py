"""Where a meta row's ``path`` points, and what it may not point at.

Relative paths resolve against ``video_root`` (default: the meta file's directory, local or S3).
``..`` segments are rejected outright; with ``allowed_roots`` set, a resolved location must lie under one
of them. Violations fail that row only.
"""

from __future__ import annotations

import os
import posixpath

from captioning_core import storage


class UnsafePathError(ValueError):
    pass


def resolve_video(path: str, cfg) -> str:
    if not path or not path.strip():
        raise UnsafePathError("empty path")
    if "\x00" in path:
        raise UnsafePathError("path contains a NUL byte")
    if storage.is_s3(path):
        loc = storage.S3Location.parse(path)
        _reject_dotdot(loc.key, path)
        uri = path
    elif os.path.isabs(path):
        uri = os.path.normpath(path)
    else:
        _reject_dotdot(path, path)
        root = cfg.video_root or storage.dirname(cfg.meta_path)
        uri = posixpath.join(root, path) if storage.is_s3(root) else os.path.join(root, path)
    _check_allowed(uri, getattr(cfg, "allowed_roots", None) or [])
    return uri


def _reject_dotdot(key: str, original: str) -> None:
    if ".." in key.replace("\\", "/").split("/"):
        raise UnsafePathError(f"'..' is not allowed in video paths: {original!r}")


def _check_allowed(uri: str, roots: list[str]) -> None:
    if not roots:
        return
    if storage.is_s3(uri):
        ok = any(storage.is_s3(r) and uri.startswith(r.rstrip("/") + "/") for r in roots)
    else:
        real = os.path.realpath(uri)
        ok = any(not storage.is_s3(r) and os.path.commonpath([real, os.path.realpath(r)]) == os.path.realpath(r)
                 for r in roots)
    if not ok:
        raise UnsafePathError(f"{uri!r} is outside the allowed roots")
