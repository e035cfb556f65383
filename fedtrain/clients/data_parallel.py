"""One client's DP-SGD step split across local processes: which rank this is, and each rank's share of
the round's Poisson batches.

The accountant analyses one Poisson sample per step over the whole training split, at rate q. Opacus's
own distributed sampler (DistributedUniformWithReplacementSampler) samples each rank's fixed slice of
the shard independently and skips a rank's empty batch: the ranks then take different numbers of
steps (an all-reduce waits for a step that never comes) and the union of their batches is not the
sample a single process draws. Here every rank draws the same mask over the whole split from the same
seed, exactly as Opacus's single-process sampler does, and keeps every world-th selected example: the
union over ranks is the single process's batch, every rank takes every step (an empty share too),
and the sample rate and step count are Opacus's own. Everything else is Opacus's: its
DifferentiallyPrivateDistributedDataParallel and DistributedDPOptimizer (each rank clips its share;
the clipped sums are all-reduced; only rank 0 adds noise, once for the logical batch).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.utils.data import DataLoader


@dataclass(frozen=True)
class Ranks:
    """This process's place among the processes that train one client's round."""

    rank: int
    world: int


class SplitPoissonSampler(UniformWithReplacementSampler):
    """Opacus's Poisson sampler over the whole split, of which this rank yields every world-th selected
    example (possibly none). With the same generator seed on every rank, the ranks' batches of a step
    are disjoint and together are exactly the batch a single process would draw."""

    def __init__(self, *, num_samples: int, sample_rate: float, generator: torch.Generator, ranks: Ranks) -> None:
        super().__init__(num_samples=num_samples, sample_rate=sample_rate, generator=generator)
        self.ranks = ranks

    def __iter__(self) -> Iterator[list[int]]:
        for indices in super().__iter__():  # the single process's batch, drawn the same way
            yield indices[self.ranks.rank :: self.ranks.world]


def split_loader(private_loader: DataLoader, generator: torch.Generator, ranks: Ranks) -> DataLoader:
    """Opacus's private loader, reading this rank's share of each Poisson batch instead.

    Args:
        private_loader: the DPDataLoader `make_private` returned (its dataset, rate and empty-batch collate).
        generator: the sampling generator, seeded alike on every rank.
        ranks: this rank and how many there are.

    Returns:
        A loader with the same dataset, collate and sample rate, whose batch sampler is a SplitPoissonSampler.
    """
    sampler = SplitPoissonSampler(
        num_samples=len(private_loader.dataset),  # type: ignore[arg-type]
        sample_rate=private_loader.sample_rate,  # type: ignore[attr-defined]  # Opacus's DPDataLoader
        generator=generator,
        ranks=ranks,
    )
    return DataLoader(
        private_loader.dataset,
        batch_sampler=sampler,
        collate_fn=private_loader.collate_fn,  # Opacus's: an empty share is an empty batch of the right shape
        pin_memory=private_loader.pin_memory,
        generator=generator,  # each pass over a loader draws its base seed from it: the same draws as one process
    )
