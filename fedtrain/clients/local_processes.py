"""One client's round trained by several local processes (`fedtrain client --processes N`).

The client decides this, not the server: it is a node setting (node config `processes`), and it
changes nothing the ledger records. The client task forks N rank processes (the shard, the model and
the ledger's history are inherited in memory; nothing is sent over a network but the gradients' all-
reduce between the ranks, on 127.0.0.1 or NCCL), each runs the same DP-SGD round on its share of
every Poisson batch (clients/data_parallel.py), and rank 0's trained model and ledger entry come back
to the task, which alone records the entry and replies. Every rank must end with the same model and
the same entry; a rank that fails, dies or outlives the round's time stops them all, and the task
replies with its normal error.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import pickle
import signal
import time
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Connection, wait

import torch
from torch import nn

from fedtrain.clients.data_parallel import Ranks
from fedtrain.clients.trainer import RoundResult, Seeds, TrainSettings, train_round
from fedtrain.data import Dataset
from fedtrain.errors import FedtrainError
from fedtrain.privacy.ledger import LedgerEntry, PrivacyLedger
from fedtrain.privacy.preflight import PreflightRefusal
from fedtrain.processes import die_with_parent, free_port
from fedtrain.tasks import Task

POLL = 0.2  # seconds between checks that every rank is still alive
STOP_TIMEOUT = 10.0  # seconds for a killed rank to be reaped
PEER_GRACE = 1.0  # seconds to look for a dead peer behind a rank's failure (it shows within milliseconds)
# A collective waiting on a dead or hung rank gives up this long after the round's deadline: a backstop
# only, the task stops every rank at the deadline (and a rank dies with the task)
COLLECTIVE_MARGIN = 60.0


def processes_refusal(processes: int, num_samples: int, settings: TrainSettings, device: torch.device) -> str | None:
    """Why this client cannot train its round in `processes` local processes, or None.

    Args:
        processes: the node's setting (1: this process alone).
        num_samples: examples in the training split.
        settings: the round's training settings.
        device: the node's training device.

    Returns:
        One sentence, or None when the setting can run.
    """
    if processes < 1:
        return f"processes must be at least 1, not {processes}."
    if processes == 1:
        return None
    expected = min(num_samples, settings.batch_size)
    if processes > expected:
        return (
            f"{processes} processes are more than the {expected} examples of an expected Poisson batch of this "
            f"shard; use at most {expected}."
        )
    if settings.grad_sample_mode == "ghost":
        return "ghost clipping is not supported in several local processes; use --processes 1 or another mode."
    if device.type == "cuda":
        first, count = device.index or 0, torch.cuda.device_count()
        if first + processes > count:
            return f"{processes} processes need GPUs {first} to {first + processes - 1}; this machine has {count}."
        if torch.cuda.is_initialized():  # a forked child cannot use CUDA its parent has initialised
            return "CUDA was initialised before the training processes started; they cannot use it."
    return None


@dataclass(frozen=True)
class _Round:
    """What every rank trains with (inherited by fork, never pickled)."""

    model: nn.Module
    data: Dataset
    settings: TrainSettings
    noise_multiplier: float
    ledger: PrivacyLedger
    device: torch.device
    task: Task
    planned: LedgerEntry
    seeds: Seeds
    port: int
    timeout: float


def _rank_device(device: torch.device, rank: int) -> torch.device:
    return torch.device("cuda", (device.index or 0) + rank) if device.type == "cuda" else device


def _digest(state: dict[str, torch.Tensor]) -> str:
    """The trained model, bit for bit: every rank must end with the same one."""
    digest = hashlib.sha256()
    for name, value in state.items():
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _report(send: Connection, *report: object) -> None:
    # plain pickle, not the connection's: torch's reduction would send a tensor as a shared-memory handle,
    # which dies with this process
    send.send_bytes(pickle.dumps(report))


def _rank(spec: _Round, ranks: Ranks, send: Connection, inherited: list[Connection]) -> None:
    """The body of one rank process: train, then send (status, ...) to the client task."""
    for conn in inherited:  # the other ranks' channels: their end must close when they die
        conn.close()
    die_with_parent(signal.SIGKILL)
    torch.set_num_threads(1)
    try:
        device = _rank_device(spec.device, ranks.rank)
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group(
            backend,
            init_method=f"tcp://127.0.0.1:{spec.port}",
            rank=ranks.rank,
            world_size=ranks.world,
            timeout=timedelta(seconds=spec.timeout + COLLECTIVE_MARGIN),
        )
        result = train_round(spec.model, spec.data, spec.settings, spec.noise_multiplier, spec.ledger, device,
                             spec.task, planned=spec.planned, seeds=spec.seeds, ranks=ranks)  # fmt: skip
        state = {name: value.detach().cpu() for name, value in spec.model.state_dict().items()}
        _report(send, "ok", result, _digest(state), state if ranks.rank == 0 else None)
    except PreflightRefusal as refusal:
        _report(send, "refused", str(refusal))
    except FedtrainError as exc:
        _report(send, "error", str(exc))
    except Exception as exc:  # noqa: BLE001 - the task reports it; its text stays on this client
        _report(send, "error", f"{type(exc).__name__}: {exc}")
    finally:
        with contextlib.suppress(Exception):
            torch.distributed.destroy_process_group()


def _how(code: int | None) -> str:
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
    return f"exit status {code}"


def train_in_processes(
    model: nn.Module,
    data: Dataset,
    settings: TrainSettings,
    noise_multiplier: float,
    ledger: PrivacyLedger,
    device: torch.device,
    task: Task,
    planned: LedgerEntry,
    processes: int,
    timeout: float,
    seeds: Seeds | None = None,
) -> RoundResult:
    """Train `model` in place for one round of DP-SGD split across `processes` local processes.

    The same round as `train_round` in this process: the same Poisson samples and the same noise for
    the same `seeds` (default: drawn from the OS's CSPRNG), the same ledger entry.

    Args:
        model, data, settings, noise_multiplier, ledger, device, task, planned: as `train_round`'s.
        processes: how many rank processes (at least 2; `processes_refusal` checks it).
        timeout: seconds the whole round may take; then every rank is stopped.
        seeds: where sampling and noise start; a test fixes them, never set otherwise.

    Returns:
        Rank 0's round result (every rank's is the same), its trained parameters loaded into `model`.

    Raises:
        PreflightRefusal: a rank's DP preflight refused the setup (one sentence).
        FedtrainError: a rank failed, died, disagreed or ran out of time (one sentence); all are stopped.
    """
    spec = _Round(model, data, settings, noise_multiplier, ledger, device, task, planned,
                  seeds or Seeds.drawn(), free_port(), timeout)  # fmt: skip
    context = multiprocessing.get_context("fork")  # the shard and model are inherited, never copied out
    pipes = [context.Pipe(duplex=False) for _ in range(processes)]
    workers = []
    try:
        for rank, (_, send) in enumerate(pipes):
            others = [conn for i, pair in enumerate(pipes) for conn in pair if i != rank or conn is not send]
            worker = context.Process(target=_rank, args=(spec, Ranks(rank, processes), send, others), daemon=True)
            worker.start()
            workers.append(worker)
        for _, send in pipes:
            send.close()
        results = _collect([recv for recv, _ in pipes], workers, time.monotonic() + timeout, timeout)
    finally:
        for worker in workers:  # every rank is stopped, whatever happened
            if worker.is_alive():
                worker.kill()
            worker.join(STOP_TIMEOUT)
        for recv, _ in pipes:
            recv.close()
    _, result, digest, state = results[0]
    if any(other[1].entry != result.entry or other[2] != digest for other in results[1:]):
        raise FedtrainError("the training processes ended with different models or ledger entries; nothing is sent.")
    model.load_state_dict(state)
    return result


def _died_without_result(channels: list[Connection], workers: list, skip: list[int]) -> int | None:
    """A rank (not in `skip`) that exited without reporting, looked for during PEER_GRACE seconds: when one
    rank dies, the others fail in their collectives at once, and that failure is not the cause."""
    deadline = time.monotonic() + PEER_GRACE
    while True:
        for rank, worker in enumerate(workers):
            if rank in skip or worker.is_alive():
                continue
            if not channels[rank].poll():
                return rank
            try:  # what it sent before exiting: a report of its own is not "without a result"
                channels[rank].recv_bytes()
            except (EOFError, OSError):
                return rank
            skip = [*skip, rank]
        if time.monotonic() > deadline:
            return None
        time.sleep(0.02)


def _collect(channels: list[Connection], workers: list, deadline: float, timeout: float) -> list[tuple]:
    """Every rank's ("ok", ...) report, or the first failure raised as one sentence."""
    world = len(channels)
    results: dict[int, tuple] = {}
    while len(results) < world:
        pending = [conn for rank, conn in enumerate(channels) if rank not in results]
        for conn in wait(pending, timeout=max(0.0, min(POLL, deadline - time.monotonic()))):
            rank = next(i for i, channel in enumerate(channels) if channel is conn)
            try:
                report = pickle.loads(channels[rank].recv_bytes())  # noqa: S301 - from this task's own forked child
            except (EOFError, OSError):
                workers[rank].join(STOP_TIMEOUT)
                raise FedtrainError(
                    f"training process {rank} of {world} stopped without a result "
                    f"({_how(workers[rank].exitcode)}); the others were stopped."
                ) from None
            if report[0] == "refused":
                raise PreflightRefusal(report[1])
            if report[0] != "ok":
                dead = _died_without_result(channels, workers, [rank, *results])
                if dead is not None:  # the root cause: a survivor's error is its lost connection to this peer
                    raise FedtrainError(
                        f"training process {dead} of {world} stopped without a result "
                        f"({_how(workers[dead].exitcode)}); the others were stopped."
                    )
                raise FedtrainError(f"training process {rank} of {world} failed: {report[1]}")
            results[rank] = report
        for rank, worker in enumerate(workers):
            if rank not in results and not worker.is_alive() and not channels[rank].poll():
                raise FedtrainError(
                    f"training process {rank} of {world} stopped without a result ({_how(worker.exitcode)}); "
                    "the others were stopped."
                )
        if len(results) < world and time.monotonic() > deadline:
            raise FedtrainError(
                f"training in {world} processes did not finish within {timeout:g} s; every process was stopped."
            )
    return [results[rank] for rank in range(world)]
