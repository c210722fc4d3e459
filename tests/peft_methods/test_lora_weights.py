"""Adapter config and weights in PEFT format, checked against real peft.

Adapters are made by `peft.get_peft_model` on a tiny LlamaForCausalLM (fp64,
hidden 64, 2 layers) with random non-zero B. Expected ranks and scalings come
from peft's own LoRA layers; the save round trip is judged by the logits of
`peft.PeftModel.from_pretrained` on our output.
"""
import copy
import json
import os

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.utils.other import get_pattern_key as peft_get_pattern_key
from safetensors.torch import save_file

from peft_methods.lora.config import LoRAAdapterConfig, get_pattern_key
from peft_methods.lora.weights import AdapterLoadError, LoRAAdapter, load_adapter, save_adapter
from tests.helpers import make_peft_adapter, tiny_hf_llama

PEFT_SETTINGS = {
    "q_v": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "all_linear_patterns": dict(
        r=4, lora_alpha=16, target_modules="all-linear",
        rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 6},
        alpha_pattern={"v_proj": 3, "layers.0.mlp.up_proj": 5},
    ),
    "regex_rslora": dict(
        r=3, lora_alpha=6, target_modules=r".*\.(k_proj|o_proj|gate_proj)", use_rslora=True,
        rank_pattern={"gate_proj": 5},
    ),
}


@pytest.fixture(scope="module")
def base():
    return tiny_hf_llama()


@pytest.fixture(scope="module")
def input_ids():
    return torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("setting", list(PEFT_SETTINGS))
def test_load_matches_peft(base, tmp_path, setting):
    peft_model = make_peft_adapter(base, tmp_path, seed=1, **PEFT_SETTINGS[setting])
    adapter = load_adapter(tmp_path)
    peft_layers = {
        name.removeprefix("base_model.model."): m
        for name, m in peft_model.named_modules() if isinstance(m, LoraLayer)
    }
    assert set(adapter.weights) == set(peft_layers)
    for name, layer in peft_layers.items():
        lora_a, lora_b = adapter.weights[name]
        torch.testing.assert_close(lora_a, layer.lora_A["default"].weight, rtol=0, atol=0)
        torch.testing.assert_close(lora_b, layer.lora_B["default"].weight, rtol=0, atol=0)
        assert adapter.config.rank_for(name) == layer.r["default"]
        assert adapter.config.scaling_for(name) == pytest.approx(layer.scaling["default"], rel=1e-15)
    # is_target agrees with peft on every Linear of the model, lm_head included.
    linear_names = [n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)]
    assert {n for n in linear_names if adapter.config.is_target(n)} == set(peft_layers)


@pytest.mark.parametrize("setting", list(PEFT_SETTINGS))
def test_saved_adapter_loads_in_peft_with_same_logits(base, tmp_path, input_ids, setting):
    peft_model = make_peft_adapter(base, tmp_path / "orig", seed=2, **PEFT_SETTINGS[setting])
    save_adapter(load_adapter(tmp_path / "orig"), tmp_path / "ours")
    assert sorted(os.listdir(tmp_path / "ours")) == ["adapter_config.json", "adapter_model.safetensors"]
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    with torch.no_grad():
        expected = peft_model(input_ids).logits
        got = reloaded(input_ids).logits
        base_logits = base(input_ids).logits
    assert not torch.allclose(expected, base_logits, atol=1e-6)  # the adapter does something
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_in_memory_adapter_saves_and_reloads(tmp_path):
    config = LoRAAdapterConfig(r=2, lora_alpha=4, target_modules="all-linear", rank_pattern={"k_proj": 3})
    weights = {
        "model.layers.0.self_attn.q_proj": (torch.randn(2, 64), torch.randn(64, 2)),
        "model.layers.0.self_attn.k_proj": (torch.randn(3, 64), torch.randn(32, 3)),
    }
    save_adapter(LoRAAdapter(config, weights), tmp_path)
    loaded = load_adapter(tmp_path)
    assert loaded.config.target_modules == "all-linear" and loaded.config.rank_pattern == {"k_proj": 3}
    for name, (a, b) in weights.items():
        torch.testing.assert_close(loaded.weights[name][0], a, rtol=0, atol=0)
        torch.testing.assert_close(loaded.weights[name][1], b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="does not\\s+target it"):
        bad = LoRAAdapter(LoRAAdapterConfig(r=2, target_modules=["v_proj"]), dict(list(weights.items())[:1]))
        save_adapter(bad, tmp_path / "bad")


def test_bin_file_and_adapter_name_in_keys(tmp_path):
    a, b = torch.randn(2, 8), torch.randn(6, 2)
    write_adapter(tmp_path, {"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"]}, {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight": a,
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight": b,
    }, use_bin=True)
    adapter = load_adapter(tmp_path)
    assert list(adapter.weights) == ["model.layers.0.self_attn.q_proj"]
    assert torch.equal(adapter.weights["model.layers.0.self_attn.q_proj"][0], a)


def test_get_pattern_key_matches_peft():
    keys = ["q_proj", "layers.1.mlp.down_proj", "0.self_attn.v_proj", r"layers\.[01]\.mlp\.up_proj"]
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.layers.0.mlp.down_proj",
             "model.layers.0.self_attn.v_proj", "model.layers.10.self_attn.v_proj",
             "model.layers.1.mlp.up_proj", "model.layers.11.mlp.up_proj"]
    for name in names:
        assert get_pattern_key(keys, name) == peft_get_pattern_key(keys, name)


# ---- bad files and bad configs ---------------------------------------------------------------

GOOD_CONFIG = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}
MODULE = "base_model.model.model.layers.0.self_attn.q_proj"


def write_adapter(path, config, tensors, use_bin=False):
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps(config))
    if use_bin:
        torch.save(tensors, path / "adapter_model.bin")
    else:
        save_file(tensors, path / "adapter_model.safetensors")


def good_tensors():
    return {f"{MODULE}.lora_A.weight": torch.randn(2, 8), f"{MODULE}.lora_B.weight": torch.randn(6, 2)}


def test_missing_directory_and_files(tmp_path):
    with pytest.raises(AdapterLoadError, match="adapter directory not found"):
        load_adapter(tmp_path / "nope")
    tmp_path.joinpath("empty").mkdir()
    with pytest.raises(AdapterLoadError, match="adapter_config.json: missing"):
        load_adapter(tmp_path / "empty")
    (tmp_path / "empty" / "adapter_config.json").write_text(json.dumps(GOOD_CONFIG))
    with pytest.raises(AdapterLoadError, match="neither adapter_model.safetensors nor adapter_model.bin"):
        load_adapter(tmp_path / "empty")


def test_malformed_json(tmp_path):
    write_adapter(tmp_path, GOOD_CONFIG, good_tensors())
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterLoadError, match="adapter_config.json.*malformed JSON"):
        load_adapter(tmp_path)


def test_corrupt_safetensors(tmp_path):
    write_adapter(tmp_path, GOOD_CONFIG, good_tensors())
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x07garbage" * 10)
    with pytest.raises(AdapterLoadError, match="adapter_model.safetensors: corrupt"):
        load_adapter(tmp_path)


@pytest.mark.parametrize("tensors, message", [
    ({f"{MODULE}.lora_A.weight": torch.randn(2, 8)}, "q_proj has no lora_B"),
    ({f"{MODULE}.lora_A.weight": torch.randn(2, 8), f"{MODULE}.lora_B.weight": torch.randn(6, 3)},
     "q_proj shape mismatch"),
    ({f"{MODULE}.lora_A.weight": torch.randn(3, 8), f"{MODULE}.lora_B.weight": torch.randn(6, 3)},
     "q_proj has rank 3 but the config"),
    ({**good_tensors(), "base_model.model.model.embed_tokens.lora_embedding_A": torch.randn(2, 8)},
     "unsupported tensor"),
])
def test_bad_tensors(tmp_path, tensors, message):
    write_adapter(tmp_path, GOOD_CONFIG, tensors)
    with pytest.raises(AdapterLoadError, match=message):
        load_adapter(tmp_path)


@pytest.mark.parametrize("change, message", [
    ({"peft_type": "IA3"}, "peft_type must be 'LORA'"),
    ({"use_dora": True}, "DoRA"),
    ({"fan_in_fan_out": True}, "fan_in_fan_out"),
    ({"bias": "all"}, "bias='all'"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"r": 0}, "rank r must be a positive integer"),
    ({"rank_pattern": {"q_proj": -1}}, "rank_pattern"),
])
def test_bad_config(tmp_path, change, message):
    write_adapter(tmp_path, {**GOOD_CONFIG, **change}, good_tensors())
    with pytest.raises(AdapterLoadError, match=message):
        load_adapter(tmp_path)
    with pytest.raises(ValueError, match=message):
        LoRAAdapterConfig.from_dict({**GOOD_CONFIG, **change})
