"""What a newcomer trips over in the first hour, run as they run it: the commands, their
help, their errors and `status` when nothing has worked yet."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port
from tests.integration.harness import ENV, Agent, wait_for

pytestmark = pytest.mark.timeout(120)


def run(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", tool, *args], env=ENV, capture_output=True, text=True, timeout=60)


def test_both_commands_print_the_one_version() -> None:
    want = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    for tool, prog in (("agent", "waystation-agent"), ("collector", "waystation-collector")):
        r = run(tool, "--version")
        assert r.returncode == 0 and r.stdout.strip() == f"{prog} {want}", r.stdout + r.stderr


@pytest.mark.parametrize("command", ["run", "keygen", "check-config", "rotate-key", "status", "export",
                                     "import-receipt"])
def test_every_agent_subcommand_help_says_what_it_does(command: str) -> None:
    r = run("agent", command, "--help")
    assert r.returncode == 0
    usage, _, rest = r.stdout.partition("\n\n")
    description = rest.split("\n\n", 1)[0].strip()
    assert description and not description.startswith(("options:", "positional")), r.stdout


def test_collector_config_errors_name_the_program_and_only_serve_takes_listen(tmp_path: Path) -> None:
    bad = tmp_path / "collector.toml"
    bad.write_text('listen = "nowhere"\n')
    r = run("collector", "nodes", "--config", str(bad), "--data-dir", str(tmp_path / "d"))
    assert r.returncode == 2 and r.stderr.startswith("waystation-collector: "), r.stderr
    r = run("collector", "enroll", "--listen", "127.0.0.1:1", "--site", "s", "--node", "n", "--key", "x",
            "--data-dir", str(tmp_path / "d"))
    assert r.returncode == 2 and "unrecognized arguments: --listen" in r.stderr, r.stderr


def test_check_config_lists_every_enabled_source(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text('site = "s"\nnode = "n"\n[sources.network]\nprobe_targets = ["127.0.0.1:22"]\n'
                   '[[sources.scrape]]\nname = "vllm"\nurl = "http://127.0.0.1:8000/metrics"\n')
    r = run("agent", "check-config", "--config", str(cfg), "--state-dir", str(tmp_path / "state"))
    assert r.returncode == 0, r.stderr
    sources = r.stdout.split("sources:", 1)[1]
    for name in ("system every", "gpu every", "smart every", "network every", "127.0.0.1:22", "scrape:vllm every"):
        assert name in sources, r.stdout
    cfg.write_text('site = "s"\nnode = "n"\n[sources.gpu]\nenabled = false\n[sources.smart]\nenabled = false\n')
    r = run("agent", "check-config", "--config", str(cfg), "--state-dir", str(tmp_path / "state"))
    assert "gpu every" not in r.stdout and "smart every" not in r.stdout and "network every" in r.stdout


def test_status_without_a_spool_fails(tmp_path: Path) -> None:
    r = run("agent", "status", "--state-dir", str(tmp_path / "never-ran"))
    assert r.returncode == 1 and "no spool" in r.stdout, r.stdout + r.stderr


def test_status_names_the_url_when_the_collector_was_never_reached(tmp_path: Path) -> None:
    """The commonest first mistake, a wrong URL: `status` says so from the first try on."""
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens
    agent = Agent(tmp_path / "node", url, extra_toml='[summary]\nwindow = "1s"\n')
    agent.keygen()
    agent.start()
    try:
        st = wait_for(lambda: (s := agent.status()).get("last_error") and s, 30, "a last_error in status")
    finally:
        agent.stop()
    assert url in st["last_error"] and "refused" in st["last_error"].lower(), st
    r = agent.cli("status")
    assert r.returncode == 0, r.stderr
    assert "None" not in r.stdout and "has confirmed nothing yet" in r.stdout, r.stdout
    assert f"last error:         collector unreachable ({url})" in r.stdout, r.stdout
    assert json.loads(agent.cli("status", "--json").stdout)["collector_complete_through"] is None


def test_root_is_refused_where_the_service_user_keeps_its_state(tmp_path: Path) -> None:
    """Run as root (as CI and a newcomer with sudo do), a key written into the service
    user's state folder would be root's: the service could not read it. Refused, saying how."""
    import os

    if os.geteuid() != 0:
        pytest.fail("this test checks what root may do: run the suite as root, as CI does")
    state, data = tmp_path / "agent-state", tmp_path / "collector-data"
    for folder in (state, data):
        folder.mkdir()
        os.chown(folder, 65534, 65534)  # nobody: the service user here
    r = run("agent", "keygen", "--state-dir", str(state))
    assert r.returncode == 2 and "runuser -u nobody" in r.stderr and not (state / "node.key").exists(), r.stderr
    r = run("collector", "keygen", "--data-dir", str(data))
    assert r.returncode == 2 and "runuser -u nobody" in r.stderr and not list(data.iterdir()), r.stderr
    r = run("collector", "nodes", "--data-dir", str(data))  # reading is fine
    assert "runuser" not in r.stderr, r.stderr
    r = run("agent", "status", "--state-dir", str(state))
    assert "runuser" not in r.stdout + r.stderr
