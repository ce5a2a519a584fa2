"""How `waystation-collector import` and `serve` share a data_dir.

serve holds an exclusive flock on `<data_dir>/serve.lock` for its whole life and, once
listening, writes `<data_dir>/serve.json` (mode 0600: its loopback URL, a random token, its
max_body_bytes). An import that finds the lock held hands the frames to serve over POST
/v1/import (same host only, with the token): `ServeSink`. Otherwise the import takes the
lock itself, so serve cannot start meanwhile (it waits), and commits directly
(collector.bundles.DirectSink).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
import ssl
import struct
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import wire

LOCK_FILE = "serve.lock"
ENDPOINT_FILE = "serve.json"
TOKEN_HEADER = "X-Waystation-Import-Token"
ORIGIN_HEADER = "X-Waystation-Origin-File"
IMPORT_CONTENT_TYPE = "application/x-waystation-frames"
_LEN = struct.Struct("<I")
# How long an import waits for a starting serve to publish its endpoint (its start-up
# replay of the ledger comes first), and for serve to answer a chunk.
ENDPOINT_WAIT_S = 300.0
CHUNK_TIMEOUT_S = 600.0
RETRIES = 20  # per chunk, for frames serve answers overloaded/unavailable

class ImportError_(Exception):
    """An import that cannot go on (no ledger, serve unreachable); the message says why."""


# ---------------------------------------------------------------------------- the lock


class DataDirLock:
    """The flock on <data_dir>/serve.lock that serve holds while it runs (and an import
    while it commits directly); its content says who holds it: `serve <pid>` / `import <pid>`."""

    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.path = data_dir / LOCK_FILE
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        self.held = False

    def try_acquire(self, role: str) -> bool:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise
        self._mark(role)
        return True

    def acquire(self, role: str) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        self._mark(role)

    def _mark(self, role: str) -> None:
        self.held = True
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{role} {os.getpid()}\n".encode(), 0)

    def holder(self) -> tuple[str, int]:
        """(role, pid) as the holder wrote it; ("", 0) if not (yet) written."""
        try:
            role, pid = os.pread(self.fd, 64, 0).decode().split()
            return role, int(pid)
        except ValueError:
            return "", 0

    def close(self) -> None:
        if self.held:
            os.ftruncate(self.fd, 0)
        os.close(self.fd)  # releases the flock
        self.held = False


def acquire_for_serve(data_dir: Path, say: Callable[[str], None]) -> DataDirLock:
    """serve's lock: waits for an import to finish; refuses if another serve holds it."""
    lock = DataDirLock(data_dir)
    while not lock.try_acquire("serve"):
        role, pid = lock.holder()
        if role == "serve":
            lock.close()
            raise ImportError_(f"another `waystation-collector serve` (pid {pid}) uses {data_dir}")
        say(f"waiting for `waystation-collector import` (pid {pid}) to finish with {data_dir}")
        lock.acquire("serve")
        break
    return lock


def write_endpoint(data_dir: Path, url: str, token: str, max_body_bytes: int) -> Path:
    """Where an import finds this serve (mode 0600: the token lets it import)."""
    path = data_dir / ENDPOINT_FILE
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # a leftover temp file keeps its old mode otherwise
        os.write(fd, json.dumps({"pid": os.getpid(), "url": url, "token": token,
                                 "max_body_bytes": max_body_bytes}).encode())
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
    token: str
    max_body_bytes: int


def _read_endpoint(data_dir: Path, pid: int) -> Endpoint | None:
    try:
        doc = json.loads((data_dir / ENDPOINT_FILE).read_text())
        if int(doc["pid"]) != pid:
            return None  # left by an earlier serve; this one has not published yet
        return Endpoint(str(doc["url"]), str(doc["token"]), int(doc["max_body_bytes"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def claim(data_dir: Path, say: Callable[[str], None]) -> DataDirLock | Endpoint:
    """The lock (serve is not running: commit directly) or the running serve's endpoint."""
    lock = DataDirLock(data_dir)
    deadline = time.monotonic() + ENDPOINT_WAIT_S
    said = False
    while True:
        if lock.try_acquire("import"):
            return lock
        role, pid = lock.holder()
        if role == "import":
            say(f"waiting for another import (pid {pid}) to finish")
            lock.acquire("import")
            return lock
        if role == "serve":
            endpoint = _read_endpoint(data_dir, pid)
            if endpoint is not None:
                lock.close()
                return endpoint
            if not said:
                say(f"serve (pid {pid}) is starting; waiting for it to listen")
                said = True
        if time.monotonic() > deadline:
            lock.close()
            raise ImportError_(f"serve (pid {pid}) holds {data_dir / LOCK_FILE} but has not published "
                               f"{ENDPOINT_FILE} within {ENDPOINT_WAIT_S:.0f}s")
        time.sleep(0.2)

Frames = list[tuple[int, bytes]]  # (offset in the file, frame)
Answer = tuple[str, str, wire.Header | None]  # result, detail, header


class ServeSink:
    """serve is running: POST /v1/import; serve verifies and commits as it does posts."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.max_frame_bytes = endpoint.max_body_bytes
        self.context: ssl.SSLContext | None = None
        if endpoint.url.startswith("https:"):
            # Same host: the token authenticates us; serve's certificate names its public name.
            self.context = ssl.create_default_context()
            self.context.check_hostname = False
            self.context.verify_mode = ssl.CERT_NONE

    def _post(self, frames: Frames, origin_file: str) -> list[dict[str, Any]]:
        body = b"".join(_LEN.pack(len(raw)) + raw for _, raw in frames)
        req = urllib.request.Request(
            f"{self.endpoint.url}/v1/import", data=body, method="POST",
            headers={"Content-Type": IMPORT_CONTENT_TYPE, TOKEN_HEADER: self.endpoint.token,
                     ORIGIN_HEADER: urllib.parse.quote(origin_file)},
        )
        try:
            with urllib.request.urlopen(req, timeout=CHUNK_TIMEOUT_S, context=self.context) as resp:
                doc = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            raise ImportError_(f"serve at {self.endpoint.url} refused the import: {exc.code} "
                               f"{exc.read()[:500].decode(errors='replace')}") from None
        except (OSError, ValueError) as exc:
            raise ImportError_(f"cannot reach serve at {self.endpoint.url}: {exc}") from None
        results = doc.get("results") if isinstance(doc, dict) else None
        if not isinstance(results, list) or len(results) != len(frames):
            raise ImportError_(f"serve at {self.endpoint.url} answered the import with something else")
        return results

    def commit(self, frames: Frames, origin_file: str) -> list[Answer]:
        answers: list[Answer] = [("", "", None)] * len(frames)
        todo = list(range(len(frames)))
        for attempt in range(RETRIES):
            results = self._post([frames[i] for i in todo], origin_file)
            retry = []
            for i, r in zip(todo, results, strict=True):
                header = _header_of(frames[i][1])
                answers[i] = (str(r.get("result")), str(r.get("detail", "")), header)
                if r.get("result") in ("overloaded", "unavailable"):
                    retry.append(i)
            if not retry:
                break
            todo = retry
            time.sleep(min(5.0, 0.2 * 2**attempt))
        return answers

    def close(self) -> None:
        pass


def _header_of(raw: bytes) -> wire.Header | None:
    try:
        return wire.parse_frame(raw).header
    except wire.WireError:
        return None
