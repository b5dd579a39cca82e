"""Raw vs filtered pretraining corpora for the data-pipeline ablation, with one held-out set.

The source's documents are cleaned and split by document as for pretraining; the validation split is
held out first. The train split becomes a raw, web-like corpus (`web_cleaning.make_raw_corpus`: the
defects the cleaning targets planted at stated rates), which `web_cleaning.run_cleaning` filters. One
tokenizer, trained on the clean train split (neither arm's corpus), packs the raw corpus, the
deduplicated corpus (normalised, exact and near duplicates removed, no quality rules), the filtered
corpus and the validation split. A train batch is `{"raw": blocks, "deduped": blocks, "filtered":
blocks}`: every arm reads the same number of tokens per step, each from its own shuffle.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Sampler

from datamodules import tokenizer as bpe
from datamodules import web_cleaning
from datamodules.clean import clean, corpus_hash
from datamodules.packing import Blocks, build_split
from datamodules.pretrain import (PIPELINE_VERSION, CorpusConfig, PretrainDataModule, cache_root, partial_folder, settings_hash,
                                 sweep_partials)
from datamodules.sampler import ResumableSampler
from datamodules.sources import DataFormatError, Document, read_source

CORPORA = ("raw", "deduped", "filtered")  # deduped: the raw corpus after normalisation and both dedup stages only
VERSION = 2  # bump when what `prepare` builds changes, so an older cached folder is not reused


@dataclass
class AblationDataConfig:
    """The `pipeline.` section: which source documents, what is planted in the raw corpus, the filters' settings."""

    only: str | None = "docs/"  # keep source documents whose id starts with this (Gopher's rules are for prose); None: all
    plant_seed: int = 0
    plants: dict[str, float] = field(default_factory=dict)  # `web_cleaning.PlantRates` fields; {}: its defaults
    filters: dict[str, Any] = field(default_factory=dict)  # `web_cleaning.CleaningConfig` fields, `quality:` nested; {}: the papers'

    def __post_init__(self) -> None:
        self.rates()  # a bad rate or filter setting stops the run at config time
        self.filter_config()

    def rates(self) -> web_cleaning.PlantRates:
        try:
            return web_cleaning.PlantRates(**self.plants)
        except TypeError as err:
            raise ValueError(f"pipeline.plants: {err}; fields: {', '.join(web_cleaning.PlantRates.__dataclass_fields__)}") from None

    def filter_config(self) -> web_cleaning.CleaningConfig:
        settings = dict(self.filters)
        try:
            quality = web_cleaning.QualityConfig(**settings.pop("quality", {}))
            return web_cleaning.CleaningConfig(**settings, quality=quality)
        except TypeError as err:
            raise ValueError(f"pipeline.filters: {err}; see datamodules/web_cleaning.py (CleaningConfig, QualityConfig)") from None


class ZippedSampler(Sampler[tuple[int, ...]]):
    """Index tuples: one row of each corpus per sample, from independent resumable shuffles."""

    def __init__(self, samplers: list[ResumableSampler]) -> None:
        self.samplers = samplers

    def __iter__(self) -> Iterator[tuple[int, ...]]:
        return zip(*self.samplers)

    def __len__(self) -> int:
        return len(self.samplers[0])


class ZippedBlocks(torch.utils.data.Dataset):
    def __init__(self, corpora: dict[str, Blocks]) -> None:
        self.corpora = corpora

    def __getitem__(self, index: tuple[int, ...]) -> dict[str, torch.Tensor]:
        return {name: blocks[i] for (name, blocks), i in zip(self.corpora.items(), index)}


def near_copy_similarity(raw: list, config: web_cleaning.CleaningConfig) -> list[dict[str, Any]]:
    """Each planted near-copy's exact Jaccard similarity to its source (the shingle sets MinHash estimates)."""
    texts = {d.id: d.text for d in raw}
    out = []
    for doc in raw:
        if web_cleaning.plant_kind(doc.id) == "near-of":
            source = doc.id.split(":", 1)[1].rsplit("#", 1)[0]
            a, b = web_cleaning.shingles(doc.text, config.shingle_words), web_cleaning.shingles(texts[source], config.shingle_words)
            out.append({"id": doc.id, "jaccard": len(a & b) / max(1, len(a | b))})
    return out


def prepare(config: CorpusConfig, settings: AblationDataConfig, block_size: int) -> Path:
    """Build (once; cached by corpus and settings) the folder with tokenizer.json, raw/, filtered/, val/ and meta.json."""
    root = cache_root(config)
    documents, note = read_source(config.source, config.text_field, config.hub_split, root)
    if settings.only:
        documents = [d for d in documents if d.id.startswith(settings.only)]
        if not documents:
            raise DataFormatError(f"pipeline.only={settings.only!r}: no document id of {config.source} starts with it; "
                                  "set pipeline.only=null to keep every document")
    corpus = clean(documents, config.min_doc_chars, config.max_bytes, config.val_fraction)
    digest = corpus_hash(corpus)
    key = hashlib.sha256(json.dumps({"settings": settings_hash(config, block_size), "ablation": asdict(settings),
                                     "pipeline": PIPELINE_VERSION, "version": VERSION}, sort_keys=True).encode()).hexdigest()[:8]
    folder = root / "ablation" / f"{digest[:16]}-{key}"
    if (folder / "meta.json").is_file():
        rank_zero_info(f"ablation corpora {digest[:16]}: cached at {folder}")
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    sweep_partials(folder.parent)
    partial = partial_folder(folder)
    try:
        raw = web_cleaning.make_raw_corpus(corpus.train, settings.plant_seed, settings.rates())
        filters = settings.filter_config()
        kept, stages = web_cleaning.run_cleaning(raw, filters)
        plants = web_cleaning.score_against_plants(raw, kept, stages["removed"])
        similarity = near_copy_similarity(raw, filters)
        for entry in similarity:
            entry["removed"] = entry["id"] in stages["removed"]
        dedup = ("exact_dedup", "near_dedup")
        deduped = [Document(d.id, web_cleaning.normalize_text(d.text)) for d in raw if stages["removed"].get(d.id) not in dedup]
        tokenizer = bpe.load_or_train([d.text for d in corpus.train], config.vocab_size, root)
        bpe.save(tokenizer, partial / "tokenizer.json")
        tokens = {}
        for name, docs in (("raw", raw), ("deduped", deduped), ("filtered", kept)):
            count, blocks, _ = build_split([d.text for d in docs], tokenizer, block_size, partial / name, name)
            tokens[name] = {"docs": len(docs), "tokens": count, "blocks": blocks}
        val_tokens, val_blocks, val_counts = build_split([d.text for d in corpus.val], tokenizer, block_size, partial / "val", "val")
        stats = {
            "source_docs": len(documents), "clean_train_docs": len(corpus.train), "val_docs": len(corpus.val),
            **{f"{name}_{k}": v for name, t in tokens.items() for k, v in t.items()},
            "val_tokens": val_tokens, "val_blocks": val_blocks, "note": note,
        }
        meta = {
            "corpus_hash": digest, "source": config.source, "block_size": block_size, "vocab_size": tokenizer.get_vocab_size(),
            "stats": stats, "stages": {k: v for k, v in stages.items() if k != "duplicate_of"}, "plants": plants,
            "near_copies": similarity,
            "val_unigram_counts": val_counts.tolist(),
        }
        (partial / "meta.json").write_text(json.dumps(meta, default=str))
        try:
            os.replace(partial, folder)
        except OSError:
            if not (folder / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    rank_zero_info(f"ablation corpora {digest[:16]}: built at {folder}")
    return folder


class AblationDataModule(PretrainDataModule):
    """Train batches `{"raw": (B, T + 1), "filtered": (B, T + 1)}`; validation blocks (B, T + 1) of the held-out split."""

    def __init__(self, config: CorpusConfig, settings: AblationDataConfig, block_size: int, seed: int = 0) -> None:
        super().__init__(config, block_size, seed)
        self.settings = settings

    def prepare_data(self) -> None:
        if self.folder is None:
            self.folder = prepare(self.config, self.settings, self.block_size)

    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()
        self.meta = json.loads((self.folder / "meta.json").read_text())
        self.corpora = {name: Blocks(self.folder / name) for name in CORPORA}
        self.val_set = Blocks(self.folder / "val")

    def train_dataloader(self) -> DataLoader:
        samplers = [self.train_sampler(len(self.corpora[name])) for name in CORPORA]
        return DataLoader(ZippedBlocks(self.corpora), self.config.batch_size, sampler=ZippedSampler(samplers),
                          drop_last=True, **self._loader_args())

    @property
    def near_copies(self) -> list[dict[str, Any]]:
        """Each planted near-copy: its exact Jaccard similarity to its source and whether the pipeline removed it."""
        return self._meta()["near_copies"]

    @property
    def stages(self) -> dict[str, Any]:
        """What each stage of the pipeline removed, by rule and by document id (`web_cleaning.run_cleaning`'s stats)."""
        return self._meta()["stages"]

    @property
    def plants(self) -> dict[str, Any]:
        """Recall and false positives against the planted defects (`web_cleaning.score_against_plants`)."""
        return self._meta()["plants"]
