"""Unigram language-model tokenizer (Kudo 2018), SentencePiece's training algorithm, in pure Python.

A text is a sequence of words, each a space followed by non-space characters (SentencePiece's
`split_by_whitespace`, with the dummy prefix: a space is put before the text, and taken off again
by `decode`). A piece never holds a space except as its first character; the files and `tokens()`
spell that space `▁` (U+2581), SentencePiece's meta symbol, while pieces hold the real space, so a
`▁` written in the text stays an ordinary character and every text round-trips.

Training (`learn_pieces`), as SentencePiece's unigram trainer does it:
1. seed: every character, and the substrings of 2..`MAX_PIECE_CHARS` characters seen at least twice,
   the `seed_factor * vocab_size` ones with the highest count x length; log-probabilities from those;
2. EM, `EM_STEPS` rounds: the E-step takes each word's expected piece counts by forward-backward over
   its segmentation lattice, the M-step sets `log p = digamma(count) - digamma(total)` (SentencePiece's
   sparse-prior estimate) and drops pieces expected less than `MIN_EXPECTED` times;
3. prune: a piece whose own best segmentation is not itself is dropped; for the others, the loss of
   removing one is its share of words times the log-likelihood drop when its Viterbi count moves to
   its best alternative segmentation; the `SHRINK` share with the highest loss stays, never fewer than
   1.1 x the target; then back to 2, until the target is reached. Single characters always stay;
4. the pieces with the highest log-probability fill the vocabulary.
Ids: the 256 byte pieces `<0x00>`..`<0xFF>` first (byte fallback: a character that is no piece is
encoded as its UTF-8 bytes), then the pieces by descending log-probability. Encoding is the Viterbi
segmentation of each word; an unknown character costs the lowest log-probability minus `UNK_PENALTY`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Self

import regex

from datamodules.subword.common import count_words, encode_words, read_json, write_json

SPACE_SYMBOL = "\u2581"
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]
MAX_PIECE_CHARS = 16  # SentencePiece's max_sentencepiece_length
EM_STEPS = 2  # SentencePiece's num_sub_iterations
SHRINK = 0.75  # SentencePiece's shrinking_factor
MIN_EXPECTED = 0.5  # SentencePiece's kExpectedFrequencyThreshold
UNK_PENALTY = 10.0  # SentencePiece's kUnkPenalty
UNKNOWN = -1  # the lattice's id for a character that is no piece
WORD = regex.compile(r" [^ ]*")

Edges = list[list[tuple[int, int]]]  # edges[i] = [(end, piece id), ...]: the pieces starting at character i


def pre_tokenize(text: str) -> list[str]:
    """The words of `text` after the dummy prefix: `"a  b"` -> `[" a", " ", " b"]`."""
    return WORD.findall(" " + text)


def digamma(x: float) -> float:
    """psi(x), x > 0: the recurrence psi(x) = psi(x + 1) - 1/x up to x >= 6, then the asymptotic series."""
    result = 0.0
    while x < 6.0:
        result -= 1.0 / x
        x += 1.0
    inv2 = 1.0 / (x * x)
    return result + math.log(x) - 0.5 / x - inv2 * (1 / 12 - inv2 * (1 / 120 - inv2 / 252))


class _Model:
    """Pieces with log-probabilities, and the lattice of a word over them."""

    def __init__(self, logp: dict[str, float]) -> None:
        self.pieces = list(logp)
        self.logp = list(logp.values())
        self.id = {p: i for i, p in enumerate(self.pieces)}
        self.prefixes = {p[:k] for p in self.pieces for k in range(1, len(p) + 1)}
        # `scores[piece]`, with UNKNOWN (-1) indexing the last entry: the unknown-character score.
        self.scores = [*self.logp, min(self.logp) - UNK_PENALTY]

    def edges(self, word: str) -> Edges:
        """Every piece occurrence in `word`; a character that is no piece gets an `UNKNOWN` edge."""
        out: Edges = []
        for i in range(len(word)):
            here = []
            j = i + 1
            while j <= len(word) and word[i:j] in self.prefixes:
                if word[i:j] in self.id:
                    here.append((j, self.id[word[i:j]]))
                j += 1
            if not here or here[0][0] != i + 1:
                here.insert(0, (i + 1, UNKNOWN))
            out.append(here)
        return out

    def viterbi(self, edges: Edges, banned: int | None = None) -> tuple[float, list[tuple[int, int, int]]]:
        """The best log-probability and its path `[(start, end, piece), ...]`; `banned` is a piece
        left out of the lattice (for the alternatives of a piece in pruning)."""
        n, scores = len(edges), self.scores
        best = [0.0] + [-math.inf] * n
        back: list[tuple[int, int]] = [(0, 0)] * (n + 1)
        for i in range(n):
            if best[i] == -math.inf:
                continue
            for j, piece in edges[i]:
                if piece == banned:
                    continue
                value = best[i] + scores[piece]
                if value > best[j]:
                    best[j], back[j] = value, (i, piece)
        path, j = [], n
        while j > 0 and best[n] > -math.inf:
            i, piece = back[j]
            path.append((i, j, piece))
            j = i
        return best[n], path[::-1]

    def expected_counts(self, edges: Edges, weight: int, counts: list[float]) -> None:
        """Add `weight` x each piece's expected count in the word (forward-backward) to `counts`.

        Log-space sums are taken relative to the neighbouring position's value: an edge spans at most
        `MAX_PIECE_CHARS` characters, so no term over- or underflows enough to matter.
        """
        n, scores, exp, log = len(edges), self.scores, math.exp, math.log
        ending: list[list[tuple[int, int]]] = [[] for _ in range(n + 1)]
        for i, here in enumerate(edges):
            for j, piece in here:
                ending[j].append((i, piece))
        alpha = [0.0] * (n + 1)
        for j in range(1, n + 1):
            ref = alpha[j - 1]
            alpha[j] = ref + log(sum(exp(alpha[i] + scores[piece] - ref) for i, piece in ending[j]))
        beta = [0.0] * (n + 1)
        for i in range(n - 1, -1, -1):
            ref = beta[i + 1]
            beta[i] = ref + log(sum(exp(scores[piece] + beta[j] - ref) for j, piece in edges[i]))
        log_z = alpha[n]
        for i, here in enumerate(edges):
            for j, piece in here:
                if piece != UNKNOWN:
                    counts[piece] += weight * exp(alpha[i] + scores[piece] + beta[j] - log_z)


def _seed(word_counts: dict[str, int], chars: set[str], size: int) -> dict[str, float]:
    """Log-probabilities of the seed: all `chars` by count, and the `size` substrings seen at least twice
    with the highest count x length (a space only in front)."""
    substrings: Counter[str] = Counter()
    for word, count in word_counts.items():
        for i in range(len(word)):
            for j in range(i + 2, min(len(word), i + MAX_PIECE_CHARS) + 1):
                substrings[word[i:j]] += count
    char_counts: Counter[str] = Counter()
    for word, count in word_counts.items():
        for ch in word:
            char_counts[ch] += count
    frequent = [(c * len(s), s) for s, c in substrings.items() if c >= 2 and all(ch in chars for ch in s)]
    frequent.sort(key=lambda cs: (-cs[0], cs[1]))
    scores = {ch: float(char_counts[ch]) for ch in sorted(chars)} | {s: float(c) for c, s in frequent[:size]}
    log_total = math.log(sum(scores.values()))
    return {p: math.log(s) - log_total for p, s in scores.items()}


def _em_step(model: _Model, lattices: list[Edges], counts: list[int], chars: set[str]) -> dict[str, float]:
    """One E-step and M-step: the new log-probabilities (pieces expected too rarely are gone, chars stay)."""
    expected = [0.0] * len(model.pieces)
    for edges, count in zip(lattices, counts):
        model.expected_counts(edges, count, expected)
    kept = {p: e for p, e in zip(model.pieces, expected) if e >= MIN_EXPECTED or p in chars}
    kept = {p: max(e, MIN_EXPECTED) for p, e in kept.items()}
    log_total = digamma(sum(kept.values()))
    return {p: digamma(e) - log_total for p, e in kept.items()}


def _prune(model: _Model, lattices: list[Edges], counts: list[int], chars: set[str], keep: int) -> dict[str, float]:
    """The `keep` pieces (at least all `chars`) whose removal would cost the most likelihood."""
    viterbi_count = [0.0] * len(model.pieces)
    words_with: list[float] = [0.0] * len(model.pieces)  # total count of the words whose path uses the piece
    for edges, count in zip(lattices, counts):
        _, path = model.viterbi(edges)
        for piece in {piece for _, _, piece in path if piece != UNKNOWN}:
            words_with[piece] += count
        for _, _, piece in path:
            if piece != UNKNOWN:
                viterbi_count[piece] += count
    total = sum(viterbi_count)
    all_words = sum(counts)
    kept = {p: model.logp[model.id[p]] for p in model.pieces if p in chars}
    losses = []
    for piece, freq in zip(model.pieces, viterbi_count):
        if piece in chars or freq == 0:
            continue
        own = model.id[piece]
        alt_score, alternative = model.viterbi(model.edges(piece), banned=own)
        if any(p == UNKNOWN for _, _, p in alternative):
            kept[piece] = model.logp[own]  # no alternative without byte fallback: keep
            continue
        if alt_score > model.logp[own]:
            continue  # never its own best segmentation: removing it changes nothing
        # Its Viterbi count moves to the pieces of the alternative; the total grows by freq (len - 1).
        log_total_alt = math.log(total + freq * (len(alternative) - 1))
        logp_alt = sum(math.log(viterbi_count[p] + freq) - log_total_alt for _, _, p in alternative)
        loss = words_with[own] / all_words * (math.log(freq) - math.log(total) - logp_alt)
        losses.append((-loss, piece))
    losses.sort()
    for _, piece in losses[: max(0, keep - len(kept))]:
        kept[piece] = model.logp[model.id[piece]]
    return kept


def _relabel(lattices: list[Edges], old: _Model, new: _Model) -> list[Edges]:
    """`old`'s lattices over `new`'s pieces, which are a subset: dropped pieces' edges go, ids change.
    Characters are never dropped, so no position loses its last edge."""
    mapping = [new.id.get(p) for p in old.pieces] + [UNKNOWN]  # index -1 (UNKNOWN) stays UNKNOWN
    return [[[(j, mapping[p]) for j, p in here if mapping[p] is not None] for here in edges] for edges in lattices]


def learn_pieces(word_counts: dict[str, int], size: int, seed_factor: int = 8) -> dict[str, float]:
    """`size` pieces (all characters seen, or the most frequent `size // 2` of them) and their log-probabilities.

    `word_counts` maps words (`pre_tokenize`) to counts.
    """
    char_counts: Counter[str] = Counter()
    for word, count in word_counts.items():
        for ch in word:
            char_counts[ch] += count
    chars = {ch for ch, _ in sorted(char_counts.items(), key=lambda cc: (-cc[1], cc[0]))[: size // 2]}
    words, counts = list(word_counts), list(word_counts.values())
    logp = _seed(word_counts, chars, seed_factor * size)
    target = max(int(size * 1.1), len(chars))
    while True:
        model = _Model(logp)
        lattices = [model.edges(w) for w in words]
        for _ in range(EM_STEPS):
            model, old = _Model(_em_step(model, lattices, counts, chars)), model
            lattices = _relabel(lattices, old, model)
        logp = dict(zip(model.pieces, model.logp))
        if len(logp) <= target:
            break
        logp = _prune(model, lattices, counts, chars, max(target, int(SHRINK * len(logp))))
    others = sorted((p for p in logp if p not in chars), key=lambda p: (-logp[p], p))[: size - len(chars)]
    return {p: logp[p] for p in sorted([*chars, *others], key=lambda p: (-logp[p], p))}


class Unigram:
    """A unigram-LM vocabulary: 256 byte pieces (ids 0-255) and pieces with log-probabilities."""

    kind = "unigram"

    def __init__(self, pieces: dict[str, float]) -> None:
        self._model = _Model(pieces)
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> Self:
        """Learn `vocab_size - 256` pieces from `texts` (the 256 byte pieces fill the rest)."""
        word_counts = count_words(texts, pre_tokenize)
        return cls(learn_pieces(word_counts, vocab_size - len(BYTE_TOKENS)))

    @property
    def vocab_size(self) -> int:
        return len(BYTE_TOKENS) + len(self._model.pieces)

    def tokens(self) -> list[str]:
        return BYTE_TOKENS + [p.replace(" ", SPACE_SYMBOL) for p in self._model.pieces]

    def log_prob(self, piece: str) -> float:
        return self._model.logp[self._model.id[piece]]

    def segment(self, word: str) -> list[str]:
        """The Viterbi segmentation of `word` into pieces ('' marks a character that is no piece)."""
        _, path = self._model.viterbi(self._model.edges(word))
        return [word[i:j] if piece != UNKNOWN else "" for i, j, piece in path]

    def _encode_word(self, word: str) -> list[int]:
        _, path = self._model.viterbi(self._model.edges(word))
        ids: list[int] = []
        for i, j, piece in path:
            ids += list(word[i:j].encode("utf-8")) if piece == UNKNOWN else [len(BYTE_TOKENS) + piece]
        return ids

    def encode(self, text: str) -> list[int]:
        return encode_words(pre_tokenize(text), self._cache, self._encode_word)

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids` without the dummy prefix; bytes that are not UTF-8 decode to U+FFFD."""
        data = bytearray()
        for i in ids:
            if i < len(BYTE_TOKENS):
                data.append(i)
            else:
                data += self._model.pieces[i - len(BYTE_TOKENS)].encode("utf-8")
        return data.decode("utf-8", errors="replace").removeprefix(" ")

    def save(self, path: Path) -> None:
        write_json(path, self.kind, {"pieces": [[p, lp] for p, lp in zip(self._model.pieces, self._model.logp)]})

    @classmethod
    def load(cls, path: Path) -> Self:
        return cls({p: lp for p, lp in read_json(path, cls.kind)["pieces"]})
