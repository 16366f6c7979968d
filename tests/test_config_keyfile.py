"""The auth key file as `lbha config check` and the heartbeat daemon read it (lbha.keyfile)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from cli_process import LBHA

from lbha.config import load_config_text
from lbha.errors import ConfigError
from lbha.heartbeat.errors import KeyFileError as HeartbeatKeyFileError
from lbha.heartbeat.protocol import load_key_file
from lbha.keyfile import KeyFileError, read_key_file

KEY = "1 " + "k" * 32 + "\n"

CONFIG = """\
[cluster]
node = "lb1"
role = "master"
auth_key_file = "{key}"
[[cluster.peers]]
name = "lb2"
addresses = ["198.18.0.2"]
"""


def write(path: Path, text: str = KEY, mode: int = 0o600) -> Path:
    path.write_text(text)
    os.chmod(path, mode)
    return path


def check(tmp_path: Path, key: Path) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "lbha.toml"
    config.write_text(CONFIG.format(key=key))
    return subprocess.run([*LBHA, "config", "check", str(config)],
                          capture_output=True, text=True, timeout=60, check=False)


def problems(key: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config_text(CONFIG.format(key=key), "lbha.toml", files=True)
    return [str(p) for p in info.value.problems]


def test_config_check_accepts_a_good_key_file(tmp_path: Path) -> None:
    out = check(tmp_path, write(tmp_path / "authkey"))
    assert out.returncode == 0, out.stderr


def test_config_check_refuses_a_missing_key_file_and_says_how_to_make_one(tmp_path: Path) -> None:
    key = tmp_path / "authkey"
    out = check(tmp_path, key)
    assert out.returncode == 1
    assert f"lbha.toml:4: cluster.auth_key_file: cannot open auth key file {key}" in out.stderr
    assert "openssl rand -hex 32" in out.stderr


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_config_check_refuses_a_key_file_others_can_read(tmp_path: Path, mode: int) -> None:
    key = write(tmp_path / "authkey", mode=mode)
    out = check(tmp_path, key)
    assert out.returncode == 1
    assert f"has mode {mode:04o}" in out.stderr
    assert f"chmod 600 {key}" in out.stderr


@pytest.mark.parametrize(
    ("text", "expected"),
    [("", "no key found"), ("1 short\n", "shorter than 16 characters"),
     ("one " + "k" * 20 + "\n", "expected `ID KEY`")],
)
def test_an_unparsable_key_file_is_a_config_problem(tmp_path: Path, text: str,
                                                    expected: str) -> None:
    found = problems(write(tmp_path / "authkey", text))
    assert len(found) == 1
    assert found[0].startswith("lbha.toml:4: cluster.auth_key_file: ")
    assert expected in found[0]


def test_the_key_file_is_not_read_unless_asked(tmp_path: Path) -> None:
    config = load_config_text(CONFIG.format(key=tmp_path / "missing"))
    assert config.cluster is not None


def test_a_symlinked_key_file_works_for_both_readers(tmp_path: Path) -> None:
    target = write(tmp_path / "real-authkey")
    link = tmp_path / "authkey"
    link.symlink_to(target)
    second = tmp_path / "authkey2"
    second.symlink_to(link)  # a chain of links
    assert read_key_file(second) == ({1: b"k" * 32}, 1)
    assert load_key_file(link).send_id == 1
    assert check(tmp_path, link).returncode == 0


def test_a_symlink_to_a_readable_file_is_judged_by_its_target(tmp_path: Path) -> None:
    target = write(tmp_path / "real-authkey", mode=0o644)
    link = tmp_path / "authkey"
    link.symlink_to(target)
    with pytest.raises(KeyFileError, match=rf"{link} \(-> {target}\) has mode 0644.*"
                                           rf"chmod 600 {target}"):
        read_key_file(link)
    with pytest.raises(HeartbeatKeyFileError, match="has mode 0644"):
        load_key_file(link)


def test_a_dangling_or_looping_symlink_is_refused(tmp_path: Path) -> None:
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(KeyFileError, match="cannot open auth key file"):
        read_key_file(dangling)
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(KeyFileError, match="cannot open auth key file"):
        read_key_file(loop)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_a_key_file_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    key = write(tmp_path / "authkey")
    os.chown(key, 4321, -1)
    with pytest.raises(KeyFileError, match="owned by uid 4321"):
        read_key_file(key)


def test_a_fifo_or_device_is_not_a_key_file(tmp_path: Path) -> None:
    fifo = tmp_path / "authkey"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(KeyFileError, match="not a regular file"):
        read_key_file(fifo)  # opened without blocking on the absent writer
    link = tmp_path / "zero"
    link.symlink_to("/dev/zero")
    with pytest.raises(KeyFileError):
        read_key_file(link)
