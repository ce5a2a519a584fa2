"""The batch protocol both sides share: model, payload codec, frame, control payloads,
compression, sealing, and open_batch(), the one path by which any reader verifies a batch.

docs/wire.md is the normative description; this package is its reference implementation.
The agent and the collector import it and nothing of each other's.
"""

from wire.columns import prepare_columns
from wire.compression import ZSTD_CAP_MAX_INPUT, ZSTD_TABLE_LOG_MAX, compress, zstd_parameters
from wire.control import (
    MAX_DROP_RANGES,
    DropReceipt,
    KeyRotation,
    check_drop_receipt,
    decode_drop_receipt,
    decode_key_rotation,
    encode_drop_receipt,
    encode_key_rotation,
    rotation_proof_message,
)
from wire.frame import (
    FIXED_HEADER_LEN,
    FLAG_SEALED,
    HASH_LEN,
    KEY_ID_LEN,
    KNOWN_FLAGS,
    MAGIC,
    MAX_NAME_LEN,
    MAX_SEQ,
    SIGNATURE_LEN,
    WIRE_VERSION,
    WIRE_VERSION_2,
    WIRE_VERSIONS,
    ZERO_HASH,
    BatchContext,
    Codec,
    Frame,
    Header,
    Kind,
    Prepared,
    batch_hash,
    check_counts,
    check_raw_len,
    decompress_payload,
    encode_data_batch,
    key_id,
    parse_frame,
    prepare_data,
    resign_batch,
    sign_batch,
    verify_signature,
)
from wire.model import I64_MAX, I64_MIN, Limits, MetricType, Series, WireError
from wire.open import (
    DEFAULT_OPEN_LIMITS,
    KeyLookup,
    MemoryTables,
    NodeKey,
    OpenLimits,
    Refusal,
    SeriesTables,
    TableStore,
    VerifiedBatch,
    open_batch,
)
from wire.payload import MAX_SCALED, SeriesTableCache, ValueMode, decode_series, encode_series
from wire.schema import schema_problem
from wire.sealing import SEAL_OVERHEAD, SealingKeys, seal, seal_prepared, sealed_to, unseal
from wire.table import (
    TABLE_HEAD_LEN,
    TABLE_ID_LEN,
    TABLE_MAGIC,
    CurrentTable,
    SeriesTable,
    TableBuilder,
    encode_table,
    open_table,
    parse_table_head,
    series_problem,
    split_body,
    table_id,
    with_table,
)

__all__ = [
    "FIXED_HEADER_LEN", "FLAG_SEALED", "HASH_LEN", "I64_MAX", "I64_MIN", "KEY_ID_LEN", "KNOWN_FLAGS", "MAGIC",
    "MAX_NAME_LEN", "MAX_SCALED", "SIGNATURE_LEN", "WIRE_VERSION", "ZERO_HASH", "ZSTD_CAP_MAX_INPUT",
    "ZSTD_TABLE_LOG_MAX", "BatchContext", "Codec", "DropReceipt", "Frame", "Header", "KeyRotation", "Kind",
    "Limits", "MetricType", "Prepared", "Series", "SeriesTableCache", "ValueMode", "WireError", "batch_hash",
    "check_counts", "compress", "decode_drop_receipt", "decode_key_rotation", "decode_series",
    "decompress_payload", "encode_data_batch", "encode_drop_receipt", "encode_key_rotation", "encode_series",
    "key_id", "parse_frame", "prepare_data", "resign_batch", "rotation_proof_message", "sign_batch",
    "verify_signature", "zstd_parameters",
    "DEFAULT_OPEN_LIMITS", "KeyLookup", "NodeKey", "OpenLimits", "Refusal", "SeriesTables", "VerifiedBatch",
    "open_batch",
    "MAX_DROP_RANGES", "MAX_SEQ", "check_drop_receipt", "schema_problem",
    "SEAL_OVERHEAD", "SealingKeys", "check_raw_len", "seal", "seal_prepared", "sealed_to", "unseal",
    "WIRE_VERSION_2", "WIRE_VERSIONS", "MemoryTables", "TableStore", "prepare_columns",
    "TABLE_HEAD_LEN", "TABLE_ID_LEN", "TABLE_MAGIC", "CurrentTable", "SeriesTable", "TableBuilder", "encode_table",
    "open_table", "parse_table_head", "series_problem", "split_body", "table_id", "with_table",
]
