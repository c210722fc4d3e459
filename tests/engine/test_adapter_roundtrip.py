"""Adapters cross between coserve and peft both ways with the same logits.

peft -> coserve: an adapter saved by peft, loaded by the engine, gives the peft
model's logits. coserve -> peft: the engine's `save_adapter` output loads in
`peft.PeftModel.from_pretrained` and gives the same logits again.
"""
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from coserve import LLM
from peft_methods.lora.layer import LoRABatch
from tests.helpers import PagedRunner, make_peft_adapter_dir


def _engine_logits(llm: LLM, ids: list[int], adapter: str) -> torch.Tensor:
    engine = llm.engine
    slot = llm._loop.call(lambda: engine.adapters.activate({adapter}))[adapter]
    runner = PagedRunner(engine.model, num_seqs=1, max_len=len(ids))
    with engine.lora_context.use(LoRABatch.from_slots([slot] * len(ids))):
        return runner.step({0: ids})[0]


@torch.inference_mode()
def _peft_logits(model_dir, adapter_dir, ids):
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    return model(torch.tensor([ids])).logits[0]


def test_peft_to_coserve_to_peft(tiny_qwen2_dir, tmp_path):
    peft_dir = make_peft_adapter_dir(tiny_qwen2_dir, tmp_path / "from-peft", seed=3, r=6, lora_alpha=12,
                                     target_modules="all-linear", rank_pattern={"down_proj": 2},
                                     alpha_pattern={"q_proj": 3.0})
    ids = list(range(10, 40))
    expected = _peft_logits(tiny_qwen2_dir, peft_dir, ids)
    llm = LLM(model=str(tiny_qwen2_dir), dtype="float32", device="cpu")
    try:
        llm.load_adapter("a", peft_dir)
        torch.testing.assert_close(_engine_logits(llm, ids, "a"), expected, atol=1e-4, rtol=0)
        saved = tmp_path / "from-coserve"
        llm.save_adapter("a", str(saved))
        torch.testing.assert_close(_peft_logits(tiny_qwen2_dir, saved, ids), expected, atol=1e-5, rtol=0)
        # And the engine reads its own output back the same.
        llm.load_adapter("b", str(saved))
        torch.testing.assert_close(_engine_logits(llm, ids, "b"), expected, atol=1e-4, rtol=0)
    finally:
        llm.shutdown()
    base = AutoModelForCausalLM.from_pretrained(str(tiny_qwen2_dir), dtype=torch.float32)
    with torch.inference_mode():
        base_logits = base(torch.tensor([ids])).logits[0]
    assert (base_logits - expected).abs().max() > 1e-2  # the adapter changes the output
