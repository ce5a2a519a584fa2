"""Process plumbing shared by the benchmarks: loopback ports, child processes, metric reads."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def need(binary: str, package: str) -> str:
    path = shutil.which(binary)
    if path is None:
        sys.exit(f"{binary} not found: apt-get install {package} (scripts/bootstrap.sh --test does)")
    return path


def wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"{url} did not come up in {timeout}s")


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        body: bytes = resp.read()
        return body.decode()


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of every sample of `name` whose labels include `labels` in a text page."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


@contextmanager
def process(args: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as fh:
        proc = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, env=env or ENV)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def cpu_seconds(pid: int, children: bool = True) -> float:
    """User+system CPU seconds a process has used so far (from /proc), with those of its
    children that have exited (the agent's SMART reader, say) unless `children` is False."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12]) + (int(fields[13]) + int(fields[14]) if children else 0)
    return ticks / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def enroll_agent(workdir: Path, collector_dir: Path, config: Path, site: str, node: str) -> None:
    out = subprocess.run([sys.executable, "-m", "agent", "keygen", "--config", str(config)],
                         env=ENV, capture_output=True, text=True, check=True).stdout
    key = out.split("--key", 1)[1].split()[0]
    subprocess.run([sys.executable, "-m", "collector", "enroll", "--data-dir", str(collector_dir),
                    "--site", site, "--node", node, "--key", key], env=ENV, check=True,
                   capture_output=True)
