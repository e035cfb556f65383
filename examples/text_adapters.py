"""Text classification with a small transformer: the backbone frozen, LoRA adapters trained privately.

    python examples/text_adapters.py                 # 4 clients, 20 rounds
    python examples/text_adapters.py --small         # what `make test` runs

Words become token ids by hashing (a fixed function, the same on every client): a vocabulary built
from the clients' own text would reveal which words they hold, and cost privacy. The backbone
(embedding and transformer encoder) stands for a pretrained model: it is made from a fixed seed, so
the server and every client hold the same weights, and frozen. Only the low-rank adapter on its
projection and the classification head have requires_grad: only they are trained with DP-SGD,
noised and sent; the encrypted model on disk holds the whole network.
"""

from __future__ import annotations

import argparse
import zlib

import numpy as np
import torch
from torch import nn

import fedtrain

VOCAB, LENGTH, DIM = 512, 16, 32
GOOD = ["great", "wonderful", "excellent", "lovely", "superb", "delightful", "enjoyable", "brilliant"]
BAD = ["awful", "terrible", "boring", "dreadful", "poor", "horrible", "dull", "disappointing"]
FILLER = [
    "the",
    "film",
    "story",
    "cast",
    "was",
    "and",
    "a",
    "very",
    "it",
    "plot",
    "acting",
    "scenes",
    "music",
    "ending",
]


def tokens(text: str) -> np.ndarray:
    """Hashed token ids (1..VOCAB-1; 0 pads), LENGTH of them."""
    ids = [zlib.crc32(word.encode()) % (VOCAB - 1) + 1 for word in text.lower().split()][:LENGTH]
    return np.asarray(ids + [0] * (LENGTH - len(ids)), dtype=np.float32)


class Reviews(torch.utils.data.Dataset):
    """Short synthetic reviews, positive (1) or negative (0)."""

    def __init__(self, count: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.items = []
        for i in range(count):
            label = i % 2
            words = list(rng.choice(FILLER, size=8)) + list(rng.choice(GOOD if label else BAD, size=2))
            rng.shuffle(words)
            self.items.append((torch.from_numpy(tokens(" ".join(words))), label))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return self.items[index]


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update: W x + (alpha / r) B A x, B starting at 0."""

    def __init__(self, base: nn.Linear, rank: int = 4, alpha: float = 8.0) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.down = nn.Linear(base.in_features, rank, bias=False)
        self.up = nn.Linear(rank, base.out_features, bias=False)
        nn.init.zeros_(self.up.weight)
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.up(self.down(x)) * self.scale


class AdaptedTransformer(nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM, padding_idx=0)
        layer = nn.TransformerEncoderLayer(DIM, nhead=2, dim_feedforward=64, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
        self.embed.requires_grad_(False)
        self.encoder.requires_grad_(False)  # the "pretrained" backbone
        self.project = LoRALinear(nn.Linear(DIM, DIM))  # frozen projection, trainable adapter
        self.head = nn.Linear(DIM, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = x.long()
        hidden = self.encoder(self.embed(ids))  # padding attends too: simple, and never an empty row
        pooled = (hidden * (ids != 0).unsqueeze(-1)).sum(1) / (ids != 0).sum(1, keepdim=True).clamp(min=1)
        return self.head(torch.tanh(self.project(pooled)))


def make_model(input_shape: list[int], num_classes: int) -> nn.Module:
    return AdaptedTransformer(num_classes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a quick run (tests)")
    args = parser.parse_args()
    result = fedtrain.simulate(
        data=Reviews(200 if args.small else 2000),
        model=make_model,
        clients=2 if args.small else 4,
        rounds=2 if args.small else 20,
        target_epsilon=8.0,
        lr=0.5,
        batch_size=16,
    )
    trained = [name for name, p in result.model.named_parameters() if p.requires_grad]
    print(f"accuracy on the central test split after {result.history[-1]['round']} rounds: "
          f"{result.history[-1]['accuracy']:.3f}")  # fmt: skip
    print("trained and sent:", trained)
    print("epsilon per client:", {c: round(v["epsilon"], 3) for c, v in result.privacy["clients"].items()})


if __name__ == "__main__":
    main()
