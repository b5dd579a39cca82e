"""Instruction tuning data: conversations -> (ids, labels) padded per batch, loss on responses only.

Each conversation is one row, right-padded to the longest row of its batch: a causal model never
attends to padding on its right, and padding's labels are IGNORE, so rows never see each other and
a batch trains exactly on its responses. The embedded default is the verifiable task family
(`datamodules/verifiable.py`), generated with a training seed and with every question that the
held-out evaluation rows contain removed, so training and evaluation share no prompt.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from tokenizers import Tokenizer
from torch.utils.data import DataLoader

from datamodules.chat import END, add_chat_tokens, encode, is_chat_tokenizer, read_records, verifiable_conversations
from datamodules.sampler import ResumableBatches
from datamodules.sources import DataFormatError
from datamodules.verifiable import GENERATORS, verifiable_rows
from modules.nn.decoder import IGNORE

VERIFIABLE = "verifiable"
FAMILIES = ["copy", "reverse", "sort", "count_letter", "arithmetic"]


@dataclass
class SFTDataConfig:
    """The `data.` section of an SFT preset."""

    source: str = VERIFIABLE  # "verifiable" (embedded), a local .jsonl/.json/.parquet, or "hf:<name>"
    families: list[str] = field(default_factory=lambda: list(FAMILIES))  # verifiable families to train on
    per_family: int = 2000  # training conversations per family (embedded source)
    hub_split: str = "train"
    val_fraction: float = 0.05
    max_len: int = 64  # conversations longer than this many tokens are dropped (and counted)
    batch_size: int = 32
    num_workers: int = 0
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if not 0 < self.val_fraction < 1:
            raise ValueError("data.val_fraction must be in (0, 1)")
        if self.batch_size <= 0 or self.max_len < 4 or self.per_family <= 0:
            raise ValueError("data.batch_size and data.per_family must be positive and data.max_len at least 4")


def held_out_rows(families: list[str]) -> dict[str, list[dict]]:
    """The evaluation rows of each verifiable family, as `evaluation.build_tasks` writes them."""
    return {family: verifiable_rows(family) for family in families if family in GENERATORS}


class Conversations(torch.utils.data.Dataset):
    def __init__(self, rows: list[tuple[list[int], list[int]]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[list[int], list[int]]:
        return self.rows[i]


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """{"ids", "labels"} (B, T): right-padded with `pad_id` and IGNORE to the longest row."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, (row_ids, row_labels) in enumerate(rows):
        ids[i, : len(row_ids)] = torch.tensor(row_ids)
        labels[i, : len(row_labels)] = torch.tensor(row_labels)
    return {"ids": ids, "labels": labels}


class SFTDataModule(ResumableBatches, L.LightningDataModule):
    """Conversations encoded with the base's tokenizer plus the chat tokens (`tokenizer`, already extended)."""

    def __init__(self, config: SFTDataConfig, tokenizer: Tokenizer, seed: int = 0) -> None:
        super().__init__()
        self.config, self.tokenizer, self.seed = config, tokenizer, seed
        if not is_chat_tokenizer(tokenizer):
            add_chat_tokens(tokenizer)
        self.pad_id = tokenizer.token_to_id(END)  # any id: padding is never attended to or scored
        self.batches_consumed = 0
        self.stats: dict[str, Any] = {}
        self.train_set: Conversations | None = None

    def conversations(self) -> list[tuple[str, list[dict[str, str]]]]:
        """(family or "records", messages) of every training conversation, in a fixed order."""
        c = self.config
        if c.source == VERIFIABLE:
            by_family = verifiable_conversations(c.families, c.per_family, self.seed, held_out_rows(c.families))
            return [(family, m) for family, convs in by_family.items() for m in convs]
        cache = Path(c.cache_dir) if c.cache_dir else None
        return [("records", m) for m in read_records(c.source, c.hub_split, cache)]

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        items = self.conversations()
        if not items:
            raise DataFormatError(f"data.source {self.config.source}: no conversations")
        encoded, dropped = [], 0
        for _, messages in items:
            ids, labels = encode(self.tokenizer, messages)
            if len(ids) > self.config.max_len:
                dropped += 1
                continue
            encoded.append((ids, labels))
        random.Random(self.seed).shuffle(encoded)
        n_val = max(1, int(len(encoded) * self.config.val_fraction))
        self.val_set, self.train_set = Conversations(encoded[:n_val]), Conversations(encoded[n_val:])
        supervised = sum(sum(label != IGNORE for label in labels) for _, labels in encoded)
        self.stats = {"conversations": len(items), "dropped_over_max_len": dropped, "train": len(self.train_set),
                      "val": len(self.val_set), "tokens": sum(len(ids) for ids, _ in encoded), "supervised_tokens": supervised}

    def _loader(self, dataset: Conversations, sampler: Any, drop_last: bool) -> DataLoader:
        return DataLoader(dataset, self.config.batch_size, sampler=sampler, drop_last=drop_last,
                          collate_fn=lambda rows: collate(rows, self.pad_id), num_workers=self.config.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.train_sampler(len(self.train_set)), drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.eval_sampler(len(self.val_set)), drop_last=False)
