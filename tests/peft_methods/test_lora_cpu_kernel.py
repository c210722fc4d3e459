"""The AVX-512 LoRA kernel equals the torch reference op, and the layers route to it.

Sizes are chosen to hit every tail: input widths that are not a multiple of
16, output widths that are not a multiple of 64, odd ranks, segments of 1 to 7
rows, and one segment over KERNEL_MAX_ROWS (left to the GEMM path). The only
skip is a CPU without AVX-512; on one with it, a failed build fails the test.
"""
import pytest
import torch
from torch import nn

from peft_methods.lora.cpu_kernel import KERNEL_MAX_ROWS, kernel_applies, load_cpu_kernel
from peft_methods.lora.group import LoRAGroup
from peft_methods.lora.layer import LoRABatch, LoRAContext, MultiLoRALinear
from peft_methods.lora.ops import lora_apply_ref

pytestmark = pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512",
                                reason="the LoRA CPU kernel needs an AVX-512 CPU")


@pytest.fixture(scope="module")
def kernel():
    module, why_not = load_cpu_kernel()
    assert module is not None, why_not
    return module


def _slots_tensors(ranks, in_features, out_features, seed):
    g = torch.Generator().manual_seed(seed)
    lora_a, lora_b = [], []
    for rank in ranks:
        if rank is None:
            lora_a.append(None)
            lora_b.append(None)
            continue
        lora_a.append(torch.randn(rank, in_features, generator=g))
        lora_b.append(torch.randn(out_features, rank, generator=g))
    scalings = [0.5 + 0.25 * i for i in range(len(ranks))]
    return lora_a, lora_b, scalings


@pytest.mark.parametrize("in_features,out_features", [(37, 70), (64, 128), (16, 1), (130, 200)])
def test_kernel_equals_reference(kernel, in_features, out_features):
    ranks = [3, 1, None, 17, 8, 64]
    lora_a, lora_b, scalings = _slots_tensors(ranks, in_features, out_features, seed=in_features)
    layer = MultiLoRALinear(nn.Linear(in_features, out_features), len(ranks), LoRAContext(use_cpu_kernel=True))
    for slot, (a, b) in enumerate(zip(lora_a, lora_b)):
        if a is not None:
            layer.set_slot(slot, a, b, scalings[slot])
    slots = [0] * 1 + [1] * 2 + [-1] * 2 + [3] * 5 + [2] * 3 + [4] * 7 + [5] * 4 + [0] * (KERNEL_MAX_ROWS + 3)
    x = torch.randn(len(slots), in_features)
    base = layer.base_layer(x).detach()
    expected = lora_apply_ref(base.clone(), x, torch.tensor(slots), lora_a, lora_b, scalings)
    batch = LoRABatch.from_slots(slots)
    assert batch.kernel_plan.num_kernel_segments == 6 and len(batch.kernel_plan.large) == 1
    with torch.no_grad(), layer.context.use(batch):
        got = layer(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    untouched = torch.tensor(slots) == -1
    assert torch.equal(got[untouched], base[untouched])


def test_kernel_group_follows_slot_changes(kernel):
    """Slots set, replaced and cleared after the kernel's copy of the weights was made reach the kernel."""
    layer = MultiLoRALinear(nn.Linear(40, 72), 3, LoRAContext(use_cpu_kernel=True))
    (a0, a1, a2), (b0, b1, b2), _ = _slots_tensors([4, 6, 2], 40, 72, seed=3)
    layer.set_slot(0, a0, b0, 0.5)
    slots = [0, 0, 1, 1, 1, 2]
    x = torch.randn(len(slots), 40)

    def check():
        batch = LoRABatch.from_slots(slots)
        with torch.no_grad(), layer.context.use(batch):
            got = layer(x)
        expected = lora_apply_ref(layer.base_layer(x).detach(), x, batch.token_slots, layer.lora_a, layer.lora_b,
                                  layer.scalings)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)

    check()                       # builds the kernel's group with slot 0 only
    layer.set_slot(1, a1, b1, 2.0)
    layer.set_slot(2, a2, b2, 1.0)
    check()
    layer.set_slot(0, a1[:, :].clone(), torch.randn(72, 6), 0.25)   # a new rank in a used slot
    layer.clear_slot(2)
    check()


def test_kernel_group_checks_its_inputs(kernel):
    group = kernel.LoRAGroup(16, [8, 4], 2)
    with pytest.raises(RuntimeError, match="contiguous"):
        group.set_slot(0, torch.randn(3, 32)[:, ::2], [0, -1], [torch.randn(3, 8), None], [1.0, 1.0])
    with pytest.raises(RuntimeError, match="needs its B"):
        group.set_slot(0, torch.randn(3, 16), [0, 1], [torch.randn(1, 8), None], [1.0, 1.0])
    with pytest.raises(RuntimeError, match="does not fit"):
        group.set_slot(0, torch.randn(3, 16), [0, -1], [torch.randn(3, 7), None], [1.0, 1.0])
    with pytest.raises(RuntimeError, match="out of range"):
        group.clear_slot(2)
    group.set_slot(0, torch.randn(3, 16), [0, 2], [torch.randn(2, 8), torch.randn(1, 4)], [1.0, 1.0])
    x = torch.randn(5, 16)
    with pytest.raises(RuntimeError, match="bad segment"):
        group.shrink(x, torch.tensor([[0, 3, 9]]))
    with pytest.raises(RuntimeError, match="int64"):
        group.shrink(x, torch.tensor([[0.0, 0.0, 2.0]]))
    with pytest.raises(RuntimeError, match="columns"):
        group.shrink(torch.randn(5, 15), torch.tensor([[0, 0, 2]]))
    plan = torch.tensor([[0, 0, 2], [1, 2, 5]])     # slot 1 is empty: no h, no delta
    h = group.shrink(x, plan)
    assert h.shape == (2 * 3,)
    with pytest.raises(RuntimeError, match="not this group's shrink"):
        group.expand(0, torch.zeros(5, 8), h[:-1], plan)
    with pytest.raises(RuntimeError, match="outputs"):
        group.expand(1, torch.zeros(5, 8), h, plan)
    y = torch.zeros(5, 4)
    group.expand(1, y, h, plan)
    assert torch.equal(y[2:], torch.zeros(3, 4)) and y[:2].abs().sum() > 0


def test_kernel_shrink_and_expand_check_their_inputs(kernel):
    x = torch.randn(4, 16)
    with pytest.raises(RuntimeError, match="float32"):
        kernel.lora_shrink(x.double(), [0], [4], [torch.randn(2, 16).double()])
    with pytest.raises(RuntimeError, match="bad segment"):
        kernel.lora_shrink(x, [2], [9], [torch.randn(2, 16)])
    with pytest.raises(RuntimeError, match=r"\[R, in\]"):
        kernel.lora_shrink(x, [0], [4], [torch.randn(2, 15)])


def test_kernel_applies_only_to_fp32_rows_without_autograd():
    x, y = torch.randn(3, 8), torch.randn(3, 4)
    assert kernel_applies(y, x)
    assert not kernel_applies(y.double(), x.double())
    assert not kernel_applies(y, x.T.contiguous().T)          # columns not contiguous
    assert not kernel_applies(y, x.clone().requires_grad_())  # autograd must see the op
    with torch.no_grad():
        assert kernel_applies(y, x.clone().requires_grad_())


def _members(context, seed=0):
    torch.manual_seed(seed)
    return [MultiLoRALinear(nn.Linear(40, out), 3, context) for out in (72, 24, 24)]


def _load(layers, seed=1):
    g = torch.Generator().manual_seed(seed)
    for slot, ranks in ((0, (2, 5, 3)), (1, (9, None, 1))):
        for layer, rank in zip(layers, ranks):
            if rank is not None:
                layer.set_slot(slot, torch.randn(rank, 40, generator=g), torch.randn(layer.out_features, rank,
                                                                                    generator=g), 0.5 + slot)


@pytest.mark.parametrize("shared", [False, True])
def test_layers_on_the_kernel_path_equal_the_reference_path(kernel, shared):
    ref_context, kernel_context = LoRAContext(use_ref=True), LoRAContext(use_cpu_kernel=True)
    assert kernel_context.cpu_kernel is kernel and "AVX-512 kernel" in kernel_context.path
    ref_layers, kernel_layers = _members(ref_context), _members(kernel_context)
    if shared:
        LoRAGroup(kernel_layers)
    _load(ref_layers)
    _load(kernel_layers)
    slots = [0, 0, 1, -1, 2, 1, 1, 1] + [0] * (KERNEL_MAX_ROWS + 1) + [1, 0]
    x = torch.randn(len(slots), 40)
    batch = LoRABatch.from_slots(slots)
    with torch.no_grad():
        with ref_context.use(batch):
            expected = [layer(x) for layer in ref_layers]
        with kernel_context.use(batch):
            got = [layer(x) for layer in kernel_layers]
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-4)


def test_disabled_kernel_falls_back_to_the_grouped_path(monkeypatch):
    load_cpu_kernel.cache_clear()
    monkeypatch.setenv("COSERVE_LORA_CPU_KERNEL", "0")
    try:
        context = LoRAContext(use_cpu_kernel=True)
        assert context.cpu_kernel is None and "COSERVE_LORA_CPU_KERNEL=0" in context.path
    finally:
        load_cpu_kernel.cache_clear()
