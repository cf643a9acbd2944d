"""Prefetcher: the same batches as building them in the loop, bounded look-ahead, worker errors raised in the
consumer with their traceback, and a thread that always ends."""

import threading
import time
import traceback

import pytest
import torch

from fastlm.data.prefetch import Prefetcher


def build(key: tuple[int, int]) -> dict[str, torch.Tensor]:
    """A batch that is a pure function of its key, as the batch sources' are."""
    epoch, index = key
    generator = torch.Generator().manual_seed(1000 * epoch + index)
    return {"input_ids": torch.randint(0, 50, (3, 8), generator=generator), "lengths": torch.tensor([8, 5, 2])}


KEYS = [(epoch, index) for epoch in range(2) for index in range(5)]


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.001)


def test_prefetched_batches_equal_the_batches_built_in_the_loop():
    with Prefetcher(build, iter(KEYS), depth=3) as prefetcher:
        for key in KEYS:
            batch, expected = prefetcher.get(key), build(key)
            assert batch.keys() == expected.keys()
            assert all(torch.equal(batch[name], expected[name]) for name in expected)
        with pytest.raises(RuntimeError, match="after the last key"):
            prefetcher.get((2, 0))
    assert not prefetcher._thread.is_alive()


@pytest.mark.parametrize("depth", [1, 3])
def test_the_thread_builds_at_most_depth_batches_ahead(depth):
    built = []
    prefetcher = Prefetcher(lambda key: built.append(key) or build(key), iter(KEYS), depth=depth)
    # `depth` batches wait in the queue and one more is built, its `put` blocked until the consumer takes one.
    wait_for(lambda: len(built) == depth + 1, f"{depth + 1} batches were built")
    time.sleep(0.05)
    assert len(built) == depth + 1
    prefetcher.get(KEYS[0])
    wait_for(lambda: len(built) == depth + 2, "one more batch was built")
    time.sleep(0.05)
    assert len(built) == depth + 2
    prefetcher.close()
    assert not prefetcher._thread.is_alive()


def test_an_error_in_the_worker_is_raised_in_the_consumer_with_its_traceback():
    def failing_build(key):
        if key == KEYS[2]:
            raise ValueError(f"corrupt shard behind batch {key}")
        return build(key)

    prefetcher = Prefetcher(failing_build, iter(KEYS), depth=2)
    prefetcher.get(KEYS[0]), prefetcher.get(KEYS[1])
    with pytest.raises(ValueError, match="corrupt shard behind batch \\(0, 2\\)") as error:
        prefetcher.get(KEYS[2])
    frames = [frame.name for frame in traceback.extract_tb(error.value.__traceback__)]
    assert "failing_build" in frames and "get" in frames  # raised where it happened, surfaced where asked
    assert not prefetcher._thread.is_alive()
    with pytest.raises(RuntimeError, match="closed or has run out"):
        prefetcher.get(KEYS[3])


def test_an_error_in_the_key_iterator_is_raised_too():
    def keys():
        yield KEYS[0]
        raise ValueError("the training data gives 1 micro-batches per epoch")

    with Prefetcher(build, keys()) as prefetcher:
        prefetcher.get(KEYS[0])
        with pytest.raises(ValueError, match="1 micro-batches"):
            prefetcher.get(KEYS[1])


def test_close_ends_a_worker_blocked_on_a_full_queue_or_building():
    endless = ((0, index) for index in range(10**9))
    blocked = Prefetcher(build, endless, depth=1)
    wait_for(lambda: blocked._ready.full(), "the queue is full")
    blocked.close()
    blocked.close()  # twice is fine
    assert not blocked._thread.is_alive()

    release = threading.Event()
    building = Prefetcher(lambda key: release.wait() and build(key), iter(KEYS), depth=1)
    closer = threading.Thread(target=building.close)
    closer.start()
    release.set()  # the batch being built finishes; the worker sees the stop flag and ends
    closer.join(timeout=10)
    assert not closer.is_alive() and not building._thread.is_alive()


def test_batches_asked_out_of_order_or_a_bad_depth_are_errors():
    with Prefetcher(build, iter(KEYS)) as prefetcher:
        with pytest.raises(RuntimeError, match="batch \\(0, 1\\) asked, but the next prefetched batch is \\(0, 0\\)"):
            prefetcher.get((0, 1))
    for depth in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=f"depth={depth!r}: expected an integer >= 1"):
            Prefetcher(build, iter(KEYS), depth=depth)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locked memory needs CUDA")
def test_pinned_batches_are_page_locked_and_equal():
    with Prefetcher(build, iter(KEYS), pin_memory=True) as prefetcher:
        batch = prefetcher.get(KEYS[0])
        assert all(tensor.is_pinned() for tensor in batch.values())
        assert torch.equal(batch["input_ids"], build(KEYS[0])["input_ids"])
