"""`coserve.Trainer` on a cluster `Deployment`: same steps, logs, evaluation and adapter as on a local LLM.

One single-worker deployment on the session's local Ray. The trainer drives
the job step by step through the controller (the job pauses after each step
until the callbacks ran); losses, weights and eval_loss must equal the same
Trainer run on a local engine (rtol 1e-5: the same fp32 ops in another
process, equal up to summation order), and a stopping callback must stop it.
"""
import pytest
import ray
import torch
from peft import LoraConfig

from cluster import Deployment
from coserve import LLM, SamplingParams, Trainer, TrainerCallback, TrainingArguments
from peft_methods.lora.weights import load_adapter

ENGINE = dict(dtype="float32", device="cpu", max_num_batched_tokens=48)
LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
RTOL, ATOL = 1e-5, 1e-6
ROWS = [{"input_ids": [(7 * i + 3 * j) % 900 + 3 for j in range(20 + 3 * i)]} for i in range(6)]
EVAL_ROWS = [{"input_ids": [(5 * i + 11 * j) % 900 + 3 for j in range(24)]} for i in range(3)]


def arguments(output_dir, **overrides):
    settings = dict(output_dir=str(output_dir), max_steps=3, per_device_train_batch_size=2, learning_rate=5e-2,
                    lr_scheduler_type="cosine", warmup_steps=1, max_grad_norm=1.0, logging_steps=1, save_steps=2,
                    eval_steps=3, seed=1, max_seq_length=64)
    settings.update(overrides)
    return TrainingArguments(**settings)


class Steps(TrainerCallback):
    def __init__(self, stop_at=None):
        self.steps, self.stop_at = [], stop_at

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)
        if state.global_step == self.stop_at:
            control.should_training_stop = True


@pytest.fixture(scope="module")
def dep(ray_session, tiny_llama_dir, tmp_path_factory):
    deployment = Deployment.start(model=str(tiny_llama_dir), num_workers=1, name="test-trainer", use_gpu=False,
                                  directory=tmp_path_factory.mktemp("trainer-deployment"), **ENGINE)
    yield deployment
    deployment.shutdown()
    assert not [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("test-trainer:")]


def losses(trainer):
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


def test_trainer_on_a_deployment_equals_a_local_run(dep, tiny_llama_dir, tmp_path):
    steps = Steps()
    trainer = Trainer(model=dep, args=arguments(tmp_path / "dep"), peft_config=LORA, train_dataset=ROWS,
                      eval_dataset=EVAL_ROWS, callbacks=[steps], adapter_name="dep-trained")
    out = trainer.train()
    assert out.global_step == 3 and steps.steps == [1, 2, 3]
    assert (tmp_path / "dep" / "checkpoint-2" / "trainer_state.json").is_file()
    # Served by the deployment right away, next to the base model.
    served = dep.generate(prompt_token_ids=[[5, 6, 7]], adapter="dep-trained",
                          sampling_params=SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))[0]
    assert len(served.token_ids) == 3
    metrics = trainer.evaluate()
    trainer.save_model(str(tmp_path / "dep-final"))

    with LLM(model=str(tiny_llama_dir), **ENGINE) as llm:
        local = Trainer(model=llm, args=arguments(tmp_path / "local"), peft_config=LORA, train_dataset=ROWS,
                        eval_dataset=EVAL_ROWS, adapter_name="local-trained")
        local_out = local.train()
        local_metrics = local.evaluate()
    assert losses(trainer) == pytest.approx(losses(local), rel=RTOL)
    assert out.training_loss == pytest.approx(local_out.training_loss, rel=RTOL)
    assert metrics["eval_loss"] == pytest.approx(local_metrics["eval_loss"], rel=RTOL)
    expected = load_adapter(tmp_path / "local").weights
    for path in (tmp_path / "dep", tmp_path / "dep-final"):
        actual = load_adapter(path).weights
        assert set(actual) == set(expected)
        for module, (a, b) in expected.items():
            torch.testing.assert_close(actual[module][0], a, rtol=RTOL, atol=ATOL)
            torch.testing.assert_close(actual[module][1], b, rtol=RTOL, atol=ATOL)


def test_a_stopping_callback_stops_the_deployment_job(dep, tmp_path):
    steps = Steps(stop_at=2)
    trainer = Trainer(model=dep, args=arguments(tmp_path, max_steps=10, eval_steps=None), peft_config=LORA,
                      train_dataset=ROWS, callbacks=[steps], adapter_name="dep-stopped")
    out = trainer.train()
    assert out.global_step == 2 and steps.steps == [1, 2]
    job_id = next(j["job_id"] for j in dep.jobs() if j["adapter"] == "dep-stopped")
    progress = dep.wait_job_step(job_id, 3, 1.0)   # live, from the worker
    assert progress["status"] == "succeeded" and progress["stopped_early"] and progress["step"] == 2
    assert (tmp_path / "adapter_model.safetensors").is_file()   # saved as of step 2
