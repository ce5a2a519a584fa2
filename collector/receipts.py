"""The signed receipts the collector issues to air-gapped nodes (docs/bundle.md §4).

`waystation-collector import --receipt-out` issues one per node of the imported bundles
(`issue_receipts`); `waystation-collector receipt` issues one for a single enrolled node
from the ledger alone (`issue_node_receipt`): for a reinstalled node, so it can renumber
before its first export, and for a receipt that was lost. Every receipt states what the
collector holds for the node (seq ranges, watermark, chain head), takes the next receipt
number and is recorded in the ledger's receipts_issued as it is signed
(`collector.ledger.issue_receipt`).

Both work beside a running `serve`: they never take `serve.lock`, read the ledger through
WAL, and write only the receipt number and the receipts_issued row, in one short write
transaction of their own (serve keeps neither in memory).
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from collector import keyring, trust
from collector import ledger as ledger_mod
from collector.config import CollectorConfig
from wire import bundle

if TYPE_CHECKING:
    from collector.bundles import Report


class ReceiptError(Exception):
    """A receipt that cannot be issued (no collector key, no ledger, unknown node); says why."""


def _signing_pair(config: CollectorConfig) -> keyring.KeyPair:
    pair = keyring.current(Path(config.data_dir))
    if pair is None:
        raise ReceiptError(f"{keyring.current_path(Path(config.data_dir))}: no collector key to sign receipts "
                           "with; run `waystation-collector keygen`")
    return pair


def _connect(config: CollectorConfig) -> sqlite3.Connection:
    try:
        return ledger_mod.connect(config.ledger_path, create=False)
    except FileNotFoundError:
        raise ReceiptError(f"{config.ledger_path}: no ledger here (is --data-dir the collector's data_dir? "
                           "enroll the node first)") from None


def _issue(
    conn: sqlite3.Connection,
    pair: keyring.KeyPair,
    site: str,
    node: str,
    node_key: bytes,
    batches: Sequence[tuple[int, bytes]] = (),
    bundles: Sequence[bytes] = (),
) -> bytes:
    def sign(number: int, facts: ledger_mod.Standing) -> bytes:
        return bundle.encode_receipt(
            pair.signing, pair.key_id, number, int(time.time() * 1000), site, node, node_key,
            facts.complete_through, facts.held, batches, bundles, head=facts.head,
        )

    return ledger_mod.issue_receipt(conn, site, node, sign)


def issue_receipts(config: CollectorConfig, report: Report) -> list[bytes]:
    """One signed receipt per node that proved itself (a verified frame or manifest):
    everything the collector holds for it now, its watermark and chain head, a new
    receipt number."""
    pair = _signing_pair(config)
    conn = _connect(config)
    out: list[bytes] = []
    try:
        for (site, node), n in sorted(report.nodes.items()):
            if not (n.accepted or n.duplicates or n.pruned or n.bundles):
                continue
            raw = _issue(conn, pair, site, node, n.manifest_key or _enrolled_key(conn, site, node),
                         sorted(n.held.items()), n.bundles)
            out.append(raw)
            report.receipts.append(bundle.parse_receipt(raw))
    finally:
        conn.close()
    return out


def issue_node_receipt(config: CollectorConfig, site: str, node: str) -> bundle.Receipt:
    """A fresh receipt for one enrolled node, from the ledger alone: held ranges, watermark
    and chain head, no batches to delete (no bundle answered)."""
    conn = _connect(config)
    try:
        pair = _signing_pair(config)
        keys = [k for k in trust.all_keys(conn) if (k.site, k.node) == (site, node)]
        if not keys:
            known = sorted({f"{k.site}/{k.node}" for k in trust.all_keys(conn)})
            shown = ", ".join(known[:10]) + (f", ... ({len(known)} nodes)" if len(known) > 10 else "")
            raise ReceiptError(f"unknown node {site}/{node}: no key of it is enrolled in {config.ledger_path} "
                               f"(enrolled: {shown or 'none'})")
        return bundle.parse_receipt(_issue(conn, pair, site, node, _enrolled_key(conn, site, node)))
    finally:
        conn.close()


def _enrolled_key(conn: sqlite3.Connection, site: str, node: str) -> bytes:
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
