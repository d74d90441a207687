"""The next steps' batches, built in a background thread while the current step computes.

`prefetch(make, steps, depth)` yields (step, make(step)) for each step in order, exactly what the plain loop
`for step in steps: make(step)` computes: a step's batches stay a pure function of the step, so resume and
every layout read the same rows with prefetching as without. The producer runs at most `depth` results
ahead (bounded memory); an exception in it is raised in the consumer at the step that failed; leaving the
loop in any way (its end, break, an exception) stops the thread and joins it.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")

_END = object()
_POLL_S = 0.05
"""How often a producer blocked on a full queue checks whether the consumer has gone."""


@dataclass
class _Failure:
    error: BaseException


class Prefetcher(Generic[T]):
    """An iterator of (step, make(step)) fed by one background thread through a queue of `depth` results.
    Use it as a context manager so that the thread is joined however the loop ends."""

    def __init__(self, make: Callable[[int], T], steps: Iterable[int], depth: int):
        if depth < 1:
            raise ValueError(f"prefetch depth = {depth}: must be at least 1 (0 means no prefetching: use prefetch())")
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._finished = False
        self._thread = threading.Thread(target=self._produce, args=(make, iter(steps)), name="flotilla-prefetch",
                                        daemon=True)
        self._thread.start()

    def _produce(self, make: Callable[[int], T], steps: Iterator[int]) -> None:
        try:
            for step in steps:
                if self._stop.is_set() or not self._put((step, make(step))):
                    return
        except BaseException as err:  # handed to the consumer, which raises it where the step was wanted
            self._put(_Failure(err))
            return
        self._put(_END)

    def _put(self, item) -> bool:
        """Blocks while the queue is full; False if the consumer closed meanwhile."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                pass
        return False

    def __iter__(self) -> "Prefetcher[T]":
        return self

    def __next__(self) -> tuple[int, T]:
        if self._finished:
            raise StopIteration
        item = self._queue.get()
        if item is _END or isinstance(item, _Failure):
            self._finished = True
            self.close()
            if item is _END:
                raise StopIteration
            raise item.error
        return item

    def close(self) -> None:
        """Stops the producer (after the make() it may be running) and joins it; safe to call twice."""
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> "Prefetcher[T]":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def prefetch(make: Callable[[int], T], steps: Iterable[int], depth: int) -> contextlib.AbstractContextManager[Iterator[tuple[int, T]]]:
    """(step, make(step)) for each step, built `depth` steps ahead in a background thread; depth 0 builds each
    when it is asked for, in the caller's thread. Use as `with prefetch(...) as upcoming: for step, x in upcoming:`."""
    if depth < 0:
        raise ValueError(f"prefetch depth = {depth}: must be at least 0")
    if depth == 0:
        return contextlib.nullcontext((step, make(step)) for step in steps)
    return Prefetcher(make, steps, depth)
