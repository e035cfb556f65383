"""Peak memory of sealing one large update on a client and opening, screening and summing it on the
server, through fedtrain's own code (issue 18, part 4). Used by tests/test_large_payloads.py (small)
and benchmarks/large_payload.py (1 GB).

What is measured, with tracemalloc (numpy arrays, bytes and bytearrays are all traced) and, where
Linux offers it, the process's peak resident memory (VmHWM, reset before each phase):

- client: the reply (its update as Flower holds it, 1x) sealed by the client's payload mod
  (`seal_content(..., consume=True)`): peak while the update and its sealed form coexist.
- server: the sealed reply as it arrives (1x) opened by the server's PayloadSealer, screened
  (`screen_reply`: shape, finite, norm) and added to a running FedAvg sum (StreamingMean). The sums
  and the global model are the server's state between rounds, allocated (and the sums touched by a
  first client's update) before the measurement starts; they are not counted.

Each ratio is the phase's peak over the update's bytes: 1.0 is the update itself, whatever else the
phase needs is above it.
"""

from __future__ import annotations

import contextlib
import os
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Message, RecordDict

from fedtrain import protocol
from fedtrain.privacy.ledger import PrivacyLedger
from fedtrain.security.payload import PayloadKeys, payload_context, seal_content
from fedtrain.server.payload_sealer import PayloadSealer
from fedtrain.server.screening import Screened, screen_reply
from fedtrain.server.streaming_mean import StreamingMean
from tests.inprocess import flower_task

RUN, ROUND, NODE, CLIENT = 7, 3, 11, "client-1"
BIAS = 1000  # a second, small tensor: an update is never one array alone


@dataclass
class PhasePeak:
    traced: int  # tracemalloc's peak during the phase, everything the phase holds included
    rss: int | None  # growth of peak resident memory over the phase's start (None: not Linux)


@dataclass
class Measured:
    update_bytes: int
    client: PhasePeak
    server: PhasePeak
    mean_ok: bool

    def ratios(self) -> dict[str, float]:
        return {"client": self.client.traced / self.update_bytes, "server": self.server.traced / self.update_bytes}


def _rss() -> tuple[int, int] | None:
    """(current, peak) resident bytes of this process, or None off Linux."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def _reset_peak_rss() -> None:
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # Linux: peak resident memory := current


@contextlib.contextmanager
def _phase(out: list[PhasePeak]):
    if not tracemalloc.is_tracing():
        yield
        return
    tracemalloc.reset_peak()
    _reset_peak_rss()
    start = _rss()
    yield
    end = _rss()
    out.append(PhasePeak(tracemalloc.get_traced_memory()[1], end[1] - start[0] if start and end else None))


def _array(values: np.ndarray) -> Array:
    """A Flower Array of `values` (its .npy bytes built with one copy, as a client holds its update)."""
    import io

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(values))
    data = b"".join([header.getvalue(), memoryview(np.ascontiguousarray(values)).cast("B")])
    return Array(dtype=str(values.dtype), shape=tuple(values.shape), stype="numpy.ndarray", data=data)


def measure(update_bytes: int, chunk_bytes: int) -> Measured:
    """Seal one update of about `update_bytes` (float32) as a client does, then open, screen and sum it
    as the server does; the peak of each phase. A small update goes through first, untraced, so that
    what the path imports on first use (Opacus's accountants, for the privacy record) is not counted."""
    _once(64 * 1024 + 4 * BIAS, 4096, trace=False)
    return _once(update_bytes, chunk_bytes)


def _once(update_bytes: int, chunk_bytes: int, trace: bool = True) -> Measured:
    size = update_bytes // 4 - BIAS
    template = {"w": np.zeros(size, np.float32), "b": np.zeros(BIAS, np.float32)}  # the global model
    mean = StreamingMean(template)
    mean.add(template, 1.0)  # the server's state: sums touched by a first client's (zero) update
    keys = PayloadKeys(os.urandom(32), {CLIENT: os.urandom(32)})
    sealer = PayloadSealer(keys, RUN)
    peaks: list[PhasePeak] = []
    if trace:
        tracemalloc.start()
    try:
        with flower_task():
            sent = Message(RecordDict(), dst_node_id=NODE, message_type="train")
            sent.metadata.__dict__["_message_id"] = sent.object_id
            values = np.linspace(-1e-3, 1e-3, size, dtype=np.float32)
            probe = values[:: max(1, size // 1000)].copy()
            arrays = ArrayRecord({"w": _array(values), "b": _array(np.full(BIAS, 1e-4, np.float32))})
            del values
            report = protocol.PrivacyReport(CLIENT, PrivacyLedger(1e-5, []), 0.5)
            reply = protocol.update_reply(sent, arrays, {protocol.NUM_EXAMPLES: 100}, report)
            del arrays
            sent_bytes = sum(len(a.data) for a in reply.content[protocol.ARRAYS].values())
            aad = payload_context(RUN, ROUND, "up", "train", NODE, CLIENT)
            with _phase(peaks):  # the client's payload mod
                reply.content = seal_content(
                    reply.content, keys.uplink[CLIENT], aad, {"round": ROUND, "client": CLIENT},
                    chunk_bytes=chunk_bytes, consume=True,
                )  # fmt: skip
            reply = Message(reply.content, reply_to=sent)
            with _phase(peaks):  # the server: open, screen, add; the reply's content dropped after, as streamed
                (opened,), rejected = sealer.open([reply], ROUND)
                assert not rejected, rejected
                out = Screened()
                update = screen_reply(opened, template, {}, lambda m: NODE, None, out)
                assert update is not None, out.failed
                mean.add(update, 1.0)
                del update
                opened.content = RecordDict()
        result = mean.result()["w"]
        ok = bool(np.allclose(result[:: max(1, size // 1000)], probe / 2, rtol=1e-5, atol=1e-9))
    finally:
        tracemalloc.stop()
    if not trace:
        return Measured(sent_bytes, PhasePeak(0, None), PhasePeak(0, None), ok)
    return Measured(sent_bytes, peaks[0], peaks[1], ok)
