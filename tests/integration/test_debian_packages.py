"""The Debian packages, built, installed, upgraded and purged on this machine for real.

scripts/build-debs.sh builds both packages into a temporary folder; `dpkg -i` installs them;
the tests read what got installed (units, configs, venvs, the user), run the installed
commands, run both daemons under the seccomp part of their units, upgrade to a rebuilt
revision and purge. Installing needs root (CI runs as root); the module purges both packages
and removes the `waystation` user in the end, whatever happened, so the machine is left as
it was. It refuses to run where a waystation package is already installed: it would purge it.

systemd is not PID 1 here, so the units cannot be started. What can be checked without it is:
`systemd-analyze verify` and `security --offline`, and the daemons run as the unit would
run them as far as plain processes can: as the unit's user, with its capability sets, no new
privileges, its umask, and seccomp filters built from the unit's own SystemCallFilter=,
MemoryDenyWriteExecute=, RestrictAddressFamilies= and RestrictNamespaces= lines, in a mount
namespace where the whole system is read-only but the unit's StateDirectory
(ProtectSystem=strict). The other mount settings (PrivateTmp=, ProtectHome=, ...), the
device policy and the cgroup limits need systemd itself and are not emulated.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tarfile
import tempfile
import time
import tomllib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port
from tests.integration.harness import http_get, wait_for

pytestmark = pytest.mark.slow

PACKAGES = ("waystation-agent", "waystation-collector")
# systemd-analyze security's overall exposure, at most (issue 12).
MAX_EXPOSURE = {"waystation-agent": 2.5, "waystation-collector": 1.5}
USER = "waystation"
BUILD_DIR_PREFIX = "waystation-debs."  # scripts/build-debs.sh's mktemp template
SERVICE_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
               "HOME": "/nonexistent", "USER": USER, "LOGNAME": USER}

# Run by Debian's /usr/bin/python3 (python3-seccomp), after setpriv has switched user and
# capabilities: loads seccomp filters as systemd would for the unit, then execs the daemon.
# argv: the spec as JSON, then the command. The allow list goes last: it refuses seccomp().
# A call outside it kills the process here (the units answer EPERM), so a call the daemons
# make that the unit would refuse cannot pass unnoticed.
SANDBOX = r'''
import errno, json, os, subprocess, sys
import seccomp

spec, argv = json.loads(sys.argv[1]), sys.argv[2:]
listing = subprocess.run(["systemd-analyze", "syscall-filter"], check=True, capture_output=True, text=True).stdout
groups, name = {}, None
for line in listing.splitlines():
    if line.startswith("@"):
        name = line.split()[0]
        groups[name] = []
    elif name and line.strip() and not line.strip().startswith("#"):
        groups[name].append(line.strip())

def expand(item):
    if not item.startswith("@"):
        return {item}
    if item not in groups:
        raise SystemExit(f"sandbox: systemd-analyze knows no syscall group {item}")
    return set().union(*(expand(i) for i in groups[item]))

allowed = set()
for entry in spec["filter"]:
    names = set().union(*(expand(i) for i in entry.lstrip("~").split()))
    allowed = allowed - names if entry.startswith("~") else allowed | names
# What the filter does to a call it does not allow: SystemCallErrorNumber= when the unit sets
# it (the call fails with that errno, as under systemd), else the process is killed.
refused = seccomp.ERRNO(getattr(errno, spec["errno"])) if spec.get("errno") else seccomp.KILL_PROCESS
allow = seccomp.SyscallFilter(defaction=refused)
for call in sorted(allowed):
    try:
        allow.add_rule(seccomp.ALLOW, call)
    except (RuntimeError, ValueError, OSError):
        pass  # not a syscall of this architecture (systemd skips those too)

EPERM = seccomp.ERRNO(errno.EPERM)
if spec["mdwe"]:  # systemd 252's rules, seccomp-util.c seccomp_memory_deny_write_execute()
    f = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    PROT_WRITE, PROT_EXEC, SHM_EXEC = 0x2, 0x4, 0o100000
    f.add_rule(EPERM, "mmap", seccomp.Arg(2, seccomp.MASKED_EQ, PROT_EXEC | PROT_WRITE, PROT_EXEC | PROT_WRITE))
    f.add_rule(EPERM, "mprotect", seccomp.Arg(2, seccomp.MASKED_EQ, PROT_EXEC, PROT_EXEC))
    f.add_rule(EPERM, "pkey_mprotect", seccomp.Arg(2, seccomp.MASKED_EQ, PROT_EXEC, PROT_EXEC))
    f.add_rule(EPERM, "shmat", seccomp.Arg(2, seccomp.MASKED_EQ, SHM_EXEC, SHM_EXEC))
    f.load()
if spec["families"]:
    fams, refuse = sorted(spec["families"]), seccomp.ERRNO(errno.EAFNOSUPPORT)
    f = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    f.add_rule(refuse, "socket", seccomp.Arg(0, seccomp.LT, fams[0]))
    f.add_rule(refuse, "socket", seccomp.Arg(0, seccomp.GT, fams[-1]))
    for fam in range(fams[0], fams[-1]):
        if fam not in fams:
            f.add_rule(refuse, "socket", seccomp.Arg(0, seccomp.EQ, fam))
    f.load()
if spec["namespaces"]:
    f = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    f.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")  # its flags are out of reach: libc falls back to clone
    for flag in (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000, 0x80):
        f.add_rule(EPERM, "unshare", seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag))
        f.add_rule(EPERM, "clone", seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag))
    f.add_rule(EPERM, "setns")
    f.load()
os.umask(int(spec["umask"], 8))
allow.load()
os.execv(argv[0], argv)
'''


def run(cmd: list[str], *, check: bool = True, timeout: float = 300, cwd: str | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """A command, its output captured; a failure names the command and shows what it said."""
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                       cwd=cwd, env=env)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {r.returncode}:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    return r


def dpkg_status(package: str) -> str:
    r = run(["dpkg-query", "-W", "-f=${db:Status-Status} ${Version}", package], check=False)
    return r.stdout.strip() if r.returncode == 0 else "not-installed"


def unit_settings(path: Path) -> dict[str, list[str]]:
    """A unit file's assignments, every value of each key in order (systemd's list semantics
    are left to the caller: an empty value resets, '~' inverts)."""
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def sandboxed(unit: Path, argv: list[str]) -> list[str]:
    """argv as the unit would run it: a read-only system but its state directory, user and
    groups, capabilities, no new privileges, umask, seccomp. (The user's own supplementary
    groups are none: it is a system user.)"""
    s = unit_settings(unit)
    caps = [c for v in s.get("AmbientCapabilities", []) for c in v.split()]
    bounding = [c for v in s.get("CapabilityBoundingSet", []) for c in v.split()]
    as_setpriv = ",".join(f"+{c.removeprefix('CAP_').lower()}" for c in caps)
    groups = [s["Group"][-1]] + [g for v in s.get("SupplementaryGroups", []) for g in v.split()]
    cmd = ["setpriv", f"--reuid={s['User'][-1]}", f"--regid={s['Group'][-1]}", f"--groups={','.join(groups)}",
           "--bounding-set=" + ",".join(["-all"] + [f"+{c.removeprefix('CAP_').lower()}" for c in bounding])]
    if caps:
        cmd += [f"--inh-caps={as_setpriv}", f"--ambient-caps={as_setpriv}"]
    assert s.get("NoNewPrivileges") == ["yes"], f"{unit}: NoNewPrivileges=yes expected"
    cmd.append("--no-new-privs")
    families = [getattr(socket, f) for v in s.get("RestrictAddressFamilies", []) for f in v.split()]
    spec = {"filter": s["SystemCallFilter"], "errno": s.get("SystemCallErrorNumber", [""])[-1],
            "mdwe": s.get("MemoryDenyWriteExecute") == ["yes"],
            "families": families, "namespaces": s.get("RestrictNamespaces") == ["yes"],
            "umask": s.get("UMask", ["0022"])[-1]}
    confined = cmd + ["--", "/usr/bin/python3", "-c", SANDBOX, json.dumps(spec), *argv]
    assert s.get("ProtectSystem") == ["strict"], f"{unit}: ProtectSystem=strict expected"
    writable = [f"/var/lib/{d}" for v in s.get("StateDirectory", []) for d in v.split()]
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", READ_ONLY_SYSTEM, "sh",
            " ".join(writable), *confined]


# ProtectSystem=strict as far as a mount namespace shows it: every mount read-only but the
# API filesystems (/proc, /sys, /dev) and the unit's StateDirectory, which stays writable.
# (PrivateTmp is left out: the test's configs and notify sockets live in /tmp.) Refuses to
# run the daemon if the system is still writable, so the confinement cannot silently lapse.
READ_ONLY_SYSTEM = r"""
set -e
writable=$1; shift
for d in $writable; do mount --bind "$d" "$d"; done
for mp in $(awk '{print $5}' /proc/self/mountinfo | sort -u); do
  case "$mp" in /proc|/proc/*|/sys|/sys/*|/dev|/dev/*) continue ;; esac
  keep=0
  for d in $writable; do [ "$mp" = "$d" ] && keep=1; done
  [ "$keep" = 1 ] || mount -o remount,bind,ro "$mp" 2>/dev/null || true
done
if touch /usr/.waystation-sandbox-probe 2>/dev/null; then
  rm -f /usr/.waystation-sandbox-probe
  echo "sandbox: /usr is still writable" >&2
  exit 97
fi
exec "$@"
"""


@dataclass
class Build:
    dist: Path
    version: str
    install_output: str = ""  # what dpkg -i printed

    def deb(self, package: str) -> Path:
        debs = list(self.dist.glob(f"{package}_{self.version}_*.deb"))
        assert len(debs) == 1, f"{self.dist} holds {debs} for {package} {self.version}"
        return debs[0]


def build(dist: Path, revision: str) -> Build:
    r = run(["bash", str(REPO / "scripts/build-debs.sh"), "--out", str(dist)], timeout=600,
            env={**os.environ, "WAYSTATION_DEB_REVISION": revision})
    upstream = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    b = Build(dist, f"{upstream}-{revision}")
    for p in PACKAGES:
        assert str(b.deb(p)) in r.stdout, r.stdout
    return b


def purge_everything() -> list[str]:
    """Purge both packages and remove the user; returns what could not be cleaned."""
    problems = []
    installed = [p for p in PACKAGES if dpkg_status(p) != "not-installed"]
    if installed:
        r = run(["dpkg", "--purge", *installed], check=False)
        if r.returncode != 0:
            problems.append(f"dpkg --purge {' '.join(installed)}: {r.stdout}{r.stderr}")
    for cmd in (["userdel", USER], ["groupdel", USER]):
        r = run(cmd, check=False)
        if r.returncode not in (0, 6):  # 6: no such user / group
            problems.append(f"{' '.join(cmd)}: {r.stderr}")
    return problems


@pytest.fixture(scope="module")
def first_build() -> Iterator[Build]:
    """Revision 1 of both packages, installed with dpkg -i; purged (user too) afterwards."""
    if os.geteuid() != 0:
        pytest.fail("tests/integration/test_debian_packages.py installs packages with dpkg and must run as "
                    "root (CI does); run it with sudo")
    missing = [tool for tool in ("dpkg-deb", "systemd-analyze", "lintian", "setpriv", "runuser")
               if shutil.which(tool) is None]
    if run(["/usr/bin/python3", "-c", "import seccomp"], check=False).returncode != 0:
        missing.append("python3-seccomp (Debian's /usr/bin/python3 module)")
    if missing:
        pytest.fail(f"missing: {', '.join(missing)}; `scripts/bootstrap.sh --test` installs them")
    already = {p: s for p in PACKAGES if (s := dpkg_status(p)) != "not-installed"}
    if already:
        pytest.fail(f"already installed here: {already}; this test installs and then purges the packages "
                    "(their state too), so it runs only where they are not installed")
    tmp = Path(tempfile.mkdtemp(prefix="waystation-debtest."))
    try:
        b = build(tmp / "dist", "1")
        r = run(["dpkg", "-i", str(b.deb("waystation-agent")), str(b.deb("waystation-collector"))], check=False)
        assert r.returncode == 0, f"dpkg -i failed (missing dependencies? `scripts/bootstrap.sh --test` " \
                                  f"installs smartmontools):\n{r.stdout}\n{r.stderr}"
        b.install_output = r.stdout
        yield b
    finally:
        problems = purge_everything()
        shutil.rmtree(tmp, ignore_errors=True)
        assert not problems, f"could not leave the machine clean: {problems}"


def test_packages_carry_version_dependencies_conffiles_and_no_byte_code(first_build: Build) -> None:
    pyver = run(["/usr/bin/python3", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"]).stdout.strip()
    for p in PACKAGES:
        deb = first_build.deb(p)
        version, arch, depends_field = run(["dpkg-deb", "-f", str(deb), "Version", "Architecture",
                                            "Depends"]).stdout.splitlines()
        assert version == f"Version: {first_build.version}"
        assert arch == f"Architecture: {run(['dpkg', '--print-architecture']).stdout.strip()}"
        depends = [d.strip() for d in depends_field.removeprefix("Depends:").split(",")]
        assert f"python{pyver}" in depends and any(d.startswith("libc6 (>= ") for d in depends), depends
        assert ("smartmontools" in depends) == (p == "waystation-agent"), depends
        part = p.removeprefix("waystation-")
        assert run(["dpkg-deb", "--info", str(deb), "conffiles"]).stdout.split() == [f"/etc/waystation/{part}.toml"]
        files = run(["dpkg-deb", "-c", str(deb)]).stdout
        assert not re.search(r"\.pyc$|__pycache__", files, re.M), "byte-code shipped: postinst compiles it"
        for path in (f"./usr/bin/{p} -> /opt/waystation/{part}/bin/{p}", f"./lib/systemd/system/{p}.service",
                     f"./usr/lib/sysusers.d/{p}.conf", f"./usr/share/doc/{p}/changelog.Debian.gz",
                     f"./usr/share/doc/{p}/copyright", f"./usr/share/doc/{p}/README.md.gz",
                     f"./usr/share/doc/{p}/runbooks.md.gz", f"./usr/share/doc/{p}/python-pins.txt"):
            assert path in files, f"{deb.name} lacks {path}"
        assert ("./lib/udev/rules.d/60-waystation-agent.rules" in files) == (p == "waystation-agent")
        assert ("wire.md.gz" in files) == ("bundle.md.gz" in files) == (p == "waystation-collector")


def test_installed_venvs_name_no_build_path_and_hold_the_pinned_versions(first_build: Build) -> None:
    pyver = run(["/usr/bin/python3", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"]).stdout.strip()
    r = run(["grep", "-rlF", BUILD_DIR_PREFIX, "/opt/waystation"], check=False)
    assert r.returncode == 1, f"files naming the build directory: {r.stdout}"
    constraints = (REPO / "packaging/constraints.txt").read_text().splitlines()
    pins = {ln.split("==")[0].lower(): ln.strip() for ln in constraints if "==" in ln and not ln.startswith("#")}
    for p in PACKAGES:
        venv = Path("/opt/waystation") / p.removeprefix("waystation-")
        cfg = (venv / "pyvenv.cfg").read_text()
        assert f"executable = /usr/bin/python{pyver}\n" in cfg and f"-m venv {venv}\n" in cfg, cfg
        assert (venv / "bin/python").resolve() == Path(f"/usr/bin/python{pyver}")
        shipped = Path(f"/usr/share/doc/{p}/python-pins.txt").read_text().split()
        assert {s.lower() for s in shipped} == {pins[s.split("==")[0].lower()].lower() for s in shipped}
        assert len(shipped) == len(pins), f"{p} ships {shipped}, constraints pin {sorted(pins.values())}"
        # postinst compiled the byte-code the service could not write under ProtectSystem=strict
        assert list((venv / "lib").rglob("agent/__pycache__/cli.*.pyc"))
        r = run([str(venv / "bin/python"), "-c", "import nacl.signing, zstandard, cramjam, psutil, aiohttp, "
                 "prometheus_client, pynvml, pySMART, google.protobuf, agent.cli, collector.cli; print('ok')"])
        assert r.stdout.strip() == "ok"


def test_lintian_finds_no_errors_and_the_readme_lists_each_warning(first_build: Build) -> None:
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda p: run(["lintian", "--tag-display-limit", "0", str(first_build.deb(p))],
                                              check=False), PACKAGES))
    lines = [ln for r in results for ln in r.stdout.splitlines()]
    errors = [ln for ln in lines if ln.startswith("E:")]
    assert not errors, "\n".join(errors)
    for r in results:
        assert r.returncode == 0, r.stdout + r.stderr
    section = (REPO / "README.md").read_text().split("## Install from the Debian packages", 1)[1].split("\n## ", 1)[0]
    warned = {ln.split()[2] for ln in lines if ln.startswith("W:")}
    unlisted = sorted(t for t in warned if f"`{t}`" not in section)
    assert not unlisted, f"lintian warns {unlisted}, which README's 'Install from the Debian packages' does not list"


def test_installed_units_verify_and_stay_within_their_exposure(first_build: Build) -> None:
    for p in PACKAGES:
        unit = Path(f"/lib/systemd/system/{p}.service")
        assert unit.read_bytes() == (REPO / "packaging/systemd" / unit.name).read_bytes()
        r = run(["systemd-analyze", "verify", str(unit)], check=False)
        assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), r.stdout + r.stderr
        r = run(["systemd-analyze", "security", "--offline=true", str(unit)])
        m = re.search(rf"Overall exposure level for {re.escape(unit.name)}: (\d+\.\d+)", r.stdout)
        assert m, r.stdout[-2000:]
        assert float(m.group(1)) <= MAX_EXPOSURE[p], r.stdout
        # enabled by postinst (not started: no key yet, and its condition waits for one)
        assert os.readlink(f"/etc/systemd/system/multi-user.target.wants/{unit.name}") == str(unit)
        condition = unit_settings(unit)["ConditionPathExists"]
        assert condition == [{"waystation-agent": "/var/lib/waystation-agent/node.key",
                              "waystation-collector": "/var/lib/waystation-collector/collector.key"}[p]]
    assert "enabled but not started" in first_build.install_output


def test_installed_commands_run_with_the_installed_configs(first_build: Build) -> None:
    r = run(["/usr/bin/waystation-agent", "check-config"], cwd="/")
    assert r.stdout.startswith("config OK:") and "/var/lib/waystation-agent" in r.stdout, r.stdout
    r = run(["/usr/bin/waystation-collector", "--help"], cwd="/")
    assert "serve" in r.stdout
    for part in ("agent", "collector"):
        installed = Path(f"/etc/waystation/{part}.toml").read_bytes()
        assert installed == (REPO / f"packaging/config/{part}.toml").read_bytes()


def test_service_user_owns_the_state_and_keygen_works_as_it(first_build: Build) -> None:
    user = pwd.getpwnam(USER)
    assert user.pw_shell == "/usr/sbin/nologin" and user.pw_uid < 1000, user
    for part, key in (("agent", "node.key"), ("collector", "collector.key")):
        state = Path(f"/var/lib/waystation-{part}")
        st = state.stat()
        assert (st.st_uid, st.st_mode & 0o777) == (user.pw_uid, 0o700), (state, st)
        cmd = ["runuser", "-u", USER, "--", f"/usr/bin/waystation-{part}", "keygen", "--force"]
        if part == "collector":
            cmd += ["--config", "/etc/waystation/collector.toml"]
        run(cmd, cwd="/")
        st = (state / key).stat()
        assert (st.st_uid, st.st_mode & 0o777) == (user.pw_uid, 0o600), (state / key, st)


def test_daemons_run_under_their_units_seccomp_filters(first_build: Build) -> None:
    """A sealing agent, every source on, SMART read by its child every 3 s and ICMP probes on
    (the service group in ping_group_range), delivers to a collector, both confined as their
    units confine them, both telling a stand-in systemd READY=1 and pinging its watchdog;
    the filters refuse what they should."""
    agent_unit, collector_unit = (Path(f"/lib/systemd/system/{p}.service") for p in PACKAGES)
    # the control: the same sandbox refuses W^X memory, netlink sockets and @resources calls
    probe = ("import mmap, os, socket\n"
             "def refused(f):\n"
             "    try:\n        f()\n    except OSError as e:\n        return e.errno\n"
             "print(refused(lambda: mmap.mmap(-1, 4096, prot=7)), refused(lambda: socket.socket(16, 3, 0)),\n"
             "      refused(lambda: os.setpriority(os.PRIO_PROCESS, 0, 19)), flush=True)\n")
    r = subprocess.run(sandboxed(agent_unit, ["/opt/waystation/agent/bin/python", "-c", probe]),
                       capture_output=True, text=True, cwd="/", env=SERVICE_ENV, timeout=60)
    # EPERM (W^X), EAFNOSUPPORT (netlink), EPERM (setpriority, in @resources: the units'
    # SystemCallErrorNumber=EPERM makes a refused call fail rather than kill the service)
    assert r.stdout.split() == ["1", "97", "1"], r.stdout + r.stderr
    assert r.returncode == 0, r.stderr

    conf_dir = Path(tempfile.mkdtemp(prefix="waystation-debtest-conf."))
    conf_dir.chmod(0o755)  # read by the waystation user
    procs: list[subprocess.Popen[bytes]] = []
    managers: dict[str, socket.socket] = {}
    ping_range = Path("/proc/sys/net/ipv4/ping_group_range")
    ping_range_before = ping_range.read_text()
    try:
        out = run(["runuser", "-u", USER, "--", "/usr/bin/waystation-collector", "keygen", "--force",
                   "--config", "/etc/waystation/collector.toml"], cwd="/").stdout
        pin = re.search(r'collector_key = "(wsc1:[^"]+)"', out)
        assert pin, out
        port = free_port()
        agent_toml = conf_dir / "agent.toml"
        agent_toml.write_text(f'site = "pkgtest"\nnode = "n1"\n[uplink]\nurl = "http://127.0.0.1:{port}"\n'
                              f'collector_key = "{pin.group(1)}"\n[summary]\nwindow = "2s"\n'
                              '[sources.smart]\ninterval = "3s"\n[sources.network]\nicmp = true\n')
        # Unprivileged ICMP, as the README says to allow it: the service's group in the
        # node's ping_group_range (restored below).
        gid = pwd.getpwnam(USER).pw_gid
        ping_range.write_text(f"{gid} {gid}\n")
        agent_toml.chmod(0o644)
        out = run(["runuser", "-u", USER, "--", "/usr/bin/waystation-agent", "keygen", "--force", "--config",
                   str(agent_toml)], cwd="/").stdout
        enroll = re.search(r"waystation-collector enroll (.*)", out)
        assert enroll, out
        run(["runuser", "-u", USER, "--", "/usr/bin/waystation-collector", "enroll", "--config",
             "/etc/waystation/collector.toml", *enroll.group(1).split()], cwd="/")

        logs = {name: conf_dir / f"{name}.log" for name in ("collector", "agent")}
        # What systemd listens on for each Type=notify unit: READY=1 and the watchdog's pings
        # must get through the filters (AF_UNIX datagrams) as the waystation user.
        for name in logs:
            managers[name] = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            managers[name].bind(str(conf_dir / f"{name}.notify"))
            (conf_dir / f"{name}.notify").chmod(0o666)
            managers[name].settimeout(30)
        for name, unit, argv in (
                ("collector", collector_unit, ["/usr/bin/waystation-collector", "serve", "--config",
                                               "/etc/waystation/collector.toml", "--listen", f"127.0.0.1:{port}"]),
                ("agent", agent_unit, ["/usr/bin/waystation-agent", "run", "--config", str(agent_toml)])):
            with open(logs[name], "wb") as log_file:
                env = {**SERVICE_ENV, "NOTIFY_SOCKET": str(conf_dir / f"{name}.notify"), "WATCHDOG_USEC": "2000000"}
                procs.append(subprocess.Popen(sandboxed(unit, argv), cwd="/", env=env, stdout=log_file,
                                              stderr=subprocess.STDOUT))
            if name == "collector":
                wait_for(lambda: procs[0].poll() is None and _healthy(port), 30, "the sandboxed collector")

        def node() -> dict[str, object] | None:
            for proc, name in zip(procs, logs, strict=True):
                assert proc.poll() is None, f"{name} exited {proc.returncode}:\n{logs[name].read_text()[-3000:]}"
            status, body = http_get(f"http://127.0.0.1:{port}/v1/nodes")
            nodes = json.loads(body) if status == 200 else []
            return next((n for n in nodes if n["node"] == "n1" and n["complete_through"] >= 4), None)

        wait_for(node, 60, "4 batches of the sandboxed agent at the sandboxed collector", 0.5)
        for name, manager in managers.items():
            said = [manager.recv(4096).decode() for _ in range(8)]  # maybe EXTEND while starting, READY=1, pings
            ready = next((i for i, m in enumerate(said) if m.startswith("READY=1")), None)
            assert ready is not None and all(m.startswith("EXTEND_TIMEOUT_USEC=") for m in said[:ready]), (name, said)
            assert said[ready + 1:] and all("WATCHDOG=1" in m for m in said[ready + 1:]), (name, said)
        time.sleep(4)  # a SMART read (every 3 s) after the first batches
        status, body = http_get(f"http://127.0.0.1:{port}/metrics")
        series = [ln for ln in body.decode().splitlines() if 'node="n1"' in ln and not ln.startswith("#")]
        names = {ln.split("{")[0] for ln in series}
        for wanted in ("node_cpu_seconds_total", "node_filesystem_size_bytes", "node_network_receive_bytes_total",
                       "waystation_probe_rtt_seconds"):
            assert wanted in names, f"{wanted} missing from {sorted(names)}"
        icmp = [ln for ln in series if ln.startswith("probe_success{") and 'protocol="icmp"' in ln]
        assert icmp and all(ln.rsplit(" ", 2)[1] == "1.0" for ln in icmp), (icmp, logs["agent"].read_text()[-3000:])
        errors = [ln for ln in series if ln.startswith("waystation_source_errors_total") and
                  float(ln.rsplit(" ", 2)[1]) != 0]
        assert not errors, "\n".join(errors) + "\n" + logs["agent"].read_text()[-3000:]
        enabled = {re.search(r'source="(\w+)"', ln).group(1): float(ln.rsplit(" ", 2)[1])  # type: ignore[union-attr]
                   for ln in series if ln.startswith("waystation_agent_source_enabled")}
        assert enabled.get("smart") == 1, (enabled, logs["agent"].read_text()[-3000:])
        for proc, name in reversed(list(zip(procs, logs, strict=True))):
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0, f"{name} exited {proc.returncode}:\n{logs[name].read_text()[-3000:]}"
        for name, log in logs.items():
            assert "Traceback" not in log.read_text(), f"{name}:\n{log.read_text()[-3000:]}"
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        for manager in managers.values():
            manager.close()
        ping_range.write_text(ping_range_before)
        shutil.rmtree(conf_dir, ignore_errors=True)


def _healthy(port: int) -> bool:
    try:
        return http_get(f"http://127.0.0.1:{port}/healthz", 2)[0] == 200
    except OSError:
        return False


def _contents(deb: Path) -> dict[str, tuple[int, int, str, str]]:
    """Each file of a package's data: mode, mtime, link target and content hash."""
    data = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True, check=True).stdout
    out = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for m in tar:
            f = tar.extractfile(m) if m.isfile() else None
            out[m.name] = (m.mode, int(m.mtime), m.linkname, hashlib.sha256(f.read()).hexdigest() if f else "")
    return out


def test_upgrade_keeps_an_edited_conffile_without_asking(first_build: Build) -> None:
    conf = Path("/etc/waystation/agent.toml")
    edited = conf.read_text().replace('site = "default"', 'site = "edited-by-operator"')
    assert edited != conf.read_text()
    conf.write_text(edited)
    key_before = Path("/var/lib/waystation-agent/node.key").read_bytes() \
        if Path("/var/lib/waystation-agent/node.key").exists() else None
    second = build(first_build.dist.parent / "dist2", "2")
    for p in PACKAGES:  # one commit, two builds: only the changelog (the revision) may differ
        first, then = (_contents(b.deb(p)) for b in (first_build, second))
        changed = sorted(name for name in first.keys() | then.keys() if first.get(name) != then.get(name))
        assert changed == [f"./usr/share/doc/{p}/changelog.Debian.gz"], changed
    r = run(["dpkg", "-i", str(second.deb("waystation-agent")), str(second.deb("waystation-collector"))],
            check=False)
    # stdin is /dev/null: a conffile prompt would fail dpkg rather than hang
    assert r.returncode == 0 and "Configuration file" not in r.stdout, r.stdout + r.stderr
    for p in PACKAGES:
        assert dpkg_status(p) == f"installed {second.version}"
    assert conf.read_text() == edited
    assert not list(conf.parent.glob("*.dpkg-*")), list(conf.parent.glob("*"))
    if key_before is not None:
        assert Path("/var/lib/waystation-agent/node.key").read_bytes() == key_before
    r = run(["/usr/bin/waystation-agent", "check-config"], cwd="/")
    assert "site=edited-by-operator" in r.stdout, r.stdout


def test_purge_leaves_only_the_user_and_group(first_build: Build) -> None:
    r = run(["dpkg", "--purge", *PACKAGES])
    for p in PACKAGES:
        assert dpkg_status(p) == "not-installed", r.stdout
    left = [path for path in ("/etc/waystation", "/var/lib/waystation-agent", "/var/lib/waystation-collector",
                              "/opt/waystation", "/usr/bin/waystation-agent", "/usr/bin/waystation-collector",
                              "/lib/systemd/system/waystation-agent.service",
                              "/lib/systemd/system/waystation-collector.service",
                              "/usr/lib/sysusers.d/waystation-agent.conf",
                              "/lib/udev/rules.d/60-waystation-agent.rules",
                              "/usr/lib/sysusers.d/waystation-collector.conf")
            if os.path.lexists(path)]
    left += [str(p) for p in Path("/etc/systemd/system").rglob("waystation-*")]
    left += [str(p) for p in Path("/var/lib/systemd/deb-systemd-helper-enabled").rglob("waystation-*")]
    left += [str(p) for p in Path("/var/lib/systemd/deb-systemd-helper-masked").rglob("waystation-*")]
    assert not left, f"purge left {left}"
    # what README says purge leaves behind (the module's clean-up then removes them)
    pwd.getpwnam(USER)
    run(["getent", "group", USER])
    section = (REPO / "README.md").read_text().split("## Install from the Debian packages", 1)[1]
    assert "leaves only the `waystation` user and group" in section
