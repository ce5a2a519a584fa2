"""The collector's own key pairs: keygen's files and line, its refusals, rotation, and every
reader of sealed batches getting the keys (serve, the rebuild, the forwarder child)."""

from __future__ import annotations

import base64
import hashlib
import json
import stat
from pathlib import Path

import pytest
from nacl.signing import SigningKey

import wire
from collector import keyring, remote_write
from collector.app import SEALING_KEY_FILES, SEALING_KEYS, create_app
from collector.cli import main
from collector.config import CollectorConfig, RemoteWriteConfig
from wire.keys import parse_collector_key

NODE = SigningKey(hashlib.sha256(b"collector keys test node").digest())


def keygen(data_dir: Path, capsys: pytest.CaptureFixture[str], *flags: str) -> tuple[int, str, str]:
    rc = main(["keygen", "--data-dir", str(data_dir), *flags])
    out = capsys.readouterr()
    return rc, out.out, out.err


def pinned(out: str) -> str:
    """The value of the collector_key line keygen printed, as an operator copies it."""
    (line,) = [ln.strip() for ln in out.splitlines() if ln.strip().startswith("collector_key = ")]
    value: str = line.split(" = ", 1)[1]
    assert value.startswith('"') and value.endswith('"')
    return value[1:-1]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def sealed_to(pin: wire.keys.CollectorKey, seq: int = 1) -> bytes:
    s = [wire.Series("node_load1", (), wire.MetricType.GAUGE, (1_700_000_000_000,), (0.5,))]
    prepared = wire.seal_prepared(wire.prepare_data(s, 3), pin)
    return wire.sign_batch(prepared, wire.BatchContext(NODE, "s1", "n1", seq, wire.ZERO_HASH, 1, 1))


class Node:
    public_key = bytes(NODE.verify_key)

    def refusal(self, site: str, node: str, seq: int) -> tuple[str, str] | None:
        return None


def opens(raw: bytes, keys: wire.SealingKeys) -> str:
    opened = wire.open_batch(raw, lambda _kid: Node(), sealing_keys=keys)
    return "opened" if isinstance(opened, wire.VerifiedBatch) else opened.result


def test_keygen_writes_one_private_file_and_prints_the_line_agents_pin(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, _ = keygen(tmp_path / "data", capsys)
    assert rc == 0
    path = tmp_path / "data" / "collector.key"
    assert mode(path) == 0o600 and mode(tmp_path / "data") == 0o700
    pair = keyring.current(tmp_path / "data")
    assert pair is not None
    pin = parse_collector_key(pinned(out))
    assert pin == pair.public and pair.key_id.hex() in out
    # The file holds the private halves; the printed line only public keys.
    doc = json.loads(path.read_text())
    for secret in (doc["signing_seed"], doc["sealing_private_key"]):
        assert secret not in out
    assert base64.b64decode(doc["signing_seed"]) == bytes(pair.signing)


def test_keygen_refuses_to_replace_a_pair_unless_forced(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keygen(tmp_path, capsys)
    before = (tmp_path / "collector.key").read_bytes()
    first = keyring.current(tmp_path)
    assert first is not None
    rc, out, err = keygen(tmp_path, capsys)
    assert rc == 1 and not out
    assert "already exists" in err and first.key_id.hex() in err and "--force" in err and "--rotate" in err
    assert (tmp_path / "collector.key").read_bytes() == before
    rc, out, _ = keygen(tmp_path, capsys, "--force")
    second = keyring.current(tmp_path)
    assert rc == 0 and second is not None and second.key_id != first.key_id
    assert f"replaced key pair {first.key_id.hex()}" in out and mode(tmp_path / "collector.key") == 0o600
    assert not (tmp_path / "collector-keys").exists()  # --force keeps nothing


def test_keygen_force_and_rotate_exclude_each_other(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["keygen", "--data-dir", str(tmp_path), "--force", "--rotate"])
    assert "not allowed with" in capsys.readouterr().err


def test_an_unreadable_key_file_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "collector.key").write_text("not a key\n")
    rc, _, err = keygen(tmp_path, capsys)
    assert rc == 1 and str(tmp_path / "collector.key") in err and "not a Waystation collector key" in err
    with pytest.raises(keyring.KeyringError, match="collector.key"):
        create_app(CollectorConfig(data_dir=str(tmp_path)))


def test_rotation_keeps_the_old_pair_and_old_batches_still_open(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, _, err = keygen(tmp_path, capsys, "--rotate")
    assert rc == 1 and "no collector key to rotate" in err
    _, out, _ = keygen(tmp_path, capsys)
    old_pin = parse_collector_key(pinned(out))
    old_batch = sealed_to(old_pin)
    rc, out, _ = keygen(tmp_path, capsys, "--rotate")
    new_pin = parse_collector_key(pinned(out))
    assert rc == 0 and new_pin.key_id != old_pin.key_id
    kept = tmp_path / "collector-keys" / f"{old_pin.key_id.hex()}.key"
    assert f"kept key pair {old_pin.key_id.hex()} in {kept}" in out
    assert mode(kept) == 0o600 and mode(kept.parent) == 0o700
    assert keyring.load_pair(kept).public == old_pin
    files = keyring.sealing_key_files(tmp_path)
    assert files == [tmp_path / "collector.key", kept]
    keys = keyring.load_sealing_keys(files)
    assert set(keys) == {old_pin.key_id, new_pin.key_id}
    assert opens(old_batch, keys) == "opened"
    assert opens(sealed_to(new_pin), keys) == "opened"
    # Without the kept file (deleted too early), the old batches are refused and say why.
    only_current = keyring.load_sealing_keys([tmp_path / "collector.key"])
    assert opens(old_batch, only_current) == "sealed_to_unknown_key"
    # A second rotation keeps both earlier pairs.
    keygen(tmp_path, capsys, "--rotate")
    assert len(keyring.load_sealing_keys(keyring.sealing_key_files(tmp_path))) == 3


def test_serve_loads_every_kept_key_and_a_collector_without_keys_still_serves(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bare = create_app(CollectorConfig(data_dir=str(tmp_path / "bare")))
    assert bare[SEALING_KEYS] == {} and bare[SEALING_KEY_FILES] == []
    keygen(tmp_path, capsys)
    keygen(tmp_path, capsys, "--rotate")
    app = create_app(CollectorConfig(data_dir=str(tmp_path)))
    assert set(app[SEALING_KEYS]) == set(keyring.load_sealing_keys(keyring.sealing_key_files(tmp_path)))
    assert len(app[SEALING_KEYS]) == 2


def test_the_forwarder_child_gets_key_file_paths_never_key_bytes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keygen(tmp_path, capsys)
    files = keyring.sealing_key_files(tmp_path)
    line = remote_write.child_config(
        tmp_path / "ledger.db", [RemoteWriteConfig(name="rx", url="http://127.0.0.1:1/w")],
        wire.DEFAULT_OPEN_LIMITS, "info", key_files=files,
    )
    obj = json.loads(line)
    assert obj["key_files"] == [str(tmp_path / "collector.key")]
    doc = json.loads((tmp_path / "collector.key").read_text())
    assert doc["sealing_private_key"].encode() not in line and doc["signing_seed"].encode() not in line
    # What the child loads from those paths; a file deleted meanwhile is skipped, not fatal.
    gone = tmp_path / "collector-keys" / "0000000000000000.key"
    loaded = keyring.load_sealing_keys([Path(p) for p in obj["key_files"]] + [gone], missing_ok=True)
    assert set(loaded) == set(keyring.load_sealing_keys(files))
