"""Password hashing threads run at a lower priority than the event loop's thread."""

from __future__ import annotations

import os
import threading

from services.auth.adapters.passwords import lower_thread_priority


def nice_of_a_thread_that(runs: int) -> int:
    seen: list[int] = []

    def body() -> None:
        lower_thread_priority(runs)
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    return seen[0]


def test_a_hashing_thread_is_niced_and_the_caller_is_not():
    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert nice_of_a_thread_that(10) == 10  # setpriority sets the value, it does not add to it
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before


def test_zero_leaves_the_priority_alone():
    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert nice_of_a_thread_that(0) == before
