"""Layer windows in the engine: when no whole backward window fits the SLO budget, the engine runs
windows in pieces over several iterations (whole layers, or layers cut by tokens), and the adapter
it trains is the same.

The latency profile is written by hand so that a whole window can never fit (its fixed cost is
far above the limit), while inference requests run beside the job.
"""
import json

import pytest
import torch
from peft import LoraConfig

from coserve import LLM, FinetuneConfig, SamplingParams
from peft_methods.lora.weights import load_adapter

LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)


def job(out_dir):
    rows = [{"input_ids": [(7 * i + 3 * j) % 900 + 3 for j in range(24 + 4 * i)]} for i in range(4)]
    return FinetuneConfig(adapter="lw", peft=LORA, dataset=rows, max_steps=3, batch_size=2, max_seq_len=64,
                          learning_rate=5e-2, shuffle=False, seed=1, output_dir=str(out_dir))


# A whole window's backward costs far more than an iteration's limit (1 s):
#   "layers": its fixed cost alone is 10 s, so windows run in whole-layer pieces;
#   "tokens": no fixed cost and 200 ms per token (100 ms per token and layer of the 2-layer model),
#   so a 24..36-token window runs in pieces of about 10 tokens of layer work that cut layers (up to
#   40 once the online fit has lowered the costs to its floor, a quarter of the profile's).
PROFILES = {"layers": (10.0, 1e-3), "tokens": (0.0, 0.2)}


@pytest.mark.parametrize("pieces", ["layers", "tokens"])
def test_layer_pieces_train_the_same_adapter_as_whole_windows(tiny_llama_dir, tmp_path, pieces):
    # Whole windows: no SLO, the token budget holds every window.
    with LLM(model=str(tiny_llama_dir), dtype="float32", device="cpu", max_num_batched_tokens=64) as llm:
        whole = llm.finetune(job(tmp_path / "whole"))
        assert whole.wait(timeout=300) == "succeeded", whole.error

    backward_base, backward_per_token = PROFILES[pieces]
    profile = {"forward_base": 1e-3, "forward_per_token": 1e-5, "backward_base": backward_base,
               "backward_per_token": backward_per_token, "unit": "s", "points": {"forward": [], "backward": []}}
    (tmp_path / "profile.json").write_text(json.dumps(profile))
    llm = LLM(model=str(tiny_llama_dir), dtype="float32", device="cpu", max_num_batched_tokens=64,
              tpot_slo_ms=1000, latency_profile=str(tmp_path / "profile.json"))
    # Cuts of 4 tokens or more (the default, 16, is sized for bench-small's 256-token windows).
    llm.engine.scheduler.finetune.config.min_finetune_tokens = 4
    ran = []
    run_backward = llm.engine.finetune.run_backward
    llm.engine.finetune.run_backward = lambda windows: (ran.extend(windows), run_backward(windows))[1]
    try:
        split = llm.finetune(job(tmp_path / "split"))
        outs = llm.generate(prompt_token_ids=[[5, 6, 7]] * 3,
                            sampling_params=SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))
        assert all(len(o.token_ids) == 20 for o in outs)
        assert split.wait(timeout=300) == "succeeded", split.error
    finally:
        llm.shutdown()

    cuts = [w for w in ran if w.stop_cut is not None or w.resume_cut is not None]
    if pieces == "layers":
        assert ran and all(w.fraction < 1 for w in ran) and not cuts, "every window should run in layer pieces"
    else:
        assert len(cuts) >= 4, "windows should have run in pieces that cut layers"
    assert split.losses == pytest.approx(whole.losses, rel=1e-6)
    expected, actual = load_adapter(tmp_path / "whole").weights, load_adapter(tmp_path / "split").weights
    for module, (a, b) in expected.items():
        # Same fp32 ops on the same rows; the token windows may be cut differently, so the order of
        # some fp32 sums differs (a chunk's LoRA goes through the CPU kernel or a GEMM depending on
        # its size), and learning rate 5e-2 amplifies it over three steps (up to about 6e-6 on
        # weights of order 1e-2; a wrong gradient moves them by lr x grad, about 1e-3).
        torch.testing.assert_close(actual[module][0], a, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(actual[module][1], b, rtol=1e-5, atol=1e-5)
