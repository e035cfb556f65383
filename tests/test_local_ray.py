"""Ray's start-up on a busy machine: its fixed 30 s raylet wait raises a bare Exception (seen in CI at
load 40: "The current node timed out during startup"); fedtrain starts Ray again, and gives up in one
sentence. Ray itself is not started here: `ray.init` is replaced by one that fails as Ray does."""

from __future__ import annotations

import pytest
import ray

from fedtrain import local_ray
from fedtrain.errors import FedtrainError

RAY_TIMEOUT = (
    "The current node timed out during startup. This could happen because some of the raylet failed to "
    "startup or the GCS has become overloaded."
)


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    log: list[str] = []
    monkeypatch.setattr(ray, "shutdown", lambda: log.append("shutdown"))
    monkeypatch.setattr(local_ray.time, "sleep", lambda seconds: None)
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    return log


def _init_failing(times: int, log: list[str], error: str = RAY_TIMEOUT):
    def init(**kwargs) -> None:
        log.append("init")
        assert kwargs["num_cpus"] == 2 and "/elsewhere" in kwargs["runtime_env"]["env_vars"]["PYTHONPATH"]
        if log.count("init") <= times:
            raise Exception(error)  # noqa: TRY002 - what Ray raises

    return init


def test_a_startup_timeout_is_tried_again_after_stopping_what_it_started(monkeypatch, calls) -> None:
    monkeypatch.setattr(ray, "init", _init_failing(2, calls))
    local_ray.start_ray({"num_cpus": 2})
    assert calls == ["init", "shutdown", "init", "shutdown", "init"]


def test_it_gives_up_in_one_sentence(monkeypatch, calls) -> None:
    monkeypatch.setattr(ray, "init", _init_failing(99, calls))
    with pytest.raises(FedtrainError, match=r"did not start in 3 tries \(the machine is too busy\)"):
        local_ray.start_ray({"num_cpus": 2})
    assert calls.count("init") == 3


def test_any_other_failure_is_not_retried(monkeypatch, calls) -> None:
    monkeypatch.setattr(ray, "init", _init_failing(1, calls, error="invalid argument num_cpus"))
    with pytest.raises(Exception, match="invalid argument"):
        local_ray.start_ray({"num_cpus": 2})
    assert calls == ["init"]
