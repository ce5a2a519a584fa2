"""Host CPU, load, memory, filesystem and disk metrics under node_exporter's names.

Raw I/O (psutil, /proc/self/mountinfo, statvfs, /proc/meminfo) lives in `read()`; `parse()`
maps one recorded SystemReading to samples and is what the tests drive with recorded data.
Which filesystems to report is decided from mountinfo by the pure `parse_mountinfo()` and
`reported_mounts()`, so the packaged unit's sandbox does not show (see reported_mounts).
Names, units (seconds, bytes) and labels follow node_exporter 1.x so its dashboards
and alert rules work unchanged. Samples carry no site/node labels: the collector
adds those from the signed batch header.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable, Mapping, Sequence
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


@dataclass(frozen=True)
class MountInfoEntry:
    """One line of /proc/<pid>/mountinfo (proc(5)), paths unescaped."""

    mount_id: int
    parent_id: int
    device_number: str  # "major:minor" of the filesystem (the superblock), not of the mount
    root: str  # the directory of the filesystem that is mounted here
    mountpoint: str
    fstype: str
    source: str  # what /proc/mounts and psutil call the device
    superblock_readonly: bool
    subvolume: str | None  # btrfs: the subvolume `root` lies in, e.g. "/@home"

    @property
    def whole(self) -> bool:
        """Mounts a filesystem, or a btrfs subvolume, at its top: not a bind of a directory in it."""
        return self.root in ("/", self.subvolume)


_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    # The kernel writes space, tab, newline and backslash in paths as \ooo (mangle()).
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[MountInfoEntry]:
    """The text of /proc/<pid>/mountinfo -> its entries in file order; malformed lines are skipped.

    A line: mount ID, parent ID, major:minor, root, mount point, mount options, optional
    fields..., "-", fstype, mount source, super options.
    """
    out: list[MountInfoEntry] = []
    for line in text.splitlines():
        # Split on single spaces: an empty mount source leaves an empty field, not a shift.
        fields = line.split(" ")
        try:
            sep = fields.index("-", 6)
        except ValueError:
            continue
        if sep + 4 != len(fields) or not (fields[0].isdigit() and fields[1].isdigit()):
            continue
        fstype, source, super_options = fields[sep + 1:]
        # btrfs ends its super options with subvol=<path>; the path may itself hold commas.
        _, has_subvol, subvol = super_options.partition(",subvol=")
        out.append(MountInfoEntry(
            mount_id=int(fields[0]),
            parent_id=int(fields[1]),
            device_number=fields[2],
            root=_unescape(fields[3]),
            mountpoint=_unescape(fields[4]),
            fstype=fstype,
            source=_unescape(source),
            superblock_readonly="ro" in super_options.split(","),
            subvolume=_unescape(subvol) if has_subvol else None,
        ))
    return out


def reported_mounts(entries: Sequence[MountInfoEntry], exclude_fstypes: Iterable[str]) -> list[MountInfoEntry]:
    """The mounts to report as filesystems, in mountinfo order.

    Per mount point only the topmost mount counts: it is the one statvfs on that path
    measures. Mounts that filesystem_wanted() refuses go. So do binds of a directory of a
    filesystem reported whole elsewhere: the packaged unit's sandbox adds such binds (its
    state directory, the private /tmp and /var/tmp, /home, /root and /run/user read-only),
    and on a host they would only repeat that filesystem's numbers under another mount
    point. A bind whose filesystem is not reported whole stays: it is that filesystem's only
    report.
    """
    excluded = frozenset(exclude_fstypes)
    topmost: dict[str, MountInfoEntry] = {}
    for entry in entries:
        current = topmost.get(entry.mountpoint)
        # Later lines are mounted later, so on top; except a mount propagated in under an
        # existing one (the kernel tucks it beneath), which is then the existing one's parent.
        if current is None or current.parent_id != entry.mount_id:
            topmost[entry.mountpoint] = entry
    wanted = [e for e in topmost.values() if filesystem_wanted(e.fstype, e.mountpoint, excluded)]
    whole_devices = {e.device_number for e in wanted if e.whole}
    return [e for e in wanted if e.whole or e.device_number not in whole_devices]


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


def _block_device_path(device_number: str, env: SourceEnv) -> str | None:
    """/dev/<name> of a block device by its major:minor, if the kernel lists it and it exists."""
    major, _, minor = device_number.partition(":")
    try:
        with open(os.path.join(env.proc_root, "partitions"), encoding="ascii") as f:
            for line in f.read().splitlines()[2:]:
                cols = line.split()
                if len(cols) >= 4 and cols[0] == major and cols[1] == minor:
                    path = "/dev/" + cols[3]
                    return path if os.path.exists(path) else None
    except OSError:
        pass
    return None


def device_label(entry: MountInfoEntry, env: SourceEnv) -> str:
    """The device label psutil.disk_partitions gave this mount, so series keep their identity."""
    if entry.source == "none":
        return ""
    if entry.source in ("/dev/root", "rootfs"):  # root= without an initramfs
        return _block_device_path(entry.device_number, env) or entry.source
    return entry.source


def _read_filesystems(env: SourceEnv, excluded: frozenset[str]) -> list[FilesystemStat]:
    try:
        with open(os.path.join(env.proc_root, "self", "mountinfo"), encoding="utf-8",
                  errors="surrogateescape") as f:
            mountinfo = f.read()
    except OSError:  # no Linux /proc here
        return _read_filesystems_psutil(excluded)
    filesystems: list[FilesystemStat] = []
    for mount in reported_mounts(parse_mountinfo(mountinfo), excluded):
        stat = _statvfs(device_label(mount, env), mount.mountpoint, mount.fstype)
        if stat is not None:
            # Read-only from the superblock, not statvfs: under the packaged unit
            # (ProtectSystem=strict) every mount is a read-only bind, and statvfs's
            # ST_RDONLY includes the mount's flag. node_exporter reads the host's mount
            # options instead, so the two differ for a read-only bind or remount of a
            # read-write filesystem: 1 there, 0 here. A filesystem the kernel made read-only
            # (errors=remount-ro) or mounted read-only is 1 in both.
            filesystems.append(dataclasses.replace(stat, readonly=mount.superblock_readonly))
    return filesystems


def _read_filesystems_psutil(excluded: frozenset[str]) -> list[FilesystemStat]:
    import psutil

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
    return filesystems


def read(env: SourceEnv, exclude_fstypes: Iterable[str]) -> SystemReading:
    """Take one raw reading of this host (the only function here that does I/O)."""
    import psutil

    cpu = tuple(t._asdict() for t in psutil.cpu_times(percpu=True))
    with open(os.path.join(env.proc_root, "meminfo"), encoding="ascii") as f:
        meminfo = f.read()
    filesystems = _read_filesystems(env, frozenset(exclude_fstypes))
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
