"""The CPU memory pool (fasterrcnn_ext.memory): reuse inside the scope only, return on free from anywhere, the
limit, and a detector whose detections do not depend on it."""

import gc
import os
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


def test_near_equal_sizes_share_a_block_without_splitting_it():
    with memory.cpu_pool():
        a = torch.empty(BIG, dtype=torch.uint8)
        ptr = a.data_ptr()
        del a
        smaller = torch.empty(BIG - BIG // 8, dtype=torch.uint8)  # the rest (512 KB) would serve no pooled request
        assert smaller.data_ptr() == ptr
        assert memory.cpu_cache_stats().cached_bytes == 0


def test_a_free_block_is_split_for_smaller_requests_and_merges_back():
    with memory.cpu_pool():
        a = torch.empty(4 * BIG, dtype=torch.uint8)
        base = a.data_ptr()
        del a
        before = memory.cpu_cache_stats()
        parts = [torch.empty(BIG, dtype=torch.uint8) for _ in range(4)]
        after = memory.cpu_cache_stats()
        assert (after.hits, after.misses) == (before.hits + 4, before.misses)  # all four from the one free block
        assert sorted(p.data_ptr() for p in parts) == [base + i * BIG for i in range(4)]
        assert after.cached_bytes == 0 and after.in_use_bytes == before.in_use_bytes + 4 * BIG
        for i in (0, 2, 3, 1):  # out of order: each freed block merges with whichever neighbours are free
            parts[i] = None
        assert memory.cpu_cache_stats().cached_bytes == 4 * BIG
        whole = torch.empty(4 * BIG, dtype=torch.uint8)
        assert whole.data_ptr() == base  # merged back into one block
        assert memory.cpu_cache_stats().misses == before.misses


def test_a_segment_goes_back_to_the_system_only_when_wholly_free():
    memory.set_cpu_cache_limit(0)
    with memory.cpu_pool():
        a = torch.empty(2 * BIG, dtype=torch.uint8)
        del a  # over the limit and wholly free: released at once
        assert memory.cpu_cache_stats().cached_bytes == 0
        memory.set_cpu_cache_limit(1 << 30)
        a = torch.empty(2 * BIG, dtype=torch.uint8)
        del a
        first, second = torch.empty(BIG, dtype=torch.uint8), torch.empty(BIG, dtype=torch.uint8)
        memory.set_cpu_cache_limit(0)
        del first  # its segment is still partly in use: kept
        assert memory.cpu_cache_stats().cached_bytes == BIG
        memory.empty_cpu_cache()
        assert memory.cpu_cache_stats().cached_bytes == BIG
        del second  # now wholly free, over the limit: released
        assert memory.cpu_cache_stats().cached_bytes == 0


def test_a_miss_replaces_idle_smaller_segments_by_one_that_holds_them_all():
    with memory.cpu_pool():
        a, b = torch.empty(BIG // 2, dtype=torch.uint8), torch.empty(BIG, dtype=torch.uint8)
        del a, b  # two whole free segments, 6 MB together, neither large enough for what follows
        before = memory.cpu_cache_stats()
        assert before.cached_bytes == BIG + BIG // 2
        c = torch.empty(BIG + BIG // 4, dtype=torch.uint8)
        after = memory.cpu_cache_stats()
        assert after.misses == before.misses + 1
        assert after.cached_bytes == BIG // 4  # the new 6 MB segment's rest: the two old ones went back
        del c
        parts = [torch.empty(BIG // 2, dtype=torch.uint8), torch.empty(BIG, dtype=torch.uint8)]
        assert memory.cpu_cache_stats().misses == after.misses  # both served by the one segment
        assert parts[1].data_ptr() - parts[0].data_ptr() in (BIG // 2, -BIG)
        assert memory.cpu_cache_stats().peak_in_use_bytes >= BIG + BIG // 4


def test_random_allocations_never_overlap():
    """Blocks split, merge and are reused in a random order; each tensor keeps the bytes written to it."""
    gen = torch.Generator().manual_seed(0)
    in_use_before = memory.cpu_cache_stats().in_use_bytes
    live: dict[int, torch.Tensor] = {}
    with memory.cpu_pool():
        for step in range(400):
            if live and torch.rand((), generator=gen) < 0.45:
                key = list(live)[int(torch.randint(len(live), (), generator=gen))]
                t = live.pop(key)
                assert bool((t == key % 251).all()), f"tensor {key} was overwritten"
            else:
                size = int(torch.randint(1 << 20, 6 << 20, (), generator=gen))
                live[step] = torch.full((size,), step % 251, dtype=torch.uint8)
        for key, t in live.items():
            assert bool((t == key % 251).all()), f"tensor {key} was overwritten"
        spans = sorted((t.data_ptr(), t.data_ptr() + t.numel()) for t in live.values())
        assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))
    del t
    live.clear()
    stats = memory.cpu_cache_stats()
    assert stats.in_use_bytes == in_use_before and stats.hits > 0


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


def test_a_training_step_reuses_its_blocks_in_the_next_step():
    """Forward, backward (autograd runs a CPU graph on the calling thread) and the optimizer's update: after the
    first step, every large block a step asks for is one the previous step freed."""
    def seeded_model():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(),
                                    torch.nn.Conv2d(32, 32, 3, padding=1))
        return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    model, optimizer = seeded_model()
    x = torch.rand(2, 3, 96, 96)

    def pooled_so_far():
        stats = memory.cpu_cache_stats()
        return stats.hits + stats.misses

    backward_pooled = []

    def step():
        with memory.cpu_pool():
            loss = model(x).square().mean()
            optimizer.zero_grad(set_to_none=True)
            after_forward = pooled_so_far()
            loss.backward()
            backward_pooled.append(pooled_so_far() - after_forward)
            optimizer.step()
        return loss.detach()

    start = pooled_so_far()
    step()
    assert backward_pooled[0] > 0  # the backward's gradient maps came from the pool too
    first = memory.cpu_cache_stats()
    first_step_allocations = pooled_so_far() - start
    gc.collect()
    step()
    second = memory.cpu_cache_stats()
    assert second.misses == first.misses  # no new block: every one of the second step's came from the pool
    assert second.hits - first.hits == first_step_allocations > 0
    # The same losses as the same steps outside the pool.
    plain, plain_optimizer = seeded_model()
    for _ in range(2):
        plain_loss = plain(x).square().mean()
        plain_optimizer.zero_grad(set_to_none=True)
        plain_loss.backward()
        plain_optimizer.step()
    torch.testing.assert_close(step(), plain(x).square().mean().detach())


def test_training_cache_limit_raises_the_cap_then_empties_and_restores():
    memory.set_cpu_cache_limit(BIG)
    with memory.training_cache_limit():
        assert memory.cpu_cache_stats().limit_bytes == memory.training_cache_limit_bytes() > 2 * BIG
        with memory.cpu_pool():
            blocks = [torch.empty(BIG, dtype=torch.uint8) for _ in range(3)]
        del blocks
        assert memory.cpu_cache_stats().cached_bytes >= 3 * BIG  # beyond the old cap: kept
    after = memory.cpu_cache_stats()
    assert after.limit_bytes == BIG and after.cached_bytes == 0


def test_pool_can_be_paused_inside_a_pooled_scope():
    with memory.cpu_pool():
        before = memory.cpu_cache_stats()
        with memory.cpu_pool(enabled=False):
            kept = torch.empty(BIG, dtype=torch.uint8)  # not pooled: a long-lived tensor
        assert memory.cpu_cache_stats().misses == before.misses
        torch.empty(BIG, dtype=torch.uint8)  # the enclosing scope pools again
        assert memory.cpu_cache_stats().misses == before.misses + 1
    del kept
    assert memory.cpu_cache_stats().cached_bytes == before.cached_bytes + BIG  # only the pooled block came back
    with pytest.raises(ValueError, match="enabled"):
        with memory.cpu_pool(enabled=1):
            pass


def test_release_free_heap_returns_freed_heap_pages():
    """Many blocks below glibc's mmap threshold, freed out of order, stay resident until the heap is trimmed."""
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    # Freeing one large mmap'd block raises glibc's mmap threshold to its size, so the blocks below come from the heap.
    warm = torch.empty(32 << 20, dtype=torch.uint8)
    del warm
    memory.release_free_heap()
    blocks = [torch.ones(256 << 10, dtype=torch.uint8) for _ in range(512)]  # 128 MB of 256 KB heap blocks
    keep = blocks[-1]  # the heap's top stays in use: freeing the rest cannot shrink it from the end
    del blocks
    before = rss()
    released = memory.release_free_heap()
    if not released:
        pytest.skip("the C library has no malloc_trim")
    assert rss() < before - (64 << 20)
    assert keep.sum().item() == 256 << 10
