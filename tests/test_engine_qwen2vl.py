"""The compiled Qwen2-VL / Qwen2.5-VL engine (captioning_core.engine) against eager mindnlp and against transformers on real
PyTorch: same tiny weights, the same prepared inputs (the production ``prepare``/``model_inputs`` output of the
standard clips), fp32, each side in its own process (testkit/engine_parity.py; mindnlp replaces ``torch`` in
the process that imports it, and the compiled side imports neither).

Cases: each standard clip alone (bs 1) and all eight as one left-padded batch (prompts of 45 to 921 tokens).
Measured on this machine: prefill logits within 3.3e-5 of PyTorch's, vision tokens within 1.2e-5; greedy tokens
equal on every row. The 1e-4 bound leaves room for other CPUs' kernels, not for a wrong op.
"""

from __future__ import annotations

import numpy as np
import pytest

from testkit.engine_parity import BOUND, CASES, run_sides, tokens_differ

pytestmark = [pytest.mark.integration, pytest.mark.engine]



@pytest.fixture(scope="module", params=["qwen2vl", "qwen2_5vl"])
def sides(request, standard_clips, tmp_path_factory) -> dict[str, dict[str, np.ndarray]]:
    model = request.param
    workdir = tmp_path_factory.mktemp(f"engine_parity_{model}")
    run_sides(["compiled"], model, workdir, [path for path, _ in standard_clips])  # writes the shared inputs
    run_sides(["torch", "mindnlp"], model, workdir)
    return {name: dict(np.load(workdir / f"{name}.npz", allow_pickle=True))
            for name in ("compiled", "torch", "mindnlp")}


@pytest.mark.parametrize("ref", ["torch", "mindnlp"])
def test_every_greedy_token_equals_the_eager_engines(sides, ref):
    mine, theirs = sides["compiled"], sides[ref]
    assert mine["batch.forced"].shape == (8, 32)
    for case in CASES:
        for kind in ("forced", "free"):  # forced: 32 steps with EOS suppressed; free: as the captioner trims
            bad = tokens_differ(mine[f"{case}.{kind}"], theirs[f"{case}.{kind}"])
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
