"""zstd for payloads: small contexts on the agent, bounded output on the collector."""

from __future__ import annotations

import zstandard

from wire.model import WireError

# zstd's match-finder tables, as log2 of entries. At level 19 zstd sizes them from the input
# (2^19 each for a 134 KB batch, a minute of every source: 5.9 MB of context, the agent's
# peak RSS at each flush). Capped at 2^17 that batch compresses to the same bytes from a
# 2.8 MB context. Beyond ZSTD_CAP_MAX_INPUT the cap starts to cost bytes (+0.6% at 1.3 MB
# of node_exporter-like series, more on less repetitive data), and uplink bytes win: bigger
# batches keep zstd's own tables.
ZSTD_TABLE_LOG_MAX = 17
ZSTD_CAP_MAX_INPUT = 256 * 1024


def zstd_parameters(level: int, size: int) -> zstandard.ZstdCompressionParameters:
    """The compression parameters for `size` input bytes at `level`, tables capped if small."""
    params = zstandard.ZstdCompressionParameters.from_level(level, source_size=size, write_content_size=True)
    if size > ZSTD_CAP_MAX_INPUT:
        return params
    return zstandard.ZstdCompressionParameters.from_level(
        level, source_size=size, write_content_size=True,
        hash_log=min(params.hash_log, ZSTD_TABLE_LOG_MAX), chain_log=min(params.chain_log, ZSTD_TABLE_LOG_MAX))


def compress(raw: bytes, level: int) -> bytes:
    """One zstd frame, with its content size."""
    return zstandard.ZstdCompressor(compression_params=zstd_parameters(level, len(raw))).compress(raw)



def decompress(payload: bytes, raw_len: int, max_raw_bytes: int) -> bytes:
    """Exactly raw_len bytes from one complete zstd frame, never producing more than
    max_raw_bytes (a zstd bomb costs nothing)."""
    if raw_len > max_raw_bytes:
        raise WireError("too_large", f"declared payload of {raw_len} bytes exceeds {max_raw_bytes}")
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(payload, read_across_frames=False)
        out = reader.read(raw_len + 1)
    except zstandard.ZstdError as exc:
        raise WireError("malformed", f"payload is not valid zstd: {exc}") from exc
    if len(out) != raw_len:
        raise WireError("malformed", f"payload decompresses to {len(out)}+ bytes, header says {raw_len}")
    # The frame is now known to yield exactly raw_len bytes, so a second pass is bounded; it
    # checks that the payload is one complete zstd frame with nothing after it.
    whole = zstandard.ZstdDecompressor().decompressobj()
    try:
        whole.decompress(payload)
    except zstandard.ZstdError as exc:
        raise WireError("malformed", f"payload is not valid zstd: {exc}") from exc
    if not whole.eof or whole.unused_data:
        raise WireError("malformed", "payload is not exactly one complete zstd frame")
    return out
