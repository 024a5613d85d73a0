"""PLLaVA checkpoints: PLLaVA's published parameter names, both layouts, exact loading, loud failures.

Runs under real PyTorch in the test process (the network module is written against the ``torch`` namespace);
tests/test_pllava_model.py loads the same kind of checkpoint (testkit/pllava_checkpoints.py) under mindnlp.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from testkit.pllava_checkpoints import LORA_RANK, build_model, randomise, save_released

# PLLaVA's names (notes MODELS.md A.2) for a 2-layer CLIP tower and a 1-layer Llama, released layout.
VISION_LAYER = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "layer_norm1",
                "mlp.fc1", "mlp.fc2", "layer_norm2"]
LM_LAYER = ["self_attn.q_proj.base_layer.weight", "self_attn.q_proj.lora_A.default.weight",
            "self_attn.q_proj.lora_B.default.weight", "self_attn.k_proj.weight",
            "self_attn.v_proj.base_layer.weight", "self_attn.v_proj.lora_A.default.weight",
            "self_attn.v_proj.lora_B.default.weight", "self_attn.o_proj.weight", "mlp.gate_proj.weight",
            "mlp.up_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight"]


def released_names(vision_layers: int = 2, lm_layers: int = 1) -> set[str]:
    vt, lm = "vision_tower.vision_model.", "language_model.base_model.model."
    names = {vt + "embeddings.class_embedding", vt + "embeddings.patch_embedding.weight",
             vt + "embeddings.position_embedding.weight"}
    names |= {f"{vt}{m}.{p}" for m in ("pre_layrnorm", "post_layernorm") for p in ("weight", "bias")}
    names |= {f"{vt}encoder.layers.{i}.{m}.{p}" for i in range(vision_layers) for m in VISION_LAYER
              for p in ("weight", "bias")}
    names |= {f"multi_modal_projector.linear_{i}.{p}" for i in (1, 2) for p in ("weight", "bias")}
    names |= {lm + "model.embed_tokens.weight", lm + "model.norm.weight", lm + "lm_head.weight"}
    names |= {f"{lm}model.layers.{i}.{k}" for i in range(lm_layers) for k in LM_LAYER}
    return names


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    directory = tmp_path_factory.mktemp("released")
    _, model = save_released(directory)
    return directory, {k: v.clone() for k, v in model.state_dict().items()}


def fresh(directory: Path):
    from captioning_core.models.pllava_arch import PllavaConfig, PllavaModel

    return PllavaModel(PllavaConfig.from_model_dir(str(directory)))


def assert_same(model, reference: dict) -> None:
    import torch

    state = model.state_dict()
    assert set(state) == set(reference)
    for key, value in reference.items():
        assert torch.equal(state[key], value), key


def test_released_layout_has_pllavas_published_names(released):
    directory, state = released
    assert set(state) == released_names()
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == released_names()
    shards = sorted(set(index["weight_map"].values()))
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    assert len(shards) >= 3
    config = json.loads((directory / "config.json").read_text())
    assert config["model_type"] == "llava" and config["architectures"] == ["PllavaForConditionalGeneration"]
    assert config["pooling_shape"] == [2, 1, 1] and config["register"] is False


def test_released_layout_loads_every_key_with_lora(released):
    from captioning_core.models.pllava_weights import load_weights

    directory, state = released
    model = fresh(directory)
    report = load_weights(model, str(directory), use_lora=True, lora_alpha=32)
    assert (report.lora_rank, report.lora_modules, len(report.files)) == (LORA_RANK, 2, len(set(
        json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"].values())))
    assert_same(model, state)  # every tensor, LoRA A/B included, arrived where PLLaVA's names say
    lora = model.language_model.base_model.model.model.layers[0].self_attn.q_proj
    assert lora.scaling["default"] == 32 / LORA_RANK


def test_without_use_lora_the_base_weights_load_and_lora_is_reported(released, caplog):
    import torch

    from captioning_core.models.pllava_weights import load_weights

    directory, state = released
    model = fresh(directory)
    with caplog.at_level(logging.WARNING):
        report = load_weights(model, str(directory))
    assert report.lora_ignored == 4 and report.lora_rank is None
    assert "not applied without --use_lora" in caplog.text
    q = model.state_dict()["language_model.model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(q, state["language_model.base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"])


def test_plain_layout_and_weight_dir_on_top(tmp_path):
    from captioning_core.models.pllava_weights import load_weights, save_checkpoint

    config, base = build_model(seed=1)
    randomise(base, 1)
    (tmp_path / "base").mkdir()
    save_checkpoint(base.state_dict(), str(tmp_path / "base"))
    (tmp_path / "base" / "config.json").write_text(json.dumps(config.to_dict()))
    assert (tmp_path / "base" / "model.safetensors").exists()
    model = fresh(tmp_path / "base")
    assert load_weights(model, str(tmp_path / "base")).files[0].endswith("model.safetensors")
    assert_same(model, base.state_dict())

    _, adapted = save_released(tmp_path / "lora", seed=2)  # a full released checkpoint as --weight_dir
    model = fresh(tmp_path / "base")
    load_weights(model, str(tmp_path / "base"), str(tmp_path / "lora"), use_lora=True)
    assert_same(model, adapted.state_dict())


DAMAGE = {  # what is done to the checkpoint -> what the error must say
    "extra_key": "1 unexpected: multi_modal_projector.linear_3.weight",
    "missing_key": "1 missing: vision_tower.vision_model.post_layernorm.weight",
    "wrong_shape": "1 wrong shape: multi_modal_projector.linear_2.weight",
    "lora_on_k_proj": "PLLaVA applies LoRA only to",
    "stale_index": "names shards",
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_mismatched_checkpoints_fail_loudly(released, tmp_path, damage):
    from safetensors.torch import load_file, save_file

    from captioning_core.models.pllava_weights import CheckpointError, load_weights

    directory = tmp_path / "ckpt"
    shutil.copytree(released[0], directory)
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    key = {"extra_key": "multi_modal_projector.linear_1.weight",
           "missing_key": "vision_tower.vision_model.post_layernorm.weight",
           "wrong_shape": "multi_modal_projector.linear_2.weight",
           "lora_on_k_proj": "language_model.base_model.model.model.layers.0.self_attn.k_proj.weight",
           "stale_index": "multi_modal_projector.linear_1.weight"}[damage]
    shard = directory / index["weight_map"][key]
    tensors = load_file(str(shard))
    if damage == "extra_key":
        tensors["multi_modal_projector.linear_3.weight"] = tensors[key].clone()
        index["weight_map"]["multi_modal_projector.linear_3.weight"] = shard.name
    elif damage == "missing_key":
        del tensors[key], index["weight_map"][key]
    elif damage == "wrong_shape":
        tensors[key] = tensors[key][:1].clone()
    elif damage == "lora_on_k_proj":
        tensors[key.replace(".weight", ".lora_A.default.weight")] = tensors[key][:LORA_RANK].clone()
        tensors[key.replace(".weight", ".lora_B.default.weight")] = tensors[key][:, :LORA_RANK].contiguous()
    else:
        (directory / "model-00009-of-00009.safetensors").write_bytes(shard.read_bytes())
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=DAMAGE[damage]):
        load_weights(fresh(released[0]), str(directory), use_lora=True)


def test_use_lora_without_lora_weights_fails(tmp_path):
    from captioning_core.models.pllava_weights import CheckpointError, load_weights, save_checkpoint

    config, model = build_model()
    save_checkpoint(model.state_dict(), str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    with pytest.raises(CheckpointError, match="no lora_A/lora_B weights"):
        load_weights(fresh(tmp_path), str(tmp_path), use_lora=True)


def test_key_classification():
    from captioning_core.models.pllava_weights import classify

    assert classify("language_model.base_model.model.model.layers.3.self_attn.v_proj.base_layer.weight") == (
        "base", "language_model.model.layers.3.self_attn.v_proj.weight")
    assert classify("language_model.base_model.model.lm_head.weight") == ("base", "language_model.lm_head.weight")
    assert classify("language_model.base_model.model.model.layers.3.self_attn.q_proj.lora_B.default.weight") == (
        "lora", "language_model.model.layers.3.self_attn.q_proj.lora_B")
    assert classify("vision_tower.vision_model.embeddings.position_ids")[0] == "stale"
    assert classify("multi_modal_projector.linear_1.bias") == ("base", "multi_modal_projector.linear_1.bias")


def test_tiny_models_ship_in_both_layouts():
    """The trained tiny model (plain) and its LoRA checkpoint (released layout) load with nothing unmatched."""
    from captioning_core.models.pllava_weights import load_weights, read_keys

    root = Path(__file__).resolve().parents[1] / "tiny_models"
    keys = read_keys(str(root / "pllava-lora"))
    assert len(keys.files) >= 2 and (root / "pllava-lora" / "model.safetensors.index.json").exists()
    assert any(k.key.startswith("language_model.base_model.model.") for k in keys.base.values())
    model = fresh(root / "pllava")
    report = load_weights(model, str(root / "pllava"), str(root / "pllava-lora"), use_lora=True)
    assert report.lora_modules == 4 and not report.stale
    size = sum(p.stat().st_size for d in ("pllava", "pllava-lora") for p in (root / d).iterdir())
    assert size < 5 * 2**20
