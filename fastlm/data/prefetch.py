"""Batches built ahead in a background thread, so that the training loop never waits for the data between steps.

A batch is a pure function of its key (seed, epoch, index), so building it early, in another thread, changes no
number: the prefetched sequence is the one the loop would have built itself, and resume stays exact. The thread
holds at most `depth` finished batches; an exception raised while building one is raised again, with its
traceback, where the loop asks for that batch.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Hashable, Iterable

import torch

Batch = dict[str, torch.Tensor]
_END = object()  # put after the last key's batch


class Prefetcher:
    """Builds `build(key)` for each key of `keys`, in order, in a daemon thread at most `depth` batches ahead of
    `get`. With pin_memory the tensors are copied into page-locked memory there (for CUDA: only from page-locked
    memory is `.to(device, non_blocking=True)` asynchronous). Use as a context manager, or call `close`."""

    def __init__(self, build: Callable[[Hashable], Batch], keys: Iterable[Hashable], *, depth: int = 2,
                 pin_memory: bool = False):
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth={depth!r}: expected an integer >= 1 (the batches built ahead)")
        self.depth = depth
        self._build, self._keys, self._pin_memory = build, keys, pin_memory
        self._ready: queue.Queue = queue.Queue(maxsize=depth)  # (key, batch | exception | _END)
        self._stop = threading.Event()
        self._finished = False  # the consumer has seen _END or an exception, or closed
        self._thread = threading.Thread(target=self._work, name="fastlm-prefetch", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        key = None
        try:
            for key in self._keys:
                if self._stop.is_set():
                    return
                batch = self._build(key)
                if self._pin_memory:
                    batch = {name: tensor.pin_memory() for name, tensor in batch.items()}
                self._ready.put((key, batch))  # blocks while `depth` batches wait: the bound
            self._ready.put((None, _END))
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, who raises it
            self._ready.put((key, error))

    def get(self, key: Hashable) -> Batch:
        """The batch of `key`, which must be the next key of `keys` (the order is the contract that lets the thread
        build ahead)."""
        if self._finished:
            raise RuntimeError(f"batch {key!r} asked of a prefetcher that is closed or has run out of keys")
        built_key, batch = self._ready.get()
        if batch is _END or isinstance(batch, BaseException):
            self.close()
            if batch is _END:
                raise RuntimeError(f"batch {key!r} asked after the last key")
            raise batch  # the worker's traceback comes with it
        if built_key != key:
            self.close()
            raise RuntimeError(f"batch {key!r} asked, but the next prefetched batch is {built_key!r}: keys must be "
                               "asked in the order given")
        return batch

    def close(self) -> None:
        """Stop the thread and drop the batches built ahead; returns once the thread has ended (after the batch it
        may be building). Safe to call twice."""
        self._finished = True
        self._stop.set()
        while self._thread.is_alive():
            # Emptying the queue wakes a worker blocked in `put`; it then sees the stop flag and returns.
            try:
                while True:
                    self._ready.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=0.05)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
