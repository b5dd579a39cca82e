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


def eval_shard(order: list[int], rank: int, world_size: int) -> list[int]:
    """Rank r's share of an evaluation order: its positions r, r + world_size, ...

    Batches of b rows on each of N ranks then cover the rows that batches of N * b cover on one
    (a limit of k batches reads the same first k * N * b rows of `order` on any number of ranks), and
    no row is read twice. The last `len(order) % world_size` rows are left out so that every rank runs
    as many batches: FSDP gathers weights in every forward, and a rank that stopped early would hang the rest.
    """
    if len(order) < world_size:
        raise ValueError(f"{len(order)} held-out rows cannot be shared among {world_size} ranks: "
                         "hold out more data (a larger validation split) or run on fewer devices")
    return order[rank : len(order) - len(order) % world_size : world_size]


class ResumableBatches:
    """A LightningDataModule's resumable training order: `train_sampler(n)` continues where the batches
    recorded in the checkpoint (`state_dict`) left off, and `eval_sampler` shards a fixed evaluation
    order over the ranks. The class using it sets `seed`, `config.batch_size` and `batches_consumed = 0`."""

    def _rank(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer else (0, 1)

    def train_sampler(self, n: int) -> ResumableSampler:
        """The rank's endless shuffle of `n` rows, past the batches consumed before a resume."""
        rank, world_size = self._rank()
        return ResumableSampler(n, self.seed, rank, world_size, self.batches_consumed * self.config.batch_size)

    def eval_sampler(self, order: list[int] | int) -> list[int]:
        """This rank's rows of a fixed evaluation `order` (or of rows 0..n-1): `eval_shard`."""
        return eval_shard(list(range(order)) if isinstance(order, int) else order, *self._rank())

    def state_dict(self) -> dict[str, int]:
        """Train batches this rank has consumed.

        `processed` counts a batch once its training step ran, and the run's checkpoint saves in
        `on_train_batch_end`, after that count but before `completed` moves (Lightning 2.6
        `training_epoch_loop.advance`), or at the end of the validation that follows the batch, after
        both moved (`repro.callbacks.StepCheckpoint`). `total` spans the whole run, resumes included.
        """
        if self.trainer is None:
            return {"batches_consumed": self.batches_consumed}
        return {"batches_consumed": self.trainer.fit_loop.epoch_loop.batch_progress.total.processed}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.batches_consumed = state_dict["batches_consumed"]
