"""The CPU memory pool (fasterrcnn_ext.memory): reuse inside the scope only, return on free from anywhere, the
limit, and a detector whose detections do not depend on it."""

import gc
import threading

import pytest
import torch

from fasterrcnn_ext import memory

BIG = 4 << 20  # bytes: above the 1 MB pooling threshold
SMALL = 64 << 10  # bytes: below it


@pytest.fixture(autouse=True)
def fresh_pool():
    gc.collect()  # pooled tensors of earlier tests are freed now, not in the middle of a test
    memory.empty_cpu_cache()
    limit = memory.cpu_cache_stats().limit_bytes
    yield
    memory.set_cpu_cache_limit(limit)
    memory.empty_cpu_cache()


def test_blocks_are_reused_inside_the_scope():
    with memory.cpu_pool():
        a = torch.empty(BIG, dtype=torch.uint8)
        ptr = a.data_ptr()
        before = memory.cpu_cache_stats()
        del a
        assert memory.cpu_cache_stats().cached_bytes >= BIG
        b = torch.empty(BIG, dtype=torch.uint8)
        after = memory.cpu_cache_stats()
    assert memory.cpu_cache_stats().active
    assert b.data_ptr() == ptr
    assert after.hits == before.hits + 1


def test_reused_blocks_hold_what_the_new_tensor_says():
    with memory.cpu_pool():
        a = torch.full((BIG // 4,), 7.0)
        del a
        z = torch.zeros(BIG // 4)
        r = torch.arange(BIG // 4, dtype=torch.float32)
    assert z.abs().sum().item() == 0
    assert torch.equal(r, torch.arange(BIG // 4, dtype=torch.float32))


def test_nothing_is_pooled_outside_the_scope_or_below_the_threshold():
    before = memory.cpu_cache_stats()
    a = torch.empty(BIG, dtype=torch.uint8)
    with memory.cpu_pool():
        s = torch.empty(SMALL, dtype=torch.uint8)
    del a, s
    after = memory.cpu_cache_stats()
    assert (after.hits, after.misses, after.cached_bytes) == (before.hits, before.misses, 0)


def test_other_threads_are_not_pooled():
    before = memory.cpu_cache_stats()
    with memory.cpu_pool():
        t = threading.Thread(target=lambda: torch.empty(BIG, dtype=torch.uint8))
        t.start()
        t.join()
    assert memory.cpu_cache_stats().misses == before.misses


def test_a_block_freed_outside_the_scope_or_on_another_thread_returns_to_the_pool():
    with memory.cpu_pool():
        a = torch.empty(BIG, dtype=torch.uint8)
        b = torch.empty(BIG, dtype=torch.uint8)
    in_use = memory.cpu_cache_stats().in_use_bytes
    del a
    assert memory.cpu_cache_stats().cached_bytes >= BIG
    holder = [b]
    del b
    t = threading.Thread(target=holder.clear)
    t.start()
    t.join()
    stats = memory.cpu_cache_stats()
    assert stats.cached_bytes >= 2 * BIG and stats.in_use_bytes == in_use - 2 * BIG


def test_scopes_nest_and_restore():
    with memory.cpu_pool():
        with memory.cpu_pool():
            pass
        before = memory.cpu_cache_stats().misses
        torch.empty(BIG, dtype=torch.uint8)  # still inside the outer scope: pooled
        assert memory.cpu_cache_stats().misses == before + 1
    before = memory.cpu_cache_stats().misses
    torch.empty(BIG, dtype=torch.uint8)
    assert memory.cpu_cache_stats().misses == before


def test_limit_and_empty_cache():
    memory.set_cpu_cache_limit(0)
    with memory.cpu_pool():
        a = torch.empty(BIG, dtype=torch.uint8)
    del a
    assert memory.cpu_cache_stats().cached_bytes == 0  # over the limit: released to the system
    memory.set_cpu_cache_limit(1 << 30)
    with memory.cpu_pool():
        a = torch.empty(BIG, dtype=torch.uint8)
    del a
    assert memory.cpu_cache_stats().cached_bytes >= BIG
    memory.empty_cpu_cache()
    assert memory.cpu_cache_stats().cached_bytes == 0


@pytest.mark.parametrize("bad", [-1, 1.5, "1GB", True])
def test_bad_limit_is_refused(bad):
    with pytest.raises(ValueError, match="limit_bytes"):
        memory.set_cpu_cache_limit(bad)


def test_sizes_share_blocks_only_within_a_quarter():
    with memory.cpu_pool():
        a = torch.empty(BIG, dtype=torch.uint8)
        ptr = a.data_ptr()
        del a
        smaller = torch.empty(BIG - BIG // 8, dtype=torch.uint8)  # 12.5% smaller: reuses the block
        assert smaller.data_ptr() == ptr
        del smaller
        much_smaller = torch.empty(BIG // 2, dtype=torch.uint8)  # half: a new block
        assert much_smaller.data_ptr() != ptr


def test_detector_inference_is_the_same_with_and_without_the_pool():
    from fasterrcnn_ext.models.detection import fasterrcnn_tiny

    torch.manual_seed(0)
    model = fasterrcnn_tiny(box_score_thresh=0.0).eval()
    images = [torch.rand(3, 480, 640), torch.rand(3, 400, 600)]
    with torch.no_grad():
        model.reuse_cpu_memory = False
        expected = model(images)
        model.reuse_cpu_memory = True
        before = memory.cpu_cache_stats()
        first, second = model(images), model(images)
    after = memory.cpu_cache_stats()
    assert after.misses > before.misses and after.hits > before.hits  # the forward ran pooled, and reused
    for got in (first, second):
        for a, b in zip(got, expected):
            assert a.keys() == b.keys()
            for k in a:
                torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
