"""The Qwen3-VL workarounds for mindnlp 0.5.1 (interleaved M-RoPE, deepstack merge): each equal to transformers'
function on real PyTorch, and each runs under mindnlp, where transformers' own raises in mindtorch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from captioning_core.models.qwen3_vl import deepstack_process, interleaved_mrope

REPO = Path(__file__).resolve().parents[1]
# (mrope_section, head_dim // 2): the tiny model's (stop 9 > 8), the released one (in range), one whose stop runs
# past 64, and one in range with a stop not on the step grid
SECTIONS = [([2, 3, 3], 8), ([24, 20, 20], 64), ([16, 24, 24], 64), ([4, 2, 2], 8)]


def _reference(freqs: np.ndarray, section: list[int]) -> np.ndarray:
    """What the interleaving means, in numpy: frequency i comes from H if i % 3 == 1 and i < 3*section[1],
    from W if i % 3 == 2 and i < 3*section[2], else from T."""
    out = freqs[0].copy()
    for i in range(freqs.shape[-1]):
        for dim in (1, 2):
            if i % 3 == dim and i < 3 * section[dim]:
                out[..., i] = freqs[dim, ..., i]
    return out


@pytest.mark.parametrize("section,half", SECTIONS)
def test_equals_transformers_on_pytorch(section, half):
    import torch
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

    original = Qwen3VLTextRotaryEmbedding.apply_interleaved_mrope
    assert original is not interleaved_mrope, "transformers' function is patched in this process"
    freqs = torch.randn(3, 2, 37, half, generator=torch.Generator().manual_seed(half))
    ref = original(None, freqs.clone(), section)  # it writes into freqs[0]: give it a copy
    ours = interleaved_mrope(None, freqs, section)
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    assert torch.equal(ours, ref)
    assert np.array_equal(ours.numpy(), _reference(freqs.numpy(), section))


def _deepstack_inputs():
    rng = np.random.default_rng(7)
    hidden = rng.standard_normal((2, 11, 8)).astype(np.float32)
    mask = rng.random((2, 11)) < 0.5
    embeds = rng.standard_normal((int(mask.sum()), 8)).astype(np.float32)
    expected = hidden.copy()
    expected[mask] += embeds
    return hidden, mask, embeds, expected


def test_deepstack_equals_transformers_on_pytorch():
    import torch
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextModel

    original = Qwen3VLTextModel._deepstack_process
    assert original is not deepstack_process, "transformers' function is patched in this process"
    hidden, mask, embeds, expected = _deepstack_inputs()
    args = (torch.from_numpy(mask), torch.from_numpy(embeds))
    ref = original(None, torch.from_numpy(hidden.copy()), *args)  # in place: give it a copy
    ours = deepstack_process(None, torch.from_numpy(hidden), *args)
    assert torch.equal(ours, ref)
    assert np.array_equal(ours.numpy(), expected)


MINDNLP_SIDE = r"""
import json, sys
import mindspore; mindspore.set_device("CPU")
import mindnlp  # noqa: F401  (torch is mindtorch from here on)
import numpy as np, torch
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding
from captioning_core.models.qwen3_vl import deepstack_process, interleaved_mrope
report = {}
for section, half in json.loads(sys.argv[1]):
    freqs = np.random.default_rng(half).standard_normal((3, 2, 37, half)).astype(np.float32)
    row = {"ours": interleaved_mrope(None, torch.tensor(freqs), section).numpy().tolist()}
    try:
        row["original"] = Qwen3VLTextRotaryEmbedding.apply_interleaved_mrope(None, torch.tensor(freqs), section).numpy().tolist()
    except Exception as err:
        row["original_error"] = f"{type(err).__name__}: {str(err).splitlines()[0]}"
    report[f"{section}/{half}"] = row
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextModel
from captioning_core.models.qwen3_vl import deepstack_process
rng = np.random.default_rng(7)
hidden = rng.standard_normal((2, 11, 8)).astype(np.float32)
mask = rng.random((2, 11)) < 0.5
embeds = rng.standard_normal((int(mask.sum()), 8)).astype(np.float32)
row = {"ours": deepstack_process(None, torch.tensor(hidden), torch.tensor(mask), torch.tensor(embeds)).numpy().tolist()}
try:
    Qwen3VLTextModel._deepstack_process(None, torch.tensor(hidden), torch.tensor(mask), torch.tensor(embeds))
    row["original_error"] = None
except Exception as err:
    row["original_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:80]}"
report["deepstack"] = row
print("REPORT " + json.dumps(report))
"""


@pytest.mark.integration
def test_runs_under_mindnlp_where_transformers_function_fails():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "plugins")])}
    proc = subprocess.run([sys.executable, "-c", MINDNLP_SIDE, json.dumps(SECTIONS)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("REPORT "))
    report = json.loads(line[len("REPORT "):])
    failures = {}
    for section, half in SECTIONS:
        row = report[f"{section}/{half}"]
        freqs = np.random.default_rng(half).standard_normal((3, 2, 37, half)).astype(np.float32)
        assert np.array_equal(np.asarray(row["ours"], np.float32), _reference(freqs, section)), section
        if "original_error" in row:
            failures[str(section)] = row["original_error"]
        else:  # where mindtorch does run transformers' function, both agree
            assert np.array_equal(np.asarray(row["original"], np.float32), _reference(freqs, section)), section
    # The bug the workaround exists for (mindnlp 0.5.1): a strided slice assignment whose stop runs past the
    # last frequency. Released configs ([24, 20, 20] over 64) stay in range. If this starts failing,
    # mindnlp fixed it and the workaround can go.
    assert sorted(failures) == ["[16, 24, 24]", "[2, 3, 3]"], failures
    assert all("BroadcastTo" in err for err in failures.values()), failures
    deep = report["deepstack"]
    assert np.array_equal(np.asarray(deep["ours"], np.float32), _deepstack_inputs()[3])
    assert deep["original_error"] and "Need rank 1 for bool index" in deep["original_error"], deep["original_error"]
