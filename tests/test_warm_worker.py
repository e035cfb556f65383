"""The warm worker (fedtrain/warm_worker.py) on its own: each task in a fresh child, nothing a
task does reaches the worker or a later task, and a task that crashes or hangs is killed, reported,
and does not stop the tasks after it."""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import time
from pathlib import Path

import pytest

from fedtrain import warm_worker
from fedtrain.warm_worker import TaskChannel, WarmWorker

PRELOADED: dict[str, object] = {}  # what the worker "loaded" before any task; tasks may scribble on their copy


def _preload() -> None:
    PRELOADED.update({"weights": [1, 2, 3], "worker_pid": os.getpid()})


def _task(request: dict, channel: TaskChannel) -> int:
    out, kind = Path(str(request["out"])), str(request["kind"])
    if kind == "silent":  # dies before it has any input: nothing to reply to
        return 3
    channel.running(float(request.get("timeout", 30)), f"details of {request['name']}".encode())
    if kind == "crash":
        faulthandler.disable()  # pytest's, inherited: no traceback dump for a crash that is the point
        os.kill(os.getpid(), signal.SIGSEGV)
    if kind == "hang":
        time.sleep(3600)
    seen = {
        "pid": os.getpid(),
        "worker_pid": PRELOADED["worker_pid"],
        "weights": list(PRELOADED["weights"]),  # type: ignore[call-overload]
        "requests_closed": worker_under_test.requests is not None and worker_under_test.requests.closed,
    }
    PRELOADED["weights"] = ["changed by " + str(request["name"])]  # a task's own copy: nobody else sees it
    (out / f"{request['name']}.json").write_text(json.dumps(seen))
    channel.learned([request["name"]])
    channel.finished()
    return 0


def _failure(request: dict, details: bytes, why: str) -> None:
    with open(Path(str(request["out"])) / "failures.jsonl", "a") as f:
        f.write(json.dumps({"name": request["name"], "details": details.decode(), "why": why}) + "\n")


def _learn(items: list) -> None:
    PRELOADED.setdefault("learned", []).extend(items)  # type: ignore[attr-defined]


worker_under_test = WarmWorker(_task, _failure, _learn, start_timeout=2.0)


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _failures(out: Path) -> dict[str, dict]:
    path = out / "failures.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return {entry["name"]: entry for entry in map(json.loads, lines)}


@pytest.fixture
def worker():
    handle = warm_worker.start(worker_under_test, _preload)
    try:
        yield handle
    finally:
        handle.stop()
    assert not handle.alive


# Measured 4-5 s on a quiet machine (the hung task's 1 s and the silent one's 2 s start timeout are waited out).
@pytest.mark.timeout(60)
def test_tasks_run_in_fresh_children_and_failures_are_contained(worker, tmp_path: Path) -> None:
    def submit(name: str, kind: str, **extra: object) -> None:
        assert worker.submit({"name": name, "kind": kind, "out": str(tmp_path), **extra})

    submit("first", "ok")
    _wait_for(lambda: (tmp_path / "first.json").exists(), 20, "the first task")
    submit("crash", "crash")
    submit("hang", "hang", timeout=1.0)
    submit("silent", "silent")
    submit("second", "ok")  # runs beside the failing ones: they hold up nothing
    _wait_for(lambda: (tmp_path / "second.json").exists(), 20, "the second task")
    _wait_for(lambda: {"crash", "hang"} <= set(_failures(tmp_path)), 20, "the failures to be reported")
    started = time.monotonic()
    submit("third", "ok")  # after the failures, the worker goes on
    _wait_for(lambda: (tmp_path / "third.json").exists(), 20, "the third task")
    assert time.monotonic() - started < 5, "a task after failures waited for something"

    failures = _failures(tmp_path)
    assert set(failures) == {"crash", "hang"}  # the silent task had no message: nothing to reply to
    assert "SIGSEGV" in failures["crash"]["why"] and failures["crash"]["details"] == "details of crash"
    assert "past its time" in failures["hang"]["why"] and failures["hang"]["details"] == "details of hang"

    seen = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in ("first", "second", "third")}
    assert len({s["pid"] for s in seen.values()} | {worker.pid}) == 4  # a fresh process for each task
    for s in seen.values():
        assert s["worker_pid"] == worker.pid  # forked from the worker, after its preload
        assert s["weights"] == [1, 2, 3]  # what an earlier task changed stayed in that task's process
        assert s["requests_closed"]  # a task cannot read the requests (tokens) meant for later tasks
    assert worker.alive


@pytest.mark.timeout(60)
def test_the_worker_stops_its_tasks_when_its_parent_closes_the_requests(worker, tmp_path: Path) -> None:
    assert worker.submit({"name": "long", "kind": "hang", "out": str(tmp_path), "timeout": 600})
    time.sleep(0.5)
    children = [int(p) for p in Path(f"/proc/{worker.pid}/task/{worker.pid}/children").read_text().split()]
    assert len(children) == 1
    worker.stop()
    _wait_for(lambda: not Path(f"/proc/{children[0]}").exists() or "Z" in _state(children[0]), 20, "the task to end")


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


# Measured under 1 s on a quiet machine.
@pytest.mark.timeout(60)
def test_the_worker_says_when_it_has_preloaded_and_when_it_cannot() -> None:
    loaded = warm_worker.start(worker_under_test, _preload)
    try:
        assert loaded.wait_ready(30)
    finally:
        loaded.stop()

    def broken() -> None:
        raise RuntimeError("a shard that cannot be read")

    failed = warm_worker.start(worker_under_test, broken)
    try:
        started = time.monotonic()
        assert not failed.wait_ready(30)
        assert time.monotonic() - started < 20  # told by the worker's exit, not by the timeout
    finally:
        failed.stop()
