"""`llm.finetune` reproduces a plain transformers + peft training loop (fp32, rtol 1e-4).

Same starting adapter, same data order, same optimizer and schedule: per-step
losses and final LoRA weights must match the reference loop, while the token
budget splits every sequence into several chunks, inference requests run in
the same iterations, and gradients accumulate over several micro-batches.
"""
import pytest
import torch

from benchmarks.peft_reference import reference_train
from coserve import LLM, FinetuneConfig, SamplingParams
from coserve.finetune.dataset import IGNORE_INDEX
from tests.helpers import make_peft_adapter_dir

NUM_STEPS = 3


def _rows(vocab: int, count: int, seed: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(count):
        length = 30 + (i * 7) % 19                              # 30..48 tokens, budget 24 splits them
        ids = torch.randint(3, vocab, (length,), generator=gen).tolist()
        labels = [IGNORE_INDEX] * (length // 3) + ids[length // 3:]  # a prompt part without loss
        rows.append({"input_ids": ids, "labels": labels})
    return rows


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_finetune_matches_peft_training_loop(tiny_llama_dir, tmp_path, optimizer):
    adapter_dir = make_peft_adapter_dir(tiny_llama_dir, tmp_path / "init", seed=5, r=4, lora_alpha=8,
                                        target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])
    batch_size, accumulation = 2, 2
    llm = LLM(model=str(tiny_llama_dir), dtype="float32", device="cpu", max_num_batched_tokens=24)
    try:
        vocab = llm.engine.model.config.vocab_size
        rows = _rows(vocab, batch_size * accumulation * NUM_STEPS, seed=6)
        settings = dict(optimizer=optimizer, learning_rate=1e-3 if optimizer == "adamw" else 0.5,
                        weight_decay=0.01, lr_scheduler="linear", warmup_steps=1, max_grad_norm=1.0,
                        momentum=0.0 if optimizer == "adamw" else 0.9)
        job = llm.finetune(FinetuneConfig(adapter="trained", init_adapter=adapter_dir, dataset=rows,
                                          max_steps=NUM_STEPS, batch_size=batch_size,
                                          gradient_accumulation_steps=accumulation, shuffle=False,
                                          max_seq_len=64, output_dir=str(tmp_path / "out"), **settings))
        # Inference shares the job's iterations: these requests drive the engine while it trains.
        outs = llm.generate(prompt_token_ids=[[5, 6, 7, 8], [9, 10, 11]], adapter=[None, "trained"],
                            sampling_params=SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
        assert all(len(o.token_ids) == 12 for o in outs)
        assert job.wait(timeout=300) == "succeeded", job.error
        stats = llm.stats()
    finally:
        llm.shutdown()
    assert stats["num_shared_iterations"] > 0     # inference and finetuning shared iterations
    kinds = stats["tokens_by_kind"]
    assert kinds["finetune_forward"] == kinds["finetune_backward"] == sum(len(r["input_ids"]) for r in rows)

    per_step = batch_size * accumulation
    steps = [[(r["input_ids"], r["labels"]) for r in rows[k * per_step:(k + 1) * per_step]]
             for k in range(NUM_STEPS)]
    ref = reference_train(tiny_llama_dir, adapter_dir, steps, micro_batch_size=batch_size,
                          max_grad_norm=1.0, **{k: v for k, v in settings.items() if k != "max_grad_norm"})
    assert job.losses == pytest.approx(ref.losses, rel=1e-4)
    from peft_methods.lora.weights import load_adapter

    ours = load_adapter(tmp_path / "out").weights
    assert set(ours) == set(ref.weights)
    for module, (ref_a, ref_b) in ref.weights.items():
        torch.testing.assert_close(ours[module][0], ref_a, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(ours[module][1], ref_b, rtol=1e-4, atol=1e-6)
    # The weights moved: the comparison above is not between two untouched copies.
    init = load_adapter(adapter_dir).weights
    assert any(not torch.allclose(init[m][1], ours[m][1]) for m in ours)
