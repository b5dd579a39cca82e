"""Our subword tokenizers (`datamodules.subword`) against the libraries they reproduce.

`compare` trains each tokenizer on the same texts with the same vocabulary size and measures it on held-out
texts: training seconds, UTF-8 bytes per token and tokens per whitespace-separated word (higher and
lower are better compression), encoding speed in MB of UTF-8 per second (one text at a time, cold
caches: a fresh tokenizer per run), and the vocabulary overlap with its counterpart (ours against
the library, the library against ours): the Jaccard index of the two sets of learned token strings.
Every tokenizer here already spells its tokens the same way (byte-level BPE in GPT-2's byte
alphabet, WordPiece with a `##` continuation prefix, Unigram with `▁` for the space), so the strings
compare as they are; left out are the special tokens and the 256 byte-fallback pieces `<0xNN>`,
identical by construction and not learned. Times are `time.perf_counter` wall seconds of one run on a
machine that may be shared, so they vary by some tens of percent between runs. The tokenizers technique measures
this on its corpus sample; `python -m benchmarks.tokenizers` on any folder of text.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import sentencepiece
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from datamodules import tokenizer as library_bpe
from datamodules.subword import ByteLevelBPE, Unigram, WordPiece
from datamodules.subword import wordpiece

SPECIAL = {library_bpe.EOT, *wordpiece.SPECIAL_TOKENS, "<unk>", "<s>", "</s>"}


@dataclass
class Trained:
    encode: Callable[[str], list[int]]
    vocabulary: list[str]  # every token string, in id order
    model: Any  # the trained tokenizer itself (ours, or the library's object)


def _ours(cls: type) -> Callable[[Sequence[str], int], Trained]:
    def train(texts: Sequence[str], vocab_size: int) -> Trained:
        model = cls.train(texts, vocab_size)
        return Trained(model.encode, model.tokens(), model)
    return train


def _tokenizers_bpe(texts: Sequence[str], vocab_size: int) -> Trained:
    model = library_bpe.train_bpe(texts, vocab_size)
    return Trained(lambda text: model.encode(text).ids, list(model.get_vocab()), model)


def _tokenizers_wordpiece(texts: Sequence[str], vocab_size: int) -> Trained:
    """`tokenizers`' WordPiece: BPE training with the `##` prefix, BERT's pre-tokenizer, no normalizer."""
    model = Tokenizer(models.WordPiece(unk_token=wordpiece.UNK))
    model.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=wordpiece.SPECIAL_TOKENS,
                                        show_progress=False)
    model.train_from_iterator(texts, trainer, length=len(texts))
    return Trained(lambda text: model.encode(text).ids, list(model.get_vocab()), model)


def _tokenizers_unigram(texts: Sequence[str], vocab_size: int) -> Trained:
    """`tokenizers`' Unigram trainer behind the `▁` (Metaspace) pre-tokenizer; it has no byte fallback,
    so a character outside its vocabulary becomes `<unk>`."""
    model = Tokenizer(models.Unigram())
    model.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=["<unk>"], unk_token="<unk>",
                                      show_progress=False)
    model.train_from_iterator(texts, trainer, length=len(texts))
    return Trained(lambda text: model.encode(text).ids, list(model.get_vocab()), model)


def _sentencepiece_unigram(texts: Sequence[str], vocab_size: int) -> Trained:
    """SentencePiece's unigram trainer as ours is set up: byte fallback, no normalisation (identity, spaces
    kept as they are), each text one "sentence" however long."""
    proto = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=proto, model_type="unigram", vocab_size=vocab_size,
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        max_sentence_length=max(len(t.encode("utf-8")) for t in texts) + 1, minloglevel=2)
    model = sentencepiece.SentencePieceProcessor(model_proto=proto.getvalue())
    return Trained(model.encode, [model.id_to_piece(i) for i in range(model.get_piece_size())], model)


# (library, algorithm, train, the library whose vocabulary the overlap is taken with)
CONTENDERS: list[tuple[str, str, Callable[[Sequence[str], int], Trained], str]] = [
    ("ours", "bpe", _ours(ByteLevelBPE), "tokenizers"),
    ("tokenizers", "bpe", _tokenizers_bpe, "ours"),
    ("ours", "wordpiece", _ours(WordPiece), "tokenizers"),
    ("tokenizers", "wordpiece", _tokenizers_wordpiece, "ours"),
    ("ours", "unigram", _ours(Unigram), "sentencepiece"),
    ("sentencepiece", "unigram", _sentencepiece_unigram, "ours"),
    ("tokenizers", "unigram", _tokenizers_unigram, "ours"),
]


def learned(vocabulary: Sequence[str]) -> set[str]:
    """The token strings less special tokens and byte-fallback pieces."""
    return {t for t in vocabulary if t not in SPECIAL and not (len(t) == 6 and t.startswith("<0x") and t[-1] == ">")}


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def compare(train_texts: Sequence[str], test_texts: Sequence[str], vocab_size: int,
            models: dict[tuple[str, str], Any] | None = None) -> list[dict]:
    """One record per contender: training time, compression and speed on `test_texts`, overlap with its counterpart.
    `models`, when given, receives each trained tokenizer under (library, algorithm)."""
    test_bytes = sum(len(t.encode("utf-8")) for t in test_texts)
    test_words = sum(len(t.split()) for t in test_texts)
    records, vocabularies = [], {}
    for library, algorithm, train, _ in CONTENDERS:
        start = time.perf_counter()
        trained = train(train_texts, vocab_size)
        train_s = time.perf_counter() - start
        start = time.perf_counter()
        tokens = sum(len(trained.encode(t)) for t in test_texts)
        encode_s = time.perf_counter() - start
        vocabularies[library, algorithm] = learned(trained.vocabulary)
        if models is not None:
            models[library, algorithm] = trained.model
        records.append({"tokenizer": f"{library} {algorithm}", "library": library, "algorithm": algorithm,
                        "vocab_size": len(trained.vocabulary), "train_s": train_s,
                        "bytes_per_token": test_bytes / tokens, "tokens_per_word": tokens / test_words,
                        "encode_mb_s": test_bytes / 1e6 / encode_s})
    for record, (library, algorithm, _, counterpart) in zip(records, CONTENDERS):
        record["overlap"] = jaccard(vocabularies[library, algorithm], vocabularies[counterpart, algorithm])
        record["overlap_with"] = f"{counterpart} {algorithm}"
    return records


def table(records: Sequence[dict]) -> list[str]:
    """The records as Markdown lines."""
    lines = ["| tokenizer | vocab | train s | bytes/token | tokens/word | encode MB/s | overlap (Jaccard) with |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in records:
        lines.append(f"| {r['tokenizer']} | {r['vocab_size']} | {r['train_s']:.2f} | {r['bytes_per_token']:.3f} "
                     f"| {r['tokens_per_word']:.3f} | {r['encode_mb_s']:.2f} | {r['overlap']:.3f} {r['overlap_with']} |")
    return lines


def split(texts: Sequence[str], max_bytes: int, test_every: int = 10) -> tuple[list[str], list[str]]:
    """A deterministic sample of at most `max_bytes` (`datamodules.tokenizer.sample`), every `test_every`-th
    text of it held out for testing."""
    chosen = library_bpe.sample(texts, max_bytes)
    test = chosen[::test_every]
    return [t for i, t in enumerate(chosen) if i % test_every], test
