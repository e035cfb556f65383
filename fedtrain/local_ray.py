"""Start the simulation's local Ray, trying again when a busy machine makes Ray's own start-up time out.

Ray waits a fixed 30 s for its raylet to register with its GCS (`ray._private.node`, not configurable)
and then raises a bare Exception; on a loaded machine (a CI runner beside other jobs) that happens
while nothing is wrong. Flower's Ray backend starts Ray only when none is running, so fedtrain starts
it first, the way Flower would, and tries again a few times before it gives up with one sentence.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

from fedtrain.errors import FedtrainError

log = logging.getLogger(__name__)

START_ATTEMPTS = 3
# the words of the Exception Ray raises when its raylet did not register in time
_STARTUP_TIMEOUT = "timed out during startup"


def start_ray(init_args: dict[str, Any], attempts: int = START_ATTEMPTS) -> None:
    """`ray.init(**init_args)` as Flower's Ray backend calls it, retried after a start-up timeout.

    Flower's backend hands its workers this process's `sys.path` through PYTHONPATH (so a model given
    as `module:factory` imports there too); so does this.

    Args:
        init_args: keyword arguments for `ray.init` (simulation.backend_config's "init_args").
        attempts: how many starts to try before giving up.

    Raises:
        FedtrainError: Ray did not start in `attempts` tries.
    """
    import ray

    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PYTHONPATH"] = pythonpath
    for attempt in range(1, attempts + 1):
        try:
            ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, **init_args)
            return
        except Exception as error:  # noqa: BLE001 - Ray raises a bare Exception for this
            if _STARTUP_TIMEOUT not in str(error):
                raise
            ray.shutdown()  # stops what this attempt started before the next one
            log.warning("Ray's local processes did not start in time (attempt %d of %d)", attempt, attempts)
            time.sleep(attempt)
    raise FedtrainError(
        f"Ray's local processes did not start in {attempts} tries (the machine is too busy); "
        "try again when it has fewer running jobs."
    )
