"""pipeline.prefetch.background: order, errors, and a producer that is stopped and finished when the consumer
stops early."""

import threading
import time

import pytest

from pipeline.prefetch import background


def test_items_arrive_in_order_and_a_producer_error_reaches_the_consumer():
    assert list(background(iter(range(50)), depth=2)) == list(range(50))

    def failing():
        yield 1
        raise OSError("shard 3 unreadable")

    it = background(failing())
    assert next(it) == 1
    with pytest.raises(OSError, match="shard 3 unreadable"):
        next(it)


def test_a_consumer_that_stops_early_leaves_no_producer_running():
    """After close() returns, the producer thread has ended and its generator has run its own cleanup, even
    though it was busy making the next items (a daemon left running at interpreter exit can abort it)."""
    finished, names = threading.Event(), []

    def slow():
        names.append(threading.current_thread().name)
        try:
            for i in range(1000):
                time.sleep(0.02)
                yield i
        finally:
            finished.set()

    it = background(slow(), depth=2)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    it.close()
    assert finished.is_set()
    assert names[0] not in [t.name for t in threading.enumerate()]


def test_a_consumer_that_breaks_out_of_a_loop_stops_the_producer_too():
    finished = threading.Event()

    def gen():
        try:
            yield from range(10**6)
        finally:
            finished.set()

    for i in background(gen()):
        if i == 5:
            break
    assert finished.is_set()  # the for loop dropped the iterator: CPython closed it at once
