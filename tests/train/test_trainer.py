"""`coserve.Trainer`: Hugging Face's Trainer API over a co-served finetuning job, on the tiny llama.

One shared engine (fp32, CPU) runs a 6-step reference training (AdamW, cosine
with warmup, clipping, logs every step, checkpoints and evaluation every 2).
Checked against it: resuming gives the same weights and logs, a stopping
callback leaves the adapter of its step, evaluation equals transformers +
peft, and the saved adapter gives the engine's log-probabilities in peft.
Callback order is checked against a real transformers Trainer run.
"""
import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig

from coserve import LLM, SamplingParams, Trainer, TrainerCallback, TrainingArguments
from coserve.finetune.dataset import IGNORE_INDEX, load_rows, tokenize_rows
from peft_methods.lora.weights import load_adapter

LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
ENGINE = dict(dtype="float32", device="cpu", max_num_batched_tokens=64)
MAX_STEPS = 6
# Same fp32 ops on the same inputs in the same process (another job, or another engine instance):
# measured equal bit for bit; the slack only allows a different chunk split to reorder fp32 sums.
RTOL, ATOL = 1e-5, 1e-6
# Engine vs transformers + peft: different kernels (fused vs eager attention, LoRA op order) in fp32.
REF_RTOL, REF_ATOL = 1e-4, 1e-5
EVENTS = ("on_init_end", "on_train_begin", "on_epoch_begin", "on_step_begin", "on_step_end", "on_log",
          "on_evaluate", "on_save", "on_epoch_end", "on_train_end")

WORDS = "the cat sat on a mat while seven blue birds sang about rain over quiet hills and rivers".split()


def text_rows(count, seed=0):
    return [{"text": " ".join(WORDS[(seed + 3 * i + j) % len(WORDS)] for j in range(6 + i % 5))}
            for i in range(count)]


TRAIN_ROWS = text_rows(16)
EVAL_ROWS = text_rows(5, seed=7)


def arguments(output_dir, **overrides):
    settings = dict(output_dir=str(output_dir), max_steps=MAX_STEPS, per_device_train_batch_size=2,
                    learning_rate=5e-2, lr_scheduler_type="cosine", warmup_steps=1, weight_decay=0.01,
                    max_grad_norm=0.5, logging_steps=1, save_steps=2, eval_steps=2, seed=3, max_seq_length=32)
    settings.update(overrides)
    return TrainingArguments(**settings)


class Recorder(TrainerCallback):
    def __init__(self):
        self.events = []
        self.metrics = []

    def __getattribute__(self, name):
        if name in EVENTS:
            def record(args, state, control, **kwargs):
                self.events.append((name, state.global_step))
                if name == "on_evaluate":
                    self.metrics.append(kwargs["metrics"])
            return record
        return object.__getattribute__(self, name)


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    engine = LLM(model=str(tiny_llama_dir), **ENGINE)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def reference(llm, tmp_path_factory):
    """The uninterrupted 6-step run."""
    out_dir = tmp_path_factory.mktemp("reference")
    recorder = Recorder()
    trainer = Trainer(model=llm, args=arguments(out_dir), peft_config=LORA, train_dataset=TRAIN_ROWS,
                      eval_dataset=EVAL_ROWS, callbacks=[recorder], adapter_name="reference")
    out = trainer.train()
    return {"trainer": trainer, "out": out, "dir": out_dir, "recorder": recorder}


def losses_by_step(log_history):
    return {e["step"]: e["loss"] for e in log_history if "loss" in e}


def assert_weights_close(actual_dir, expected_dir, rtol=RTOL, atol=ATOL):
    actual, expected = load_adapter(actual_dir).weights, load_adapter(expected_dir).weights
    assert set(actual) == set(expected)
    for module, (a, b) in expected.items():
        torch.testing.assert_close(actual[module][0], a, rtol=rtol, atol=atol)
        torch.testing.assert_close(actual[module][1], b, rtol=rtol, atol=atol)


def peft_model(model_dir, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if adapter_dir is None:
        return base.eval()
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


@torch.no_grad()
def reference_eval_loss(model, examples):
    """Mean cross-entropy over every target token (labels shifted by one), one sequence at a time."""
    total, count = 0.0, 0
    for example in examples:
        logits = model(input_ids=torch.tensor([example.input_ids])).logits[0].float()
        labels = torch.tensor(example.labels[1:])
        total += float(F.cross_entropy(logits[:-1], labels, ignore_index=IGNORE_INDEX, reduction="sum"))
        count += int((labels != IGNORE_INDEX).sum())
    return total / count


# ---- training on data -------------------------------------------------------------------------------


def test_trains_on_a_dataset_and_on_a_jsonl_path_like_a_plain_job(llm, tiny_llama_dir, tmp_path):
    from datasets import Dataset

    steps = 3
    args = arguments(tmp_path / "from-dataset", max_steps=steps, eval_steps=None, save_strategy="no")
    out = Trainer(model=llm, args=args, peft_config=LORA, train_dataset=Dataset.from_list(TRAIN_ROWS)).train()
    assert out.global_step == steps

    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in TRAIN_ROWS))
    args_path = arguments(tmp_path / "from-jsonl", max_steps=steps, eval_steps=None, save_strategy="no")
    # From a model path the Trainer starts its own engine, and close() shuts it down.
    with Trainer(model=str(tiny_llama_dir), args=args_path, peft_config=LORA, train_dataset=str(path),
                 engine_kwargs=ENGINE) as trainer:
        out_path = trainer.train()
        engine = trainer.model
    assert engine._loop._stopped

    # The same job submitted directly, with the settings TrainingArguments maps to.
    config = args.finetune_config(adapter="direct", dataset=TRAIN_ROWS, peft=LORA, max_steps=steps)
    job = llm.finetune(config)
    assert job.wait(timeout=300) == "succeeded", job.error
    assert len(job.losses) == steps
    losses = [losses_by_step(trainer.state.log_history)[s] for s in range(1, steps + 1)]
    assert losses == pytest.approx(job.losses, rel=RTOL)
    assert out.training_loss == pytest.approx(sum(job.losses) / steps, rel=RTOL)
    assert out_path.training_loss == pytest.approx(out.training_loss, rel=RTOL)
    assert_weights_close(tmp_path / "from-jsonl", tmp_path / "from-dataset")


def test_log_history_has_hf_entries(reference):
    out, state = reference["out"], reference["trainer"].state
    assert out.global_step == MAX_STEPS == state.global_step
    train_logs = [e for e in state.log_history if "loss" in e]
    assert [e["step"] for e in train_logs] == list(range(1, MAX_STEPS + 1))
    for entry in train_logs:
        assert set(entry) == {"loss", "grad_norm", "learning_rate", "epoch", "step"}
        assert entry["epoch"] == pytest.approx(entry["step"] * 2 / len(TRAIN_ROWS))
    # Cosine after one warmup step: step 1 runs at lr 0 (transformers logs the lr each step used).
    assert train_logs[0]["learning_rate"] == 0.0 and train_logs[1]["learning_rate"] == pytest.approx(5e-2)
    assert train_logs[-1]["loss"] < train_logs[0]["loss"]
    assert out.training_loss == pytest.approx(sum(e["loss"] for e in train_logs) / MAX_STEPS)
    evals = [e for e in state.log_history if "eval_loss" in e]
    assert [e["step"] for e in evals] == [2, 4, 6]
    summary = state.log_history[-1]
    assert summary["train_loss"] == out.training_loss and summary["step"] == MAX_STEPS
    names = sorted(p.name for p in reference["dir"].iterdir() if p.name.startswith("checkpoint-"))
    assert names == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    saved = json.loads((reference["dir"] / "checkpoint-4" / "trainer_state.json").read_text())
    assert saved["global_step"] == 4 and saved["log_history"][-1]["step"] == 4


# ---- callbacks ---------------------------------------------------------------------------------------


def _hf_events(model_dir, out_dir, max_steps, **settings):
    """Events a real transformers Trainer fires for the same schedule of steps."""
    import transformers
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    class HFRecorder(transformers.TrainerCallback):
        def __init__(self):
            self.events = []

    recorder = HFRecorder()
    for name in EVENTS:
        setattr(recorder, name, lambda args, state, control, _n=name, **kw: recorder.events.append(
            (_n, state.global_step)))
    ids = [[5 + (i + j) % 50 for j in range(8)] for i in range(len(TRAIN_ROWS))]
    data = Dataset.from_list([{"input_ids": x, "labels": x} for x in ids])
    args = transformers.TrainingArguments(output_dir=str(out_dir), max_steps=max_steps, per_device_train_batch_size=2,
                                          per_device_eval_batch_size=2, report_to="none", use_cpu=True,
                                          disable_tqdm=True, **settings)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, eval_dataset=data.select(range(4)),
                                   callbacks=[recorder])
    trainer.train()
    return recorder.events, trainer.state.log_history


def test_callbacks_fire_in_the_order_transformers_fires_them(llm, tiny_llama_dir, tmp_path):
    settings = dict(logging_steps=2, eval_strategy="steps", eval_steps=2, save_steps=2)
    expected, hf_logs = _hf_events(tiny_llama_dir, tmp_path / "hf", 4, **settings)
    recorder = Recorder()
    trainer = Trainer(model=llm, args=arguments(tmp_path / "order", max_steps=4, **settings), peft_config=LORA,
                      train_dataset=TRAIN_ROWS, eval_dataset=EVAL_ROWS, callbacks=[Recorder, recorder],
                      adapter_name="order")
    trainer.train()
    assert recorder.events == expected
    assert trainer.callback_handler.callbacks[1].events == expected   # a class is instantiated
    # Each log entry has the keys transformers' has (ours may add some, e.g. eval_num_tokens).
    ours = trainer.state.log_history
    assert len(ours) == len(hf_logs)
    for mine, theirs in zip(ours, hf_logs):
        assert set(theirs) - {"eval_model_preparation_time"} <= set(mine), (mine, theirs)
        assert mine["step"] == theirs["step"]
    # on_evaluate got the metrics that were logged.
    assert [m["eval_loss"] for m in recorder.metrics] == [e["eval_loss"] for e in ours if "eval_loss" in e]


def test_a_stopping_callback_stops_after_its_step_with_the_adapter_saved(llm, reference, tmp_path):
    recorder = Recorder()
    trainer = Trainer(model=llm, args=arguments(tmp_path), peft_config=LORA, train_dataset=TRAIN_ROWS,
                      eval_dataset=EVAL_ROWS, callbacks=[StopAt(3), recorder], adapter_name="stopped")
    out = trainer.train()
    assert out.global_step == 3 == trainer.state.global_step
    after = recorder.events[recorder.events.index(("on_step_end", 3)):]
    assert after == [("on_step_end", 3), ("on_log", 3), ("on_epoch_end", 3), ("on_log", 3), ("on_train_end", 3)]
    assert not [e for e in recorder.events if e[1] > 3]
    # The adapter as of step 3, saved to output_dir: equal to the uninterrupted run's weights at step 3
    # (same max_steps, so the same schedule), checkpointed on request here.
    ref = reference["trainer"]
    assert losses_by_step(trainer.state.log_history) == pytest.approx(
        {s: v for s, v in losses_by_step(ref.state.log_history).items() if s <= 3}, rel=RTOL)
    extra = tmp_path / "step3"
    shutil.copytree(reference["dir"] / "checkpoint-2", extra / "checkpoint-2")
    resumed = Trainer(model=llm, args=arguments(extra, eval_steps=None), peft_config=LORA,
                      train_dataset=TRAIN_ROWS, callbacks=[StopAt(3)], adapter_name="step3")
    resumed.train(resume_from_checkpoint=True)
    assert_weights_close(tmp_path, extra)
    assert "stopped" in llm.list_adapters()   # still served


# ---- resuming ----------------------------------------------------------------------------------------


def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(llm, reference, tmp_path):
    ref = reference["trainer"]
    trainer = Trainer(model=llm, args=arguments(tmp_path), peft_config=LORA, train_dataset=TRAIN_ROWS,
                      eval_dataset=EVAL_ROWS, adapter_name="resumed")
    out = trainer.train(resume_from_checkpoint=str(reference["dir"] / "checkpoint-2"))
    assert out.global_step == MAX_STEPS
    assert_weights_close(tmp_path, reference["dir"])
    assert losses_by_step(trainer.state.log_history) == pytest.approx(losses_by_step(ref.state.log_history), rel=RTOL)
    # transformers' training_loss: the mean over the steps this call ran (3..6).
    ref_losses = losses_by_step(ref.state.log_history)
    assert out.training_loss == pytest.approx(sum(ref_losses[s] for s in range(3, 7)) / 4, rel=RTOL)
    evals = [(e["step"], e["eval_loss"]) for e in trainer.state.log_history if "eval_loss" in e]
    ref_evals = [(e["step"], e["eval_loss"]) for e in ref.state.log_history if "eval_loss" in e][:3]
    assert [s for s, _ in evals] == [2, 4, 6]   # step 2's comes from the checkpoint's trainer_state.json
    assert [v for _, v in evals] == pytest.approx([v for _, v in ref_evals], rel=RTOL)


def test_resume_true_takes_the_latest_checkpoint(llm, reference, tmp_path):
    shutil.copytree(reference["dir"] / "checkpoint-4", tmp_path / "checkpoint-4")
    args = arguments(tmp_path, eval_steps=None, resume_from_checkpoint=None)
    trainer = Trainer(model=llm, args=args, peft_config=LORA, train_dataset=TRAIN_ROWS, adapter_name="latest")
    assert trainer.train(resume_from_checkpoint=True).global_step == MAX_STEPS
    assert_weights_close(tmp_path, reference["dir"])
    with pytest.raises(ValueError, match="No valid checkpoint"):
        Trainer(model=llm, args=arguments(tmp_path / "empty", eval_steps=None), peft_config=LORA,
                train_dataset=TRAIN_ROWS, adapter_name="none").train(resume_from_checkpoint=True)


# ---- evaluation and the saved adapter ----------------------------------------------------------------


def test_evaluate_equals_transformers_peft_loss(llm, reference, tiny_llama_dir):
    examples = tokenize_rows(load_rows(EVAL_ROWS), llm.tokenizer, 32)
    trainer = reference["trainer"]
    metrics = trainer.evaluate()
    assert set(metrics) >= {"eval_loss", "eval_runtime", "eval_samples_per_second", "epoch"}
    expected = reference_eval_loss(peft_model(tiny_llama_dir, reference["dir"]), examples)
    assert metrics["eval_loss"] == pytest.approx(expected, rel=REF_RTOL)
    # The evaluation at step 2, during training, saw the weights of step 2.
    at_2 = next(e["eval_loss"] for e in trainer.state.log_history if e.get("step") == 2 and "eval_loss" in e)
    assert at_2 == pytest.approx(reference_eval_loss(peft_model(tiny_llama_dir, reference["dir"] / "checkpoint-2"),
                                                     examples), rel=REF_RTOL)
    assert reference["recorder"].events[-1] == ("on_evaluate", MAX_STEPS)
    # Before any training the base model is evaluated (a fresh LoRA adds nothing).
    fresh = Trainer(model=llm, args=arguments("unused"), peft_config=LORA, eval_dataset=EVAL_ROWS,
                    adapter_name="never-trained")
    assert fresh.evaluate()["eval_loss"] == pytest.approx(
        reference_eval_loss(peft_model(tiny_llama_dir, None), examples), rel=REF_RTOL)


def test_saved_adapter_in_peft_gives_the_engine_logprobs(llm, reference, tiny_llama_dir, tmp_path):
    trainer = reference["trainer"]
    trainer.save_model(str(tmp_path / "final"))
    assert {p.name for p in (tmp_path / "final").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    model = peft_model(tiny_llama_dir, tmp_path / "final")
    prompts = [llm.tokenizer(t)["input_ids"] for t in ("the cat sat on", "seven blue birds", "rain over quiet")]
    outs = llm.generate(prompt_token_ids=prompts, adapter=trainer.adapter_name,
                        sampling_params=SamplingParams(max_tokens=1, temperature=0.0, logprobs=20))
    for prompt, out in zip(prompts, outs):
        with torch.no_grad():
            expected = torch.log_softmax(model(input_ids=torch.tensor([prompt])).logits[0, -1].float(), dim=-1)
        top = out.logprobs[0]["top"]
        assert out.token_ids[0] == int(expected.argmax())
        ids = list(top)
        torch.testing.assert_close(torch.tensor([top[i] for i in ids]), expected[ids], rtol=REF_RTOL, atol=REF_ATOL)
    # The trained adapter differs from the base model (the comparison is not of two zero LoRAs).
    base = peft_model(tiny_llama_dir, None)
    with torch.no_grad():
        assert not torch.allclose(base(input_ids=torch.tensor([prompts[0]])).logits,
                                  model(input_ids=torch.tensor([prompts[0]])).logits, atol=1e-3)


# ---- settings ----------------------------------------------------------------------------------------


def test_settings_that_do_not_map_are_refused_clearly(llm, tmp_path):
    with pytest.raises(ValueError, match="optim 'adafactor' is not supported"):
        TrainingArguments(output_dir=str(tmp_path), optim="adafactor")
    with pytest.raises(ValueError, match="eval_strategy 'epoch' is not supported"):
        TrainingArguments(output_dir=str(tmp_path), eval_strategy="epoch")
    with pytest.raises(ValueError, match="data_collator"):
        Trainer(model=llm, args=arguments(tmp_path), data_collator=object())
    with pytest.raises(ValueError, match="no eval_dataset"):
        Trainer(model=llm, args=arguments(tmp_path), peft_config=LORA, train_dataset=TRAIN_ROWS).train()
    with pytest.raises(ValueError, match="lora_dropout"):
        Trainer(model=llm, args=arguments(tmp_path, eval_steps=None), adapter_name="dropout",
                peft_config=LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.1),
                train_dataset=TRAIN_ROWS).train()
    # num_train_epochs without max_steps: ceil(epochs * examples / sequences per step) steps.
    args = TrainingArguments(output_dir=str(tmp_path), num_train_epochs=2, per_device_train_batch_size=4)
    assert args.resolve_max_steps(len(TRAIN_ROWS)) == 8
    assert "dropout" not in llm.list_adapters()


def test_engine_stop_mid_step_finishes_that_step_and_saves(llm, tmp_path):
    # The engine call under the Trainer's stop, without pausing: the step in flight completes first.
    config = arguments(tmp_path).finetune_config(adapter="mid-step", dataset=TRAIN_ROWS, peft=LORA, max_steps=50)
    job = llm.finetune(config)
    assert job.stop()
    assert job.wait(timeout=300) == "succeeded", job.error
    progress = job.progress()
    assert progress["stopped_early"] and 1 <= job.step < 50 and len(job.losses) == job.step
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert not job.stop()   # already ended
