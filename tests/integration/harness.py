"""Real `waystation-agent run` and `waystation-collector serve` processes on loopback."""

from __future__ import annotations

import http.server
import json
import os
import signal
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import wire
from tests.conftest import REPO, free_port

ENV = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")


def wait_for(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = cond()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def http_get(url: str, timeout: float = 5.0, context: ssl.SSLContext | None = None) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class Collector:
    """A collector process with its own data dir and loopback port; restartable."""

    def __init__(self, data_dir: Path, port: int | None = None, config: Path | None = None,
                 scheme: str = "http", host: str = "127.0.0.1", workers: int = 0) -> None:
        self.data_dir = data_dir
        self.workers = workers  # front processes (collector/fronts.py); 0: serve alone
        self.port = port or free_port()
        self.config = config
        self.scheme = scheme
        self.host = host
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = data_dir.parent / f"collector-{self.port}.log"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "collector", *args, "--data-dir", str(self.data_dir)],
            env=ENV, capture_output=True, text=True, timeout=60,
        )

    def enroll(self, site: str, node: str, pubkey: str) -> None:
        r = self.cli("enroll", "--site", site, "--node", node, "--key", pubkey)
        assert r.returncode == 0, r.stderr

    def start(self) -> None:
        assert self.proc is None
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = self.config
        if self.workers:
            config = self.data_dir.parent / f"collector-{self.port}-workers.toml"
            config.write_text(f"workers = {self.workers}\n" + (self.config.read_text() if self.config else ""))
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "collector", "serve", "--data-dir", str(self.data_dir),
                 "--listen", f"127.0.0.1:{self.port}",
                 *(["--config", str(config)] if config else [])],
                env=ENV, stdout=log, stderr=subprocess.STDOUT,
            )
        wait_for(lambda: self._healthy(), 30, "collector /healthz")

    def _healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"collector exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
        try:
            return self.get("/healthz", 1.0)[0] == 200
        except OSError:
            return False

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        return http_get(self.url + path, timeout, self.ssl_context)

    @property
    def ssl_context(self) -> ssl.SSLContext | None:
        if self.scheme != "https" or self.config is None:
            return None
        return ssl.create_default_context(cafile=str(self.config.parent / "cert.pem"))

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def metrics(self) -> str:
        status, body = self.get("/metrics")
        assert status == 200
        return body.decode()

    def nodes(self) -> list[dict[str, Any]]:
        status, body = self.get("/v1/nodes")
        assert status == 200
        data = json.loads(body)
        return data if isinstance(data, list) else data["nodes"]

    def ledger_rows(self, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Read the collector's ledger directly (read-only) for accounting checks."""
        db = sqlite3.connect(f"file:{self.data_dir / 'ledger.db'}?mode=ro", uri=True, timeout=10)
        try:
            return db.execute(query, params).fetchall()
        finally:
            db.close()

    def ledger_table(self, table_id: bytes) -> bytes | None:
        """A series table (wire v2) the ledger holds, by id."""
        rows = self.ledger_rows("SELECT blob FROM series_tables WHERE table_id = ?", (table_id,))
        return bytes(rows[0][0]) if rows else None

    def ledger_series(self, frame: bytes) -> list[wire.Series]:
        """The series of an unsealed data batch the ledger holds, wire v1 or v2."""
        return data_series(frame, self.ledger_table)


def data_series(
    frame: bytes, table: Callable[[bytes], bytes | None], sealing_keys: wire.SealingKeys | None = None
) -> list[wire.Series]:
    """The series of a data batch, wire v1 or v2, unverified: `table` finds the series table
    a v2 batch names, by id (the agent's spool, the collector's ledger); `sealing_keys` open
    a sealed payload and table."""
    from wire.columns import columns_table_id
    from wire.columns_np import decode_columns

    f = wire.parse_frame(bytes(frame))
    sealed = f.header.flags & wire.FLAG_SEALED
    raw = wire.decompress_payload(f, 1 << 30, wire.unseal(f.payload, sealing_keys) if sealed else None)
    if f.header.version != wire.WIRE_VERSION_2:
        return wire.decode_series(raw)
    tid = columns_table_id(raw)
    blob = table(tid)
    assert blob is not None, f"batch {f.header.seq} names series table {tid.hex()[:16]}, which is not held"
    limits = wire.DEFAULT_OPEN_LIMITS
    opened = wire.open_table(blob, limits.payload, limits.max_decompressed_bytes, sealing_keys)
    return decode_columns(raw, opened, limits.payload).to_series()


class Agent:
    """An agent process with a generated key and a TOML config written for the test."""

    def __init__(self, workdir: Path, collector_url: str, extra_toml: str = "",
                 site: str = "lab", node: str = "node-1", uplink_toml: str = "") -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.site = site
        self.node = node
        self.state_dir = workdir / "agent-state"
        self.config = workdir / "agent.toml"
        self.log = workdir / "agent.log"
        self.config.write_text(
            f'site = "{site}"\nnode = "{node}"\nstate_dir = "{self.state_dir}"\n'
            f"{extra_toml}\n"
            f'[uplink]\nurl = "{collector_url}"\nbackoff_initial = "200ms"\nbackoff_max = "1s"\n'
            f"{uplink_toml}"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "agent", *args, "--config", str(self.config)],
            env=ENV, capture_output=True, text=True, timeout=60,
        )

    def keygen(self) -> str:
        r = self.cli("keygen")
        assert r.returncode == 0, r.stderr
        line = next(ln for ln in r.stdout.splitlines() if "waystation-collector enroll" in ln)
        return line.split("--key", 1)[1].strip()

    def start(self) -> None:
        assert self.proc is None
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent", "run", "--config", str(self.config)],
                env=ENV, stdout=log, stderr=subprocess.STDOUT,
            )

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def status(self) -> dict[str, Any]:
        r = self.cli("status", "--json")
        # 1 with a report: no spool yet (the agent is starting); 1 without one: a failure.
        assert r.returncode == 0 or (r.returncode == 1 and r.stdout.strip()), r.stderr
        result: dict[str, Any] = json.loads(r.stdout)
        return result


@contextmanager
def serve_page(body: bytes) -> Iterator[str]:
    """Serve one Prometheus text page on a loopback port, as a model server would."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/metrics"
    finally:
        server.shutdown()
        server.server_close()


def plaintext_hits(blob: bytes, needles: tuple[bytes, ...]) -> set[bytes]:
    """Which needles a reader of these bytes can find: as they are, or in what any zstd
    frame starting in them decompresses to (a payload that is only compressed keeps its
    names behind Huffman-coded literals; a frame split over SQLite overflow pages still
    yields its beginning, where the string table is)."""
    import io

    import zstandard

    found = {n for n in needles if n in blob}
    at = blob.find(b"\x28\xb5\x2f\xfd")
    while at >= 0 and found != set(needles):
        out = b""
        try:
            with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob[at:at + (1 << 22)])) as r:
                while len(out) < (1 << 24) and (chunk := r.read(65536)):
                    out += chunk
        except zstandard.ZstdError:
            pass
        found |= {n for n in needles if n in out}
        at = blob.find(b"\x28\xb5\x2f\xfd", at + 1)
    return found
