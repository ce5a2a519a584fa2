"""Node keys: enrollment, rotation, revocation, and the per-batch key check.

The keys live in the ledger database so that `waystation-collector enroll` and
`revoke`, run while `serve` is up, take effect on the next post: serve looks
the key up per request (one primary-key read on its own WAL connection).
"""

from __future__ import annotations

import shlex
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, cast

import wire
from wire.keys import parse_public_key

KeyState = Literal["enrolled", "revoked", "retired"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    key_id            BLOB PRIMARY KEY,
    site              TEXT NOT NULL,
    node              TEXT NOT NULL,
    public_key        BLOB NOT NULL,
    state             TEXT NOT NULL CHECK (state IN ('enrolled', 'revoked', 'retired')),
    valid_from_seq    INTEGER NOT NULL DEFAULT 1,
    valid_through_seq INTEGER,
    enrolled_at       REAL NOT NULL,
    changed_at        REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS keys_by_node ON keys (site, node);
"""

_COLUMNS = (
    "key_id, site, node, public_key, state, valid_from_seq, valid_through_seq, "
    "enrolled_at, changed_at"
)


class TrustError(Exception):
    """An enrollment or revocation that cannot be done; the message says why."""


@dataclass(frozen=True)
class KeyRecord:
    key_id: bytes
    site: str
    node: str
    public_key: bytes
    state: KeyState
    valid_from_seq: int  # a key enrolled by rotation signs only seqs after the rotation
    valid_through_seq: int | None  # a key retired by rotation still signs seqs up to it
    enrolled_at: float
    changed_at: float

    def refusal(
        self, site: str, node: str, seq: int, *, recorded: bool = False
    ) -> tuple[str, str] | None:
        """Why this key may not sign batch (site, node, seq), as (result, detail); None if it may.

        `recorded`: the batch is already in the ledger, accepted while the key was valid, so
        a revocation since then does not unmake it (the forwarder and the rebuild read it)."""
        if (site, node) != (self.site, self.node):
            return "unknown_key", (
                f"key {self.key_id.hex()} is enrolled for {self.site}/{self.node}, "
                f"not {site}/{node}"
            )
        if self.state == "revoked" and not recorded:
            return "revoked", f"key {self.key_id.hex()} of {site}/{node} is revoked"
        if self.valid_through_seq is not None and seq > self.valid_through_seq:
            return "revoked", (
                f"key {self.key_id.hex()} was retired by the key rotation at seq "
                f"{self.valid_through_seq}; sign with the new key"
            )
        if seq < self.valid_from_seq:
            return "unknown_key", (
                f"key {self.key_id.hex()} is valid from seq {self.valid_from_seq}, batch is seq {seq}"
            )
        return None

    def to_json(self) -> dict[str, object]:
        return {
            "key_id": self.key_id.hex(),
            "state": self.state,
            "valid_from_seq": self.valid_from_seq,
            "valid_through_seq": self.valid_through_seq,
            "enrolled_at": self.enrolled_at,
            "changed_at": self.changed_at,
        }


def _record(row: tuple[object, ...]) -> KeyRecord:
    return KeyRecord(*row)  # type: ignore[arg-type]


def _check_name(what: str, value: str) -> None:
    if not 0 < len(value.encode("utf-8")) <= wire.MAX_NAME_LEN:
        raise TrustError(f"{what} must be 1..{wire.MAX_NAME_LEN} bytes of UTF-8, got {value!r}")


def lookup(conn: sqlite3.Connection, key_id: bytes) -> KeyRecord | None:
    row = conn.execute(f"SELECT {_COLUMNS} FROM keys WHERE key_id = ?", (key_id,)).fetchone()
    return _record(row) if row else None


@dataclass(frozen=True)
class RecordedKey:
    """A key as it stood when the ledger recorded a batch signed with it."""

    record: KeyRecord

    @property
    def public_key(self) -> bytes:
        return self.record.public_key

    def refusal(self, site: str, node: str, seq: int) -> tuple[str, str] | None:
        return self.record.refusal(site, node, seq, recorded=True)


def lookup_recorded(conn: sqlite3.Connection, key_id: bytes) -> RecordedKey | None:
    """The key a stored batch names, for readers of the ledger (see RecordedKey)."""
    record = lookup(conn, key_id)
    return RecordedKey(record) if record else None


def keys_of(conn: sqlite3.Connection, site: str, node: str) -> list[KeyRecord]:
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM keys WHERE site = ? AND node = ? ORDER BY enrolled_at, key_id",
        (site, node),
    ).fetchall()
    return [_record(r) for r in rows]


def all_keys(conn: sqlite3.Connection) -> list[KeyRecord]:
    rows = conn.execute(f"SELECT {_COLUMNS} FROM keys ORDER BY site, node, enrolled_at").fetchall()
    return [_record(r) for r in rows]


def enroll(
    conn: sqlite3.Connection, site: str, node: str, public_key: bytes, now: float | None = None
) -> KeyRecord:
    """Enroll public_key for site/node (its own transaction); re-enrolling re-enables the key."""
    return enroll_many(conn, [(site, node, public_key)], now)[0]


def enroll_many(
    conn: sqlite3.Connection, entries: Sequence[tuple[str, str, bytes]], now: float | None = None,
    where: Sequence[str] = (),
) -> list[KeyRecord]:
    """Enroll every (site, node, public key) in one transaction: all of them or, on the
    first TrustError (naming the entry by `where`, e.g. its line, else its position), none."""
    for site, node, public_key in entries:
        _check_name("site", site)
        _check_name("node", node)
        if len(public_key) != 32:
            raise TrustError(f"public key must be 32 bytes, got {len(public_key)}")
    now = time.time() if now is None else now
    conn.execute("BEGIN IMMEDIATE")
    try:
        for position, (site, node, public_key) in enumerate(entries, 1):
            kid = wire.key_id(public_key)
            existing = lookup(conn, kid)
            if existing is not None and (existing.site, existing.node) != (site, node):
                named = where[position - 1] if position <= len(where) else f"entry {position}"
                which = f" ({named})" if len(entries) > 1 else ""
                raise TrustError(
                    f"key {kid.hex()} is already enrolled for {existing.site}/{existing.node}{which}; "
                    "each node needs its own key"
                )
            if existing is None:
                conn.execute(
                    "INSERT INTO keys (key_id, site, node, public_key, state, valid_from_seq, "
                    "valid_through_seq, enrolled_at, changed_at) "
                    "VALUES (?, ?, ?, ?, 'enrolled', 1, NULL, ?, ?)",
                    (kid, site, node, public_key, now, now),
                )
            else:
                conn.execute(
                    "UPDATE keys SET state = 'enrolled', valid_from_seq = 1, valid_through_seq = NULL, "
                    "changed_at = ? WHERE key_id = ?",
                    (now, kid),
                )
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    records = [lookup(conn, wire.key_id(public_key)) for _, _, public_key in entries]
    assert all(r is not None for r in records)
    return cast(list[KeyRecord], records)


def parse_enrollments(text: str) -> list[tuple[int, str, str, bytes]]:
    """(line number, site, node, public key) per line of an enrollment file: either
    `SITE NODE KEY` or the command `waystation-agent keygen` prints
    (`waystation-collector enroll --site S --node N --key K`, options in any order, shell
    quoting allowed); blank lines and `#` comments are skipped. TrustError naming every
    bad line (up to 20) when any line is bad."""
    out: list[tuple[int, str, str, bytes]] = []
    problems: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            words = shlex.split(line, comments=True)
        except ValueError as exc:
            problems.append(f"line {number}: {exc}")
            continue
        if not words:
            continue
        try:
            site, node, key_text = _enrollment_words(words)
            out.append((number, site, node, parse_public_key(key_text)))
            _check_name("site", site)
            _check_name("node", node)
        except (ValueError, TrustError) as exc:
            problems.append(f"line {number}: {exc}")
    if problems:
        more = f" (and {len(problems) - 20} more)" if len(problems) > 20 else ""
        raise TrustError("; ".join(problems[:20]) + more)
    return out


def _enrollment_words(words: list[str]) -> tuple[str, str, str]:
    if len(words) == 3 and not any(w.startswith("--") for w in words):
        return words[0], words[1], words[2]  # SITE NODE KEY (a site or node may be named enroll)
    if "enroll" not in words:
        if len(words) != 3:
            raise ValueError(f"expected SITE NODE KEY or an enroll command, got {len(words)} words")
        return words[0], words[1], words[2]
    found: dict[str, str] = {}
    rest = words[words.index("enroll") + 1:]
    i = 0
    while i < len(rest):
        word = rest[i]
        name, eq, value = word.partition("=")
        if name in ("--site", "--node", "--key"):
            if not eq:
                if i + 1 >= len(rest):
                    raise ValueError(f"{name} without a value")
                i += 1
                value = rest[i]
            found[name] = value
        elif name.startswith("--"):
            # Another option (--config FILE, --data-dir=D): not ours; its value, if any.
            i += 1 if eq or i + 1 >= len(rest) or rest[i + 1].startswith("--") else 2
            continue
        else:
            raise ValueError(f"unexpected word {word!r} in the enroll command")
        i += 1
    missing = [o for o in ("--site", "--node", "--key") if o not in found]
    if missing:
        raise ValueError(f"the enroll command lacks {', '.join(missing)}")
    return found["--site"], found["--node"], found["--key"]


def revoke(
    conn: sqlite3.Connection, node: str, site: str | None = None, now: float | None = None
) -> list[KeyRecord]:
    """Revoke every key of node (in site, if given); refuses when the node name is ambiguous."""
    now = time.time() if now is None else now
    conn.execute("BEGIN IMMEDIATE")
    try:
        if site is None:
            sites = [
                r[0]
                for r in conn.execute(
                    "SELECT DISTINCT site FROM keys WHERE node = ? ORDER BY site", (node,)
                )
            ]
            if len(sites) > 1:
                raise TrustError(
                    f"node {node!r} exists in sites {', '.join(sites)}; say which with --site"
                )
            if not sites:
                raise TrustError(f"no keys enrolled for node {node!r}")
            site = sites[0]
        cur = conn.execute(
            "UPDATE keys SET state = 'revoked', changed_at = ? "
            "WHERE site = ? AND node = ? AND state != 'revoked'",
            (now, site, node),
        )
        if cur.rowcount == 0 and not keys_of(conn, site, node):
            raise TrustError(f"no keys enrolled for {site}/{node}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return keys_of(conn, site, node)


def rotate(
    conn: sqlite3.Connection, old: KeyRecord, new_public_key: bytes, rotation_seq: int, now: float
) -> KeyRecord:
    """Retire old after rotation_seq and enroll new_public_key from rotation_seq + 1.

    Runs inside the caller's (the ledger's) transaction, so the rotation batch and the
    key change commit together.
    """
    new_id = wire.key_id(new_public_key)
    existing = lookup(conn, new_id)
    if existing is not None and (existing.site, existing.node) != (old.site, old.node):
        raise TrustError(
            f"rotation names key {new_id.hex()}, which is enrolled for {existing.site}/{existing.node}"
        )
    if existing is not None and existing.state == "revoked":
        raise TrustError(f"rotation names key {new_id.hex()}, which is revoked")
    retired = conn.execute(
        "UPDATE keys SET state = 'retired', valid_through_seq = ?, changed_at = ? "
        "WHERE key_id = ? AND state = 'enrolled'",
        (rotation_seq, now, old.key_id),
    ).rowcount
    if retired != 1:  # revoked (or already rotated) meanwhile: a revocation is never undone here
        raise TrustError(f"key {old.key_id.hex()} is no longer enrolled; the rotation cannot take effect")
    if existing is None:
        conn.execute(
            "INSERT INTO keys (key_id, site, node, public_key, state, valid_from_seq, "
            "valid_through_seq, enrolled_at, changed_at) VALUES (?, ?, ?, ?, 'enrolled', ?, NULL, ?, ?)",
            (new_id, old.site, old.node, new_public_key, rotation_seq + 1, now, now),
        )
    record = lookup(conn, new_id)
    assert record is not None
    return record
