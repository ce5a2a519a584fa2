"""The collector imports nothing of the agent's and the agent nothing of the collector's;
both share the protocol through wire/, which imports neither."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FORBIDDEN = {"agent": {"collector"}, "collector": {"agent"}, "wire": {"agent", "collector"}}


def _imported_packages(path: Path) -> set[str]:
    tops: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            tops.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            tops.add(node.module.split(".")[0])
    return tops


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_none_of_the_other_side(package: str) -> None:
    offenders = {
        str(path.relative_to(REPO)): sorted(_imported_packages(path) & FORBIDDEN[package])
        for path in (REPO / package).rglob("*.py")
    }
    assert {p: bad for p, bad in offenders.items() if bad} == {}


@pytest.mark.parametrize(
    ("entry", "forbidden"),
    [("collector.cli", "agent"), ("agent.cli", "collector"), ("wire", "agent"), ("wire", "collector")],
)
def test_loading_one_side_loads_nothing_of_the_other(entry: str, forbidden: str) -> None:
    """Also catches imports built at run time (importlib), which the source scan cannot see."""
    code = (
        f"import importlib, sys\nimportlib.import_module({entry!r})\n"
        f"print(sorted(m for m in sys.modules if m == {forbidden!r} or m.startswith({forbidden + '.'!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_scan_sees_an_import_of_the_other_side(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("import os\nfrom agent.keys import load\nimport collector.app as app\nfrom . import x\n")
    assert _imported_packages(probe) == {"os", "agent", "collector"}
