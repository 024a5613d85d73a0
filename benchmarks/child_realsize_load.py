"""Child of item 11, mindnlp: load a real-size checkpoint through the production captioner and generate once.

    python -m benchmarks.child_realsize_load '{"name": "qwen2vl", "dtype": "bfloat16", "model_dir": ...,
                                               "meta": ..., "clip": ...}'

The production path: ``captioner_class`` -> ``setup_preprocessing``, ``prepare``, ``setup``, ``generate``,
on the tiny profile's frame size. One JSON line per phase ("loading", "generating", "done"), so a parent
that stops this process for its memory (``run_child_watched``) still knows where it was; the last carries
load/generate seconds, peak RSS after import, after load and at the end, or what failed and where.
"""

from __future__ import annotations

import json
import sys
import time
import traceback


def mem() -> dict[str, float]:
    """VmHWM (peak) and VmRSS of this process, GiB."""
    with open("/proc/self/status") as fh:
        status = fh.read()
    return {k: int(status.split(k + ":")[1].split()[0]) / 2**20 for k in ("VmHWM", "VmRSS")}


def failure(err: BaseException) -> dict[str, str]:
    """The exception's own first lines plus the innermost frame in transformers and in mindtorch/mindspore."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip() and not set(line.strip()) <= set("-")]
    # MindSpore lists every supported type
    lines = [line[line.index("but get"):] if "but get" in line else line for line in lines[:3]]
    frames = traceback.extract_tb(err.__traceback__)

    def last(*parts: str) -> str:
        hits = [f for f in frames if any(p in f.filename for p in parts)]
        if not hits:
            return ""
        return hits[-1].filename.split("site-packages/")[-1] + ":" + str(hits[-1].lineno) + " " + hits[-1].name

    where = [w for w in (last("transformers/"), last("mindtorch/", "mindspore/")) if w]
    return {"error": type(err).__name__ + ": " + "; ".join(lines)[:400], "where": " -> ".join(where)}


def load(name: str, dtype: str, model_dir: str, meta: str, clip: str) -> None:
    from captioning_core import runtime

    runtime.setup_device("CPU")
    from captioning_core.config import RunConfig
    from captioning_core.models import captioner_class
    from testkit.profile import TINY

    out: dict = {"model": name, "dtype": dtype}
    cls = captioner_class(name)
    cfg = RunConfig(meta_path=meta, model=name, pretrained_model_name_or_path=model_dir, device_target="CPU",
                    dtype=dtype, max_new_tokens=8, model_options=TINY.model_options())
    cap = cls(cfg)
    cap.setup_preprocessing()
    item = cap.prepare(clip)
    out["video_tokens"] = item.num_tokens
    t0 = time.perf_counter()
    runtime.import_mindnlp()
    out["import_s"] = time.perf_counter() - t0
    out["after_import"] = mem()

    def progress(phase: str) -> None:  # one JSON line per phase
        print(json.dumps({**out, "phase": phase}), flush=True)

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


if __name__ == "__main__":
    load(**json.loads(sys.argv[1]))
