"""systemd's notify protocol (sd_notify(3)) and a watchdog that pings only while healthy.

Both daemons run as `Type=notify` units with `WatchdogSec=`. The protocol is one datagram
per message to the AF_UNIX socket named by `$NOTIFY_SOCKET` (a path, or an abstract name
written with a leading `@`), holding newline-separated `KEY=value` lines: READY=1,
STATUS=..., STOPPING=1, WATCHDOG=1. Without `$NOTIFY_SOCKET` (run by hand, in tests,
under another supervisor) every call does nothing. A send that fails is logged once and
never raised: a daemon must not stop serving because its supervisor's socket went away.

The watchdog is the point: systemd restarts a unit whose pings stop. A process that only
pinged from a timer thread would keep pinging while its real work is stuck, so pings go
out only while `Liveness` finds nothing wrong: every step a loop marked as under way
(a flush, a send, a commit) has run for less than its bound, and every thread it was told
to watch is alive. A daemon whose work runs on an asyncio loop pings from that loop, so
a blocked loop stops the pings too.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

log = logging.getLogger("waystation.sdnotify")


class Notifier:
    """Messages to the service manager; every method is a no-op without $NOTIFY_SOCKET."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        self.address: str | None = None
        if path.startswith("@"):
            self.address = "\0" + path[1:]  # an abstract socket
        elif path.startswith("/"):
            self.address = path
        self.watchdog_usec = 0
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        # WATCHDOG_PID names the process the watchdog is for: not a child that inherited it.
        if usec.isdigit() and (not pid or pid == str(os.getpid())):
            self.watchdog_usec = int(usec)
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """How often to ping: half the watchdog timeout, as sd_watchdog_enabled(3) advises;
        None when the unit has no watchdog."""
        return self.watchdog_usec / 2e6 if self.watchdog_usec and self.enabled else None

    def send(self, **fields: str) -> bool:
        """One datagram of KEY=value lines; True if it was sent."""
        if self.address is None:
            return False
        # errors="replace": a status line may hold a path that is not UTF-8 (surrogate escapes).
        data = "\n".join(f"{k}={_one_line(v)}" for k, v in fields.items()).encode(errors="replace")
        with self._lock:
            try:
                if self._sock is None:
                    # Non-blocking: a manager that stopped reading must not stall the caller
                    # (the collector's event loop); the message is lost, which is logged.
                    self._sock = socket.socket(socket.AF_UNIX,
                                               socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
                self._sock.sendto(data, self.address)
            except OSError as exc:
                if not self._warned:
                    log.warning("cannot notify the service manager at %s: %s", self.address.lstrip("\0"), exc)
                    self._warned = True
                return False
        return True

    def ready(self, status: str) -> bool:
        return self.send(READY="1", STATUS=status)

    def status(self, status: str) -> bool:
        return self.send(STATUS=status)

    def stopping(self, status: str = "stopping") -> bool:
        return self.send(STOPPING="1", STATUS=status)

    def extend_start(self, seconds: float, status: str) -> bool:
        """Ask for `seconds` more before the start times out (EXTEND_TIMEOUT_USEC), saying why."""
        return self.send(EXTEND_TIMEOUT_USEC=str(int(seconds * 1e6)), STATUS=status)

    def extend_until(self, ready: threading.Event, status: Callable[[], str], limit_s: float,
                     every_s: float = 20.0) -> threading.Thread | None:
        """While a start that may legitimately take long (waiting for a lock, replaying a
        ledger) runs, keep extending systemd's start timeout, up to limit_s in all: a start
        stuck past that still times out. Stops once `ready` is set."""
        if not self.enabled:
            return None
        deadline = time.monotonic() + limit_s

        def loop() -> None:
            while not ready.is_set() and time.monotonic() < deadline:
                self.extend_start(min(every_s * 3, max(1.0, deadline - time.monotonic())), status())
                ready.wait(every_s)

        t = threading.Thread(target=loop, name="sd-extend-start", daemon=True)
        t.start()
        return t

    def watchdog(self, status: str | None = None) -> bool:
        return self.send(WATCHDOG="1", **({"STATUS": status} if status is not None else {}))

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def _one_line(value: str) -> str:
    return " ".join(value.split())  # a newline would start another KEY=value line


class Liveness:
    """What is stuck in a daemon: steps past their bound and watched threads that died."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._steps: dict[int, tuple[str, float, float]] = {}  # token -> (name, started, limit)
        self._threads: dict[str, threading.Thread] = {}
        self._checks: dict[str, Callable[[], bool]] = {}
        self._next = 0

    @contextmanager
    def step(self, name: str, limit_s: float) -> Iterator[None]:
        """Marks a step as under way; stuck if it is still under way after limit_s."""
        with self._lock:
            token = self._next
            self._next += 1
            self._steps[token] = (name, self.clock(), limit_s)
        try:
            yield
        finally:
            with self._lock:
                del self._steps[token]

    def watch_thread(self, name: str, thread: threading.Thread) -> None:
        with self._lock:
            self._threads[name] = thread

    def forget_thread(self, name: str) -> None:
        with self._lock:
            self._threads.pop(name, None)
            self._checks.pop(name, None)

    def watch(self, name: str, alive: Callable[[], bool]) -> None:
        """Something that is not a thread (an asyncio task) and must stay alive."""
        with self._lock:
            self._checks[name] = alive

    def problems(self) -> list[str]:
        """One line per stuck step or dead thread; empty when healthy."""
        now = self.clock()
        with self._lock:
            steps = list(self._steps.values())
            threads = list(self._threads.items())
            checks = list(self._checks.items())
        out = [f"{name} under way for {now - started:.0f}s (bound {limit:.0f}s)"
               for name, started, limit in steps if now - started > limit]
        out += [f"thread {name} is not running" for name, t in threads if not t.is_alive()]
        out += [f"{name} is not running" for name, alive in checks if not alive()]
        return out


class Watchdog:
    """Decides each ping: WATCHDOG=1 with the daemon's status while healthy; otherwise no
    ping (systemd restarts the unit when WatchdogSec passes) and a STATUS saying why."""

    def __init__(self, notifier: Notifier, liveness: Liveness, status: Callable[[], str]) -> None:
        self.notifier = notifier
        self.liveness = liveness
        self.status = status
        self.withheld = False

    def tick(self) -> bool:
        """One ping if healthy; returns whether it pinged."""
        problems = self.liveness.problems()
        if problems:
            if not self.withheld:
                log.error("not telling the service manager we are alive: %s", "; ".join(problems))
            self.withheld = True
            self.notifier.status("stuck: " + "; ".join(problems))
            return False
        if self.withheld:
            log.info("healthy again; watchdog pings resume")
            self.withheld = False
        try:
            text = self.status()
        except Exception as exc:  # noqa: BLE001 (a status line must never cost the ping)
            text = f"status unavailable: {exc}"
        return self.notifier.watchdog(text)

    def run_thread(self, stop: threading.Event, name: str = "sd-watchdog") -> threading.Thread | None:
        """Pings from a thread of its own every half watchdog timeout (a status update every
        10 s when the unit has no watchdog); None when there is no service manager."""
        if not self.notifier.enabled:
            return None
        every = self.notifier.watchdog_interval_s or 10.0

        def loop() -> None:
            while not stop.wait(every):
                if self.notifier.watchdog_interval_s is None:
                    if not self.liveness.problems():
                        self.notifier.status(self.status())
                else:
                    self.tick()

        t = threading.Thread(target=loop, name=name, daemon=True)
        t.start()
        return t


__all__ = ["Liveness", "Notifier", "Watchdog"]
