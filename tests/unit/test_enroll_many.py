"""`waystation-collector enroll --from FILE`: a fleet enrolled in one transaction, from the
lines `waystation-agent keygen` printed on each node or `SITE NODE KEY`; a bad file names
every bad line and enrolls nothing."""

from __future__ import annotations

import base64
import shlex
from pathlib import Path

import pytest
from nacl.signing import SigningKey

from agent.keys import enroll_command
from collector import ledger, trust
from collector.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, main


def key_text(key: SigningKey) -> str:
    return base64.b64encode(bytes(key.verify_key)).decode()


def enrolled(data_dir: Path) -> dict[tuple[str, str], bytes]:
    conn = ledger.connect(data_dir / "ledger.db")
    try:
        return {(r.site, r.node): r.public_key for r in trust.all_keys(conn) if r.state == "enrolled"}
    finally:
        conn.close()


def test_a_fleet_file_enrolls_every_node_at_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = {(f"site-{i % 7}", f"node-{i}"): SigningKey.generate() for i in range(1500)}
    lines = ["# collected from the nodes' keygen output", ""]
    for i, ((site, node), key) in enumerate(keys.items()):
        if i % 3 == 0:
            lines.append(enroll_command(site, node, key))  # as the node printed it
        elif i % 3 == 1:
            lines.append(f"{site}\t{node}  {key_text(key)}   # trailing comment")
        else:  # options in another order, with --config and = forms
            lines.append(f"waystation-collector enroll --config /etc/waystation/collector.toml "
                         f"--key={key_text(key)} --node {node} --site={site}")
    odd = SigningKey.generate()
    lines.append(f"waystation-collector enroll --site s --node {shlex.quote('rack 4 {gpu}')} --key {key_text(odd)}")
    keys[("s", "rack 4 {gpu}")] = odd
    for site, node in (("s", "it's #2"), ("enroll", "enroll")):  # keygen quotes; a name may be 'enroll'
        keys[(site, node)] = SigningKey.generate()
        lines.append(enroll_command(site, node, keys[(site, node)]))
    keys[("s2", "enroll")] = SigningKey.generate()
    lines.append(f"s2 enroll {key_text(keys[('s2', 'enroll')])}")
    lines.append(f"waystation-collector --verbose enroll --debug --site s3 --node n --key "
                 f"{key_text(keys.setdefault(('s3', 'n'), SigningKey.generate()))}")
    fleet = tmp_path / "fleet.txt"
    fleet.write_text("\n".join(lines) + "\n")
    data = tmp_path / "c"
    assert main(["enroll", "--data-dir", str(data), "--from", str(fleet)]) == EXIT_OK
    assert f"enrolled {len(keys)} node keys from {fleet}" in capsys.readouterr().out
    assert enrolled(data) == {k: bytes(v.verify_key) for k, v in keys.items()}
    # Again: re-enrolling the same keys changes nothing and is not an error.
    assert main(["enroll", "--data-dir", str(data), "--from", str(fleet)]) == EXIT_OK
    assert len(enrolled(data)) == len(keys)


def test_a_bad_file_names_every_bad_line_and_enrolls_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = [f"s n{i} {key_text(SigningKey.generate())}" for i in range(3)]
    fleet = tmp_path / "fleet.txt"
    fleet.write_text("\n".join([good[0], "s n9 notbase64!!", good[1], "s only-two-words",
                                "waystation-collector enroll --site s --key " + key_text(SigningKey.generate()),
                                "s 'unterminated " + key_text(SigningKey.generate()), good[2]]) + "\n")
    data = tmp_path / "c"
    assert main(["enroll", "--data-dir", str(data), "--from", str(fleet)]) == EXIT_USAGE
    err = capsys.readouterr().err
    for number, what in ((2, "not base64"), (4, "2 words"), (5, "lacks --node"), (6, "quotation")):
        assert f"line {number}: " in err and what in err, (number, err)
    assert "line 1:" not in err and "line 3:" not in err and "line 7:" not in err
    assert not (data / "ledger.db").exists() or enrolled(data) == {}


def test_a_key_already_enrolled_for_another_node_enrolls_none_of_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "c"
    taken = SigningKey.generate()
    assert main(["enroll", "--data-dir", str(data), "--site", "s", "--node", "old", "--key", key_text(taken)]) == 0
    fleet = tmp_path / "fleet.txt"
    fleet.write_text(f"# two nodes\n\ns a {key_text(SigningKey.generate())}\ns b {key_text(taken)}\n")
    capsys.readouterr()
    assert main(["enroll", "--data-dir", str(data), "--from", str(fleet)]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert "already enrolled for s/old (line 4)" in err and "nothing was enrolled" in err
    assert enrolled(data) == {("s", "old"): bytes(taken.verify_key)}


@pytest.mark.parametrize("argv", [
    ["--from", "f.txt", "--site", "s"],
    ["--from", "f.txt", "--site", ""],
    ["--site", "s", "--node", "n"],
    [],
])
def test_enroll_takes_one_node_or_a_file(tmp_path: Path, argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["enroll", "--data-dir", str(tmp_path), *argv]) == EXIT_USAGE
    assert "give --site, --node and --key, or --from FILE" in capsys.readouterr().err
