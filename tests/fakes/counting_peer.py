"""A loopback HTTP server standing in for the collector that records every request the agent
makes, so tests can count what a down collector would see.

Modes: "down" drops each connection unanswered (the process behind the port is gone, or
hangs up); "up" answers /healthz 200, the chain endpoint "unknown node" and acks every
batch (it verifies nothing: use the real collector for that); "failing" answers /healthz
200 but every batch with the collector's own 500; "resetting" answers /healthz 200 but
resets the connection (TCP RST) on every batch once it has read it, as a proxy that
drops large uploads would; "hanging" answers /healthz 200 and holds every batch
unanswered until `release` is set (then answers as "up").

`modes` overrides the mode for particular batches (by seq): {1: "hanging"}.
"""

from __future__ import annotations

import http.server
import json
import socket
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import wire


class _Clock(Protocol):
    def monotonic(self) -> float: ...


class CountingPeer:
    def __init__(self, clock: _Clock, mode: str = "down") -> None:
        self.clock = clock
        self.mode = mode
        self.modes: dict[int, str] = {}  # seq -> mode, for those batches only
        self.release = threading.Event()  # ends "hanging"
        self.requests: list[tuple[float, str, str, int]] = []  # (clock time, method, path, seq or 0)
        self.lock = threading.Lock()

    def times(self, method: str, path: str | None = None) -> list[float]:
        with self.lock:
            return [t for t, m, p, _ in self.requests if m == method and (path is None or p == path)]

    def posted(self) -> list[tuple[float, int]]:
        with self.lock:
            return [(t, seq) for t, m, _, seq in self.requests if m == "POST"]

    def handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        peer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                self._answer(None)

            def do_POST(self) -> None:  # noqa: N802
                self._answer(self.rfile.read(int(self.headers["Content-Length"])))

            def _answer(self, body: bytes | None) -> None:
                # A v2 body may carry the series table the frame names ahead of it.
                seq = wire.parse_frame(wire.split_body(body)[1]).header.seq if body else 0
                with peer.lock:
                    peer.requests.append((peer.clock.monotonic(), self.command, self.path, seq))
                    mode = peer.modes.get(seq, peer.mode) if body else peer.mode
                if mode == "down":
                    self.close_connection = True
                    return
                if mode == "resetting" and body is not None:
                    # SO_LINGER 0: close() sends RST instead of FIN, so the client sees a reset.
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                               struct.pack("ii", 1, 0))
                    self.connection.close()
                    self.close_connection = True
                    return
                if mode == "hanging" and body is not None:
                    peer.release.wait(60)
                    mode = "up"
                if body is None and self.path.endswith("/healthz"):
                    status, reply = 200, b"ok\n"
                elif body is None and self.path.endswith("/chain"):
                    status, reply = 404, json.dumps({"result": "unknown_node"}).encode()
                elif body is None:
                    status, reply = 404, b""
                elif mode == "up":
                    status, reply = 200, json.dumps({"result": "accepted", "seq": seq}).encode()
                else:
                    status, reply = 500, json.dumps({"result": "internal", "error": "disk"}).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        return Handler


@contextmanager
def serving(peer: CountingPeer) -> Iterator[str]:
    """Run `peer` on a loopback port; yields its base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), peer.handler())
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
