"""Where a meta row's ``path`` points, and what it may not point at.

Relative paths resolve against ``video_root`` (default: the meta file's directory, local or S3).
A ``..`` segment is rejected outright, in relative, absolute and S3 paths alike: a path is never normalised
(``/data/videos/../../proc/self/environ`` is refused, not read as ``/proc/self/environ``). With
``allowed_roots`` set, a resolved location must lie under one of them (local roots by real path, so a symlink
out of a root is outside it; S3 roots by bucket and key prefix). Violations fail that row only, before anything
is read.
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
        _reject_dotdot(storage.S3Location.parse(path).key, path)
        uri = path
    elif os.path.isabs(path):
        _reject_dotdot(path, path)
        uri = path
    else:
        _reject_dotdot(path, path)
        root = cfg.video_root or storage.dirname(cfg.meta_path)
        uri = posixpath.join(root, path) if storage.is_s3(root) else os.path.join(root, path)
    _check_allowed(uri, getattr(cfg, "allowed_roots", None) or [])
    return uri


def check_root(root: str) -> None:
    """Raise ValueError unless ``root`` can be an allowed root: an absolute local directory or
    ``s3://bucket[/prefix]``, without ``..`` (a root is compared as given, so it must not climb)."""
    if not isinstance(root, str) or not root.strip() or "\x00" in root:
        raise ValueError(f"an allowed root must be a non-empty path, got {root!r}")
    if storage.is_s3(root):
        _reject_dotdot(storage.S3Location.parse(root).key, root, what="allowed roots")  # parse: a bucket
    elif not os.path.isabs(root):
        raise ValueError(f"a local allowed root must be an absolute directory: {root!r}")
    else:
        _reject_dotdot(root, root, what="allowed roots")


def _reject_dotdot(key: str, original: str, what: str = "video paths") -> None:
    if ".." in key.replace("\\", "/").split("/"):
        raise UnsafePathError(f"'..' is not allowed in {what}: {original!r}")


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
        raise UnsafePathError(f"{uri!r} is outside the allowed roots ({', '.join(roots)})")
