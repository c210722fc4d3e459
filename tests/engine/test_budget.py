"""The SLO budget: a latency profile measured at start-up (or loaded), and the plan it implies."""
import json
from types import SimpleNamespace

import pytest

from coserve import LLM, FinetuneConfig, SamplingParams
from coserve.engine import profiler
from coserve.engine.cost_model import CostModel
from coserve.engine.kv_cache import BlockManager
from coserve.engine.profiler import _fit as _fit_line, _fit_backward
from coserve.graph import prune_backward
from coserve.models.llama import head_dim_of


def test_slo_engine_profiles_saves_and_reuses_the_latency_profile(tiny_llama_dir, tmp_path):
    path = tmp_path / "profile.json"
    llm = LLM(model=str(tiny_llama_dir), dtype="float32", device="cpu", tpot_slo_ms=500,
              latency_profile=str(path))
    try:
        stats = llm.stats()
        profile = json.loads(path.read_text())
        assert stats["latency_profile"]["forward_per_token"] == profile["forward_per_token"] > 0
        assert len(profile["points"]["forward"]) >= 3 and len(profile["points"]["backward"]) >= 3
        late = profile["points"]["late_backward"]      # windows at the end of a sequence, timed too
        assert late["sequence_length"] > max(n for n, _ in late["points"]) and len(late["points"]) >= 2
        assert profile["backward_per_key"] >= 0
        budget = stats["budget"]
        cost = CostModel.from_dict(profile)
        assert budget["tpot_slo_ms"] == 500 and budget["unit"] == "s"
        assert budget["inference_token_budget"] == 256 and budget["max_forward_tokens"] == cost.max_forward_tokens(0.5)
        job = llm.finetune(FinetuneConfig(adapter="ft", peft={"r": 2, "target_modules": ["q_proj"]},
                                          dataset=[{"input_ids": list(range(5, 40))}] * 2, max_steps=1,
                                          batch_size=2))
        out = llm.generate(prompt_token_ids=[[5, 6, 7]], sampling_params=SamplingParams(max_tokens=4))[0]
        assert len(out.token_ids) == 4
        assert job.wait(timeout=120) == "succeeded"
    finally:
        llm.shutdown()
    # A saved profile is loaded, not measured again: edit it and see the edit in the budget. One small
    # forward at start-up rescales it against the profiled time of that size: a profile 8x slower than
    # this machine gives a scale well below 1.
    profile["forward_per_token"] = 0.01
    profile["points"]["forward"] = [[n, 8 * seconds] for n, seconds in profile["points"]["forward"]]
    path.write_text(json.dumps(profile))
    llm = LLM(model=str(tiny_llama_dir), dtype="float32", device="cpu", tpot_slo_ms=500, latency_profile=str(path))
    try:
        budget = llm.stats()["budget"]
        loaded = CostModel.from_dict(profile)
        assert 1 / 16 <= budget["latency_scale"] < 0.5
        loaded.scale = budget["latency_scale"]
        assert budget["max_forward_tokens"] == loaded.max_forward_tokens(0.5) > CostModel.from_dict(profile).max_forward_tokens(0.5)
        assert json.loads(path.read_text()) == profile   # the file itself is left as it was
    finally:
        llm.shutdown()


def _curved_forward(n: int) -> float:
    """A forward whose cost per token grows with the prompt (attention): a line fitted through all the
    profiled sizes runs below the small ones."""
    return 0.016 + 0.0003 * n + 3e-7 * n * n


def test_loaded_profile_scale_compares_the_same_profiled_size(monkeypatch):
    engine = SimpleNamespace(max_model_len=1024, block_manager=BlockManager(64, 16),
                             model=SimpleNamespace(config=SimpleNamespace(vocab_size=100)))
    points = [(n, _curved_forward(n)) for n in (16, 64, 128, 256, 512)]
    cost = CostModel(*_fit_line(points), backward_base=0.01, backward_per_token=0.001)
    timed = []

    def time_forward(engine, blocks, n, vocab):
        timed.append(n)
        return speed * _curved_forward(n)

    monkeypatch.setattr(profiler, "_time_forward", time_forward)
    for speed in (1.0, 1.5, 0.5):
        # The scale is the machine's speed against the profile, not the line's error at small sizes.
        assert profiler.measure_scale(engine, cost, points) == pytest.approx(speed)
    assert set(timed) == {16} and engine.block_manager.num_free_blocks == 64     # its blocks are returned
    # Without measured points the fitted line is the reference, and the curve reads as slower than it is.
    speed = 1.0
    assert profiler.measure_scale(engine, cost) > 1.1


def test_prune_backward_budget_is_every_kept_tensor(tiny_llama_dir):
    import torch

    from coserve.models.checkpoint import resolve_checkpoint
    from coserve.models.loader import load_model

    model = load_model(resolve_checkpoint(str(tiny_llama_dir)), torch.float32, torch.device("cpu"))
    cfg = model.config
    report = prune_backward(model, torch.float32, block_size=16)
    kv = cfg.num_key_value_heads * head_dim_of(cfg)
    layers, hidden = cfg.num_hidden_layers, cfg.hidden_size
    # per layer: its input, K and V in the cache, fp32 dK and dV; then the final gradient and the target id.
    assert report.bytes_per_token == layers * (hidden + 2 * kv + 2 * kv) * 4 + hidden * 4 + 8
    assert report.kv_bytes_per_block == 16 * layers * 2 * kv * 4
    assert model.backward_plan is report


def test_backward_profile_fit_separates_tokens_from_the_keys_they_attend_to():
    # 4 ms + 0.5 ms per token + 2 us per (token x key): windows at a sequence's start and at its end.
    def seconds(n, start):
        return 0.004 + 0.0005 * n + 2e-6 * (n * start + n * (n + 1) // 2)

    points = [(n, 0, seconds(n, 0)) for n in (16, 64, 128, 256)] + [(n, 512 - n, seconds(n, 512 - n))
                                                                     for n in (16, 64, 128)]
    base, per_token, per_key = _fit_backward(points)
    assert (base, per_token, per_key) == (pytest.approx(0.004), pytest.approx(0.0005), pytest.approx(2e-6))
    # Late windows no slower than early ones: no key term, a line in tokens (never a negative cost).
    flat = [(n, start, 0.004 + 0.0005 * n) for n, start, _ in points]
    assert _fit_backward(flat)[2] == pytest.approx(0.0, abs=1e-12)
