"""rules/: promtool accepts them, its unit tests pass and cover every alert both ways, every
alert is annotated for the on-call, and every expression names only metrics that exist."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.unit.test_rules_promql import KNOWN, REPO, RULES_DIR, check, references, rule_groups

RULE_FILES = sorted(RULES_DIR.glob("*.rules.yml"))
TEST_FILES = sorted((RULES_DIR / "tests").glob("*.test.yml"))
RUNBOOKS = REPO / "docs" / "runbooks.md"
SEVERITIES = {"critical", "warning", "info"}
# Labels an alert's text must name when its series carry them.
SUBJECT_LABELS = ("device", "gpu", "target")
SITE_LEVEL = {"SiteDown"}  # aggregated by site: there is no one node to name


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not installed (apt-get install prometheus; scripts/test.sh does)")
    return path


def alerts() -> list[dict]:  # type: ignore[type-arg]
    return [r for g in rule_groups() for r in g["rules"] if "alert" in r]


def anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    for line in markdown.splitlines():
        m = re.match(r"#+\s+(.*)", line)
        if m:
            out.add(re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-"))
    return out


def test_rule_files_exist() -> None:
    assert {p.name for p in RULE_FILES} >= {"fleet.rules.yml", "hardware.rules.yml", "serving.rules.yml"}
    assert TEST_FILES


@pytest.mark.parametrize("path", RULE_FILES, ids=lambda p: p.name)
def test_promtool_check_rules(path: Path) -> None:
    out = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("path", TEST_FILES, ids=lambda p: p.name)
def test_promtool_unit_tests(path: Path) -> None:
    out = subprocess.run([promtool(), "test", "rules", path.name], cwd=path.parent,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_alert_is_tested_firing_and_silent() -> None:
    firing: dict[str, list[dict[str, str]]] = {}
    silent: set[str] = set()
    tested_files: set[str] = set()
    for path in TEST_FILES:
        doc = yaml.safe_load(path.read_text())
        tested_files |= {Path(f).name for f in doc["rule_files"]}
        for test in doc["tests"]:
            for case in test.get("alert_rule_test", []):
                expected = case.get("exp_alerts") or []
                if expected:
                    firing.setdefault(case["alertname"], []).extend(
                        {k: str(v) for k, v in e["exp_labels"].items()} for e in expected)
                else:
                    silent.add(case["alertname"])
    assert tested_files >= {p.name for p in RULE_FILES}
    names = {a["alert"] for a in alerts()}
    assert not names - set(firing), f"alerts never tested firing: {sorted(names - set(firing))}"
    assert not names - silent, f"alerts never tested silent: {sorted(names - silent)}"
    # An alert defined by several rules (one per model server, say): each rule fires in a test.
    for a in alerts():
        static = {k: str(v) for k, v in a.get("labels", {}).items()}
        assert any(static.items() <= got.items() for got in firing[a["alert"]]), (
            f"no test fires the {a['alert']} rule with labels {static}")


def test_every_alert_is_annotated_for_the_on_call() -> None:
    sections = anchors(RUNBOOKS.read_text())
    for a in alerts():
        name = a["alert"]
        assert a.get("labels", {}).get("severity") in SEVERITIES, name
        ann = a.get("annotations", {})
        assert ann.get("summary") and ann.get("description"), name
        text = ann["summary"] + ann["description"]
        static = a.get("labels", {})
        for label in ("site",) if name in SITE_LEVEL else ("site", "node"):
            assert f"$labels.{label}" in text or label in static, f"{name} does not name the {label}"
        carried = set().union(*(KNOWN[m].labels for m, _ in references(a["expr"]).metrics))
        subjects = carried & set(SUBJECT_LABELS)
        if "gpu" in subjects:
            subjects.discard("device")  # a GPU is named by its index (and UUID), not nvidiaN
        for label in sorted(subjects):
            assert f"$labels.{label}" in text, f"{name} does not name the {label}"
        url = ann.get("runbook_url", "")
        m = re.fullmatch(r"docs/runbooks\.md#([a-z0-9-]+)", url)
        assert m, f"{name}: runbook_url {url!r} is not docs/runbooks.md#<section>"
        assert m.group(1) in sections, f"{name}: docs/runbooks.md has no section #{m.group(1)}"
        assert m.group(1) == name.lower(), f"{name}: runbook section should be #{name.lower()}"


def test_recording_rules_follow_the_naming_convention() -> None:
    for g in rule_groups():
        for r in g["rules"]:
            if "record" in r:
                assert re.fullmatch(r"[a-z_]+:[A-Za-z0-9_:]+:[a-z0-9_]+", r["record"]), r["record"]


def test_rules_name_only_metrics_and_labels_that_exist() -> None:
    problems = []
    for g in rule_groups():
        for r in g["rules"]:
            for p in check(r["expr"], KNOWN):
                problems.append(f"{r.get('alert') or r.get('record')}: {p}")
    assert not problems, "\n".join(problems)
