"""Data bigger than memory (issue 16, acceptance 2): shards are read a batch at a time, so a client's
memory does not grow with its shard (an image folder 10x larger stays within a few MB); an image
folder of mixed sizes trains with a resize; memory-mapped .npy and streamed CSV shards train too."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedtrain.config import Config
from fedtrain.data import load_shard
from fedtrain.errors import FedtrainError

REPO = Path(__file__).resolve().parents[1]

# One client's train round and evaluation on an image folder, in a fresh process; prints the peak
# memory the handlers added (VmHWM after clear_refs, minus VmRSS before).
CLIENT_ROUND = r"""
import json, sys
from pathlib import Path
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from fedtrain import protocol
from fedtrain.clients.handlers import handle_evaluate, handle_train
from fedtrain.config import Config
from fedtrain.models import build_model
from tests.inprocess import flower_task, over_the_wire

def status(field):
    return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1])  # kB

# RDP: its memory does not depend on the sample rate (PRV's grids do, and are not the data's)
config = Config(input_shape=[3, 32, 32], labels=["a", "b"], image_size=[32, 32], rounds=1, batch_size=32,
                local_epochs=1, eval_fraction=0.1, target_epsilon=8.0, max_epsilon=100.0, accountant="rdp")
weights = build_model("logistic", [3, 32, 32], 2, seed=0).state_dict()
context = Context(1, 1, {"data-path": sys.argv[1], "client-name": "c"}, RecordDict(), {})
def message(kind):
    content = RecordDict({protocol.ARRAYS: ArrayRecord(weights), protocol.CONFIG: ConfigRecord({protocol.RUN_ID: "r"})})
    with flower_task():
        msg = Message(over_the_wire(content), dst_node_id=1, message_type=kind)
    msg.metadata.__dict__["_message_id"] = msg.object_id
    return msg
torch.zeros(1)  # imports and allocator warm
before = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # peak := now
with flower_task():
    train = handle_train(message("train"), context, config)
    evaluate = handle_evaluate(message("evaluate"), context, config)
assert protocol.read_reply(train).kind == "update", protocol.read_reply(train)
assert protocol.read_reply(evaluate).kind == "metrics"
print(json.dumps({"grew_kb": status("VmHWM") - before, "examples": protocol.read_reply(train).metrics["num-examples"]}))
"""


def _image_folder(root: Path, count: int, sizes=((64, 64),), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(count):
        label = "ab"[i % 2]
        (root / label).mkdir(parents=True, exist_ok=True)
        height, width = sizes[i % len(sizes)]
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        pixels[..., 0] = 200 if label == "a" else 30  # learnable: the red channel says the class
        Image.fromarray(pixels).save(root / label / f"{i}.png")
    return root


@pytest.mark.timeout(600)
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="reads Linux's /proc memory counters")
def test_a_client_s_memory_does_not_grow_with_its_shard(tmp_path: Path) -> None:
    grew = {}
    for count in (300, 3000):
        folder = _image_folder(tmp_path / f"images{count}", count)
        done = subprocess.run([sys.executable, "-c", CLIENT_ROUND, str(folder)], capture_output=True, text=True,
                              timeout=300, cwd=REPO)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        result = json.loads(done.stdout.strip().splitlines()[-1])
        assert result["examples"] == count - round(count * 0.1)
        grew[count] = result["grew_kb"] / 1024
    # read whole, 3000 images of 3x32x32 float32 would hold 35 MB more than 300
    assert grew[3000] - grew[300] < 6.0, grew  # measured 4 MB (Python objects per file: paths, labels)


def test_mixed_image_sizes_need_a_size_and_train_with_it(tmp_path: Path) -> None:
    folder = _image_folder(tmp_path / "mixed", 20, sizes=((20, 24), (28, 28)))
    with pytest.raises(FedtrainError, match="different sizes .* set image_size"):
        load_shard(folder, Config(), infer_labels=True)
    dataset = load_shard(folder, Config(image_size=[16, 16]), infer_labels=True)
    assert dataset.input_shape == [3, 16, 16] and len(dataset) == 20
    x, y = dataset.batch(np.arange(20))
    assert x.shape == (20, 3, 16, 16) and x.dtype == np.float32 and set(y.tolist()) == {0, 1}


def test_memory_mapped_npy_and_streamed_csv_read_what_was_written(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (50, 6, 6), dtype=np.uint8)
    (tmp_path / "npy").mkdir()
    np.save(tmp_path / "npy" / "x.npy", x)
    np.save(tmp_path / "npy" / "y.npy", np.arange(50) % 3)
    mapped = load_shard(tmp_path / "npy", Config(), infer_labels=True)
    assert isinstance(mapped.x, np.memmap)  # type: ignore[attr-defined]
    got, labels = mapped.batch(np.array([3, 7]))
    assert np.allclose(got[:, 0], x[[3, 7]] / 255.0) and labels.tolist() == [0, 1]

    rows = ["a,b,label"] + [f"{i},{i * 0.5},{'cat' if i % 2 else 'dog'}" for i in range(40)]
    (tmp_path / "s.csv").write_text("\n".join(rows) + "\n")
    streamed = load_shard(tmp_path / "s.csv", Config(labels=["cat", "dog"]))
    features, targets = streamed.batch(np.array([5, 6]))
    assert features.tolist() == [[5.0, 2.5], [6.0, 3.0]] and targets.tolist() == [0, 1]
    assert len(streamed.offsets) == 40  # type: ignore[attr-defined]  # offsets, not rows, kept in memory
