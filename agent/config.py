"""agent.toml -> frozen dataclasses. Every key has a default; see README for an example."""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

from wire.config import ConfigError, Duration, Size, load, parse_duration
from wire.keys import CollectorKey, parse_collector_key

DEFAULT_COLLECTOR_URL = "http://127.0.0.1:9480"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")


@dataclass(frozen=True)
class UplinkConfig:
    url: str = DEFAULT_COLLECTOR_URL
    # Backfill lane byte-rate cap; the live lane (newest batch) is never held back by it.
    max_bytes_per_second: Size = Size(256 * 1024)
    ca_file: str = ""  # PEM bundle to verify an https collector; system CAs when empty
    client_cert: str = ""  # optional mutual TLS
    client_key: str = ""
    timeout: Duration = Duration(15.0)
    backoff_initial: Duration = Duration(1.0)
    # Bounds the retries of sends; how soon the newest window goes once the collector is back
    # is the probe's job (probe_interval), not this.
    backoff_max: Duration = Duration(10.0)
    # While the collector cannot be reached, a GET /healthz this often (no body, one at a
    # time); its first 200 ends the live lane's backoff. "0s" turns probing off. A duration
    # string, not a Duration: wire's durations cannot be zero, and zero is the off switch.
    probe_interval: str = "500ms"
    # On stop (SIGTERM), up to this long to deliver the batch just signed; "0s" stops at once.
    stop_grace: str = "5s"
    # The collector's public keys as `waystation-collector keygen` prints them. When set,
    # every data payload is sealed (encrypted) to it before it is signed, so the spool and
    # the wire are unreadable without the collector's private key; empty: not sealed.
    collector_key: str = ""
    # The frame version data batches are signed in: 2 sends the series table once and later
    # batches name it by hash (docs/wire.md §10); 1 keeps every batch self-describing, for a
    # collector not yet upgraded to read v2. Drop receipts and key rotations are v1 either way.
    wire_version: int = 2

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url {self.url!r} must start with http:// or https://")
        if self.wire_version not in (1, 2):
            raise ValueError(f"wire_version {self.wire_version!r} must be 1 or 2 (2: series tables sent once; "
                             "1: for a collector that does not read v2 yet)")
        if self.collector_key:
            try:
                parse_collector_key(self.collector_key)
            except ValueError as exc:
                raise ValueError(f"collector_key: {exc}") from None
        if self.max_bytes_per_second < 1024:
            raise ValueError("max_bytes_per_second must be at least 1KiB")
        for name in ("probe_interval", "stop_grace"):
            _seconds_or_off(name, getattr(self, name))
        if 0 < self.probe_interval_s < 0.05:
            raise ValueError("probe_interval must be 0s (off) or at least 50ms")

    @property
    def probe_interval_s(self) -> float:
        return _seconds_or_off("probe_interval", self.probe_interval)

    @property
    def stop_grace_s(self) -> float:
        return _seconds_or_off("stop_grace", self.stop_grace)

    @property
    def collector_pin(self) -> CollectorKey | None:
        """The pinned collector key, or None when payloads are not sealed."""
        return parse_collector_key(self.collector_key) if self.collector_key else None


_ZERO_DURATION = re.compile(r"0+(?:\.0*)?(?:ms|s|m|h|d)?")


def _seconds_or_off(name: str, value: object) -> float:
    """A duration that may be zero (off): "0s" or "0" is 0.0, anything else as wire parses it."""
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a duration string like \"5s\" (\"0s\": off)")
    if _ZERO_DURATION.fullmatch(value.strip()):
        return 0.0
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None


@dataclass(frozen=True)
class SpoolConfig:
    max_bytes: Size = Size(512 * 1024 * 1024)

    def __post_init__(self) -> None:
        if self.max_bytes < 64 * 1024:
            raise ValueError("max_bytes must be at least 64KiB")


@dataclass(frozen=True)
class SummaryConfig:
    window: Duration = Duration(60.0)
    # How often a batch is signed; defaults to the window. Longer batches cost fewer
    # bytes per sample on the uplink, shorter ones make the collector fresher.
    flush_interval: Duration | None = None

    @property
    def flush_every(self) -> float:
        return float(self.flush_interval or self.window)


@dataclass(frozen=True)
class SystemSourceConfig:
    enabled: bool = True
    interval: Duration = Duration(10.0)
    # Filesystem types that are never reported (pseudo and container filesystems).
    exclude_fstypes: tuple[str, ...] = (
        "autofs", "binfmt_misc", "bpf", "cgroup", "cgroup2", "configfs", "debugfs", "devpts",
        "devtmpfs", "fusectl", "hugetlbfs", "mqueue", "nsfs", "overlay", "proc", "procfs",
        "pstore", "rpc_pipefs", "securityfs", "selinuxfs", "squashfs", "sysfs", "tracefs",
    )


@dataclass(frozen=True)
class ScrapeSourceConfig:
    """A [[sources.scrape]] entry: one /metrics page, optionally through a model-server preset."""

    name: str = ""  # becomes job=...; defaults to the preset's name
    url: str = ""  # defaults to the preset's URL
    # vllm | triton | tgi | torchserve: default URL and metric allow-list (agent/sources/scrape_presets.py)
    preset: str = ""
    interval: Duration = Duration(10.0)
    timeout: Duration = Duration(5.0)
    allow: tuple[str, ...] = ()  # regexes over metric names; empty: the preset's list, else all
    deny: tuple[str, ...] = ()
    # Series kept per scrape; families that would go past it are dropped whole and counted
    # in waystation_scrape_series_dropped_total{job}.
    max_series: int = 10_000

    def __post_init__(self) -> None:
        if self.preset:
            from agent.sources.scrape_presets import PRESETS

            if self.preset not in PRESETS:
                raise ValueError(f"preset {self.preset!r} is not one of {', '.join(sorted(PRESETS))}")
            if not self.name:
                object.__setattr__(self, "name", self.preset)
            if not self.url:
                object.__setattr__(self, "url", PRESETS[self.preset].url)
        if not _NAME.match(self.name):
            raise ValueError(f"name {self.name!r} must be a short identifier (it becomes job=...)")
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url {self.url!r} must start with http:// or https://")
        if self.max_series < 1:
            raise ValueError("max_series must be at least 1")
        for pattern in self.allow + self.deny:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"pattern {pattern!r} is not a valid regex: {exc}") from None


@dataclass(frozen=True)
class GpuSourceConfig:
    """[sources.gpu]: NVIDIA GPUs through NVML; disables itself (once, with the reason) without a driver."""

    enabled: bool = True
    interval: Duration = Duration(10.0)


@dataclass(frozen=True)
class SmartDeviceConfig:
    """One [[sources.smart.devices]] entry, overriding the scan (e.g. behind a RAID controller)."""

    name: str = ""  # /dev/sda, /dev/bus/0
    type: str = ""  # smartctl -d: sat, nvme, megaraid,N, cciss,N, usbjmicron, ...


@dataclass(frozen=True)
class SmartSourceConfig:
    """[sources.smart]: SMART health through smartctl; slow, so off the other sources' path."""

    enabled: bool = True
    interval: Duration = Duration(600.0)
    timeout: Duration = Duration(30.0)  # per smartctl call
    smartctl: str = "smartctl"
    devices: tuple[SmartDeviceConfig, ...] = ()  # empty: use `smartctl --scan-open`
    # What smartctl is asked for: "json" (smartctl >= 7.0 `--json`, parsed by the agent's own
    # code, as smartctl_exporter reads it), "text" (plain text through pySMART), or "auto":
    # json when `smartctl -V` says 7.0 or later, else text.
    output: str = "auto"

    def __post_init__(self) -> None:
        if self.output not in ("auto", "json", "text"):
            raise ValueError(f"output {self.output!r} must be auto, json or text")


@dataclass(frozen=True)
class NetworkSourceConfig:
    """[sources.network]: interface counters plus bounded active probes."""

    enabled: bool = True
    interval: Duration = Duration(10.0)
    # host:port targets for TCP-connect probes; empty probes the collector's host and port.
    probe_targets: tuple[str, ...] = ()
    probe_count: int = 3  # probes per target per interval
    probe_timeout: Duration = Duration(2.0)
    icmp: bool = False  # ICMP echo where permitted (needs CAP_NET_RAW or ping_group_range)


@dataclass(frozen=True)
class SourcesConfig:
    system: SystemSourceConfig = field(default_factory=SystemSourceConfig)
    gpu: GpuSourceConfig = field(default_factory=GpuSourceConfig)
    smart: SmartSourceConfig = field(default_factory=SmartSourceConfig)
    network: NetworkSourceConfig = field(default_factory=NetworkSourceConfig)
    scrape: tuple[ScrapeSourceConfig, ...] = ()

    def __post_init__(self) -> None:
        names = [s.name for s in self.scrape]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"scrape source names must be unique: {', '.join(dupes)}")


@dataclass(frozen=True)
class AgentConfig:
    site: str = "default"
    node: str = field(default_factory=socket.gethostname)
    state_dir: str = "/var/lib/waystation-agent"
    log_level: str = "info"
    uplink: UplinkConfig = field(default_factory=UplinkConfig)
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    summary: SummaryConfig = field(default_factory=SummaryConfig)
    sources: SourcesConfig = field(default_factory=SourcesConfig)

    def __post_init__(self) -> None:
        for key in ("site", "node"):
            if not _NAME.match(getattr(self, key)):
                raise ValueError(f"{key} {getattr(self, key)!r} must match {_NAME.pattern}")
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise ValueError("log_level must be debug, info, warning or error")

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir)

    @property
    def key_path(self) -> Path:
        return self.state_path / "node.key"

    @property
    def next_key_path(self) -> Path:
        """A key `rotate-key` made and the running agent has not switched to yet."""
        return self.state_path / "node.key.next"

    @property
    def spool_path(self) -> Path:
        return self.state_path / "spool.db"


def load_agent_config(path: Path | None) -> AgentConfig:
    return load(AgentConfig, path)


__all__ = ["AgentConfig", "ConfigError", "load_agent_config"]
