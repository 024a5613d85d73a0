"""The compiled Qwen3-VL engine (captioning_core.engine.qwen3vl) against eager mindnlp (with the captioner's
mindnlp workarounds) and against transformers on real PyTorch: the same tiny weights and prepared inputs (the
production ``prepare``/``model_inputs`` of the standard clips, timestamped prompts included), fp32, each side in
its own process (testkit/engine_parity.py), as tests/test_engine_qwen2vl.py does for Qwen2-VL.

Cases: each standard clip alone (bs 1) and all eight as one left-padded batch. Besides the merged vision tokens
the DeepStack features (the vision tower's second output) are compared too: they reach the logits only through
the first decoder layers' hidden states. Measured on this machine vs PyTorch: prefill logits within 6.5e-5,
vision tokens within 1.3e-5, DeepStack features within 3.3e-7; greedy tokens equal on every row.
"""

from __future__ import annotations

import numpy as np
import pytest

from testkit.engine_parity import BOUND, CASES, run_sides, tokens_differ

pytestmark = [pytest.mark.integration, pytest.mark.engine]

MODEL = "qwen3vl"


@pytest.fixture(scope="module")
def sides(standard_clips, tmp_path_factory) -> dict[str, dict[str, np.ndarray]]:
    workdir = tmp_path_factory.mktemp(f"engine_parity_{MODEL}")
    run_sides(["compiled"], MODEL, workdir, [path for path, _ in standard_clips])  # writes the shared inputs
    run_sides(["torch", "mindnlp"], MODEL, workdir)
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
def test_prefill_logits_vision_and_deepstack_features_within_1e_4(sides, ref):
    for case in CASES:
        for kind in ("logits", "vision", "deepstack"):
            a, b = sides["compiled"][f"{case}.{kind}"], sides[ref][f"{case}.{kind}"]
            assert a.shape == b.shape, (case, kind, a.shape, b.shape)
            diff = float(np.abs(a - b).max())
            assert diff <= BOUND, f"{case} {kind}: max |diff| vs {ref} {diff:.2e} > {BOUND:.0e}"
    assert sides["compiled"]["bs1_0.deepstack"].shape[0] == 1  # the tiny model's deepstack_visual_indexes [0]


def test_host_rope_index_equals_transformers(sides):
    for case in CASES:
        assert sides["compiled"][f"{case}.positions"].tolist() == sides["torch"][f"{case}.positions"].tolist()
        assert sides["compiled"][f"{case}.deltas"].tolist() == sides["torch"][f"{case}.deltas"].tolist()
    # the interleaved height/width ids really differ from the temporal ones (a video's grid is 2-D per group)
    pos = sides["compiled"]["bs1_0.positions"]
    assert not (pos[1] == pos[0]).all() and not (pos[2] == pos[0]).all()


def test_edges_bucket_boundary_eos_penalty_and_max_new_tokens(sides):
    mine, ref = sides["compiled"], sides["torch"]
    assert int(mine["edge.past_bucket.length"]) == 2 * int(mine["edge.at_bucket.length"])
    for name in ("at_bucket", "past_bucket"):
        assert mine[f"edge.{name}.forced"].tolist() == ref["bs1_0.forced"].tolist(), name
    assert (mine["edge.eos_first"] >= 0).sum() == 1
    assert mine["edge.eos_first"].tolist() == ref["edge.eos_first"].tolist()
    stopped = (mine["edge.eos_mid"] >= 0).sum(1)
    assert len(set(stopped.tolist())) > 1, stopped
    assert mine["edge.eos_mid"].tolist() == ref["edge.eos_mid"].tolist()
    assert mine["edge.penalty"].tolist() == ref["edge.penalty"].tolist()
    assert mine["edge.penalty"].tolist() != mine["batch.forced"].tolist()
    assert mine["edge.max_new"].shape == (1, 5) and (mine["edge.max_new"] >= 0).all()
    assert mine["edge.max_new"].tolist() == ref["edge.max_new"].tolist()
