"""The compiled Qwen2-VL / Qwen2.5-VL engine (captioning_core.engine) against eager mindnlp and against transformers on real
PyTorch: same tiny weights, the same prepared inputs (the production ``prepare``/``model_inputs`` output of the
standard clips), fp32, each side in its own process (testkit/engine_parity.py; mindnlp replaces ``torch`` in
the process that imports it, and the compiled side imports neither).

Cases: each standard clip alone (bs 1) and all eight as one left-padded batch (prompts of 45 to 921 tokens).
Measured on this machine: prefill logits within 3.3e-5 of PyTorch's, vision tokens within 1.2e-5; greedy tokens
equal on every row. The 1e-4 bound leaves room for other CPUs' kernels, not for a wrong op.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.engine]

REPO = Path(__file__).resolve().parents[1]
BOUND = 1e-4  # fp32, max absolute difference
CASES = [f"bs1_{i}" for i in range(8)] + ["batch"]


def _sides(backends: list[str], model: str, workdir: Path, clips: list[Path] = ()) -> None:
    """Run each backend's side in its own process, side by side (one thread each), and wait for all."""
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


@pytest.fixture(scope="module", params=["qwen2vl", "qwen2_5vl"])
def sides(request, standard_clips, tmp_path_factory) -> dict[str, dict[str, np.ndarray]]:
    model = request.param
    workdir = tmp_path_factory.mktemp(f"engine_parity_{model}")
    _sides(["compiled"], model, workdir, [path for path, _ in standard_clips])  # writes the shared inputs
    _sides(["torch", "mindnlp"], model, workdir)
    return {name: dict(np.load(workdir / f"{name}.npz", allow_pickle=True))
            for name in ("compiled", "torch", "mindnlp")}


def _tokens_differ(a: np.ndarray, b: np.ndarray) -> list[int]:
    assert a.shape == b.shape, (a.shape, b.shape)
    return [i for i in range(len(a)) if not (a[i] == b[i]).all()]


@pytest.mark.parametrize("ref", ["torch", "mindnlp"])
def test_every_greedy_token_equals_the_eager_engines(sides, ref):
    mine, theirs = sides["compiled"], sides[ref]
    assert mine["batch.forced"].shape == (8, 32)
    for case in CASES:
        for kind in ("forced", "free"):  # forced: 32 steps with EOS suppressed; free: as the captioner trims
            bad = _tokens_differ(mine[f"{case}.{kind}"], theirs[f"{case}.{kind}"])
            assert not bad, f"{case} {kind}: rows {bad} differ from {ref}"
    lengths = sides["torch"]["batch.deltas"]  # the batch really is left-padded to different lengths
    assert len(set(np.asarray(lengths).tolist())) > 1


@pytest.mark.parametrize("ref", ["torch", "mindnlp"])
def test_prefill_logits_and_vision_tokens_within_1e_4(sides, ref):
    for case in CASES:
        for kind in ("logits", "vision"):
            a, b = sides["compiled"][f"{case}.{kind}"], sides[ref][f"{case}.{kind}"]
            assert a.shape == b.shape, (case, kind, a.shape, b.shape)
            diff = float(np.abs(a - b).max())
            assert diff <= BOUND, f"{case} {kind}: max |diff| vs {ref} {diff:.2e} > {BOUND:.0e}"


def test_host_rope_index_equals_transformers(sides):
    for case in CASES:
        assert sides["compiled"][f"{case}.positions"].tolist() == sides["torch"][f"{case}.positions"].tolist()
        assert sides["compiled"][f"{case}.deltas"].tolist() == sides["torch"][f"{case}.deltas"].tolist()


def test_edges_bucket_boundary_eos_penalty_and_max_new_tokens(sides):
    mine, ref = sides["compiled"], sides["torch"]
    # exactly at a length bucket (no padding added) and one past one (padded to the next: 2x the prompt)
    assert int(mine["edge.past_bucket.length"]) == 2 * int(mine["edge.at_bucket.length"])
    for name in ("at_bucket", "past_bucket"):
        assert mine[f"edge.{name}.forced"].tolist() == ref["bs1_0.forced"].tolist(), name
    # EOS at the first step: one token, the stop itself (the captioner's trim then leaves an empty caption)
    assert (mine["edge.eos_first"] >= 0).sum() == 1
    assert mine["edge.eos_first"].tolist() == ref["edge.eos_first"].tolist()
    # rows of one batch stopping at different steps
    stopped = (mine["edge.eos_mid"] >= 0).sum(1)
    assert len(set(stopped.tolist())) > 1, stopped
    assert mine["edge.eos_mid"].tolist() == ref["edge.eos_mid"].tolist()
    # a repetition penalty (transformers' processor), which changes the tiny model's repeating captions
    assert mine["edge.penalty"].tolist() == ref["edge.penalty"].tolist()
    assert mine["edge.penalty"].tolist() != mine["batch.forced"].tolist()
    # max_new_tokens reached
    assert mine["edge.max_new"].shape == (1, 5) and (mine["edge.max_new"] >= 0).all()
    assert mine["edge.max_new"].tolist() == ref["edge.max_new"].tolist()


def test_each_graph_compiles_in_seconds(sides):
    seconds = {k: float(v) for k, v in sides["compiled"]["compile_seconds"]}
    assert any(k.startswith("decode/8/") for k in seconds) and any(k.startswith("vision/") for k in seconds)
    assert max(seconds.values()) < 60, seconds
