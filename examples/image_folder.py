"""Images from a folder, of mixed sizes, with augmentation and a torchvision-style model given from Python.

    python examples/image_folder.py                  # writes a folder of images, then trains on it
    python examples/image_folder.py --small          # what `make test` runs

The folder holds one sub-folder per class (here: shapes drawn at random sizes, so the images differ
in size); `image_size` resizes every image when it is read, and the task's `train_transform`
augments each sample (a random crop and flip: it reads one sample only, so it costs no privacy).
Images are decoded a batch at a time, never all at once. The model is a small residual network
with GroupNorm (BatchNorm mixes samples, which DP-SGD cannot allow).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from torch import nn

import fedtrain
from fedtrain.data.transforms import Compose, RandomCrop, RandomHorizontalFlip

SIZE = 24  # every image is resized to SIZE x SIZE when read


def write_folder(root: Path, count: int, seed: int = 0) -> Path:
    """Circles and squares at random positions, on images from 20x20 to 40x40 pixels."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        shape = ("circle", "square")[i % 2]
        side = int(rng.integers(20, 41))
        image = Image.new("L", (side, side), color=int(rng.integers(0, 60)))
        draw = ImageDraw.Draw(image)
        r = int(rng.integers(side // 5, side // 3))
        cx, cy = (int(v) for v in rng.integers(r, side - r, size=2))
        box = (cx - r, cy - r, cx + r, cy + r)
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=int(rng.integers(180, 256)))
        (root / shape).mkdir(parents=True, exist_ok=True)
        image.save(root / shape / f"{i}.png")
    return root


class Block(nn.Module):
    """A residual block: conv, GroupNorm, tanh, twice, plus the input."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(4, channels), nn.Tanh(),
            nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(4, channels),
        )  # fmt: skip

    def forward(self, x):
        return nn.functional.tanh(x + self.body(x))


def tiny_resnet(input_shape: list[int], num_classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(input_shape[0], 16, 3, padding=1), nn.GroupNorm(4, 16), nn.Tanh(),
        Block(16), nn.MaxPool2d(2), Block(16), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes),
    )  # fmt: skip


class AugmentedImages(fedtrain.Classification):
    train_transform = Compose([RandomCrop(SIZE, padding=2), RandomHorizontalFlip()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a quick run (tests)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        images = write_folder(Path(folder) / "shapes", 120 if args.small else 1200)
        result = fedtrain.simulate(
            data=images,
            image_size=[SIZE, SIZE],
            model=tiny_resnet,
            task=AugmentedImages(),
            clients=2 if args.small else 4,
            rounds=2 if args.small else 20,
            target_epsilon=8.0,
            lr=0.5,
            batch_size=16,
        )
    last = result.history[-1]
    print(f"accuracy on the central test split after {last['round']} rounds: {last['accuracy']:.3f}")
    print("epsilon per client:", {c: round(v["epsilon"], 3) for c, v in result.privacy["clients"].items()})


if __name__ == "__main__":
    main()
