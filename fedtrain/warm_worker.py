"""A warm worker: one process that has imported and loaded everything a task needs, and runs each
task in a child forked from it.

A Flower SuperExec starts a new Python process for every message a client gets; importing torch,
Opacus and Flower takes seconds of CPU before any work starts, every round. The warm worker pays
that once, when `fedtrain client` starts. Each task then runs in a fresh child forked from it
(copy-on-write, milliseconds), so tasks stay as isolated as separate processes: a task sees the
worker's memory as it was before any task ran, anything it changes is its own copy and dies with it,
and the worker itself never runs task code. The worker keeps a single thread (forking a process
with threads can leave a lock held forever in the child), and neither opens a connection nor
parses what a task reports: it only forks, watches and reaps.

Supervision, so that one bad task cannot hold up the next round: a task reports (`TaskChannel`)
when it has its input and how long it may run; a task that outlives that (or never reports within
`start_timeout`) is killed, and a task that ends without finishing (killed, a signal, a crash in
native code) is handed to `on_failure`, which runs in a child of its own (it tells Flower's runtime:
an error reply, so the server need not wait for a heartbeat to expire).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, Pipe, wait
from typing import Any

from fedtrain.processes import die_with_parent

log = logging.getLogger("fedtrain")

START_TIMEOUT = 120.0  # seconds for a task to get its input and report; then it counts as hung
HELPER_TIMEOUT = 60.0  # seconds for `on_failure`'s child to tell Flower
POLL = 0.5  # seconds between checks of deadlines while nothing arrives
READY = b"ready"  # what the worker says once it has preloaded

Request = dict[str, object]  # what the SuperExec asks for: one task (JSON: token, Runtime API address...)
RunTask = Callable[[Request, "TaskChannel"], int]  # runs in the task's child; its exit status
OnFailure = Callable[[Request, bytes, str], None]  # runs in a helper child: (request, what the task reported, why)
Learn = Callable[[list], None]  # runs in the worker after a task: what the task found worth keeping warm


class TaskChannel:
    """A task's line to its worker: `running` once it has its input, `finished` when it is done."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def running(self, timeout: float, details: bytes) -> None:
        """The task has its input and may run `timeout` more seconds; `details` go to `on_failure` if it
        never finishes."""
        self._send({"running": float(timeout)}, details)

    def finished(self) -> None:
        self._send({"finished": True}, b"")

    def learned(self, items: list) -> None:
        """What the worker should load for later tasks (JSON values; `learn` gets them after this task)."""
        if items:
            self._send({"learned": items}, b"")

    def _send(self, header: dict[str, object], payload: bytes) -> None:
        with contextlib.suppress(OSError):  # the worker is gone: the task is on its own
            self._conn.send_bytes(json.dumps(header).encode())
            self._conn.send_bytes(payload)


@dataclass
class _Task:
    request: Request
    conn: Connection  # the worker's end of the task's channel
    deadline: float
    details: bytes = b""
    running: bool = False
    finished: bool = False
    killed: str = ""  # why the worker killed it, if it did
    learned: list = field(default_factory=list)


@dataclass
class WarmWorker:
    """Forks a child per request and supervises it (see the module docstring).

    Args:
        run_task: what a task's child runs, with the request and its channel; returns its exit status.
        on_failure: what a helper child runs for a task that reported its input and never finished.
        learn: what the worker itself runs after a task, with what the task reported it learned
            (e.g. a shard it had to read): the worker keeps it for the tasks forked after. It must
            start no thread.
        start_timeout: seconds a task may take to report `running`.
    """

    run_task: RunTask
    on_failure: OnFailure
    learn: Learn | None = None
    start_timeout: float = START_TIMEOUT
    tasks: dict[int, _Task] = field(default_factory=dict)
    helpers: dict[int, float] = field(default_factory=dict)  # pid -> deadline
    requests: Connection | None = None

    def serve(self, requests: Connection) -> None:
        """Run tasks as `requests` asks (one JSON object per message) until it closes; then stop every child."""
        self.requests = requests
        try:
            while True:
                channels = {task.conn: task for task in self.tasks.values() if not task.conn.closed}
                for ready in wait([requests, *channels], timeout=POLL):
                    if ready is requests:
                        try:
                            data = requests.recv_bytes()
                        except (EOFError, OSError):
                            return
                        self._start(json.loads(data))
                    else:
                        self._read(channels[ready])  # type: ignore[index]
                self._reap()
                self._enforce_deadlines()
        finally:
            self._stop_all()

    # ---------------------------------------------------------------- children

    def _start(self, request: Request) -> None:
        ours, theirs = Pipe(duplex=False)
        pid = os.fork()
        if pid == 0:  # the task's child: never returns into the worker's loop
            ours.close()
            _child(lambda: self.run_task(request, TaskChannel(theirs)), self._inherited())
        theirs.close()
        self.tasks[pid] = _Task(request, ours, time.monotonic() + self.start_timeout)
        log.debug("task %s started in process %d", request.get("task_id"), pid)

    @staticmethod
    def _read(task: _Task) -> None:
        """One report of `task` (two frames: a JSON header, then the details)."""
        try:
            header = json.loads(task.conn.recv_bytes())
            payload = task.conn.recv_bytes()
        except (EOFError, OSError, ValueError):
            task.conn.close()  # the task closed its end (it exited): its exit status tells the rest
            return
        if "running" in header:
            task.running, task.details = True, payload
            task.deadline = time.monotonic() + float(header["running"])
        if header.get("finished"):
            task.finished = True
        if isinstance(header.get("learned"), list):
            task.learned.extend(header["learned"])

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.helpers.pop(pid, None)
            task = self.tasks.pop(pid, None)
            if task is None:
                continue
            while not task.conn.closed and task.conn.poll():  # what it said just before it exited
                self._read(task)
            task.conn.close()
            if task.learned and self.learn is not None:
                try:
                    self.learn(task.learned)
                except Exception:  # noqa: BLE001 - the worker outlives whatever it could not keep
                    log.exception("the warm worker could not keep what task %s learned", task.request.get("task_id"))
            if task.finished or not task.running:
                # finished: Flower's runtime replied. Never running: it got no message, and Flower gives
                # the task to the next process once its claim expires.
                if not task.finished:
                    log.warning("task %s ended before it had its input (%s)", task.request.get("task_id"), _how(status))
                continue
            why = task.killed or f"the task stopped without replying ({_how(status)})"
            log.error("task %s: %s", task.request.get("task_id"), why)
            self._help(task, why)

    def _help(self, task: _Task, why: str) -> None:
        pid = os.fork()
        if pid == 0:

            def body() -> int:
                self.on_failure(task.request, task.details, why)
                return 0

            _child(body, self._inherited())
        self.helpers[pid] = time.monotonic() + HELPER_TIMEOUT

    def _inherited(self) -> list[Connection]:
        """What a forked child must close: later tasks' requests (their tokens) and other tasks' channels."""
        return [*([self.requests] if self.requests is not None else []), *(t.conn for t in self.tasks.values())]

    def _enforce_deadlines(self) -> None:
        now = time.monotonic()
        for pid, task in self.tasks.items():
            if not task.killed and now > task.deadline:
                task.killed = (
                    "the task ran past its time and was stopped"
                    if task.running
                    else "the task did not start within its time and was stopped"
                )
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)  # SIGKILL: its own handlers would end the task before we reply
        for pid, deadline in self.helpers.items():
            if now > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def _stop_all(self) -> None:
        for pid in [*self.tasks, *self.helpers]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)


def _child(body: Callable[[], int | None], inherited: list[Connection]) -> None:
    """The body of a forked child: its own signal handling, never back into the worker's loop."""
    code = 1
    try:
        for conn in inherited:  # what is not this child's business (later tasks' tokens, other tasks' reports)
            if not conn.closed:
                conn.close()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        die_with_parent(signal.SIGTERM)  # the worker gone (the client stopping): the task ends as Flower ends one
        code = int(body() or 0)
    except SystemExit as stop:  # Flower's runtime ends a task with sys.exit
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException:  # noqa: BLE001 - a child must never unwind into the worker's loop
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _how(status: int) -> str:
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(number).name}"
        return f"signal {number}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"


class WorkerHandle:
    """The parent's side of a warm worker: hand it tasks, see whether it is alive, stop it."""

    def __init__(self, pid: int, requests: Connection, ready: Connection) -> None:
        self.pid, self._requests, self._ready = pid, requests, ready
        self._status: int | None = None

    def wait_ready(self, timeout: float) -> bool:
        """Wait until the worker has preloaded (True), exited, or `timeout` seconds passed (False)."""
        try:
            return self._ready.poll(timeout) and self._ready.recv_bytes() == READY
        except (EOFError, OSError):
            return False

    def submit(self, request: Request) -> bool:
        """Ask for one task; False when the worker is gone."""
        try:
            self._requests.send_bytes(json.dumps(request).encode())
            return True
        except OSError:
            return False

    @property
    def alive(self) -> bool:
        if self._status is None:
            with contextlib.suppress(ChildProcessError):
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid == self.pid:
                    self._status = status
        return self._status is None

    def stop(self, timeout: float = 10.0) -> None:
        """Close its requests (it stops its tasks and exits); kill it if it has not after `timeout`."""
        self._requests.close()
        deadline = time.monotonic() + timeout
        while self.alive and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)


class WarmExecutor:
    """Flower's SuperExec executor (its `Executor` protocol), running each task in a child of the warm worker
    (the client's ClientApp tasks, the server's ServerApp runs)."""

    def __init__(self, worker: Any) -> None:
        self.worker = worker

    def get_eligible_capacity(self, supported_task_types: set, **_kwargs: object) -> tuple[set, set[str]]:
        return supported_task_types, set()

    def wait_for_capacity(self, *_args: object, **_kwargs: object) -> None:
        return None

    def launch(self, spec: Any) -> Any:
        from fedtrain import _flower

        request = {
            "task_id": spec.task_id,
            "token": spec.token,
            "runtime_api_address": spec.runtime_api_address,
            "insecure": spec.insecure,
            "root_certificates_path": spec.root_certificates_path,
            "parent_pid": spec.parent_pid,
        }
        if self.worker.submit(request):
            return _flower.launch_accepted()
        return _flower.launch_failed("the warm worker is gone")

    def reconcile(self) -> None:
        if not self.worker.alive:  # this SuperExec exits; `fedtrain client` / `server` says so and stops
            raise RuntimeError("the warm worker exited; see the lines above")

    def close(self) -> None:
        self.worker.stop()


def start(worker: WarmWorker, preload: Callable[[], None]) -> WorkerHandle:
    """Fork the warm worker now, before this process starts any thread, and let it `preload` then serve.

    Args:
        worker: what runs each task and what is done for one that fails.
        preload: run once in the worker before its first task: imports, data; it must start no thread.

    Returns:
        The handle to submit tasks with.
    """
    theirs, ours = Pipe(duplex=False)
    ready_theirs, ready_ours = Pipe(duplex=False)  # the worker tells when it has preloaded
    pid = os.fork()
    if pid == 0:
        ours.close()
        ready_theirs.close()
        code = 0
        try:
            die_with_parent(signal.SIGKILL)  # its parent (the SuperExec) gone: nothing is left to serve
            preload()
            threads = len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else 1
            if threads > 1:  # forking with threads can deadlock a task: say so loudly
                log.warning("the warm worker has %d threads after preloading; tasks may hang", threads)
            ready_ours.send_bytes(READY)
            ready_ours.close()
            worker.serve(theirs)
        except BaseException:  # noqa: BLE001 - never unwind into the parent's code
            traceback.print_exc()
            code = 1
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)
    theirs.close()
    ready_ours.close()
    return WorkerHandle(pid, ours, ready_theirs)
