"""waystation-collector: serve | keygen | enroll | revoke | nodes | import | receipt | audit | provenance."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import signal
import socket
import sqlite3
import ssl
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from aiohttp import web

import wire
from collector import audit, bundles, keyring, ledger, provenance, serve_link, trust
from collector import receipts as receipts_mod
from collector.app import (
    COMMITTER,
    IMPORT_TOKEN,
    INGEST,
    LEDGER,
    METRICS,
    REGISTRY,
    STARTING,
    create_app,
    quiet_malformed_http,
)
from collector.config import CollectorConfig, load_config
from collector.fronts import FrontMetrics, Fronts, private_socket_path, reserve_port
from collector.ingest import open_limits
from wire import bundle
from wire.config import ConfigError, parse_duration
from wire.keys import parse_public_key
from wire.malloc import tune_malloc
from wire.ownership import root_in_foreign_state
from wire.sdnotify import Notifier, Watchdog
from wire.version import version

log = logging.getLogger("waystation.collector")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="waystation-collector",
        description="Central Waystation collector: verifies, records and exposes fleet batches.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    parser.add_argument("--version", action="version", version=f"waystation-collector {version()}")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", type=Path, help="collector.toml (built-in defaults if omitted)")
        p.add_argument("--data-dir", help="override data_dir from the config")
        if name == "serve":  # only serve listens
            p.add_argument("--listen", help="override listen from the config (host:port, [v6]:port)")
        return p

    command("serve", "Run the collector (POST /v1/batches, GET /metrics, /healthz, /v1/nodes).")
    p = command("keygen", "Create the collector's key pair in data_dir and print the line agents pin.")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--force", action="store_true",
                     help="replace the current pair (batches sealed to it can never be opened again)")
    how.add_argument("--rotate", action="store_true",
                     help="keep the current pair for decryption (collector-keys/) and make a new one")
    p = command("enroll", "Accept a node's public key (as `waystation-agent keygen` prints it), or many.")
    p.add_argument("--site")
    p.add_argument("--node")
    p.add_argument("--key", help="base64 Ed25519 public key (32 bytes)")
    p.add_argument("--from", dest="from_file", type=Path, metavar="FILE",
                   help="enroll every node in FILE at once (one transaction): a line per node, "
                        "`SITE NODE KEY` or the command `waystation-agent keygen` printed; '-' reads stdin")
    p = command("revoke", "Revoke every key of a node; its batches are refused from now on.")
    p.add_argument("--node", required=True)
    p.add_argument("--site", help="needed when the node name exists in several sites")
    p = command("nodes", "List nodes: last seen, complete-through seq, gaps, reported backlog.")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p = command("import", "Verify and record air-gap bundles (as HTTP ingest would); write the signed receipt.")
    p.add_argument("files", nargs="+", type=Path, metavar="FILE", help="bundle files `waystation-agent export` wrote")
    p.add_argument("--receipt-out", type=Path, metavar="FILE",
                   help="write the signed receipt (one per node in the bundles) here, for `waystation-agent "
                        "import-receipt`")
    p = command("receipt", "Write a fresh signed receipt for one node from the ledger alone (no bundle): for a "
                           "reinstalled air-gapped node, so it renumbers before its first export, or a lost receipt.")
    p.add_argument("--site", required=True)
    p.add_argument("--node", required=True)
    p.add_argument("--out", type=Path, required=True, metavar="FILE",
                   help="the receipt file to write, for `waystation-agent import-receipt`")
    p = command("audit", "Re-verify the ledger from its own bytes: signatures, hash chain, every gap.")
    p.add_argument("--site", help="only this site")
    p.add_argument("--node", help="only this node (in every site, unless --site)")
    p.add_argument("--json", action="store_true", help="print the findings and a summary as JSON")
    p.add_argument("--progress-every", type=float, default=5.0, metavar="SECONDS",
                   help="progress line on stderr at most this often (default 5; 0: never)")
    p = command("provenance", "Name the recorded batch that carried a sample, and how it arrived.")
    p.add_argument("--site", required=True)
    p.add_argument("--node", required=True)
    p.add_argument("--metric", required=True, help="metric name, as exposed (without site/node)")
    p.add_argument("--labels", help="'k=v,k2=v2': labels the series carries (a subset is enough)")
    p.add_argument("--at", required=True, metavar="TIME",
                   help="RFC 3339 time (2024-05-01T12:00:00Z; no zone: UTC) or Unix seconds")
    p.add_argument("--lookback", default="1h",
                   help="how far before TIME a sample may be (default 1h)")
    p.add_argument("--json", action="store_true", help="print JSON")
    return parser


def _config(args: argparse.Namespace) -> CollectorConfig:
    config = load_config(args.config)
    overrides = {
        k: v
        for k, v in (("data_dir", args.data_dir), ("listen", getattr(args, "listen", None)))
        if v is not None
    }
    if overrides:
        try:
            config = dataclasses.replace(config, **overrides)
        except ValueError as exc:
            raise ConfigError("<command line>", "", str(exc)) from None
    return config


def _url_host(sockaddr: Any) -> tuple[str, int]:
    host, port = sockaddr[0], sockaddr[1]
    return (f"[{host}]" if ":" in host else host), port


# How long serve's start may take in all (waiting for an import, replaying the ledger)
# while it keeps extending systemd's start timeout (TimeoutStartSec, 90 s by default); a
# start stuck past this still times out.
START_LIMIT_S = 3600.0
EXTEND_S = 60.0  # what Notifier.extend_until asks for each time (3 x its 20 s period)


class _Starting:
    """What serve's start is waiting for, told to systemd: STATUS=, and EXTEND_TIMEOUT_USEC=
    while it lasts (Notifier.extend_until), until `ready` is set."""

    def __init__(self, notifier: Notifier, line: str) -> None:
        self.notifier = notifier
        self.ready = threading.Event()
        self.line = line
        self.deadline = time.monotonic() + START_LIMIT_S
        notifier.extend_until(self.ready, lambda: self.line, limit_s=START_LIMIT_S)

    def now(self, line: str) -> None:
        """A new wait: said at once, with an extension of its own (extend_until's next one
        may be 20 s away), within the same START_LIMIT_S."""
        self.line = line
        left = self.deadline - time.monotonic()
        if left > 0:
            self.notifier.extend_start(min(EXTEND_S, left), line)
        else:
            self.notifier.status(line)


async def _serve(config: CollectorConfig, config_file: Path | None = None) -> int:
    data_dir = Path(config.data_dir)
    # Before anything that may wait: a start that waits for an import, or replays a large
    # ledger, must not be killed by systemd's start timeout (Type=notify) and restarted
    # into the same wait again and again.
    notifier = Notifier()
    starting = _Starting(notifier, f"starting: taking {data_dir / serve_link.LOCK_FILE}")

    def say(message: str) -> None:
        print(f"waystation-collector: {message}", flush=True)
        starting.now(f"starting: {message}")

    try:
        try:
            lock = serve_link.acquire_for_serve(data_dir, say)
        except (bundles.ImportError_, OSError) as exc:
            print(f"waystation-collector: {exc}", file=sys.stderr)
            return EXIT_FAILED
        try:
            return await _serve_locked(config, notifier, starting, config_file)
        finally:
            (data_dir / serve_link.ENDPOINT_FILE).unlink(missing_ok=True)
            lock.close()
    finally:
        starting.ready.set()  # a start that failed extends nothing any more


async def _serve_locked(
    config: CollectorConfig, notifier: Notifier, starting: _Starting, config_file: Path | None = None
) -> int:
    ssl_context = None
    if config.tls:
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            ssl_context.load_cert_chain(config.tls_cert, config.tls_key)
        except (OSError, ssl.SSLError) as exc:
            print(f"waystation-collector: cannot load TLS certificate/key: {exc}", file=sys.stderr)
            return EXIT_FAILED
    try:
        app = create_app(config)
    except keyring.KeyringError as exc:
        print(f"waystation-collector: {exc}", file=sys.stderr)
        return EXIT_FAILED
    access_log = logging.getLogger("aiohttp.access") if config.log_level == "debug" else None
    quiet_malformed_http()
    runner = web.AppRunner(app, handle_signals=False, access_log=access_log)
    starting.now(f"starting: replaying the ledger {config.ledger_path}")
    try:
        await runner.setup()
    except (OSError, sqlite3.Error) as exc:
        print(f"waystation-collector: cannot open ledger in {config.data_dir}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    fronts: Fronts | None = None
    reserved: list[socket.socket] = []
    remove_socket: Callable[[], None] = _nothing
    # Before the fronts start and the address is announced: whoever read it may stop us at once.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        if config.workers:
            # The fronts listen on the public address; serve only on a Unix socket of its own.
            try:
                reserved = reserve_port(config.host, config.port)
            except OSError as exc:
                print(f"waystation-collector: cannot listen on {config.listen}: {exc}", file=sys.stderr)
                return EXIT_FAILED
            addresses: list[Any] = [sock.getsockname() for sock in reserved]
            path, remove_socket = private_socket_path()
            await web.UnixSite(runner, path, shutdown_timeout=10.0).start()
            fronts = Fronts(config, config_file, addresses[0][1], path, app[INGEST], app[METRICS])
            app[REGISTRY].register(FrontMetrics(fronts))
            starting.now(f"starting: {config.workers} front processes")
            app[STARTING].append(True)
            try:
                await fronts.start()
            except RuntimeError as exc:
                print(f"waystation-collector: cannot listen on {config.listen}: {exc}", file=sys.stderr)
                return EXIT_FAILED
        else:
            site = web.TCPSite(
                runner, config.host, config.port, ssl_context=ssl_context, shutdown_timeout=10.0
            )
            try:
                await site.start()
            except OSError as exc:
                print(f"waystation-collector: cannot listen on {config.listen}: {exc}", file=sys.stderr)
                return EXIT_FAILED
            addresses = list(runner.addresses)
        scheme = "https" if ssl_context else "http"
        for sockaddr in addresses:
            host, port = _url_host(sockaddr)
            base = f"{scheme}://{host}:{port}"
            print(f"waystation-collector listening on {base} (ledger {config.ledger_path})")
            print(f"  POST {base}/v1/batches")
            print(f"  GET  {base}/metrics")
            print(f"  GET  {base}/healthz")
            print(f"  GET  {base}/v1/nodes")
        if addresses:
            host, port = _url_host(addresses[0])
            serve_link.write_endpoint(Path(config.data_dir), serve_link.loopback_url(scheme, host, port),
                                   app[IMPORT_TOKEN], int(config.limits.max_body_bytes), config.tls_cert)
        sys.stdout.flush()
        app[STARTING].clear()
        status = _ServeStatus(app, config.listen)
        # Ready: the ledger is open and replayed, the socket listens, import can find us.
        notifier.ready(status.line())
        starting.ready.set()  # the start is over: no more extensions
        pinger = loop.create_task(_watchdog(notifier, Watchdog(notifier, app[COMMITTER].liveness, status.line)))
        await stop.wait()
        print("waystation-collector: stopping", flush=True)
        notifier.stopping("stopping: committing what is queued, saving state")
        pinger.cancel()
    finally:
        if fronts is not None:
            await fronts.stop()  # their posts commit here first
        await runner.cleanup()
        for sock in reserved:
            sock.close()
        remove_socket()
    return EXIT_OK


def _nothing() -> None:
    pass


class _ServeStatus:
    """The one line `systemctl status` shows for serve (STATUS=)."""

    def __init__(self, app: web.Application, listen: str) -> None:
        self.app = app
        self.listen = listen
        self.last = (time.monotonic(), self._accepted())

    def _accepted(self) -> int:
        return int(self.app[METRICS].batches.get("accepted", 0))

    def line(self) -> str:
        now, accepted = time.monotonic(), self._accepted()
        then, before = self.last
        rate = (accepted - before) / (now - then) if now > then else 0.0
        self.last = (now, accepted)
        return (f"{self.app[LEDGER].node_count} nodes; {rate:.1f} batches/s accepted; "
                f"{self.app[COMMITTER].pending} waiting for the ledger; listening on {self.listen}")


async def _watchdog(notifier: Notifier, watchdog: Watchdog) -> None:
    """Pings from the event loop itself: a loop blocked by anything stops them, as does a
    stuck group commit (watchdog.liveness). Without a watchdog, a STATUS every 10 s."""
    if not notifier.enabled:
        return
    every = notifier.watchdog_interval_s or 10.0
    while True:
        await asyncio.sleep(every)
        if notifier.watchdog_interval_s is None:
            notifier.status(watchdog.status())
        else:
            watchdog.tick()


def _open_ledger(config: CollectorConfig, create: bool) -> sqlite3.Connection:
    return ledger.connect(config.ledger_path, create=create)


def _ago(ts: float | None, now: float) -> str:
    if not ts:
        return "never"
    secs = max(0, int(now - ts))
    if secs < 120:
        return f"{secs}s ago"
    if secs < 7200:
        return f"{secs // 60}m ago"
    if secs < 172800:
        return f"{secs // 3600}h ago"
    return f"{secs // 86400}d ago"


def _backlog(b: dict[str, Any]) -> str:
    if b["batches"] is None and b["bytes"] is None:
        return "-"
    parts = []
    if b["batches"] is not None:
        parts.append(f"{int(b['batches'])} batches")
    if b["bytes"] is not None:
        parts.append(f"{int(b['bytes'])} B")
    return ", ".join(parts)


def _print_table(nodes: list[dict[str, Any]]) -> None:
    now = time.time()
    header = ("SITE", "NODE", "LAST SEEN", "COMPLETE", "HIGHEST", "GAPS", "BACKLOG", "KEYS")
    rows = [header]
    for n in nodes:
        gaps = n["gaps"]
        gap_text = str(gaps["seqs"])
        if gaps["ranges"]:
            shown = ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in gaps["ranges"][:3])
            gap_text += f" ({shown}{',...' if len(gaps['ranges']) > 3 else ''})"
        states = sorted({k["state"] for k in n["keys"]}) or ["none"]
        rows.append(
            (
                n["site"],
                n["node"],
                _ago(n["last_seen"], now),
                str(n["complete_through"]),
                str(n["highest_seq"]),
                gap_text,
                _backlog(n["reported_backlog"]),
                "/".join(states),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def _keygen(config: CollectorConfig, args: argparse.Namespace) -> int:
    data_dir = Path(config.data_dir)
    try:
        if args.rotate:
            pair, old = keyring.rotate(data_dir)
            print(f"kept key pair {old.key_id.hex()} in {keyring.retired_path(data_dir, old.key_id)} "
                  "to open what is still sealed to it")
        else:
            pair, replaced = keyring.generate(data_dir, force=args.force)
            if replaced is not None:
                print(f"replaced key pair {replaced.key_id.hex()}: batches sealed to it can no longer be opened")
    except (keyring.KeyringError, OSError) as exc:
        print(f"waystation-collector keygen: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"wrote collector key pair {keyring.current_path(data_dir)} (key id {pair.key_id.hex()})")
    print("pin it in each agent's agent.toml, under [uplink] (agents then seal their payloads to it):")
    print(f"  {pair.pin_line()}")
    print("restart `waystation-collector serve` to load it")
    return EXIT_OK


def _audit(config: CollectorConfig, args: argparse.Namespace) -> int:
    """Findings stream to stdout as found (one line each, or one JSON document whose
    findings array is written as it grows): memory stays bounded on any ledger."""
    out = sys.stdout
    count = 0

    def on_finding(finding: audit.Finding) -> None:
        nonlocal count
        if args.json:
            out.write(('{"findings": [\n  ' if count == 0 else ",\n  ") + json.dumps(finding.to_json()))
        else:
            out.write(f"{finding}\n")
        count += 1

    def progress(p: audit.Progress) -> None:
        print(str(p), file=sys.stderr, flush=True)

    sealing_keys = _sealing_keys(config, "audit")
    if sealing_keys is None:
        return EXIT_FAILED
    try:
        summary = audit.audit(
            config.ledger_path, on_finding=on_finding, site=args.site, node=args.node,
            limits=open_limits(config.limits), progress=progress if args.progress_every > 0 else None,
            progress_every_s=args.progress_every, sealing_keys=sealing_keys,
        )
    except FileNotFoundError as exc:
        print(f"waystation-collector audit: {exc}", file=sys.stderr)
        return EXIT_FAILED
    unmatched = summary.nodes == 0 and (args.site is not None or args.node is not None)
    if args.json:
        out.write(("\n" if count else '{"findings": [') + '], "summary": ' + json.dumps(summary.to_json()) + "}\n")
    else:
        print(audit.describe(summary))
    if unmatched:
        which = "/".join(x for x in (args.site, args.node) if x)
        print(f"waystation-collector audit: the ledger has nothing for {which}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK if summary.clean else EXIT_FAILED


def _import(config: CollectorConfig, args: argparse.Namespace) -> int:
    def say(message: str) -> None:
        print(f"waystation-collector import: {message}", file=sys.stderr, flush=True)

    try:
        report = bundles.import_bundles(config, args.files, say)
    except (bundles.ImportError_, keyring.KeyringError, OSError, sqlite3.Error) as exc:
        print(f"waystation-collector import: {exc}", file=sys.stderr)
        return EXIT_FAILED
    for line in bundles.describe(report):
        print(line)
    if args.receipt_out is not None:
        try:
            receipts = receipts_mod.issue_receipts(config, report)
            if not receipts:
                raise bundles.ImportError_("no node proved itself in these bundles (no frame verified): no receipt")
            receipts_mod.write_receipts(args.receipt_out, receipts)
        except (bundles.ImportError_, receipts_mod.ReceiptError, keyring.KeyringError, OSError, sqlite3.Error,
                ValueError) as exc:
            print(f"waystation-collector import: {exc}", file=sys.stderr)
            return EXIT_FAILED
        for r in report.receipts:
            print(_receipt_line(r))
        print(f"wrote {args.receipt_out}: carry it back and run `waystation-agent import-receipt "
              f"{args.receipt_out.name}` on the node")
    return EXIT_FAILED if report.failed else EXIT_OK


def _receipt_line(r: bundle.Receipt) -> str:
    head = f"chain head seq {r.head_seq}" if r.head_seq else "no batch held yet"
    return (f"receipt {r.receipt_no} for {r.site}/{r.node}: the collector holds seq {bundles.ranges_text(r.held)}, "
            f"complete through {r.complete_through}, {head}")


def _receipt(config: CollectorConfig, args: argparse.Namespace) -> int:
    """A fresh receipt for one node, beside a running serve or not (collector.receipts)."""
    try:
        r = receipts_mod.issue_node_receipt(config, args.site, args.node)
        receipts_mod.write_receipts(args.out, [r.signed_part + r.signature])
    except (receipts_mod.ReceiptError, keyring.KeyringError, OSError, sqlite3.Error, ValueError) as exc:
        print(f"waystation-collector receipt: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(_receipt_line(r))
    print(f"wrote {args.out}: carry it to the node and run `waystation-agent import-receipt {args.out.name}` there "
          "(a reinstalled node renumbers its unsent batches to follow the chain head)")
    return EXIT_OK


def _sealing_keys(config: CollectorConfig, command: str) -> wire.SealingKeys | None:
    """The collector's private sealing keys (current and retired), to open sealed batches;
    None after saying why they cannot be read."""
    try:
        return keyring.load_sealing_keys(keyring.sealing_key_files(Path(config.data_dir)))
    except (keyring.KeyringError, OSError) as exc:
        print(f"waystation-collector {command}: {exc}", file=sys.stderr)
        return None


def _provenance(config: CollectorConfig, args: argparse.Namespace) -> int:
    try:
        labels = provenance.parse_labels(args.labels)
        at_ms = provenance.parse_time_ms(args.at)
        lookback_ms = int(parse_duration(args.lookback) * 1000)
    except ValueError as exc:
        print(f"waystation-collector provenance: {exc}", file=sys.stderr)
        return EXIT_USAGE
    sealing_keys = _sealing_keys(config, "provenance")
    if sealing_keys is None:
        return EXIT_FAILED
    try:
        conn = ledger.connect_readonly(config.ledger_path)
    except (FileNotFoundError, sqlite3.Error) as exc:
        print(f"waystation-collector provenance: {exc}", file=sys.stderr)
        return EXIT_FAILED
    try:
        search = provenance.find_sample(
            conn, args.site, args.node, args.metric, labels, at_ms, lookback_ms, open_limits(config.limits),
            sealing_keys,
        )
    except sqlite3.Error as exc:
        print(f"waystation-collector provenance: cannot read {config.ledger_path}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        conn.close()
    if args.json:
        print(json.dumps(provenance.search_json(search), indent=2))
    else:
        print(provenance.describe(search, args.site, args.node, args.metric, labels, at_ms, lookback_ms))
    return EXIT_OK if search.found else EXIT_FAILED


def _enroll(config: CollectorConfig, args: argparse.Namespace) -> int:
    one = (args.site, args.node, args.key)
    given = [v is not None for v in one]
    if (args.from_file is None and not all(given)) or (args.from_file is not None and any(given)):
        print("waystation-collector enroll: give --site, --node and --key, or --from FILE", file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.from_file is not None:
            text = sys.stdin.read() if str(args.from_file) == "-" else args.from_file.read_text()
            parsed = trust.parse_enrollments(text)
            entries = [(site, node, key) for _, site, node, key in parsed]
            where = [f"line {number}" for number, *_ in parsed]
            if not entries:
                print(f"waystation-collector enroll: {args.from_file} names no node", file=sys.stderr)
                return EXIT_USAGE
        else:
            entries = [(args.site, args.node, parse_public_key(args.key))]
            where = []
    except (ValueError, trust.TrustError, OSError) as exc:
        print(f"waystation-collector enroll: {exc}", file=sys.stderr)
        return EXIT_USAGE
    conn = _open_ledger(config, create=True)
    try:
        records = trust.enroll_many(conn, entries, where=where)
    except trust.TrustError as exc:
        print(f"waystation-collector enroll: {exc}" + (" (nothing was enrolled)" if len(entries) > 1 else ""),
              file=sys.stderr)
        return EXIT_FAILED
    finally:
        conn.close()
    if args.from_file is None:
        print(f"enrolled key {records[0].key_id.hex()} for {records[0].site}/{records[0].node}")
    else:
        print(f"enrolled {len(records)} node keys from {args.from_file}")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = _config(args)
    except ConfigError as exc:
        print(f"waystation-collector: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.command in ("serve", "keygen", "enroll", "revoke", "import", "receipt"):
        problem = root_in_foreign_state(Path(config.data_dir))
        if problem:
            print(f"waystation-collector {args.command}: {problem}", file=sys.stderr)
            return EXIT_USAGE

    if args.command == "serve":
        # Before the verify and ledger threads start (wire/malloc.py says why).
        applied = tune_malloc()
        if applied:
            log.info("glibc malloc: %s set (the environment may set each instead)", ", ".join(applied))
        try:
            return asyncio.run(_serve(config, args.config))
        except KeyboardInterrupt:
            return EXIT_OK

    if args.command == "import":
        return _import(config, args)
    if args.command == "receipt":
        return _receipt(config, args)
    if args.command == "audit":
        return _audit(config, args)
    if args.command == "provenance":
        return _provenance(config, args)

    if args.command == "keygen":
        return _keygen(config, args)

    if args.command == "enroll":
        return _enroll(config, args)

    try:
        conn = _open_ledger(config, create=False)
    except (FileNotFoundError, sqlite3.Error) as exc:
        print(f"waystation-collector {args.command}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    try:
        if args.command == "revoke":
            try:
                records = trust.revoke(conn, args.node, args.site)
            except trust.TrustError as exc:
                print(f"waystation-collector revoke: {exc}", file=sys.stderr)
                return EXIT_FAILED
            for r in records:
                print(f"revoked key {r.key_id.hex()} of {r.site}/{r.node}")
            return EXIT_OK
        nodes = ledger.read_nodes(conn)
    finally:
        conn.close()
    if args.json:
        print(json.dumps(nodes, indent=2))
    elif nodes:
        _print_table(nodes)
    else:
        print("no nodes enrolled or seen yet")
    return EXIT_OK

