"""Paged KV cache bookkeeping: which blocks each request owns.

Pure Python: the KV tensors live with the runner, which indexes them with the
block tables handed out here. A request's table covers positions
[0, num_tokens) in blocks of `block_size` tokens; it only grows while the
request runs and is returned whole by `free` (finish, abort or preemption).
"""
from __future__ import annotations

from collections import deque


class NoFreeBlocksError(RuntimeError):
    """Raised by `BlockManager.allocate` when the free list is too short."""


class BlockManager:
    """Free list plus one block table per request."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if not isinstance(num_blocks, int) or num_blocks <= 0:
            raise ValueError(f"num_blocks must be a positive integer, got {num_blocks!r}")
        if not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free_block_ids: deque[int] = deque(range(num_blocks))
        self._block_tables: dict[str, list[int]] = {}

    def num_blocks_needed(self, num_tokens: int) -> int:
        """Blocks that hold `num_tokens` tokens (ceil division)."""
        return -(-num_tokens // self.block_size)

    def num_new_blocks_needed(self, request_id: str, num_total_tokens: int) -> int:
        """Blocks to add to the request's table so it covers [0, num_total_tokens)."""
        num_owned = len(self._block_tables.get(request_id, ()))
        return max(0, self.num_blocks_needed(num_total_tokens) - num_owned)

    def can_allocate(self, request_id: str, num_total_tokens: int) -> bool:
        return self.num_new_blocks_needed(request_id, num_total_tokens) <= len(self._free_block_ids)

    def allocate(self, request_id: str, num_total_tokens: int) -> list[int]:
        """Grow the request's table to cover positions [0, num_total_tokens).

        Returns:
            A copy of the request's full block table.
        Raises:
            NoFreeBlocksError: too few free blocks (nothing is allocated then).
        """
        num_new = self.num_new_blocks_needed(request_id, num_total_tokens)
        if num_new > len(self._free_block_ids):
            raise NoFreeBlocksError(
                f"request {request_id!r} needs {num_new} more KV blocks, "
                f"{len(self._free_block_ids)} are free")
        table = self._block_tables.setdefault(request_id, [])
        table.extend(self._free_block_ids.popleft() for _ in range(num_new))
        return list(table)

    def free(self, request_id: str) -> None:
        """Return all of the request's blocks; a request without blocks is a no-op."""
        self._free_block_ids.extend(self._block_tables.pop(request_id, ()))

    def block_ids(self, request_id: str) -> list[int]:
        """A copy of the request's block table (empty if it owns none)."""
        return list(self._block_tables.get(request_id, ()))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_block_ids)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free_block_ids)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, in [0, 1]."""
        return self.num_used_blocks / self.num_blocks
