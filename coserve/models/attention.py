"""Attention over a paged KV cache for a flat batch of mixed sequences.

One iteration's tokens are a flat [num_tokens] batch holding decodes (one new
token each) and prefill chunks (several new tokens, maybe after cached
context). The runner builds `AttentionMetadata` once per iteration; every layer
reuses it. New K/V rows are written into the cache at `slot_mapping`
(slot = block_id * block_size + offset); queries then attend to their sequence's
cached context. Prefill chunks run one SDPA call each. Decodes all go to one call of
the CPU decode kernel when the runner has it (`decode_attention.py`); otherwise a
decode whose blocks are contiguous attends through a view of the cache, and the
others are bucketed by length into padded SDPA calls.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from coserve.models.decode_attention import DecodeGroup, decode_attention


@dataclass
class LayerKVCache:
    key: torch.Tensor    # [num_blocks, block_size, num_kv_heads, head_dim]
    value: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]


def allocate_kv_cache(num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                      head_dim: int, dtype: torch.dtype, device: torch.device) -> list[LayerKVCache]:
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return [LayerKVCache(torch.zeros(shape, dtype=dtype, device=device),
                         torch.zeros(shape, dtype=dtype, device=device)) for _ in range(num_layers)]


def kv_cache_bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                             dtype: torch.dtype) -> int:
    return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


@dataclass
class SequenceSpan:
    """New tokens of one sequence, rows [q_start, q_end) of the batch, attended in their own call."""

    q_start: int
    q_end: int
    start_position: int           # tokens of this sequence already cached before these rows
    first_slot: int | None        # the context is cache slots [first_slot, first_slot + context_len) ...
    block_table: torch.Tensor | None  # ... or, when its blocks are not contiguous, these blocks
    mask: torch.Tensor | None     # [q_len, context_len] bool, or None (see is_causal)
    is_causal: bool               # True: square causal over the new rows only (nothing cached before)

    @property
    def context_len(self) -> int:
        return self.start_position + self.q_end - self.q_start


@dataclass
class DecodeBatch:
    """Single-token sequences of similar context length, attended in one padded call."""

    rows: torch.Tensor            # [B] long, row of each decode token in the flat batch
    block_tables: torch.Tensor    # [B, max_blocks] long, padded with block 0
    mask: torch.Tensor            # [B, 1, 1, max_blocks * block_size] bool


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor    # [num_tokens] long
    spans: list[SequenceSpan]
    """Prefill chunks, and decodes whose context is contiguous in the cache (read as a view)."""
    decodes: list[DecodeBatch]
    """Other decodes, gathered and bucketed by context length so padding stays small."""
    decode_group: DecodeGroup | None = None
    """With the decode kernel: every decode, attended in one kernel call per layer."""
    decode_kernel: object | None = None
    """The decode kernel's module (`decode_attention.load_decode_kernel`), or None."""


# A decode joins a bucket while its block count is at least this fraction of the bucket's longest.
_DECODE_BUCKET_FILL = 0.8


def _visible(query_pos: torch.Tensor, key_pos: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    """Boolean mask [queries, keys] of keys visible to each query: causal, optional window."""
    mask = key_pos[None, :] <= query_pos[:, None]
    if sliding_window is not None:
        mask &= key_pos[None, :] > query_pos[:, None] - sliding_window
    return mask


def build_attention_metadata(seqs: list[tuple[int, int, list[int]]], block_size: int,
                             sliding_window: int | None, device: torch.device,
                             decode_views: bool | None = None, decode_kernel=None) -> AttentionMetadata:
    """Build the per-iteration metadata.

    Args:
        seqs: one (start_position, num_new_tokens, block_ids) per sequence, in batch row order.
        decode_views: attend a decode whose blocks are contiguous through a view of the cache, one
            call per sequence. Default: on the CPU, where gathering blocks costs more than the extra
            calls (measured 5x); not on CUDA, where the calls are what costs and gathers are cheap.
        decode_kernel: the CPU decode kernel's module: every decode then goes to one call of it
            per layer (a decode is one new token after cached ones).
    """
    if decode_views is None:
        decode_views = torch.device(device).type == "cpu"
    slots: list[int] = []
    spans: list[SequenceSpan] = []
    decode_rows: list[int] = []
    decode_tables: list[list[int]] = []
    decode_lens: list[int] = []
    row = 0
    for start, num_new, block_ids in seqs:
        for pos in range(start, start + num_new):
            slots.append(block_ids[pos // block_size] * block_size + pos % block_size)
        context_len = start + num_new
        table = block_ids[: -(-context_len // block_size)]
        contiguous = table == list(range(table[0], table[0] + len(table)))
        needs_window = sliding_window is not None and context_len > sliding_window
        if start == 0 and not needs_window:
            spans.append(SequenceSpan(row, row + num_new, 0, None, None, None, is_causal=True))
        elif num_new == 1 and (decode_kernel is not None or not (contiguous and decode_views)):
            decode_rows.append(row)
            decode_tables.append(table)
            decode_lens.append(context_len)
        else:
            mask = None
            if num_new > 1 or needs_window:
                query_pos = torch.arange(start, context_len, device=device)
                mask = _visible(query_pos, torch.arange(context_len, device=device), sliding_window)
            first_slot = table[0] * block_size if contiguous else None
            gather = None if contiguous else torch.tensor(table, dtype=torch.long, device=device)
            spans.append(SequenceSpan(row, row + num_new, start, first_slot, gather, mask, is_causal=False))
        row += num_new
    slot_mapping = torch.tensor(slots, dtype=torch.long, device=device)
    if decode_kernel is not None:
        group = (DecodeGroup.build(decode_rows, decode_tables, decode_lens, sliding_window, device)
                 if decode_rows else None)
        return AttentionMetadata(slot_mapping, spans, [], group, decode_kernel)
    buckets = _bucket_by_length(list(range(len(decode_rows))), [len(t) for t in decode_tables])
    decodes = []
    for bucket in buckets:
        max_blocks = max(len(decode_tables[i]) for i in bucket)
        tables = torch.tensor([decode_tables[i] + [0] * (max_blocks - len(decode_tables[i])) for i in bucket],
                              dtype=torch.long, device=device)
        lens = torch.tensor([decode_lens[i] for i in bucket], device=device)
        key_pos = torch.arange(max_blocks * block_size, device=device)
        mask = _visible(lens - 1, key_pos, sliding_window)      # [B, max_keys]; also hides padding
        rows = torch.tensor([decode_rows[i] for i in bucket], dtype=torch.long, device=device)
        decodes.append(DecodeBatch(rows, tables, mask[:, None, None, :]))
    return AttentionMetadata(slot_mapping, spans, decodes)


def _bucket_by_length(items: list[int], lengths: list[int]) -> list[list[int]]:
    """Group items, longest first, into buckets whose shortest is >= _DECODE_BUCKET_FILL x longest."""
    buckets: list[list[int]] = []
    for i in sorted(items, key=lambda i: -lengths[i]):
        if buckets and lengths[i] >= _DECODE_BUCKET_FILL * lengths[buckets[-1][0]]:
            buckets[-1].append(i)
        else:
            buckets.append([i])
    return buckets


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerKVCache,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [num_tokens, heads, head_dim]; k, v: [num_tokens, kv_heads, head_dim] -> [num_tokens, heads, head_dim]."""
    num_blocks, block_size, kv_heads, head_dim = cache.key.shape
    cache.key.view(-1, kv_heads, head_dim).index_copy_(0, meta.slot_mapping, k)
    cache.value.view(-1, kv_heads, head_dim).index_copy_(0, meta.slot_mapping, v)
    out = torch.empty_like(q)
    flat_key = cache.key.view(-1, kv_heads, head_dim)
    flat_value = cache.value.view(-1, kv_heads, head_dim)
    for span in meta.spans:
        q_chunk = q[span.q_start:span.q_end].transpose(0, 1)[None]          # [1, heads, q_len, d]
        if span.is_causal:
            # NOTE: a fresh prefill attends only to its own new rows, no cache read needed.
            k_ctx, v_ctx = k[span.q_start:span.q_end], v[span.q_start:span.q_end]
        elif span.first_slot is not None:
            # Contiguous blocks: the context is a view of the cache, no copy.
            k_ctx = flat_key[span.first_slot:span.first_slot + span.context_len]
            v_ctx = flat_value[span.first_slot:span.first_slot + span.context_len]
        else:
            k_ctx = cache.key.index_select(0, span.block_table).flatten(0, 1)[:span.context_len]
            v_ctx = cache.value.index_select(0, span.block_table).flatten(0, 1)[:span.context_len]
        k_ctx = k_ctx.transpose(0, 1)[None]                                  # [1, kv_heads, ctx, d]
        v_ctx = v_ctx.transpose(0, 1)[None]
        o = F.scaled_dot_product_attention(q_chunk, k_ctx, v_ctx, attn_mask=span.mask,
                                           is_causal=span.is_causal, scale=scale, enable_gqa=True)
        out[span.q_start:span.q_end] = o[0].transpose(0, 1)
    for d in meta.decodes:
        batch, max_blocks = d.block_tables.shape
        k_ctx = cache.key.index_select(0, d.block_tables.flatten()).view(batch, max_blocks * block_size, kv_heads, head_dim)
        v_ctx = cache.value.index_select(0, d.block_tables.flatten()).view(batch, max_blocks * block_size, kv_heads, head_dim)
        q_dec = q.index_select(0, d.rows)[:, :, None, :]                   # [B, heads, 1, d]
        o = F.scaled_dot_product_attention(q_dec, k_ctx.transpose(1, 2), v_ctx.transpose(1, 2),
                                           attn_mask=d.mask, scale=scale, enable_gqa=True)
        out.index_copy_(0, d.rows, o[:, :, 0, :])
    if meta.decode_group is not None:
        decode_attention(meta.decode_kernel, q, cache.key, cache.value, meta.decode_group, scale, out)
    return out
