"""Sealed payloads: a compressed payload encrypted to the collector's key (docs/wire.md §5).

An agent that pins the collector's key seals each DATA payload after compressing it and
before signing it, so the spool, a bundle and the bytes on the wire are unreadable without
the collector's private key, and the signature covers the ciphertext: a reader verifies
before it decrypts, so unsigned input costs no decryption work.

The construction is libsodium's sealed box (X25519, XSalsa20-Poly1305, a fresh ephemeral
sender key per payload), behind a scheme byte and the recipient key id in clear, so the
collector knows which of its private keys to use (it keeps retired ones after a rotation).
Pure functions; the collector's private keys arrive as a mapping from key id.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from nacl.exceptions import CryptoError
from nacl.public import PrivateKey, PublicKey, SealedBox

from wire.frame import FLAG_SEALED, Prepared
from wire.keys import COLLECTOR_KEY_ID_LEN, CollectorKey
from wire.model import WireError

SCHEME_SEALED_BOX = 1  # X25519 + XSalsa20-Poly1305, crypto_box_seal
ENVELOPE_HEAD_LEN = 1 + COLLECTOR_KEY_ID_LEN  # scheme byte, recipient key id
SEALED_BOX_OVERHEAD = 32 + 16  # the ephemeral public key, the Poly1305 tag
SEAL_OVERHEAD = ENVELOPE_HEAD_LEN + SEALED_BOX_OVERHEAD

# The collector's private sealing keys by key id (wire.keys.collector_key_id).
SealingKeys = Mapping[bytes, PrivateKey]


def seal(payload: bytes, recipient: CollectorKey) -> bytes:
    """The envelope: scheme, recipient key id, crypto_box_seal(payload, recipient)."""
    box = SealedBox(PublicKey(recipient.sealing_public_key))
    return bytes((SCHEME_SEALED_BOX,)) + recipient.key_id + bytes(box.encrypt(payload))


def seal_prepared(p: Prepared, recipient: CollectorKey) -> Prepared:
    """A prepared (compressed, not yet signed) payload sealed to the recipient; the header's
    raw_len still counts the decompressed bytes, payload_len the envelope's."""
    if p.flags & FLAG_SEALED:
        raise ValueError("payload is already sealed")
    return dataclasses.replace(p, payload=seal(p.payload, recipient), flags=p.flags | FLAG_SEALED)


def sealed_to(envelope: bytes) -> bytes:
    """The recipient key id an envelope names (b"" if it is too short to name one)."""
    return envelope[1:ENVELOPE_HEAD_LEN] if len(envelope) >= ENVELOPE_HEAD_LEN else b""


def unseal(envelope: bytes, keys: SealingKeys | None) -> bytes:
    """The sealed (compressed) payload; WireError: malformed, unsupported,
    sealed_to_unknown_key or undecryptable. Call only on a signed frame whose signature
    verified: this is the work unsigned input must not cost."""
    if len(envelope) < SEAL_OVERHEAD:
        raise WireError("malformed", f"sealed payload of {len(envelope)} bytes is shorter than its "
                                     f"{SEAL_OVERHEAD}-byte envelope")
    scheme = envelope[0]
    if scheme != SCHEME_SEALED_BOX:
        raise WireError("unsupported", f"seal scheme {scheme}; this reader opens scheme {SCHEME_SEALED_BOX}")
    key_id = envelope[1:ENVELOPE_HEAD_LEN]
    key = keys.get(key_id) if keys else None
    if key is None:
        held = ", ".join(sorted(k.hex() for k in keys)) if keys else "none"
        raise WireError("sealed_to_unknown_key",
                        f"payload is sealed to collector key {key_id.hex()}, which this collector does "
                        f"not hold (it holds: {held})")
    try:
        return bytes(SealedBox(key).decrypt(envelope[ENVELOPE_HEAD_LEN:]))
    except CryptoError:
        raise WireError("undecryptable",
                        f"sealed payload does not decrypt with collector key {key_id.hex()}") from None
