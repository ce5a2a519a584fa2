"""How public keys are written on command lines and in config.

A node's Ed25519 key is standard base64. The collector's key, which an agent pins in
agent.toml as `[uplink] collector_key`, is one text value carrying both of the collector's
public keys (docs/wire.md §5.1): `wsc1:<key id, 16 hex digits>:<base64 of signing key ||
sealing key>`. The key id is in clear so that an operator can compare it at a glance with
what `waystation-collector keygen` printed, and it doubles as a checksum: a value copied
incompletely or edited by hand does not parse.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass

KEY_LEN = 32
COLLECTOR_KEY_PREFIX = "wsc1"
COLLECTOR_KEY_ID_LEN = 8


def public_key_text(public_key: bytes) -> str:
    return base64.b64encode(public_key).decode("ascii")


def parse_public_key(text: str) -> bytes:
    """The 32 raw bytes of a base64 public key; ValueError naming the text otherwise."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except ValueError as exc:
        raise ValueError(f"public key {text!r} is not base64") from exc
    if len(raw) != KEY_LEN:
        raise ValueError(f"public key must be 32 bytes, {text!r} decodes to {len(raw)}")
    return raw


def collector_key_id(signing_public_key: bytes, sealing_public_key: bytes) -> bytes:
    """The 8-byte id of a collector key pair: SHA-256(signing || sealing public key)[0:8]."""
    return hashlib.sha256(signing_public_key + sealing_public_key).digest()[:COLLECTOR_KEY_ID_LEN]


@dataclass(frozen=True)
class CollectorKey:
    """The collector's public keys as an agent pins them: Ed25519 for the receipts the
    collector signs, X25519 for the payloads an agent seals (encrypts) to it."""

    signing_public_key: bytes
    sealing_public_key: bytes

    def __post_init__(self) -> None:
        for name in ("signing_public_key", "sealing_public_key"):
            if len(getattr(self, name)) != KEY_LEN:
                raise ValueError(f"{name} must be {KEY_LEN} bytes")

    @property
    def key_id(self) -> bytes:
        return collector_key_id(self.signing_public_key, self.sealing_public_key)

    def text(self) -> str:
        both = base64.b64encode(self.signing_public_key + self.sealing_public_key).decode("ascii")
        return f"{COLLECTOR_KEY_PREFIX}:{self.key_id.hex()}:{both}"


def parse_collector_key(text: str) -> CollectorKey:
    """A collector key as `waystation-collector keygen` prints it; ValueError saying what is
    wrong with it otherwise (the caller names the config key)."""
    if not isinstance(text, str):
        raise ValueError("must be a string as `waystation-collector keygen` prints it")
    parts = text.strip().split(":")
    if len(parts) != 3:
        raise ValueError(
            f"{text!r} is not a collector key: expected {COLLECTOR_KEY_PREFIX}:<key id>:<base64>, "
            "the value `waystation-collector keygen` prints"
        )
    prefix, id_text, keys_text = parts
    if prefix != COLLECTOR_KEY_PREFIX:
        raise ValueError(
            f"{text!r} starts with {prefix!r}; this agent understands {COLLECTOR_KEY_PREFIX!r} collector keys"
        )
    try:
        key_id = bytes.fromhex(id_text)
    except ValueError:
        key_id = b""
    if len(key_id) != COLLECTOR_KEY_ID_LEN:
        raise ValueError(f"key id {id_text!r} must be {2 * COLLECTOR_KEY_ID_LEN} hex digits")
    try:
        raw = base64.b64decode(keys_text, validate=True)
    except (ValueError, binascii.Error):
        raise ValueError(f"the keys part of {text!r} is not base64") from None
    if len(raw) != 2 * KEY_LEN:
        raise ValueError(f"the keys part must decode to {2 * KEY_LEN} bytes (two public keys), got {len(raw)}")
    key = CollectorKey(raw[:KEY_LEN], raw[KEY_LEN:])
    if key.key_id != key_id:
        raise ValueError(
            f"key id {id_text} does not match the keys (it would be {key.key_id.hex()}): "
            "the value was copied incompletely or edited"
        )
    return key
