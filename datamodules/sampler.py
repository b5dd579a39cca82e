"""An endless, rank-sharded, resumable stream of shuffled row indices."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

ENDLESS = 2**62  # the length declared to the DataLoader; training is bounded by max_steps instead


class ResumableSampler(Sampler[int]):
    """Indices of `n` rows, pass after pass, each pass a fresh permutation seeded by (seed, pass).

    Rank r of `world_size` takes `perm[r::world_size]` of every pass (the last `n % world_size`
    positions are left out so all ranks draw equally many), and starts `start` indices into its
    own stream: resuming after k batches of size b is `start = k * b`, without touching the data.
    """

    def __init__(self, n: int, seed: int = 0, rank: int = 0, world_size: int = 1, start: int = 0) -> None:
        if n < world_size:
            raise ValueError(
                f"{n} rows cannot be shared among {world_size} ranks; use a larger corpus or a smaller block_size"
            )
        self.n, self.seed, self.rank, self.world_size, self.start = n, seed, rank, world_size, start
        self.per_rank = n // world_size  # indices per pass on each rank

    def permutation(self, epoch: int) -> torch.Tensor:
        """The pass's shuffled row indices on this rank, (per_rank,)."""
        seed = int.from_bytes(hashlib.sha256(f"{self.seed}:{epoch}".encode()).digest()[:8], "big") >> 1
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(seed))
        return order[self.rank : self.per_rank * self.world_size : self.world_size]

    def __iter__(self) -> Iterator[int]:
        epoch, offset = divmod(self.start, self.per_rank)
        while True:
            yield from self.permutation(epoch)[offset:].tolist()
            epoch, offset = epoch + 1, 0

    def __len__(self) -> int:
        return ENDLESS


class ResumableBatches:
    """A LightningDataModule's resumable training order: `train_sampler(n)` continues where the batches
    recorded in the checkpoint (`state_dict`) left off. The class using it sets `seed`, `config.batch_size`
    and `batches_consumed = 0`."""

    def train_sampler(self, n: int) -> ResumableSampler:
        """The rank's endless shuffle of `n` rows, past the batches consumed before a resume."""
        rank, world_size = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        return ResumableSampler(n, self.seed, rank, world_size, self.batches_consumed * self.config.batch_size)

    def state_dict(self) -> dict[str, int]:
        """Train batches this rank has consumed.

        `processed` counts a batch once its training step ran, and `ModelCheckpoint` saves in
        `on_train_batch_end`, after that count but before `completed` moves (Lightning 2.6
        `training_epoch_loop.advance`). `total` spans the whole run, resumes included.
        """
        if self.trainer is None:
            return {"batches_consumed": self.batches_consumed}
        return {"batches_consumed": self.trainer.fit_loop.epoch_loop.batch_progress.total.processed}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.batches_consumed = state_dict["batches_consumed"]
