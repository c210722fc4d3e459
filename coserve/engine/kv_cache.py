"""Paged KV cache bookkeeping: which blocks each request owns.

Pure Python: the KV tensors live with the runner, which indexes them with the
block tables handed out here. A request's table covers positions
[0, num_tokens) in blocks of `block_size` tokens; it only grows while the
request runs and is returned whole by `free` (finish, abort or preemption).

Tables may hold any blocks, but the allocator prefers contiguous runs: a
growing request takes the block right after its last one when it is free, and a
new request starts in the middle of the largest free run, leaving room for the
request before it to grow. A contiguous table lets attention read a sequence's
K/V as a view of the cache instead of gathering its blocks.
"""
from __future__ import annotations


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
        self._free_block_ids: set[int] = set(range(num_blocks))
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
        for _ in range(num_new):
            block = self._next_block(table[-1] if table else None)
            self._free_block_ids.remove(block)
            table.append(block)
        return list(table)

    def _next_block(self, last: int | None) -> int:
        if last is not None and last + 1 in self._free_block_ids:
            return last + 1
        start, length = self._largest_free_run()
        # NOTE: a run that starts at block 0 has no owner before it that could grow into it.
        return start if start == 0 else start + length // 2

    def _largest_free_run(self) -> tuple[int, int]:
        best = (0, 0)
        run_start, previous = None, None
        for block in sorted(self._free_block_ids):
            if previous is None or block != previous + 1:
                run_start = block
            previous = block
            if block - run_start + 1 > best[1]:
                best = (run_start, block - run_start + 1)
        return best

    def free(self, request_id: str) -> None:
        """Return all of the request's blocks; a request without blocks is a no-op."""
        self._free_block_ids.update(self._block_tables.pop(request_id, ()))

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
