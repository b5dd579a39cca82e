"""WordPiece (Schuster & Nakajima 2012; BERT, Devlin et al. 2019) trained by the likelihood criterion.

Training starts from the characters, a word's first one as itself and the others behind the
continuation prefix `##`, and repeatedly merges the adjacent pair `(a, b)` whose merge raises the
likelihood of the training words under a unigram model of the current units the most (Schuster &
Nakajima's criterion). With `f(x) = x log x`, `k = count(ab)`, `c_a = count(a)`, `c_b = count(b)` and
`N` units in all, the log-likelihood `sum_t c_t log(c_t / N)` changes by

    gain(a, b) = f(k) + f(c_a - k) + f(c_b - k) - f(c_a) - f(c_b) + f(N) - f(N - k)
               ~ k * (log(k N / (c_a c_b)) - 1)            for k << c_a, c_b.

`N` is frozen at the character count, so a pair's gain changes only when its own counts do. The
often-quoted score `count(ab) / (count(a) count(b))` drops the factor `k`: it is maximal (1) for a
pair seen once whose parts are seen once, so it first spells out every rare word: trained on 0.6 MB
of the Python docs with 4096 tokens, it gives 1.5 bytes per token on held-out docs, this gain 3.0. (`tokenizers`'
WordPieceTrainer runs BPE instead: it merges the most frequent pair.) Ties go to the more frequent
pair, then to the smaller pair of strings. A merge changes the counts of `a` and `b`, hence the gain
of every pair holding either, so each merge re-queues those pairs; a queue entry is used only if its
gain is still the pair's current one.

Pre-tokenisation is BERT's (`BertPreTokenizer`): split on Unicode whitespace, which is dropped, and
isolate every punctuation character (Unicode P* and all ASCII punctuation). No lower-casing.
Encoding is greedy longest-match-first within a word; a word that cannot be covered, or is longer
than `MAX_WORD_CHARS`, becomes `[UNK]`.

What a round trip keeps: `decode(encode(text)) == " ".join(w if encodable else "[UNK]" for w in words)`
where `words = pre_tokenize(text)`: whitespace becomes single spaces and punctuation stands apart.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Self

import regex

from datamodules.subword.common import count_words, encode_words, read_json, write_json

PREFIX = "##"
UNK = "[UNK]"
SPECIAL_TOKENS = ["[PAD]", UNK, "[CLS]", "[SEP]", "[MASK]"]  # BERT's, ids 0-4
MAX_WORD_CHARS = 100  # BERT's max_input_chars_per_word
_PUNCTUATION = r"\p{P}!-/:-@\[-`{-~"
BERT_SPLIT = regex.compile(rf"[{_PUNCTUATION}]|[^{_PUNCTUATION}\p{{White_Space}}]+")

Pair = tuple[int, int]


def pre_tokenize(text: str) -> list[str]:
    """The words of `text` as BERT splits it: whitespace dropped, each punctuation character on its own."""
    return BERT_SPLIT.findall(text)


def _f(x: int) -> float:
    return x * math.log(x) if x > 0 else 0.0


def _merged(left: str, right: str) -> str:
    return left + right.removeprefix(PREFIX)


def learn_vocabulary(word_counts: dict[str, int], vocab_size: int) -> list[str]:
    """The vocabulary in id order: `SPECIAL_TOKENS`, the characters (word-initial, then `##` forms, each in
    code-point order), then the merged tokens in the order learned. If the characters alone do not fit,
    the rarest are left out (words holding them encode as `[UNK]`)."""
    symbol_counts: Counter[str] = Counter()
    for word, count in word_counts.items():
        symbol_counts[word[0]] += count
        for ch in word[1:]:
            symbol_counts[PREFIX + ch] += count
    room = vocab_size - len(SPECIAL_TOKENS)
    kept = {s for s, _ in sorted(symbol_counts.items(), key=lambda sc: (-sc[1], sc[0]))[:room]}
    alphabet = sorted(s for s in kept if not s.startswith(PREFIX)) + sorted(s for s in kept if s.startswith(PREFIX))
    tokens = SPECIAL_TOKENS + alphabet
    token_id = {t: i for i, t in enumerate(tokens)}

    words, counts = [], []
    for word, count in word_counts.items():
        symbols = [word[0]] + [PREFIX + ch for ch in word[1:]]
        if all(s in token_id for s in symbols):
            words.append([token_id[s] for s in symbols])
            counts.append(count)
    unit = Counter()  # count(a): occurrences of each token in the current segmentation
    pair_counts: dict[Pair, int] = defaultdict(int)
    where: dict[Pair, set[int]] = defaultdict(set)  # the words holding each pair
    pairs_of: dict[int, set[Pair]] = defaultdict(set)  # the pairs each token is part of
    for w, word in enumerate(words):
        for s in word:
            unit[s] += counts[w]
        for pair in zip(word, word[1:]):
            pair_counts[pair] += counts[w]
            where[pair].add(w)
            pairs_of[pair[0]].add(pair)
            pairs_of[pair[1]].add(pair)

    total = sum(unit.values())

    def entry(pair: Pair) -> tuple[float, int, str, str, int, int]:
        """The queue entry of `pair`: (-gain, -count, left, right, *pair), smallest first."""
        k, (a, b) = pair_counts[pair], pair
        if a == b:  # `x x` -> `xx` uses two units of x per merge
            gain = _f(k) + _f(max(unit[a] - 2 * k, 0)) - _f(unit[a])
        else:
            gain = _f(k) + _f(unit[a] - k) + _f(unit[b] - k) - _f(unit[a]) - _f(unit[b])
        gain += _f(total) - _f(total - k)
        return -gain, -k, tokens[a], tokens[b], a, b

    queue = [entry(pair) for pair in pair_counts]
    heapq.heapify(queue)
    while len(tokens) < vocab_size and queue:
        top = heapq.heappop(queue)
        a, b = pair = top[4:]
        if pair_counts[pair] <= 0 or top != entry(pair):
            continue  # stale: a fresher entry for this pair is in the queue, or the pair is gone
        new_token = _merged(tokens[a], tokens[b])
        new = token_id.setdefault(new_token, len(tokens))  # another pair may have spelled it already
        if new == len(tokens):
            tokens.append(new_token)
        changed: set[Pair] = set()
        for w in list(where[pair]):
            word, count = words[w], counts[w]
            before = Counter(zip(word, word[1:]))
            i, merged = 0, []
            while i < len(word):
                if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                    merged.append(new)
                    unit[a], unit[b], unit[new] = unit[a] - count, unit[b] - count, unit[new] + count
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            words[w] = merged
            after = Counter(zip(merged, merged[1:]))
            for p in before.keys() | after.keys():
                delta = after[p] - before[p]
                if delta:
                    pair_counts[p] += delta * count
                    changed.add(p)
                    if after[p]:
                        where[p].add(w)
                        pairs_of[p[0]].add(p)
                        pairs_of[p[1]].add(p)
                    else:
                        where[p].discard(w)
        for p in changed | pairs_of[a] | pairs_of[b]:
            if pair_counts[p] > 0:
                heapq.heappush(queue, entry(p))
    return tokens


class WordPiece:
    """A WordPiece vocabulary: BERT's special tokens, characters, and `##`-continued pieces."""

    kind = "wordpiece"

    def __init__(self, tokens: Sequence[str]) -> None:
        self._tokens = list(tokens)
        self._id = {t: i for i, t in enumerate(self._tokens)}
        self._longest = max(len(t.removeprefix(PREFIX)) for t in self._tokens)
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> Self:
        word_counts = count_words(texts, pre_tokenize)
        return cls(learn_vocabulary(word_counts, vocab_size))

    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    def tokens(self) -> list[str]:
        return list(self._tokens)

    def encode_word(self, word: str) -> list[int]:
        """Greedy longest-match-first: the longest vocabulary piece at the start, then at each next
        position the longest `##` piece; `[UNK]` alone if some position has none."""
        if len(word) > MAX_WORD_CHARS:
            return [self._id[UNK]]
        ids, start = [], 0
        while start < len(word):
            prefix = PREFIX if start else ""
            for end in range(min(len(word), start + self._longest), start, -1):
                piece = self._id.get(prefix + word[start:end])
                if piece is not None:
                    ids.append(piece)
                    start = end
                    break
            else:
                return [self._id[UNK]]
        return ids

    def encode(self, text: str) -> list[int]:
        return encode_words(pre_tokenize(text), self._cache, self.encode_word)

    def decode(self, ids: Sequence[int]) -> str:
        """Words separated by single spaces; a `##` piece joins the piece before it."""
        parts = []
        for i in ids:
            token = self._tokens[i]
            if token.startswith(PREFIX):
                parts.append(token.removeprefix(PREFIX))
            else:
                parts.append(" " + token if parts else token)
        return "".join(parts)

    def save(self, path: Path) -> None:
        write_json(path, self.kind, {"tokens": self._tokens})

    @classmethod
    def load(cls, path: Path) -> Self:
        return cls(read_json(path, cls.kind)["tokens"])
