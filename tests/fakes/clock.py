"""A clock the test moves by hand, for code that takes a Clock (agent.uplink.Clock's shape).

Threads that wait on it block until the test advances time past their deadline or the
event they wait on is set, so a test can step through minutes of backoff in milliseconds
and still let the code under test do real I/O between the steps.
"""

from __future__ import annotations

import threading
import time


class ManualClock:
    def __init__(self, start: float = 1000.0, wall_offset: float = 1_700_000_000.0) -> None:
        self.now = start
        self.wall_offset = wall_offset
        self.cond = threading.Condition()
        self.sleepers: dict[str, float] = {}  # thread name -> deadline, while it waits

    def monotonic(self) -> float:
        with self.cond:
            return self.now

    def wall(self) -> float:
        return self.monotonic() + self.wall_offset

    def wait(self, event: threading.Event, timeout: float) -> bool:
        name = threading.current_thread().name
        with self.cond:
            deadline = self.now + max(0.0, timeout)
            self.sleepers[name] = deadline
            self.cond.notify_all()
            try:
                # Event.set() cannot notify this condition: look at the event every few ms.
                while not event.is_set() and self.now < deadline:
                    self.cond.wait(0.005)
            finally:
                del self.sleepers[name]
                self.cond.notify_all()
        return event.is_set()

    def advance(self, seconds: float) -> None:
        with self.cond:
            self.now += seconds
            self.cond.notify_all()

    def advance_to_wake(self, thread_name: str) -> None:
        """Advance to the moment `thread_name` waits for (it must be waiting on this clock)."""
        with self.cond:
            self.now = max(self.now, self.sleepers[thread_name])
            self.cond.notify_all()

    def await_parked(self, thread_name: str, timeout: float = 10.0) -> None:
        """Block (real time) until `thread_name` waits on this clock for a future moment."""
        end = time.monotonic() + timeout
        with self.cond:
            while not (thread_name in self.sleepers and self.sleepers[thread_name] > self.now):
                left = end - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{thread_name} never came to wait on the clock "
                                         f"(waiting: {sorted(self.sleepers)})")
                self.cond.wait(min(left, 0.05))
