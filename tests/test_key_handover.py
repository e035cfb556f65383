"""Decrypted keys reach Flower's processes through memory, and secrets stay out of their environment."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest

from fedtrain.processes import flower_env
from fedtrain.security import key_handover
from fedtrain.security.key_handover import hand_over, memory_files_available, sweep_stale

READ = "import sys; from pathlib import Path; sys.stdout.buffer.write(Path(sys.argv[1]).read_bytes())"


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """The system temp directory, for these tests a folder of their own."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


@pytest.mark.skipif(not memory_files_available(), reason="memfd is Linux-only")
def test_a_child_reads_the_key_from_memory_and_nothing_is_on_disk(private_tmp) -> None:
    secret = b"-----BEGIN OPENSSH PRIVATE KEY-----\nnot really\n"
    with hand_over(secret, "node", "node.key") as handed:
        assert str(handed.path).startswith("/proc/self/fd/") and handed.pass_fds
        child = subprocess.run([sys.executable, "-c", READ, str(handed.path)], pass_fds=handed.pass_fds,
                               capture_output=True, timeout=60)  # fmt: skip
        assert child.returncode == 0 and child.stdout == secret
        stranger = subprocess.run([sys.executable, "-c", READ, str(handed.path)], capture_output=True, timeout=60)
        assert stranger.returncode != 0  # a child not given the descriptor cannot open it
        assert handed.path.read_bytes() == secret  # the same path works in this process (the Fleet gateway)
        assert list(private_tmp.iterdir()) == []
    assert handed.pass_fds == ()  # closed: the memory file is gone with its last descriptor
    assert not handed.path.exists() or "memfd:fedtrain" not in os.readlink(handed.path)


def test_without_memory_files_a_crashed_owners_folder_is_removed_at_the_next_start(private_tmp, monkeypatch) -> None:
    monkeypatch.setattr(key_handover, "memory_files_available", lambda: False)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=60)
    left_behind = private_tmp / f"fedtrain-node-{dead.pid}-x1"  # what a SIGKILLed client left
    left_behind.mkdir(mode=0o700)
    (left_behind / "node.key").write_bytes(b"decrypted")
    alive = private_tmp / f"fedtrain-node-{os.getppid()}-x2"  # a running client's: not touched
    alive.mkdir(mode=0o700)
    with hand_over(b"decrypted", "node", "node.key") as handed:
        assert not left_behind.exists() and alive.exists()
        assert handed.path.read_bytes() == b"decrypted" and handed.pass_fds == ()
        assert handed.path.parent.name.startswith(f"fedtrain-node-{os.getpid()}-")
        assert oct(handed.path.parent.stat().st_mode & 0o777) == "0o700"
        assert oct(handed.path.stat().st_mode & 0o777) == "0o600"
    assert not handed.path.parent.exists()
    assert sweep_stale("node") == []


def test_flower_processes_never_see_the_passphrase_or_the_model_key(monkeypatch) -> None:
    monkeypatch.setenv("KIT_PASS", "correct horse")
    monkeypatch.setenv("FEDTRAIN_MODEL_KEY", "fedtrain-aes256gcm:...")
    monkeypatch.setenv("FEDTRAIN_HOME", "/somewhere")
    env = flower_env(None, hide=("KIT_PASS",))
    assert "KIT_PASS" not in env and "FEDTRAIN_MODEL_KEY" not in env
    assert env["FEDTRAIN_HOME"] == "/somewhere" and env["FLWR_TELEMETRY_ENABLED"] == "0"
