"""What every tokenizer of `datamodules.subword` offers, and the JSON file each one is saved as."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Callable, Protocol, Self, runtime_checkable


@runtime_checkable
class SubwordTokenizer(Protocol):
    """A trained subword vocabulary: text to ids and back, saved as one JSON file.

    `kind` names the algorithm in the saved file, so `datamodules.subword.load` rebuilds the right class.
    """

    kind: str

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> Self: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    @property
    def vocab_size(self) -> int: ...

    def tokens(self) -> list[str]:
        """The vocabulary in id order, as the token strings the model's own file spells them."""
        ...

    def save(self, path: Path) -> None: ...

    @classmethod
    def load(cls, path: Path) -> Self: ...


def write_json(path: Path, kind: str, payload: dict[str, Any]) -> None:
    """Write `{"kind": kind, **payload}` to `path` whole or not at all (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_text(json.dumps({"kind": kind, **payload}, ensure_ascii=False), encoding="utf-8")
    os.replace(partial, path)


def read_json(path: Path, kind: str | None = None) -> dict[str, Any]:
    """The saved payload; a ValueError if the file holds another kind of tokenizer than `kind`."""
    payload = json.loads(Path(path).read_text(encoding="utf-8"))
    if kind is not None and payload.get("kind") != kind:
        raise ValueError(f"{path}: a {payload.get('kind')!r} tokenizer, not {kind!r}")
    return payload


def count_words(texts: Iterable[str], pre_tokenize: Callable[[str], list[str]]) -> Counter[str]:
    """How often each pre-token occurs over `texts`: what every trainer here learns from."""
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(pre_tokenize(text))
    return counts


def encode_words(words: Iterable[str], cache: dict[str, list[int]], encode_word: Callable[[str], list[int]]) -> list[int]:
    """The ids of `words` in order, each word's from `cache` or else `encode_word` (then cached): a text repeats
    its words far more often than a tokenizer meets new ones."""
    ids: list[int] = []
    for word in words:
        cached = cache.get(word)
        if cached is None:
            cached = cache[word] = encode_word(word)
        ids += cached
    return ids
