"""BlockManager bookkeeping and CacheConfig validation (pure Python, no model)."""
import pytest

from coserve.config import CacheConfig
from coserve.engine.kv_cache import BlockManager, NoFreeBlocksError


def test_num_blocks_needed_rounds_up():
    bm = BlockManager(num_blocks=8, block_size=4)
    assert [bm.num_blocks_needed(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_allocate_grows_table_and_never_shrinks():
    bm = BlockManager(num_blocks=8, block_size=4)
    assert bm.allocate("a", 3) == [0]
    assert bm.allocate("a", 4) == [0]          # still fits in block 0
    assert bm.allocate("a", 9) == [0, 1, 2]    # grows to cover [0, 9)
    assert bm.allocate("a", 2) == [0, 1, 2]    # a smaller count changes nothing
    assert bm.block_ids("a") == [0, 1, 2]
    assert bm.num_free_blocks == 5
    assert bm.num_used_blocks == 3
    assert bm.usage == pytest.approx(3 / 8)


def test_requests_get_disjoint_blocks():
    bm = BlockManager(num_blocks=6, block_size=2)
    a = bm.allocate("a", 5)
    b = bm.allocate("b", 6)
    assert len(a) == 3 and len(b) == 3
    assert not set(a) & set(b)
    assert bm.num_free_blocks == 0 and bm.usage == 1.0


def test_can_allocate_counts_only_new_blocks():
    bm = BlockManager(num_blocks=3, block_size=4)
    bm.allocate("a", 8)
    assert bm.can_allocate("a", 12)       # one more block, one is free
    assert not bm.can_allocate("a", 13)   # two more blocks
    assert bm.can_allocate("b", 4)
    assert not bm.can_allocate("b", 5)


def test_allocate_beyond_free_raises_and_allocates_nothing():
    bm = BlockManager(num_blocks=2, block_size=4)
    bm.allocate("a", 4)
    with pytest.raises(NoFreeBlocksError, match="needs 2 more KV blocks, 1 are free"):
        bm.allocate("b", 8)
    assert bm.block_ids("b") == [] and bm.num_free_blocks == 1


def test_free_returns_blocks_and_they_are_reused():
    bm = BlockManager(num_blocks=4, block_size=4)
    bm.allocate("a", 16)
    assert bm.num_free_blocks == 0
    bm.free("a")
    bm.free("a")            # freeing twice, or an unknown id, is a no-op
    bm.free("unknown")
    assert bm.num_free_blocks == 4 and bm.usage == 0.0
    assert bm.block_ids("a") == []
    assert sorted(bm.allocate("b", 16)) == [0, 1, 2, 3]


def test_block_ids_is_a_copy():
    bm = BlockManager(num_blocks=4, block_size=4)
    bm.allocate("a", 4)
    bm.block_ids("a").append(99)
    assert bm.block_ids("a") == [0]


@pytest.mark.parametrize("num_blocks, block_size", [(0, 16), (-1, 16), (4, 0), (4, 2.5)])
def test_block_manager_rejects_bad_sizes(num_blocks, block_size):
    with pytest.raises(ValueError):
        BlockManager(num_blocks, block_size)


def test_cache_config_defaults_and_validation():
    config = CacheConfig()
    assert config.block_size == 16 and config.num_kv_blocks is None
    assert CacheConfig(block_size=8, num_kv_blocks=100).num_kv_blocks == 100
    with pytest.raises(ValueError, match="block_size"):
        CacheConfig(block_size=0)
    with pytest.raises(ValueError, match="num_kv_blocks"):
        CacheConfig(num_kv_blocks=0)
    with pytest.raises(ValueError, match="num_kv_blocks"):
        CacheConfig(num_kv_blocks=True)
