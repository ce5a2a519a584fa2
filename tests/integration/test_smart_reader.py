"""The SMART source as the agent runs it: reads in a child process, smartctl a real executable.

The child (`python -m agent.sources.smart_reader`) runs pySMART over a stand-in smartctl,
tests/fakes/smartctl-replay, which answers from the recordings in ../shared/fixtures/smartctl/
(read in place). Its reads must equal the in-process reads of the unit tests, sample for
sample; a child that stalls or dies must cost the agent one device's read, never the source.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.config import SmartDeviceConfig, SmartSourceConfig
from agent.sources import smart
from agent.sources.base import Sample, SourceEnv
from tests.fakes.smart_fleet import FAILING, HEALTHY, replay_folder
from tests.fakes.smartctl import Replay
from tests.unit.test_smart_source import DATASET, LISTING, SINGLE, TS, by_name, case, json_case, value

REPO = Path(__file__).resolve().parents[2]
REPLAY = REPO / "tests" / "fakes" / "smartctl-replay"


def child_source(monkeypatch: pytest.MonkeyPatch, *folders: Path, devices: tuple[SmartDeviceConfig, ...] = (),
                 timeout: float = 10.0, output: str = "text") -> smart.Smart:
    """The source as the agent runs it; `output` "text" for pySMART's recordings."""
    monkeypatch.setenv("SMARTCTL_REPLAY", ":".join(map(str, folders)))
    config = SmartSourceConfig(smartctl=str(REPLAY), devices=devices, timeout=timeout,  # type: ignore[arg-type]
                               output=output)
    source = smart.Smart(config, SourceEnv())
    assert not source.in_process
    return source


def in_process(folder: Path, devices: tuple[SmartDeviceConfig, ...]) -> list[Sample]:
    source = smart.Smart(SmartSourceConfig(devices=devices, output="text"),
                         SourceEnv(extra={"smartctl_runner": Replay(folder)}))
    return source.collect(TS / 1000)


@pytest.mark.parametrize("folder", SINGLE, ids=[p.name for p in SINGLE])
def test_child_reads_equal_in_process_reads(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = case(folder)
    devices = (SmartDeviceConfig(data["name"], data.get("interface", "")),)
    got = child_source(monkeypatch, folder, devices=devices).collect(TS / 1000)
    assert by_name(got, "smartctl_device")
    assert got == in_process(folder, devices)


def test_child_scans_when_no_devices_are_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    got = child_source(monkeypatch, LISTING).collect(TS / 1000)
    assert {dict(s.labels)["device"] for s in by_name(got, "smartctl_device")} == {
        "nvme0", "nvme1", "bus_0_sat+megaraid_60"}
    assert got == in_process(LISTING, ())


def test_standby_and_failing_devices_through_the_child(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, doc in (("_-d_sat_--all__dev_sdc", "sata_standby_nocheck-standby_sdc.json"),
                      ("_-d_test__dev_nonexistent", "error_unable-to-detect-device-type.json")):
        rc, text = json_case(doc)
        (tmp_path / name).write_bytes(text)
        (tmp_path / f"{name}.exit").write_text(str(rc))
    devices = (SmartDeviceConfig("/dev/sdc", "sat"), SmartDeviceConfig("/dev/nonexistent", ""),
               SmartDeviceConfig("/dev/nvme0", "nvme"))
    source = child_source(monkeypatch, tmp_path, DATASET / "singletests" / "nvme_0", devices=devices)
    samples = source.collect(TS / 1000)
    sdc = [s for s in samples if dict(s.labels)["device"] == "sdc"]
    assert {s.name for s in sdc} == {"smartctl_device_power_mode", "smartctl_device_smartctl_exit_status"}
    assert value(sdc, "smartctl_device_power_mode", power_mode="STANDBY") == 1
    assert value(sdc, "smartctl_device_smartctl_exit_status") == 2
    assert value(samples, smart.ERRORS_METRIC, device="nonexistent", reason="error") == 1
    assert value(samples, "smartctl_device_percentage_used", device="nvme0") == 28


def test_recorded_failing_and_worn_disks_through_the_child(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The recorded fleet, healthy and failing, answered in smartctl --json by the shell
    stand-in and read by the real reader child as the agent runs it ("auto": the folder's
    smartctl says 7.x): what makes each failing disk failing arrives, sample for sample as
    in-process, and a scan finds the same disks."""
    folder = tmp_path / "replay"
    pairs = replay_folder(folder, {**HEALTHY, **FAILING})
    devices = tuple(SmartDeviceConfig(name, dev_type) for name, dev_type in pairs)
    source = child_source(monkeypatch, folder, devices=devices, output="auto")
    assert source.output() == "json"
    samples = source.collect(TS / 1000)
    assert not by_name(samples, smart.ERRORS_METRIC)
    assert len(by_name(samples, "smartctl_device")) == len(pairs) == 12
    assert value(samples, "smartctl_device_smart_status", device="nvme2") == 0
    assert value(samples, "smartctl_device_critical_warning", device="nvme2") == 16
    assert value(samples, "smartctl_device_smartctl_exit_status", device="nvme2") == 8
    assert value(samples, "smartctl_device_percentage_used", device="nvme3") == 75
    assert value(samples, "smartctl_device_smart_status", device="sdg") == 0
    assert value(samples, "smartctl_device_smartctl_exit_status", device="sdg") == 216
    for device, raw in (("sdf", 304), ("bus_0_megaraid_1", 387), ("sdg", 1975)):
        assert value(samples, "smartctl_device_attribute", device=device, attribute_name="Reallocated_Sector_Ct",
                     attribute_value_type="raw") == raw
    assert value(samples, "smartctl_scsi_grown_defect_list", device="sde") == 0
    in_process = smart.Smart(SmartSourceConfig(devices=devices),
                             SourceEnv(extra={"smartctl_runner": Replay(folder)})).collect(TS / 1000)
    assert samples == in_process
    scanned = child_source(monkeypatch, folder, output="auto").collect(TS / 1000)
    assert len(scanned) == len(samples) and set(scanned) == set(samples)


def test_the_json_reader_child_never_imports_pysmart(tmp_path: Path) -> None:
    """In json mode pySMART's ~3.5 MB stay out of the reader child too."""
    pairs = replay_folder(tmp_path, FAILING)
    request = {"smartctl": str(REPLAY), "timeout": 10, "ts_ms": TS, "output": "json",
               "devices": [list(pair) for pair in pairs]}
    code = ("import io, json, sys\n"
            "from agent.sources import smart_reader\n"
            f"sys.stdin = io.StringIO({json.dumps(request)!r})\n"
            "rc = smart_reader.main()\n"
            "heavy = ('pySMART', 'humanfriendly', 'chardet')\n"
            "print(json.dumps({'rc': rc, 'heavy': sorted(m for m in sys.modules if m.split('.')[0] in heavy)}))\n")
    env = dict(os.environ, PYTHONPATH=str(REPO), SMARTCTL_REPLAY=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    replies = [json.loads(line) for line in out.stdout.splitlines()]
    reads = [r["read"] for r in replies if "read" in r]
    assert [(r["name"], r["type"], r["error"]) for r in reads] == [(n, t, None) for n, t in pairs]
    assert replies[-1] == {"rc": 0, "heavy": []}


def test_smartctl_timeout_inside_the_child(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """smartctl stalls on one disk: the child's own timeout kills it; the next disk is read."""
    stall = tmp_path / "smartctl"
    stall.write_text(f'#!/bin/sh\ncase "$*" in *sdz*) exec sleep 30 ;; esac\nexec "{REPLAY}" "$@"\n')
    stall.chmod(0o755)
    devices = (SmartDeviceConfig("/dev/sdz", "scsi"), SmartDeviceConfig("/dev/nvme0", "nvme"))
    source = child_source(monkeypatch, DATASET / "singletests" / "nvme_0", devices=devices, timeout=1.0)
    source.config = SmartSourceConfig(smartctl=str(stall), devices=devices, timeout=1.0,  # type: ignore[arg-type]
                                      output="text")
    t0 = time.monotonic()
    samples = source.collect(TS / 1000)
    assert time.monotonic() - t0 < 20
    assert value(samples, smart.ERRORS_METRIC, device="sdz", reason="timeout") == 1
    assert value(samples, "smartctl_device_temperature", device="nvme0") == 42


def fake_reader(tmp_path: Path, body: str) -> list[str]:
    """A reader command standing in for a child that misbehaves; it records its pid."""
    script = tmp_path / "reader.py"
    script.write_text(f"import os, sys, time\nopen({str(tmp_path / 'pid')!r}, 'w').write(str(os.getpid()))\n"
                      f"sys.stdin.read()\n{body}\n")
    return [sys.executable, str(script)]


def gone(pid: int, within: float = 5.0) -> bool:
    """Killed and reaped: no process, not even a zombie, is left behind (orphans are reaped
    by init, so give that a moment)."""
    deadline = time.monotonic() + within
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return not Path(f"/proc/{pid}").exists()


# A reader that stalls on /dev/sdz the way a disk stuck in the kernel makes it stall: its
# smartctl (a `sleep` here) never returns. Every other request is served by the real reader.
# It logs each request it gets, and the pid of the smartctl it left behind.
STALLING_READER = r"""
import json, os, subprocess, sys, time
sys.path.insert(0, {repo!r})
request = json.load(sys.stdin)
with open({log!r}, "a") as f:
    f.write(json.dumps(request) + "\n")
devices = [d for d in request["devices"] if d not in request["skip"]]
if ["/dev/sdz", "sat"] in devices:
    print(json.dumps({{"devices": devices}}), flush=True)
    for d in devices:
        print(json.dumps({{"reading": d}}), flush=True)
        if d[0] == "/dev/sdz":
            smartctl = subprocess.Popen(["sleep", "300"])
            open({pid!r}, "w").write(str(smartctl.pid))
            time.sleep(300)
        print(json.dumps({{"read": {{"name": d[0], "type": d[1], "samples": [], "error": ["open", "x"]}}}}),
              flush=True)
else:
    import io
    from agent.sources import smart_reader
    sys.stdin = io.StringIO(json.dumps(request))
    sys.exit(smart_reader.main())
"""


def stalling_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> smart.Smart:
    monkeypatch.setattr(smart, "READER_GRACE_S", 3.0)
    devices = (SmartDeviceConfig("/dev/sda", "sat"), SmartDeviceConfig("/dev/sdz", "sat"),
               SmartDeviceConfig("/dev/nvme0", "nvme"))
    missing = tmp_path / "_-d_sat_--all__dev_sda"
    missing.write_text("smartctl 7.3\n\nSmartctl open device: /dev/sda failed: No such device\n")
    (tmp_path / "_-d_sat_--all__dev_sda.exit").write_text("2")
    source = child_source(monkeypatch, tmp_path, DATASET / "singletests" / "nvme_0", devices=devices, timeout=0.5)
    script = tmp_path / "stalling_reader.py"
    script.write_text(STALLING_READER.format(repo=str(REPO), log=str(tmp_path / "requests"),
                                             pid=str(tmp_path / "smartctl.pid")))
    source.reader_command = [sys.executable, str(script)]
    return source


def requests(tmp_path: Path) -> list[list[str]]:
    """The device names of each request the reader got, in order."""
    lines = (tmp_path / "requests").read_text().splitlines()
    return [[d[0] for d in json.loads(line)["devices"] if d not in json.loads(line)["skip"]] for line in lines]


def test_a_stalled_disk_costs_only_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reader stalls on the second of three disks: its process group (its smartctl
    included) is killed, that disk is counted as a timeout, and a new reader reads the
    disk after it."""
    source = stalling_source(tmp_path, monkeypatch)
    t0 = time.monotonic()
    samples = source.collect(TS / 1000)
    assert time.monotonic() - t0 < 15
    assert value(samples, smart.ERRORS_METRIC, device="sda", reason="open") == 1
    assert value(samples, smart.ERRORS_METRIC, device="sdz", reason="timeout") == 1
    assert value(samples, "smartctl_device_percentage_used", device="nvme0") == 28
    assert requests(tmp_path) == [["/dev/sda", "/dev/sdz", "/dev/nvme0"], ["/dev/nvme0"]]
    assert gone(int((tmp_path / "smartctl.pid").read_text())), "the stalled smartctl was left running"


def test_a_disk_whose_read_outlives_sigkill_is_not_read_again(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A smartctl stuck in the kernel survives SIGKILL; reading that disk again would leave
    one more stuck process every interval. Stand-in for the survivor: a process group of
    the test's own."""
    source = stalling_source(tmp_path, monkeypatch)
    survivor = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        source.stuck[smart.DeviceSpec("/dev/sdz", "sat")] = survivor.pid
        samples = source.collect(TS / 1000)
        assert value(samples, smart.ERRORS_METRIC, device="sdz", reason="stalled") == 1
        assert value(samples, "smartctl_device_percentage_used", device="nvme0") == 28
        assert requests(tmp_path) == [["/dev/sda", "/dev/nvme0"]]
    finally:
        survivor.kill()
        survivor.wait()
    # Once it is gone, the disk is tried again (and here stalls again).
    samples = source.collect(TS / 1000 + 600)
    assert requests(tmp_path)[1:] == [["/dev/sda", "/dev/sdz", "/dev/nvme0"], ["/dev/nvme0"]]
    assert value(samples, smart.ERRORS_METRIC, device="sdz", reason="timeout") == 1
    assert value(samples, smart.ERRORS_METRIC, device="sdz", reason="stalled") == 1


def test_chatter_does_not_extend_the_deadline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(smart, "READER_GRACE_S", 1.0)
    source = child_source(monkeypatch, tmp_path, timeout=0.5)
    source.reader_command = fake_reader(tmp_path, "while True:\n    print('warning: slow', flush=True)\n"
                                                  "    time.sleep(0.2)")
    t0 = time.monotonic()
    with pytest.raises(smart.SmartctlTimeout, match="stalled before any reply.*warning: slow"):
        source.collect(TS / 1000)
    assert time.monotonic() - t0 < 6
    assert gone(int((tmp_path / "pid").read_text()))


def test_malformed_and_runaway_replies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nvme = smart.read_device(Replay(DATASET / "singletests" / "nvme_0"), smart.DeviceSpec("/dev/nvme0", "nvme"),
                             10.0, TS)
    source = child_source(monkeypatch, tmp_path)
    # A reading line that is not a device is ignored; a read that does not parse counts
    # the device announced; the good read is kept.
    source.reader_command = fake_reader(tmp_path, (
        "print('{\"reading\": 5}', flush=True)\n"
        f"print({smart.read_to_json(nvme)!r}, flush=True)\n"
        "print('{\"reading\": [\"/dev/sdq\", \"sat\"]}', flush=True)\n"
        "print('{\"read\": {\"name\": \"/dev/sdq\"}}', flush=True)\n"))
    samples = source.collect(TS / 1000)
    assert value(samples, "smartctl_device_percentage_used", device="nvme0") == 28
    assert value(samples, smart.ERRORS_METRIC, device="sdq", reason="error") == 1
    # A line beyond READER_MAX_LINE: the child is killed, the device it was reading counted.
    monkeypatch.setattr(smart, "READER_MAX_LINE", 100_000)
    source.reader_command = fake_reader(tmp_path, (
        "print('{\"reading\": [\"/dev/sdq\", \"sat\"]}', flush=True)\n"
        "sys.stdout.write('x' * 1_000_000)\nsys.stdout.flush()\ntime.sleep(60)"))
    t0 = time.monotonic()
    samples = source.collect(TS / 1000)
    assert time.monotonic() - t0 < 10
    assert value(samples, smart.ERRORS_METRIC, device="sdq", reason="error") == 2
    assert gone(int((tmp_path / "pid").read_text()))


def test_stalled_child_is_killed_and_reads_before_it_are_kept(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    nvme = smart.read_device(Replay(DATASET / "singletests" / "nvme_0"), smart.DeviceSpec("/dev/nvme0", "nvme"),
                             10.0, TS)
    body = (f"print({smart.read_to_json(nvme)!r}, flush=True)\n"
            "print('{\"reading\": [\"/dev/sdq\", \"sat\"]}', flush=True)\n"
            "time.sleep(60)")
    monkeypatch.setattr(smart, "READER_GRACE_S", 3.0)
    devices = (SmartDeviceConfig("/dev/nvme0", "nvme"), SmartDeviceConfig("/dev/sdq", "sat"))
    source = child_source(monkeypatch, tmp_path, devices=devices, timeout=0.5)
    source.reader_command = fake_reader(tmp_path, body)
    t0 = time.monotonic()
    samples = source.collect(TS / 1000)
    assert time.monotonic() - t0 < 10
    assert value(samples, "smartctl_device_percentage_used", device="nvme0") == 28
    assert value(samples, smart.ERRORS_METRIC, device="sdq", reason="timeout") == 1
    assert gone(int((tmp_path / "pid").read_text()))


def test_child_that_stalls_before_any_reply_fails_the_collect(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(smart, "READER_GRACE_S", 3.0)
    source = child_source(monkeypatch, tmp_path, timeout=0.5)
    source.reader_command = fake_reader(tmp_path, "print('importing', flush=True)\ntime.sleep(60)")
    with pytest.raises(smart.SmartctlTimeout, match="stalled before any reply.*importing"):
        source.collect(TS / 1000)
    assert gone(int((tmp_path / "pid").read_text()))


def test_child_that_dies_names_what_it_said(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = child_source(monkeypatch, tmp_path)
    source.reader_command = fake_reader(tmp_path, "raise SystemExit('pySMART could not be imported')")
    with pytest.raises(smart.SmartReaderError, match="exited 1: pySMART could not be imported"):
        source.collect(TS / 1000)
    # Dying in the middle of a device counts that device, not the source.
    source.reader_command = fake_reader(
        tmp_path, "print('{\"reading\": [\"/dev/sdq\", \"sat\"]}', flush=True)\nprint('Segmentation fault')\n"
                  "sys.exit(139)")
    samples = source.collect(TS / 1000)
    assert value(samples, smart.ERRORS_METRIC, device="sdq", reason="error") == 1


def test_the_agent_process_never_imports_pysmart() -> None:
    """The point of the child: pySMART (~3.5 MB resident with what it imports) stays out of
    the agent, which only spawns the reader."""
    code = (
        "import os, sys\n"
        "from agent.config import SmartDeviceConfig, SmartSourceConfig\n"
        "from agent.sources import smart\n"
        "from agent.sources.base import SourceEnv\n"
        f"config = SmartSourceConfig(smartctl={str(REPLAY)!r}, devices=(SmartDeviceConfig('/dev/nvme0', 'nvme'),),"
        " output='text')\n"
        "source = smart.Smart(config, SourceEnv())\n"
        "assert os.geteuid() != 0 or source.probe() is None, source.probe()\n"
        "samples = source.collect(1700000000.0)\n"
        "heavy = ('pySMART', 'humanfriendly', 'chardet')\n"
        "print(len(samples), sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO), SMARTCTL_REPLAY=str(DATASET / "singletests" / "nvme_0"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    count, modules = out.stdout.split(" ", 1)
    assert int(count) > 10
    assert modules.strip() == "[]"
