"""fedtrain.device.manual_seed: torch.manual_seed's draws, without queueing seeds for absent accelerators."""

from __future__ import annotations

import pytest
import torch

from fedtrain import device


def test_seeding_gives_torch_manual_seeds_draws_on_the_cpu() -> None:
    for seed in (0, 5, 2**62 + 3):
        device.manual_seed(seed)
        ours = torch.rand(4), torch.randint(0, 100, (4,))
        torch.manual_seed(seed)
        theirs = torch.rand(4), torch.randint(0, 100, (4,))
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))


def test_a_process_that_can_have_an_accelerator_seeds_them_all(monkeypatch: pytest.MonkeyPatch) -> None:
    seeded: list[int] = []
    monkeypatch.setattr(device, "_accelerators", lambda: True)
    monkeypatch.setattr(torch, "manual_seed", seeded.append)
    device.manual_seed(7)
    assert seeded == [7]


def test_without_an_accelerator_nothing_is_queued_for_one(monkeypatch: pytest.MonkeyPatch) -> None:
    if device._accelerators():
        pytest.skip("this machine has an accelerator: torch.manual_seed seeds it")
    queued: list[object] = []
    monkeypatch.setattr(torch.cuda.random, "_lazy_call", lambda *args, **kwargs: queued.append(args))
    device.manual_seed(3)
    assert not queued
    torch.manual_seed(3)  # what it replaces: a lazy call queued for CUDA, with its stack trace
    assert queued
