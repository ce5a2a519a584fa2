"""How Ed25519 public keys are written on command lines and in config: standard base64."""

from __future__ import annotations

import base64


def public_key_text(public_key: bytes) -> str:
    return base64.b64encode(public_key).decode("ascii")


def parse_public_key(text: str) -> bytes:
    """The 32 raw bytes of a base64 public key; ValueError naming the text otherwise."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except ValueError as exc:
        raise ValueError(f"public key {text!r} is not base64") from exc
    if len(raw) != 32:
        raise ValueError(f"public key must be 32 bytes, {text!r} decodes to {len(raw)}")
    return raw
