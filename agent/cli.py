"""waystation-agent: run | keygen | rotate-key | check-config | status."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import sqlite3
import sys
import threading
import time
from pathlib import Path
from types import FrameType

from agent import keys
from agent.config import AgentConfig, load_agent_config
from wire.config import ConfigError

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
    sources = (["system"] if config.sources.system.enabled else []) + [
        f"scrape:{s.name}" for s in config.sources.scrape
    ]
    print(f"  sources: {', '.join(sources) or 'none'}")
    pin = config.uplink.collector_pin
    print(f"  payloads sealed to collector key {pin.key_id.hex()}" if pin else "  payloads not sealed")
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
        return 0
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
    print(f"  collector has all through seq {st.collector_complete_through}; next seq {st.next_seq}")
    c = st.counters
    print(f"  signed {c['produced_batches']} batches / {c['produced_samples']} samples; "
          f"acked {c['acked_batches']}; dropped {c['dropped_batches']} batches / "
          f"{c['dropped_samples']} samples")
    if st.last_error:
        print(f"  last error:         {st.last_error} ({_age(st.last_error_ms, now)})")
    if problem:
        print(f"  problem:            {problem}")
    return 0


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
    }
    for name, (_, help_text) in commands.items():
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", type=Path, default=None,
                       help=f"agent.toml (default {DEFAULT_CONFIG} if present, else built-in defaults)")
        p.add_argument("--state-dir", type=Path, default=None, help="override state_dir")
        if name == "keygen":
            p.add_argument("--force", action="store_true", help="replace an existing key")
        if name == "status":
            p.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    try:
        config = _config(args)
    except ConfigError as exc:
        print(f"waystation-agent: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    handler = commands[args.command][0]
    return handler(config, args)


if __name__ == "__main__":
    sys.exit(main())
