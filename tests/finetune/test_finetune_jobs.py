"""Finetuning jobs through `LLM`: bad input, cancel, failure alone, checkpoints, serving the result.

Every error must name the problem, start nothing, return every byte and KV
block, and leave inference serving.
"""
import json
import os

import pytest
import torch
from peft import LoraConfig

from coserve import LLM, FinetuneConfig, SamplingParams
from coserve.finetune.dataset import DatasetError

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    engine = LLM(model=str(tiny_llama_dir), dtype="float32", device="cpu", max_num_batched_tokens=48)
    yield engine
    engine.shutdown()


def rows(count=8, length=24):
    return [{"input_ids": [(7 * i + j) % 900 + 3 for j in range(length)]} for i in range(count)]


def config(**overrides):
    settings = dict(adapter="ft", peft=LORA, dataset=rows(), max_steps=2, batch_size=2, max_seq_len=64)
    settings.update(overrides)
    return FinetuneConfig(**settings)


def assert_idle_and_serving(llm):
    engine = llm.engine
    assert engine.runner.finetune.held_bytes() == 0
    assert not engine.scheduler.finetune.sequences
    assert engine.block_manager.usage == 0
    out = llm.generate(prompt_token_ids=[[5, 6, 7]], sampling_params=GREEDY)[0]
    assert len(out.token_ids) == 6 and out.error is None


@pytest.mark.parametrize("make_config, error, match", [
    (lambda tmp: config(dataset=str(tmp / "missing.jsonl")), DatasetError, "missing.jsonl"),
    (lambda tmp: config(dataset=[{"text": "fine"}, {"prompt": "no completion"}, {"bogus": 1}]),
     DatasetError, r"row 1.*completion"),
    (lambda tmp: config(dataset=[{"input_ids": [1, 2, 10**7]}]), DatasetError, "row 0"),
    (lambda tmp: config(max_seq_len=10**6), ValueError, "maximum length"),
    (lambda tmp: config(peft=LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.1)), ValueError,
     "lora_dropout"),
])
def test_bad_input_fails_clearly_and_starts_nothing(llm, tmp_path, make_config, error, match):
    with pytest.raises(error, match=match):
        llm.finetune(make_config(tmp_path))
    assert "ft" not in llm.list_adapters()
    assert_idle_and_serving(llm)


def test_unreadable_dataset_file_names_the_line(llm, tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(DatasetError, match=r"data.jsonl.*line 2"):
        llm.finetune(config(dataset=str(path)))
    assert_idle_and_serving(llm)


@pytest.mark.parametrize("field, value, match", [
    ("max_steps", 0, "max_steps"), ("learning_rate", 0.0, "learning_rate"),
    ("learning_rate", -1e-3, "learning_rate"), ("optimizer", "adam8bit", "optimizer"),
])
def test_bad_settings_are_rejected_by_the_config(field, value, match):
    with pytest.raises(ValueError, match=match):
        config(**{field: value})


def test_adapter_name_in_use_is_refused(llm, tmp_path):
    job = llm.finetune(config(adapter="taken", max_steps=1))
    assert job.wait(timeout=120) == "succeeded"
    with pytest.raises(ValueError, match="already in use"):
        llm.finetune(config(adapter="taken"))
    llm.unload_adapter("taken")
    assert_idle_and_serving(llm)


def test_cancel_frees_blocks_and_buffers(llm):
    job = llm.finetune(config(adapter="cancel-me", max_steps=50))
    # Let it get going: a few iterations driven by generation.
    llm.generate(prompt_token_ids=[[5, 6, 7]], sampling_params=GREEDY)
    assert job.status == "running"
    assert job.cancel() is True
    assert job.status == "cancelled" and job.wait(timeout=1) == "cancelled"
    assert job.cancel() is False
    assert "cancel-me" not in llm.list_adapters()
    assert_idle_and_serving(llm)


def test_a_failing_job_fails_alone(llm, monkeypatch):
    executor = llm.engine.runner.finetune

    def broken_backward(*args, **kwargs):
        raise RuntimeError("injected fault")

    monkeypatch.setattr(executor, "backward", broken_backward)
    job = llm.finetune(config(adapter="doomed", max_steps=3))
    outs = llm.generate(prompt_token_ids=[[5, 6, 7], [8, 9]], sampling_params=GREEDY)
    assert job.wait(timeout=120) == "failed"
    assert "injected fault" in job.error
    assert all(len(o.token_ids) == 6 for o in outs)
    monkeypatch.undo()
    assert_idle_and_serving(llm)


def test_finished_job_saves_checkpoints_and_serves_its_adapter(llm, tiny_llama_dir, tmp_path):
    out_dir = tmp_path / "adapter"
    job = llm.finetune(config(adapter="served", max_steps=3, save_steps=2, learning_rate=5e-2,
                              output_dir=str(out_dir)))
    assert job.wait(timeout=120) == "succeeded"
    assert len(job.losses) == 3
    assert sorted(p for p in os.listdir(out_dir) if p.startswith("checkpoint")) == ["checkpoint-2"]
    assert (out_dir / "checkpoint-2" / "training_state.pt").exists()
    assert json.loads((out_dir / "adapter_config.json").read_text())["r"] == 4
    # The engine serves exactly the weights it saved: compare with a fresh engine loading them.
    prompts = [[5, 6, 7, 8], [11, 12]]
    served = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY, adapter="served")
    base = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY)
    other = LLM(model=str(tiny_llama_dir), dtype="float32", device="cpu")
    try:
        other.load_adapter("loaded", str(out_dir))
        reloaded = other.generate(prompt_token_ids=prompts, sampling_params=GREEDY, adapter="loaded")
    finally:
        other.shutdown()
    assert [o.token_ids for o in served] == [o.token_ids for o in reloaded]
    assert [o.token_ids for o in served] != [o.token_ids for o in base]


def test_saved_adapter_loads_in_peft(llm, tiny_llama_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out_dir = tmp_path / "peft-check"
    job = llm.finetune(config(adapter="for-peft", max_steps=1, output_dir=str(out_dir)))
    assert job.wait(timeout=120) == "succeeded"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)), str(out_dir))
    trained = job._job.lora.params["model.layers.0.self_attn.q_proj"][1]
    loaded = dict(model.named_parameters())["base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"]
    torch.testing.assert_close(loaded, trained.detach())


def test_stats_report_jobs_budget_and_kept_bytes(llm):
    job = llm.finetune(config(adapter="stats", max_steps=1, dataset=rows(4, 32)))
    assert job.wait(timeout=120) == "succeeded"
    stats = llm.stats()
    entry = stats["finetune"]["jobs"][job.job_id]
    assert entry["status"] == "succeeded" and entry["step"] == 1 and len(entry["losses"]) == 1
    assert entry["tokens_trained"] == 2 * 32
    assert stats["budget"]["unit"] == "tokens"
    # 32 tokens fill whole KV blocks and one backward window covers them (budget 48 tokens, a backward
    # token counts 1.0): the real tensors hold the plan minus the dK/dV accumulators, exactly.
    planned = stats["finetune"]["planned_saved_bytes_per_token"]
    accumulators = llm.engine.prune_report.breakdown["kv_grad_accumulators"]
    assert stats["finetune"]["saved_bytes_per_token"] == planned - accumulators
    assert set(stats["tokens_by_kind"]) == {"decode", "prefill", "finetune_forward", "finetune_backward"}
    llm.unload_adapter("stats")


def test_two_jobs_train_at_once_and_both_finish(llm):
    first = llm.finetune(config(adapter="one", max_steps=2))
    second = llm.finetune(config(adapter="two", max_steps=2, dataset=rows(8, 30), seed=1))
    assert first.wait(timeout=120) == "succeeded" and second.wait(timeout=120) == "succeeded"
    assert len(first.losses) == len(second.losses) == 2
    assert first.tokens_trained == 2 * 2 * 24 and second.tokens_trained == 2 * 2 * 30
    for name in ("one", "two"):
        llm.unload_adapter(name)
    assert_idle_and_serving(llm)


def test_split_backward_keeps_accumulators_for_earlier_windows_only(llm):
    # 64 tokens, windows of at most 32: accumulators cover the first 32 tokens, half the sequence.
    job = llm.finetune(config(adapter="split", max_steps=1, dataset=rows(2, 64)))
    assert job.wait(timeout=120) == "succeeded"
    stats = llm.stats()["finetune"]
    accumulators = llm.engine.prune_report.breakdown["kv_grad_accumulators"]
    assert stats["saved_bytes_per_token"] == stats["planned_saved_bytes_per_token"] - accumulators / 2
    llm.unload_adapter("split")
