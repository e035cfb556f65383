"""End-to-end simulations on Flower's Simulation Engine with tiny models, checked on real outcomes:
accuracy bands, epsilon recomputed independently, refusals, and ciphertext-only files on disk."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from tests.conftest import run_cli, run_cli_process
from tests.sockets import session_members

pytestmark = pytest.mark.e2e

ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))


def independent_epsilon(ledger: list[dict], delta: float) -> float:
    """Opacus's RDP analysis functions over the whole ledger, summed by hand (no fedtrain code)."""
    rdp = sum(
        compute_rdp(q=e["sample_rate"], noise_multiplier=e["noise_multiplier"], steps=e["steps"], orders=ORDERS)
        for e in ledger
    )
    eps, _ = get_privacy_spent(orders=ORDERS, rdp=rdp, delta=delta)
    return float(eps)


def _load(run_dir: Path) -> tuple[list[dict], dict]:
    return json.loads((run_dir / "metrics.json").read_text()), json.loads((run_dir / "privacy.json").read_text())


def _export(run_dir: Path, capsys) -> dict[str, torch.Tensor]:
    out = run_dir.parent / "exported.pt"
    code, _, err = run_cli(["export", str(run_dir), "--out", str(out)], capsys)
    assert code == 0, err
    return torch.load(out, weights_only=True)


def _sigkill_after_first_checkpoint(args: list[str], run_dir: Path) -> None:
    """Run `fedtrain simulate` in its own session and SIGKILL all of it (Ray included) as soon as a
    round's checkpoint is on disk: a crash, with nothing to clean up or finish writing.

    Only this child's session is killed and only its Ray directory removed: another test running beside
    this one (pytest-xdist) has Ray processes and an ftray- directory of its own, and killing those
    takes its run, or the test worker that drives an in-process Ray, down with it."""
    child = subprocess.Popen([str(Path(sys.executable).with_name("fedtrain")), *args], start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 360
        while not (run_dir / "checkpoint.ftenc").exists():
            assert child.poll() is None, "the run ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 360 s"
            time.sleep(0.2)
    finally:
        ray_dirs: set[Path] = set()
        for _ in range(3):  # again, for anything the session started while it was being killed
            members = session_members(child.pid)  # Ray's daemons leave the process group, not the session
            ray_dirs |= {found for pid in members for found in _ray_dirs(pid)}
            for pid in members:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)
        child.wait(timeout=30)
        for ray_dir in ray_dirs:
            shutil.rmtree(ray_dir, ignore_errors=True)


def _ray_dirs(pid: int) -> set[Path]:
    """The ftray- directories (fedtrain's Ray temp dirs) a process names in its arguments."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return set()
    return {Path(found) for found in re.findall(r"/tmp/ftray-[^/\s=,;:'\"\x00]+", raw)}


@pytest.mark.own_process  # starts Ray in-process (tests/conftest.py)
def test_budget_refusal_ledger_and_ciphertext_only_on_disk_across_a_crash(tmp_path, capsys) -> None:
    """Fixed sigma 1.0 and max_epsilon 5.5: each client can afford a few rounds of the 4, then refuses;
    the run still completes every round. The refusal is checked against an independent accountant.
    The simulation is SIGKILLed after its first checkpoint and resumed (`--resume`): its clients'
    ledgers come back from their own files, so they refuse exactly when an unbroken run would."""
    run_dir = tmp_path / "run"
    budget = 5.5
    args = ["simulate", "--run-dir", str(run_dir), "--clients", "3", "--rounds", "4", "--model", "logistic"]
    args += ["--noise-multiplier", "1.0", "--max-epsilon", str(budget), "--batch-size", "64", "--lr", "1.0"]
    args += ["--accountant", "rdp"]
    _sigkill_after_first_checkpoint(args, run_dir)
    code, out, err = run_cli(["simulate", "--resume", str(run_dir)], capsys)
    assert code == 0, err + out
    assert "resuming after round" in " ".join(out.split())
    rows, privacy = _load(run_dir)

    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    assert set(privacy["clients"]) == {"client-0", "client-1", "client-2"}
    trained = {sum(e["kind"] == "train" for e in c["ledger"]) for c in privacy["clients"].values()}
    assert len(trained) == 1  # equal shards, equal budgets
    k = trained.pop()
    assert 1 <= k < 4
    assert [r["clients_ok"] for r in rows] == [3] * k + [0] * (4 - k)
    assert [r["clients_refused"] for r in rows] == [0] * k + [3] * (4 - k)
    assert all(f"over the budget of {budget:g}" in why for why in rows[k]["refused"].values())
    assert rows[-1]["accuracy"] == rows[k - 1]["accuracy"]  # no update -> the model did not move

    for client in privacy["clients"].values():
        assert client["delta"] == 1e-5
        reference = independent_epsilon(client["ledger"], client["delta"])
        assert client["epsilon"] == pytest.approx(reference, rel=0.01)
        assert client["epsilon"] <= budget
        last_round = [e for e in client["ledger"] if e["kind"] == "train"][-1:] + client["ledger"][-1:]
        assert independent_epsilon(client["ledger"] + last_round, client["delta"]) > budget  # it was needed
    assert rows[-1]["epsilon_max"] == pytest.approx(max(c["epsilon"] for c in privacy["clients"].values()))

    # No file the run wrote holds the final weights in plaintext (nor a tell-tale slice of them).
    weights = _export(run_dir, capsys)
    needles = [t.numpy().astype(np.float32).tobytes() for t in weights.values()]
    needles += [n[:32] for n in needles if len(n) > 32]
    for path in run_dir.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not any(n in data for n in needles), f"plaintext weights found in {path.name}"
    assert (run_dir / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run_dir / "metrics.csv").read_text().startswith("round,accuracy,loss")

    # The real encrypted model, one flipped byte: a clear error, not a crash.
    model = run_dir / "model.ftenc"
    data = bytearray(model.read_bytes())
    data[40] ^= 0x01
    model.write_bytes(bytes(data))
    code, _, err = run_cli(["export", str(run_dir), "--out", str(tmp_path / "x.pt")], capsys)
    assert code == 2 and "failed authentication" in err and "Traceback" not in err


def _band_run(tmp_path: Path, name: str, **privacy) -> float:
    """8 rounds of the demo's 5 digits clients, fedtrain's real ClientApp and server loop in this
    process (what the band is about does not depend on Ray; the Ray runs are the other tests here)."""
    from fedtrain.config import Config
    from fedtrain.security.keys import generate_key, write_key_file
    from tests.inprocess import run_federation

    key = write_key_file(tmp_path / f"{name}.key", generate_key())
    config = Config(rounds=8, accountant="rdp", run_dir=str(tmp_path / name), key_file=str(key), **privacy)
    rows = run_federation(config)
    assert len(rows) == 8 and all(r["clients_ok"] == 5 for r in rows)
    return rows[-1]["accuracy"]


def test_accuracy_band_under_strong_privacy(tmp_path) -> None:
    """Digits, 5 clients, 8 rounds at epsilon 0.5: nine runs here gave 0.62-0.74 (chance is 0.10).
    The band fails both "no learning" and "noise silently off": the same run without noise gave
    0.89-0.91."""
    accuracy = _band_run(tmp_path, "private", target_epsilon=0.5)
    assert 0.35 <= accuracy <= 0.80


def test_the_band_has_teeth_without_noise(tmp_path) -> None:
    """Control for the band above: the same training with (almost) no noise lands above its top."""
    accuracy = _band_run(tmp_path, "no-noise", target_epsilon=None, noise_multiplier=0.001)
    assert accuracy > 0.85


def test_demo_defaults_reach_the_promised_accuracy_and_privacy(tmp_path) -> None:
    """`make demo` is `fedtrain simulate --config examples/demo.toml`: digits, 5 clients, epsilon <= 3 at
    delta 1e-5, the demo's own fixed settings (batch 100, lr 1.0, 2 local epochs, clipping 1: without
    them each client chooses them by rule, which costs the demo about a point, docs/privacy.md).
    Its epsilon must match an independent Opacus accountant for the same ledger within 1%.

    Its metrics are private (the Gaussian mechanism, 5% of the budget): every round's train loss and
    evaluation are on the ledger beside its DP-SGD round.

    Accuracy varies with the DP noise from run to run: 12 runs with private metrics averaged 0.929
    (0.911-0.956, none below the 0.90 issue #2 promises; before private metrics, 48 runs averaged 0.927,
    0.894-0.956, one below; benchmarks/demo_accuracy.py, docs/privacy.md). The bound below accepts 160
    of the 180 test digits (0.889), which noise alone misses a few times in a thousand. Noise switched
    off is caught by the accuracy-band test and its no-noise control above."""
    from opacus.accountants import PRVAccountant

    demo = Path(__file__).resolve().parents[1] / "examples" / "demo.toml"
    result = run_cli_process(["simulate", "--config", str(demo)], timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    rows, privacy = _load(run_dir)
    assert len(rows) == 30 and rows[-1]["clients_ok"] == 5
    assert rows[-1]["accuracy"] >= 0.885  # 160 of the 180 test digits
    assert len(privacy["clients"]) == 5
    for cid, client in privacy["clients"].items():
        assert client["accountant"] == "prv" and client["delta"] == 1e-5
        kinds = [e["kind"] for e in client["ledger"]]
        assert kinds.count("train") == 30 and kinds.count("metrics") == 60  # a loss and an evaluation a round
        reference = PRVAccountant()
        reference.history = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in client["ledger"]]
        assert client["epsilon"] == pytest.approx(reference.get_epsilon(delta=1e-5), rel=0.01)
        assert client["epsilon"] <= 3.0
        assert f"{cid}: epsilon {client['epsilon']:.3f}" in result.stdout  # what it printed is what it logged
    assert f"final accuracy {rows[-1]['accuracy']:.4f}" in result.stdout


FRAGILE_MODEL = '''
import torch.nn as nn


class Fragile(nn.Module):
    """Fine for evaluation, raises whenever it trains (as a buggy user model would)."""

    def __init__(self, input_shape, num_classes):
        super().__init__()
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x):
        if self.training and x.shape[0] > 2:
            raise RuntimeError("boom inside training")
        return self.linear(x.flatten(1))


def fragile(input_shape, num_classes):
    return Fragile(input_shape, num_classes)
'''


def test_clients_failing_inside_training_stop_the_run_clearly(tmp_path, capsys, monkeypatch) -> None:
    (tmp_path / "fragile_model.py").write_text(FRAGILE_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))  # Flower passes sys.path on to the Ray workers
    run_dir = tmp_path / "run"
    code, _, err = run_cli(
        ["simulate", "--run-dir", str(run_dir), "--rounds", "3", "--model", "fragile_model:fragile"], capsys
    )
    assert code == 2 and "Traceback" not in err
    assert "round 1: 0 usable updates, fewer than min_fit_clients = 1 (5 failed" in " ".join(err.split())
    rows, _ = _load(run_dir)
    assert len(rows) == 1 and rows[0]["clients_failed"] == 5 and rows[0]["clients_ok"] == 0
    # the clients' exception text stays with them: the server learns a category
    assert all(reason == "client error (internal error)" for reason in rows[0]["failed"].values())
    assert "boom inside training" not in (run_dir / "metrics.json").read_text()
    assert (run_dir / "checkpoint.ftenc").exists() and not (run_dir / "model.ftenc").exists()


def test_payload_encryption_puts_only_ciphertext_on_the_wire(tmp_path, capsys, monkeypatch) -> None:
    """Every message between ServerApp and ClientApps is one AES-GCM envelope; a relay that flips a
    byte of one reply gets that reply rejected while the round goes on with the others."""
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    from fedtrain.config import Config
    from fedtrain.models import build_model
    from fedtrain.security.payload import HEADER, SEALED

    wire: list[bytes] = []
    tampered: list[str] = []
    push, pull = InMemoryGrid.push_messages, InMemoryGrid.pull_messages

    def relay_down(self, messages):  # every message the ServerApp hands the SuperLink
        messages = list(messages)
        for msg in messages:
            wire.extend(_payload_bytes(msg.content))
            assert set(msg.content.array_records) == {SEALED} and set(msg.content.config_records) == {HEADER}
        return push(self, messages)

    def relay_up(self, message_ids):  # every reply on its way back
        replies = list(pull(self, message_ids))
        for reply in replies:
            if reply.has_error():
                continue
            assert set(reply.content.array_records) == {SEALED}
            if not tampered and reply.metadata.message_type == "train":  # round 1: tamper with one reply
                chunks = reply.content.array_records[SEALED]
                last = str(len(chunks) - 1)
                changed = chunks[last].numpy().copy()
                changed[-3] ^= 1
                chunks[last] = type(chunks[last])(changed)
                tampered.append(reply.metadata.reply_to_message_id)
            wire.extend(_payload_bytes(reply.content))
        return replies

    monkeypatch.setattr(InMemoryGrid, "push_messages", relay_down)
    monkeypatch.setattr(InMemoryGrid, "pull_messages", relay_up)
    run_dir = tmp_path / "run"
    args = ["simulate", "--run-dir", str(run_dir), "--clients", "3", "--rounds", "3", "--payload-encryption"]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err + out
    rows, privacy = _load(run_dir)
    assert rows[0]["clients_ok"] == 2 and rows[0]["clients_failed"] == 1
    (reason,) = rows[0]["failed"].values()
    assert "reply rejected" in reason and "failed authentication" in reason
    assert [r["clients_ok"] for r in rows[1:]] == [3, 3]
    assert len(privacy["clients"]) == 3 and rows[-1]["accuracy"] > 0.5

    # The initial global model (seeded) never crossed the wire in plaintext, nor did the final one.
    config = Config(model="logistic")
    initial = build_model(config.training.model, [1, 8, 8], 10, seed=config.federation.seed).state_dict()
    final = _export(run_dir, capsys)
    needles = [t.numpy().astype(np.float32).tobytes()[:32] for t in [*initial.values(), *final.values()]]
    # 3 rounds x 3 clients x (train, reply; rounds 2 and 3 also evaluate the model they get), and the last
    # model's evaluate and reply per client
    assert len(wire) >= 3 * 3 * 2 + 3 * 2
    for payload in wire:
        assert payload[:3] == b"FTE"
        assert not any(n in payload for n in needles)


def _payload_bytes(content) -> list[bytes]:
    """Each chunk's envelope of a sealed message."""
    from fedtrain.security.payload import SEALED

    return [chunk.numpy().tobytes() for chunk in content.array_records[SEALED].values()]
