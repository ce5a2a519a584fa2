"""Interface counters under node_exporter's names, plus bounded TCP (and ICMP) probes.

Raw I/O lives in `read_interfaces()` (/proc/net/dev and /sys/class/net under the
env's roots) and the probe functions; `parse()` maps one recorded InterfaceReading
to samples and `probe_samples()` maps one interval's attempts to samples. Both are
pure and are what the tests drive.

Probe series, per target and protocol, one set per interval (blackbox_exporter style:
`probe_success` keeps its name so blackbox dashboards and alerts apply; the rest are
ours because blackbox reports one attempt per scrape, not a summary of several):

- probe_success{target,protocol}                          1 if any attempt answered, else 0
- waystation_probe_loss_ratio{target,protocol}            unanswered / attempted, 0..1
- waystation_probe_rtt_seconds{target,protocol,stat}      stat = min | mean | max of answered attempts
- waystation_probe_jitter_seconds{target,protocol}        mean |RTT[i] - RTT[i-1]| over consecutive
  answered attempts (RFC 3550's instantaneous delay variation, unsmoothed); needs two answers

RTT and jitter are absent when nothing answered (no made-up zero). `target` is the
configured "host:port" for tcp and the bare host for icmp. A TCP-connect RTT is the
time from connect() to the handshake completing; name resolution is done once per
target and interval, outside the timing. A refused connection (RST) counts as lost:
the service is not reachable, whatever the host's kernel says. Attempts run one after
another, so an interval's worst case is targets x probe_count x probe_timeout.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from agent.config import AgentConfig
from agent.sources.base import Labels, Sample, SourceEnv
from wire import MetricType

log = logging.getLogger("waystation.network")

G = MetricType.GAUGE
C = MetricType.COUNTER

# /proc/net/dev columns (after "iface:") -> node_exporter counter; the other eight
# columns (fifo, frame, compressed, multicast, colls, carrier) are not reported.
NET_DEV_COLUMNS = (
    "receive_bytes", "receive_packets", "receive_errs", "receive_drop",
    "receive_fifo", "receive_frame", "receive_compressed", "receive_multicast",
    "transmit_bytes", "transmit_packets", "transmit_errs", "transmit_drop",
    "transmit_fifo", "transmit_colls", "transmit_carrier", "transmit_compressed",
)
REPORTED_COUNTERS = (
    "receive_bytes", "transmit_bytes", "receive_packets", "transmit_packets",
    "receive_errs", "transmit_errs", "receive_drop", "transmit_drop",
)
PROBE_STATS = ("min", "mean", "max")


@dataclass(frozen=True)
class InterfaceReading:
    """One raw reading: /proc/net/dev text and, per interface, the /sys/class/net files read.

    A sys value is None when the file could not be read (e.g. `speed` of a virtual
    device raises EINVAL), exactly as node_exporter then leaves the series out.
    """

    net_dev: str
    operstate: Mapping[str, str | None]
    speed: Mapping[str, str | None]
    mtu: Mapping[str, str | None]


def parse_net_dev(text: str) -> dict[str, tuple[int, ...]]:
    """/proc/net/dev -> {interface: its 16 counters, in NET_DEV_COLUMNS order}."""
    out: dict[str, tuple[int, ...]] = {}
    for line in text.splitlines():
        iface, sep, rest = line.partition(":")
        if not sep or "|" in line:  # the two header lines
            continue
        fields = rest.split()
        if len(fields) < len(NET_DEV_COLUMNS):
            continue
        out[iface.strip()] = tuple(int(f) for f in fields[: len(NET_DEV_COLUMNS)])
    return out


def _int_or_none(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text.strip())
    except ValueError:
        return None


def parse(raw: InterfaceReading, ts_ms: int) -> list[Sample]:
    """Map one reading to node_exporter's netdev and netclass samples, all stamped ts_ms."""
    out: list[Sample] = []
    counters = parse_net_dev(raw.net_dev)
    for device in sorted(counters):
        labels: Labels = (("device", device),)
        values = dict(zip(NET_DEV_COLUMNS, counters[device], strict=True))
        for column in REPORTED_COUNTERS:
            out.append(Sample(f"node_network_{column}_total", labels, C, float(values[column]), ts_ms))
    for device in sorted(set(raw.operstate) | set(raw.speed) | set(raw.mtu)):
        labels = (("device", device),)
        state = raw.operstate.get(device)
        if state is not None:
            out.append(Sample("node_network_up", labels, G, 1.0 if state.strip() == "up" else 0.0, ts_ms))
        # node_exporter: speed is Mbit/s in sysfs; -1 (unknown) and unreadable are left out.
        speed = _int_or_none(raw.speed.get(device))
        if speed is not None and speed >= 0:
            out.append(Sample("node_network_speed_bytes", labels, G, speed * 1000 * 1000 / 8, ts_ms))
        mtu = _int_or_none(raw.mtu.get(device))
        if mtu is not None:
            out.append(Sample("node_network_mtu_bytes", labels, G, float(mtu), ts_ms))
    return out


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def read_interfaces(env: SourceEnv) -> InterfaceReading:
    """Read /proc/net/dev and /sys/class/net/*/{operstate,speed,mtu} under the env's roots."""
    with open(os.path.join(env.proc_root, "net", "dev"), encoding="ascii") as f:
        net_dev = f.read()
    class_net = os.path.join(env.sys_root, "class", "net")
    try:
        devices = sorted(os.listdir(class_net))
    except OSError:
        devices = []
    operstate: dict[str, str | None] = {}
    speed: dict[str, str | None] = {}
    mtu: dict[str, str | None] = {}
    for device in devices:
        base = os.path.join(class_net, device)
        operstate[device] = _read_text(os.path.join(base, "operstate"))
        speed[device] = _read_text(os.path.join(base, "speed"))
        mtu[device] = _read_text(os.path.join(base, "mtu"))
    return InterfaceReading(net_dev, operstate, speed, mtu)


# ---- probes ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeResult:
    """One target's attempts in one interval: RTT seconds per attempt, None = no answer."""

    target: str
    protocol: str
    rtts: tuple[float | None, ...]


def probe_samples(results: Iterable[ProbeResult], ts_ms: int) -> list[Sample]:
    """Summarize each target's attempts into the probe series (see the module docstring)."""
    out: list[Sample] = []
    for r in results:
        if not r.rtts:
            continue
        base: Labels = (("protocol", r.protocol), ("target", r.target))
        answered = [x for x in r.rtts if x is not None]
        out.append(Sample("probe_success", base, G, 1.0 if answered else 0.0, ts_ms))
        loss = (len(r.rtts) - len(answered)) / len(r.rtts)
        out.append(Sample("waystation_probe_loss_ratio", base, G, loss, ts_ms))
        if answered:
            stats = {"min": min(answered), "mean": sum(answered) / len(answered), "max": max(answered)}
            for stat in PROBE_STATS:
                labels = (("protocol", r.protocol), ("stat", stat), ("target", r.target))
                out.append(Sample("waystation_probe_rtt_seconds", labels, G, stats[stat], ts_ms))
        if len(answered) >= 2:
            diffs = [abs(b - a) for a, b in zip(answered, answered[1:], strict=False)]
            out.append(Sample("waystation_probe_jitter_seconds", base, G, sum(diffs) / len(diffs), ts_ms))
    return out


def split_target(target: str) -> tuple[str, int]:
    """"host:port" or "[v6]:port" -> (host, port); raises ValueError."""
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"probe target {target!r} must be host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"probe target {target!r}: write IPv6 addresses as [addr]:port")
    if not 0 < int(port) < 65536:
        raise ValueError(f"probe target {target!r}: port out of range")
    return host, int(port)


def collector_target(url: str) -> str:
    """The collector's host:port from the uplink URL (80/443 when the URL names none)."""
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


Clock = Callable[[], float]


def tcp_attempts(host: str, port: int, count: int, timeout: float, clock: Clock = time.perf_counter,
                 ) -> tuple[float | None, ...]:
    """`count` TCP connects to host:port, each bounded by `timeout`; RTT seconds or None."""
    try:
        family, socktype, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except OSError:
        return (None,) * count
    rtts: list[float | None] = []
    for _ in range(count):
        with socket.socket(family, socktype, proto) as s:
            s.settimeout(timeout)
            start = clock()
            try:
                s.connect(addr)
            except OSError:  # refused, unreachable, timed out
                rtts.append(None)
                continue
            rtts.append(clock() - start)
    return tuple(rtts)


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def icmp_socket(family: int) -> socket.socket:
    """An unprivileged ICMP datagram socket; PermissionError where ping_group_range forbids it."""
    proto = socket.IPPROTO_ICMP if family == socket.AF_INET else socket.IPPROTO_ICMPV6
    return socket.socket(family, socket.SOCK_DGRAM, proto)


def icmp_attempts(host: str, count: int, timeout: float, clock: Clock = time.perf_counter,
                  ) -> tuple[float | None, ...]:
    """`count` ICMP echoes to host over a datagram socket; raises PermissionError if not allowed."""
    try:
        family, _, _, _, addr = socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)[0]
    except OSError:
        return (None,) * count
    request_type, reply_type = (8, 0) if family == socket.AF_INET else (128, 129)
    rtts: list[float | None] = []
    with icmp_socket(family) as s:
        for seq in range(1, count + 1):
            payload = b"waystation-probe"
            # The kernel owns the identifier (the socket's port) and fixes it up.
            header = struct.pack("!BBHHH", request_type, 0, 0, 0, seq)
            packet = struct.pack("!BBHHH", request_type, 0, _checksum(header + payload), 0, seq) + payload
            start = clock()
            deadline = start + timeout
            s.sendto(packet, addr)
            rtt: float | None = None
            while rtt is None:
                left = deadline - clock()
                if left <= 0:
                    break
                s.settimeout(left)
                try:
                    reply = s.recv(2048)
                except OSError:
                    break
                # Datagram ICMP sockets deliver the ICMP message without the IP header.
                if len(reply) >= 8 and reply[0] == reply_type and struct.unpack("!H", reply[6:8])[0] == seq:
                    rtt = clock() - start
            rtts.append(rtt)
    return tuple(rtts)


class Network:
    """The [sources.network] source: interface counters and probes to configured targets."""

    name = "network"

    def __init__(self, config: AgentConfig, env: SourceEnv) -> None:
        self.options = config.sources.network
        self.env = env
        targets = self.options.probe_targets or (collector_target(config.uplink.url),)
        # Parsed up front so a bad target fails at start, not every interval.
        self.targets: tuple[tuple[str, str, int], ...] = tuple((t, *split_target(t)) for t in targets)
        self.icmp = self.options.icmp
        self.icmp_problem: str | None = None

    def probe(self) -> str | None:
        """None if /proc/net/dev is readable under the env's proc root."""
        path = os.path.join(self.env.proc_root, "net", "dev")
        if not os.access(path, os.R_OK):
            return f"unavailable: cannot read {path}"
        return None

    def run_probes(self) -> list[ProbeResult]:
        """One interval's attempts to every target; called from collect()."""
        count = max(0, self.options.probe_count)
        timeout = float(self.options.probe_timeout)
        results = [ProbeResult(t, "tcp", tcp_attempts(h, p, count, timeout)) for t, h, p in self.targets]
        if self.icmp and count:
            for host in dict.fromkeys(h for _, h, _ in self.targets):
                try:
                    rtts = icmp_attempts(host, count, timeout)
                except PermissionError as exc:
                    self.icmp = False
                    self.icmp_problem = (
                        f"ICMP probes not permitted ({exc}); allow the service's group in "
                        "net.ipv4.ping_group_range. Continuing with TCP probes only."
                    )
                    log.warning("network: %s", self.icmp_problem)
                    break
                results.append(ProbeResult(host, "icmp", rtts))
        return results

    def collect(self, now: float) -> list[Sample]:
        """Read counters and probe once; called from this source's worker thread every interval."""
        ts_ms = round(now * 1000)
        return parse(read_interfaces(self.env), ts_ms) + probe_samples(self.run_probes(), ts_ms)

