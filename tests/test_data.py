"""The pretraining data pipeline: sources, cleaning, BPE, packing, cache, resumable sampling."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import datasets
import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from datamodules import packing, pretrain
from datamodules.clean import clean, normalize, split, text_hash
from datamodules.packing import pack, stream, tokenize
from datamodules.pretrain import CorpusConfig, PretrainDataModule
from datamodules.sampler import eval_shard, ResumableSampler
from datamodules.sources import DataFormatError, docs_dir_default, Document, python_docs, read_local
from datamodules.tokenizer import EOT_ID, sample, train_bpe

BLOCK = 16
VOCAB = 300
TRICKY = [
    "naïve café — 日本語のテキスト, emoji 🐍🚀, combining e\u0301 and Ωmega",
    "  leading spaces\n\n\n\n\ttabs\tand trailing   \r\nwindows line\rold mac\n",
    "def f(x: int) -> dict[str, list[int]]:\n    return {'a': [x ** 2 for _ in range(3)]}  # comment\n",
    "a literal <|endoftext|> inside a document stays text",
    "",
    " ",
    "\x00\x01 control bytes \ufeff BOM and \U0010ffff last code point",
]


def docs_texts(n: int = 30) -> list[str]:
    """n distinct documents of prose and code, each well over `min_doc_chars`."""
    return [
        f"Document {i}: the quick brown fox jumps over {i} lazy dogs.\ndef f{i}(x):\n    return x * {i}\n" * 3
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(docs_texts() + TRICKY, VOCAB)


@pytest.fixture(scope="module")
def built(text_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> PretrainDataModule:
    """The DataModule over the 12-file stdlib corpus, prepared once for the module."""
    config = CorpusConfig(
        source=str(text_corpus), vocab_size=VOCAB, batch_size=4, cache_dir=str(tmp_path_factory.mktemp("cache"))
    )
    datamodule = PretrainDataModule(config, block_size=BLOCK, seed=3)
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


# --- tokenizer ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TRICKY)
def test_bpe_round_trips_any_text(tokenizer, text: str) -> None:
    ids = tokenizer.encode(text).ids
    assert tokenizer.decode(ids) == text
    assert EOT_ID not in ids  # the literal separator string is ordinary text


def test_bpe_is_deterministic(tokenizer) -> None:
    again = train_bpe(docs_texts() + TRICKY, VOCAB)
    assert again.get_vocab() == tokenizer.get_vocab() and again.get_vocab_size() == VOCAB
    assert again.encode(TRICKY[2]).ids == tokenizer.encode(TRICKY[2]).ids
    assert tokenizer.token_to_id("<|endoftext|>") == EOT_ID


def test_bpe_sample_is_a_deterministic_capped_subset() -> None:
    texts = docs_texts(40)
    chosen = sample(texts, max_bytes=1000)
    assert 0 < sum(len(t) for t in chosen) <= 1000 and set(chosen) < set(texts)
    assert sample(texts[::-1], max_bytes=1000) == chosen  # independent of the documents' order
    assert sorted(sample(texts)) == sorted(texts)


# --- packing -----------------------------------------------------------------------------------


def test_packing_keeps_the_token_stream_in_order(tokenizer) -> None:
    texts = docs_texts(7) + TRICKY[:3]
    expected = [i for text in texts for i in tokenizer.encode(text).ids + [EOT_ID]]
    tokens = tokenize(texts, tokenizer)
    blocks = pack(tokens, BLOCK)
    rows = np.asarray(blocks.with_format("numpy")["ids"])
    assert rows.shape == (len(expected) // (BLOCK + 1), BLOCK + 1)
    assert rows.flatten().tolist() == expected[: rows.size]
    assert stream(tokens).tolist() == expected
    assert blocks.features["ids"].feature.dtype == "uint16" and packing.id_type(70_000) == "int32"


# --- cleaning, dedup, split --------------------------------------------------------------------


def test_normalize() -> None:
    assert normalize("cafe\u0301  \r\nx\t\n\n\n\n\n\ny") == "caf\u00e9\nx\n\n\ny"


def test_exact_dedup_and_short_documents_are_counted() -> None:
    texts = docs_texts(5)
    documents = [Document(f"{i:02d}", t) for i, t in enumerate(texts)]
    documents += [
        Document("10", texts[1].replace("\n", "  \r\n")),
        Document("11", texts[2]),
        Document("12", "too short"),
    ]
    corpus = clean(documents, min_doc_chars=64, val_fraction=0.2)
    assert (
        corpus.stats["docs_read"] == 8 and corpus.stats["dropped_duplicate"] == 2 and corpus.stats["dropped_short"] == 1
    )
    kept = sorted(d.id for d in corpus.train + corpus.val)
    assert kept == ["00", "01", "02", "03", "04"]  # the first copy is the one kept
    assert corpus.stats["bytes"] == sum(len(t.encode()) for t in texts)


def test_max_bytes_takes_documents_in_order_until_the_cap() -> None:
    documents = [Document(f"{i:02d}", t) for i, t in enumerate(docs_texts(10))]
    cap = sum(len(d.text) for d in documents[:4]) + 10
    corpus = clean(documents, max_bytes=cap)
    assert sorted(d.id for d in corpus.train + corpus.val) == ["00", "01", "02", "03"]
    assert corpus.stats["dropped_over_max_bytes"] == 6 and corpus.stats["bytes"] <= cap


def test_split_is_by_document_and_stable() -> None:
    documents = [Document(f"{i:03d}", t) for i, t in enumerate(docs_texts(200))]
    corpus = clean(documents, val_fraction=0.1)
    train, val = {d.id for d in corpus.train}, {d.id for d in corpus.val}
    assert not train & val and len(train | val) == 200 and 5 < len(val) < 40
    more = clean(
        documents + [Document(f"x{i}", f"another document, number {i}, " * 5) for i in range(50)], val_fraction=0.1
    )
    assert {d.id for d in more.val} & (train | val) == val  # adding documents moves none of the old ones
    two = split([(d, text_hash(d.text)) for d in documents[:2]], val_fraction=0.0)
    assert len(two[0]) == 1 and len(two[1]) == 1
    with pytest.raises(ValueError, match="at least 2"):
        clean(documents[:1])


# --- sources -----------------------------------------------------------------------------------


def write_formats(folder: Path, texts: list[str]) -> dict[str, Path]:
    """The same documents as a folder of .txt files, .jsonl, .json and .parquet."""
    (folder / "txt" / "sub").mkdir(parents=True)
    for i, text in enumerate(texts):
        (folder / "txt" / ("sub" if i % 2 else "") / f"{i}.txt").write_text(text)
    rows = [{"text": t, "n": i} for i, t in enumerate(texts)]
    (folder / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (folder / "c.json").write_text(json.dumps(rows))
    datasets.Dataset.from_list(rows).to_parquet(str(folder / "c.parquet"))
    return {
        "txt": folder / "txt",
        "jsonl": folder / "c.jsonl",
        "json": folder / "c.json",
        "parquet": folder / "c.parquet",
    }


def test_local_formats_read_the_same_documents(tmp_path: Path) -> None:
    texts = docs_texts(6)
    for kind, path in write_formats(tmp_path, texts).items():
        documents = read_local(path, cache_dir=tmp_path / "cache")
        assert sorted(d.text for d in documents) == sorted(texts), kind
        assert [d.id for d in documents] == sorted(d.id for d in documents)


def test_broken_jsonl_names_file_and_line_and_leaves_no_partial_cache(tmp_path: Path) -> None:
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"text": "one"}\n{"text": "two"}\n{"text": "three" "oops"}\n')
    cache = tmp_path / "cache"
    datamodule = PretrainDataModule(CorpusConfig(source=str(path), cache_dir=str(cache)), block_size=BLOCK)
    with pytest.raises(DataFormatError, match=r'corpus\.jsonl:3: invalid JSON .*one JSON object with a "text" field'):
        datamodule.prepare_data()
    assert not cache.exists() or not [p for p in cache.iterdir() if p.name != "hf"]


def test_a_failed_build_leaves_no_partial_folder(text_corpus: Path, tmp_path: Path) -> None:
    config = CorpusConfig(source=str(text_corpus), vocab_size=VOCAB, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="the val split has .* tokens, fewer than one block"):
        pretrain.prepare(config, block_size=100_000)  # train packs, then val is too short
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizers"]  # the tokenizer is complete; no corpus folder


def test_missing_text_field_and_missing_path(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"text": "fine"}\n\n{"body": "no text here"}\n')
    with pytest.raises(DataFormatError, match=r'a\.jsonl:3: no "text" field \(found keys \[\'body\'\]\)'):
        read_local(tmp_path / "a.jsonl")
    datasets.Dataset.from_list([{"body": "x", "id": 1}]).to_parquet(str(tmp_path / "b.parquet"))
    with pytest.raises(DataFormatError, match=r'b\.parquet: no "text" column \(columns: body, id\)'):
        read_local(tmp_path / "b.parquet", cache_dir=tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        read_local(tmp_path / "nowhere")


def test_python_docs_has_docs_and_stdlib_without_site_packages(tmp_path: Path) -> None:
    documents, note = python_docs()
    ids = [d.id for d in documents]
    assert ids == sorted(ids) and not any("site-packages" in i or "dist-packages" in i for i in ids)
    assert "stdlib/os.py" in ids and "stdlib/json/decoder.py" in ids
    if docs_dir_default().is_dir():
        assert "docs/library/os.rst.txt" in ids and note == ""
    (tmp_path / "lib" / "site-packages").mkdir(parents=True)
    (tmp_path / "lib" / "m.py").write_text("x = 1\n")
    (tmp_path / "lib" / "site-packages" / "p.py").write_text("y = 2\n")
    alone, note = python_docs(docs_dir=tmp_path / "no-docs", stdlib=tmp_path / "lib")
    assert [d.id for d in alone] == ["stdlib/m.py"] and "corpus is the standard library alone" in note


def test_python_docs_folder_can_be_pointed_elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "docs" / "library").mkdir(parents=True)
    (tmp_path / "docs" / "library" / "x.rst.txt").write_text("Some prose about x.\n" * 10)
    monkeypatch.setenv("LLM_REPRO_PYTHON_DOCS", str(tmp_path / "docs"))
    (tmp_path / "lib").mkdir()
    documents, note = python_docs(stdlib=tmp_path / "lib")
    assert [d.id for d in documents] == ["docs/library/x.rst.txt"] and note == ""


# --- sampler -----------------------------------------------------------------------------------


def take(sampler: ResumableSampler, n: int) -> list[int]:
    indices = iter(sampler)
    return [next(indices) for _ in range(n)]


def test_sampler_resumes_at_the_tail_of_the_stream() -> None:
    full = take(ResumableSampler(10, seed=5), 37)
    assert sorted(full[:10]) == list(range(10)) and full[:10] != full[10:20]  # a fresh permutation each pass
    for k in (0, 3, 4, 9):  # batches of 3, crossing pass boundaries
        assert take(ResumableSampler(10, seed=5, start=3 * k), 37 - 3 * k) == full[3 * k :]
    assert take(ResumableSampler(10, seed=6), 10) != full[:10]


def test_sampler_shards_ranks_disjointly() -> None:
    shards = [take(ResumableSampler(11, seed=1, rank=r, world_size=3), 3) for r in range(3)]
    assert len({i for s in shards for i in s}) == 9  # 11 // 3 each, no index on two ranks
    resumed = take(ResumableSampler(11, seed=1, rank=2, world_size=3, start=4), 5)
    assert resumed == take(ResumableSampler(11, seed=1, rank=2, world_size=3), 9)[4:]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_evaluation_shards_read_what_one_rank_reads(world_size: int) -> None:
    """k batches of b on each of N ranks are the first k * N * b rows of the order, each once, and every rank
    runs as many batches (a rank that stopped early would hang FSDP's gathers)."""
    order = torch.randperm(23, generator=torch.Generator().manual_seed(0)).tolist()
    shards = [eval_shard(order, r, world_size) for r in range(world_size)]
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) == 23 // world_size
    b, k = 2, 2
    read = [row for s in shards for row in s[: k * b]]
    assert sorted(read) == sorted(order[: k * b * world_size])
    with pytest.raises(ValueError, match="3 held-out rows cannot be shared among 4 ranks"):
        eval_shard([0, 1, 2], 0, 4)


# --- the DataModule ----------------------------------------------------------------------------


def test_datamodule_batches_and_stats(built: PretrainDataModule) -> None:
    batch = next(iter(built.train_dataloader()))
    assert batch.shape == (4, BLOCK + 1) and batch.dtype == torch.long
    val = torch.cat(list(built.val_dataloader()))
    stats = built.stats
    assert val.shape == (stats["val_blocks"], BLOCK + 1) and stats["val_blocks"] == stats["val_tokens"] // (BLOCK + 1)
    assert stats["train_blocks"] == stats["train_tokens"] // (BLOCK + 1) and stats["docs_read"] == 12
    assert stats["train_docs"] + stats["val_docs"] == 12 and stats["val_docs"] >= 1 and stats["note"] == ""
    assert built.vocab_size == VOCAB and len(built.corpus_hash) == 64
    assert int(val.max()) < VOCAB and 1 < stats["bytes_per_token"] < 2  # 44 merges only
    # shuffled, but every validation block exactly once
    assert sorted(map(tuple, val.tolist())) == sorted(tuple(built.val_set[i].tolist()) for i in range(len(built.val_set)))


def test_unigram_entropy_matches_a_direct_count(built: PretrainDataModule, text_corpus: Path) -> None:
    corpus = clean(read_local(text_corpus), val_fraction=built.config.val_fraction)
    tokens = [i for d in corpus.val for i in built.tokenizer.encode(d.text).ids + [EOT_ID]]
    p = np.array(list(Counter(tokens).values()), dtype=np.float64) / len(tokens)
    assert built.val_tokens == len(tokens)
    assert built.unigram_entropy() == pytest.approx(float(-(p * np.log(p)).sum()), rel=1e-12)


def test_second_prepare_reuses_the_cache(built: PretrainDataModule, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pretrain, "build_split", lambda *a: pytest.fail("the cache was rebuilt"))
    again = PretrainDataModule(built.config, block_size=BLOCK)
    again.prepare_data()
    assert again.folder == built.folder and not list(built.folder.parent.glob("*.partial"))
    different = PretrainDataModule(built.config, block_size=BLOCK + 1)
    with pytest.raises(pytest.fail.Exception):
        different.prepare_data()  # another block size is another folder


def test_state_dict_skips_consumed_batches(built: PretrainDataModule) -> None:
    stream_ = iter(built.train_dataloader())
    first = [next(stream_) for _ in range(5)]
    built.load_state_dict({"batches_consumed": 3})
    assert built.state_dict() == {"batches_consumed": 3}
    resumed = iter(built.train_dataloader())
    assert all(torch.equal(a, next(resumed)) for a in first[3:])
    built.load_state_dict({"batches_consumed": 0})


class Recorder(L.LightningModule):
    """Trains one scalar and records the first token of every row it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[list[int]] = []

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        self.seen.append(batch[:, 0].tolist())
        return (self.w - batch.float().mean()) ** 2

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fit(
    config: CorpusConfig, folder: Path, max_steps: int, accumulate: int, ckpt: Path | None = None
) -> tuple[Recorder, PretrainDataModule]:
    module, datamodule = Recorder(), PretrainDataModule(config, block_size=BLOCK, seed=3)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        limit_train_batches=max_steps * accumulate,
        accumulate_grad_batches=accumulate,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[ModelCheckpoint(dirpath=folder, every_n_train_steps=2, save_top_k=-1)],
    )
    trainer.fit(module, datamodule, ckpt_path=ckpt)
    return module, datamodule


@pytest.mark.parametrize("accumulate", [1, 2])
def test_a_resumed_trainer_sees_exactly_the_remaining_batches(
    built: PretrainDataModule, tmp_path: Path, accumulate: int
) -> None:
    whole, datamodule = fit(built.config, tmp_path, max_steps=6, accumulate=accumulate)
    assert datamodule.state_dict() == {"batches_consumed": 6 * accumulate}
    checkpoint = tmp_path / "epoch=0-step=2.ckpt"
    assert torch.load(checkpoint, weights_only=True)["PretrainDataModule"] == {"batches_consumed": 2 * accumulate}
    resumed, datamodule = fit(built.config, tmp_path / "again", max_steps=6, accumulate=accumulate, ckpt=checkpoint)
    assert resumed.seen == whole.seen[2 * accumulate :]
    assert datamodule.state_dict() == {"batches_consumed": 6 * accumulate}
    assert math.isclose(resumed.w.item(), whole.w.item(), rel_tol=1e-6)
