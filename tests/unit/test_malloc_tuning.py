"""The agent's glibc malloc settings: applied at start, and an operator's environment wins."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROBE = "from agent.daemon import tune_malloc, trim_malloc; print(','.join(tune_malloc())); trim_malloc()"


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
