"""The signed receipts `waystation-collector import` writes (docs/bundle.md §4)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from collector import keyring, trust
from collector import ledger as ledger_mod
from collector.config import CollectorConfig
from collector.serve_link import ImportError_
from wire import bundle

if TYPE_CHECKING:
    from collections.abc import Sequence

    from collector.bundles import Report


def issue_receipts(config: CollectorConfig, report: Report) -> list[bytes]:
    """One signed receipt per node that proved itself (a verified frame or manifest):
    everything the collector holds for it now, its watermark, a new receipt number."""
    pair = keyring.current(Path(config.data_dir))
    if pair is None:
        raise ImportError_(f"{keyring.current_path(Path(config.data_dir))}: no collector key to sign receipts "
                           "with; run `waystation-collector keygen`")
    conn = ledger_mod.connect(config.ledger_path, create=False)
    out: list[bytes] = []
    try:
        for (site, node), n in sorted(report.nodes.items()):
            if not (n.accepted or n.duplicates or n.pruned or n.bundles):
                continue
            node_key = n.manifest_key or _enrolled_key(conn, site, node)
            raw = bundle.encode_receipt(
                pair.signing, pair.key_id, ledger_mod.next_receipt_no(conn), int(time.time() * 1000),
                site, node, node_key, ledger_mod.complete_through(conn, site, node),
                ledger_mod.held_ranges(conn, site, node), sorted(n.held.items()), n.bundles,
            )
            out.append(raw)
            report.receipts.append(bundle.parse_receipt(raw))
    finally:
        conn.close()
    return out


def _enrolled_key(conn: Any, site: str, node: str) -> bytes:
    keys = [k for k in trust.all_keys(conn) if (k.site, k.node) == (site, node) and k.state == "enrolled"]
    return max(keys, key=lambda k: k.valid_from_seq).key_id if keys else b""


def write_receipts(path: Path, receipts: Sequence[bytes]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(bundle.encode_receipt_file(receipts))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    bundle.fsync_dir(path.parent)
