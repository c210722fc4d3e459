"""A LoRAGroup of siblings gives the same outputs as each LoRA layer in a group of its own."""
import pytest
import torch
from torch import nn

from peft_methods.lora.layer import LoRABatch, LoRAContext, MultiLoRALinear
from peft_methods.lora.group import LoRAGroup


def _layers(context, seed=0):
    torch.manual_seed(seed)
    bases = [nn.Linear(16, 24).double(), nn.Linear(16, 8).double(), nn.Linear(16, 8).double()]
    return [MultiLoRALinear(b, 3, context) for b in bases]


def _load(layers, seed=1):
    gen = torch.Generator().manual_seed(seed)
    # slot 0: all three members (ranks 2, 4, 3); slot 1: members 0 and 2 only; slot 2: empty.
    for slot, ranks in ((0, (2, 4, 3)), (1, (5, None, 1))):
        for layer, rank in zip(layers, ranks):
            if rank is not None:
                a = torch.randn(rank, 16, generator=gen, dtype=torch.double)
                b = torch.randn(layer.out_features, rank, generator=gen, dtype=torch.double)
                layer.set_slot(slot, a, b, scaling=0.5 + slot)


def test_shared_group_equals_separate_groups():
    plain_ctx, shared_ctx = LoRAContext(), LoRAContext()
    plain, shared = _layers(plain_ctx), _layers(shared_ctx)
    LoRAGroup(shared)
    _load(plain)
    _load(shared)
    x = torch.randn(11, 16, dtype=torch.double)
    slots = [0, 0, 0, 1, 1, -1, -1, 2, 0, 1, 1]
    for _ in range(2):  # a second forward must not reuse the first one's shrink
        batch = LoRABatch.from_slots(slots)
        with plain_ctx.use(batch):
            expected = [layer(x) for layer in plain]
        with shared_ctx.use(batch):
            got = [layer(x) for layer in shared]
        for e, g in zip(expected, got):
            torch.testing.assert_close(g, e, rtol=0, atol=1e-12)
        x = x + 1.0


def test_clearing_a_slot_rebuilds_the_stack():
    context = LoRAContext()
    layers = _layers(context)
    shared = LoRAGroup(layers)
    _load(layers)
    assert shared.a_stack[0].shape == (9, 16) and shared.columns[1][1] is None
    layers[0].clear_slot(0)
    assert shared.a_stack[0].shape == (7, 16) and shared.columns[0][0] is None
    x = torch.randn(4, 16, dtype=torch.double)
    with context.use(LoRABatch.from_slots([0] * 4)):
        torch.testing.assert_close(layers[0](x), layers[0].base_layer(x))


def test_grouping_loaded_layers_keeps_their_slots():
    context = LoRAContext()
    layers = _layers(context)
    _load(layers)
    x = torch.randn(5, 16, dtype=torch.double)
    batch = LoRABatch.from_slots([0, 0, 1, 1, 0])
    with context.use(batch):
        alone = [layer(x) for layer in layers]
    group = LoRAGroup(layers)
    assert group.a_stack[0].shape == (9, 16) and all(layer.group is group for layer in layers)
    with context.use(batch):
        for expected, layer in zip(alone, layers):
            torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)


def test_group_members_must_share_an_input_size():
    context = LoRAContext()
    with pytest.raises(ValueError, match="one input size"):
        LoRAGroup([MultiLoRALinear(nn.Linear(16, 4), 2, context), MultiLoRALinear(nn.Linear(8, 4), 2, context)])
    with pytest.raises(ValueError, match="at least one member"):
        LoRAGroup([])
