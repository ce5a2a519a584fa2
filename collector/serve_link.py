"""How `waystation-collector import` and `serve` share a data_dir.

serve holds an exclusive flock on `<data_dir>/serve.lock` for its whole life and, once
listening, writes `<data_dir>/serve.json` (mode 0600: its loopback URL, a random token, its
max_body_bytes, the SHA-256 of its TLS certificate when it serves HTTPS, and the random
nonce its lock label carries). An import that finds the lock held hands the frames to
serve over POST /v1/import (same host only, with the token): `ServeSink`. Otherwise the
import takes the lock itself, so serve cannot start meanwhile (it waits), and commits
directly (collector.bundles.DirectSink).

Every import also holds an exclusive flock on `<data_dir>/import.lock` while it reads and
commits bundles, whichever way it commits, taken before it looks at serve.lock
(`acquire_for_import`; labelled as serve.lock is, `import <pid> <nonce>`): one import at a
time per data_dir. An import decides from its own read of the ledger which frames of a
never-placed spool it may commit (collector.bundles._unplaced_verdicts) and commits them
afterwards; an import that finds serve lets go of serve.lock at once, so serve.lock alone
would let a second import decide from the same read meanwhile, and the two would splice
their spools into one chain. serve never takes import.lock: an import waiting for another
does not hold up serve.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import http.client
import json
import logging
import os
import re
import secrets
import ssl
import struct
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import wire

log = logging.getLogger(__name__)

LOCK_FILE = "serve.lock"
IMPORT_LOCK_FILE = "import.lock"
ENDPOINT_FILE = "serve.json"
TOKEN_HEADER = "X-Waystation-Import-Token"
ORIGIN_HEADER = "X-Waystation-Origin-File"
IMPORT_CONTENT_TYPE = "application/x-waystation-frames"
_LEN = struct.Struct("<I")
# How long an import waits for a starting serve to publish its endpoint (its start-up
# replay of the ledger comes first), and for serve to answer a chunk.
ENDPOINT_WAIT_S = 300.0
CHUNK_TIMEOUT_S = 600.0
# A holder labels the lock right after it flocks it; a lock that stays unlabelled this long
# is held by something else (a stray `flock`, an older tool).
LABEL_WAIT_S = 10.0
POLL_S = 0.05
# Tries in a row in which serve took none of a chunk's frames (the whole request answered
# 503, or every frame overloaded/unavailable) before the import gives up on them.
RETRIES = 20
BACKOFF_FIRST_S = 0.2
BACKOFF_MAX_S = 5.0


class ImportError_(Exception):
    """An import that cannot go on (no ledger, serve unreachable); the message says why."""


_nonce: tuple[int, str] | None = None


def process_nonce() -> str:
    """This process's random id, in its lock label and its serve.json. A pid cannot match
    one to the other: it is reused, a restarted container's serve is pid 1 again, and a
    pid means nothing across PID namespaces sharing a data_dir. Drawn again in a fork."""
    global _nonce
    if _nonce is None or _nonce[0] != os.getpid():
        _nonce = (os.getpid(), secrets.token_hex(8))
    return _nonce[1]


# ---------------------------------------------------------------------------- the lock


@dataclass(frozen=True)
class Holder:
    """Who holds serve.lock, as its label says: `serve <pid> <nonce>` / `import <pid> <nonce>`."""

    role: str  # "serve", "import", or "" (not labelled yet, or not by us)
    pid: int  # for messages only
    nonce: str  # "" in a label an older version wrote (`serve <pid>`)


UNLABELLED = Holder("", 0, "")


class DataDirLock:
    """The flock on <data_dir>/serve.lock that serve holds while it runs (and an import
    while it commits directly), or on <data_dir>/import.lock (an import, for its whole run);
    its content says who holds it (`Holder`)."""

    def __init__(self, data_dir: Path, name: str = LOCK_FILE) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.path = data_dir / name
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        self.held = False

    def try_acquire(self, role: str) -> bool:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise
        self.held = True
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{role} {os.getpid()} {process_nonce()}\n".encode(), 0)
        return True

    def holder(self) -> Holder:
        """The label as the holder wrote it; UNLABELLED if not (yet) written."""
        fields = os.pread(self.fd, 128, 0).decode(errors="replace").split()
        if len(fields) not in (2, 3) or fields[0] not in ("serve", "import") or not fields[1].isdigit():
            return UNLABELLED
        return Holder(fields[0], int(fields[1]), fields[2] if len(fields) == 3 else "")

    def close(self) -> None:
        if self.held:
            os.ftruncate(self.fd, 0)
        os.close(self.fd)  # releases the flock
        self.held = False


def _unlabelled(lock: DataDirLock, waited_s: float) -> ImportError_:
    return ImportError_(f"{lock.path} has been locked for {waited_s:.0f}s by a process that does not say who "
                        "it is (neither `waystation-collector serve` nor `import` labelled it; `fuser "
                        f"{lock.path}` names it)")


def acquire_for_serve(data_dir: Path, say: Callable[[str], None], label_wait_s: float = LABEL_WAIT_S) -> DataDirLock:
    """serve's lock: waits for an import to finish; refuses if another serve holds it.

    Polls rather than blocking in flock: the holder's label is only read while the lock is
    taken, and a waiter blocked in flock would neither see a holder that had not labelled
    it yet turn out to be a serve, nor another serve win the lock when an import lets go."""
    lock = DataDirLock(data_dir)
    said: Holder | None = None
    unlabelled_since: float | None = None
    while not lock.try_acquire("serve"):
        holder = lock.holder()
        if holder.role == "serve":
            lock.close()
            raise ImportError_(f"another `waystation-collector serve` (pid {holder.pid}) uses {data_dir}")
        if holder.role == "import":
            unlabelled_since = None
            if holder != said:
                say(f"waiting for `waystation-collector import` (pid {holder.pid}) to finish with {data_dir}")
                said = holder
        else:
            now = time.monotonic()
            unlabelled_since = now if unlabelled_since is None else unlabelled_since
            if now - unlabelled_since > label_wait_s:
                lock.close()
                raise _unlabelled(lock, now - unlabelled_since)
        time.sleep(POLL_S)
    return lock


def acquire_for_import(data_dir: Path, say: Callable[[str], None], label_wait_s: float = LABEL_WAIT_S) -> DataDirLock:
    """import.lock, for the whole of one import: waits (without bound: the other import may
    be a large one) for an import that holds it, saying once per holder whose turn it is.

    Polls, as acquire_for_serve does, so that the holder is named from its label even when
    it flocked the file an instant before labelling it."""
    lock = DataDirLock(data_dir, IMPORT_LOCK_FILE)
    said: Holder | None = None
    unlabelled_since: float | None = None
    while not lock.try_acquire("import"):
        holder = lock.holder()
        if holder.role == "import":
            unlabelled_since = None
            if holder != said:
                say(f"waiting for another `waystation-collector import` (pid {holder.pid}) to finish with "
                    f"{data_dir} (imports run one at a time)")
                said = holder
        else:
            now = time.monotonic()
            unlabelled_since = now if unlabelled_since is None else unlabelled_since
            if now - unlabelled_since > label_wait_s:
                lock.close()
                raise _unlabelled(lock, now - unlabelled_since)
        time.sleep(POLL_S)
    return lock


def cert_fingerprint(cert_file: Path) -> str:
    """SHA-256 (hex) of the first certificate in a PEM file, in DER: the one a TLS server
    presents from the chain file it loaded."""
    text = cert_file.read_text(errors="replace")
    found = re.search(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", text, re.DOTALL)
    if found is None:
        raise ValueError(f"{cert_file}: no PEM certificate in it")
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(found.group(0))).hexdigest()


def write_endpoint(data_dir: Path, url: str, token: str, max_body_bytes: int, cert_file: str = "") -> Path:
    """Where an import finds this serve (mode 0600: the token lets it import). cert_file:
    serve's TLS certificate chain, whose leaf the import then pins."""
    doc: dict[str, Any] = {"pid": os.getpid(), "nonce": process_nonce(), "url": url, "token": token,
                           "max_body_bytes": max_body_bytes}
    if cert_file:
        doc["tls_sha256"] = cert_fingerprint(Path(cert_file))
    path = data_dir / ENDPOINT_FILE
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # a leftover temp file keeps its old mode otherwise
        os.write(fd, json.dumps(doc).encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path


def new_token() -> str:
    return secrets.token_hex(32)


def loopback_url(scheme: str, host: str, port: int) -> str:
    """The URL this host reaches a listener on: a wildcard address means loopback."""
    host = host.strip("[]")
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}"


@dataclass(frozen=True)
class Endpoint:
    url: str
    token: str = field(repr=False)  # never in a repr, so never in a traceback or a log line
    max_body_bytes: int
    pid: int = 0  # serve's, for messages
    tls_sha256: str = ""  # serve's certificate (DER), hex; what an https URL must present


def _read_endpoint(data_dir: Path, holder: Holder) -> Endpoint | None:
    """The endpoint the lock's holder published; None until it has (a serve.json left by an
    earlier serve names another nonce)."""
    try:
        doc = json.loads((data_dir / ENDPOINT_FILE).read_text())
        if holder.nonce:
            if doc.get("nonce") != holder.nonce:
                return None
        elif int(doc["pid"]) != holder.pid:  # a serve from before nonces: its pid is all there is
            return None
        return Endpoint(str(doc["url"]), str(doc["token"]), int(doc["max_body_bytes"]), int(doc["pid"]),
                        str(doc.get("tls_sha256", "")))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def claim(data_dir: Path, say: Callable[[str], None]) -> DataDirLock | Endpoint:
    """The lock (serve is not running: commit directly) or the running serve's endpoint.

    Polls (see acquire_for_serve): an import blocked in flock behind another import would
    wait for the whole life of a serve that took the lock in between."""
    lock = DataDirLock(data_dir)
    holder: Holder | None = None
    since = time.monotonic()
    said = False
    while not lock.try_acquire("import"):
        now = time.monotonic()
        current = lock.holder()
        if current != holder:
            since, said = now, False
        holder = current
        if holder.role == "serve":
            endpoint = _read_endpoint(data_dir, holder)
            if endpoint is not None:
                lock.close()
                return endpoint
            if not said:
                say(f"serve (pid {holder.pid}) is starting; waiting for it to listen")
            if now - since > ENDPOINT_WAIT_S:
                lock.close()
                raise ImportError_(f"serve (pid {holder.pid}) holds {lock.path} but has not published "
                                   f"{ENDPOINT_FILE} within {ENDPOINT_WAIT_S:.0f}s")
        elif holder.role == "import":
            if not said:
                say(f"waiting for another import (pid {holder.pid}) to finish")
        elif now - since > LABEL_WAIT_S:
            lock.close()
            raise _unlabelled(lock, now - since)
        said = True
        time.sleep(POLL_S)
    return lock

# ---------------------------------------------------------------------------- handing frames to serve

# (offset in the file, item): the frame, or the series table it names followed by it (wire.with_table)
Frames = list[tuple[int, bytes]]
Answer = tuple[str, str, wire.Header | None]  # result, detail, header
RETRIED = ("overloaded", "unavailable")  # serve took none of it; sent again


@dataclass(frozen=True)
class _Busy:
    """serve answered the whole request 503: it took none of the frames."""

    detail: str
    retry_after_s: float


class ServeSink:
    """serve is running: POST /v1/import; serve verifies and commits as it does posts."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.max_frame_bytes = endpoint.max_body_bytes
        parts = urllib.parse.urlsplit(endpoint.url)
        self.host = parts.hostname or ""
        self.port = parts.port
        self.context: ssl.SSLContext | None = None
        self.pin = endpoint.tls_sha256.replace(":", "").lower()
        if parts.scheme == "https":
            if not self.pin:
                raise ImportError_(f"serve (pid {endpoint.pid}) listens on {endpoint.url} but {ENDPOINT_FILE} "
                                   "pins no certificate fingerprint (a serve older than this import? restart it)")
            # The pin replaces the chain and name checks: serve's certificate names its public
            # name, not the loopback address we connect to, and its CA need not be trusted
            # here; what matters is that it is the very certificate serve loaded.
            self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            self.context.check_hostname = False
            self.context.verify_mode = ssl.CERT_NONE

    def _connect(self) -> http.client.HTTPConnection:
        if self.context is None:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=CHUNK_TIMEOUT_S)
            conn.connect()
            return conn
        conn = http.client.HTTPSConnection(self.host, self.port, timeout=CHUNK_TIMEOUT_S, context=self.context)
        conn.connect()
        # Checked before a byte of the request (the token) is sent.
        der = conn.sock.getpeercert(binary_form=True) if isinstance(conn.sock, ssl.SSLSocket) else None
        presented = hashlib.sha256(der).hexdigest() if der else "(no certificate)"
        if presented != self.pin:
            conn.close()
            raise ImportError_(f"serve at {self.endpoint.url} presented a certificate with SHA-256 fingerprint "
                               f"{presented}, but {ENDPOINT_FILE} pins {self.pin}: not importing through it "
                               "(another program on that port, or serve's certificate file replaced since it "
                               "started?)")
        return conn

    def _post(self, frames: Frames, origin_file: str) -> list[dict[str, Any]] | _Busy:
        body = b"".join(_LEN.pack(len(raw)) + raw for _, raw in frames)
        headers = {"Content-Type": IMPORT_CONTENT_TYPE, TOKEN_HEADER: self.endpoint.token,
                   ORIGIN_HEADER: urllib.parse.quote(origin_file)}
        try:
            conn = self._connect()
            try:
                conn.request("POST", "/v1/import", body=body, headers=headers)
                resp = conn.getresponse()
                status, data, retry_after = resp.status, resp.read(), resp.getheader("Retry-After", "")
            finally:
                conn.close()
        except (OSError, http.client.HTTPException) as exc:
            raise ImportError_(f"cannot reach serve at {self.endpoint.url}: {exc}") from None
        text = data[:500].decode(errors="replace")
        if status == 503:
            try:
                wait = float(retry_after)
            except ValueError:
                wait = 0.0
            return _Busy(f"503 {text}", wait)
        if status != 200:
            raise ImportError_(f"serve at {self.endpoint.url} refused the import: {status} {text}")
        try:
            doc = json.loads(data)
        except ValueError:
            doc = None
        results = doc.get("results") if isinstance(doc, dict) else None
        if not isinstance(results, list) or len(results) != len(frames) \
                or not all(isinstance(r, dict) for r in results):
            raise ImportError_(f"serve at {self.endpoint.url} answered the import with something else")
        return results

    def commit(self, frames: Frames, origin_file: str) -> list[Answer]:
        """Every frame's answer. What serve did not take (a 503 for the whole request, a
        frame answered overloaded/unavailable, or one answered unknown_key after its node's
        key rotation was answered so) goes again after a backoff; after RETRIES tries in a
        row that took nothing, what is left is answered as serve last did. Nothing taken is
        sent again, so nothing is counted twice."""
        frame_headers = [_header_of(raw) for _, raw in frames]
        answers: list[Answer] = [("", "", h) for h in frame_headers]
        todo = list(range(len(frames)))
        stalled = 0
        while todo:
            reply = self._post([frames[i] for i in todo], origin_file)
            if isinstance(reply, _Busy):
                taken, wait, why = False, reply.retry_after_s, reply.detail
                for i in todo:
                    answers[i] = ("overloaded", f"serve answered {reply.detail}", frame_headers[i])
            else:
                again = []
                rotating: set[tuple[str, str]] = set()  # nodes whose key rotation serve did not take
                for i, r in zip(todo, reply, strict=True):
                    result = str(r.get("result"))
                    h = frame_headers[i]
                    answers[i] = (result, str(r.get("detail", "")), h)
                    if result in RETRIED:
                        again.append(i)
                        if h is not None and h.kind == wire.Kind.KEY_ROTATION:
                            rotating.add((h.site, h.node))
                    elif result == "unknown_key" and h is not None and (h.site, h.node) in rotating:
                        # Signed with the key that rotation brings, and verified before the
                        # ledger knew it (serve answers the rest of that slice overloaded, but
                        # verifies the request's later slices): sent again after the rotation.
                        again.append(i)
                taken, wait = len(again) < len(todo), 0.0
                why = f"{len(again)} of {len(todo)} frames answered {answers[again[0]][0]}" if again else ""
                todo = again
            if not todo:
                break
            stalled = 0 if taken else stalled + 1
            if stalled >= RETRIES:
                break
            delay = min(BACKOFF_MAX_S, max(wait, BACKOFF_FIRST_S * 2**stalled))
            log.info("serve at %s is busy (%s); sending %d frames again in %.1fs", self.endpoint.url, why,
                     len(todo), delay)
            time.sleep(delay)
        return answers

    def close(self) -> None:
        pass


def _header_of(item: bytes) -> wire.Header | None:
    try:
        return wire.parse_frame(wire.split_body(item)[1]).header
    except wire.WireError:
        return None
