"""Tabular regression from Python: scikit-learn's bundled diabetes data, a small MLP you define,
DP-SGD on every client, and the fitted model back in your hands.

    python examples/tabular_regression.py            # 5 clients, 30 rounds
    python examples/tabular_regression.py --small    # what `make test` runs

The targets (a disease-progression score) lie between 25 and 346 by the data set's documentation:
that public range scales them to [0, 1] and bounds the private release of the metrics. Scaling them
by their own mean or spread would read the data and cost privacy.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from sklearn.datasets import load_diabetes
from torch import nn

import fedtrain

LOW, HIGH = 25.0, 346.0  # the target's documented range: public knowledge, not read from the data


def make_model(input_shape: list[int], num_outputs: int) -> nn.Module:
    return nn.Sequential(nn.Linear(input_shape[0], 16), nn.Tanh(), nn.Linear(16, num_outputs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a quick run (tests)")
    args = parser.parse_args()
    data = load_diabetes()
    x = data.data.astype(np.float32) * 10  # the bundled features are already centred and scaled to ~0.1
    y = ((data.target - LOW) / (HIGH - LOW)).astype(np.float32)
    result = fedtrain.simulate(
        data=(x, y),
        model=make_model,
        task="regression",
        target_range=[0.0, 1.0],
        clients=3 if args.small else 5,
        rounds=3 if args.small else 30,
        target_epsilon=8.0,
        lr=0.5,
        batch_size=16,
    )
    last = result.history[-1]
    predicted = result.model(torch.from_numpy(x[:5])).detach().numpy().ravel() * (HIGH - LOW) + LOW
    print(f"R^2 on the central test split after {last['round']} rounds: {last['accuracy']:.3f}")
    print("first five predictions:", np.round(predicted).tolist(), "true:", data.target[:5].tolist())
    print("epsilon per client:", {c: round(v["epsilon"], 3) for c, v in result.privacy["clients"].items()})


if __name__ == "__main__":
    main()
