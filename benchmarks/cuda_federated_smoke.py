"""A short federated DP-SGD run in this process, without Flower's Simulation Engine (no Ray).

    python benchmarks/cuda_federated_smoke.py --device cuda
    python benchmarks/cuda_federated_smoke.py --device cpu --model logistic

It does what `fedtrain simulate` does, with fedtrain's own pieces and nothing re-implemented:
digits split into IID shards (fedtrain.partition), each client's held-out split as the ClientApp
makes it, noise calibrated once for all rounds and a cumulative privacy ledger per client
(fedtrain.privacy.ledger), DP-SGD rounds by fedtrain.clients.trainer.train_round, and the
server's FedAvg: w <- w + sum_i n_i d_i / sum_i n_i over the client updates d_i = w_i - w.
Only the message passing is left out. It asserts the clients' parameters lived on --device.
It needs torch, Opacus, numpy and scikit-learn, not Flower or Ray.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import OrderedDict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing fedtrain


from fedtrain import training_defaults  # noqa: E402
from fedtrain.clients.trainer import TrainSettings, planned_round, train_round  # noqa: E402
from fedtrain.config import Config  # noqa: E402
from fedtrain.data import load_source  # noqa: E402
from fedtrain.device import resolve_device  # noqa: E402
from fedtrain.evaluation import evaluate  # noqa: E402
from fedtrain.models import build_model  # noqa: E402
from fedtrain.data.partition import holdout_split, simulation_shard, simulation_test_set  # noqa: E402
from fedtrain.privacy.calibration import calibrate_noise, client_delta  # noqa: E402
from fedtrain.privacy.ledger import PrivacyLedger  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    p.add_argument("--model", default="cnn", help="logistic, mlp or cnn")
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--target-epsilon", type=float, default=3.0)
    p.add_argument("--lr", type=float, default=None, help="default: by rule (training_defaults.py)")
    return p.parse_args(argv)


def prepared_config(args: argparse.Namespace) -> Config:
    """The run config, completed from the data as fedtrain.simulation.prepare does."""
    config = Config(data="digits", partition="iid", seed=0).replace(
        clients=args.clients,
        rounds=args.rounds,
        model=args.model,
        target_epsilon=args.target_epsilon,
        device=args.device,
        lr=args.lr,
    )
    source = load_source(config)
    names = config.data.labels or source.class_names
    return config.replace(labels=list(names), num_classes=len(names), input_shape=source.input_shape)


def client_train_split(config: Config, pid: int):
    """A simulated client's training split, as fedtrain.clients.app._splits makes it."""
    shard = simulation_shard(config, pid)
    train_idx, _ = holdout_split(len(shard), config.data.eval_fraction, config.federation.seed * 1_000_003 + pid)
    return shard.subset(train_idx)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = resolve_device(args.device)
    config = prepared_config(args)
    print(f"torch {torch.__version__}, device {device}")
    if device.type == "cuda":
        print(f"GPU: {torch.cuda.get_device_name(device)}")

    def new_model() -> torch.nn.Module:
        return build_model(
            config.training.model,
            config.data.input_shape,
            config.data.num_classes,
            hidden=config.training.hidden,
            seed=config.federation.seed,
        )

    clients = []
    for pid in range(config.federation.clients):
        train = client_train_split(config, pid)
        # the family's rules (fedtrain/training_defaults.py) without the accountant's batch search: the
        # largest batch; this script checks CUDA training, not the batch the ClientApp would choose
        local = training_defaults.resolve(config, len(train))
        settings = TrainSettings(
            local.batch_size, local.local_epochs, local.lr, config.training.momentum, local.max_grad_norm
        )
        ledger = PrivacyLedger(
            delta=client_delta(len(train), config.privacy.delta), accountant=config.privacy.accountant
        )
        plan = planned_round(len(train), settings, 1.0)
        total_steps = plan.steps * config.federation.rounds  # calibrated once for the whole run, as the ClientApp does
        sigma = calibrate_noise(
            config.privacy.target_epsilon, ledger.delta, plan.sample_rate, total_steps, ledger.accountant
        )
        client = {"name": f"client-{pid}", "train": train, "ledger": ledger, "sigma": sigma, "settings": settings}
        clients.append(client)
        print(f"client-{pid}: {len(train)} training samples, noise multiplier {sigma:.3f}, delta {ledger.delta:.2g}")

    test_set = simulation_test_set(config)
    server_model = new_model()  # the server keeps and evaluates the global model on the CPU, as fedtrain's does
    state = OrderedDict((k, v.detach().clone()) for k, v in server_model.state_dict().items())
    _, accuracy = evaluate(server_model, test_set, torch.device("cpu"))
    print(f"round 0: test accuracy {accuracy:.3f} ({len(test_set)} samples), model {config.training.model}")

    for rnd in range(1, config.federation.rounds + 1):
        started = time.perf_counter()
        updates, weights, epsilons = [], [], {}
        for client in clients:
            ledger = client["ledger"]
            settings = client["settings"]
            plan = planned_round(len(client["train"]), settings, client["sigma"])
            if ledger.epsilon(plan) > config.effective_max_epsilon * (1 + 1e-9):
                epsilons[client["name"]] = f"{ledger.epsilon():.3f} (refused: budget)"
                continue
            model = new_model()
            model.load_state_dict(state, strict=True)
            result = train_round(model, client["train"], settings, client["sigma"], ledger, device)
            on = {p.device.type for p in model.parameters()}
            assert on == {device.type}, f"{client['name']} trained with parameters on {on}, not {device.type}"
            ledger.record(result.entry)
            epsilons[client["name"]] = f"{ledger.epsilon():.3f}"
            updates.append({k: v.detach().cpu() - state[k] for k, v in model.state_dict().items()})
            weights.append(result.num_examples)
        assert updates, f"round {rnd}: every client refused"
        total = sum(weights)
        state = OrderedDict(
            (k, (v + sum(n * u[k] for u, n in zip(updates, weights, strict=True)) / total).to(v.dtype))
            for k, v in state.items()
        )
        server_model.load_state_dict(state)
        loss, accuracy = evaluate(server_model, test_set, torch.device("cpu"))
        eps = ", ".join(f"{name} {e}" for name, e in epsilons.items())
        seconds = time.perf_counter() - started
        print(f"round {rnd}: test accuracy {accuracy:.3f}, loss {loss:.3f}, {seconds:.1f}s; epsilon: {eps}")
    print(
        f"OK: {config.federation.rounds} rounds, {config.federation.clients} clients, "
        f"client parameters on {device.type}"
    )


if __name__ == "__main__":
    main()
