"""MultiLoRALinear: a mixed-adapter batch equals each adapter's rows run alone.

Also the plain-base behaviour without a batch, slot copying and validation,
and the context manager resetting the batch even when the forward raises.
"""
import pytest
import torch
from torch import nn

from peft_methods.lora.layer import LoRABatch, LoRAContext, MultiLoRALinear

IN, OUT, SEQ = 16, 12, 3
RANKS = [4, 1, 6]


def make_layer(use_ref, max_loras=4):
    torch.manual_seed(0)
    base = nn.Linear(IN, OUT, bias=True).double()
    context = LoRAContext(use_ref=use_ref)
    layer = MultiLoRALinear(base, max_loras, context)
    g = torch.Generator().manual_seed(1)
    for slot, rank in enumerate(RANKS):
        # fp32 on purpose: set_slot must cast to the base weight's dtype.
        layer.set_slot(slot, torch.randn(rank, IN, generator=g), torch.randn(OUT, rank, generator=g), 0.5 + slot)
    return layer, context


@pytest.mark.parametrize("use_ref", [False, True])
def test_mixed_batch_equals_each_adapter_alone(use_ref):
    layer, context = make_layer(use_ref)
    seq_slots = [0, 0, 1, 2, -1, 3]  # slot 3 is empty: behaves as the base layer
    x = torch.randn(len(seq_slots), SEQ, IN, dtype=torch.float64)  # [B, S, in], rows are B*S tokens
    batch = LoRABatch.from_slots([s for s in seq_slots for _ in range(SEQ)])
    with torch.no_grad(), context.use(batch):
        mixed = layer(x)
    assert context.batch is None
    assert mixed.shape == (len(seq_slots), SEQ, OUT)
    for i, slot in enumerate(seq_slots):
        with torch.no_grad(), context.use(LoRABatch.from_slots([slot] * SEQ)):
            alone = layer(x[i:i + 1])
        torch.testing.assert_close(mixed[i:i + 1], alone, rtol=1e-12, atol=1e-12)
        if slot in (0, 1, 2):
            a, b = layer.lora_a[slot], layer.lora_b[slot]
            expected = layer.base_layer(x[i]) + layer.scalings[slot] * (x[i] @ a.T) @ b.T
            torch.testing.assert_close(mixed[i], expected, rtol=1e-10, atol=1e-12)
        else:
            torch.testing.assert_close(mixed[i], layer.base_layer(x[i]), rtol=1e-10, atol=1e-12)


def test_no_batch_is_the_base_layer():
    layer, _ = make_layer(use_ref=False)
    x = torch.randn(5, IN, dtype=torch.float64)
    torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=0, atol=0)
    assert (layer.in_features, layer.out_features) == (IN, OUT)
    assert layer.weight is layer.base_layer.weight


def test_set_slot_casts_copies_and_validates():
    layer, _ = make_layer(use_ref=False)
    a, b = torch.ones(2, IN), torch.ones(OUT, 2)
    layer.set_slot(3, a, b, 1.0)
    assert layer.lora_a[3].dtype == torch.float64
    a.zero_()
    assert layer.lora_a[3].sum() == 2 * IN  # a copy, not a view of the caller's tensor
    with pytest.raises(ValueError, match="do not fit"):
        layer.set_slot(3, torch.ones(2, IN + 1), torch.ones(OUT, 2), 1.0)
    with pytest.raises(ValueError, match="out of range"):
        layer.set_slot(4, a, b, 1.0)
    layer.clear_slot(3)
    assert layer.lora_a[3] is None and layer.lora_b[3] is None
    assert not any(k.startswith("lora") for k in layer.state_dict())


def test_context_resets_batch_after_error():
    layer, context = make_layer(use_ref=False)
    with pytest.raises(ValueError, match="covers 4 tokens"):
        with context.use(LoRABatch.from_slots([0] * 4)):
            layer(torch.randn(5, IN, dtype=torch.float64))
    assert context.batch is None


def test_batch_validation():
    with pytest.raises(ValueError, match="bad segment"):
        LoRABatch(segments=[(0, 0, 3), (1, 2, 4)], token_slots=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="bad segment"):
        LoRABatch(segments=[(0, 0, 5)], token_slots=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="long tensor"):
        LoRABatch(segments=[], token_slots=torch.zeros(4))
    batch = LoRABatch.from_slots([1, 1, -1, 0])
    assert batch.segments == [(1, 0, 2), (0, 3, 4)]
    assert batch.token_slots.tolist() == [1, 1, -1, 0]
