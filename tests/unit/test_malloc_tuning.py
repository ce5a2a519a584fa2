"""The daemons' glibc malloc settings: applied at start, and an operator's environment wins."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROBE = "from wire.malloc import tune_malloc, trim_malloc; print(','.join(tune_malloc())); trim_malloc()"


def applied(**env: str) -> list[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**base, "PYTHONPATH": str(REPO), **env},
                         capture_output=True, text=True, timeout=60, check=True)
    return [name for name in out.stdout.strip().split(",") if name]


def test_both_settings_apply_by_default() -> None:
    assert applied() == ["MALLOC_MMAP_THRESHOLD_", "MALLOC_ARENA_MAX"]


def test_an_environment_setting_is_left_alone() -> None:
    assert applied(MALLOC_ARENA_MAX="8") == ["MALLOC_MMAP_THRESHOLD_"]
    assert applied(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_ARENA_MAX="1") == []


def serve_log(data_dir: Path, **env: str) -> str:
    """What `waystation-collector serve` logs from start to a SIGTERM after it listens."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    proc = subprocess.Popen([sys.executable, "-m", "collector", "serve", "--data-dir", str(data_dir),
                             "--listen", "127.0.0.1:0"], env={**base, "PYTHONPATH": str(REPO), **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "listening on" in line:
                break
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, err
    return err


def test_the_collector_applies_them_when_it_serves(tmp_path: Path) -> None:
    # The hostile suite's RSS bound depends on them (wire/malloc.py has the figures).
    assert "glibc malloc: MALLOC_MMAP_THRESHOLD_, MALLOC_ARENA_MAX set" in serve_log(tmp_path / "a")
    err = serve_log(tmp_path / "b", MALLOC_ARENA_MAX="4")
    assert "glibc malloc: MALLOC_MMAP_THRESHOLD_ set" in err
