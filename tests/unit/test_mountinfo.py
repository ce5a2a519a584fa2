"""The system source's filesystems from mountinfo: the host's view, not the packaged unit's sandbox."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from agent.config import SystemSourceConfig
from agent.sources import system
from agent.sources.base import SourceEnv
from agent.sources.system import MountInfoEntry, device_label, parse_mountinfo, reported_mounts

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures" / "system"
EXCLUDE = SystemSourceConfig().exclude_fstypes


def reported(text: str) -> dict[str, tuple[str, str, bool]]:
    """mountinfo text -> {mount point: (source, fstype, read-only)} of what would be reported."""
    return {m.mountpoint: (m.source, m.fstype, m.superblock_readonly)
            for m in reported_mounts(parse_mountinfo(text), EXCLUDE)}


def test_parse_fields_escapes_and_optional_fields() -> None:
    text = (
        # no optional fields, an escaped space and backslash, an empty mount source
        "70 27 0:50 /a\\040b\\134c /mnt/x\\011y rw,relatime - tmpfs  rw,size=4k\n"
        # two optional fields
        "71 27 8:1 / /data rw shared:5 master:1 - ext4 /dev/sda1 ro,errors=remount-ro\n"
        # btrfs: subvol= is last and its path may hold a comma
        "72 27 0:31 /@a,b /srv rw - btrfs /dev/nvme0n1p2 rw,subvolid=260,subvol=/@a,b\n"
        "not a mountinfo line\n"
        "73 27 8:2 / /no-separator rw ext4 /dev/sda2 rw\n"
        "74 27 8:3 / /extra rw - ext4 /dev/sda3 rw surplus\n"
    )
    a, b, c = parse_mountinfo(text)
    assert a == MountInfoEntry(mount_id=70, parent_id=27, device_number="0:50", root="/a b\\c",
                               mountpoint="/mnt/x\ty", fstype="tmpfs", source="",
                               superblock_readonly=False, subvolume=None)
    assert (b.mountpoint, b.source, b.fstype, b.superblock_readonly) == ("/data", "/dev/sda1", "ext4", True)
    assert c.subvolume == "/@a,b" and c.whole


def test_recorded_mountinfo_of_this_vm_gives_what_the_old_reader_recorded() -> None:
    entries = parse_mountinfo((FIXTURES / "mountinfo_vm.txt").read_text())
    assert len(entries) == 19
    root = next(e for e in entries if e.mountpoint == "/")
    assert (root.device_number, root.source, root.fstype, root.whole) == ("254:0", "/dev/vda", "ext4", True)
    # /dev/shm is mounted twice, the second (id 30) on top of the first (id 25).
    assert [e.mount_id for e in entries if e.mountpoint == "/dev/shm"] == [25, 30]
    # vm_reading.json holds what psutil.disk_partitions + statvfs read on the same VM.
    old = json.loads((FIXTURES / "vm_reading.json").read_text())["filesystems"]
    assert reported((FIXTURES / "mountinfo_vm.txt").read_text()) == {
        f["mountpoint"]: (f["device"], f["fstype"], f["readonly"]) for f in old
    }


def test_systemd_sandbox_reports_the_hosts_filesystems() -> None:
    """ProtectSystem=strict, ProtectHome=read-only, PrivateTmp, StateDirectory on a btrfs host."""
    text = (FIXTURES / "mountinfo_systemd_sandbox.txt").read_text()
    entries = parse_mountinfo(text)
    assert len(entries) == 25
    nvme = "/dev/nvme0n1p2"
    got = reported(text)
    assert got == {
        "/": (nvme, "btrfs", False),
        # btrfs subvolumes: same device as /, root is not "/", still filesystems of their own
        "/home": (nvme, "btrfs", False),
        "/var/log": (nvme, "btrfs", False),
        "/boot/efi": ("/dev/nvme0n1p1", "vfat", False),
        "/srv/backup disk": ("/dev/sda1", "ext4", True),  # remounted read-only on errors
        "/media/cdrom": ("/dev/sr0", "iso9660", True),
        "/run": ("tmpfs", "tmpfs", False),
        "/run/lock": ("tmpfs", "tmpfs", False),
        "/run/user/1000": ("tmpfs", "tmpfs", False),
    }
    # Left out: the sandbox's binds of directories of / (private /tmp and /var/tmp, the state
    # directory, /root) and of /run (/run/user); /proc, /dev, /sys and credentials by path.
    # The distortion undone: each of these is read-only per mount (what statvfs reports).
    per_mount_ro = {e.mountpoint: line.split(" ")[5].split(",")[0] == "ro"
                    for e, line in zip(entries, text.splitlines(), strict=True)}
    assert all(per_mount_ro[mountpoint] for mountpoint in got)


def test_private_tmp_on_a_tmpfs_tmp_keeps_the_hosts_tmp() -> None:
    # The host's /tmp is a tmpfs; PrivateTmp binds a directory of it over /tmp. statvfs
    # measures that bind, which is the same tmpfs: /tmp is reported as on the host.
    text = (
        "500 499 8:2 / / ro,relatime - ext4 /dev/sda2 rw\n"
        "501 500 8:3 / /var ro,relatime - ext4 /dev/sda3 rw\n"
        "502 500 0:40 / /tmp ro,nosuid,nodev - tmpfs tmpfs rw,size=8g\n"
        "503 502 0:40 /systemd-private-0f-waystation-agent.service-Q1/tmp /tmp rw,nosuid,nodev"
        " - tmpfs tmpfs rw,size=8g\n"
        "504 501 8:3 /tmp/systemd-private-0f-waystation-agent.service-R2/tmp /var/tmp rw - ext4 /dev/sda3 rw\n"
        "505 501 8:3 /lib/waystation-agent /var/lib/waystation-agent rw - ext4 /dev/sda3 rw\n"
    )
    assert reported(text) == {
        "/": ("/dev/sda2", "ext4", False),
        "/var": ("/dev/sda3", "ext4", False),
        "/tmp": ("tmpfs", "tmpfs", False),
    }
    assert [m.mount_id for m in reported_mounts(parse_mountinfo(text), EXCLUDE)] == [500, 501, 503]


def test_topmost_mount_per_mount_point_and_binds_without_a_whole_mount() -> None:
    text = (
        "600 1 8:1 / / rw - ext4 /dev/sda1 rw\n"
        # /data: xfs, then an nfs share over it; statvfs sees the nfs share
        "601 600 8:16 / /data rw - xfs /dev/sdb rw\n"
        "602 601 0:70 / /data rw - nfs4 nas:/export rw,vers=4.2\n"
        # /scratch: 604 was propagated in under 603 (tucked), so 603, listed first, is on top
        "603 604 0:71 / /scratch rw - tmpfs scratch rw\n"
        "604 600 8:32 / /scratch rw - ext4 /dev/sdc rw\n"
        # a directory of a filesystem mounted nowhere else whole: its only report
        "605 600 8:48 /exports/projects /projects rw - ext4 /dev/sdd rw\n"
        # a directory of a filesystem whose whole mount is not reported (excluded by path)
        "606 600 8:64 / /var/lib/docker/volumes/v rw - ext4 /dev/sde rw\n"
        "607 600 8:64 /data /srv/v rw - ext4 /dev/sde rw\n"
    )
    assert reported(text) == {
        "/": ("/dev/sda1", "ext4", False),
        "/data": ("nas:/export", "nfs4", False),
        "/scratch": ("scratch", "tmpfs", False),
        "/projects": ("/dev/sdd", "ext4", False),
        "/srv/v": ("/dev/sde", "ext4", False),
    }


def test_device_label_is_what_psutil_gave(tmp_path: Path) -> None:
    # /dev/null stands in for the root block device: psutil names it only if it exists.
    (tmp_path / "partitions").write_text("major minor  #blocks  name\n\n   1        3          0 null\n")
    env = SourceEnv(proc_root=str(tmp_path))

    def entry(source: str, device_number: str = "8:1") -> MountInfoEntry:
        return MountInfoEntry(1, 0, device_number, "/", "/", "ext4", source, False, None)

    assert device_label(entry("/dev/sda1"), env) == "/dev/sda1"
    assert device_label(entry("none"), env) == ""
    assert device_label(entry("/dev/root", "1:3"), env) == "/dev/null"
    assert device_label(entry("rootfs", "1:3"), env) == "/dev/null"
    assert device_label(entry("/dev/root", "8:1"), env) == "/dev/root"  # not listed: kept as is


def test_without_mountinfo_falls_back_to_psutil(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "meminfo").write_text(Path("/proc/meminfo").read_text())
    parts = [SimpleNamespace(device="/dev/fake", mountpoint=str(tmp_path), fstype="ext4", opts="rw"),
             SimpleNamespace(device="proc", mountpoint="/proc", fstype="proc", opts="rw")]
    monkeypatch.setattr(psutil, "disk_partitions", lambda all=False: parts)
    got = system.read(SourceEnv(proc_root=str(tmp_path)), EXCLUDE).filesystems
    st = os.statvfs(tmp_path)
    assert [(f.device, f.mountpoint, f.fstype, f.size_bytes) for f in got] == [
        ("/dev/fake", str(tmp_path), "ext4", st.f_blocks * st.f_frsize)]
    assert got[0].readonly == bool(st.f_flag & os.ST_RDONLY)


def _can_unshare() -> bool:
    if shutil.which("unshare") is None or not Path("/proc/self/mountinfo").exists():
        return False
    return subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _can_unshare(), reason="needs root and `unshare --mount`")
def test_read_in_a_mount_namespace_reports_superblocks_and_skips_binds(tmp_path: Path) -> None:
    """What systemd's sandbox does, done by hand: a read-only bind remount and a directory bind."""
    fs, rofs, subbind = tmp_path / "fs", tmp_path / "rofs", tmp_path / "subbind"
    for d in (fs, rofs, subbind):
        d.mkdir()
    reader = (
        "import json, os\n"
        "from dataclasses import asdict\n"
        "from agent.config import SystemSourceConfig\n"
        "from agent.sources.base import SourceEnv\n"
        "from agent.sources.system import read\n"
        "r = read(SourceEnv(), SystemSourceConfig().exclude_fstypes)\n"
        f"print(json.dumps({{'statvfs_ro': bool(os.statvfs({str(fs)!r}).f_flag & os.ST_RDONLY),\n"
        "  'fs': [asdict(f) for f in r.filesystems]}))\n"
    )
    q = shlex.quote
    script = " && ".join((
        "set -e",
        f"mount -t tmpfs -o size=4m waystation-rw {q(str(fs))}",
        f"mkdir {q(str(fs / 'sub'))}",
        f"mount -t tmpfs -o ro,size=2m waystation-ro {q(str(rofs))}",
        f"mount --bind {q(str(fs / 'sub'))} {q(str(subbind))}",
        # read-only per mount, as ProtectSystem=strict does it; the superblock stays rw
        f"mount -o remount,bind,ro {q(str(fs))}",
        f"exec {q(sys.executable)} -c {q(reader)}",
    ))
    out = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                         capture_output=True, text=True, timeout=30, cwd=REPO,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["statvfs_ro"], "the bind remount should make statvfs say read-only"
    ours = {f["mountpoint"]: f for f in got["fs"] if f["mountpoint"].startswith(str(tmp_path))}
    assert set(ours) == {str(fs), str(rofs)}  # the subdirectory bind is not a filesystem
    assert (ours[str(fs)]["device"], ours[str(fs)]["fstype"]) == ("waystation-rw", "tmpfs")
    assert ours[str(fs)]["size_bytes"] == 4 << 20
    assert ours[str(fs)]["readonly"] is False
    assert ours[str(rofs)]["readonly"] is True
