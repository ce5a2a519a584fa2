"""collector.toml -> frozen dataclasses. Every key has a default; see README for an example."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from wire.config import ConfigError, Duration, Size, load

__all__ = [
    "CollectorConfig", "ConfigError", "LedgerConfig", "LimitsConfig", "RemoteWriteConfig", "load_config",
    "parse_listen",
]

DEFAULT_LISTEN = "127.0.0.1:9480"
LOG_LEVELS = ("debug", "info", "warning", "error")
LEDGER_FILE = "ledger.db"


def parse_listen(text: str) -> tuple[str, int]:
    """Split "host:port" or "[v6]:port" into (host, port); port 0 lets the OS choose."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"listen {text!r} must be host:port, e.g. \"127.0.0.1:9480\" or \"[::1]:9480\"")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"listen {text!r}: {host!r} is not an IPv6 address") from None
    elif ":" in host:
        raise ValueError(f"listen {text!r}: write IPv6 addresses in brackets, e.g. \"[::1]:9480\"")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"listen {text!r}: port must be 0..65535")
    return host, int(port_text)


@dataclass(frozen=True)
class LimitsConfig:
    max_body_bytes: Size = Size(16 * 1024 * 1024)
    max_decompressed_bytes: Size = Size(128 * 1024 * 1024)
    max_series_per_batch: int = 200_000
    max_samples_per_batch: int = 5_000_000
    max_labels_per_series: int = 64
    # Cardinality cap on the exposed latest state of one node; excess series are counted.
    max_series_per_node: int = 100_000
    # A series the node has not sent for this long (against the node's newest sample)
    # leaves the exposition; counted in waystation_exposition_series_expired_total. Keep it
    # well above the slowest source interval (SMART: 10 min, and a sleeping disk skips reads).
    series_ttl: Duration = Duration(3600.0)
    # Verified batches waiting for the group commit; beyond it posts get 503 + Retry-After.
    max_pending_commits: int = 4096
    # Fleet series exposed on /metrics, all nodes together (each costs about 1 KB); excess
    # series are counted per node and in waystation_exposition_series_over_fleet_limit_total.
    max_series_total: int = 2_000_000
    # A request body must arrive whole within this (a trickling sender cannot hold a slot).
    body_read_timeout: Duration = Duration(30.0)

    def __post_init__(self) -> None:
        for name in (
            "max_body_bytes",
            "max_decompressed_bytes",
            "max_series_per_batch",
            "max_samples_per_batch",
            "max_labels_per_series",
            "max_series_per_node",
            "max_pending_commits",
            "max_series_total",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.body_read_timeout <= 0:
            raise ValueError("body_read_timeout must be positive")
        if self.series_ttl < 60:
            raise ValueError("series_ttl must be at least 60s (a node samples every few seconds to minutes)")


@dataclass(frozen=True)
class LedgerConfig:
    # A batch stays in the ledger this long after it arrived (for audit, provenance and
    # resends); one that some remote_write target still lacks then is counted as expired.
    retention: Duration = Duration(30 * 86400.0)
    # Optional cap on the ledger's size (0: none). Over it, the oldest batches that every
    # target has go first; only then the oldest others (counted as expired unforwarded).
    max_size: Size = Size(0)
    # How often the exposed latest state is saved in the ledger with a batch position that,
    # with the batches after it, covers everything; the position trails by about 3 min (at
    # least one interval), so a save writes only series that changed before that (SMART,
    # silent nodes) and expired keys. A start restores it and replays the batches after it.
    state_save_interval: Duration = Duration(60.0)

    def __post_init__(self) -> None:
        if not 1 <= self.state_save_interval <= 3600:
            raise ValueError("state_save_interval must be 1s..1h")
        if self.retention < 3600:
            raise ValueError("retention must be at least 1h")
        if self.max_size and self.max_size < 16 * 1024 * 1024:
            raise ValueError("max_size must be 0 (no cap) or at least 16MiB")


_TARGET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True)
class RemoteWriteConfig:
    """One Prometheus remote-write receiver; every target is forwarded independently."""

    name: str = ""
    url: str = ""
    timeout: Duration = Duration(30.0)
    samples_per_request: int = 5000
    basic_auth_username: str = ""
    basic_auth_password_file: str = ""
    bearer_token_file: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    # Metric-name regexes (whole-name match, as in Prometheus relabelling); a name is sent
    # when it matches some include (or include is empty) and no exclude.
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not _TARGET_NAME.fullmatch(self.name):
            raise ValueError(f"name {self.name!r} must be 1-64 letters, digits, '_', '.', '-'")
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url {self.url!r} must be http:// or https:// with a host")
        if self.timeout <= 0:
            raise ValueError("timeout must be positive")
        if not 1 <= self.samples_per_request <= 1_000_000:
            raise ValueError("samples_per_request must be 1..1000000")
        if self.basic_auth_password_file and not self.basic_auth_username:
            raise ValueError("basic_auth_password_file needs basic_auth_username")
        if self.basic_auth_username and self.bearer_token_file:
            raise ValueError("use basic auth or a bearer token, not both")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file and tls_key_file must be set together")
        lowered = {k.lower() for k in self.headers}
        reserved = lowered & {"content-encoding", "content-type", "x-prometheus-remote-write-version"}
        if reserved:
            raise ValueError(f"headers may not set {', '.join(sorted(reserved))} (remote write fixes them)")
        if "authorization" in lowered and (self.basic_auth_username or self.bearer_token_file):
            raise ValueError("an Authorization header conflicts with basic auth / bearer_token_file")
        for pattern in (*self.include, *self.exclude):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"pattern {pattern!r} is not a valid regex: {exc}") from None


MAX_WORKERS = 256


@dataclass(frozen=True)
class CollectorConfig:
    listen: str = DEFAULT_LISTEN
    data_dir: str = "/var/lib/waystation-collector"
    tls_cert: str = ""  # PEM certificate chain; with tls_key, serve HTTPS
    tls_key: str = ""
    log_level: str = "info"
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    ledger: LedgerConfig = field(default_factory=LedgerConfig)
    remote_write: tuple[RemoteWriteConfig, ...] = ()
    # Front processes that take the HTTP requests and verify batches beside serve, which
    # keeps the ledger (collector/fronts.py); 0: serve takes them itself.
    workers: int = 0

    def __post_init__(self) -> None:
        parse_listen(self.listen)
        if not 0 <= self.workers <= MAX_WORKERS:
            raise ValueError(f"workers {self.workers} must be 0..{MAX_WORKERS}")
        names = [t.name for t in self.remote_write]
        if len(set(names)) != len(names):
            raise ValueError(f"remote_write names must be unique, got {names}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key must be set together (or both left empty)")
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"log_level {self.log_level!r} must be one of {', '.join(LOG_LEVELS)}")
        if not self.data_dir:
            raise ValueError("data_dir must not be empty")

    @property
    def host(self) -> str:
        return parse_listen(self.listen)[0]

    @property
    def port(self) -> int:
        return parse_listen(self.listen)[1]

    @property
    def ledger_path(self) -> Path:
        return Path(self.data_dir) / LEDGER_FILE

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)


def load_config(path: Path | None) -> CollectorConfig:
    """Load the collector config from path, or all defaults when path is None."""
    return load(CollectorConfig, path)
