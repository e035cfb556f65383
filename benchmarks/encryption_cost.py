"""What fedtrain's encryption costs: AES-256-GCM throughput against OpenSSL, and its share of a round.

(a) fedtrain's envelope (fedtrain/security/envelope.py) seals and then opens a --mib MiB payload
    (default 1 MiB: a 256K-parameter float32 model), as many times as make 64 MiB each way.
    Throughput = bytes encrypted + bytes decrypted over the time of both, against
    `openssl speed -evp aes-256-gcm -bytes` with the same message size on the same machine. Both are
    wall-clock times and the best of --repeats (other load only ever slows a run down). Target >= 0.7.
    (openssl speed encrypts in place, one buffer again and again; at 64 MiB and more a fresh envelope's
    first-touch page faults cost about as much as the cipher, which is memory, not cryptography.)
(b) in-process training rounds of the demo (`fedtrain simulate`'s defaults: 5 digits clients, logistic
    regression, DP-SGD, train and evaluate messages) with end-to-end payload encryption on: fedtrain's
    server loop (Federation) with its PayloadSealer, and every client's real train and evaluate handlers
    behind fedtrain's real encryption mod, all in this one process (no Ray), so the clients' work adds
    up instead of overlapping. Crypto = sealing and opening every payload on both sides, model down and
    update up, serialisation included. Share = crypto seconds / round seconds over all rounds. Target < 2%.
    The noise multiplier is fixed (1.0, as in deployment_overhead.py) instead of calibrated to epsilon 3:
    calibration adds about 40 s to the first round here, which would only make the share smaller.

    python benchmarks/encryption_cost.py [--mib 1] [--repeats 3] [--rounds 3] [--json PATH]

--json writes benchmarks/run.py's rows (see its docstring). Exit status 1 if a target is missed.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing fedtrain

from flwr.app import Context, Message, RecordDict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from fedtrain.clients.encryption_mod import ClientKeys, payload_encryption_mod  # noqa: E402
from fedtrain.clients.handlers import handle_evaluate, handle_train  # noqa: E402
from fedtrain.config import Config  # noqa: E402
from fedtrain.security.envelope import open_sealed, seal  # noqa: E402
from fedtrain.security.keys import generate_key, write_key_file  # noqa: E402
from fedtrain.security.payload import PayloadKeys  # noqa: E402
from fedtrain.server.loop import Federation  # noqa: E402
from fedtrain.server.payload_sealer import PayloadSealer  # noqa: E402
from fedtrain.simulation import prepare  # noqa: E402

THROUGHPUT_TARGET = 0.7  # fedtrain's envelope / OpenSSL's AES-256-GCM, bytes per second
SHARE_TARGET = 0.02  # crypto seconds / round seconds
VOLUME_MIB = 64  # each timed repeat seals and opens this much, in payloads of --mib
RUN_ID = 1


# ---------------------------------------------------------------- (a) throughput


def envelope_throughput(mib: int, repeats: int) -> dict:
    """Bytes per second through fedtrain's seal + open of one large buffer, best of `repeats`."""
    key, data, aad = generate_key(), os.urandom(mib * 1024 * 1024), b"fedtrain|benchmark"
    best = _best_round_trip(lambda: seal(key, data, aad), lambda sealed: open_sealed(key, sealed, aad), data, repeats)
    return {"bytes_per_s": 2 * len(data) / best["both"], "best_seconds": best, "mib": mib}


def library_throughput(mib: int, repeats: int) -> dict:
    """The same through the `cryptography` library's AESGCM alone (no header, no key id): the floor
    under fedtrain's envelope here, so the report shows what fedtrain adds and what the library costs."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    aead, nonce, data, aad = AESGCM(generate_key()), os.urandom(12), os.urandom(mib * 1024 * 1024), b"benchmark"
    best = _best_round_trip(
        lambda: aead.encrypt(nonce, data, aad), lambda sealed: aead.decrypt(nonce, sealed, aad), data, repeats
    )
    return {"bytes_per_s": 2 * len(data) / best["both"], "best_seconds": best, "mib": mib}


def _best_round_trip(encrypt, decrypt, data: bytes, repeats: int) -> dict[str, float]:
    """Best seconds to seal and to open one payload of len(data), each repeat timing VOLUME_MIB of
    payloads one after the other (each sealed, opened, then dropped, as a server does)."""
    times = max(1, VOLUME_MIB * 1024 * 1024 // len(data))
    best = {"seal": float("inf"), "open": float("inf"), "both": float("inf")}
    for _ in range(repeats):
        sealing = opening = 0.0
        for _ in range(times):
            start = time.perf_counter()
            sealed = encrypt()
            middle = time.perf_counter()
            opened = decrypt(sealed)
            opening += time.perf_counter() - middle
            sealing += middle - start
            if opened != data:
                raise SystemExit("decryption did not give the data back")  # never time a broken cipher
            del sealed, opened
        for part, seconds in (("seal", sealing), ("open", opening), ("both", sealing + opening)):
            best[part] = min(best[part], seconds / times)
    return best


def openssl_throughput(repeats: int, block: int) -> dict:
    """`openssl speed -evp aes-256-gcm -bytes block`, wall clock, best of `repeats` 1 s runs."""
    openssl = shutil.which("openssl")
    if openssl is None:
        return {"bytes_per_s": None, "error": "openssl is not installed here: the ratio is unavailable"}
    best = 0.0
    command = [openssl, "speed", "-mr", "-elapsed", "-seconds", "1", "-bytes", str(block)]
    for _ in range(repeats):
        done = subprocess.run([*command, "-evp", "aes-256-gcm"], capture_output=True, text=True, timeout=60)
        # Machine-readable result line: +F:<n>:AES-256-GCM:<bytes per second for each block size>
        found = re.search(r"^\+F:\d+:AES-256-GCM:([\d.:]+)$", done.stdout, re.MULTILINE | re.IGNORECASE)
        if done.returncode != 0 or found is None:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            return {"bytes_per_s": None, "error": f"openssl speed failed: {tail[0][:160]}"}
        best = max(best, float(found.group(1).split(":")[-1]))
    version = subprocess.run([openssl, "version"], capture_output=True, text=True).stdout.strip()
    return {"bytes_per_s": best, "version": version, "block": block}


# ---------------------------------------------------------------- (b) share of a round


class TimedSealer(PayloadSealer):
    """The server's real sealer, adding up the seconds it takes."""

    seconds = 0.0

    def seal(self, messages: list[Message], server_round: int) -> list[Message]:
        start = time.perf_counter()
        try:
            return super().seal(messages, server_round)
        finally:
            self.seconds += time.perf_counter() - start

    def open(self, replies: list[Message], server_round: int) -> tuple[list[Message], dict[int, str]]:
        start = time.perf_counter()
        try:
            return super().open(replies, server_round)
        finally:
            self.seconds += time.perf_counter() - start


class EncryptedInProcessGrid:
    """A grid whose nodes run fedtrain's train/evaluate handlers behind its encryption mod, in this process
    (as tests/test_strategies.py's InProcessFederation, with encryption). Its `seconds` add up the mod's
    time minus the handler's: what the mod adds is opening the message and sealing the reply."""

    def __init__(self, config: Config, keys: PayloadKeys) -> None:
        self.config, self.keys, self.seconds = config, keys, 0.0
        self.mod = payload_encryption_mod(self._keys_for)
        self.contexts = {
            pid + 1: Context(
                RUN_ID, pid + 1, {"partition-id": pid, "num-partitions": config.federation.clients}, RecordDict(), {}
            )
            for pid in range(config.federation.clients)
        }

    def _keys_for(self, context: Context) -> ClientKeys:
        name = f"client-{int(context.node_config['partition-id'])}"  # the name fedtrain's client reports
        return ClientKeys(name, self.keys.federation, self.keys.uplink[name])

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages) -> list[str]:
        """Flower's Grid interface as the server's streaming rounds use it: answered at push time."""
        messages = list(messages)
        self._waiting = {reply.metadata.reply_to_message_id: reply for reply in self.send_and_receive(messages)}
        return [msg.metadata.message_id for msg in messages]

    def pull_messages(self, message_ids) -> list[Message]:
        return [self._waiting.pop(mid) for mid in message_ids if mid in self._waiting]

    def send_and_receive(self, messages: list[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id  # a real Grid gives the id when it sends
            handler = handle_train if msg.metadata.message_type == "train" else handle_evaluate
            handled = 0.0

            def timed_handler(message: Message, context: Context, handler=handler) -> Message:
                nonlocal handled
                start = time.perf_counter()
                try:
                    return handler(message, context, self.config)
                finally:
                    handled += time.perf_counter() - start

            start = time.perf_counter()
            replies.append(self.mod(msg, self.contexts[msg.metadata.dst_node_id], timed_handler))
            self.seconds += time.perf_counter() - start - handled
        return replies


def round_shares(rounds: int, work: Path) -> list[dict]:
    """Per round of the demo: its seconds and the seconds spent sealing and opening its payloads."""
    # Flower stamps each message with the running task; its runtime would set this identity.
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, RUN_ID, 1
    logging.getLogger("flwr").setLevel(logging.WARNING)  # no "configure_train: Sampled..." lines
    key = write_key_file(work / "model.key", generate_key())
    config, test_set = prepare(
        Config(rounds=rounds, run_dir=str(work / "run"), key_file=str(key), target_epsilon=None, noise_multiplier=1.0)
    )
    keys = PayloadKeys(generate_key(), {f"client-{pid}": generate_key() for pid in range(config.federation.clients)})
    sealer, grid = TimedSealer(keys, RUN_ID), EncryptedInProcessGrid(config, keys)
    shares, crypto_before = [], 0.0

    def on_round(row: dict) -> None:
        nonlocal crypto_before
        if (
            row["clients_ok"] != config.federation.clients
        ):  # a round without every client would be cheaper: not a result
            raise SystemExit(f"round {row['round']}: only {row['clients_ok']} clients trained: {row['failed']}")
        crypto = sealer.seconds + grid.seconds
        shares.append({"round": row["round"], "seconds": row["seconds"], "crypto_s": crypto - crypto_before})
        crypto_before = crypto

    # A full garbage collection walks every live object (torch, Opacus, Flower: 0.2 s here) and lands in
    # whichever call happens to allocate, often a seal. Freezing what set-up made keeps such pauses short,
    # so they are not charged to crypto or training by chance.
    gc.collect()
    gc.freeze()
    Federation(config, test_set=test_set, on_round=on_round, sealer=sealer).run(grid)
    for share in shares:
        share["share"] = share["crypto_s"] / share["seconds"]
    return shares


# ---------------------------------------------------------------- report


def rows_of(mine: dict, theirs: dict, shares: list[dict]) -> list[dict]:
    """benchmarks/run.py's rows."""
    ratio = mine["bytes_per_s"] / theirs["bytes_per_s"] if theirs["bytes_per_s"] else None
    seconds, crypto = sum(s["seconds"] for s in shares), sum(s["crypto_s"] for s in shares)
    throughput = {
        "measure": f"AES-256-GCM bytes/s, fedtrain envelope seal+open of {mine['mib']} MiB payloads vs openssl "
        "speed on the same size",
        "baseline": theirs["bytes_per_s"],
        "value": mine["bytes_per_s"],
        "ratio": ratio,
        "target": f">= {THROUGHPUT_TARGET}",
        "passed": ratio is not None and ratio >= THROUGHPUT_TARGET,
    }
    if ratio is None:
        throughput["error"] = theirs["error"]
    share = {
        "measure": f"share of in-process demo rounds spent sealing+opening payloads ({len(shares)} rounds)",
        "baseline": seconds,
        "value": crypto,
        "ratio": crypto / seconds,
        "target": f"< {SHARE_TARGET}",
        "passed": crypto / seconds < SHARE_TARGET,
    }
    return [throughput, share]


def print_table(rows: list[dict], mine: dict, library: dict, theirs: dict, shares: list[dict]) -> None:
    gb = 1e9
    for name, result in (("fedtrain envelope", mine), ("cryptography AESGCM alone", library)):
        best = result["best_seconds"]
        print(
            f"{name}, {result['mib']} MiB, best of runs: seal {best['seal'] * 1000:.1f} ms, "
            f"open {best['open'] * 1000:.1f} ms: {result['bytes_per_s'] / gb:.2f} GB/s"
        )
    if theirs["bytes_per_s"]:
        print(
            f"{theirs['version']}: aes-256-gcm {theirs['bytes_per_s'] / gb:.2f} GB/s at {theirs['block']}-byte messages"
        )
    else:
        print(theirs["error"])
    for s in shares:
        crypto_ms = s["crypto_s"] * 1000
        print(f"round {s['round']}: {s['seconds']:.2f} s, sealing+opening {crypto_ms:.1f} ms ({s['share']:.2%})")
    print()
    print(f"{'measure':<58} {'baseline':>12} {'fedtrain':>12} {'ratio':>8} {'target':>8}  result")
    names = ("AES-256-GCM GB/s: openssl | fedtrain", "round seconds | crypto seconds, all rounds")
    for name, row, scale in zip(names, rows, (gb, 1), strict=True):
        base = f"{row['baseline'] / scale:.3f}" if row["baseline"] else "n/a"
        ratio = f"{row['ratio']:.3f}" if row["ratio"] is not None else "n/a"
        verdict = "PASS" if row["passed"] else "FAIL"
        print(f"{name:<58} {base:>12} {row['value'] / scale:>12.3f} {ratio:>8} {row['target']:>8}  {verdict}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1, help="payload size for the throughput test, MiB")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs, fedtrain and openssl alike")
    parser.add_argument("--rounds", type=int, default=3, help="in-process demo rounds")
    parser.add_argument("--json", type=Path, default=None, help="write benchmarks/run.py's rows here")
    args = parser.parse_args(argv)
    if min(args.mib, args.repeats, args.rounds) < 1:
        parser.error("--mib, --repeats and --rounds must be >= 1")
    mine, library = envelope_throughput(args.mib, args.repeats), library_throughput(args.mib, args.repeats)
    theirs = openssl_throughput(args.repeats, args.mib * 1024 * 1024)
    with tempfile.TemporaryDirectory(prefix="fedtrain-crypto-") as tmp:
        shares = round_shares(args.rounds, Path(tmp))
    rows = rows_of(mine, theirs, shares)
    print_table(rows, mine, library, theirs, shares)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        details = {
            "envelope": mine,
            "library": library,
            "openssl": theirs,
            "rounds": shares,
            "load_avg_1min": os.getloadavg()[0],
        }
        args.json.write_text(json.dumps({"rows": rows, "details": details}, indent=2) + "\n")
    sys.exit(0 if all(row["passed"] for row in rows) else 1)


if __name__ == "__main__":
    main()
