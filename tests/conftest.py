"""Shared test helpers: paths to the shared fixtures and small builders."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_FIXTURES = Path(os.environ.get("WAYSTATION_SHARED", REPO.parent / "shared")) / "fixtures"


@pytest.fixture(scope="session")
def shared_fixtures() -> Path:
    if not SHARED_FIXTURES.is_dir():
        pytest.fail(f"shared fixtures not found at {SHARED_FIXTURES}; check out ../shared beside the repo")
    return SHARED_FIXTURES


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    """Under the test command (WAYSTATION_REQUIRE_TOOLS=1, set by scripts/test.sh, which
    installs every Debian tool), a test skipped for a missing tool fails instead: a broken
    install must not pass as green."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.skipped and os.environ.get("WAYSTATION_REQUIRE_TOOLS") == "1":
        reason = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if "apt-get install" in reason:
            report.outcome = "failed"
            report.longrepr = f"required tool missing under scripts/test.sh: {reason}"
    return None
