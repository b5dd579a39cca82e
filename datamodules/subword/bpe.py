"""Byte-level BPE (Sennrich et al. 2016; GPT-2, Radford et al. 2019) in pure Python.

Training reproduces the `tokenizers` library's `BpeTrainer` with the settings of
`datamodules.tokenizer.train_bpe`, merge for merge and id for id:
- words are the pieces of the GPT-2 split regex (`ByteLevel(add_prefix_space=False)`), their UTF-8
  bytes spelled in GPT-2's byte-to-unicode alphabet, counted over all texts;
- ids: `<|endoftext|>` is 0, then the 256 byte symbols in code-point order of their spelling (the
  trainer sorts its alphabet by `char as u32`), then one id per merge in the order learned;
- each step merges the pair with the highest count; a tie goes to the smaller pair of ids
  `(left, right)`. Counts are updated incrementally from the words that held the pair, and a queue
  entry whose count went stale is re-queued with its current count when it comes up, as the
  library does: an entry only remembers the words that held its pair when it was queued;
- a merge whose string already exists (two pairs can spell the same token) reuses that id.
Encoding applies, within each pre-token, the merge of lowest rank, leftmost first, one at a time.
"""

from __future__ import annotations

import heapq
import itertools
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Self

import regex

from datamodules.subword.common import count_words, encode_words, read_json, write_json

EOT = "<|endoftext|>"
# GPT-2's pre-tokenizer (and `tokenizers`' ByteLevel one): contractions, letters, digits, other
# symbols, each optionally after one space; whitespace runs leave their last space to the next word.
GPT2_SPLIT = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

Pair = tuple[int, int]


def byte_alphabet() -> list[str]:
    """`alphabet[b]` spells byte `b` (GPT-2's bytes_to_unicode): printable Latin-1 bytes as themselves,
    the other 68 as the code points from 256 up, so that no byte is whitespace or a control char."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelling, extra = {}, 0
    for b in range(256):
        if b in printable:
            spelling[b] = chr(b)
        else:
            spelling[b] = chr(256 + extra)
            extra += 1
    return [spelling[b] for b in range(256)]


ALPHABET = byte_alphabet()
_SPELL = dict(enumerate(ALPHABET))  # str.translate table: Latin-1 char of byte b -> spelling
_UNSPELL = {ord(ch): b for b, ch in enumerate(ALPHABET)}  # and back: spelling -> Latin-1 char of byte b


def pre_tokenize(text: str) -> list[str]:
    """The GPT-2 regex pieces of `text`, each one's UTF-8 bytes spelled in `ALPHABET`."""
    return [piece.encode("utf-8").decode("latin-1").translate(_SPELL) for piece in GPT2_SPLIT.findall(text)]


def _merge_word(word: list[int], pair: Pair, new: int) -> list[tuple[Pair, int]]:
    """Merge every `pair` in `word` in place, left to right; the pair-count changes it makes.

    The changes are those of `tokenizers`' `Word::merge`: for each merge, the pairs with the left
    and the right neighbour lose one and their counterparts with `new` gain one (so `aaa` -> `Aa`
    reports `(a, a) -1` once: the merged occurrence itself is not counted down).
    """
    a, b = pair
    changes = []
    i = 0
    while i < len(word) - 1:
        if word[i] == a and word[i + 1] == b:
            if i > 0:
                changes += [((word[i - 1], a), -1), ((word[i - 1], new), 1)]
            word[i : i + 2] = [new]
            if i < len(word) - 1:
                changes += [((b, word[i + 1]), -1), ((new, word[i + 1]), 1)]
        i += 1
    return changes


def learn_merges(word_counts: dict[str, int], vocab_size: int, special_tokens: Sequence[str] = (EOT,)
                 ) -> tuple[list[str], list[tuple[int, int, int]]]:
    """The vocabulary (token strings in id order) and the merges `(left, right, new)` in the order learned.

    `word_counts` maps pre-tokens spelled in `ALPHABET` to their counts; training stops at `vocab_size`
    tokens or when no pair occurs any more.
    """
    tokens: list[str] = []
    token_id: dict[str, int] = {}
    for token in [*special_tokens, *sorted(ALPHABET)]:
        if token not in token_id:
            token_id[token] = len(tokens)
            tokens.append(token)
    words = [[token_id[ch] for ch in word] for word in word_counts]
    counts = list(word_counts.values())

    pair_counts: dict[Pair, int] = defaultdict(int)
    where: dict[Pair, set[int]] = defaultdict(set)
    for w, word in enumerate(words):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += counts[w]
            where[pair].add(w)
    # Max-heap by count, then the smaller pair: entries (-count, left, right, seq, words holding the pair).
    seq = itertools.count()
    queue = [(-c, p[0], p[1], next(seq), where[p]) for p, c in pair_counts.items() if c > 0]
    heapq.heapify(queue)

    merges: list[tuple[int, int, int]] = []
    while len(tokens) < vocab_size and queue:
        negative, a, b, order, positions = heapq.heappop(queue)
        count = pair_counts[(a, b)]
        if -negative != count:  # stale: re-queue with the current count
            heapq.heappush(queue, (-count, a, b, order, positions))
            continue
        if count < 1:
            break
        merged = tokens[a] + tokens[b]
        new = token_id.setdefault(merged, len(tokens))
        if new == len(tokens):
            tokens.append(merged)
        merges.append((a, b, new))
        gained: dict[Pair, set[int]] = defaultdict(set)
        for w in positions:
            for pair, change in _merge_word(words[w], (a, b), new):
                pair_counts[pair] += change * counts[w]
                if change > 0:
                    gained[pair].add(w)
        for pair, holders in gained.items():
            if pair_counts[pair] > 0:
                heapq.heappush(queue, (-pair_counts[pair], pair[0], pair[1], next(seq), holders))
    return tokens, merges


class ByteLevelBPE:
    """A byte-level BPE vocabulary: `<|endoftext|>` (id 0), 256 byte symbols, then merged tokens.

    Every text encodes, and `decode(encode(text)) == text`; `<|endoftext|>` written inside a text is
    encoded as its bytes, so id 0 only comes from a caller that appends it as a separator.
    """

    kind = "byte_level_bpe"

    def __init__(self, tokens: Sequence[str], merges: Sequence[tuple[int, int, int]]) -> None:
        self._tokens = list(tokens)
        self._id = {token: i for i, token in enumerate(self._tokens)}
        self._merges = list(merges)
        # A pair learned twice (reuse of a token's id) keeps its last rank, as the library's merge map does.
        self._rank = {(a, b): (rank, new) for rank, (a, b, new) in enumerate(self._merges)}
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> Self:
        """Learn merges from `texts` until the vocabulary holds `vocab_size` tokens (special + 256 + merges)."""
        word_counts = count_words(texts, pre_tokenize)
        return cls(*learn_merges(word_counts, vocab_size))

    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    def tokens(self) -> list[str]:
        return list(self._tokens)

    def merges(self) -> list[tuple[str, str]]:
        """The merges as pairs of token strings, in the order learned (`tokenizers`' `model.merges`)."""
        return [(self._tokens[a], self._tokens[b]) for a, b, _ in self._merges]

    def _apply_merges(self, word: str) -> list[int]:
        """The ids of one pre-token: repeatedly the merge of lowest rank, leftmost first (a doubly linked
        list of symbols and a heap of candidate merges, as `tokenizers`' `Word::merge_all`)."""
        symbols = [self._id[ch] for ch in word]
        n = len(symbols)
        nxt, prv, alive = list(range(1, n + 1)), list(range(-1, n - 1)), [True] * n
        rank = self._rank
        heap = [(rank[p][0], i, rank[p][1]) for i, p in enumerate(zip(symbols, symbols[1:])) if p in rank]
        heapq.heapify(heap)
        while heap:
            _, i, new = heapq.heappop(heap)
            j = nxt[i] if alive[i] else n
            if j == n or rank.get((symbols[i], symbols[j]), (0, -1))[1] != new:
                continue  # an expired entry: the symbols at i changed since it was queued
            symbols[i], alive[j], nxt[i] = new, False, nxt[j]
            if nxt[j] < n:
                prv[nxt[j]] = i
            if prv[i] >= 0 and (symbols[prv[i]], new) in rank:
                r, merged = rank[(symbols[prv[i]], new)]
                heapq.heappush(heap, (r, prv[i], merged))
            if nxt[i] < n and (new, symbols[nxt[i]]) in rank:
                r, merged = rank[(new, symbols[nxt[i]])]
                heapq.heappush(heap, (r, i, merged))
        return [s for s, keep in zip(symbols, alive) if keep]

    def encode(self, text: str) -> list[int]:
        return encode_words(pre_tokenize(text), self._cache, self._apply_merges)

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`; a byte sequence that is not UTF-8 (a cut-off character) decodes to U+FFFD."""
        spelled = "".join(self._tokens[i] for i in ids)
        return spelled.translate(_UNSPELL).encode("latin-1").decode("utf-8", errors="replace")

    def save(self, path: Path) -> None:
        write_json(path, self.kind, {"tokens": self._tokens, "merges": self._merges})

    @classmethod
    def load(cls, path: Path) -> Self:
        payload = read_json(path, cls.kind)
        return cls(payload["tokens"], [tuple(m) for m in payload["merges"]])
