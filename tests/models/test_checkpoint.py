"""Checkpoint resolution, tensor streaming, GGUF conversion and local presets.

Tiny models come from conftest fixtures; the GGUF cache logic is tested with a
fake converter (fast), the real conversion through the SmolLM2 fixture.
"""

import json
import os
import shutil
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

from coserve.models import (
    ResolvedCheckpoint,
    bench_small_config,
    build_tokenizer,
    iter_checkpoint_tensors,
    load_hf_config,
    load_tokenizer,
    resolve_checkpoint,
    tiny_config,
)
from coserve.models import checkpoint as checkpoint_mod
from coserve.models import presets


def _tensors(path):
    return dict(iter_checkpoint_tensors(resolve_checkpoint(path)))


def _expected_shapes(config):
    """Parameter names and shapes HF would save for `config` (built on meta, no memory)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight")  # tied weights are stored once
    return shapes


# --- HF directories -------------------------------------------------------------------


def test_tiny_dir_resolves_and_matches_hf_names(tiny_model_dir):
    resolved = resolve_checkpoint(tiny_model_dir)
    assert resolved.model_dir == tiny_model_dir and resolved.tokenizer_dir == tiny_model_dir
    assert [f.name for f in resolved.weight_files] == ["model.safetensors"]
    config = load_hf_config(resolved)
    tensors = dict(iter_checkpoint_tensors(resolved))
    assert {n: tuple(t.shape) for n, t in tensors.items()} == _expected_shapes(config)
    assert all(t.dtype == torch.float32 for t in tensors.values())
    has_bias = "model.layers.0.self_attn.q_proj.bias" in tensors
    assert has_bias == (config.model_type == "qwen2")


def test_tiny_dir_loads_in_transformers_with_same_tensors(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    state = model.state_dict()
    for name, tensor in _tensors(tiny_llama_dir).items():
        torch.testing.assert_close(tensor, state[name], rtol=0, atol=0)


def test_sharded_dir_yields_same_tensors_as_single(tiny_llama_dir, tiny_llama_sharded_dir):
    resolved = resolve_checkpoint(tiny_llama_sharded_dir)
    assert len(resolved.weight_files) > 1
    assert (tiny_llama_sharded_dir / "model.safetensors.index.json").is_file()
    single, sharded = _tensors(tiny_llama_dir), dict(iter_checkpoint_tensors(resolved))
    assert single.keys() == sharded.keys()
    for name in single:
        torch.testing.assert_close(single[name], sharded[name], rtol=0, atol=0)


def test_llama3_tied_variant(tiny_llama3_tied_dir):
    config = load_hf_config(tiny_llama3_tied_dir)
    assert config.rope_parameters["rope_type"] == "llama3" and config.tie_word_embeddings
    assert "lm_head.weight" not in _tensors(tiny_llama3_tied_dir)


def test_pytorch_bin_fallback(tiny_llama_dir, tmp_path):
    shutil.copy(tiny_llama_dir / "config.json", tmp_path)
    torch.save(_tensors(tiny_llama_dir), tmp_path / "pytorch_model.bin")
    resolved = resolve_checkpoint(tmp_path)
    assert [f.name for f in resolved.weight_files] == ["pytorch_model.bin"]
    assert resolved.tokenizer_dir is None
    assert _tensors(tmp_path).keys() == _tensors(tiny_llama_dir).keys()
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_tokenizer(resolved)


# --- clear errors -----------------------------------------------------------------------


@pytest.mark.parametrize("model_type, arch", [("gpt2", "GPT2LMHeadModel"), ("made_up", "MadeUpForCausalLM")])
def test_unsupported_model_type(tmp_path, model_type, arch):
    if model_type == "gpt2":
        GPT2Config(n_layer=1, n_embd=32, n_head=2, architectures=[arch]).save_pretrained(tmp_path)
    else:
        (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type, "architectures": [arch]}))
    expected = f"unsupported architecture '{arch}' (model_type '{model_type}'); supported: Llama, Mistral, Qwen2"
    with pytest.raises(ValueError) as info:
        load_hf_config(tmp_path)
    assert str(info.value) == expected


def test_missing_path_and_missing_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist: .*nowhere"):
        resolve_checkpoint(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        resolve_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(FileNotFoundError, match=f"no weights in {tmp_path}"):
        resolve_checkpoint(tmp_path)
    (tmp_path / "weights.pt").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf file"):
        resolve_checkpoint(tmp_path / "weights.pt")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_safetensors_names_file(tiny_llama_dir, tmp_path, damage):
    target = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, target)
    weights = target / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(b"\x00garbage" * 10 if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"corrupt .*{weights}"):
        resolve_checkpoint(target)


def test_shard_index_with_missing_shard(tiny_llama_sharded_dir, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(tiny_llama_sharded_dir, target)
    first_shard = resolve_checkpoint(target).weight_files[0]
    first_shard.unlink()
    with pytest.raises(FileNotFoundError, match=first_shard.name):
        resolve_checkpoint(target)


# --- GGUF cache logic (fake converter, fast) ---------------------------------------------


@pytest.fixture
def fake_converter(monkeypatch, tiny_llama_dir):
    calls = []

    def convert(gguf_file, out_dir):
        calls.append(gguf_file)
        if gguf_file.name.startswith("broken"):
            raise ValueError("not a GGUF file")
        shutil.copytree(tiny_llama_dir, out_dir, dirs_exist_ok=True)

    monkeypatch.setattr(checkpoint_mod, "_convert_gguf", convert)
    return calls


def test_gguf_converted_once_and_cached(tmp_path, monkeypatch, fake_converter):
    monkeypatch.setenv("COSERVE_CACHE", str(tmp_path / "cache"))
    models = tmp_path / "models"
    models.mkdir()
    gguf = models / "tiny.gguf"
    gguf.write_bytes(b"GGUF fake")
    first = resolve_checkpoint(gguf)
    assert first.model_dir.parent == tmp_path / "cache" / "gguf"
    assert first.model_dir.name.startswith(f"tiny-{gguf.stat().st_size}-")
    assert first.source == gguf and first.tokenizer_dir == first.model_dir
    assert resolve_checkpoint(gguf) == first
    assert resolve_checkpoint(models).model_dir == first.model_dir  # directory with one .gguf
    assert len(fake_converter) == 1
    assert [p.name for p in first.model_dir.parent.iterdir()] == [first.model_dir.name]  # no temp dirs left

    os.utime(gguf, ns=(0, gguf.stat().st_mtime_ns + 10**9))  # a changed file is converted again
    assert resolve_checkpoint(gguf).model_dir != first.model_dir
    assert len(fake_converter) == 2

    (models / "other.gguf").write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="several .gguf files"):
        resolve_checkpoint(models)


def test_failed_gguf_conversion_leaves_nothing(tmp_path, fake_converter):
    gguf = tmp_path / "broken.gguf"
    gguf.write_bytes(b"nope")
    cache = tmp_path / "cache"
    stale = cache / f".{checkpoint_mod.gguf_cache_dir(gguf, cache).name}.tmp-999999999-dead"
    stale.mkdir(parents=True)  # left by a killed conversion: its process no longer exists
    with pytest.raises(RuntimeError, match=f"could not convert GGUF file {gguf}: not a GGUF file"):
        resolve_checkpoint(gguf, cache_dir=cache)
    assert list(cache.iterdir()) == []


# --- real SmolLM2 GGUF ------------------------------------------------------------------


def test_smollm2_gguf_converts_to_loadable_hf_dir(smollm2_checkpoint, smollm2_gguf):
    resolved = smollm2_checkpoint
    assert isinstance(resolved, ResolvedCheckpoint) and str(resolved.source) == smollm2_gguf
    config = load_hf_config(resolved)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 30, 576)
    shapes = {n: tuple(t.shape) for n, t in iter_checkpoint_tensors(resolved)}
    assert shapes == _expected_shapes(config)
    start = time.perf_counter()
    again = resolve_checkpoint(smollm2_gguf)
    assert time.perf_counter() - start < 2.0, "second resolve should reuse the cached conversion"
    assert again.model_dir == resolved.model_dir


def test_smollm2_tokenizer_round_trip_and_chat_template(smollm2_checkpoint):
    tokenizer = load_tokenizer(smollm2_checkpoint)
    text = "Hello world, the cat sat on the mat. Ünïcödé 123!"
    assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nhi<|im_end|>" in prompt and prompt.endswith("<|im_start|>assistant\n")


@pytest.mark.slow
def test_smollm2_converted_weights_are_correct(smollm2_checkpoint):
    # A wrong dequantization or Q/K permutation would not produce this answer.
    model = AutoModelForCausalLM.from_pretrained(smollm2_checkpoint.model_dir, dtype=torch.float32)
    tokenizer = load_tokenizer(smollm2_checkpoint)
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        next_id = model(ids).logits[0, -1].argmax().item()
    assert tokenizer.decode([next_id]).strip() == "Paris"


# --- presets ----------------------------------------------------------------------------


def test_tiny_tokenizer_is_deterministic(tmp_path):
    first = build_tokenizer(tmp_path)
    presets._trained_tokenizer_json.cache_clear()  # force a second training run
    second = build_tokenizer()
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()
    assert 900 <= len(first) <= 1000
    special = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
    assert first.convert_tokens_to_ids(special) == list(range(6))
    reloaded = load_tokenizer(ResolvedCheckpoint(tmp_path, (), tmp_path))
    text = "The quick brown fox jumps over 12 lazy dogs!"
    ids = reloaded(text)["input_ids"]
    assert ids == first(text)["input_ids"] and ids[0] == first.bos_token_id
    assert reloaded.decode(ids, skip_special_tokens=True) == text
    chat = reloaded.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_tiny_config_shapes_and_override_check(tiny_tokenizer):
    config = tiny_config("qwen2")
    assert (config.hidden_size, config.num_hidden_layers, config.num_key_value_heads) == (64, 2, 2)
    assert config.vocab_size % 64 == 0 and config.vocab_size >= len(tiny_tokenizer)
    assert tiny_config("mistral", hidden_size=128).hidden_size == 128
    with pytest.raises(ValueError, match="hiden_size"):
        tiny_config("llama", hiden_size=128)
    with pytest.raises(ValueError, match="unknown arch 'gpt2'"):
        tiny_config("gpt2")


def test_bench_small_has_about_56m_params():
    config = bench_small_config()
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (512, 8, 32000)
    num_params = sum(torch.Size(shape).numel() for shape in _expected_shapes(config).values())
    assert 55e6 < num_params < 57e6  # DESIGN section 6: "about 56M parameters"
