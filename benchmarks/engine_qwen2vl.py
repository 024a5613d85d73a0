"""Whole generate (vision tower + prefill + decode) of the tiny Qwen2-VL: compiled engine vs eager mindnlp vs
transformers on real PyTorch, at bs 1 / 8 / 32 on the same prepared inputs, side by side in one run.

    .venv/bin/python -m benchmarks.engine_qwen2vl [--new 32] [--sizes 1,8,32] [--reps 2]

The parent prepares the batches once with the production captioner (``prepare`` + ``model_inputs`` of 2 s
clips at the tiny profile: 112x112, 2 fps) and saves them; each engine then runs in its own fresh process
(mindnlp replaces ``torch`` where it is imported). Every side generates exactly ``--new`` tokens per row
(stop ids suppressed), greedy, fp32, one thread. Figures: output tokens/s of the best of ``--reps`` timed calls
after one untimed warm-up call (for the compiled engine that first call compiles its graphs: their seconds are
printed per graph). Targets from issue 23: compiled >= 1.0x PyTorch eager at every batch size, >= 50x eager
mindnlp at bs 32.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TINY = REPO / "tiny_models" / "qwen2vl"
OPTIONS = {"height": 112, "width": 112, "fps": 2.0, "min_pixels": 3136, "max_video_tokens": None}
KEYS = ("input_ids", "attention_mask", "pixel_values_videos", "video_grid_thw")

SIDE = r"""
import json, resource, sys, time
import numpy as np
rss = lambda: round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
backend, workdir, new, reps, sizes = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
sizes = [int(s) for s in sizes.split(",")]
model_dir = sys.argv[6]
out = {}
if backend == "compiled":
    from captioning_core.engine.qwen2vl import CompiledQwen2VL
    t0 = time.perf_counter()
    eng = CompiledQwen2VL.from_pretrained(model_dir)
    out["load_s"] = round(time.perf_counter() - t0, 3)
    out["peak_rss_mb_after_load"] = rss()
    run = lambda a: eng.generate(a, new, eos_ids=eng.eos_ids, min_new_tokens=new)
else:
    if backend == "mindnlp":
        from captioning_core import runtime
        runtime.import_mindnlp()
    import torch, transformers
    if backend == "torch":
        torch.set_num_threads(1)
    t0 = time.perf_counter()
    model = transformers.Qwen2VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    out["load_s"] = round(time.perf_counter() - t0, 3)
    def run(a):
        kw = {k: torch.tensor(v) for k, v in a.items()}
        with torch.no_grad():
            return model.generate(**kw, max_new_tokens=new, min_new_tokens=new, do_sample=False)
for bs in sizes:
    arrays = dict(np.load(f"{workdir}/bs{bs}.npz"))
    t0 = time.perf_counter()
    run(arrays)
    first = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run(arrays)
        times.append(time.perf_counter() - t0)
    out[str(bs)] = {"first_s": round(first, 3), "best_s": round(min(times), 4), "tok_s": round(bs * new / min(times), 1)}
out["peak_rss_mb_end"] = rss()
if backend == "compiled":
    out["compile_s"] = eng.stats.compile_seconds
print(json.dumps(out))
"""


def prepare(workdir: Path, sizes: list[int]) -> dict[int, int]:
    import numpy as np

    from captioning_core.config import RunConfig
    from captioning_core.models.qwen2_vl import Qwen2VLCaptioner
    from testkit.clips import COLORS, DIRECTIONS, ClipSpec, ensure_clip

    specs = [ClipSpec(c, d, s, 640, 360, 30, 2.0, 30) for s in ("square", "circle") for c in COLORS
             for d in DIRECTIONS][:max(sizes)]
    clips = [ensure_clip(s, workdir / "clips") for s in specs]
    cfg = RunConfig(meta_path="bench.csv", model="qwen2vl", pretrained_model_name_or_path=str(TINY),
                    max_new_tokens=8, device_target="CPU", dtype="float32", model_options=OPTIONS)
    cap = Qwen2VLCaptioner(cfg)
    cap.setup_preprocessing()
    cap.setup_prompt()
    items = [cap.prepare(str(c)) for c in clips]
    lengths = {}
    for bs in sizes:
        arrays = cap.model_inputs(items[:bs])
        np.savez(workdir / f"bs{bs}.npz", **{k: arrays[k] for k in KEYS})
        lengths[bs] = int(arrays["input_ids"].shape[1])
    return lengths


def side(backend: str, workdir: Path, new: int, reps: int, sizes: list[int]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", SIDE, backend, str(workdir), str(new), str(reps),
                           ",".join(map(str, sizes)), str(TINY)], capture_output=True, text=True, env=env,
                          cwd=workdir, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{backend}: {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--sizes", default="1,8,32")
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    workdir = Path(tempfile.mkdtemp(prefix="bench-engine-"))
    started = time.perf_counter()
    lengths = prepare(workdir, sizes)
    res = {b: side(b, workdir, args.new, args.reps, sizes) for b in ("compiled", "torch", "mindnlp")}
    print(f"whole generate, tiny Qwen2-VL, fp32, 1 thread, {args.new} new tokens per row (output tokens/s; "  # noqa: T201
          f"best of {args.reps} after a warm-up call)")
    print(f"{'bs':>4} {'prompt':>6} {'compiled':>10} {'torch':>10} {'mindnlp':>10} {'vs torch':>9} {'vs mindnlp':>11}")  # noqa: T201
    for bs in sizes:
        c, t, m = (res[b][str(bs)]["tok_s"] for b in ("compiled", "torch", "mindnlp"))
        print(f"{bs:>4} {lengths[bs]:>6} {c:>10.1f} {t:>10.1f} {m:>10.1f} {c / t:>8.2f}x {c / m:>10.1f}x")  # noqa: T201
    print("first call (s):", {b: {bs: res[b][str(bs)]["first_s"] for bs in sizes} for b in res})  # noqa: T201
    print("load (s):", {b: res[b]["load_s"] for b in res})  # noqa: T201
    print("peak RSS (MB) at the end:", {b: res[b]["peak_rss_mb_end"] for b in res})  # noqa: T201
    print("compile + first run per graph (s):", json.dumps(res["compiled"]["compile_s"]))  # noqa: T201
    print(f"total {time.perf_counter() - started:.0f} s; raw: {json.dumps(res)}")  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
