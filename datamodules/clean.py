"""Cleaning, exact deduplication and the train/validation split, all by document."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass, field

from datamodules.sources import DataFormatError, Document

TRAILING_SPACE = re.compile(r"[ \t\f\v]+$", re.MULTILINE)
EXTRA_BLANK_LINES = re.compile(r"\n{4,}")  # 3+ blank lines


@dataclass
class Corpus:
    """The cleaned documents of one source, split by document, with the counts of every step."""

    train: list[Document]
    val: list[Document]
    stats: dict[str, int] = field(default_factory=dict)


def normalize(text: str) -> str:
    """Unicode NFC, `\\r\\n` to `\\n`, no trailing spaces on a line, at most 2 blank lines in a row."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n")
    return EXTRA_BLANK_LINES.sub("\n\n\n", TRAILING_SPACE.sub("", text))


def text_hash(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


def clean(
    documents: list[Document], min_doc_chars: int = 64, max_bytes: int | None = None, val_fraction: float = 0.05
) -> Corpus:
    """Normalise, drop short documents and exact duplicates (first kept), cap the size, split.

    Documents are taken in the order given (sorted by id) until `max_bytes` of UTF-8 text.
    """
    seen: set[bytes] = set()
    kept: list[tuple[Document, bytes]] = []
    stats = {"docs_read": len(documents), "dropped_short": 0, "dropped_duplicate": 0, "dropped_over_max_bytes": 0}
    total = 0
    for i, doc in enumerate(documents):
        text = normalize(doc.text)
        digest, size = text_hash(text), len(text.encode("utf-8"))
        if len(text) < min_doc_chars:
            stats["dropped_short"] += 1
        elif digest in seen:
            stats["dropped_duplicate"] += 1
        elif max_bytes is not None and total + size > max_bytes:
            stats["dropped_over_max_bytes"] = len(documents) - i
            break
        else:
            seen.add(digest)
            kept.append((Document(doc.id, text), digest))
            total += size
    if len(kept) < 2:
        raise DataFormatError(
            f"the corpus has {len(kept)} usable document(s) after cleaning ({stats}); "
            f"a train/validation split needs at least 2 (add documents or lower data.min_doc_chars)"
        )
    train, val = split(kept, val_fraction)
    stats |= {
        "train_docs": len(train),
        "val_docs": len(val),
        "bytes": total,
        "train_bytes": sum(len(d.text.encode("utf-8")) for d in train),
        "val_bytes": sum(len(d.text.encode("utf-8")) for d in val),
    }
    return Corpus(train, val, stats)


def split(documents: list[tuple[Document, bytes]], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """Each document goes to validation when its text hash, read as a number in [0, 1), is under `val_fraction`.

    A document's side depends on its text alone, so adding documents never moves others. At least one
    document lands on each side: the lowest hash joins validation, the highest joins train.
    """
    position = {doc.id: int.from_bytes(digest[:8], "big") / 2**64 for doc, digest in documents}
    ranked = sorted((doc for doc, _ in documents), key=lambda d: position[d.id])
    is_val = {d.id: position[d.id] < val_fraction for d in ranked}
    is_val[ranked[0].id], is_val[ranked[-1].id] = True, False
    return [d for d, _ in documents if not is_val[d.id]], [d for d, _ in documents if is_val[d.id]]


def corpus_hash(corpus: Corpus) -> str:
    """sha256 over the sorted (id, text) pairs of the cleaned documents, both splits."""
    h = hashlib.sha256()
    for doc in sorted(corpus.train + corpus.val):
        for part in (doc.id.encode("utf-8"), doc.text.encode("utf-8")):
            h.update(len(part).to_bytes(8, "big") + part)
    return h.hexdigest()
