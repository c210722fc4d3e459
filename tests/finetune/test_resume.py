"""Resuming a finetuning job from a checkpoint equals never having stopped it.

A 6-step job (AdamW, cosine schedule with warmup, gradient clipping, shuffled
rows whose epochs end inside a step) writes checkpoint-2, -4 and -6. A fresh
engine resumes it from checkpoint-2, and with `resume_from_checkpoint=True`
(which picks checkpoint-4); both must end with the uninterrupted run's adapter
and losses. Tolerance rtol=1e-5, atol=1e-6: the same fp32 ops on the same
inputs in another engine instance; measured equal bit for bit on CPU, the slack
only allows a different kernel or chunk split to reorder fp32 sums (about 1e-7
relative per op). Bad checkpoints and mismatching jobs must fail clearly and
start nothing.
"""
import shutil

import pytest
import torch
from peft import LoraConfig

from coserve import LLM, FinetuneConfig, SamplingParams
from coserve.finetune.checkpoint import TRAINING_STATE_NAME, latest_checkpoint
from peft_methods.lora.weights import load_adapter

# down_proj sorts before self_attn.* in the safetensors file, unlike model order: the resume must put
# the weights back in optimizer parameter order (the optimizer state is keyed by position).
LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
MAX_STEPS = 6
RTOL, ATOL = 1e-5, 1e-6


def rows(count=7, seed=0):
    # 7 rows, 2 per step: epochs end inside steps 4 and 7, so skipping steps crosses an epoch boundary.
    return [{"input_ids": [(7 * i + 3 * j + seed) % 900 + 3 for j in range(16 + 2 * i)]} for i in range(count)]


def config(**overrides):
    settings = dict(adapter="ft", peft=LORA, dataset=rows(), max_steps=MAX_STEPS, batch_size=2, max_seq_len=64,
                    optimizer="adamw", learning_rate=5e-2, weight_decay=0.01, lr_scheduler="cosine",
                    warmup_steps=2, max_grad_norm=0.5, shuffle=True, seed=3, save_steps=2)
    settings.update(overrides)
    return FinetuneConfig(**settings)


def make_llm(model_dir):
    return LLM(model=str(model_dir), dtype="float32", device="cpu", max_num_batched_tokens=48)


@pytest.fixture(scope="module")
def reference(tiny_llama_dir, tmp_path_factory):
    """The uninterrupted run: its output_dir (with checkpoint-2/4/6), losses and tokens trained."""
    out_dir = tmp_path_factory.mktemp("uninterrupted")
    llm = make_llm(tiny_llama_dir)
    try:
        job = llm.finetune(config(output_dir=str(out_dir)))
        assert job.wait(timeout=300) == "succeeded", job.error
    finally:
        llm.shutdown()
    assert len(job.losses) == MAX_STEPS
    return {"dir": out_dir, "losses": job.losses, "tokens_trained": job.tokens_trained,
            "checkpoints": job.progress()["checkpoints"]}


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    """A second engine, as after a restart: it never saw the uninterrupted run."""
    engine = make_llm(tiny_llama_dir)
    yield engine
    engine.shutdown()


def assert_weights_close(actual_dir, expected_dir, **tolerance):
    actual, expected = load_adapter(actual_dir).weights, load_adapter(expected_dir).weights
    assert set(actual) == set(expected)
    for module, (a, b) in expected.items():
        torch.testing.assert_close(actual[module][0], a, **tolerance)
        torch.testing.assert_close(actual[module][1], b, **tolerance)


def assert_nothing_started(llm):
    assert "ft" not in llm.list_adapters()
    assert llm.engine.runner.finetune.held_bytes() == 0
    assert llm.engine.block_manager.usage == 0
    out = llm.generate(prompt_token_ids=[[5, 6, 7]],
                       sampling_params=SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))[0]
    assert len(out.token_ids) == 3 and out.error is None


def test_checkpoints_written(reference):
    names = sorted(p.name for p in reference["dir"].iterdir() if p.name.startswith("checkpoint-"))
    assert names == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert not [p for p in reference["dir"].iterdir() if p.name.startswith(".checkpoint")]
    assert latest_checkpoint(reference["dir"]) == str(reference["dir"] / "checkpoint-6")


def test_resume_from_step_2_equals_uninterrupted_run(llm, reference, tmp_path):
    start = reference["dir"] / "checkpoint-2"
    job = llm.finetune(config(resume_from_checkpoint=str(start), output_dir=str(tmp_path)))
    assert job.wait(timeout=300) == "succeeded", job.error
    progress = job.progress()
    assert progress["resumed_from"] == str(start) and job.step == MAX_STEPS
    assert job.losses[:2] == reference["losses"][:2]            # restored from the checkpoint as saved
    assert job.losses[2:] == pytest.approx(reference["losses"][2:], rel=RTOL)
    assert job.tokens_trained == reference["tokens_trained"]
    assert progress["checkpoints"] == [str(start), str(tmp_path / "checkpoint-4"), str(tmp_path / "checkpoint-6")]
    assert_weights_close(tmp_path, reference["dir"], rtol=RTOL, atol=ATOL)
    assert_weights_close(tmp_path / "checkpoint-4", reference["dir"] / "checkpoint-4", rtol=RTOL, atol=ATOL)
    # The comparison is not between untouched copies: training moved the weights after step 2.
    before = load_adapter(start).weights
    after = load_adapter(tmp_path).weights
    assert any(not torch.allclose(before[m][1], after[m][1]) for m in after)
    llm.unload_adapter("ft")


def test_resume_true_picks_latest_complete_checkpoint(llm, reference, tmp_path):
    for name in ("checkpoint-2", "checkpoint-4"):
        shutil.copytree(reference["dir"] / name, tmp_path / name)
    (tmp_path / ".checkpoint-8-abc123").mkdir()       # an interrupted write
    (tmp_path / "checkpoint-10").mkdir()              # not a checkpoint: no training_state.pt
    assert latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")
    job = llm.finetune(config(resume_from_checkpoint=True, output_dir=str(tmp_path)))
    assert job.wait(timeout=300) == "succeeded", job.error
    assert job.progress()["resumed_from"] == str(tmp_path / "checkpoint-4")
    assert job.losses[:4] == reference["losses"][:4]
    assert job.losses[4:] == pytest.approx(reference["losses"][4:], rel=RTOL)
    assert_weights_close(tmp_path, reference["dir"], rtol=RTOL, atol=ATOL)
    llm.unload_adapter("ft")


def test_resume_from_last_step_finishes_at_once(llm, reference, tmp_path):
    # Decision: a checkpoint of the last step is a finished job; it succeeds without training
    # and saves its (final) adapter to output_dir.
    job = llm.finetune(config(resume_from_checkpoint=str(reference["dir"] / "checkpoint-6"),
                              output_dir=str(tmp_path)))
    assert job.wait(timeout=60) == "succeeded", job.error
    assert job.losses == reference["losses"] and job.step == MAX_STEPS
    assert_weights_close(tmp_path, reference["dir"], rtol=0, atol=0)
    llm.unload_adapter("ft")
    assert_nothing_started(llm)


def _copy_without_state(reference, tmp_path):
    target = tmp_path / "checkpoint-2"
    shutil.copytree(reference["dir"] / "checkpoint-2", target)
    (target / TRAINING_STATE_NAME).unlink()
    return target


def _copy_with_state(reference, tmp_path, state):
    target = _copy_without_state(reference, tmp_path)
    if isinstance(state, bytes):
        (target / TRAINING_STATE_NAME).write_bytes(state)
    else:
        torch.save(state, target / TRAINING_STATE_NAME)
    return target


@pytest.mark.parametrize("make_path, overrides, match", [
    (lambda ref, tmp: tmp / "no-such-checkpoint", {}, "no-such-checkpoint.*not a directory"),
    (_copy_without_state, {}, r"checkpoint-2/training_state\.pt is missing"),
    (lambda ref, tmp: _copy_with_state(ref, tmp, b"\x00not a torch file"), {},
     r"cannot read .*training_state\.pt.*corrupt"),
    (lambda ref, tmp: _copy_with_state(ref, tmp, {"step": 2}), {}, r"training_state\.pt.*'format_version'"),
    (lambda ref, tmp: ref["dir"] / "checkpoint-2", {"seed": 4}, "seed=3.*seed=4"),
    (lambda ref, tmp: ref["dir"] / "checkpoint-2", {"max_steps": 8}, "max_steps=6.*max_steps=8"),
    (lambda ref, tmp: ref["dir"] / "checkpoint-2", {"batch_size": 1}, "sequences_per_step=2"),
    (lambda ref, tmp: ref["dir"] / "checkpoint-2", {"lr_scheduler": "linear"}, "lr_scheduler='cosine'"),
    (lambda ref, tmp: ref["dir"] / "checkpoint-2", {"dataset": rows(8)}, "num_examples=7"),
    (lambda ref, tmp: ref["dir"] / "checkpoint-2", {"dataset": rows(seed=1)}, "other data"),
])
def test_bad_checkpoint_or_other_job_fails_clearly(llm, reference, tmp_path, make_path, overrides, match):
    path = make_path(reference, tmp_path)
    with pytest.raises(ValueError, match=match):
        llm.finetune(config(resume_from_checkpoint=str(path), output_dir=str(tmp_path / "out"), **overrides))
    assert_nothing_started(llm)


def test_resume_true_without_checkpoint_names_output_dir(llm, tmp_path):
    out_dir = tmp_path / "empty-run"
    out_dir.mkdir()
    with pytest.raises(ValueError, match=f"output_dir '{out_dir}' holds no checkpoint"):
        llm.finetune(config(resume_from_checkpoint=True, output_dir=str(out_dir)))
    assert_nothing_started(llm)


@pytest.mark.parametrize("overrides, match", [
    ({"resume_from_checkpoint": 3}, "resume_from_checkpoint must be"),
    ({"resume_from_checkpoint": ""}, "resume_from_checkpoint must be"),
    ({"resume_from_checkpoint": True, "save_steps": None}, "set output_dir"),
])
def test_config_rejects_bad_resume_values(overrides, match):
    with pytest.raises(ValueError, match=match):
        config(**overrides)


def test_config_accepts_paths_false_and_no_peft(tmp_path):
    assert config(resume_from_checkpoint=tmp_path).resume_from_checkpoint == str(tmp_path)
    assert config(resume_from_checkpoint=False).resume_from_checkpoint is None
    # The checkpoint carries its LoRA config: peft is not needed.
    assert config(peft=None, resume_from_checkpoint=str(tmp_path)).peft is None
