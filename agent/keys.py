"""The node's Ed25519 signing key: generate, store (0600), load, and print for enrollment."""

from __future__ import annotations

import base64
import os
from pathlib import Path

from nacl.signing import SigningKey

import wire
from wire.keys import parse_public_key, public_key_text

__all__ = ["KeyError_", "describe", "enroll_command", "generate", "load", "parse_public_key", "public_key_text"]


class KeyError_(Exception):
    """A key file that cannot be created or read; the message names the path."""


def generate(path: Path, force: bool = False) -> SigningKey:
    """Create a new key file at path with mode 0600; refuses to overwrite unless force."""
    if path.exists() and not force:
        raise KeyError_(f"{path} already exists; use --force to replace it (the old key stops working)")
    path.parent.mkdir(parents=True, exist_ok=True)
    key = SigningKey.generate()
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, base64.b64encode(bytes(key)) + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return key


def load(path: Path) -> SigningKey:
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise KeyError_(f"{path}: no node key; run `waystation-agent keygen` first") from None
    except OSError as exc:
        raise KeyError_(f"{path}: cannot read node key: {exc.strerror}") from None
    try:
        seed = base64.b64decode(text.strip(), validate=True)
        if len(seed) != 32:
            raise ValueError
    except ValueError:
        raise KeyError_(f"{path}: not a Waystation node key (expected base64 of 32 bytes)") from None
    return SigningKey(seed)


def enroll_command(site: str, node: str, key: SigningKey) -> str:
    pub = bytes(key.verify_key)
    import shlex  # keygen's alone: the daemon does not load it

    # Quoted for the shell (and for `enroll --from`): a name with a space, quote or # stays whole.
    site_arg, node_arg = shlex.quote(site), shlex.quote(node)
    return f"waystation-collector enroll --site {site_arg} --node {node_arg} --key {public_key_text(pub)}"


def describe(key: SigningKey) -> str:
    return wire.key_id(bytes(key.verify_key)).hex()
