"""A stand-in smartctl runner replaying recorded outputs (no SMART disks on these machines).

An argument list maps to a recorded file by pySMART's own test rule: `_` + the arguments
joined by `_`, with `/`, `\\` and `:` as `_`; a file NAME.exit beside a recording holds the
exit status to answer with (0 without one), as in tests/fakes/smartctl-replay. `-V` is
answered from a `_-V` recording where the folder has one (a folder of `--json` recordings
says 7.x, so `output = "auto"` reads JSON), else with VERSION. Used by the SMART tests, the
catalog test and bench/agent_fixture_run.py; tests/fakes/smart_fleet.py writes folders of
JSON recordings.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

VERSION = b"smartctl 7.3 2022-02-28 r5338 [x86_64-linux] (local build)\n"


def file_name(args: Sequence[str]) -> str:
    return re.sub(r"[/\\:]", "_", "_" + "_".join(args))


class Replay:
    """A stand-in runner: argument list -> recorded file; records every call it gets."""

    def __init__(self, folder: Path | None, names: dict[str, Path] | None = None,
                 answers: dict[str, tuple[int, bytes]] | None = None) -> None:
        self.folder = folder
        self.names = names or {}
        self.answers = answers or {}
        self.calls: list[list[str]] = []

    def __call__(self, args: Sequence[str], timeout: float) -> tuple[int, bytes]:
        assert timeout > 0
        args = list(args)
        self.calls.append(args)
        if args == ["-V"]:
            if "_-V" in self.answers:
                return self.answers["_-V"]
            recorded = self.recording("_-V")
            return (exit_status(recorded), read_recording(recorded)) if recorded else (0, VERSION)
        if not (args[0].startswith("--scan") or "test" in args):
            assert args[:2] == ["-n", "standby"], f"device read without -n standby: {args}"
            args = args[2:]
        name = file_name(args)
        if name in self.answers:
            return self.answers[name]
        path = self.recording(name)
        if path is None:
            raise FileNotFoundError(f"no recording {name} for: smartctl {' '.join(args)}")
        return exit_status(path), read_recording(path)

    def recording(self, name: str) -> Path | None:
        path = self.names.get(name) or (self.folder / name if self.folder else None)
        return path if path is not None and path.exists() else None


def exit_status(path: Path) -> int:
    """The exit status NAME.exit beside a recording holds; 0 without one."""
    status = path.parent / f"{path.name}.exit"
    return int(status.read_text().strip()) if status.is_file() else 0


def read_recording(path: Path) -> bytes:
    """The file's bytes; a checkout without symlink support stores a link as its target path."""
    data = path.read_bytes()
    if len(data) < 256 and b"\n" not in data and not path.is_symlink():
        target = path.parent / data.decode()
        if target.is_file():
            return target.read_bytes()
    return data
