"""Bad input gets a clear error naming the problem, and the engine keeps serving."""
import json
import shutil
import time

import pytest

from coserve import LLM, SamplingParams
from coserve.engine.adapter_manager import UnknownAdapterError
from peft_methods.lora.weights import AdapterLoadError
from tests.helpers import make_peft_adapter_dir

GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def good_adapter(tiny_llama_dir, tmp_path_factory):
    return make_peft_adapter_dir(tiny_llama_dir, tmp_path_factory.mktemp("bad") / "good", seed=5,
                                 r=4, lora_alpha=8, target_modules=["q_proj"])


@pytest.fixture(scope="module")
def llm(tiny_llama_dir, good_adapter):
    engine = LLM(model=str(tiny_llama_dir), max_lora_rank=8, max_model_len=64, dtype="float32", device="cpu")
    engine.load_adapter("good", good_adapter)
    yield engine
    engine.shutdown()


def _still_serves(llm):
    outs = llm.generate(prompt_token_ids=[[5, 6, 7], [8, 9]], sampling_params=GREEDY, adapter=["good", None])
    assert [len(o.token_ids) for o in outs] == [4, 4]


def test_unknown_adapter(llm):
    with pytest.raises(UnknownAdapterError, match="unknown adapter 'nope'.*good"):
        llm.generate(prompt_token_ids=[[5, 6]], sampling_params=GREEDY, adapter="nope")
    _still_serves(llm)


def test_rank_above_max_lora_rank(llm, tiny_llama_dir, tmp_path):
    path = make_peft_adapter_dir(tiny_llama_dir, tmp_path / "big", seed=1, r=16, lora_alpha=16,
                                 target_modules=["v_proj"])
    with pytest.raises(ValueError, match="rank 16.*max_lora_rank 8|max_lora_rank.*8"):
        llm.load_adapter("big", path)
    assert "big" not in llm.list_adapters()
    _still_serves(llm)


def test_target_module_missing_from_model(llm, good_adapter, tmp_path):
    from safetensors.torch import load_file, save_file

    path = tmp_path / "wrong-layer"
    shutil.copytree(good_adapter, path)
    weights = load_file(path / "adapter_model.safetensors")
    # Re-home the layer-0 weights to a layer the 2-layer model does not have.
    moved = {k.replace("layers.0.", "layers.7."): v for k, v in weights.items()}
    save_file(moved, path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="layers.7.self_attn.q_proj.*not found"):
        llm.load_adapter("wrong", str(path))
    _still_serves(llm)


def test_corrupt_and_missing_adapter_files(llm, good_adapter, tmp_path):
    with pytest.raises(AdapterLoadError, match="does-not-exist"):
        llm.load_adapter("missing", str(tmp_path / "does-not-exist"))
    corrupt = tmp_path / "corrupt"
    shutil.copytree(good_adapter, corrupt)
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(AdapterLoadError, match="adapter_model.safetensors"):
        llm.load_adapter("corrupt", str(corrupt))
    bad_json = tmp_path / "bad-json"
    shutil.copytree(good_adapter, bad_json)
    (bad_json / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterLoadError, match="adapter_config.json"):
        llm.load_adapter("bad-json", str(bad_json))
    no_weights = tmp_path / "no-weights"
    shutil.copytree(good_adapter, no_weights)
    (no_weights / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterLoadError):
        llm.load_adapter("no-weights", str(no_weights))
    assert llm.list_adapters() == ["good"]
    _still_serves(llm)


def test_prompt_too_long_and_empty(llm):
    with pytest.raises(ValueError, match="64 tokens.*maximum length is 64"):
        llm.generate(prompt_token_ids=[[5] * 64], sampling_params=GREEDY)
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate(prompt_token_ids=[[]], sampling_params=GREEDY)
    with pytest.raises(ValueError, match="out of range"):
        llm.generate(prompt_token_ids=[[5, 10**9]], sampling_params=GREEDY)
    # One bad prompt in a batch queues nothing.
    before = llm.stats()["num_finished"]
    with pytest.raises(ValueError):
        llm.generate(prompt_token_ids=[[5, 6], []], sampling_params=GREEDY)
    assert llm.stats()["num_finished"] == before
    _still_serves(llm)


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_k=-5), "top_k"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(logprobs=100), "logprobs"),
    (dict(stop=[""]), "stop"),
])
def test_invalid_sampling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_mismatched_argument_lengths(llm):
    with pytest.raises(ValueError, match="adapter has 1 entries for 2 prompts"):
        llm.generate(prompt_token_ids=[[5], [6]], sampling_params=GREEDY, adapter=["good"])
    with pytest.raises(TypeError, match="sampling_params"):
        llm.generate(prompt_token_ids=[[5]], sampling_params={"max_tokens": 3})
    _still_serves(llm)


def test_request_too_big_for_kv_pool_fails_alone(tiny_llama_dir):
    llm = LLM(model=str(tiny_llama_dir), block_size=4, num_kv_blocks=6, dtype="float32", device="cpu")
    try:
        outs = llm.generate(prompt_token_ids=[[5] * 10, [6, 7]],
                            sampling_params=[SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True),
                                             GREEDY])
        assert outs[0].finish_reason == "error" and "KV blocks" in outs[0].error
        assert outs[1].finish_reason == "length" and len(outs[1].token_ids) == 4
        assert llm.engine.block_manager.num_free_blocks == 6
    finally:
        llm.shutdown()


def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="supported: Llama, Mistral, Qwen2"):
        LLM(model=str(tmp_path))


def test_unloading_an_adapter_in_use_is_refused(llm):
    engine = llm.engine

    def add_then_unload():
        engine.add_request("pending-unload", [5, 6, 7], GREEDY, "good")
        try:
            engine.unload_adapter("good")
        finally:
            engine.abort_request("pending-unload")

    with pytest.raises(ValueError, match="'good' is in use by 1 unfinished request"):
        llm._loop.call(add_then_unload)
    assert "good" in llm.list_adapters()
    _still_serves(llm)


def test_arrival_time_is_kept_clamped_to_now_and_checked(llm):
    engine = llm.engine
    now = time.monotonic()
    earlier = llm._loop.call(lambda: engine.add_request("arrived-earlier", [5, 6], GREEDY, arrival_time=now - 0.3))
    later = llm._loop.call(lambda: engine.add_request("arrives-later", [5, 6], GREEDY, arrival_time=now + 60.0))
    assert earlier.arrival_time == now - 0.3                 # the TTFT target counts from here
    assert now <= later.arrival_time <= time.monotonic()     # a future arrival counts as now
    with pytest.raises(ValueError, match="arrival_time must be a finite"):
        llm._loop.call(lambda: engine.add_request("bad-arrival", [5, 6], GREEDY, arrival_time=float("nan")))
    for request in (earlier, later):
        llm._loop.wait(llm._loop.call(lambda r=request: llm._loop.track(r)))
    # generate() stamps each request when it is called, before the engine thread adds it.
    seen, add = [], engine.add_request

    def recording_add(*args, **kwargs):
        seen.append((kwargs.get("arrival_time"), time.monotonic()))
        return add(*args, **kwargs)

    engine.add_request = recording_add
    try:
        before = time.monotonic()
        assert len(llm.generate(prompt_token_ids=[[5, 6, 7]], sampling_params=GREEDY)[0].token_ids) == 4
    finally:
        del engine.add_request
    ((arrival, added),) = seen
    assert arrival is not None and before <= arrival <= added
    _still_serves(llm)
