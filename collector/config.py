"""collector.toml -> frozen dataclasses. Every key has a default; see README for an example."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from agent.tomlconfig import ConfigError, Duration, Size, load

__all__ = ["CollectorConfig", "ConfigError", "LimitsConfig", "load_config", "parse_listen"]

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

    def __post_init__(self) -> None:
        for name in (
            "max_body_bytes",
            "max_decompressed_bytes",
            "max_series_per_batch",
            "max_samples_per_batch",
            "max_labels_per_series",
            "max_series_per_node",
            "max_pending_commits",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.series_ttl < 60:
            raise ValueError("series_ttl must be at least 60s (a node samples every few seconds to minutes)")


@dataclass(frozen=True)
class CollectorConfig:
    listen: str = DEFAULT_LISTEN
    data_dir: str = "/var/lib/waystation-collector"
    tls_cert: str = ""  # PEM certificate chain; with tls_key, serve HTTPS
    tls_key: str = ""
    log_level: str = "info"
    limits: LimitsConfig = field(default_factory=LimitsConfig)

    def __post_init__(self) -> None:
        parse_listen(self.listen)
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
