"""lora_apply_grouped equals lora_apply_ref, and both equal a per-row loop.

Heterogeneous ranks, empty slots and no-adapter rows, in fp64 so the
tolerance can be tight.
"""
import pytest
import torch

from peft_methods.lora.ops import lora_apply_grouped, lora_apply_ref, segments_from_slots

IN, OUT = 24, 40
RANKS = [2, 7, None, 3]  # slot 2 empty: an adapter that does not target this layer


def make_slots(seed=0):
    g = torch.Generator().manual_seed(seed)
    lora_a = [None if r is None else torch.randn(r, IN, generator=g, dtype=torch.float64) for r in RANKS]
    lora_b = [None if r is None else torch.randn(OUT, r, generator=g, dtype=torch.float64) for r in RANKS]
    scalings = [0.5, 2.0, 1.0, 1 / 3]
    return lora_a, lora_b, scalings


def loop_ref(y, x, slots, lora_a, lora_b, scalings):
    y = y.clone()
    for t, s in enumerate(slots):
        if s >= 0 and lora_a[s] is not None:
            y[t] += scalings[s] * (x[t] @ lora_a[s].T) @ lora_b[s].T
    return y


def test_segments_from_slots():
    assert segments_from_slots([]) == []
    assert segments_from_slots([-1, -1]) == []
    assert segments_from_slots([0, 0, -1, 1, 1, 1, 0]) == [(0, 0, 2), (1, 3, 6), (0, 6, 7)]
    assert segments_from_slots([3]) == [(3, 0, 1)]


def test_ref_matches_loop_on_unsorted_rows():
    lora_a, lora_b, scalings = make_slots()
    slots = [1, -1, 0, 3, 1, 2, -1, 0, 3, 3, 1]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(len(slots), IN, generator=g, dtype=torch.float64)
    y0 = torch.randn(len(slots), OUT, generator=g, dtype=torch.float64)
    y = y0.clone()
    out = lora_apply_ref(y, x, torch.tensor(slots), lora_a, lora_b, scalings)
    assert out is y
    torch.testing.assert_close(y, loop_ref(y0, x, slots, lora_a, lora_b, scalings), rtol=1e-12, atol=1e-12)
    untouched = [t for t, s in enumerate(slots) if s in (-1, 2)]
    torch.testing.assert_close(y[untouched], y0[untouched], rtol=0, atol=0)


@pytest.mark.parametrize("slots", [
    [0, 0, 0, 1, 1, 3, 3, 3, 3, -1, -1],     # sorted, base rows last
    [-1, 1, 1, 1, 2, 2, 0],                  # base rows first, an empty slot's segment
    [3, 3, -1, 0, 0, 1],                     # a gap of base rows between segments
    [-1, -1, -1],                            # no adapter at all
])
def test_grouped_matches_ref(slots):
    lora_a, lora_b, scalings = make_slots(seed=2)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(len(slots), IN, generator=g, dtype=torch.float64)
    y0 = torch.randn(len(slots), OUT, generator=g, dtype=torch.float64)
    y_ref = lora_apply_ref(y0.clone(), x, torch.tensor(slots), lora_a, lora_b, scalings)
    y_grouped = y0.clone()
    out = lora_apply_grouped(y_grouped, x, segments_from_slots(slots), lora_a, lora_b, scalings)
    assert out is y_grouped
    torch.testing.assert_close(y_grouped, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y_grouped, loop_ref(y0, x, slots, lora_a, lora_b, scalings), rtol=1e-12, atol=1e-12)


def test_grouped_updates_a_row_view_in_place():
    # The layer passes views of its output; the update must land in the base tensor.
    lora_a, lora_b, scalings = make_slots()
    x = torch.randn(2, 3, IN, dtype=torch.float64)
    y = torch.zeros(2, 3, OUT, dtype=torch.float64)
    lora_apply_grouped(y.view(-1, OUT), x.view(-1, IN), [(1, 0, 6)], lora_a, lora_b, scalings)
    expected = scalings[1] * (x.view(-1, IN) @ lora_a[1].T) @ lora_b[1].T
    torch.testing.assert_close(y.view(-1, OUT), expected, rtol=1e-12, atol=1e-12)


def test_ref_rejects_slot_out_of_range():
    lora_a, lora_b, scalings = make_slots()
    with pytest.raises(ValueError, match="slots \\[9\\]"):
        lora_apply_ref(torch.zeros(1, OUT, dtype=torch.float64), torch.zeros(1, IN, dtype=torch.float64),
                       torch.tensor([9]), lora_a, lora_b, scalings)
