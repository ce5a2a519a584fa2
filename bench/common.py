"""Process plumbing shared by the benchmarks: loopback ports, child processes, metric reads."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def need(binary: str, package: str) -> str:
    path = shutil.which(binary)
    if path is None:
        sys.exit(f"{binary} not found: apt-get install {package} (scripts/bootstrap.sh --test does)")
    return path


def wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"{url} did not come up in {timeout}s")


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        body: bytes = resp.read()
        return body.decode()


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of every sample of `name` whose labels include `labels` in a text page."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


@contextmanager
def process(args: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as fh:
        proc = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, env=env or ENV)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def cpu_seconds(pid: int, children: bool = True) -> float:
    """User+system CPU seconds a process has used so far (from /proc), with those of its
    children that have exited (the agent's SMART reader, say) unless `children` is False."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12]) + (int(fields[13]) + int(fields[14]) if children else 0)
    return ticks / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def enroll_agent(workdir: Path, collector_dir: Path, config: Path, site: str, node: str) -> None:
    out = subprocess.run([sys.executable, "-m", "agent", "keygen", "--config", str(config)],
                         env=ENV, capture_output=True, text=True, check=True).stdout
    key = out.split("--key", 1)[1].split()[0]
    subprocess.run([sys.executable, "-m", "collector", "enroll", "--data-dir", str(collector_dir),
                    "--site", site, "--node", node, "--key", key], env=ENV, check=True,
                   capture_output=True)


class ByteRelay:
    """A TCP relay on loopback that counts every byte a sender sends upstream (request
    lines, headers, bodies, TLS if any): the uplink's real cost, whatever the protocol.
    Runs its own event loop in a thread; `upstream` is the count so far."""

    def __init__(self, target_port: int) -> None:
        import asyncio
        import threading

        self.target_port = target_port
        self.port = free_port()
        self.upstream = 0
        self.downstream = 0
        self.connections = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"relay-{self.port}", daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def _run(self) -> None:
        import asyncio

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, up: bool) -> None:
            try:
                while data := await reader.read(65536):
                    if up:
                        self.upstream += len(data)
                    else:
                        self.downstream += len(data)
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                writer.close()

        async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)
            except OSError:
                client_w.close()
                return
            await asyncio.gather(pipe(client_r, server_w, True), pipe(server_r, client_w, False))

        async def main() -> None:
            server = await asyncio.start_server(handle, "127.0.0.1", self.port)
            self._ready.set()
            async with server:
                await server.serve_forever()

        try:
            self._loop.run_until_complete(main())
        except RuntimeError:
            pass  # stopped

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


def ledger_batches(ledger: Path, node: str) -> Iterator[tuple[bytes, list[object]]]:
    """Every frame a collector's ledger holds for `node`, with its decoded series (v1 or v2;
    a v2 frame's table from the ledger's series tables). Read-only; no keys needed: the
    collector verified each frame when it took it."""
    import sqlite3

    import wire
    from wire.columns_np import decode_columns

    db = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)
    tables: dict[bytes, wire.SeriesTable] = {}
    try:
        has_tables = db.execute("SELECT 1 FROM sqlite_master WHERE name = 'series_tables'").fetchone()
        if has_tables:
            for tid, blob in db.execute("SELECT table_id, blob FROM series_tables WHERE node = ?", (node,)):
                tables[bytes(tid)] = wire.open_table(bytes(blob), wire.Limits(), 1 << 30)
        for (raw,) in db.execute("SELECT frame FROM batches WHERE node = ? ORDER BY seq", (node,)):
            frame = wire.parse_frame(bytes(raw))
            series: list[object] = []
            if frame.header.kind == wire.Kind.DATA:
                payload = wire.decompress_payload(frame, 1 << 30)
                if frame.header.version == wire.WIRE_VERSION_2:
                    series = list(decode_columns(payload, tables[payload[:32]], wire.Limits()).to_series())
                else:
                    series = list(wire.decode_series(payload))
            yield bytes(raw), series
    finally:
        db.close()


def ledger_table_bytes(ledger: Path, node: str) -> int:
    """Bytes of the series tables a node sent (each once, with the batch that first named it)."""
    import sqlite3

    db = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)
    try:
        if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'series_tables'").fetchone():
            return 0
        (n,) = db.execute("SELECT COALESCE(SUM(LENGTH(blob)), 0) FROM series_tables WHERE node = ?",
                          (node,)).fetchone()
        return int(n)
    finally:
        db.close()
