"""`waystation-collector import` beside a running `serve`, with real processes on loopback:
who may use POST /v1/import, the TLS pin, the data_dir lock when two processes start at
once, one import at a time (import.lock), and an import through a serve too busy to take it
all at once (a key rotation it could not take included)."""

from __future__ import annotations

import fcntl
import hashlib
import http.client
import io
import json
import os
import shutil
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from nacl.signing import SigningKey

import wire
from collector import ledger, serve_link, trust
from tests.conftest import free_port
from tests.integration.harness import ENV, Collector, wait_for
from wire import bundle

pytestmark = pytest.mark.timeout(120)

SITE = "lab"
T0 = 1_700_000_000_000


def frames_of(key: SigningKey, node: str, count: int, value: float = 1.0) -> list[bytes]:
    """A node's chain, seq 1..count, one gauge each (value * seq: another value, another chain)."""
    out: list[bytes] = []
    for seq in range(1, count + 1):
        prev = wire.batch_hash(out[-1]) if out else wire.ZERO_HASH
        series = [wire.Series("up", (), wire.MetricType.GAUGE, (T0 + seq,), (value * seq,))]
        out.append(wire.encode_data_batch(wire.BatchContext(key, SITE, node, seq, prev, T0 + seq, seq, 1), series))
    return out


def bundle_file(frames: list[bytes], key: SigningKey, node: str, path: Path, unplaced: bool = False) -> Path:
    buf = io.BytesIO()
    writer = bundle.BundleWriter(buf)
    for f in frames:
        writer.add(f)
    writer.finish(key, SITE, node, 1, unplaced=unplaced)
    path.write_bytes(buf.getvalue())
    return path


def enrolled(data_dir: Path, *nodes: str) -> dict[str, SigningKey]:
    keys = {node: SigningKey.generate() for node in nodes}
    conn = ledger.connect(data_dir / "ledger.db")
    try:
        for node, key in keys.items():
            trust.enroll(conn, SITE, node, bytes(key.verify_key))
    finally:
        conn.close()
    return keys


def stored(c: Collector, node: str) -> tuple[int, int]:
    """(rows, distinct seqs) the ledger holds for the node."""
    ((rows, seqs),) = c.ledger_rows("SELECT COUNT(*), COUNT(DISTINCT seq) FROM batches WHERE node = ?", (node,))
    return int(rows), int(seqs)


def endpoint_doc(c: Collector) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((c.data_dir / serve_link.ENDPOINT_FILE).read_text())
    return doc


def rewrite_endpoint(c: Collector, **changes: Any) -> None:
    path = c.data_dir / serve_link.ENDPOINT_FILE
    path.write_text(json.dumps({**endpoint_doc(c), **changes}))


def import_body(frames: list[bytes]) -> bytes:
    return b"".join(len(f).to_bytes(4, "little") + f for f in frames)


def post_import(url: str, body: bytes, token: str | None, source: str | None = None) -> tuple[int, dict[str, Any]]:
    """POST /v1/import as any client could, optionally from a given local address."""
    parts = urlsplit(url)
    assert parts.hostname is not None
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10,
                                      source_address=(source, 0) if source else None)
    headers = {"Content-Type": serve_link.IMPORT_CONTENT_TYPE}
    if token is not None:
        headers[serve_link.TOKEN_HEADER] = token
    try:
        conn.request("POST", "/v1/import", body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def post_batch(url: str, frame: bytes) -> int:
    req = urllib.request.Request(f"{url}/v1/batches", data=frame, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def post_until_taken(url: str, frame: bytes) -> int:
    """As an agent posts: again while the answer is 503 (for 30 s at most)."""
    deadline = time.monotonic() + 30
    while (status := post_batch(url, frame)) == 503 and time.monotonic() < deadline:
        time.sleep(0.05)
    return status


def accepted_total(c: Collector) -> dict[str, float]:
    out = {}
    for line in c.metrics().splitlines():
        if line.startswith("waystation_ingest_batches_total{"):
            result = line.split('result="', 1)[1].split('"', 1)[0]
            out[result] = float(line.rsplit(" ", 1)[1])
    return out


def serve_proc(data_dir: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "collector", "serve", "--data-dir", str(data_dir), "--listen", f"127.0.0.1:{port}"],
            env=ENV, stdout=out, stderr=subprocess.STDOUT,
        )


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


@contextmanager
def lock_held_by_test(data_dir: Path) -> Iterator[int]:
    """serve.lock flocked from this process (another open file description than any
    DataDirLock's), with nothing written in it yet; yields the descriptor."""
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(data_dir / serve_link.LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.ftruncate(fd, 0)
        yield fd
    finally:
        os.close(fd)


def label(fd: int, text: str) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, text.encode(), 0)


# ---------------------------------------------------------------------------- who may import


@pytest.mark.parametrize("workers", [0, 2], ids=["serve-alone", "two-fronts"])
def test_a_wrong_or_missing_token_gets_403_commits_nothing_and_is_never_printed(tmp_path: Path, workers: int) -> None:
    config = tmp_path / "collector.toml"
    config.write_text('log_level = "debug"\n')  # the access log too: it must not carry the token
    c = Collector(tmp_path / "collector", config=config, workers=workers)
    key = enrolled(c.data_dir, "n1")["n1"]
    frames = frames_of(key, "n1", 3)
    path = bundle_file(frames, key, "n1", tmp_path / "n1.wsb")
    c.start()
    try:
        doc = endpoint_doc(c)
        token, url = doc["token"], doc["url"]
        assert (c.data_dir / serve_link.ENDPOINT_FILE).stat().st_mode & 0o077 == 0
        wrong = "0" * len(token)
        for sent in (None, "", wrong, token[:-1], token + "0"):
            status, answer = post_import(url, import_body(frames), sent)
            assert (status, answer["result"]) == (403, "forbidden"), (sent, answer)
        assert stored(c, "n1") == (0, 0)
        # Through the CLI, with serve.json's token altered: refused, nothing committed.
        rewrite_endpoint(c, token=wrong)
        r = c.cli("import", str(path))
        assert r.returncode == 1, r.stdout + r.stderr
        assert "refused the import: 403" in r.stderr and "wrong or missing import token" in r.stderr, r.stderr
        assert stored(c, "n1") == (0, 0)
        for text in (r.stdout, r.stderr):
            assert token not in text and wrong not in text
        # With serve's own token the same bundle goes in: the refusals were the token's doing.
        rewrite_endpoint(c, token=token)
        r = c.cli("import", str(path))
        assert r.returncode == 0 and f"{SITE}/n1: 3 accepted, 0 duplicates, 0 refused" in r.stdout, r.stdout + r.stderr
        assert token not in r.stdout + r.stderr
        assert stored(c, "n1") == (3, 3)
    finally:
        c.stop()
    log = c.log.read_text()
    assert "refused POST /v1/import from 127.0.0.1: wrong or missing import token" in log
    assert token not in log and wrong not in log


def _non_loopback_address() -> str | None:
    """This host's address on its default route, if it has one (a UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))
        except OSError:
            return None
        address = str(s.getsockname()[0])
    return None if address.startswith("127.") or address == "0.0.0.0" else address


@pytest.mark.parametrize("workers", [0, 2], ids=["serve-alone", "two-fronts"])
def test_a_peer_that_is_not_loopback_gets_403_even_with_the_token(tmp_path: Path, workers: int) -> None:
    address = _non_loopback_address()
    if address is None:
        pytest.skip("this host has no non-loopback IPv4 address to connect from")
    c = Collector(tmp_path / "collector", workers=workers)
    key = enrolled(c.data_dir, "n1")["n1"]
    frames = frames_of(key, "n1", 2)
    c.start()
    try:
        doc = endpoint_doc(c)
        # serve listens on 127.0.0.1; this connection comes from the host's other address,
        # which is neither loopback nor the address it reached.
        status, answer = post_import(doc["url"], import_body(frames), doc["token"], source=address)
        assert (status, answer["result"]) == (403, "forbidden") and "this host" in answer["error"], answer
        assert stored(c, "n1") == (0, 0)
        status, answer = post_import(doc["url"], import_body(frames), doc["token"])
        assert status == 200 and [r["result"] for r in answer["results"]] == ["accepted", "accepted"], answer
    finally:
        c.stop()


# ---------------------------------------------------------------------------- TLS


def make_cert(directory: Path, name: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(directory / f"{name}.key"), "-out", str(directory / f"{name}.pem"), "-days", "1",
         "-subj", "/CN=collector.example", "-addext", "subjectAltName=DNS:collector.example,IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )
    return directory / f"{name}.pem"


def der_sha256(cert: Path) -> str:
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(cert.read_text())).hexdigest()


@contextmanager
def impostor(cert: Path) -> Iterator[tuple[str, list[bytes]]]:
    """A TLS listener with another certificate; yields its URL and what it received after
    the handshake."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, cert.with_suffix(".key"))
    received: list[bytes] = []
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(30)

    def run() -> None:
        try:
            raw, _ = server.accept()
            with ctx.wrap_socket(raw, server_side=True) as conn:
                conn.settimeout(2)
                while chunk := conn.recv(65536):
                    received.append(chunk)
        except (OSError, ssl.SSLError):
            pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.getsockname()[1]}", received
    finally:
        thread.join(10)
        server.close()


def test_import_over_tls_pins_serves_certificate(tmp_path: Path) -> None:
    if not shutil.which("openssl"):
        pytest.skip("openssl not found (apt-get install openssl)")
    tls = tmp_path / "tls"
    cert, other = make_cert(tls, "cert"), make_cert(tls, "other")
    config = tls / "collector.toml"
    config.write_text(f'tls_cert = "{cert}"\ntls_key = "{tls / "cert.key"}"\n')
    c = Collector(tmp_path / "collector", config=config, scheme="https")
    key = enrolled(c.data_dir, "n1")["n1"]
    frames = frames_of(key, "n1", 9)
    first = bundle_file(frames[:3], key, "n1", tmp_path / "first.wsb")
    second = bundle_file(frames[3:6], key, "n1", tmp_path / "second.wsb")
    third = bundle_file(frames[6:], key, "n1", tmp_path / "third.wsb")
    pin = der_sha256(cert)
    c.start()
    try:
        doc = endpoint_doc(c)
        assert doc["url"].startswith("https://127.0.0.1:") and doc["tls_sha256"] == pin
        r = c.cli("import", str(first))
        assert r.returncode == 0, r.stdout + r.stderr
        assert "imported through serve at https://127.0.0.1:" in r.stdout and "3 accepted" in r.stdout, r.stdout
        # serve.json's pin altered: serve's own certificate no longer matches; nothing sent.
        altered = "ab" * 32
        rewrite_endpoint(c, tls_sha256=altered)
        r = c.cli("import", str(second))
        assert r.returncode == 1, r.stdout + r.stderr
        assert f"fingerprint {pin}, but serve.json pins {altered}" in r.stderr, r.stderr
        assert doc["token"] not in r.stdout + r.stderr
        assert stored(c, "n1") == (3, 3)
        # Another listener at serve.json's URL, with the right pin: it gets the handshake and
        # not one byte of the request (the token is never sent to it).
        with impostor(other) as (url, received):
            rewrite_endpoint(c, tls_sha256=pin, url=url)
            r = c.cli("import", str(third))
        assert r.returncode == 1, r.stdout + r.stderr
        assert f"fingerprint {der_sha256(other)}, but serve.json pins {pin}" in r.stderr, r.stderr
        assert received == []
        assert stored(c, "n1") == (3, 3)
        # The pin restored: the rest goes through.
        rewrite_endpoint(c, tls_sha256=pin, url=doc["url"])
        r = c.cli("import", str(second), str(third))
        assert r.returncode == 0 and "6 accepted" in r.stdout, r.stdout + r.stderr
        assert stored(c, "n1") == (9, 9)
    finally:
        c.stop()


# ---------------------------------------------------------------------------- the lock


def test_two_serves_started_at_once_one_runs_the_other_names_it(tmp_path: Path) -> None:
    data_dir = tmp_path / "collector"
    enrolled(data_dir, "n1")
    ports = [free_port(), free_port()]
    procs = [serve_proc(data_dir, port, tmp_path / f"serve-{i}.log") for i, port in enumerate(ports)]
    try:
        wait_for(lambda: any(p.poll() is not None for p in procs), 30, "one of the two serves to exit")
        (loser,) = [i for i, p in enumerate(procs) if p.poll() is not None]
        winner = 1 - loser
        assert procs[loser].returncode == 1
        out = (tmp_path / f"serve-{loser}.log").read_text()
        assert f"another `waystation-collector serve` (pid {procs[winner].pid}) uses {data_dir}" in out, out
        wait_for(lambda: healthy(ports[winner]), 30, "the other serve's /healthz")
        assert procs[winner].poll() is None
        assert json.loads((data_dir / serve_link.ENDPOINT_FILE).read_text())["pid"] == procs[winner].pid
    finally:
        for p in procs:
            stop(p)


def test_serve_waits_for_a_lock_holder_to_say_who_it_is(tmp_path: Path) -> None:
    """Locked but not labelled yet (the holder flocked it an instant ago): serve keeps
    looking, then refuses a serve and waits out an import."""
    data_dir = tmp_path / "collector"
    enrolled(data_dir, "n1")
    port = free_port()
    with lock_held_by_test(data_dir) as fd:
        proc = serve_proc(data_dir, port, tmp_path / "serve-a.log")
        try:
            time.sleep(1.5)
            assert proc.poll() is None and not healthy(port)
            label(fd, f"serve {os.getpid()} 5eed\n")
            assert proc.wait(10) == 1
        finally:
            stop(proc)
    out = (tmp_path / "serve-a.log").read_text()
    assert f"another `waystation-collector serve` (pid {os.getpid()}) uses {data_dir}" in out, out
    log = tmp_path / "serve-b.log"
    with lock_held_by_test(data_dir) as fd:
        proc = serve_proc(data_dir, port, log)
        try:
            time.sleep(1.0)
            label(fd, f"import {os.getpid()} 5eed\n")
            wait_for(lambda: f"waiting for `waystation-collector import` (pid {os.getpid()})" in log.read_text(),
                     10, "serve to say it waits for the import")
            assert proc.poll() is None and not healthy(port)
        except BaseException:
            stop(proc)
            raise
    try:
        wait_for(lambda: healthy(port), 30, "serve once the import let go")
    finally:
        stop(proc)


def test_a_lock_nobody_labels_is_refused_after_a_bounded_wait(tmp_path: Path) -> None:
    with lock_held_by_test(tmp_path):
        started = time.monotonic()
        with pytest.raises(serve_link.ImportError_) as err:
            serve_link.acquire_for_serve(tmp_path, lambda _m: None, label_wait_s=0.5)
        assert time.monotonic() - started < 5
    assert f"{tmp_path / serve_link.LOCK_FILE} has been locked for" in str(err.value)
    assert "does not say who it is" in str(err.value)


def test_serve_json_is_matched_to_the_lock_by_nonce_and_old_labels_by_pid(tmp_path: Path) -> None:
    endpoint = tmp_path / serve_link.ENDPOINT_FILE
    said: list[str] = []
    with lock_held_by_test(tmp_path) as fd:
        # An older serve's label (no nonce) and its serve.json (no nonce): matched by pid.
        label(fd, "serve 4242\n")
        endpoint.write_text(json.dumps({"pid": 4242, "url": "http://127.0.0.1:1", "token": "sekrit-token",
                                        "max_body_bytes": 1024}))
        got = serve_link.claim(tmp_path, said.append)
        assert isinstance(got, serve_link.Endpoint) and (got.url, got.pid) == ("http://127.0.0.1:1", 4242)
        assert "sekrit-token" not in repr(got)  # nothing that prints an Endpoint shows the token
        # Same pid, other nonce: serve.json is an earlier serve's (a restarted container's
        # serve is pid 1 again); the import waits for this serve's own.
        label(fd, "serve 4242 aaaa\n")
        endpoint.write_text(json.dumps({"pid": 4242, "nonce": "bbbb", "url": "http://127.0.0.1:1", "token": "t",
                                        "max_body_bytes": 1024}))
        publish = threading.Timer(1.0, lambda: endpoint.write_text(json.dumps(
            {"pid": 4242, "nonce": "aaaa", "url": "http://127.0.0.1:2", "token": "t", "max_body_bytes": 1024})))
        publish.start()
        try:
            got = serve_link.claim(tmp_path, said.append)
        finally:
            publish.cancel()
        assert isinstance(got, serve_link.Endpoint) and got.url == "http://127.0.0.1:2"
        assert said == ["serve (pid 4242) is starting; waiting for it to listen"]


def test_an_import_while_serve_starts_waits_and_goes_through_serve(tmp_path: Path) -> None:
    c = Collector(tmp_path / "collector")
    key = enrolled(c.data_dir, "n1")["n1"]
    path = bundle_file(frames_of(key, "n1", 5), key, "n1", tmp_path / "n1.wsb")
    lock_file = c.data_dir / serve_link.LOCK_FILE
    # Caught between taking the lock and listening, however loaded the machine: serve cannot
    # open the ledger while this connection holds it (exclusive locking mode keeps out even
    # a reader, WAL or not), and it opens the ledger before it listens. Frozen there, the
    # ledger let go, it stays caught until the import waits.
    holder = sqlite3.connect(c.data_dir / "ledger.db", isolation_level=None)
    holder.execute("PRAGMA locking_mode=EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    proc = serve_proc(c.data_dir, c.port, c.log)
    imp: subprocess.Popen[str] | None = None
    try:
        try:
            deadline = time.monotonic() + 30
            while not (lock_file.exists() and lock_file.read_text().startswith(f"serve {proc.pid} ")):
                assert time.monotonic() < deadline and proc.poll() is None, c.log.read_text()
                time.sleep(0.01)
            proc.send_signal(signal.SIGSTOP)
        finally:
            holder.close()
        nonce = lock_file.read_text().split()[2]
        endpoint = c.data_dir / serve_link.ENDPOINT_FILE
        assert not endpoint.exists() or json.loads(endpoint.read_text()).get("nonce") != nonce, \
            "serve published its endpoint before it could be stopped"
        # A serve.json left by an earlier serve that had the same pid (a restarted container).
        endpoint.write_text(json.dumps({"pid": proc.pid, "nonce": "0ld", "url": "http://127.0.0.1:9",
                                        "token": "stale", "max_body_bytes": 1 << 20}))
        err = tmp_path / "import.err"
        with open(err, "w") as err_file:
            imp = subprocess.Popen([sys.executable, "-m", "collector", "import", str(path), "--data-dir",
                                    str(c.data_dir)], env=ENV, stdout=subprocess.PIPE, stderr=err_file, text=True)
        wait_for(lambda: f"serve (pid {proc.pid}) is starting; waiting for it to listen" in err.read_text(), 30,
                 "the import to wait for serve")
        time.sleep(0.5)
        assert imp.poll() is None
        proc.send_signal(signal.SIGCONT)
        out, _ = imp.communicate(timeout=60)
        assert imp.returncode == 0, out + err.read_text()
        assert f"imported through serve at http://127.0.0.1:{c.port}" in out, out
        assert f"{SITE}/n1: 5 accepted, 0 duplicates, 0 refused" in out, out
        assert stored(c, "n1") == (5, 5)
    finally:
        if imp is not None and imp.poll() is None:
            imp.kill()
            imp.wait()
        stop(proc)


# ---------------------------------------------------------------------------- one import at a time


def import_proc(data_dir: Path, err: Path, *paths: Path) -> subprocess.Popen[str]:
    with open(err, "w") as err_file:
        return subprocess.Popen([sys.executable, "-m", "collector", "import", *map(str, paths), "--data-dir",
                                 str(data_dir)], env=ENV, stdout=subprocess.PIPE, stderr=err_file, text=True)


@pytest.mark.parametrize("with_serve", [False, True], ids=["direct", "through-serve"])
def test_an_import_waits_for_the_import_that_holds_import_lock_and_names_it(tmp_path: Path, with_serve: bool) -> None:
    """import.lock held as another import holds it (labelled with its pid): this import
    says so, waits without committing anything, and goes on once it is let go."""
    c = Collector(tmp_path / "collector")
    key = enrolled(c.data_dir, "n1")["n1"]
    path = bundle_file(frames_of(key, "n1", 4), key, "n1", tmp_path / "n1.wsb")
    if with_serve:
        c.start()
    other = serve_link.DataDirLock(c.data_dir, serve_link.IMPORT_LOCK_FILE)
    released = False
    imp: subprocess.Popen[str] | None = None
    try:
        assert other.try_acquire("import")
        err = tmp_path / "import.err"
        imp = import_proc(c.data_dir, err, path)
        wait_for(lambda: f"waiting for another `waystation-collector import` (pid {os.getpid()}) to finish with "
                         f"{c.data_dir}" in err.read_text(), 30, "the import to say whom it waits for")
        time.sleep(1.0)
        assert imp.poll() is None and stored(c, "n1") == (0, 0), err.read_text()
        if not with_serve:
            # It waits before claiming serve.lock: a serve may still start meanwhile.
            probe = serve_link.DataDirLock(c.data_dir)
            try:
                assert probe.try_acquire("serve")
            finally:
                probe.close()
        other.close()
        released = True
        out, _ = imp.communicate(timeout=60)
        assert imp.returncode == 0, out + err.read_text()
        assert ("imported through serve" if with_serve else "imported through ledger") in out, out
        assert f"{SITE}/n1: 4 accepted, 0 duplicates, 0 refused" in out, out
        assert stored(c, "n1") == (4, 4)
        assert (c.data_dir / serve_link.IMPORT_LOCK_FILE).read_text() == ""  # let go, label cleared
    finally:
        if not released:
            other.close()
        if imp is not None and imp.poll() is None:
            imp.kill()
            imp.wait()
        c.stop()


def test_two_imports_of_two_unplaced_spools_of_one_node_through_serve_never_splice(tmp_path: Path) -> None:
    """A reinstalled node's two spools (both never placed, both from seq 1) in two bundles
    imported at once through serve, while the ledger is busy, so that whichever goes first
    has read the chain head and handed its frames to serve and is still waiting for them to
    commit: the other waits for it (import.lock), naming it, then reads a head that says
    its spool is another one. One is taken whole, the other refused whole; the ledger holds
    one chain, never seqs of both."""
    c = Collector(tmp_path / "collector")
    key = enrolled(c.data_dir, "n1")["n1"]
    spools = [frames_of(key, "n1", 5), frames_of(key, "n1", 8, value=-1.0)]  # other bytes at every seq
    paths = [bundle_file(frames, key, "n1", tmp_path / f"spool-{i}.wsb", unplaced=True)
             for i, frames in enumerate(spools)]
    errs = [tmp_path / f"import-{i}.err" for i in range(2)]
    c.start()
    imps: list[subprocess.Popen[str]] = []
    holder = sqlite3.connect(c.data_dir / "ledger.db", isolation_level=None, timeout=10)
    try:
        holder.execute("BEGIN IMMEDIATE")  # serve's commits wait; reads (the chain head) do not
        imps = [import_proc(c.data_dir, err, path) for err, path in zip(errs, paths, strict=True)]
        waiter = wait_for(lambda: [i for i, err in enumerate(errs) if "waiting for another" in err.read_text()],
                          30, "one import to wait for the other")
        holder.execute("ROLLBACK")
        outs = [imp.communicate(timeout=60)[0] for imp in imps]
        (loser,) = waiter
        winner = 1 - loser
        assert f"waiting for another `waystation-collector import` (pid {imps[winner].pid})" in \
            errs[loser].read_text(), errs[loser].read_text()
        assert imps[winner].returncode == 0, outs[winner] + errs[winner].read_text()
        assert f"{SITE}/n1: {len(spools[winner])} accepted, 0 duplicates, 0 refused" in outs[winner], outs[winner]
        n = len(spools[loser])
        assert imps[loser].returncode == 1, outs[loser] + errs[loser].read_text()
        assert f"{SITE}/n1: 0 accepted, 0 duplicates, {n} refused" in outs[loser], outs[loser]
        assert outs[loser].count(": unplaced_spool: ") == n, outs[loser]
        held = c.ledger_rows("SELECT seq, hash FROM batches WHERE node = 'n1' ORDER BY seq")
        assert held == [(i + 1, wire.batch_hash(f)) for i, f in enumerate(spools[winner])], held
    finally:
        holder.close()
        for imp in imps:
            if imp.poll() is None:
                imp.kill()
                imp.wait()
        c.stop()


# ---------------------------------------------------------------------------- capacity


def test_a_large_import_through_a_busy_serve_lands_every_frame_once_beside_posts(tmp_path: Path) -> None:
    """max_pending_commits = 4. While the ledger is held, posts fill the commit queue and the
    import is answered 503 and retries; then it goes through in small slices while a node
    keeps posting. Every frame is recorded exactly once and the posts all get through."""
    config = tmp_path / "collector.toml"
    config.write_text('[limits]\nmax_pending_commits = 4\nmax_body_bytes = "4KiB"\n')
    c = Collector(tmp_path / "collector", config=config)
    keys = enrolled(c.data_dir, "n1", "n2")
    imported = frames_of(keys["n1"], "n1", 400)
    posted = frames_of(keys["n2"], "n2", 60)
    path = bundle_file(imported, keys["n1"], "n1", tmp_path / "n1.wsb")
    c.start()
    imp: subprocess.Popen[str] | None = None
    statuses: dict[int, int] = {}
    try:
        holder = sqlite3.connect(c.data_dir / "ledger.db", isolation_level=None, timeout=10)
        holder.execute("BEGIN IMMEDIATE")  # the committer now waits for the ledger
        first = [threading.Thread(target=lambda i=i: statuses.__setitem__(i, post_until_taken(c.url, posted[i])))
                 for i in range(4)]
        for t in first:
            t.start()
        wait_for(lambda: post_batch(c.url, b"x") == 503, 10, "the commit queue to be full")
        err = tmp_path / "import.err"
        with open(err, "w") as err_file:
            imp = subprocess.Popen([sys.executable, "-m", "collector", "import", str(path), "--data-dir",
                                    str(c.data_dir)], env=ENV, stdout=subprocess.PIPE, stderr=err_file, text=True)
        wait_for(lambda: "is busy (503" in err.read_text(), 20, "the import to be answered 503 and wait")
        holder.execute("ROLLBACK")
        holder.close()
        for t in first:
            t.join(15)

        def keep_posting() -> None:
            for i in range(4, len(posted)):
                statuses[i] = post_until_taken(c.url, posted[i])

        poster = threading.Thread(target=keep_posting)
        poster.start()
        out, _ = imp.communicate(timeout=90)
        poster.join(60)
        assert imp.returncode == 0, out + err.read_text()
        assert f"{SITE}/n1: 400 accepted, 0 duplicates, 0 refused" in out, out
        assert statuses == dict.fromkeys(range(len(posted)), 200)
        assert stored(c, "n1") == (400, 400) and stored(c, "n2") == (60, 60)
        counts = accepted_total(c)
        assert counts["accepted"] == 460 and counts["duplicate"] == 0, counts
    finally:
        if imp is not None and imp.poll() is None:
            imp.kill()
            imp.wait()
        c.stop()


# ---------------------------------------------------------------------------- a key rotation serve did not take


def test_frames_after_a_key_rotation_the_commit_queue_had_no_room_for_are_answered_overloaded(
        tmp_path: Path) -> None:
    """Ingest.import_frames over a real ledger and committer whose queue is full (the ledger
    thread busy, two posts' batches waiting): the rotation is answered overloaded, and so is
    every frame after it, unverified, rather than refused unknown_key for a key the ledger
    does not know yet. Sent again once there is room, all of them go in."""
    import asyncio

    from collector.config import LimitsConfig
    from collector.exposition import FleetState
    from collector.ingest import Committer, Ingest, IngestMetrics
    from collector.ledger import Ledger, Outcome, Submission
    from tests.unit.test_ledger import Chain

    ledger_path = tmp_path / "ledger.db"
    the_ledger = Ledger(ledger_path)
    old, new, other = SigningKey.generate(), SigningKey.generate(), SigningKey.generate()
    trust.enroll(the_ledger.conn, SITE, "n1", bytes(old.verify_key))
    other_record = trust.enroll(the_ledger.conn, SITE, "n2", bytes(other.verify_key))
    chain = Chain(old, SITE, "n1")
    first = chain.data(1)
    rotated = [chain.rotation(2, new), chain.data(3, key=new), chain.data(4, key=new)]
    posted = frames_of(other, "n2", 2)
    keys = ledger.connect(ledger_path, create=False)
    limits = LimitsConfig(max_pending_commits=2)
    fleet = FleetState(limits.max_series_per_node)

    def on_outcome(outcome: Outcome) -> None:
        fleet.update_node(outcome.state)

    committer = Committer(the_ledger, limits.max_pending_commits, on_outcome)
    ingest = Ingest(limits, keys, committer, fleet, IngestMetrics())

    async def scenario() -> tuple[list[tuple[str, str]], list[str]]:
        committer.start()
        assert [a[0] for a in await ingest.import_frames([first], "n1.wsb")] == ["accepted"]
        gate = threading.Event()
        busy = asyncio.ensure_future(committer.call(gate.wait, 30))
        waiting = [asyncio.ensure_future(committer.submit(Submission(wire.parse_frame(raw), other_record,
                                                                     time.time()))) for raw in posted]
        while committer.pending < 2:
            await asyncio.sleep(0.01)
        full = [(result, detail) for result, detail, _ in await ingest.import_frames(rotated, "n1.wsb")]
        gate.set()
        await busy
        assert [o.result for o in await asyncio.gather(*waiting)] == ["accepted", "accepted"]
        again = [result for result, _, _ in await ingest.import_frames(rotated, "n1.wsb")]
        await committer.stop()
        return full, again

    try:
        full, again = asyncio.run(scenario())
    finally:
        ingest.verifier.shutdown(wait=True)
        keys.close()
        the_ledger.close()
    assert [result for result, _ in full] == ["overloaded"] * 3, full
    assert all(f"the key rotation of {SITE}/n1 at seq 2 before it was answered overloaded" in detail
               for _, detail in full[1:]), full
    assert again == ["accepted"] * 3
    assert ingest.metrics.batches["unknown_key"] == 0


def test_a_key_rotation_serve_could_not_commit_holds_back_the_rest_of_the_import(tmp_path: Path) -> None:
    """Through serve, slices of 2 frames (max_pending_commits = 4): the rotation's commit fails
    (the ledger held past its busy timeout), so the frame after it in its slice is answered
    overloaded and the next slice's, verified without the new key, unknown_key. The import
    sends all of them again after the rotation, and every frame lands once."""
    config = tmp_path / "collector.toml"
    config.write_text("[limits]\nmax_pending_commits = 4\n")
    c = Collector(tmp_path / "collector", config=config)
    old, new = SigningKey.generate(), SigningKey.generate()
    conn = ledger.connect(c.data_dir / "ledger.db")
    try:
        trust.enroll(conn, SITE, "n1", bytes(old.verify_key))
    finally:
        conn.close()
    from tests.unit.test_ledger import Chain

    chain = Chain(old, SITE, "n1")
    first = bundle_file([chain.data(1)], old, "n1", tmp_path / "first.wsb")
    rest = bundle_file([chain.rotation(2, new), *(chain.data(s, key=new) for s in (3, 4, 5))], new, "n1",
                       tmp_path / "rest.wsb")
    c.start()
    imp: subprocess.Popen[str] | None = None
    holder = sqlite3.connect(c.data_dir / "ledger.db", isolation_level=None, timeout=10)
    try:
        r = c.cli("import", str(first))
        assert r.returncode == 0 and f"{SITE}/n1: 1 accepted" in r.stdout, r.stdout + r.stderr
        holder.execute("BEGIN IMMEDIATE")  # serve's commits wait past SQLite's busy timeout, then fail
        err = tmp_path / "import.err"
        imp = import_proc(c.data_dir, err, rest)
        wait_for(lambda: "is busy (" in err.read_text(), 60, "serve to answer the import", interval=0.05)
        holder.execute("ROLLBACK")
        out, _ = imp.communicate(timeout=60)
        assert imp.returncode == 0, out + err.read_text()
        assert f"{SITE}/n1: 4 accepted, 0 duplicates, 0 refused" in out, out
        assert "is busy (4 of 4 frames answered unavailable)" in err.read_text(), err.read_text()
        assert stored(c, "n1") == (5, 5)
    finally:
        holder.close()
        if imp is not None and imp.poll() is None:
            imp.kill()
            imp.wait()
        c.stop()
    assert "ledger commit of 1 batches failed" in c.log.read_text()
