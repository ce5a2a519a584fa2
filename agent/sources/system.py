"""Host CPU, load, memory, filesystem and disk metrics under node_exporter's names.

Raw I/O (psutil, statvfs, /proc/meminfo) lives in `read()`; `parse()` maps one
recorded SystemReading to samples and is what the tests drive with recorded data.
Names, units (seconds, bytes) and labels follow node_exporter 1.x so its dashboards
and alert rules work unchanged. Samples carry no site/node labels: the collector
adds those from the signed batch header.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from agent.config import SystemSourceConfig
from agent.sources.base import Sample, SourceEnv
from wire import MetricType

# node_exporter's --collector.diskstats.device-exclude default: partitions, ram, zram,
# loop and floppy devices are left out so that sums over devices do not double count.
DISK_DEVICE_EXCLUDE = re.compile(r"^(z?ram|loop|fd|(h|s|v|xv)d[a-z]|nvme\d+n\d+p)\d+$")
# node_exporter's --collector.filesystem.mount-points-exclude default.
MOUNTPOINT_EXCLUDE = re.compile(
    r"^/(dev|proc|run/credentials/.+|sys|var/lib/docker/.+|var/lib/containers/storage/.+)($|/)"
)

# psutil cpu_times field -> node_exporter mode. guest/guest_nice are already included in
# user/nice by the kernel; node_exporter reports them as a separate metric, we skip them.
CPU_MODES = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")

# /proc/meminfo key -> metric name (values there are kB; node_exporter multiplies by 1024).
MEMINFO_METRICS = {
    "MemTotal": "node_memory_MemTotal_bytes",
    "MemAvailable": "node_memory_MemAvailable_bytes",
    "MemFree": "node_memory_MemFree_bytes",
    "Buffers": "node_memory_Buffers_bytes",
    "Cached": "node_memory_Cached_bytes",
    "SwapTotal": "node_memory_SwapTotal_bytes",
    "SwapFree": "node_memory_SwapFree_bytes",
}

G = MetricType.GAUGE
C = MetricType.COUNTER


@dataclass(frozen=True)
class FilesystemStat:
    """One mounted filesystem as statvfs saw it."""

    device: str
    mountpoint: str
    fstype: str
    size_bytes: int
    free_bytes: int
    avail_bytes: int
    files: int
    files_free: int
    readonly: bool


@dataclass(frozen=True)
class DiskStat:
    """One block device's cumulative counters, in psutil's units (times in ms)."""

    read_count: int
    write_count: int
    read_bytes: int
    write_bytes: int
    read_time_ms: int
    write_time_ms: int
    busy_time_ms: int


@dataclass(frozen=True)
class SystemReading:
    """Everything one collect() read, before any interpretation; JSON-recordable."""

    cpu_times: tuple[Mapping[str, float], ...]  # per CPU, index = cpu label; psutil fields
    load: tuple[float, float, float]
    meminfo: str  # the text of /proc/meminfo
    filesystems: tuple[FilesystemStat, ...]
    disks: Mapping[str, DiskStat]
    boot_time: float

    def to_json(self) -> dict[str, Any]:
        return {
            "cpu_times": [dict(c) for c in self.cpu_times],
            "load": list(self.load),
            "meminfo": self.meminfo,
            "filesystems": [asdict(f) for f in self.filesystems],
            "disks": {k: asdict(v) for k, v in self.disks.items()},
            "boot_time": self.boot_time,
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> SystemReading:
        load = tuple(float(x) for x in obj["load"])
        if len(load) != 3:
            raise ValueError("load must have three values")
        return cls(
            cpu_times=tuple({k: float(v) for k, v in c.items()} for c in obj["cpu_times"]),
            load=(load[0], load[1], load[2]),
            meminfo=str(obj["meminfo"]),
            filesystems=tuple(FilesystemStat(**f) for f in obj["filesystems"]),
            disks={k: DiskStat(**v) for k, v in obj["disks"].items()},
            boot_time=float(obj["boot_time"]),
        )


def filesystem_wanted(fstype: str, mountpoint: str, exclude_fstypes: Iterable[str]) -> bool:
    """Whether node_exporter (with our fstype list) would report this mount."""
    return fstype not in exclude_fstypes and not MOUNTPOINT_EXCLUDE.match(mountpoint)


def parse_meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo -> {key: bytes}; lines without a kB unit are counts, kept as is."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        parts = rest.split()
        if not sep or not parts:
            continue
        value = int(parts[0])
        if len(parts) > 1 and parts[1] == "kB":
            value *= 1024
        out[key.strip()] = value
    return out


def parse(raw: SystemReading, ts_ms: int, exclude_fstypes: Iterable[str] = ()) -> list[Sample]:
    """Map one reading to samples, all stamped ts_ms."""
    excluded = frozenset(exclude_fstypes)
    out: list[Sample] = []

    def add(name: str, labels: tuple[tuple[str, str], ...], mtype: MetricType, value: float) -> None:
        out.append(Sample(name, labels, mtype, float(value), ts_ms))

    for cpu, times in enumerate(raw.cpu_times):
        for mode in CPU_MODES:
            if mode in times:
                add("node_cpu_seconds_total", (("cpu", str(cpu)), ("mode", mode)), C, times[mode])

    for suffix, value in zip(("1", "5", "15"), raw.load, strict=True):
        add("node_load" + suffix, (), G, value)

    mem = parse_meminfo(raw.meminfo)
    for key, name in MEMINFO_METRICS.items():
        if key in mem:
            add(name, (), G, mem[key])

    seen: set[tuple[str, str, str]] = set()
    for fs in raw.filesystems:
        ident = (fs.device, fs.fstype, fs.mountpoint)
        if ident in seen or not filesystem_wanted(fs.fstype, fs.mountpoint, excluded):
            continue
        seen.add(ident)
        fs_labels = (("device", fs.device), ("fstype", fs.fstype), ("mountpoint", fs.mountpoint))
        add("node_filesystem_size_bytes", fs_labels, G, fs.size_bytes)
        add("node_filesystem_free_bytes", fs_labels, G, fs.free_bytes)
        add("node_filesystem_avail_bytes", fs_labels, G, fs.avail_bytes)
        add("node_filesystem_files", fs_labels, G, fs.files)
        add("node_filesystem_files_free", fs_labels, G, fs.files_free)
        add("node_filesystem_readonly", fs_labels, G, 1.0 if fs.readonly else 0.0)

    for device in sorted(raw.disks):
        if DISK_DEVICE_EXCLUDE.match(device):
            continue
        d = raw.disks[device]
        labels = (("device", device),)
        add("node_disk_reads_completed_total", labels, C, d.read_count)
        add("node_disk_writes_completed_total", labels, C, d.write_count)
        add("node_disk_read_bytes_total", labels, C, d.read_bytes)
        add("node_disk_written_bytes_total", labels, C, d.write_bytes)
        add("node_disk_read_time_seconds_total", labels, C, d.read_time_ms / 1000.0)
        add("node_disk_write_time_seconds_total", labels, C, d.write_time_ms / 1000.0)
        add("node_disk_io_time_seconds_total", labels, C, d.busy_time_ms / 1000.0)

    add("node_boot_time_seconds", (), G, raw.boot_time)
    return out


def _statvfs(device: str, mountpoint: str, fstype: str) -> FilesystemStat | None:
    try:
        st = os.statvfs(mountpoint)
    except OSError:  # vanished, permission denied, stale network mount
        return None
    # Block counts are in f_frsize units (POSIX); Linux sets f_frsize = f_bsize for
    # practically every filesystem, which is what node_exporter multiplies by.
    frsize = st.f_frsize or st.f_bsize
    return FilesystemStat(
        device=device,
        mountpoint=mountpoint,
        fstype=fstype,
        size_bytes=st.f_blocks * frsize,
        free_bytes=st.f_bfree * frsize,
        avail_bytes=st.f_bavail * frsize,
        files=st.f_files,
        files_free=st.f_ffree,
        readonly=bool(st.f_flag & os.ST_RDONLY),
    )


def read(env: SourceEnv, exclude_fstypes: Iterable[str]) -> SystemReading:
    """Take one raw reading of this host (the only function here that does I/O)."""
    import psutil

    excluded = frozenset(exclude_fstypes)
    cpu = tuple(t._asdict() for t in psutil.cpu_times(percpu=True))
    with open(os.path.join(env.proc_root, "meminfo"), encoding="ascii") as f:
        meminfo = f.read()
    filesystems: list[FilesystemStat] = []
    seen: set[str] = set()
    for part in psutil.disk_partitions(all=True):
        # statvfs on excluded pseudo filesystems is wasted work (and triggers autofs mounts).
        if part.mountpoint in seen or not filesystem_wanted(part.fstype, part.mountpoint, excluded):
            continue
        seen.add(part.mountpoint)
        stat = _statvfs(part.device, part.mountpoint, part.fstype)
        if stat is not None:
            filesystems.append(stat)
    # nowrap=False: raw kernel counters; a wrap is a counter reset the summarizer handles.
    io = psutil.disk_io_counters(perdisk=True, nowrap=False) or {}
    disks = {
        name: DiskStat(
            read_count=c.read_count,
            write_count=c.write_count,
            read_bytes=c.read_bytes,
            write_bytes=c.write_bytes,
            read_time_ms=c.read_time,
            write_time_ms=c.write_time,
            busy_time_ms=getattr(c, "busy_time", 0),
        )
        for name, c in io.items()
    }
    load = os.getloadavg()
    return SystemReading(
        cpu_times=cpu,
        load=load,
        meminfo=meminfo,
        filesystems=tuple(filesystems),
        disks=disks,
        boot_time=psutil.boot_time(),
    )


class System:
    """The [sources.system] source: this host's CPU, load, memory, filesystems and disks."""

    name = "system"

    def __init__(self, config: SystemSourceConfig, env: SourceEnv) -> None:
        self.config = config
        self.env = env

    def probe(self) -> str | None:
        """None if psutil imports, else why the source cannot run."""
        try:
            import psutil  # noqa: F401
        except ImportError:
            return "unavailable: psutil not installed"
        return None

    def collect(self, now: float) -> list[Sample]:
        """Read the host once; called from the source's worker thread every interval."""
        raw = read(self.env, self.config.exclude_fstypes)
        return parse(raw, round(now * 1000), self.config.exclude_fstypes)
