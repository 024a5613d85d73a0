"""Sides of the compiled engine's parity check (tests/test_engine_qwen2vl.py), each run as its own process.

    python -m testkit.engine_parity compiled MODEL MODEL_DIR WORKDIR CLIP...  # writes inputs.npz, compiled.npz
    python -m testkit.engine_parity mindnlp  MODEL MODEL_DIR WORKDIR   # eager mindnlp (the production eager path)
    python -m testkit.engine_parity torch    MODEL MODEL_DIR WORKDIR   # transformers on real PyTorch

MODEL is ``qwen2vl``, ``qwen2_5vl`` or ``qwen3vl`` (whose sides also write the vision tower's DeepStack
features, ``<case>.deepstack``).

The compiled side runs the production captioner (``prepare``, ``model_inputs``, ``setup`` and ``generate`` with
``--engine compiled``; no mindnlp in that process) on each clip alone (cases ``bs1_<i>``) and on all of them as
one left-padded batch (``batch``), and saves the exact inputs so the other sides see the same tensors. Each side
writes per case: greedy ids forced to ``STEPS`` tokens (stop ids suppressed), the captioner-style trimmed ids of
an unforced generate (-1 padded), prefill logits over the real prompt positions, the vision tower's merged
tokens; the compiled and torch sides also the M-RoPE position ids and deltas, and the edge cases on ``bs1_0``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

STEPS = 32
EDGE_NEW = 5
PENALTY = 1.3  # the released Qwen2-VL-Instruct configs ask for 1.05; larger, so the tiny model's loops change
OPTIONS = {"height": 112, "width": 112, "fps": 2.0, "min_pixels": 3136, "max_video_tokens": None}
KEYS = ("input_ids", "attention_mask", "pixel_values_videos", "video_grid_thw")
REFERENCE = {"qwen2vl": "Qwen2VLForConditionalGeneration", "qwen2_5vl": "Qwen2_5_VLForConditionalGeneration",
             "qwen3vl": "Qwen3VLForConditionalGeneration"}

REPO = Path(__file__).resolve().parents[1]
BOUND = 1e-4  # fp32, max absolute difference the parity tests allow
CASES = [f"bs1_{i}" for i in range(8)] + ["batch"]


def run_sides(backends: list[str], model: str, workdir: Path, clips: list[Path] = ()) -> None:
    """Run each backend's side in its own process, side by side (one thread each), and wait for all
    (what the parity tests call; an AssertionError names each side that failed, with its output's tail)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "plugins")]), "OMP_NUM_THREADS": "1"}
    procs = {backend: subprocess.Popen([sys.executable, "-m", "testkit.engine_parity", backend, model,
                                        str(REPO / "tiny_models" / model), str(workdir), *map(str, clips)],
                                       env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for backend in backends}
    failed = []
    for backend, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=1500)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        if proc.returncode != 0:
            failed.append(f"{backend} side failed:\n{out[-3000:]}\n{err[-3000:]}")
    assert not failed, "\n".join(failed)


def tokens_differ(a: np.ndarray, b: np.ndarray) -> list[int]:
    """The rows where two [B, T] token arrays differ."""
    assert a.shape == b.shape, (a.shape, b.shape)
    return [i for i in range(len(a)) if not (a[i] == b[i]).all()]


def _keys(model: str) -> tuple[str, ...]:
    return KEYS + (("second_per_grid_ts",) if model == "qwen2_5vl" else ())


def _padded(rows: list[list[int]], width: int = STEPS) -> np.ndarray:
    out = np.full((len(rows), width), -1, np.int64)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def _trim(row, stop: set[int]) -> list[int]:
    row = [int(t) for t in row]
    for i, t in enumerate(row):
        if t in stop:
            return row[:i]
    return row


def _real_logits(logits: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """[B, L, V] -> the real (unpadded) positions, concatenated: [sum(mask), V]."""
    return np.concatenate([logits[b, mask[b] == 1] for b in range(len(mask))]).astype(np.float32)


def _config(model: str, model_dir: str, engine: str):
    from captioning_core.config import RunConfig

    return RunConfig(meta_path="parity.csv", model=model, pretrained_model_name_or_path=model_dir,
                     max_new_tokens=STEPS, device_target="CPU", dtype="float32", engine=engine,
                     model_options=OPTIONS)


def run_compiled(model: str, model_dir: str, workdir: Path, clips: list[str]) -> None:
    from captioning_core.engine.buckets import Buckets
    from captioning_core.models import captioner_class

    keys = _keys(model)
    cap = captioner_class(model)(_config(model, model_dir, "compiled"))
    cap.setup_preprocessing()
    items = [cap.prepare(c) for c in clips]
    cap.setup()
    eng = cap.compiled
    stop = cap.stop_ids
    cases = {f"bs1_{i}": [it] for i, it in enumerate(items)} | {"batch": items}
    inputs, res = {}, {"stop_ids": np.asarray(sorted(stop))}
    for case, batch in cases.items():
        arrays = cap.model_inputs(batch)
        inputs.update({f"{case}.{k}": arrays[k] for k in keys})
        n = arrays["input_ids"].shape[1]
        res[f"{case}.forced"] = _padded(eng.generate(arrays, STEPS, eos_ids=stop, min_new_tokens=STEPS))
        res[f"{case}.free"] = _padded(cap.generate(batch))
        _, _, logits, pmask, rows, _ = eng.prefill(arrays, STEPS, all_logits=True)
        res[f"{case}.logits"] = _real_logits(logits.asnumpy()[:rows, -n:], arrays["attention_mask"])
        res[f"{case}.vision"] = eng.vision_numpy(arrays["pixel_values_videos"], arrays["video_grid_thw"])
        if model == "qwen3vl":
            res[f"{case}.deepstack"] = eng.deepstack_numpy(arrays["pixel_values_videos"], arrays["video_grid_thw"])
        pos, deltas = eng.rope_index(arrays["input_ids"], arrays["attention_mask"], arrays["video_grid_thw"],
                                     arrays.get("second_per_grid_ts"))
        res[f"{case}.positions"], res[f"{case}.deltas"] = pos, deltas
    # edges, on bs1_0: the prompt exactly at a length bucket and one past one; EOS at the first step;
    # max_new_tokens reached
    arrays = {k: inputs[f"bs1_0.{k}"] for k in keys}
    n = arrays["input_ids"].shape[1]
    for name, lengths in (("at_bucket", (n,)), ("past_bucket", (n - 1, 2 * n))):
        other = type(eng).from_pretrained(model_dir, buckets=Buckets(lengths=lengths))
        _, _, _, pmask, _, _ = other.prefill(arrays, STEPS)
        res[f"edge.{name}.length"] = np.int64(pmask.shape[1])
        res[f"edge.{name}.forced"] = _padded(other.generate(arrays, STEPS, eos_ids=stop, min_new_tokens=STEPS))
    first = int(res["bs1_0.forced"][0, 0])
    res["edge.eos_first"] = _padded(eng.generate(arrays, STEPS, eos_ids={first}))
    res["edge.max_new"] = _padded(eng.generate(arrays, EDGE_NEW, eos_ids=stop), EDGE_NEW)
    batch = {k: inputs[f"batch.{k}"] for k in keys}  # rows stopping at different steps
    res["edge.eos_mid_token"] = np.int64(_staggered_stop(res["batch.forced"]))
    res["edge.eos_mid"] = _padded(eng.generate(batch, STEPS, eos_ids={int(res["edge.eos_mid_token"])}))
    res["edge.penalty"] = _padded(eng.generate(batch, STEPS, eos_ids=stop, min_new_tokens=STEPS,
                                               repetition_penalty=PENALTY))
    res["compile_seconds"] = np.asarray(sorted(eng.stats.compile_seconds.items()), dtype=object).astype(str)
    np.savez(workdir / "inputs.npz", **inputs)
    np.savez(workdir / "compiled.npz", **res)


def _staggered_stop(forced: np.ndarray) -> int:
    """A token that first appears at different steps in different rows (as an EOS, it stops them apart)."""
    for tok in np.unique(forced):
        first = {int(np.argmax(row == tok)) if (row == tok).any() else len(row) for row in forced}
        if len(first) > 1:
            return int(tok)
    raise AssertionError("every row generated the same tokens")


def _cases(inputs: dict) -> dict[str, dict[str, np.ndarray]]:
    out: dict[str, dict[str, np.ndarray]] = {}
    for key, value in inputs.items():
        case, _, name = key.partition(".")
        out.setdefault(case, {})[name] = value
    return out


def run_eager(backend: str, model: str, model_dir: str, workdir: Path) -> None:
    if backend == "mindnlp":
        from captioning_core import runtime

        runtime.import_mindnlp()
        if model == "qwen3vl":
            from captioning_core.models.qwen3_vl import install_mindnlp_workarounds

            install_mindnlp_workarounds()
    elif "mindnlp" in sys.modules:
        raise RuntimeError("the reference side must run on real PyTorch, without mindnlp")
    import torch
    import transformers

    from captioning_core.models.pllava_arch import to_numpy

    name = model
    model = getattr(transformers, REFERENCE[name]).from_pretrained(model_dir, dtype=torch.float32).eval()
    compiled = np.load(workdir / "compiled.npz", allow_pickle=True)
    stop = {int(x) for x in compiled["stop_ids"]}
    cases = _cases(dict(np.load(workdir / "inputs.npz")))
    res = {}
    with torch.no_grad():
        for case, arrays in cases.items():
            kw = {k: torch.tensor(v) for k, v in arrays.items()}
            n = arrays["input_ids"].shape[1]
            forced = model.generate(**kw, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False)
            res[f"{case}.forced"] = to_numpy(forced)[:, n:]
            free = to_numpy(model.generate(**kw, max_new_tokens=STEPS, do_sample=False))[:, n:]
            res[f"{case}.free"] = _padded([_trim(r, stop) for r in free])
            res[f"{case}.logits"] = _real_logits(to_numpy(model(**kw).logits), arrays["attention_mask"])
            vis = model.model.visual(kw["pixel_values_videos"], grid_thw=kw["video_grid_thw"])
            if name == "qwen3vl":  # (merged, DeepStack features per deepstack_visual_indexes)
                vis, stack = vis
                res[f"{case}.deepstack"] = np.stack([to_numpy(s) for s in stack]).astype(np.float32)
            res[f"{case}.vision"] = to_numpy(vis).astype(np.float32)
            if backend == "torch":
                if name == "qwen2_5vl":
                    pos, deltas = model.model.get_rope_index(kw["input_ids"], None, kw["video_grid_thw"],
                                                             kw["second_per_grid_ts"], kw["attention_mask"])
                else:
                    pos, deltas = model.model.get_rope_index(kw["input_ids"], None, kw["video_grid_thw"],
                                                             kw["attention_mask"])
                res[f"{case}.positions"], res[f"{case}.deltas"] = to_numpy(pos), to_numpy(deltas).reshape(-1)
        if backend == "torch":
            kw = {k: torch.tensor(v) for k, v in cases["bs1_0"].items()}
            n = cases["bs1_0"]["input_ids"].shape[1]
            first = int(res["bs1_0.forced"][0, 0])
            row = to_numpy(model.generate(**kw, max_new_tokens=STEPS, eos_token_id=first, do_sample=False))[0, n:]
            res["edge.eos_first"] = _padded([_trim(row, {first}) + [first]])  # kept through its first stop
            row = to_numpy(model.generate(**kw, max_new_tokens=EDGE_NEW, do_sample=False))[0, n:]
            res["edge.max_new"] = _padded([row.tolist()[:len(_trim(row, stop)) + 1]], EDGE_NEW)
            kw = {k: torch.tensor(v) for k, v in cases["batch"].items()}
            n = cases["batch"]["input_ids"].shape[1]
            eos = int(compiled["edge.eos_mid_token"])
            rows = to_numpy(model.generate(**kw, max_new_tokens=STEPS, eos_token_id=eos, do_sample=False))[:, n:]
            res["edge.eos_mid"] = _padded([r.tolist()[:len(_trim(r, {eos})) + 1] for r in rows])
            res["edge.penalty"] = to_numpy(model.generate(**kw, max_new_tokens=STEPS, min_new_tokens=STEPS,
                                                          repetition_penalty=PENALTY, do_sample=False))[:, n:]
    np.savez(workdir / f"{backend}.npz", **res)


def main(argv: list[str]) -> int:
    backend, model, model_dir, workdir, *clips = argv
    if model not in REFERENCE:
        raise SystemExit(f"model must be one of {sorted(REFERENCE)}, got {model!r}")
    if backend == "compiled":
        run_compiled(model, model_dir, Path(workdir), clips)
    elif backend in ("mindnlp", "torch"):
        run_eager(backend, model, model_dir, Path(workdir))
    else:
        raise SystemExit(f"backend must be compiled, mindnlp or torch, got {backend!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
