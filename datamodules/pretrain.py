"""The pretraining corpus as a LightningDataModule: packed next-token blocks, cached by corpus and settings."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from tokenizers import Tokenizer
from torch.utils.data import DataLoader

from datamodules import tokenizer as bpe
from datamodules.clean import Corpus, clean, corpus_hash
from datamodules.packing import Blocks, build_split
from datamodules.sampler import ResumableBatches
from datamodules.sources import DataFormatError, read_source

PIPELINE_VERSION = 1  # bump when cleaning or packing changes, so old caches are not reused
# A build folder is `.<folder>.pid<pid>@<host>.<random>.partial` while its builder runs.
PARTIAL_OWNER = re.compile(r"\.pid(?P<pid>\d+)@(?P<host>.+)\.[^.]+\.partial$")
STALE_AFTER_S = 24 * 3600  # a build folder whose builder cannot be asked (another host, no pid) untouched this long is dead


@dataclass
class CorpusConfig:
    """The `data.` section of a preset."""

    source: str = "python-docs"  # "python-docs" (embedded), a local file or folder, or "hf:<dataset name>"
    text_field: str = "text"  # column holding text in JSONL/JSON/Parquet/hub data
    hub_split: str = "train"
    max_bytes: int | None = None  # cap on cleaned corpus size (documents taken in sorted id order until the cap)
    min_doc_chars: int = 64
    val_fraction: float = 0.05
    vocab_size: int = 4096  # BPE vocabulary size
    batch_size: int = 16  # micro-batch per device
    num_workers: int = 0
    cache_dir: str | None = None  # default: $LLM_REPRO_CACHE or ~/.cache/llm-repro

    def __post_init__(self) -> None:
        checks = {
            "data.val_fraction must be in [0, 1)": 0 <= self.val_fraction < 1,
            f"data.vocab_size must be at least 257 (256 bytes + {bpe.EOT})": self.vocab_size >= 257,
            "data.batch_size must be positive": self.batch_size > 0,
            "data.max_bytes must be positive or None": self.max_bytes is None or self.max_bytes > 0,
        }
        for message, ok in checks.items():
            if not ok:
                raise ValueError(message)


def cache_root(config: CorpusConfig | Any) -> Path:
    """`config.cache_dir`, else $LLM_REPRO_CACHE, else ~/.cache/llm-repro (any settings with a `cache_dir`)."""
    return Path(
        config.cache_dir or os.environ.get("LLM_REPRO_CACHE") or Path.home() / ".cache" / "llm-repro"
    ).expanduser()


def settings_hash(config: CorpusConfig, block_size: int) -> str:
    """Hash of every setting that changes what is built from a corpus."""
    settings = {
        "vocab_size": config.vocab_size,
        "block_size": block_size,
        "val_fraction": config.val_fraction,
        "min_doc_chars": config.min_doc_chars,
        "max_bytes": config.max_bytes,
        "pipeline": PIPELINE_VERSION,
        "tokenizer": bpe.SETTINGS,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]


def prepare(config: CorpusConfig, block_size: int) -> Path:
    """Read, clean and hash the corpus; build its folder under the cache unless it is already there.

    The folder, `<corpus hash>-<settings hash>/`, holds tokenizer.json, train/ and val/ (packed Arrow)
    and meta.json. It is built in a temporary sibling and renamed into place only when complete.
    """
    root = cache_root(config)
    documents, note = read_source(config.source, config.text_field, config.hub_split, root)
    try:
        corpus = clean(documents, config.min_doc_chars, config.max_bytes, config.val_fraction)
    except DataFormatError as error:
        raise DataFormatError(f"data.source {config.source}: {error}") from None
    digest = corpus_hash(corpus)
    folder = root / f"{digest[:16]}-{settings_hash(config, block_size)}"
    if (folder / "meta.json").is_file():
        rank_zero_info(f"corpus {digest[:16]}: cached at {folder}")
        return folder
    root.mkdir(parents=True, exist_ok=True)
    sweep_partials(root)
    partial = partial_folder(folder)
    try:
        try:
            build(corpus, digest, note, config, block_size, partial)
        except DataFormatError as error:  # too little text for a block: say which corpus
            raise DataFormatError(f"data.source {config.source}: {error}") from None
        try:
            os.replace(partial, folder)
        except OSError:
            if not (folder / "meta.json").is_file():  # not merely another process finishing first
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    rank_zero_info(f"corpus {digest[:16]}: built at {folder}")
    return folder


def partial_folder(folder: Path) -> Path:
    """A new, empty sibling of `folder` to build it in, named for this process so that `sweep_partials` can
    tell a build in progress from one whose process was killed."""
    owner = f"pid{os.getpid()}@{socket.gethostname()}"
    return Path(tempfile.mkdtemp(prefix=f".{folder.name}.{owner}.", suffix=".partial", dir=folder.parent))


def sweep_partials(root: Path) -> list[Path]:
    """Remove the `.partial` build folders in `root` whose builder is gone; returns them.

    Gone: its process on this host is dead, or (another host's, or an unnamed one) untouched for
    `STALE_AFTER_S`. A build still running, here or on another host sharing the cache, is left alone.
    """
    removed = []
    for partial in sorted(root.glob(".*.partial")):
        if partial.is_dir() and _builder_gone(partial):
            shutil.rmtree(partial, ignore_errors=True)
            removed.append(partial)
    return removed


def _builder_gone(partial: Path) -> bool:
    owner = PARTIAL_OWNER.search(partial.name)
    if owner and owner["host"] == socket.gethostname():
        return not _alive(int(owner["pid"]))
    try:
        return time.time() - partial.stat().st_mtime > STALE_AFTER_S
    except FileNotFoundError:  # its builder just finished
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def build(corpus: Corpus, digest: str, note: str, config: CorpusConfig, block_size: int, folder: Path) -> None:
    """Train (or fetch) the tokenizer on a sample of the train documents, pack both splits, write meta.json last."""
    train_texts = [d.text for d in corpus.train]
    rank_zero_info(
        f"corpus {digest[:16]}: {len(train_texts)} train documents; byte-level BPE, vocabulary {config.vocab_size}"
    )
    tokenizer = bpe.load_or_train(train_texts, config.vocab_size, cache_root(config))
    bpe.save(tokenizer, folder / "tokenizer.json")
    train_tokens, train_blocks, _ = build_split(train_texts, tokenizer, block_size, folder / "train", "train")
    val_tokens, val_blocks, val_counts = build_split(
        [d.text for d in corpus.val], tokenizer, block_size, folder / "val", "val"
    )
    stats = corpus.stats | {
        "train_tokens": train_tokens,
        "val_tokens": val_tokens,
        "train_blocks": train_blocks,
        "val_blocks": val_blocks,
        # EOT separators are not text: bytes per token counts the documents' own tokens
        "bytes_per_token": corpus.stats["train_bytes"] / (train_tokens - corpus.stats["train_docs"]),
        "note": note,
    }
    meta = {
        "corpus_hash": digest,
        "source": config.source,
        "block_size": block_size,
        "vocab_size": tokenizer.get_vocab_size(),
        "stats": stats,
        "val_unigram_counts": val_counts.tolist(),
    }
    (folder / "meta.json").write_text(json.dumps(meta))


class PretrainDataModule(ResumableBatches, L.LightningDataModule):
    """Rows of `block_size + 1` tokens: the model reads `row[:-1]` and predicts `row[1:]`.

    Train batches come from an endless, rank-sharded, resumable shuffle; a checkpoint records how
    many batches this rank consumed, and a resumed run skips exactly those.
    """

    def __init__(self, config: CorpusConfig, block_size: int, seed: int = 0) -> None:
        super().__init__()
        self.config, self.block_size, self.seed = config, block_size, seed
        self.folder: Path | None = None
        self.meta: dict[str, Any] | None = None
        self.batches_consumed = 0  # set by load_state_dict when resuming
        self._tokenizer: Tokenizer | None = None

    def prepare_data(self) -> None:
        if self.folder is None:
            self.folder = prepare(self.config, self.block_size)

    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()  # on ranks other than 0: finds the folder rank 0 built
        self.meta = json.loads((self.folder / "meta.json").read_text())
        self.train_set, self.val_set = Blocks(self.folder / "train"), Blocks(self.folder / "val")

    def train_dataloader(self) -> DataLoader:
        """Batches of shape (batch_size, block_size + 1), LongTensor."""
        return DataLoader(
            self.train_set, self.config.batch_size, sampler=self.train_sampler(len(self.train_set)), drop_last=True,
            **self._loader_args(),
        )

    def val_dataloader(self) -> DataLoader:
        """Validation blocks, (batch_size, block_size + 1), in one fixed shuffled order.

        The order is the same for every run and seed, and shuffled so that a limit on validation
        batches (`train.val_batches`) reads an unbiased sample rather than the first documents. Each
        rank reads its own share of it (`eval_sampler`): N ranks of batch b read what one of batch N * b does.
        """
        order = torch.randperm(len(self.val_set), generator=torch.Generator().manual_seed(0)).tolist()
        return DataLoader(self.val_set, self.config.batch_size, sampler=self.eval_sampler(order), **self._loader_args())

    def _loader_args(self) -> dict[str, Any]:
        workers = self.config.num_workers
        return {"num_workers": workers, "pin_memory": torch.cuda.is_available(), "persistent_workers": workers > 0}

    @property
    def stats(self) -> dict[str, Any]:
        """Counts of every pipeline step (docs read, dropped, split, bytes, tokens, blocks) and `note`."""
        return self._meta()["stats"]

    @property
    def corpus_hash(self) -> str:
        return self._meta()["corpus_hash"]

    @property
    def vocab_size(self) -> int:
        """Entries in the trained tokenizer (at most `config.vocab_size`; fewer on a tiny corpus)."""
        return self._meta()["vocab_size"]

    @property
    def val_tokens(self) -> int:
        return self.stats["val_tokens"]

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._meta()
            self._tokenizer = bpe.load(self.folder / "tokenizer.json")
        return self._tokenizer

    def unigram_entropy(self) -> float:
        """-sum p ln p (nats) of the validation tokens' unigram distribution.

        The loss of a model that knows token frequencies and nothing else.
        """
        counts = np.asarray(self._meta()["val_unigram_counts"], dtype=np.float64)
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log(p)).sum())

    def _meta(self) -> dict[str, Any]:
        if self.meta is None:
            raise RuntimeError("PretrainDataModule: call prepare_data() and setup() first (Trainer.fit does)")
        return self.meta
