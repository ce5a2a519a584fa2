"""The README's two commands, as a newcomer runs them, from a fresh clone."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import REPO, free_port
from tests.integration.harness import http_get, wait_for


def _readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = text.split("## Try it", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    return [ln.strip() for ln in block.splitlines() if ln.strip() and not ln.startswith("#")]


def test_ci_runs_exactly_the_readme_test_command() -> None:
    main_job, test_cmd = _readme_commands()
    ci = [ln.strip() for ln in (REPO / ".ci" / "run").read_text().splitlines()
          if ln.strip() and not ln.startswith(("#", "set ", "cd "))]
    assert ci == [test_cmd]
    assert main_job == "bash scripts/quickstart.sh"


def test_main_job_from_a_fresh_clone(tmp_path: Path) -> None:
    clone = tmp_path / "waystation"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    main_job = _readme_commands()[0]
    port = free_port()
    env = dict(os.environ, WAYSTATION_DEMO_SECONDS="120", WAYSTATION_LISTEN=f"127.0.0.1:{port}")
    env.pop("PYTHONPATH", None)
    env.pop("VIRTUAL_ENV", None)
    log = tmp_path / "quickstart.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(main_job, shell=True, cwd=clone, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def node_series() -> list[str]:
            if proc.poll() is not None:
                raise AssertionError(f"quickstart exited {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                status, body = http_get(f"http://127.0.0.1:{port}/metrics", 2)
            except OSError:
                return []
            if status != 200:
                return []
            return [s.name for fam in text_string_to_metric_families(body.decode())
                    for s in fam.samples if s.labels.get("site") == "local" and s.labels.get("node")]

        names = wait_for(lambda: (n := node_series()) and "node_load1" in n and n, 240,
                         "the local node's system series at the collector", 1.0)
        assert "node_cpu_seconds_total" in names
        out = log.read_text()
        assert re.search(rf"http://127\.0\.0\.1:{port}/metrics", out), out
        r = subprocess.run([str(clone / ".venv/bin/waystation-agent"), "status", "--config",
                            str(clone / "run/agent.toml")], capture_output=True, text=True)
        ack_line = next(ln for ln in r.stdout.splitlines() if "last ack" in ln)
        assert r.returncode == 0 and "never" not in ack_line, r.stdout + r.stderr
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        time.sleep(0.5)


def test_main_job_stops_and_says_why_when_its_port_is_taken(tmp_path: Path) -> None:
    """The commonest first-hour failure: something already listens on the collector's port.
    The quickstart names the address and exits 1 without printing the 'running' banner."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        listen = f"127.0.0.1:{taken.getsockname()[1]}"
        env = dict(os.environ, WAYSTATION_DEMO_SECONDS="5", WAYSTATION_LISTEN=listen,
                   WAYSTATION_RUN_DIR=str(tmp_path / "run"))
        r = subprocess.run(["bash", "scripts/quickstart.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out[-3000:]
    assert f"cannot listen on {listen}" in out and "WAYSTATION_LISTEN=" in out, out[-3000:]
    assert "Waystation is running" not in out
