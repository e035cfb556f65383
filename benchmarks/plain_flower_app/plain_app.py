"""The baseline for fedtrain's deployment overhead: what a user writes by hand from Flower's and
Opacus's examples. Same model (logistic regression on 8x8 digits), same data, same DP-SGD
parameters, Flower's FedAvg with training and evaluation each round; no encryption, no ledger,
no screening, no checkpoints. The final model is saved with torch.save, as a user would.

With run config exchange = "fedtrain" (benchmarks/deployment_overhead.py's default) the strategy's
`send_and_receive` pulls replies on fedtrain's schedule (fedtrain/server/reply_stream.py) instead of
Flower's every 3 s, so both sides' servers exchange messages alike and the clients are what differ."""

import json
import time

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class MeanAndDeviations(nn.Module):
    """fedtrain's logistic model sees each sample as (deviations from its mean, the mean)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=1, keepdim=True)
        return torch.cat([x - mean, mean], dim=1)


def model() -> nn.Module:
    return nn.Sequential(nn.Flatten(), MeanAndDeviations(), nn.Linear(65, 10))


def split(context: Context):
    data = np.load(context.node_config["data-path"])
    x = torch.tensor(data["x"], dtype=torch.float32).reshape(-1, 1, 8, 8) / 255.0
    y = torch.tensor(data["y"], dtype=torch.long)
    n_eval = int(len(x) * float(context.run_config["eval-fraction"]))
    return TensorDataset(x[n_eval:], y[n_eval:]), TensorDataset(x[:n_eval], y[:n_eval])


client = ClientApp()


@client.train()
def train(msg: Message, context: Context) -> Message:
    net = model()
    net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    train_set, _ = split(context)
    cfg = context.run_config
    optimizer = torch.optim.SGD(net.parameters(), lr=float(cfg["lr"]))
    loader = DataLoader(train_set, batch_size=int(cfg["batch-size"]))
    net, optimizer, loader = PrivacyEngine().make_private(
        module=net, optimizer=optimizer, data_loader=loader,
        noise_multiplier=float(cfg["noise-multiplier"]), max_grad_norm=float(cfg["max-grad-norm"]),
    )  # fmt: skip
    loss_fn, total = nn.CrossEntropyLoss(), 0.0
    for _ in range(int(cfg["local-epochs"])):
        for x, y in loader:
            optimizer.zero_grad()
            loss = loss_fn(net(x), y)
            loss.backward()
            optimizer.step()
            total += float(loss)
    state = {k.removeprefix("_module."): v for k, v in net.state_dict().items()}
    metrics = MetricRecord({"train_loss": total, "num-examples": len(train_set)})
    return Message(RecordDict({"arrays": ArrayRecord(state), "metrics": metrics}), reply_to=msg)


@client.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    net = model()
    net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    _, eval_set = split(context)
    x, y = eval_set.tensors
    with torch.no_grad():
        logits = net(x)
    metrics = {
        "eval_loss": float(nn.functional.cross_entropy(logits, y)),
        "eval_acc": float((logits.argmax(1) == y).float().mean()),
        "num-examples": len(y),
    }
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


server = ServerApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    rounds = int(context.run_config["rounds"])
    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_available_nodes=3)
    if context.run_config.get("exchange", "flower") == "fedtrain":
        from fedtrain.server.reply_stream import collect_replies

        def send_and_receive(messages, timeout=None):
            return collect_replies(grid, messages, timeout=3600.0 if timeout is None else timeout)

        grid.send_and_receive = send_and_receive
    started = time.monotonic()
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(model().state_dict()), num_rounds=rounds, timeout=300)
    seconds = time.monotonic() - started
    torch.save(result.arrays.to_torch_state_dict(), context.run_config["model-file"])
    with open(context.run_config["timing-file"], "w") as f:
        json.dump({"rounds": rounds, "seconds": seconds}, f)
