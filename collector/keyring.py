"""The collector's own key pairs: `keygen`, `keygen --rotate`, and loading them for readers.

A pair is an Ed25519 signing key (for the receipts the collector signs) and an X25519
sealing key (agents that pin the pair seal their payloads to it). Both private keys of a
pair live in one file, mode 0600, so a pair is created, moved aside and loaded as a unit:

    <data_dir>/collector.key                   the current pair
    <data_dir>/collector-keys/<key id>.key     retired pairs, kept for decryption

Rotation moves the current pair aside and makes a new one. Agents still pinning the old
pair, and spools or bundles holding batches sealed to it, go on being read, because every
reader loads the sealing keys of all the files (`sealing_key_files`). A retired file may be
deleted once no agent pins its key id any more and no spool or bundle still holds batches
sealed to it (README, "The collector's keys").

Who calls what: the CLI calls `generate` / `rotate`; `serve` calls `load_sealing_keys`
once at start (the HTTP ingest and the start-up rebuild share the result, read-only) and
hands the file paths to the remote-write child, which loads them itself.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from pathlib import Path

from nacl.public import PrivateKey
from nacl.signing import SigningKey

from wire.keys import CollectorKey

CURRENT_FILE = "collector.key"
RETIRED_DIR = "collector-keys"
_FORMAT = "waystation-collector-key"


class KeyringError(Exception):
    """A key file that cannot be created, moved or read; the message names the path."""


@dataclass(frozen=True)
class KeyPair:
    signing: SigningKey
    sealing: PrivateKey

    @property
    def public(self) -> CollectorKey:
        return CollectorKey(bytes(self.signing.verify_key), bytes(self.sealing.public_key))

    @property
    def key_id(self) -> bytes:
        return self.public.key_id

    def pin_line(self) -> str:
        """What an agent puts under [uplink] in agent.toml."""
        return f'collector_key = "{self.public.text()}"'


def current_path(data_dir: Path) -> Path:
    return data_dir / CURRENT_FILE


def retired_path(data_dir: Path, key_id: bytes) -> Path:
    return data_dir / RETIRED_DIR / f"{key_id.hex()}.key"


def _encode(pair: KeyPair) -> bytes:
    doc = {
        "format": _FORMAT,
        "version": 1,
        "key_id": pair.key_id.hex(),  # informational; recomputed from the keys on load
        "signing_seed": base64.b64encode(bytes(pair.signing)).decode("ascii"),
        "sealing_private_key": base64.b64encode(bytes(pair.sealing)).decode("ascii"),
    }
    return json.dumps(doc, indent=1).encode() + b"\n"


def _write_private(path: Path, content: bytes) -> None:
    """Write a secret file whole or not at all: 0600 from its first byte, fsynced, renamed."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, content)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, 0o600)  # an older tmp left by a crash may have had other bits
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power loss
    finally:
        os.close(dir_fd)


def load_pair(path: Path) -> KeyPair:
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise KeyringError(f"{path}: no collector key; run `waystation-collector keygen` first") from None
    except OSError as exc:
        raise KeyringError(f"{path}: cannot read collector key: {exc.strerror}") from None
    try:
        doc = json.loads(text)
        if not isinstance(doc, dict) or doc.get("format") != _FORMAT or doc.get("version") != 1:
            raise ValueError
        seed = base64.b64decode(doc["signing_seed"], validate=True)
        sealing = base64.b64decode(doc["sealing_private_key"], validate=True)
        if len(seed) != 32 or len(sealing) != 32:
            raise ValueError
    except (ValueError, KeyError, TypeError):
        raise KeyringError(f"{path}: not a Waystation collector key file (format {_FORMAT} version 1)") from None
    return KeyPair(SigningKey(seed), PrivateKey(sealing))


def current(data_dir: Path) -> KeyPair | None:
    """The current pair, or None when keygen has not run."""
    path = current_path(data_dir)
    return load_pair(path) if path.exists() else None


def generate(data_dir: Path, force: bool = False) -> tuple[KeyPair, KeyPair | None]:
    """Create the current pair; refuses to replace one unless force. Returns (new, replaced)."""
    path = current_path(data_dir)
    old = None
    if path.exists():
        try:
            old = load_pair(path)
        except KeyringError:
            if not force:
                raise
        if not force:
            what = f"key id {old.key_id.hex()}" if old else "unreadable"
            raise KeyringError(
                f"{path} already exists ({what}); `keygen --rotate` makes a new pair and keeps this one "
                "for decryption, `keygen --force` replaces it (batches sealed to it can then never be opened)"
            )
    pair = KeyPair(SigningKey.generate(), PrivateKey.generate())
    _write_private(path, _encode(pair))
    return pair, old


def rotate(data_dir: Path) -> tuple[KeyPair, KeyPair]:
    """Move the current pair aside (kept under its key id) and make a new one: (new, retired).

    The retired copy is written before the current file is replaced, so a crash in between
    leaves the old pair in both places (running again moves it again), never in neither."""
    old = current(data_dir)
    if old is None:
        raise KeyringError(f"{current_path(data_dir)}: no collector key to rotate; run `waystation-collector keygen`")
    _write_private(retired_path(data_dir, old.key_id), _encode(old))
    pair = KeyPair(SigningKey.generate(), PrivateKey.generate())
    _write_private(current_path(data_dir), _encode(pair))
    return pair, old


def sealing_key_files(data_dir: Path) -> list[Path]:
    """The current pair's file and every retired one: all that a reader may need to unseal."""
    files = [current_path(data_dir)] if current_path(data_dir).exists() else []
    retired = data_dir / RETIRED_DIR
    if retired.is_dir():
        files += sorted(p for p in retired.iterdir() if p.suffix == ".key" and p.is_file())
    return files


def load_sealing_keys(paths: list[Path], missing_ok: bool = False) -> dict[bytes, PrivateKey]:
    """Private sealing keys by collector key id, from key files (KeyringError on a bad one).

    missing_ok: skip files deleted since they were listed (the forwarder child loads the list
    serve gave it, perhaps much later, after an operator removed a retired key)."""
    keys: dict[bytes, PrivateKey] = {}
    for path in paths:
        if missing_ok and not path.exists():
            continue
        pair = load_pair(path)
        keys[pair.key_id] = pair.sealing
    return keys
