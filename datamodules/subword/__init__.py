"""Subword tokenizers written in this project: byte-level BPE, WordPiece and Unigram LM.

    tokenizer = TOKENIZERS["bpe"].train(texts, vocab_size=4096)
    ids = tokenizer.encode(text); text == tokenizer.decode(ids)
    tokenizer.save(path); same = load(path)
"""

from __future__ import annotations

from pathlib import Path

from datamodules.subword.bpe import ByteLevelBPE
from datamodules.subword.common import SubwordTokenizer, read_json
from datamodules.subword.unigram import Unigram
from datamodules.subword.wordpiece import WordPiece

TOKENIZERS: dict[str, type[SubwordTokenizer]] = {"bpe": ByteLevelBPE, "wordpiece": WordPiece, "unigram": Unigram}


def load(path: Path) -> SubwordTokenizer:
    """The tokenizer saved at `path`, whichever kind it is."""
    kind = read_json(path).get("kind")
    classes = {cls.kind: cls for cls in TOKENIZERS.values()}
    if kind not in classes:
        raise ValueError(f"{path}: unknown tokenizer kind {kind!r}; expected one of {sorted(classes)}")
    return classes[kind].load(path)


__all__ = ["TOKENIZERS", "ByteLevelBPE", "SubwordTokenizer", "Unigram", "WordPiece", "load"]
