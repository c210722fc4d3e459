"""The AVX-512 decode-attention kernel equals the torch reference and the SDPA path.

Cases cover both kernel variants (head_dim 64 and 128 with 1, 2 or 4 query heads
per KV head keep everything in registers; head_dim 24 or 3 heads per KV head take
the general one), blocks scattered through the cache, contexts that end inside
a block, sliding windows, and a context of one key. The only skip is a CPU
without AVX-512; on one with it, a failed build fails the test.
"""
import random

import pytest
import torch

from coserve.models.attention import allocate_kv_cache, build_attention_metadata, paged_attention
from coserve.models.decode_attention import DecodeGroup, decode_attention, decode_attention_ref, load_decode_kernel

pytestmark = pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512",
                                reason="the decode-attention kernel needs an AVX-512 CPU")

BLOCK_SIZE, NUM_BLOCKS = 16, 96


@pytest.fixture(scope="module")
def kernel():
    module, why_not = load_decode_kernel()
    assert module is not None, why_not
    return module


def _decodes(context_lens: list[int], seed: int) -> list[tuple[int, int, list[int]]]:
    """(start, 1, block_ids) per decode, each sequence's blocks scattered through the cache."""
    rng = random.Random(seed)
    blocks = list(range(NUM_BLOCKS))
    rng.shuffle(blocks)
    seqs, taken = [], 0
    for length in context_lens:
        needed = -(-length // BLOCK_SIZE)
        seqs.append((length - 1, 1, blocks[taken:taken + needed]))
        taken += needed
    return seqs


def _cache(kv_heads: int, head_dim: int, seed: int):
    cache = allocate_kv_cache(1, NUM_BLOCKS, BLOCK_SIZE, kv_heads, head_dim, torch.float32, torch.device("cpu"))[0]
    gen = torch.Generator().manual_seed(seed)
    cache.key.copy_(torch.randn(cache.key.shape, generator=gen))
    cache.value.copy_(torch.randn(cache.value.shape, generator=gen))
    return cache


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(8, 4, 64), (4, 4, 64), (8, 2, 128), (6, 2, 24), (6, 2, 64)])
@pytest.mark.parametrize("window", [None, 40])
def test_kernel_equals_reference(kernel, heads, kv_heads, head_dim, window):
    lens = [1, 17, 33, 130, 250, 64]
    seqs = _decodes(lens, seed=heads + head_dim)
    cache = _cache(kv_heads, head_dim, seed=head_dim)
    q = torch.randn(len(lens) + 3, heads, head_dim, generator=torch.Generator().manual_seed(1))
    rows = [4, 0, 7, 2, 5, 1]                    # decodes sit anywhere in the flat batch
    group = DecodeGroup.build(rows, [s[2] for s in seqs], lens, window, torch.device("cpu"))
    scale = head_dim ** -0.5
    out = torch.full_like(q, float("nan"))
    decode_attention(kernel, q, cache.key, cache.value, group, scale, out)
    expected = decode_attention_ref(q, cache.key, cache.value, group, scale)
    torch.testing.assert_close(out[group.rows], expected, rtol=1e-5, atol=1e-5)
    untouched = [r for r in range(q.shape[0]) if r not in rows]
    assert torch.isnan(out[untouched]).all()     # only the group's rows are written


def test_reference_equals_sdpa_per_sequence():
    """The reference's semantics are SDPA's: causal attention of the last position over its context."""
    lens = [5, 40, 77]
    seqs = _decodes(lens, seed=3)
    cache = _cache(2, 16, seed=3)
    q = torch.randn(3, 4, 16, generator=torch.Generator().manual_seed(2))
    group = DecodeGroup.build([0, 1, 2], [s[2] for s in seqs], lens, None, torch.device("cpu"))
    got = decode_attention_ref(q, cache.key, cache.value, group, 0.25)
    for b, length in enumerate(lens):
        positions = torch.arange(length)
        slots = torch.tensor(seqs[b][2])[positions // BLOCK_SIZE] * BLOCK_SIZE + positions % BLOCK_SIZE
        keys = cache.key.view(-1, 2, 16)[slots].transpose(0, 1)[None]
        values = cache.value.view(-1, 2, 16)[slots].transpose(0, 1)[None]
        expected = torch.nn.functional.scaled_dot_product_attention(
            q[b][None, :, None, :], keys, values, scale=0.25, enable_gqa=True)[0, :, 0, :]
        torch.testing.assert_close(got[b], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("window", [None, 24])
def test_paged_attention_with_the_kernel_equals_sdpa_path(kernel, window):
    """A mixed batch (a fresh prompt, a chunk after cached context, decodes): same output and cache
    whether decodes go to the kernel or to SDPA."""
    prompt, chunk_start, chunk = 20, 30, 12
    decode_lens = [45, 9, 61]
    seqs = [(0, prompt, [0, 1]), (chunk_start, chunk, [10, 11, 12])]
    first_block = 20
    for length in decode_lens:                 # each decode's blocks in reverse order: not contiguous
        needed = -(-length // BLOCK_SIZE)
        seqs.append((length - 1, 1, list(range(first_block, first_block + needed))[::-1]))
        first_block += needed
    num_tokens = sum(n for _, n, _ in seqs)
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(num_tokens, 8, 32, generator=gen)
    k, v = torch.randn(num_tokens, 4, 32, generator=gen), torch.randn(num_tokens, 4, 32, generator=gen)
    results = []
    for decode_kernel in (None, kernel):
        cache = _cache(4, 32, seed=11)
        meta = build_attention_metadata(seqs, BLOCK_SIZE, window, torch.device("cpu"), decode_kernel=decode_kernel)
        assert (meta.decode_group is not None) == (decode_kernel is not None)
        results.append((paged_attention(q, k, v, cache, meta, 32 ** -0.5), cache.key.clone()))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    assert torch.equal(results[1][1], results[0][1])


def test_autograd_takes_the_reference(kernel):
    """With gradients needed the result comes from torch ops, so it backpropagates."""
    lens = [10, 20]
    seqs = _decodes(lens, seed=9)
    cache = _cache(2, 64, seed=9)
    q = torch.randn(2, 4, 64, requires_grad=True)
    group = DecodeGroup.build([0, 1], [s[2] for s in seqs], lens, None, torch.device("cpu"))
    out = torch.zeros(2, 4, 64)
    decode_attention(kernel, q, cache.key, cache.value, group, 0.125, out)
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0


def test_bad_block_id_is_a_clear_error(kernel):
    cache = _cache(2, 64, seed=0)
    q = torch.randn(1, 4, 64)
    group = DecodeGroup.build([0], [[NUM_BLOCKS + 5]], [3], None, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="block id is outside the cache"):
        decode_attention(kernel, q, cache.key, cache.value, group, 0.125, torch.empty_like(q))


def test_disabled_kernel_reports_why(monkeypatch):
    load_decode_kernel.cache_clear()
    monkeypatch.setenv("COSERVE_DECODE_ATTENTION_KERNEL", "0")
    try:
        module, why_not = load_decode_kernel()
        assert module is None and "COSERVE_DECODE_ATTENTION_KERNEL=0" in why_not
    finally:
        load_decode_kernel.cache_clear()
