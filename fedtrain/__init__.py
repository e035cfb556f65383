"""fedtrain: federated, privacy-preserving PyTorch training (Flower + Opacus + AES-GCM).

    import fedtrain
    result = fedtrain.simulate(data="digits", clients=5, rounds=30, target_epsilon=3)
    model = fedtrain.load_model(result.run_dir, result.key_file)

docs/api.md describes the API. Names are imported when first used, so `import fedtrain` (and a
ClientApp process's protocol messages) do not pay for torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "simulate": "fedtrain.api",
    "load_model": "fedtrain.api",
    "RunResult": "fedtrain.api",
    "tune": "fedtrain.api",
    "SearchSpace": "fedtrain.tuning",
    "TuneResult": "fedtrain.tuning",
    "Task": "fedtrain.tasks",
    "Classification": "fedtrain.tasks",
    "Regression": "fedtrain.tasks",
    "Multilabel": "fedtrain.tasks",
    "Config": "fedtrain.config",
    "ClientPolicy": "fedtrain.privacy.policy",
    "Dataset": "fedtrain.data",
    "FedtrainError": "fedtrain.errors",
}

if TYPE_CHECKING:
    from fedtrain.api import RunResult, load_model, simulate, tune
    from fedtrain.config import Config
    from fedtrain.data import Dataset
    from fedtrain.errors import FedtrainError
    from fedtrain.privacy.policy import ClientPolicy
    from fedtrain.tasks import Classification, Multilabel, Regression, Task
    from fedtrain.tuning import SearchSpace, TuneResult


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fedtrain' has no attribute {name!r}")


__all__ = [
    "ClientPolicy",
    "Classification",
    "Config",
    "Dataset",
    "FedtrainError",
    "Multilabel",
    "Regression",
    "RunResult",
    "SearchSpace",
    "Task",
    "TuneResult",
    "__version__",
    "load_model",
    "simulate",
    "tune",
]
