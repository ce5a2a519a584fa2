"""waystation-agent: run | keygen | rotate-key | check-config | status | export | import-receipt."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import os
import shlex
import signal
import sqlite3
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from agent import keys
from agent.config import AgentConfig, load_agent_config
from wire.config import ConfigError, parse_size
from wire.ownership import root_in_foreign_state
from wire.version import version

if TYPE_CHECKING:
    from agent.spool import Spool
    from wire import bundle

DEFAULT_CONFIG = Path("/etc/waystation/agent.toml")
EXIT_CONFIG = 2


def _config(args: argparse.Namespace) -> AgentConfig:
    path: Path | None = args.config
    if path is None and DEFAULT_CONFIG.exists():
        path = DEFAULT_CONFIG
    config = load_agent_config(path)
    if args.state_dir is not None:
        config = dataclasses.replace(config, state_dir=str(args.state_dir))
    return config


def cmd_keygen(config: AgentConfig, args: argparse.Namespace) -> int:
    try:
        key = keys.generate(config.key_path, force=args.force)
    except keys.KeyError_ as exc:
        print(f"waystation-agent keygen: {exc}", file=sys.stderr)
        return 1
    print(f"wrote node key {config.key_path} (key id {keys.describe(key)})")
    print("enroll it on the collector with:")
    print(f"  {keys.enroll_command(config.site, config.node, key)}")
    return 0


def cmd_rotate_key(config: AgentConfig, args: argparse.Namespace) -> int:
    if not config.key_path.exists():
        print(f"waystation-agent rotate-key: no key at {config.key_path} to rotate from", file=sys.stderr)
        return 1
    try:
        key = keys.generate(config.next_key_path)
    except keys.KeyError_:
        print(f"waystation-agent rotate-key: a rotation is already pending ({config.next_key_path})",
              file=sys.stderr)
        return 1
    print(f"new key {keys.describe(key)} written to {config.next_key_path}")
    print("the agent announces it in its chain (signed by the current key) at its next flush and")
    print("then signs with it; the collector enrolls it from that batch, nothing to do there.")
    return 0


def cmd_check_config(config: AgentConfig, args: argparse.Namespace) -> int:
    print(f"config OK: site={config.site} node={config.node} state_dir={config.state_dir}")
    print(f"  uplink {config.uplink.url}, window {config.summary.window:g}s, "
          f"flush every {config.summary.flush_every:g}s, spool quota {config.spool.max_bytes} bytes")
    src = config.sources
    sources = []
    if src.system.enabled:
        sources.append(f"system every {src.system.interval:g}s")
    if src.gpu.enabled:
        sources.append(f"gpu every {src.gpu.interval:g}s (NVML; off by itself without a driver)")
    if src.smart.enabled:
        devices = ", ".join(d.name for d in src.smart.devices) or "scanned"
        sources.append(f"smart every {src.smart.interval:g}s ({src.smart.smartctl}, output {src.smart.output}, "
                       f"devices {devices})")
    if src.network.enabled:
        targets = ", ".join(src.network.probe_targets) or "the collector's host and port"
        sources.append(f"network every {src.network.interval:g}s (probes {targets}"
                       f"{', ICMP too' if src.network.icmp else ''})")
    sources += [f"scrape:{s.name} every {s.interval:g}s ({s.url})" for s in src.scrape]
    print("  sources:" + "".join(f"\n    {line}" for line in sources) if sources else "  sources: none")
    pin = config.uplink.collector_pin
    print(f"  payloads sealed to collector key {pin.key_id.hex()}" if pin else "  payloads not sealed")
    print("  wire version 2: series tables sent once, batches name them by hash" if config.uplink.wire_version == 2
          else "  wire version 1: every data batch carries its series names (for a collector not yet upgraded)")
    if not config.key_path.exists():
        print(f"  note: no node key at {config.key_path} yet; run `waystation-agent keygen`")
    return 0


def _age(ms: int | None, now: float) -> str:
    if ms is None:
        return "never"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000))
    return f"{stamp} ({now - ms / 1000:.0f}s ago)"


def cmd_status(config: AgentConfig, args: argparse.Namespace) -> int:
    from agent.daemon import state_dir_problem
    from agent.spool import Spool

    now = time.time()
    problem = state_dir_problem(config.state_path)
    if not config.spool_path.exists():
        report: dict[str, object] = {"site": config.site, "node": config.node, "spool": None,
                                     "state_dir_problem": problem}
        if args.json:
            print(json.dumps(report))
        else:
            print(f"no spool at {config.spool_path} yet (has `waystation-agent run` started?)")
            if problem:
                print(f"problem: {problem}")
        return 1  # nothing to report on is not a healthy agent
    try:
        spool = Spool(config.spool_path, timeout_s=5.0, readonly=True)
        st = spool.stats()
        spool.close()
    except sqlite3.Error as exc:
        print(f"cannot read spool {config.spool_path}: {exc}", file=sys.stderr)
        return 1
    report = {
        "site": config.site,
        "node": config.node,
        "spool": str(config.spool_path),
        "pending_batches": st.pending_batches,
        "pending_bytes": st.pending_bytes,
        "rejected_batches": st.rejected_batches,
        "oldest_unsent_ms": st.oldest_unsent_ms,
        "last_ack_ms": st.last_ack_ms,
        "collector_complete_through": st.collector_complete_through,
        "next_seq": st.next_seq,
        "last_error": st.last_error,
        "last_error_ms": st.last_error_ms,
        "state_dir_problem": problem,
        **st.counters,
    }
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"node {config.site}/{config.node}, spool {config.spool_path}")
    print(f"  spool depth:        {st.pending_batches} batches, {st.pending_bytes} bytes"
          f" ({st.rejected_batches} rejected)")
    print(f"  oldest unsent:      {_age(st.oldest_unsent_ms, now)}")
    print(f"  last ack:           {_age(st.last_ack_ms, now)}")
    confirmed = (f"the collector has all through seq {st.collector_complete_through}"
                 if st.collector_complete_through is not None else "the collector has confirmed nothing yet")
    print(f"  {confirmed}; next seq {st.next_seq}")
    c = st.counters
    print(f"  signed {c['produced_batches']} batches / {c['produced_samples']} samples; "
          f"acked {c['acked_batches']}; dropped {c['dropped_batches']} batches / "
          f"{c['dropped_samples']} samples")
    if st.last_error:
        print(f"  last error:         {st.last_error} ({_age(st.last_error_ms, now)})")
    if problem:
        print(f"  problem:            {problem}")
    return 0


def _seq_text(seqs: list[int]) -> str:
    """Seqs as compact ranges: 3-7, 9."""
    out: list[list[int]] = []
    for seq in seqs:
        if out and out[-1][1] + 1 == seq:
            out[-1][1] = seq
        else:
            out.append([seq, seq])
    shown = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in out[:6])
    return shown + (f", ... ({len(out)} ranges)" if len(out) > 6 else "")


def cmd_export(config: AgentConfig, args: argparse.Namespace) -> int:
    """The unacknowledged batches, oldest first, into one bundle (docs/bundle.md)."""
    from agent.spool import Spool
    from wire import bundle

    def fail(message: str) -> int:
        print(f"waystation-agent export: {message}", file=sys.stderr)
        return 1

    try:
        max_bytes = parse_size(args.max_bytes) if args.max_bytes is not None else None
    except ValueError as exc:
        print(f"waystation-agent export: --max-bytes: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        key = keys.load(config.key_path)  # the manifest is signed by the node key
    except keys.KeyError_ as exc:
        return fail(str(exc))
    if not config.spool_path.exists():
        return fail(f"no spool at {config.spool_path} (has `waystation-agent run` started?)")
    out: Path = args.out
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    seqs: list[int] = []
    left = 0
    full = False  # stopped at the manifest's frame limit rather than at --max-bytes
    try:
        spool = Spool(config.spool_path, timeout_s=30.0, readonly=True)
        unplaced = spool.resume_needed()
    except sqlite3.Error as exc:
        return fail(f"cannot read spool {config.spool_path}: {exc}")
    try:
        # 0600 like the spool: an unsealed bundle holds the node's telemetry in clear.
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
            os.fchmod(f.fileno(), 0o600)  # a leftover temp file keeps its old mode otherwise
            writer = bundle.BundleWriter(f)
            max_frames = bundle.MAX_MANIFEST_ENTRIES  # read here: a bundle stops at this many frames
            rows = spool.unacknowledged_named()
            written: set[bytes] = set()  # series tables (wire v2) already in the bundle
            try:
                for seq, frame, tid in rows:
                    if not left and len(seqs) >= max_frames:
                        full = True
                    # A v2 frame's series table goes in once, ahead of the first frame naming it,
                    # so the bundle opens on its own; its record counts towards --max-bytes.
                    table = spool.table_blob(tid) if tid is not None and tid not in written else None
                    if tid is not None and tid not in written and table is None:
                        # Cannot happen (a table goes only with the last batch naming it); the frame
                        # still goes, for a collector that may hold the table from an earlier send.
                        print(f"waystation-agent export: warning: batch {seq} names series table "
                              f"{tid.hex()[:16]}, which the spool does not hold", file=sys.stderr)
                        written.add(tid)
                    if left or full or (max_bytes is not None and writer.size_with(
                            len(frame), config.site, config.node, len(table or b"")) > max_bytes):
                        left += 1
                        continue
                    if table is not None and tid is not None:
                        writer.add_table(table)
                        written.add(tid)
                    writer.add(frame)
                    seqs.append(seq)
            finally:
                rows.close()
            if not seqs:
                if left:
                    raise ValueError(f"the oldest unacknowledged batch alone makes a bundle larger than "
                                     f"--max-bytes {max_bytes}")
                print(f"nothing to export: {config.spool_path} holds no unacknowledged batch")
                return 0
            # The manifest says whether this spool was ever placed: the collector then takes an
            # unplaced spool's bundle only where it continues the chain it holds for the node.
            manifest = writer.finish(key, config.site, config.node, int(time.time() * 1000), unplaced=unplaced)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
        bundle.fsync_dir(out.parent)  # the rename itself reaches the stick before it is pulled
    except (OSError, sqlite3.Error, ValueError) as exc:
        return fail(str(exc))
    finally:
        spool.close()
        tmp.unlink(missing_ok=True)
    try:
        # What lets import-receipt tell a receipt answering this bundle from a stale one.
        writable = Spool(config.spool_path, timeout_s=30.0)
        try:
            writable.note_exported(max(seqs), manifest.hash)
        finally:
            writable.close()
    except sqlite3.Error as exc:
        print(f"waystation-agent export: warning: cannot record the export in {config.spool_path} ({exc}); "
              "a receipt for this bundle will still apply", file=sys.stderr)
    tables = f" with {len(written)} series tables" if written else ""
    print(f"wrote {out}: {len(seqs)} batches, seq {_seq_text(seqs)}, {writer.bytes} bytes{tables} "
          f"(bundle {manifest.hash.hex()[:16]})")
    if left and full:
        print(f"{left} newer unacknowledged batches did not fit: a bundle holds at most "
              f"{max_frames} batches; they go in a later bundle")
    elif left:
        print(f"{left} newer unacknowledged batches did not fit in --max-bytes {max_bytes}; "
              "they go in a later bundle")
    print("the batches stay in the spool until `waystation-agent import-receipt` applies the "
          "collector's receipt for them")
    if unplaced:
        # Exported all the same: for a node that never sent before, seq 1 on is right.
        site, node = shlex.quote(config.site), shlex.quote(config.node)
        print(f"waystation-agent export: warning: this spool never learned where the collector's chain for "
              f"{config.site}/{config.node} stands (a new spool numbers from seq 1), and the bundle says so. If "
              "this node sent batches before (reinstalled, or its spool was lost), the collector refuses this "
              "whole bundle (unplaced_spool) and the receipt of that import carries its chain head: "
              "`waystation-agent import-receipt` with it here renumbers the unsent batches, then export again. "
              f"Or first run `waystation-collector receipt --site {site} --node {node} --out FILE` on the "
              "collector and `waystation-agent import-receipt FILE` here. A node that never sent anything "
              "before can ignore this; its first receipt settles it.",
              file=sys.stderr)
    return 0


def cmd_import_receipt(config: AgentConfig, args: argparse.Namespace) -> int:
    """Apply the collector's signed receipt: forget exactly the batches it says it holds."""
    from agent.spool import ReceiptReplayed, Spool
    from wire import bundle

    def fail(message: str) -> int:
        print(f"waystation-agent import-receipt: {message}; nothing deleted", file=sys.stderr)
        return 1

    pin = config.uplink.collector_pin
    if pin is None:
        return fail("no collector key is pinned ([uplink] collector_key in agent.toml): a receipt "
                    "can only be trusted when its signature checks against the pinned key")
    path: Path = args.file
    try:
        with open(path, "rb") as f:
            raw = f.read(bundle.MAX_RECEIPT_FILE_BYTES + 1)
        items = bundle.parse_receipt_file(raw)
    except OSError as exc:
        return fail(f"cannot read {path}: {exc.strerror}")
    except ValueError as exc:
        return fail(f"{path}: {exc}")
    mine: list[bundle.Receipt] = []
    problems: list[str] = []
    others: list[str] = []
    for i, item in enumerate(items, 1):
        try:
            r = bundle.parse_receipt(item)
        except ValueError as exc:
            problems.append(f"receipt {i}: {exc}")
            continue
        if (r.site, r.node) != (config.site, config.node):
            others.append(f"{r.site}/{r.node}")
            continue
        if r.collector_key_id != pin.key_id:
            problems.append(f"receipt {r.receipt_no}: signed by collector key {r.collector_key_id.hex()}, "
                            f"this agent pins {pin.key_id.hex()}")
            continue
        try:
            bundle.verify_receipt(r, pin.signing_public_key)
        except ValueError as exc:
            problems.append(f"receipt {r.receipt_no}: {exc}")
            continue
        mine.append(r)
    if not mine and not problems:
        held = ", ".join(sorted(set(others))) or "none"
        return fail(f"{path} holds no receipt for this node {config.site}/{config.node} "
                    f"(it has receipts for: {held})")
    if not config.spool_path.exists():
        return fail(f"no spool at {config.spool_path}")
    try:
        spool = Spool(config.spool_path, timeout_s=30.0)
    except sqlite3.Error as exc:
        return fail(f"cannot open spool {config.spool_path}: {exc}")
    try:
        if spool.resume_needed():
            # Before anything is deleted: the head decides what this spool's seqs mean.
            problem = _place_spool(config, spool, mine, args.place)
            if problem:
                return fail(problem)
        for r in sorted(mine, key=lambda r: r.receipt_no):
            try:
                batches, size = spool.apply_receipt(r.collector_key_id, r.receipt_no, r.batches, r.complete_through)
            except ReceiptReplayed as exc:
                problems.append(str(exc))
                continue
            held_text = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in r.held[:6])
            print(f"receipt {r.receipt_no} from collector key {r.collector_key_id.hex()}: the collector "
                  f"holds seq {held_text or 'none'}{', ...' if len(r.held) > 6 else ''} "
                  f"(complete through {r.complete_through}); deleted {batches} batches ({size} bytes) "
                  "from the spool")
        st = spool.stats()
    except sqlite3.Error as exc:
        return fail(f"spool {config.spool_path}: {exc}")
    finally:
        spool.close()
    print(f"spool now holds {st.pending_batches} unacknowledged batches ({st.pending_bytes} bytes)")
    for p in problems:
        print(f"waystation-agent import-receipt: refused {p}; it deleted nothing", file=sys.stderr)
    return 1 if problems else 0


def _place_spool(config: AgentConfig, spool: Spool, receipts: list[bundle.Receipt], force: bool = False) -> str:
    """A spool that never learned the collector's chain (new, or the node reinstalled):
    renumber it above the chain head the newest applicable receipt states, as the uplink
    does with the head it asks for over HTTP. Returns why it could not ("" when done)."""
    from agent.spool import NOTHING_HELD, OWN_CHAIN, RENUMBERED, STALE, UNDECIDED, ReceiptReplayed

    fresh = []
    for r in receipts:
        try:
            spool.check_not_applied(r.collector_key_id, r.receipt_no)
        except ReceiptReplayed:
            continue  # refused, saying why, when it is applied below
        fresh.append(r)
    if not fresh:
        return ""
    # Heads only grow at the collector: the highest is the newest word on where it stands.
    r = max(fresh, key=lambda r: (r.head_seq, r.receipt_no))
    try:
        key = keys.load(config.key_path)  # renumbered batches are signed again
    except keys.KeyError_ as exc:
        return f"this spool must be renumbered to follow the collector's chain and needs the node key: {exc}"
    done = spool.resume_from_receipt(key, config.site, config.node, (r.head_seq, r.head_hash),
                                     itertools.chain.from_iterable(x.batches for x in fresh),
                                     issued_ms=r.issued_ms, bundles=[b for x in fresh for b in x.bundles],
                                     force=force)
    who = f"{config.site}/{config.node}"
    if done.outcome == STALE:
        issued = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r.issued_ms / 1000))
        return (f"receipt {r.receipt_no} was issued {issued} UTC, before this spool was created, and answers "
                "none of its bundles: the collector's chain for this node may have moved past the head it "
                f"states (seq {r.head_seq}), and placing the spool there could reuse seqs. Carry a fresh one "
                f"(`waystation-collector receipt --site {config.site} --node {config.node} --out FILE`), or, if "
                "this receipt is fresh and this node's clock runs ahead of the collector's, apply it with --place")
    if done.outcome == RENUMBERED:
        print(f"renumbered {done.moved} unsent batches to follow seq {r.head_seq} that the collector holds for "
              f"{who} (receipt {r.receipt_no}): they now start at seq {r.head_seq + 1}")
    elif done.outcome == NOTHING_HELD:
        print(f"the collector holds no batch of {who} yet (receipt {r.receipt_no}): this spool's numbering "
              "from seq 1 stands")
    elif done.outcome == OWN_CHAIN:
        print(f"the collector's chain for {who} (head seq {r.head_seq}) is this spool's own: nothing to renumber")
    elif done.outcome == UNDECIDED:
        print(f"waystation-agent import-receipt: warning: cannot tell whether seq {r.head_seq}, the head of the "
              f"collector's chain for {who} (receipt {r.receipt_no}), is this spool's own batch: the spool no "
              f"longer holds seq {r.head_seq} or {r.head_seq + 1}. Nothing renumbered; the receipt of the next "
              "export settles it", file=sys.stderr)
    return ""


def cmd_run(config: AgentConfig, args: argparse.Namespace) -> int:
    from agent.daemon import Agent

    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        key = keys.load(config.key_path)
    except keys.KeyError_ as exc:
        print(f"waystation-agent run: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    agent = Agent(config, key)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        # Event.set() takes a lock the interrupted main thread may hold: set it from a thread.
        threading.Thread(target=agent.stop_event.set, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    agent.run()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="waystation-agent", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {
        "run": (cmd_run, "sample, sign, spool and forward until stopped"),
        "keygen": (cmd_keygen, "create this node's signing key and print its enroll command"),
        "check-config": (cmd_check_config, "validate the config and print what it means"),
        "rotate-key": (cmd_rotate_key, "replace the node key; the running agent announces and switches"),
        "status": (cmd_status, "spool depth, oldest unsent window, last ack, last error"),
        "export": (cmd_export, "write the unacknowledged batches into a bundle to carry to the collector"),
        "import-receipt": (cmd_import_receipt, "apply the collector's signed receipt: forget what it holds"),
    }
    parser.add_argument("--version", action="version", version=f"waystation-agent {version()}")
    for name, (_, help_text) in commands.items():
        p = sub.add_parser(name, help=help_text, description=help_text[:1].upper() + help_text[1:] + ".")
        p.add_argument("--config", type=Path, default=None,
                       help=f"agent.toml (default {DEFAULT_CONFIG} if present, else built-in defaults)")
        p.add_argument("--state-dir", type=Path, default=None, help="override state_dir")
        if name == "keygen":
            p.add_argument("--force", action="store_true", help="replace an existing key")
        if name == "status":
            p.add_argument("--json", action="store_true", help="machine-readable output")
        if name == "export":
            p.add_argument("--out", type=Path, required=True, help="the bundle file to write")
            p.add_argument("--max-bytes", default=None, metavar="SIZE",
                           help="largest bundle to write (e.g. 64MiB); the oldest batches go first")
        if name == "import-receipt":
            p.add_argument("file", type=Path, help="the receipt file `waystation-collector import` wrote")
            p.add_argument("--place", action="store_true",
                           help="place a new spool by this receipt's chain head even though it was issued "
                                "before the spool was created (a node clock running ahead)")
    args = parser.parse_args(argv)
    try:
        config = _config(args)
    except ConfigError as exc:
        print(f"waystation-agent: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command in ("keygen", "rotate-key", "import-receipt", "run"):
        problem = root_in_foreign_state(config.state_path)
        if problem:
            print(f"waystation-agent {args.command}: {problem}", file=sys.stderr)
            return EXIT_CONFIG
    handler = commands[args.command][0]
    return handler(config, args)


if __name__ == "__main__":
    sys.exit(main())
