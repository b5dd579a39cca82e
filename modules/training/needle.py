"""A synthetic needle-retrieval task: key-value pairs hidden in a long context of filler, then queries.

Each sequence is `context` tokens: filler tokens with `pairs` key-value pairs placed at random
positions, then `queries` lookups at the end (query marker, key, value). A model answers a lookup
when it predicts the value after the key, which it can only do by retrieving the pair from far back
in the context: the multi-needle retrieval of the Differential Transformer paper (Ye et al. 2025,
Sec. 3.4) in token form, small enough to train a model for from scratch. Accuracy is the share of
lookups whose value is the model's argmax.

Token ids: 0 the query marker, then `keys` key ids, `values` value ids and `filler` filler ids.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset

from modules.nn import Decoder, DecoderConfig
from modules.parallel.plan import TechniqueModule


@dataclass
class NeedleConfig:
    """The `needle.` section: the task and the training each arm gets on it."""

    enabled: bool = False
    context: int = 256  # tokens per sequence, lookups included
    pairs: int = 8  # key-value pairs hidden in the filler
    queries: int = 4  # lookups at the end (of distinct hidden keys)
    keys: int = 64
    values: int = 64
    filler: int = 64
    steps: int = 600
    batch_size: int = 32
    lr: float = 1e-3
    eval_batches: int = 8

    def __post_init__(self) -> None:
        if self.queries > self.pairs:
            raise ValueError(f"needle.queries={self.queries} must not exceed needle.pairs={self.pairs} (each lookup asks a hidden key)")
        if self.pairs > self.keys:
            raise ValueError(f"needle.pairs={self.pairs} distinct keys need needle.keys >= {self.pairs}")
        if 2 * self.pairs + 3 * self.queries > self.context:
            raise ValueError(f"needle.context={self.context} cannot hold {self.pairs} pairs and {self.queries} lookups")

    @property
    def vocab_size(self) -> int:
        return 1 + self.keys + self.values + self.filler


def make_batch(config: NeedleConfig, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens (batch, context), answer positions (batch, queries)): tokens[:, p] is the value to predict from p - 1."""
    K0, V0, F0 = 1, 1 + config.keys, 1 + config.keys + config.values
    tail = 3 * config.queries
    body = config.context - tail
    tokens = F0 + torch.randint(0, config.filler, (batch, config.context), generator=generator)
    answers = torch.empty(batch, config.queries, dtype=torch.long)
    for row in range(batch):
        keys = torch.randperm(config.keys, generator=generator)[: config.pairs]
        values = torch.randint(0, config.values, (config.pairs,), generator=generator)
        # pair i at slots 2 s_i, 2 s_i + 1 of the body, slots drawn without overlap
        slots = torch.randperm(body // 2, generator=generator)[: config.pairs]
        tokens[row, 2 * slots] = K0 + keys
        tokens[row, 2 * slots + 1] = V0 + values
        asked = torch.randperm(config.pairs, generator=generator)[: config.queries]
        for q, i in enumerate(asked.tolist()):
            at = body + 3 * q
            tokens[row, at : at + 3] = torch.stack([torch.tensor(0), K0 + keys[i], V0 + values[i]])
            answers[row, q] = at + 2
    return tokens, answers


def lookup_loss(model: Decoder, tokens: torch.Tensor, answers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy of the answers, share answered right) for one batch."""
    logits = model(tokens[:, :-1])  # position p - 1 predicts token p
    picked = logits.gather(1, (answers - 1).unsqueeze(-1).expand(-1, -1, logits.shape[-1]))  # (B, Q, V)
    target = tokens.gather(1, answers)
    loss = F.cross_entropy(picked.flatten(0, 1).float(), target.flatten())
    return loss, (picked.argmax(-1) == target).float().mean()


class NeedleBatches(IterableDataset):
    """`count` batches of the task, the same ones on every pass (a generator seeded with `seed` each time)."""

    def __init__(self, config: NeedleConfig, count: int, seed: int) -> None:
        self.config, self.count, self.seed = config, count, seed

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(self.seed)
        for _ in range(self.count):
            yield make_batch(self.config, self.config.batch_size, generator)


class NeedleDataModule(L.LightningDataModule):
    """`steps` training batches from `seed` and `eval_batches` held-out ones from another seed: every arm trained with
    the same seed sees the same batches and is scored on the same held-out set. Each process of a multi-process fit
    reads the same batches."""

    def __init__(self, config: NeedleConfig, seed: int) -> None:
        super().__init__()
        self.config, self.seed = config, seed

    def train_dataloader(self) -> DataLoader:
        return DataLoader(NeedleBatches(self.config, self.config.steps, self.seed), batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(NeedleBatches(self.config, self.config.eval_batches, self.seed + 1_000_003), batch_size=None)


class NeedleModule(TechniqueModule):
    """A fresh decoder of one arm's shape (`model_config`, its vocabulary and context the task's) trained on the task:
    AdamW without weight decay, linear warm-up over a tenth of the steps; `val/accuracy` is the share of held-out
    lookups answered right. Trained as any model of a run is (`repro.runner.train`)."""

    def __init__(self, model_config: DecoderConfig, config: NeedleConfig) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.config = config
        self.model = Decoder(replace(model_config, vocab_size=config.vocab_size, block_size=config.context))
        self.train_seconds, self.curve = 0.0, []  # wall time of the fit; each step's training loss
        self.held_out: dict[str, float] = {}  # the last validation's mean loss and accuracy
        self._batches: list[tuple[float, float]] = []

    def on_train_start(self) -> None:
        self._start = time.perf_counter()

    def on_train_end(self) -> None:
        self.train_seconds += time.perf_counter() - self._start

    @staticmethod
    def tokens_in(batch: tuple[torch.Tensor, torch.Tensor]) -> int:
        tokens, _ = batch
        return tokens.shape[0] * (tokens.shape[1] - 1)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        loss, _ = lookup_loss(self.model, *batch)
        self.curve.append(float(loss.detach()))
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> None:
        loss, accuracy = lookup_loss(self.model, *batch)
        self._batches.append((float(loss), float(accuracy)))
        self.log_dict({"val/loss": loss, "val/accuracy": accuracy}, on_epoch=True, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        # batches of one size: the mean over them is the mean lookup's (every process reads the same held-out batches)
        if self._batches:
            losses, right = zip(*self._batches)
            self.held_out = {"loss": sum(losses) / len(losses), "accuracy": sum(right) / len(right)}
        self._batches = []

    def on_save_checkpoint(self, checkpoint: dict) -> None:  # a fit restored from final.ckpt reports what it measured
        checkpoint["needle"] = {"held_out": self.held_out, "train_seconds": self.train_seconds, "curve": self.curve[-20:]}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("needle", {})
        self.held_out, self.train_seconds = saved.get("held_out", {}), saved.get("train_seconds", 0.0)
        self.curve = list(saved.get("curve", []))

    def configure_optimizers(self) -> dict:
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.config.lr, weight_decay=0.0)
        warmup = max(1, self.config.steps // 10)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def summary(self) -> dict[str, float | None]:
        """The needle metrics of one arm: held-out accuracy and loss (its last validation), training seconds, the mean
        training loss of the last 20 steps, and chance."""
        last = self.curve[-20:]
        return {"accuracy": self.held_out.get("accuracy"), "loss": self.held_out.get("loss"), "train_seconds": self.train_seconds,
                "train_loss_last": sum(last) / len(last) if last else None, "chance": 1 / self.config.values}
