"""Real model shapes for the GPU check: a ResNet-18 with GroupNorm on 32x32x3 images and a small
transformer encoder, and a 2-round federated DP run of either on synthetic data.

    python benchmarks/large_models.py --model resnet18gn --device cuda          # 2 rounds, 2 clients
    python benchmarks/large_models.py --model transformer --device cpu --samples 64

Both models are made only of layers every Opacus mode handles (Conv2d, Linear, GroupNorm, LayerNorm;
attention written with matmuls, so no nn.MultiheadAttention), so hooks, expanded weights and ghost
clipping can all be compared on them (benchmarks/dp_throughput.py --model resnet18gn|transformer).
The federated run is `fedtrain.simulate` (Flower's Simulation Engine) with the factory as model:
nothing of fedtrain is re-implemented. Synthetic data (random, fixed seed): nothing is downloaded.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing fedtrain

NUM_CLASSES = 10
SEQUENCE, FEATURES = 32, 64  # the transformer's input: 32 positions of 64 features (patches, frames)


class BasicBlock(nn.Module):
    """ResNet's basic block with GroupNorm (BatchNorm mixes samples, which DP-SGD cannot allow)."""

    def __init__(self, inputs: int, outputs: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.norm1 = nn.GroupNorm(32, outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.norm2 = nn.GroupNorm(32, outputs)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.GroupNorm(32, outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(self.norm2(self.conv2(out)) + self.shortcut(x))


def resnet18_gn(num_classes: int = NUM_CLASSES) -> nn.Module:
    """ResNet-18 for 32x32x3 inputs (CIFAR stem: a 3x3 convolution, no max-pool), GroupNorm: 11.2M parameters."""
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.GroupNorm(32, 64), nn.ReLU()]
    width = 64
    for outputs, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(width, outputs, stride), BasicBlock(outputs, outputs, 1)]
        width = outputs
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes)]
    return nn.Sequential(*layers)


class EncoderLayer(nn.Module):
    """Pre-norm transformer encoder layer: self-attention (Linear projections, matmul, softmax) and an MLP."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attention = torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1)
        x = x + self.out((attention @ v).transpose(1, 2).reshape(batch, length, width))
        return x + self.mlp(self.norm2(x))


def small_transformer(num_classes: int = NUM_CLASSES, width: int = 256, depth: int = 4, heads: int = 4) -> nn.Module:
    """A 4-layer, 256-wide encoder over SEQUENCE x FEATURES inputs, mean-pooled: 3.2M parameters."""
    return nn.Sequential(
        ToSequence(),
        nn.Linear(FEATURES, width),
        *[EncoderLayer(width, heads) for _ in range(depth)],
        nn.LayerNorm(width),
        MeanOverPositions(),
        nn.Linear(width, num_classes),
    )


class ToSequence(nn.Module):
    """(batch, 1, positions, features) -> (batch, positions, features): fedtrain reads 2-D samples as one-channel
    images."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(len(x), -1, FEATURES)


class MeanOverPositions(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1)


# name -> (factory, one sample's shape)
MODELS = {"resnet18gn": (resnet18_gn, [3, 32, 32]), "transformer": (small_transformer, [1, SEQUENCE, FEATURES])}


def synthetic(shape: list[int], samples: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random inputs and labels; the labels follow the inputs' mean, so there is something to learn."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(samples, *shape, generator=gen)
    signal = x.reshape(samples, -1).mean(dim=1)
    y = torch.bucketize(signal, torch.quantile(signal, torch.linspace(0, 1, NUM_CLASSES + 1)[1:-1]))
    return x, y


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MODELS), default="resnet18gn")
    p.add_argument("--device", default="cuda")
    p.add_argument("--samples", type=int, default=2000, help="synthetic samples in all (10%% are the test split)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--clients", type=int, default=2)
    args = p.parse_args(argv)

    import fedtrain

    factory, shape = MODELS[args.model]
    x, y = synthetic(shape, args.samples)
    started = time.perf_counter()
    result = fedtrain.simulate(
        data=(x.numpy(), y.numpy()), model=factory, clients=args.clients, rounds=args.rounds, target_epsilon=8.0,
        device=args.device, batch_size=args.batch, local_epochs=1, lr=0.5, fraction_evaluate=0.0,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    params = sum(p.numel() for p in result.model.parameters())
    for row in result.history:
        print(f"round {row['round']}: central accuracy {row['accuracy']:.3f}, max epsilon {row['epsilon_max']:.2f}")
    print(f"OK: {args.model} ({params / 1e6:.1f}M parameters), {args.rounds} rounds, {args.clients} clients on "
          f"{args.device}, {seconds:.0f}s")  # fmt: skip


if __name__ == "__main__":
    main()
