"""Config loading: defaults, units, unknown keys with suggestions, one-line errors."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import AgentConfig, load_agent_config
from tests.conftest import REPO
from wire.config import ConfigError, parse_duration, parse_size


def test_packaged_agent_config_spells_out_the_builtin_defaults() -> None:
    packaged = load_agent_config(REPO / "packaging" / "config" / "agent.toml")
    assert dataclasses.replace(packaged, node=AgentConfig().node) == AgentConfig()


def test_packaged_collector_config_spells_out_the_builtin_defaults(tmp_path: Path) -> None:
    from collector.config import CollectorConfig, load_config

    assert load_config(REPO / "packaging" / "config" / "collector.toml") == CollectorConfig()
    assert CollectorConfig().limits.series_ttl == 3600.0
    bad = tmp_path / "collector.toml"
    bad.write_text('[limits]\nseries_ttl = "30s"\n')
    with pytest.raises(ConfigError, match="series_ttl must be at least 60s"):
        load_config(bad)


def _keys(cls: type, prefix: str = "") -> set[str]:
    """Every config key a dataclass reads, dotted by table ("limits.max_pending_commits")."""
    out: set[str] = set()
    for f in dataclasses.fields(cls):
        if f.name.startswith("_") or not f.init:
            continue
        sub = f.type if isinstance(f.type, type) else None
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
        if default is not None and dataclasses.is_dataclass(default):
            out |= _keys(type(default), f"{prefix}{f.name}.")
        elif sub is None or not dataclasses.is_dataclass(sub):
            out.add(prefix + f.name)
    return out


@pytest.mark.parametrize("which", ["agent", "collector"])
def test_packaged_configs_name_every_key(which: str) -> None:
    """The annotated configs are where an operator learns what can be set: each key the
    code reads appears in them, set or commented out, in its table."""
    from collector.config import CollectorConfig

    cls = AgentConfig if which == "agent" else CollectorConfig
    text = (REPO / "packaging" / "config" / f"{which}.toml").read_text()
    table, seen = "", set()
    for line in text.splitlines():
        bare = line.lstrip("# ").strip()
        head = bare.split("#", 1)[0].strip()
        if head.startswith("[") and head.endswith("]"):
            table = head.strip("[]").strip()
        elif "=" in bare:
            key = bare.split("=", 1)[0].strip()
            seen.add(f"{table}.{key}" if table else key)
            seen.add(f"{table.split('.')[0]}.{key}" if table else key)
    missing = sorted(k for k in _keys(cls) if k not in seen and k.split(".")[-1] not in {"scrape", "devices",
                                                                                          "remote_write"})
    assert not missing, f"packaging/config/{which}.toml does not name {missing}"

def test_packaged_remote_write_example_loads_with_its_defaults(tmp_path: Path) -> None:
    from collector.config import RemoteWriteConfig, load_config

    packaged = (REPO / "packaging" / "config" / "collector.toml").read_text()
    example = packaged[packaged.index("# [[remote_write]]"):]
    enabled = tmp_path / "collector.toml"
    enabled.write_text("\n".join(line[2:] for line in example.splitlines() if line.startswith("# ")))
    (target,) = load_config(enabled).remote_write
    assert target == RemoteWriteConfig(name="victoria", url="http://127.0.0.1:8428/api/v1/write",
                                       headers={"X-Scope-OrgID": "fleet"})


def test_the_readme_remote_write_example_loads(tmp_path: Path) -> None:
    from collector.config import load_config

    readme = (REPO / "README.md").read_text()
    history = readme[readme.index("## History"):]
    example = history[history.index("```toml") + len("```toml"):history.index("```", history.index("```toml") + 7)]
    path = tmp_path / "collector.toml"
    path.write_text(example)
    vm, prom = load_config(path).remote_write
    assert (vm.name, prom.name, prom.exclude, prom.headers) == (
        "victoria", "prometheus", ("node_cpu_seconds_total",), {"X-Scope-OrgID": "fleet"})


@pytest.mark.parametrize(
    ("toml", "problem"),
    [
        ('name = "a b"\nurl = "http://x"', "name 'a b' must be"),
        ('name = "a"\nurl = "ftp://x"', "must be http:// or https://"),
        ('name = "a"\nurl = "http://x"\nbearer_token_file = "t"\nbasic_auth_username = "u"', "not both"),
        ('name = "a"\nurl = "http://x"\ninclude = ["("]', "not a valid regex"),
        ('name = "a"\nurl = "http://x"\n[remote_write.headers]\nContent-Type = "x"', "may not set content-type"),
        ('name = "a"\nurl = "http://x"\ntls_cert_file = "c"', "must be set together"),
        ('name = "a"\nurl = "http://x"\n[[remote_write]]\nname = "a"\nurl = "http://y"', "names must be unique"),
    ],
)
def test_remote_write_config_errors_name_the_problem(tmp_path: Path, toml: str, problem: str) -> None:
    from collector.config import load_config

    bad = tmp_path / "collector.toml"
    bad.write_text("[[remote_write]]\n" + toml + "\n")
    with pytest.raises(ConfigError, match="remote_write") as err:
        load_config(bad)
    assert problem in str(err.value)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("10s", 10.0), ("250ms", 0.25), ("5m", 300.0), ("1h30m", 5400.0), ("0.5s", 0.5)],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_a_bare_number_is_refused_as_a_duration_saying_how_to_write_it(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match='write "15s"'):
        parse_duration(15)
    cfg = tmp_path / "agent.toml"
    cfg.write_text('site = "s"\nnode = "n"\n[summary]\nwindow = 10\n')
    r = subprocess.run([sys.executable, "-m", "agent", "check-config", "--config", str(cfg)],
                       capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 2 and "window" in r.stderr and 'write "10s"' in r.stderr, r.stderr


@pytest.mark.parametrize("bad", ["10", "ten seconds", "10x", "", "-5s", 0, 15, 0.5, True, "5s 3m"])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


@pytest.mark.parametrize(
    ("text", "size"),
    [("512MiB", 512 * 2**20), ("10MB", 10_000_000), ("64KiB", 65536), ("1GiB", 2**30), (4096, 4096),
     ("1.5KiB", 1536)],
)
def test_sizes(text: object, size: int) -> None:
    assert parse_size(text) == size


def test_unknown_key_names_file_key_and_suggestion(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text('site = "a"\n[spool]\nmax_byte = "1MiB"\n')
    with pytest.raises(ConfigError) as err:
        load_agent_config(cfg)
    msg = str(err.value)
    assert str(cfg) in msg and "spool.max_byte" in msg and "'spool.max_bytes'" in msg


def test_bad_values_are_named(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cases = {
        '[summary]\nwindow = "soon"\n': "summary.window",
        '[uplink]\nurl = "ftp://x"\n': "uplink",
        '[[sources.scrape]]\nname = "a"\nurl = "http://h/m"\n'
        '[[sources.scrape]]\nname = "a"\nurl = "http://h/n"\n': "unique",
        '[[sources.scrape]]\nname = "a"\nurl = "http://h/m"\nallow = ["("]\n': "sources.scrape[0]",
        "site = 3\n": "site",
        "site = 'has space'\n": "site",
    }
    for text, expected in cases.items():
        cfg.write_text(text)
        with pytest.raises(ConfigError) as err:
            load_agent_config(cfg)
        assert expected in str(err.value), (text, str(err.value))


def test_cli_config_error_is_one_line_and_exit_2(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text("[uplink]\nurll = 'http://x'\n")
    r = subprocess.run([sys.executable, "-m", "agent", "check-config", "--config", str(cfg)],
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "uplink.urll" in lines[0] and "uplink.url" in lines[0]
