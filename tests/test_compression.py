"""Compressed updates (issue 18, part 3): the codes are torch's own quantisation and top-k, the client's
error feedback loses nothing, the server decodes before it screens and refuses malformed packs, and a
round's metrics record the bytes each client sent."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedtrain import protocol
from fedtrain.clients.update_compression import RESIDUAL, compress_update
from fedtrain.compression import PACKED, Compression, decode, from_content, packed_size
from fedtrain.config import Config
from fedtrain.models import build_model
from fedtrain.privacy.ledger import PrivacyLedger
from fedtrain.security.keys import generate_key, write_key_file
from fedtrain.server.screening import Screened, screen_reply
from tests.inprocess import flower_task, run_federation

SHAPES = {"conv": (16, 3, 3, 3), "bias": (16,), "tiny": (3,), "fc": (10, 70)}


def _update(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.normal(0, 0.1, size=shape).astype(np.float32) for name, shape in SHAPES.items()}


def _blocks(values: np.ndarray, block: int) -> list[np.ndarray]:
    step = block or values.size
    return [values[i : i + step] for i in range(0, values.size, step)]


@pytest.mark.parametrize(
    ("mode", "levels", "dtype", "zero"), [("int8", 127, torch.qint8, 0), ("int4", 7, torch.quint4x2, 8)]
)
@pytest.mark.parametrize("block", [0, 64])
def test_quantised_values_are_torchs_quantisation_at_the_same_scales(mode, levels, dtype, zero, block) -> None:
    update = _update()
    packed, decoded = Compression(mode, block).encode(update)
    sizes = [v.size for v in update.values()]
    blocks = sum(math.ceil(n / (block or n)) for n in sizes)
    body = sum(sizes) if mode == "int8" else math.ceil(sum(sizes) / 2)
    assert packed.size == 4 * blocks + body  # a code per value (half a byte for int4) and a float32 scale per block
    for name, values in update.items():
        expected = []
        for part in _blocks(values.ravel(), block):
            scale = float(np.abs(part).max()) / levels
            quantised = torch.quantize_per_tensor(torch.from_numpy(part.copy()), scale, zero, dtype)
            expected.append(quantised.dequantize().numpy())
            assert np.abs(part - expected[-1]).max() <= scale / 2 * (1 + 1e-5)  # round to nearest
        # torch rounds x * (1 / scale), we x / scale: a value exactly between two codes may round apart
        reference = np.concatenate(expected).reshape(values.shape)
        step = np.abs(values).max() / levels
        assert np.mean(decoded[name] == reference) > 0.99
        np.testing.assert_allclose(decoded[name], reference, rtol=0, atol=step * 1.001)


def test_topk_keeps_torchs_topk_and_nothing_else() -> None:
    update = _update()
    flat = np.concatenate([v.ravel() for v in update.values()])
    k = math.ceil(0.05 * flat.size)
    packed, decoded = Compression("topk", topk_fraction=0.05).encode(update)
    assert packed.size == 8 * k  # a uint32 index and a float32 value per kept value
    kept = set(torch.topk(torch.from_numpy(np.abs(flat)), k).indices.tolist())
    dense = np.concatenate([decoded[name].ravel() for name in update])
    assert set(np.flatnonzero(dense).tolist()) == kept
    np.testing.assert_array_equal(dense[sorted(kept)], flat[sorted(kept)])


def test_what_the_server_decodes_is_what_the_client_kept() -> None:
    update = _update(3)
    for mode in ("int8", "int4", "topk"):
        packed, decoded = Compression(mode, 32).encode(update)
        server = decode(packed, mode, 32, list(update), update)
        for name in update:
            np.testing.assert_array_equal(server[name], decoded[name])


def _context() -> Context:
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})


@pytest.mark.parametrize("mode", ["int8", "int4", "topk"])
def test_error_feedback_only_delays_what_compression_drops(mode: str) -> None:
    config, context = Config(compression=mode, compression_block=16, topk_fraction=0.05), _context()
    sent = {k: np.zeros(s, np.float64) for k, s in SHAPES.items()}
    true = {k: np.zeros(s, np.float64) for k, s in SHAPES.items()}
    for round_ in range(6):
        update = _update(round_)
        arrays, record = compress_update(update, config, context, "run-a")
        decoded = from_content(RecordDict({protocol.ARRAYS: arrays, protocol.COMPRESSION: record}), update)
        assert decoded is not None
        for name in SHAPES:
            sent[name] += decoded[name]
            true[name] += update[name]
    residual = context.state[RESIDUAL]
    for name in SHAPES:  # everything not yet sent is in the client's residual: sent + residual = all updates
        np.testing.assert_allclose(sent[name] + residual[name].numpy(), true[name], atol=1e-5)
    lossy = sum(float(np.abs(sent[k] - true[k]).max()) for k in SHAPES)
    assert lossy > 1e-3, "compression dropped nothing, so the test checked nothing"
    # another run never inherits this one's residual
    update = _update(9)
    arrays, record = compress_update(update, config, context, "run-b")
    alone, _ = Compression(mode, 16, 0.05).encode(update)
    np.testing.assert_array_equal(arrays[PACKED].numpy(), alone)


def test_under_secure_aggregation_topk_travels_dense_and_sums_exactly() -> None:
    config = Config(compression="topk", topk_fraction=0.1, secure_aggregation=True)
    updates = [_update(i) for i in range(3)]
    total = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    expected = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    for update in updates:
        arrays, record = compress_update(update, config, _context(), "run")
        assert record is None and set(arrays.keys()) == set(SHAPES)  # tensors by name, as SecAgg+'s mod reads them
        _, decoded = Compression("topk", topk_fraction=0.1).encode(update)
        for name in SHAPES:
            total[name] += arrays[name].numpy()
            expected[name] += decoded[name]
    for name in SHAPES:  # the masked sum of what they send is the sum of the decoded updates
        np.testing.assert_array_equal(total[name], expected[name])


# ---------------------------------------------------------------- the server's side


def _reply(arrays: ArrayRecord, record: ConfigRecord | None) -> Message:
    sent = Message(RecordDict(), dst_node_id=3, message_type="train")
    sent.metadata.__dict__["_message_id"] = sent.object_id
    report = protocol.PrivacyReport("client-x", PrivacyLedger(1e-5, []), 0.5)
    reply = protocol.update_reply(sent, arrays, {protocol.NUM_EXAMPLES: 10}, report, record)
    return Message(reply.content, reply_to=sent)


def _screen(arrays: ArrayRecord, record: ConfigRecord | None, template: dict[str, np.ndarray]):
    out = Screened()
    with flower_task():
        update = screen_reply(_reply(arrays, record), template, {}, lambda m: 3, None, out)
    return update, out


def _packed(update, mode="int8", block=16):
    packed, decoded = Compression(mode, block).encode(update)
    return packed, decoded, ConfigRecord({"mode": mode, "block": block, "names": list(update)})


def test_the_server_screens_the_decoded_update_and_counts_the_bytes_sent() -> None:
    update = _update()
    packed, decoded, record = _packed(update, block=256)
    accepted, out = _screen(ArrayRecord({PACKED: Array(packed)}), record, update)
    assert accepted is not None and not out.failed
    for name in update:
        np.testing.assert_array_equal(accepted[name], decoded[name])
    assert out.update_bytes["client-x"] == len(Array(packed).data)
    assert out.update_bytes["client-x"] < 0.27 * sum(len(Array(v).data) for v in update.values())  # sent plain
    assert out.bytes_up["client-x"] > out.update_bytes["client-x"]  # metrics and privacy record too


def _variants(update):
    packed, _, record = _packed(update)
    nan_scales = packed.copy()
    nan_scales[:4] = np.frombuffer(np.float32(np.nan).tobytes(), np.uint8)
    bad_index = Compression("topk", topk_fraction=0.05).encode(update)[0].copy()
    bad_index[:4] = np.frombuffer(np.uint32(10**6).tobytes(), np.uint8)
    topk_record = ConfigRecord({"mode": "topk", "block": 0, "names": list(update)})
    return {
        "one byte short": (packed[:-1], record, "bytes"),
        "non-finite scale": (nan_scales, record, "scales are not finite"),
        "index out of range": (bad_index, topk_record, "out of range"),
        "unknown mode": (packed, ConfigRecord({"mode": "int2", "block": 16, "names": list(update)}), "unknown"),
        "unknown tensor": (packed, ConfigRecord({"mode": "int8", "block": 16, "names": ["conv", "nope"]}), "tensors"),
    }


@pytest.mark.parametrize(
    "case", ["one byte short", "non-finite scale", "index out of range", "unknown mode", "unknown tensor"]
)
def test_a_malformed_pack_is_that_clients_rejected_update(case: str) -> None:
    update = _update()
    packed, record, words = _variants(update)[case]
    accepted, out = _screen(ArrayRecord({PACKED: Array(packed)}), record, update)
    assert accepted is None
    assert "malformed compressed update" in out.failed["client-x"] and words in out.failed["client-x"]


# ---------------------------------------------------------------- a federation


@pytest.mark.timeout(240)
def test_a_federation_with_8_bit_updates_sends_a_quarter_of_the_bytes_and_learns(tmp_path: Path) -> None:
    key = write_key_file(tmp_path / "model.key", generate_key())
    # the demo's settings (examples/demo.toml): the rules' defaults are measured over 30 rounds, and in 3
    # rounds they move a cnn too little for this test of compression to see it learn (final accuracy
    # 0.22-0.51 over 4 runs, against 0.73-0.77 with these)
    config = Config(model="cnn", rounds=3, clients=3, compression="int8", run_dir=str(tmp_path / "run"),
                    key_file=str(key), batch_size=100, lr=1.0, local_epochs=2, max_grad_norm=1.0)  # fmt: skip
    torch.set_num_threads(1)
    rows = run_federation(config)
    model = build_model("cnn", [1, 8, 8], 10)
    float32 = 4 * sum(p.numel() for p in model.parameters())  # the update as float32, counted independently
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [row["clients_ok"] for row in rows] == [3, 3, 3]
    for row in written:
        assert set(row["update_bytes"]) == {"client-0", "client-1", "client-2"}
        for sent in row["update_bytes"].values():
            assert sent <= 0.27 * float32
            assert sent >= packed_size("int8", 256, [p.numel() for p in model.parameters()])
        assert all(row["bytes_up"][c] > row["update_bytes"][c] for c in row["update_bytes"])
    assert rows[-1]["accuracy"] > 0.3  # ten classes: it learns through 8-bit updates
