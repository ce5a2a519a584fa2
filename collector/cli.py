"""waystation-collector: serve | enroll | revoke | nodes."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import signal
import sqlite3
import ssl
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aiohttp import web

from collector import ledger, trust
from collector.app import create_app
from collector.config import CollectorConfig, load_config
from wire.config import ConfigError
from wire.keys import parse_public_key

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="waystation-collector",
        description="Central Waystation collector: verifies, records and exposes fleet batches.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", type=Path, help="collector.toml (built-in defaults if omitted)")
        p.add_argument("--data-dir", help="override data_dir from the config")
        p.add_argument("--listen", help="override listen from the config (host:port, [v6]:port)")
        return p

    command("serve", "Run the collector (POST /v1/batches, GET /metrics, /healthz, /v1/nodes).")
    p = command("enroll", "Accept a node's public key (as `waystation-agent keygen` prints it).")
    p.add_argument("--site", required=True)
    p.add_argument("--node", required=True)
    p.add_argument("--key", required=True, help="base64 Ed25519 public key (32 bytes)")
    p = command("revoke", "Revoke every key of a node; its batches are refused from now on.")
    p.add_argument("--node", required=True)
    p.add_argument("--site", help="needed when the node name exists in several sites")
    p = command("nodes", "List nodes: last seen, complete-through seq, gaps, reported backlog.")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def _config(args: argparse.Namespace) -> CollectorConfig:
    config = load_config(args.config)
    overrides = {
        k: v
        for k, v in (("data_dir", args.data_dir), ("listen", args.listen))
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


async def _serve(config: CollectorConfig) -> int:
    ssl_context = None
    if config.tls:
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            ssl_context.load_cert_chain(config.tls_cert, config.tls_key)
        except (OSError, ssl.SSLError) as exc:
            print(f"waystation-collector: cannot load TLS certificate/key: {exc}", file=sys.stderr)
            return EXIT_FAILED
    app = create_app(config)
    access_log = logging.getLogger("aiohttp.access") if config.log_level == "debug" else None
    runner = web.AppRunner(app, handle_signals=False, access_log=access_log)
    try:
        await runner.setup()
    except (OSError, sqlite3.Error) as exc:
        print(f"waystation-collector: cannot open ledger in {config.data_dir}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    try:
        site = web.TCPSite(
            runner, config.host, config.port, ssl_context=ssl_context, shutdown_timeout=10.0
        )
        try:
            await site.start()
        except OSError as exc:
            print(f"waystation-collector: cannot listen on {config.listen}: {exc}", file=sys.stderr)
            return EXIT_FAILED
        scheme = "https" if ssl_context else "http"
        for sockaddr in runner.addresses:
            host, port = _url_host(sockaddr)
            base = f"{scheme}://{host}:{port}"
            print(f"waystation-collector listening on {base} (ledger {config.ledger_path})")
            print(f"  POST {base}/v1/batches")
            print(f"  GET  {base}/metrics")
            print(f"  GET  {base}/healthz")
            print(f"  GET  {base}/v1/nodes")
        sys.stdout.flush()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        print("waystation-collector: stopping", flush=True)
    finally:
        await runner.cleanup()
    return EXIT_OK


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


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = _config(args)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    if args.command == "serve":
        try:
            return asyncio.run(_serve(config))
        except KeyboardInterrupt:
            return EXIT_OK

    if args.command == "enroll":
        try:
            public_key = parse_public_key(args.key)
        except ValueError as exc:
            print(f"waystation-collector enroll: {exc}", file=sys.stderr)
            return EXIT_USAGE
        conn = _open_ledger(config, create=True)
        try:
            record = trust.enroll(conn, args.site, args.node, public_key)
        except trust.TrustError as exc:
            print(f"waystation-collector enroll: {exc}", file=sys.stderr)
            return EXIT_FAILED
        finally:
            conn.close()
        print(f"enrolled key {record.key_id.hex()} for {record.site}/{record.node}")
        return EXIT_OK

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

