"""Samplers that split data across ranks: a seeded, resumable training sampler (optionally mixing
data sets by ratio) and an evaluation sampler that visits every sample exactly once."""
from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class TrainSampler(Sampler[int]):
    """Shuffled indices for one rank, reseeded by ``set_epoch`` like DistributedSampler.

    With ``weights`` (one per sample) an epoch draws ``len`` samples with replacement in
    proportion to them, which is how data sets are mixed by ``sample_ratio``. The global order is
    padded to a multiple of ``world_size`` and dealt round-robin. ``skip`` drops the first samples
    of this rank's order, to resume mid-epoch.
    """

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 weights: torch.Tensor | None = None):
        if num_samples == 0:
            raise ValueError("the training data set is empty")
        self.num_samples, self.rank, self.world_size = num_samples, rank, world_size
        self.seed, self.weights = seed, weights
        self.epoch, self.skip = 0, 0
        self.per_rank = math.ceil(num_samples / world_size)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def _global_order(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.weights is None:
            order = torch.randperm(self.num_samples, generator=generator)
        else:
            order = torch.multinomial(self.weights, self.num_samples, replacement=True, generator=generator)
        order = order.tolist()
        padding = self.per_rank * self.world_size - len(order)
        return order + order[:padding]

    def __iter__(self) -> Iterator[int]:
        mine = self._global_order()[self.rank :: self.world_size]
        return iter(mine[self.skip :])

    def __len__(self) -> int:
        return self.per_rank - self.skip


class EvalSampler(Sampler[int]):
    """Indices ``rank, rank + world_size, ...`` in order: each sample on exactly one rank, no padding."""

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1):
        self.indices = list(range(rank, num_samples, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def mixing_weights(sizes: Sequence[int], ratios: Sequence[float]) -> torch.Tensor | None:
    """Per-sample weights so that data set ``i`` is drawn with probability ``ratios[i] / sum``.

    None when every ratio is 1.0 (plain shuffling of the concatenation).
    """
    if all(r == 1.0 for r in ratios):
        return None
    parts = [torch.full((size,), ratio / size, dtype=torch.float64) for size, ratio in zip(sizes, ratios)]
    return torch.cat(parts)
