"""The per-round checkpoint: everything a run needs to continue after its server stops.

checkpoint.ftenc is one encrypted envelope, written atomically after every round, holding
  tensors  "model/<name>": the global model;
           "strategy/<attr>/<key>": the server optimizer's state (FedOpt's moments m_t and v_t,
           FedAvgM's momentum), so a resumed FedAdam does not restart its moments;
  meta     the round, the run id, the resolved config and its fingerprint, the metrics history,
           every client's last privacy record, client-level DP (released rounds, accountant state,
           adaptive clipping bound), and the state of Python's global generator, from which Flower
           samples the clients of each round (seeded with the run's seed). Client-level DP noise
           comes from a generator that is never stored (strategies/central_dp.py).

Resuming checks the run id, the key and the config before anything runs; a mismatch is refused.
"""

from __future__ import annotations

import hashlib
import random
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedtrain._flower import OPTIMIZER_STATE  # Flower's FedOpt family and FedAvgM
from fedtrain.config import Config
from fedtrain.errors import FedtrainError
from fedtrain.privacy.ledger import PrivacyLedger
from fedtrain.security.keys import ModelKey, load_model_key
from fedtrain.server.model_files import CHECKPOINT_FILE, MODEL_FILE, load_model, read_run_info, save_model
from fedtrain.server.screening import ClientPrivacy

FORMAT = 2  # 2: ledgers with metric releases, lifetime epsilon
# Where a run is kept and how it reaches its key or devices may change between runs of the same federation.
MAY_CHANGE = ("run_dir", "key_file", "kit", "device")


def fingerprint(config: Config) -> str:
    """What must not change when a run is resumed, as a short hash."""
    return hashlib.sha256(repr(sorted(_comparable(config).items())).encode()).hexdigest()[:16]


def _comparable(config: Config) -> dict[str, Any]:
    return {k: v for k, v in config.to_run_config().items() if k.replace("-", "_") not in MAY_CHANGE}


def _layers(strategy: Any) -> list[Any]:
    """The strategy and, for a DP wrapper, the strategy inside it."""
    inner = getattr(strategy, "strategy", None)
    return [strategy, inner] if inner is not None else [strategy]


def _strategy_tensors(strategy: Any) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for depth, layer in enumerate(_layers(strategy)):
        for attr in OPTIMIZER_STATE:
            value = getattr(layer, attr, None)
            items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
            for key, array in items:
                out[f"strategy/{depth}/{attr}/{key}"] = torch.from_numpy(np.array(array))
    return out


def _restore_strategy(strategy: Any, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    layers = _layers(strategy)
    found: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for name, tensor in tensors.items():
        _, level, attr, key = name.split("/", 3)
        found.setdefault((int(level), attr), {})[key] = tensor.numpy()
    for (depth, attr), values in found.items():
        if depth >= len(layers) or attr not in OPTIMIZER_STATE:
            raise FedtrainError(f"the checkpoint holds optimizer state {attr!r} this run's strategy does not have.")
        is_list = attr == "momentum_vector"
        setattr(layers[depth], attr, [values[str(i)] for i in range(len(values))] if is_list else values)
    if meta.get("clipping_norm") is not None:
        strategy.clipping_norm = float(meta["clipping_norm"])
    accountant = getattr(strategy, "accountant", None)
    if accountant is not None and meta.get("accountant") is not None:
        accountant.load_state_dict(meta["accountant"])


def _rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    return {"python": [version, list(internal), gauss]}


def _restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _privacy_json(privacy: dict[str, ClientPrivacy]) -> dict[str, Any]:
    return {
        cid: {
            "epsilon": p.epsilon,
            "lifetime_epsilon": p.lifetime_epsilon,
            "metrics": p.metrics,
            "ledger": p.ledger.to_dict(),
        }
        for cid, p in privacy.items()
    }


def _privacy_from_json(data: dict[str, Any]) -> dict[str, ClientPrivacy]:
    out = {}
    for cid, item in data.items():
        ledger = PrivacyLedger.from_dict(item["ledger"])
        lifetime = item.get("lifetime_epsilon")
        out[cid] = ClientPrivacy(
            ledger.delta,
            ledger,
            float(item["epsilon"]),
            None if lifetime is None else float(lifetime),
            str(item.get("metrics", "private")),
        )
    return out


@dataclass
class Resumed:
    """A run's state after its last complete round, read back from its checkpoint."""

    server_round: int
    model: OrderedDict[str, torch.Tensor]
    rows: list[dict[str, Any]]
    privacy: dict[str, ClientPrivacy]
    released: list[int]


def resumable_run_id(run_dir: Path, model_key: ModelKey) -> str:
    """The run id of an unfinished run in `run_dir` that `model_key` opens; else a clear refusal."""
    info = read_run_info(run_dir)
    if (run_dir / MODEL_FILE).exists():
        raise FedtrainError(f"the run in {run_dir} is complete (it has its final model); nothing to resume.")
    if info.get("key_id") != model_key.key_id:
        raise FedtrainError(
            f"the run in {run_dir} was encrypted with key {info.get('key_id')}, and this is key "
            f"{model_key.key_id}; resume it with its own key."
        )
    return str(info["run_id"])


def preflight(config: Config) -> int:
    """Check, before anything starts, that the run in config.deployment.run_dir can be resumed with `config`
    and its key; returns its last complete round."""
    from fedtrain.strategies import make_strategy

    run_dir, model_key = Path(str(config.deployment.run_dir)), load_model_key(config.deployment.key_file)
    run_id = resumable_run_id(run_dir, model_key)
    return load(run_dir, model_key.key, run_id, config, make_strategy(config)).server_round


def save(
    run_dir: Path,
    key: bytes,
    run_id: str,
    server_round: int,
    model: dict[str, torch.Tensor],
    strategy: Any,
    config: Config,
    rows: list[dict[str, Any]],
    privacy: dict[str, ClientPrivacy],
    released: list[int],
) -> None:
    accountant = getattr(strategy, "accountant", None)
    meta = {
        "format": FORMAT,
        "round": server_round,
        "run_id": run_id,
        "config": _comparable(config),
        "fingerprint": fingerprint(config),
        "rows": rows,
        "privacy": _privacy_json(privacy),
        "released": released,
        "accountant": accountant.state_dict() if accountant is not None else None,
        "clipping_norm": getattr(strategy, "clipping_norm", None),
        "rng": _rng_state(),
    }
    tensors = {f"model/{k}": v for k, v in model.items()} | _strategy_tensors(strategy)
    save_model(run_dir / CHECKPOINT_FILE, tensors, key, run_id, "checkpoint", _json_safe(meta))


def load(run_dir: Path, key: bytes, run_id: str, config: Config, strategy: Any) -> Resumed:
    """Read the last checkpoint of `run_id`, check it belongs to `config`, restore `strategy` and
    the RNGs in place. Everything wrong with it is a clear FedtrainError."""
    path = run_dir / CHECKPOINT_FILE
    if not path.exists():
        raise FedtrainError(f"{run_dir} has no checkpoint ({CHECKPOINT_FILE}): no round completed, start it anew.")
    tensors, meta = load_model(path, key, run_id, "checkpoint")
    try:
        if meta.get("format") != FORMAT or meta.get("run_id") != run_id:
            raise ValueError("it is not a checkpoint of this run in a format this fedtrain reads")
        if meta["fingerprint"] != fingerprint(config):
            raise FedtrainError(_config_difference(meta["config"], _comparable(config), run_dir))
        model = OrderedDict((k[len("model/") :], v) for k, v in tensors.items() if k.startswith("model/"))
        _restore_strategy(strategy, {k: v for k, v in tensors.items() if k.startswith("strategy/")}, meta)
        _restore_rng(meta["rng"])
        rows = list(meta["rows"])
        server_round = int(meta["round"])
        if len(rows) != server_round:
            raise ValueError(f"it holds {len(rows)} rounds of metrics for round {server_round}")
        return Resumed(server_round, model, rows, _privacy_from_json(meta["privacy"]), list(meta["released"]))
    except FedtrainError:
        raise
    except (KeyError, TypeError, ValueError, ArithmeticError, AttributeError) as exc:
        raise FedtrainError(f"the checkpoint in {run_dir} is unusable ({exc}); the run cannot be resumed.") from None


def _config_difference(saved: dict[str, Any], now: dict[str, Any], run_dir: Path) -> str:
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    shown = ", ".join(f"{k.replace('-', '_')} ({saved.get(k)!r} then, {now.get(k)!r} now)" for k in changed[:3])
    return (
        f"the run in {run_dir} was started with another configuration ({shown}); resume it with its own "
        "config (leave those options out), or start a new run."
    )


def _json_safe(value: Any) -> Any:
    """NaN and infinities are not JSON: store them as strings the loader accepts back."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
