"""The network source: a recorded /proc + /sys tree through parse(), probes against loopback only."""

from __future__ import annotations

import dataclasses
import logging
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config import AgentConfig, NetworkSourceConfig, SourcesConfig, UplinkConfig
from agent.sources.base import Sample, SourceEnv
from agent.sources.network import (
    Network,
    ProbeResult,
    collector_target,
    parse,
    parse_net_dev,
    probe_samples,
    read_interfaces,
    split_target,
    tcp_attempts,
)
from wire import MetricType

HERE = Path(__file__).resolve().parent
TREE = HERE.parent / "fixtures" / "network"
ENV = SourceEnv(proc_root=str(TREE / "proc"), sys_root=str(TREE / "sys"))
NODE_EXPORTER_PROM = HERE.parents[2] / "shared" / "fixtures" / "metrics" / "node_exporter.prom"
if not NODE_EXPORTER_PROM.exists():
    NODE_EXPORTER_PROM = Path("/work/shared/fixtures/metrics/node_exporter.prom")
TS = 1_700_000_000_000


def values(samples: list[Sample]) -> dict[tuple[str, str], float]:
    """(name, device-or-target/protocol/stat joined) -> value; asserts no series repeats."""
    out: dict[tuple[str, str], float] = {}
    for s in samples:
        key = (s.name, ",".join(v for _, v in s.labels))
        assert key not in out, key
        out[key] = s.value
    return out


def test_net_dev_parse_takes_every_interface_and_column() -> None:
    counters = parse_net_dev((TREE / "proc" / "net" / "dev").read_text())
    assert sorted(counters) == ["enp65s0f0", "eth0", "ifb0", "ifb1", "lo"]
    assert counters["enp65s0f0"] == (918273645566, 712345678, 17, 4242, 0, 3, 0, 101010,
                                     123456789012, 98765432, 5, 77, 0, 0, 2, 0)
    assert counters["lo"][0] == counters["lo"][8] == 406592583


def test_recorded_tree_maps_to_node_exporter_series() -> None:
    samples = parse(read_interfaces(ENV), TS)
    v = values(samples)
    assert v[("node_network_receive_bytes_total", "enp65s0f0")] == 918273645566
    assert v[("node_network_transmit_bytes_total", "enp65s0f0")] == 123456789012
    assert v[("node_network_receive_packets_total", "enp65s0f0")] == 712345678
    assert v[("node_network_transmit_packets_total", "enp65s0f0")] == 98765432
    assert v[("node_network_receive_errs_total", "enp65s0f0")] == 17
    assert v[("node_network_transmit_errs_total", "enp65s0f0")] == 5
    assert v[("node_network_receive_drop_total", "enp65s0f0")] == 4242
    assert v[("node_network_transmit_drop_total", "enp65s0f0")] == 77
    assert v[("node_network_receive_bytes_total", "eth0")] == 278045115
    # 8 counters x 5 interfaces from /proc/net/dev.
    assert sum(1 for s in samples if s.name.endswith("_total")) == 40
    # operstate "up" -> 1; "down" and lo's "unknown" -> 0, as node_exporter does.
    assert v[("node_network_up", "enp65s0f0")] == 1 and v[("node_network_up", "eth0")] == 1
    assert v[("node_network_up", "ifb0")] == 0 and v[("node_network_up", "lo")] == 0
    # Speed: Mbit/s * 125000; eth0 says -1 (unknown) and the virtual devices have none.
    assert v[("node_network_speed_bytes", "enp65s0f0")] == 25000 * 125000
    assert {k[1] for k in v if k[0] == "node_network_speed_bytes"} == {"enp65s0f0"}
    assert v[("node_network_mtu_bytes", "enp65s0f0")] == 9000
    assert v[("node_network_mtu_bytes", "eth0")] == 1400 and v[("node_network_mtu_bytes", "lo")] == 65536
    assert all(s.ts_ms == TS and s.labels[0][0] == "device" for s in samples)


def test_names_and_types_match_node_exporter() -> None:
    text = NODE_EXPORTER_PROM.read_text()
    declared = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    kinds = {"counter": MetricType.COUNTER, "gauge": MetricType.GAUGE}
    for s in parse(read_interfaces(ENV), TS):
        assert kinds[declared[s.name]] == s.mtype, s.name
    # node_exporter's golden output: 1000 Mbit/s -> 1.25e8 bytes/s, the same conversion as ours.
    assert 'node_network_speed_bytes{device="eth0"} 1.25e+08' in text
    raw = dataclasses.replace(read_interfaces(ENV), speed={"eth0": "1000\n"})
    assert values(parse(raw, TS))[("node_network_speed_bytes", "eth0")] == 1.25e8


def test_probe_summary_is_pure_and_documented() -> None:
    out = values(probe_samples([
        ProbeResult("10.0.0.1:443", "tcp", (0.010, None, 0.030, 0.020)),
        ProbeResult("10.0.0.2:443", "tcp", (None, None)),
        ProbeResult("10.0.0.3:443", "tcp", (0.005,)),
    ], TS))
    assert out[("probe_success", "tcp,10.0.0.1:443")] == 1
    assert out[("waystation_probe_loss_ratio", "tcp,10.0.0.1:443")] == 0.25
    assert out[("waystation_probe_rtt_seconds", "tcp,min,10.0.0.1:443")] == 0.010
    assert out[("waystation_probe_rtt_seconds", "tcp,mean,10.0.0.1:443")] == pytest.approx(0.020)
    assert out[("waystation_probe_rtt_seconds", "tcp,max,10.0.0.1:443")] == 0.030
    # Consecutive answered RTTs 10, 30, 20 ms: |30-10| and |20-30| -> mean 15 ms.
    assert out[("waystation_probe_jitter_seconds", "tcp,10.0.0.1:443")] == pytest.approx(0.015)
    assert out[("probe_success", "tcp,10.0.0.2:443")] == 0
    assert out[("waystation_probe_loss_ratio", "tcp,10.0.0.2:443")] == 1.0
    # No RTT without an answer, no jitter without two: absent, never a made-up zero.
    assert {k[0] for k in out if k[1].endswith("10.0.0.2:443")} == {"probe_success", "waystation_probe_loss_ratio"}
    assert ("waystation_probe_rtt_seconds", "tcp,max,10.0.0.3:443") in out
    assert ("waystation_probe_jitter_seconds", "tcp,10.0.0.3:443") not in out
    assert len(out) == (2 + 3 + 1) + 2 + (2 + 3)


def test_targets() -> None:
    assert split_target("127.0.0.1:9480") == ("127.0.0.1", 9480)
    assert split_target("[::1]:22") == ("::1", 22)
    assert split_target("collector.example:443") == ("collector.example", 443)
    for bad in ("nohost", "::1:22", "h:0", "h:x", ":80"):
        with pytest.raises(ValueError):
            split_target(bad)
    assert collector_target("http://127.0.0.1:9480") == "127.0.0.1:9480"
    assert collector_target("https://collector.example/v1") == "collector.example:443"
    assert collector_target("http://[::1]:9480/") == "[::1]:9480"


@pytest.fixture
def listeners() -> Iterator[dict[str, int]]:
    """Listening TCP sockets on 127.0.0.1 and ::1 (the kernel completes handshakes from the backlog)."""
    socks = []
    ports = {}
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        s = socket.socket(family, socket.SOCK_STREAM)
        try:
            s.bind((host, 0))
        except OSError:
            s.close()
            continue
        s.listen(64)
        socks.append(s)
        ports[host] = s.getsockname()[1]
    # Accept and close in the background so the backlog never fills, whatever the count.
    stop = threading.Event()

    def drain(sock: socket.socket) -> None:
        sock.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
                conn.close()
            except OSError:
                pass

    threads = [threading.Thread(target=drain, args=(s,), daemon=True) for s in socks]
    for t in threads:
        t.start()
    yield ports
    stop.set()
    for t in threads:
        t.join(2)
    for s in socks:
        s.close()


def closed_port(family: int, host: str) -> int:
    """A loopback port with nothing listening (bound, never listened: connects are refused)."""
    s = socket.socket(family, socket.SOCK_STREAM)
    s.bind((host, 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


def agent_config(targets: tuple[str, ...], count: int = 4, icmp: bool = False) -> AgentConfig:
    net = NetworkSourceConfig(enabled=True, probe_targets=targets, probe_count=count, probe_timeout=1.0,
                              icmp=icmp)  # type: ignore[arg-type]
    return AgentConfig(node="n1", sources=SourcesConfig(network=net))


def test_tcp_probes_against_loopback_listeners_and_a_closed_port(listeners: dict[str, int]) -> None:
    assert "127.0.0.1" in listeners, "no IPv4 loopback"
    targets = [f"127.0.0.1:{listeners['127.0.0.1']}", f"127.0.0.1:{closed_port(socket.AF_INET, '127.0.0.1')}"]
    if "::1" in listeners:
        targets += [f"[::1]:{listeners['::1']}", f"[::1]:{closed_port(socket.AF_INET6, '::1')}"]
    source = Network(agent_config(tuple(targets)), ENV)
    assert source.probe() is None
    samples = source.collect(TS / 1000)
    v = values(samples)
    for open_t, closed_t in zip(targets[::2], targets[1::2], strict=True):
        assert v[("probe_success", f"tcp,{open_t}")] == 1
        assert v[("waystation_probe_loss_ratio", f"tcp,{open_t}")] == 0
        lo, mean, hi = (v[("waystation_probe_rtt_seconds", f"tcp,{s},{open_t}")] for s in ("min", "mean", "max"))
        assert 0 < lo <= mean <= hi < 1.0
        assert 0 <= v[("waystation_probe_jitter_seconds", f"tcp,{open_t}")] <= hi - lo
        assert v[("probe_success", f"tcp,{closed_t}")] == 0
        assert v[("waystation_probe_loss_ratio", f"tcp,{closed_t}")] == 1.0
        assert not any(k[1].endswith(closed_t) and k[0] != "probe_success" and "loss" not in k[0] for k in v)
    # Interface counters come along from the recorded tree.
    assert v[("node_network_mtu_bytes", "enp65s0f0")] == 9000


def test_attempts_are_bounded_by_count_and_timeout(listeners: dict[str, int]) -> None:
    assert len(tcp_attempts("127.0.0.1", listeners["127.0.0.1"], 7, 0.5)) == 7
    assert tcp_attempts("127.0.0.1", listeners["127.0.0.1"], 0, 0.5) == ()
    assert Network(agent_config(("127.0.0.1:1",), count=0), ENV).run_probes() == [
        ProbeResult("127.0.0.1:1", "tcp", ())
    ]


def test_default_target_is_the_collector(listeners: dict[str, int]) -> None:
    port = listeners["127.0.0.1"]
    config = AgentConfig(node="n1", uplink=UplinkConfig(url=f"http://127.0.0.1:{port}"),
                         sources=SourcesConfig(network=NetworkSourceConfig(probe_count=2)))  # type: ignore[arg-type]
    results = Network(config, ENV).run_probes()
    assert [(r.target, r.protocol, len(r.rtts)) for r in results] == [(f"127.0.0.1:{port}", "tcp", 2)]
    assert all(x is not None for x in results[0].rtts)


def test_icmp_where_permitted_else_said_once(listeners: dict[str, int], caplog: pytest.LogCaptureFixture) -> None:
    source = Network(agent_config((f"127.0.0.1:{listeners['127.0.0.1']}",), count=2, icmp=True), ENV)
    caplog.set_level(logging.WARNING, logger="waystation.network")
    first = values(source.collect(TS / 1000))
    second = values(source.collect(TS / 1000 + 10))
    assert first[("probe_success", f"tcp,127.0.0.1:{listeners['127.0.0.1']}")] == 1
    if source.icmp_problem is None:  # this host's ping_group_range lets us in
        for v in (first, second):
            assert v[("probe_success", "icmp,127.0.0.1")] == 1
            assert v[("waystation_probe_loss_ratio", "icmp,127.0.0.1")] == 0
    else:
        warned = [r for r in caplog.records if "ICMP probes not permitted" in r.getMessage()]
        assert len(warned) == 1 and "ping_group_range" in warned[0].getMessage()
        assert not [k for k in first | second if k[1].startswith("icmp")]
        assert second[("probe_success", f"tcp,127.0.0.1:{listeners['127.0.0.1']}")] == 1


def test_probe_reports_a_missing_proc_tree(tmp_path: Path) -> None:
    source = Network(agent_config(("127.0.0.1:1",)), SourceEnv(proc_root=str(tmp_path)))
    assert (source.probe() or "").startswith("unavailable")


ICMP_IN_NAMESPACE = r"""
import fcntl, json, socket, struct
from tests.unit.test_network_source import ENV, agent_config, values
from agent.sources.network import Network

# A fresh network namespace: bring loopback up (SIOCGIFFLAGS/SIOCSIFFLAGS) and let every
# group open ICMP datagram sockets, as an operator's ping_group_range would.
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    flags = struct.unpack("16sH", fcntl.ioctl(s, 0x8913, struct.pack("16sH", b"lo", 0)))[1]
    fcntl.ioctl(s, 0x8914, struct.pack("16sH", b"lo", flags | 1))
with open("/proc/sys/net/ipv4/ping_group_range", "w") as f:
    f.write("0 2147483647")
targets = []
for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
    try:
        listener = socket.socket(family)
        listener.bind((host, 0))
    except OSError:
        continue
    listener.listen()
    port = listener.getsockname()[1]
    targets.append(f"{host}:{port}" if family == socket.AF_INET else f"[{host}]:{port}")
source = Network(agent_config(tuple(targets), count=3, icmp=True), ENV)
v = values(source.collect(1700000000.0))
print(json.dumps({"problem": source.icmp_problem, "values": {"|".join(k): x for k, x in v.items()}}))
"""


def test_icmp_probe_succeeds_where_ping_group_range_permits() -> None:
    """This machine's ping_group_range forbids ICMP datagram sockets; a network namespace
    of the test's own, where it permits them, shows the probes' success path end to end."""
    import json
    import os
    import subprocess
    import sys

    if os.geteuid() != 0:
        pytest.skip("creating a network namespace (unshare -n) needs root")
    trial = subprocess.run(["unshare", "-n", "sh", "-c", "echo 0 0 > /proc/sys/net/ipv4/ping_group_range"],
                           capture_output=True, text=True, timeout=30)
    if trial.returncode != 0:  # a container without CAP_SYS_ADMIN, or /proc/sys read-only
        pytest.skip(f"this machine lets no test create a network namespace: {trial.stderr.strip()}")
    repo = HERE.parents[1]
    out = subprocess.run(["unshare", "-n", sys.executable, "-c", ICMP_IN_NAMESPACE], capture_output=True,
                         text=True, cwd=repo, env=dict(os.environ, PYTHONPATH=str(repo)), timeout=60)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["problem"] is None
    v = {tuple(k.split("|")): x for k, x in doc["values"].items()}
    hosts = {k[1].split(",", 1)[1] for k in v if k[0] == "probe_success" and k[1].startswith("icmp,")}
    assert "127.0.0.1" in hosts
    for host in hosts:
        assert v[("probe_success", f"icmp,{host}")] == 1
        assert v[("waystation_probe_loss_ratio", f"icmp,{host}")] == 0
        lo, mean, hi = (v[("waystation_probe_rtt_seconds", f"icmp,{s},{host}")] for s in ("min", "mean", "max"))
        assert 0 < lo <= mean <= hi < 1.0
