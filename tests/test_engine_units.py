"""Host-side pieces of the compiled engine: the safetensors reader (single file, sharded index, bfloat16, both
checkpoint name layouts), shape buckets, the vision grid packing, Qwen3-VL's interleaved M-RoPE axes and split
video grids, and the device choice."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from captioning_core.engine import buckets, device
from captioning_core.engine.checkpoint import Checkpoint, Loader
from captioning_core.engine.qwen2vl_vision import pack
from captioning_core.engine.rope import frame_segments, interleaved_axes, split_video_grids, vision_positions

TINY = Path(__file__).resolve().parents[1] / "tiny_models" / "qwen2vl"


def _write(path: Path, tensors: dict[str, tuple[str, list[int], bytes]]) -> None:
    header, blob = {}, b""
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(blob), len(blob) + len(data)]}
        blob += data
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + blob)


def test_sharded_index_reads_the_same_tensors_as_the_single_file(tmp_path):
    single = Checkpoint(str(TINY))
    names = single.names()
    shards = {}
    for i, half in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        _write(tmp_path / fname, {n: ("F32", list(single.get(n).shape), single.get(n).tobytes()) for n in half})
        shards.update({n: fname for n in half})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": shards}))
    sharded = Checkpoint(str(tmp_path))
    assert sharded.names() == names
    for n in names:
        assert np.array_equal(sharded.get(n), single.get(n)), n


def test_bfloat16_is_widened_exactly_and_new_layout_names_resolve(tmp_path):
    values = np.array([1.5, -2.0, 0.15625, 2.0 ** 100], np.float32)  # exact in bfloat16
    bf16 = (values.view(np.uint32) >> 16).astype(np.uint16)
    _write(tmp_path / "model.safetensors", {"model.language_model.norm.weight": ("BF16", [4], bf16.tobytes()),
                                            "model.visual.x": ("F32", [4], values.tobytes())})
    ck = Checkpoint(str(tmp_path))
    assert np.array_equal(ck.get("model.language_model.norm.weight"), values)
    load = Loader(ck, "float32")
    assert load.resolve("model.norm.weight") == "model.language_model.norm.weight"
    assert load.resolve("visual.x") == "model.visual.x"
    assert not load.has("lm_head.weight")
    with pytest.raises(KeyError):
        load.resolve("model.embed_tokens.weight")


def test_missing_weights_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        Checkpoint(str(tmp_path))


def test_buckets_are_few_and_cover():
    b = buckets.Buckets()
    series = sorted({b.length(n) for n in range(1, 5000)})
    assert len(series) <= 22 and series[0] == 32
    assert all(b.length(n) >= n for n in range(1, 5000))
    assert all(b.length(n) <= max(32, 1.25 * n + 16) for n in range(1, 5000))  # padding under ~a quarter
    assert b.length(48) == 48 and b.length(49) == 64
    assert buckets.Buckets(lengths=(101,)).length(101) == 101
    assert buckets.Buckets(lengths=(100, 202)).length(101) == 202
    assert [b.batch(n) for n in (1, 2, 3, 5, 8, 9, 32)] == [1, 2, 4, 8, 8, 16, 32]
    assert all(b.patches(n) % 4 == 0 for n in range(1, 3000))  # a 2x2 merge group never straddles groups


def test_pack_places_each_temporal_group_in_its_own_row():
    grid = np.array([[2, 4, 4], [1, 2, 6]])
    n = int((grid[:, 0] * grid[:, 1] * grid[:, 2]).sum())
    pixels = np.arange(n, dtype=np.float32).reshape(n, 1).repeat(3, 1)
    pix, ang, valid, rows = pack(pixels, grid, head_dim=8, merge=2, groups=4, size=16)
    assert valid.sum(1).tolist() == [16, 16, 12, 0]
    assert pix[:16, 0].tolist() == list(range(16)) and pix[16:32, 0].tolist() == list(range(16, 32))
    assert pix[32:44, 0].tolist() == list(range(32, 44)) and not pix[44:].any()
    assert rows.tolist() == list(range(4)) + list(range(4, 8)) + list(range(8, 11))  # merged rows: 4 per group
    seg = frame_segments(grid)
    assert np.bincount(seg).tolist() == [16, 16, 12]
    assert vision_positions(grid, 2).shape == (n, 2)


def test_device_choice_cpu_is_validated():
    c = device.choose()
    assert (c.target, c.dtype, c.jit_level, c.attention) == ("CPU", "float32", "O0", "matmul")
    with pytest.raises(ValueError, match="target"):
        device.DeviceChoice(target="GPU")
    with pytest.raises(ValueError, match="dtype"):
        device.DeviceChoice(dtype="int8")
    with pytest.raises(ValueError, match="not implemented"):
        device.DeviceChoice(attention="flash")


@pytest.mark.parametrize("section, frequencies", [([24, 20, 20], 64), ([2, 3, 3], 8), ([16, 24, 24], 64)])
def test_interleaved_axes_are_transformers_qwen3_vl_choice(section, frequencies):
    """Per frequency, the axis transformers' ``apply_interleaved_mrope`` takes (real PyTorch: it clamps a slice
    stop past the last frequency, as the tiny model's [2, 3, 3] needs)."""
    torch = pytest.importorskip("torch")
    if not hasattr(torch, "__version__") or "mindnlp" in sys.modules:
        pytest.skip("needs real PyTorch")
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

    freqs = torch.arange(3, dtype=torch.float32).reshape(3, 1, 1, 1).expand(3, 1, 1, frequencies).clone()
    chosen = Qwen3VLTextRotaryEmbedding.apply_interleaved_mrope(None, freqs, section)
    axes = interleaved_axes(section, frequencies)
    assert chosen.reshape(-1).long().tolist() == axes.tolist()
    assert set(axes.tolist()) == {0, 1, 2}


def test_split_video_grids_gives_one_grid_per_temporal_group():
    grids = split_video_grids(np.array([[3, 4, 6], [1, 2, 2]]))
    assert grids.tolist() == [[1, 4, 6]] * 3 + [[1, 2, 2]]
    assert split_video_grids(None) is None
