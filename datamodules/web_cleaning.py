"""Cleaning web-like pretraining text, document by document: normalise, exact dedup, MinHash near-dedup, quality
filters (the data ablation's cleaning; `datamodules/clean.py` is the light cleaning every corpus gets).

`run_cleaning` counts documents and characters in, removed and out at every stage, and names the stage or
rule that removed each document. Because the embedded corpus is already clean, `make_raw_corpus` plants the
defects the cleaning targets (labelled in their ids) and `score_against_plants` measures the cleaning
against them.

Sources: Gopher quality and repetition rules (Rae et al. 2021, "Scaling Language Models", appendix A.1.1
and Table A1), which FineWeb (Penedo et al. 2024) applies with the same thresholds; near-deduplication by
MinHash over word 5-grams with LSH, as in FineWeb and Lee et al. 2022 ("Deduplicating Training Data Makes
Language Models Better").
"""

from __future__ import annotations

import random
import re
import string
import time
from collections import Counter
from dataclasses import dataclass, field
from collections.abc import Mapping

import ftfy
import ftfy.bad_codecs  # registers "sloppy-windows-1252", the codec browsers really use for cp1252
import numpy as np
import xxhash
from datasketch import MinHash, MinHashLSH

from datamodules.clean import normalize, text_hash
from datamodules.sources import Document

# Mojibake and bad escapes are repaired; curly quotes are legitimate text and stay curly.
FTFY_CONFIG = ftfy.TextFixerConfig(uncurl_quotes=False, explain=False)
WORD = re.compile(r"\w+")
LETTER = re.compile(r"[^\W\d_]")
PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
PUNCTUATION = string.punctuation + "“”‘’«»–—…•"
STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})  # Gopher's list
BULLETS = ("•", "‣", "◦", "●", "▪", "-", "*")
ELLIPSES = ("...", "…")
STAGES = ("normalize", "exact_dedup", "near_dedup", "quality")
NGRAM_MULTIPLIERS = np.random.default_rng(0).integers(0, 2**63, size=16, dtype=np.uint64) * 2 + 1


@dataclass
class QualityConfig:
    """Thresholds of the Gopher quality and repetition rules (Rae et al. 2021, A.1.1, Table A1); None turns one off.

    A document is removed by the first rule it breaks, in the order of `rules()`.
    """

    min_words: int | None = 50
    max_words: int | None = 100_000
    min_mean_word_length: float | None = 3.0
    max_mean_word_length: float | None = 10.0
    max_symbol_word_ratio: float | None = 0.1  # '#' per word, and '...' per word, each
    max_bullet_lines_ratio: float | None = 0.9
    max_ellipsis_lines_ratio: float | None = 0.3
    min_alpha_words_ratio: float | None = 0.8  # words with at least one alphabetic character
    min_stop_words: int | None = 2  # occurrences of STOP_WORDS
    max_dup_line_fraction: float | None = 0.3
    max_dup_paragraph_fraction: float | None = 0.3
    max_dup_line_char_fraction: float | None = 0.2
    max_dup_paragraph_char_fraction: float | None = 0.2
    # the characters of the most frequent n-gram times its count, over the text's characters
    max_top_ngram_char_fraction: dict[int, float] = field(default_factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16})
    # the characters of words covered by repeats of an earlier n-gram, over the text's characters
    max_dup_ngram_char_fraction: dict[int, float] = field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
    )

    def rules(self) -> list[tuple[str, str, float, bool]]:
        """(rule, signal of `quality_signals`, bound, True if the bound is a maximum) for every rule turned on."""
        scalar = [
            ("min_words", "words", self.min_words),
            ("max_words", "words", self.max_words),
            ("min_mean_word_length", "mean_word_length", self.min_mean_word_length),
            ("max_mean_word_length", "mean_word_length", self.max_mean_word_length),
            ("max_hash_word_ratio", "hash_word_ratio", self.max_symbol_word_ratio),
            ("max_ellipsis_word_ratio", "ellipsis_word_ratio", self.max_symbol_word_ratio),
            ("max_bullet_lines_ratio", "bullet_lines_ratio", self.max_bullet_lines_ratio),
            ("max_ellipsis_lines_ratio", "ellipsis_lines_ratio", self.max_ellipsis_lines_ratio),
            ("min_alpha_words_ratio", "alpha_words_ratio", self.min_alpha_words_ratio),
            ("min_stop_words", "stop_words", self.min_stop_words),
            ("max_dup_line_fraction", "dup_line_fraction", self.max_dup_line_fraction),
            ("max_dup_paragraph_fraction", "dup_paragraph_fraction", self.max_dup_paragraph_fraction),
            ("max_dup_line_char_fraction", "dup_line_char_fraction", self.max_dup_line_char_fraction),
            ("max_dup_paragraph_char_fraction", "dup_paragraph_char_fraction", self.max_dup_paragraph_char_fraction),
        ]
        scalar += [
            (f"max_top_{n}gram_char_fraction", f"top_{n}gram_char_fraction", bound)
            for n, bound in sorted(self.max_top_ngram_char_fraction.items())
        ]
        scalar += [
            (f"max_dup_{n}gram_char_fraction", f"dup_{n}gram_char_fraction", bound)
            for n, bound in sorted(self.max_dup_ngram_char_fraction.items())
        ]
        return [(rule, signal, bound, rule.startswith("max_")) for rule, signal, bound in scalar if bound is not None]


@dataclass
class CleaningConfig:
    """Near-duplicate settings (FineWeb: word 5-grams, MinHash) and the quality thresholds."""

    shingle_words: int = 5
    num_perm: int = 128
    threshold: float = 0.8  # Jaccard similarity of shingle sets above which two documents are near-duplicates
    seed: int = 0  # of the MinHash permutations
    # LSH bands chosen to weigh missed pairs 9x over false candidates (datasketch's weights): candidates are
    # cheap to verify, and with equal weights LSH finds only 40% of pairs at exactly the threshold
    lsh_weights: tuple[float, float] = (0.1, 0.9)
    quality: QualityConfig = field(default_factory=QualityConfig)


def normalize_text(text: str) -> str:
    """ftfy's repairs (mojibake, HTML escapes, control characters), then NFC and `clean.normalize`'s whitespace."""
    return normalize(ftfy.fix_text(text, FTFY_CONFIG))


def shingles(text: str, n: int = 5) -> set[bytes]:
    """The document's lower-cased word n-grams; a document shorter than n words is one shingle."""
    words = WORD.findall(text.lower())
    return {" ".join(words[i : i + n]).encode("utf-8") for i in range(max(1, len(words) - n + 1))} if words else set()


def near_duplicates(texts: list[str], config: CleaningConfig) -> dict[int, int]:
    """{index: index of the first document of its cluster} for every document that is not first in its cluster.

    LSH proposes pairs likely above `config.threshold`; a pair is kept when the MinHash estimate of its
    Jaccard similarity reaches the threshold. Clusters are the connected components of those pairs (union-find),
    so a chain A~B~C is one cluster even when A and C are not similar. Texts without words are never duplicates.
    """
    template = MinHash(num_perm=config.num_perm, seed=config.seed, hashfunc=xxhash.xxh32_intdigest)
    lsh = MinHashLSH(threshold=config.threshold, num_perm=config.num_perm, weights=config.lsh_weights)
    minhashes: dict[int, MinHash] = {}
    for i, text in enumerate(texts):
        grams = shingles(text, config.shingle_words)
        if grams:
            minhash = template.copy()
            minhash.update_batch(grams)
            minhashes[i] = minhash
            lsh.insert(i, minhash)
    parent = list(range(len(texts)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, minhash in minhashes.items():
        for j in lsh.query(minhash):
            if j != i and minhash.jaccard(minhashes[j]) >= config.threshold:
                a, b = root(i), root(j)
                parent[max(a, b)] = min(a, b)  # the root is the cluster's smallest index: its first document
    return {i: root(i) for i in range(len(texts)) if root(i) != i}


def quality_signals(text: str) -> dict[str, float]:
    """Every quantity the quality rules bound, for one document.

    Words are whitespace-separated tokens (so `>>>` and `=` count, as Gopher's alphabetic-word rule needs);
    mean word length is over tokens stripped of surrounding punctuation.
    """
    tokens = text.split()
    n_tokens = max(len(tokens), 1)
    stripped = [t for t in (t.strip(PUNCTUATION) for t in tokens) if t]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    paragraphs = [p.strip() for p in PARAGRAPH_BREAK.split(text) if p.strip()]
    n_lines = max(len(lines), 1)
    signals = {
        "words": len(tokens),
        "mean_word_length": sum(map(len, stripped)) / len(stripped) if stripped else 0.0,
        "hash_word_ratio": text.count("#") / n_tokens,
        "ellipsis_word_ratio": sum(text.count(e) for e in ELLIPSES) / n_tokens,
        "bullet_lines_ratio": sum(line.startswith(BULLETS) for line in lines) / n_lines,
        "ellipsis_lines_ratio": sum(line.endswith(ELLIPSES) for line in lines) / n_lines,
        "alpha_words_ratio": sum(bool(LETTER.search(t)) for t in tokens) / n_tokens,
        "stop_words": sum(t.lower() in STOP_WORDS for t in stripped),
    }
    for name, parts in (("line", lines), ("paragraph", paragraphs)):
        repeats = _repeats(parts)
        signals[f"dup_{name}_fraction"] = len(repeats) / max(len(parts), 1)
        signals[f"dup_{name}_char_fraction"] = sum(map(len, repeats)) / max(len(text), 1)
    lengths = np.array([len(t) for t in tokens], dtype=np.int64)
    keys = np.array([hash(t) for t in tokens], dtype=np.int64).view(np.uint64)  # equal words, equal keys
    for n in range(2, 11):
        top, dup = _ngram_char_fractions(keys, lengths, n, len(text))
        if n <= 4:
            signals[f"top_{n}gram_char_fraction"] = top
        if n >= 5:
            signals[f"dup_{n}gram_char_fraction"] = dup
    return signals


def broken_rules(text: str, config: QualityConfig) -> list[str]:
    """The rules of `config.rules()` that `text` breaks, in that order; empty when it passes them all."""
    signals = quality_signals(text)
    return [
        rule
        for rule, signal, bound, is_max in config.rules()
        if ((signals[signal] > bound) if is_max else (signals[signal] < bound))
    ]


def run_cleaning(documents: list[Document], config: CleaningConfig | None = None) -> tuple[list[Document], dict]:
    """Normalise, remove exact duplicates, near-duplicates and low-quality documents; first of duplicates kept.

    Returns the kept documents (normalised text, input order) and stats:
    - stats[stage] for each of STAGES: docs_in, chars_in, docs_removed, chars_removed, docs_out, chars_out,
      seconds; in = out + removed. Normalisation removes no document; its chars_removed is the net number of
      characters its repairs removed.
    - stats["quality_rules"]: {rule: documents it removed}, every rule of `config.quality.rules()`, in order.
    - stats["removed"]: {id: stage or "quality:<rule>"}; stats["duplicate_of"]: {id: id of the kept first copy}.
    """
    config = config or CleaningConfig()
    if len({d.id for d in documents}) != len(documents):
        raise ValueError("run_cleaning needs unique document ids (they name what each stage removed)")
    stats: dict = {}
    removed: dict[str, str] = {}
    duplicate_of: dict[str, str] = {}

    def stage(name: str, before: list[Document], after: list[Document], started: float) -> list[Document]:
        chars_in, chars_out = sum(len(d.text) for d in before), sum(len(d.text) for d in after)
        stats[name] = {
            "docs_in": len(before),
            "chars_in": chars_in,
            "docs_removed": len(before) - len(after),
            "chars_removed": chars_in - chars_out,
            "docs_out": len(after),
            "chars_out": chars_out,
            "seconds": round(time.perf_counter() - started, 3),
        }
        return after

    started = time.perf_counter()
    docs = stage("normalize", documents, [Document(d.id, normalize_text(d.text)) for d in documents], started)

    started, first_with = time.perf_counter(), {}
    for doc in docs:
        first = first_with.setdefault(text_hash(doc.text), doc.id)
        if first != doc.id:
            removed[doc.id], duplicate_of[doc.id] = "exact_dedup", first
    docs = stage("exact_dedup", docs, [d for d in docs if d.id not in removed], started)

    started = time.perf_counter()
    for i, first in near_duplicates([d.text for d in docs], config).items():
        removed[docs[i].id], duplicate_of[docs[i].id] = "near_dedup", docs[first].id
    docs = stage("near_dedup", docs, [d for d in docs if d.id not in removed], started)

    started = time.perf_counter()
    rules = Counter({rule: 0 for rule, *_ in config.quality.rules()})
    for doc in docs:
        broken = broken_rules(doc.text, config.quality)
        if broken:  # the first broken rule takes the blame, so the rules' counts add up to the stage's
            rules[broken[0]] += 1
            removed[doc.id] = f"quality:{broken[0]}"
    docs = stage("quality", docs, [d for d in docs if d.id not in removed], started)
    stats |= {"quality_rules": dict(rules), "removed": removed, "duplicate_of": duplicate_of}
    return docs, stats


@dataclass(frozen=True)
class PlantRates:
    """How many defects `make_raw_corpus` plants, each as a fraction of the clean documents."""

    exact_dup: float = 0.10  # verbatim copies, some with CRLF line ends or trailing spaces
    near_dup: float = 0.10  # copies with `near_edit_fraction` of words edited and boilerplate added
    mojibake: float = 0.05  # clean documents replaced by a copy whose paragraphs were mis-decoded as cp1252
    spam: float = 0.10  # generated low-quality documents, one of SPAM_KINDS each
    near_edit_fraction: float = 0.02  # words substituted, inserted or deleted in a near-duplicate


PLANT_KINDS = ("dup-of", "near-of", "mojibake", "spam")
SPAM_KINDS = ("symbols", "repeated_lines", "keyword_stuffing", "short", "ellipsis", "non_alpha")
HEADERS = ("Home | About | Blog | Contact", "Skip to main content", "Posted by admin on 12 March 2019 in News")
FOOTERS = (
    "Copyright 2019 Example Media Ltd. All rights reserved.",
    "Share this: Facebook Twitter LinkedIn Email Print",
    "Subscribe to our newsletter for the latest updates and offers.",
)
SPAM_PHRASES = (
    "cheap flights", "best price", "buy now", "free shipping", "casino bonus", "weight loss pills", "online deals",
    "hot offers", "click here", "limited time", "discount codes", "crypto signals", "top rated", "win big",
)
TYPOGRAPHY = (
    (re.compile(r'"([^"\n]{1,80})"'), "“\\1”"),
    (re.compile(r"(?<=\w)'(?=\w)"), "’"),
    (re.compile(" -- "), " — "),
)
# UTF-8 read as cp1252: "â€" begins each mis-decoded ’ “ ” —; "Ã" or "Â" and a C1-range character, most of Latin-1
MOJIBAKE = re.compile("â€|Ã[\u0080-\u00bf]|Â[\u0080-\u00bf]")


def plant_kind(doc_id: str) -> str | None:
    """The defect a `make_raw_corpus` id names: "dup-of", "near-of", "mojibake", "spam:<kind>"; None if clean."""
    prefix, _, rest = doc_id.partition(":")
    if prefix not in PLANT_KINDS or not rest:
        return None
    return f"spam:{rest.split('#')[0]}" if prefix == "spam" else prefix


def make_raw_corpus(documents: list[Document], seed: int = 0, rates: PlantRates | None = None) -> list[Document]:
    """A web-like raw corpus: the clean documents with defects planted at `rates`; the same for the same seed.

    Ids say what each plant is: `dup-of:<id>#k`, `near-of:<id>#k`, `mojibake:<id>` (it replaces `<id>`, whose
    text it carries with curly quotes and dashes, some paragraphs mis-decoded), `spam:<kind>#k`. A copy
    lands at a random place after its source, as a re-crawl would, so keeping the first copy keeps the source.
    """
    rates = rates or PlantRates()
    rng = random.Random(seed)
    n = len(documents)
    count = {kind: round(getattr(rates, kind) * n) for kind in ("exact_dup", "near_dup", "mojibake", "spam")}
    # mojibake takes documents with text to mis-decode; copies take their sources from the others
    typographic = {i: _typographic(d.text) for i, d in enumerate(documents)}
    candidates = [i for i, text in typographic.items() if not text.isascii()]
    mangled = set(rng.sample(candidates, min(count["mojibake"], len(candidates))))
    placed: list[tuple[float, Document]] = []
    for i, doc in enumerate(documents):
        if i in mangled:
            placed.append((i, Document(f"mojibake:{doc.id}", _mojibake(typographic[i], rng))))
        else:
            placed.append((i, doc))
    sources = [i for i in range(n) if i not in mangled]
    for k in range(count["exact_dup"]):
        i = rng.choice(sources)
        copy = Document(f"dup-of:{documents[i].id}#{k}", _exact_copy(documents[i].text, rng))
        placed.append((rng.uniform(i, n), copy))
    for k in range(count["near_dup"]):
        i = rng.choice(sources)
        copy = Document(f"near-of:{documents[i].id}#{k}", _near_copy(documents[i].text, rng, rates.near_edit_fraction))
        placed.append((rng.uniform(i, n), copy))
    for k in range(count["spam"]):
        kind = rng.choice(SPAM_KINDS)
        placed.append((rng.uniform(0, n), Document(f"spam:{kind}#{k}", _spam(kind, rng))))
    return [doc for _, doc in sorted(placed, key=lambda p: p[0])]


def score_against_plants(
    raw: list[Document], kept: list[Document], removed: Mapping[str, str] | None = None
) -> dict[str, dict]:
    """Per plant kind and for the clean documents: how many there were, how many were removed, and by what.

    Planted duplicates and spam should be removed (recall = removed / planted); mojibake plants should be kept
    and repaired (`repaired`: kept with no mojibake left); a removed clean document is a false positive. With
    `removed` (run_cleaning's stats["removed"]), each entry counts its removals by stage ("removed_by"), and
    "stages" gives each stage's precision: the share of its removals that were planted duplicates or spam.
    """
    kept_text = {d.id: d.text for d in kept}
    groups: dict[str, list[str]] = {}
    for doc in raw:
        groups.setdefault(plant_kind(doc.id) or "clean", []).append(doc.id)
    spam = [i for kind, ids in groups.items() if kind.startswith("spam:") for i in ids]
    if spam:
        groups["spam"] = spam
    scores: dict[str, dict] = {}
    for kind, ids in sorted(groups.items()):
        gone = [i for i in ids if i not in kept_text]
        entry: dict = {"docs": len(ids), "removed": len(gone), "removed_fraction": len(gone) / len(ids)}
        if removed is not None:
            entry["removed_by"] = dict(Counter(removed[i].split(":")[0] for i in gone))
        if kind == "mojibake":
            entry["repaired"] = sum(i in kept_text and not MOJIBAKE.search(kept_text[i]) for i in ids)
        if kind == "clean":
            entry["removed_ids"] = gone
        scores[kind] = entry
    if removed is not None:
        by_stage: dict[str, Counter] = {}
        for doc_id, reason in removed.items():
            kind = plant_kind(doc_id) or "clean"
            by_stage.setdefault(reason.split(":")[0], Counter())[kind] += 1
        scores["stages"] = {
            stage: {
                "removed": sum(kinds.values()),
                "precision": sum(c for k, c in kinds.items() if k not in ("clean", "mojibake")) / sum(kinds.values()),
                "by_kind": dict(kinds),
            }
            for stage, kinds in by_stage.items()
        }
    return scores


def _repeats(parts: list[str]) -> list[str]:
    """The elements that equal an earlier element."""
    seen: set[str] = set()
    repeats = []
    for part in parts:
        if part in seen:
            repeats.append(part)
        seen.add(part)
    return repeats


def _ngram_char_fractions(keys: np.ndarray, lengths: np.ndarray, n: int, text_chars: int) -> tuple[float, float]:
    """(top n-gram character fraction, duplicate n-gram character fraction) of a text (Gopher, Table A1).

    `keys` and `lengths` are the text's words as 64-bit hashes and their lengths. The first is the characters of
    the most frequent repeated n-gram times its count; the second, the characters of words covered by an
    n-gram that occurred earlier (overlaps counted once). Each word counts with one separator, and both are
    over the text's characters, as in datatrove's implementation that FineWeb used.
    """
    if len(keys) < n or text_chars == 0:
        return 0.0, 0.0
    chars = lengths + 1  # the word and one separator
    # one 64-bit key per n-gram, sum of word keys times odd multipliers (wrapping); collisions ~ positions^2 / 2^64
    grams = (np.lib.stride_tricks.sliding_window_view(keys, n) * NGRAM_MULTIPLIERS[:n]).sum(axis=1)  # (positions,)
    _, first, inverse, counts = np.unique(grams, return_index=True, return_inverse=True, return_counts=True)
    top = 0.0
    if counts.max() > 1:  # of the most frequent n-grams, the longest, so ties do not depend on the keys' order
        starts = first[counts == counts.max()]
        gram_chars = np.lib.stride_tricks.sliding_window_view(chars, n)[starts].sum(axis=1) - 1
        top = counts.max() * gram_chars.max() / text_chars
    starts = np.flatnonzero(first[inverse] != np.arange(len(grams)))
    coverage = np.zeros(len(keys) + 1, dtype=np.int64)
    np.add.at(coverage, starts, 1)
    np.add.at(coverage, starts + n, -1)
    dup = chars[np.cumsum(coverage[:-1]) > 0].sum() / text_chars
    return float(top), float(min(dup, 1.0))


def _typographic(text: str) -> str:
    """The text as a web page would set it: curly quotes and apostrophes, em dashes."""
    for pattern, replacement in TYPOGRAPHY:
        text = pattern.sub(replacement, text)
    return text


def _mojibake(text: str, rng: random.Random) -> str:
    """Some consecutive paragraphs, from one holding a non-ASCII character, encoded UTF-8 and decoded cp1252."""
    paragraphs = text.split("\n\n")
    non_ascii = [i for i, p in enumerate(paragraphs) if not p.isascii()]
    start = rng.choice(non_ascii)
    end = rng.randint(start + 1, len(paragraphs))
    for i in range(start, end):
        paragraphs[i] = paragraphs[i].encode("utf-8").decode("sloppy-windows-1252")
    return "\n\n".join(paragraphs)


def _exact_copy(text: str, rng: random.Random) -> str:
    """The text, or the same after normalisation: with CRLF line ends, or trailing spaces on its lines."""
    variant = rng.choice(("verbatim", "verbatim", "crlf", "trailing_spaces"))
    if variant == "crlf":
        return text.replace("\n", "\r\n")
    if variant == "trailing_spaces":
        return "\n".join(line + " " * rng.randint(1, 3) for line in text.split("\n"))
    return text


def _near_copy(text: str, rng: random.Random, edit_fraction: float) -> str:
    """`edit_fraction` of the words substituted, duplicated-with-another or deleted; a header and/or footer added."""
    parts = re.split(r"(\s+)", text)  # words at even indices, whitespace between
    positions = [i for i in range(0, len(parts), 2) if parts[i]]
    vocabulary = [parts[i] for i in positions]
    for i in rng.sample(positions, min(len(positions), max(1, round(edit_fraction * len(positions))))):
        edit = rng.choice(("substitute", "insert", "delete"))
        if edit == "substitute":
            parts[i] = rng.choice(vocabulary)
        elif edit == "insert":
            parts[i] = f"{parts[i]} {rng.choice(vocabulary)}"
        else:
            parts[i] = ""
    body = "".join(parts)
    header, footer = rng.choice(HEADERS), rng.choice(FOOTERS)
    return rng.choice((f"{header}\n\n{body}", f"{body}\n\n{footer}", f"{header}\n\n{body}\n\n{footer}"))


def _spam(kind: str, rng: random.Random) -> str:
    """A generated low-quality document of `kind` (one of SPAM_KINDS), each aimed at a different quality rule."""

    def phrases(k: int) -> list[str]:
        return [rng.choice(SPAM_PHRASES) for _ in range(k)]

    if kind == "symbols":  # hashtag runs: '#' per word far above 0.1
        return "\n".join(" ".join("#" + p.replace(" ", "") for p in phrases(rng.randint(6, 12))) for _ in range(12))
    if kind == "repeated_lines":  # the same few lines over and over
        lines = [f"{p.capitalize()} today, visit our store for the {q}!" for p, q in zip(phrases(3), phrases(3))]
        return "\n".join(rng.choice(lines) for _ in range(rng.randint(30, 60)))
    if kind == "keyword_stuffing":  # one phrase dominating the text
        main = rng.choice(SPAM_PHRASES)
        return f"{main.title()}: " + ", ".join(main if rng.random() < 0.6 else q for q in phrases(rng.randint(60, 120)))
    if kind == "short":
        notice = rng.choice(("Page not found.", "Loading...", "Please enable JavaScript to view this page."))
        return f"{notice} {' '.join(phrases(3))}"
    if kind == "ellipsis":  # teaser lines that all trail off
        teasers = zip(phrases(20), phrases(20))
        return "\n".join(f"The {p} that everyone is talking about and why you need to know the {q}..." for p, q in teasers)
    # non_alpha: a price table, mostly numbers and symbols
    def cell() -> str:
        return f"${rng.randint(1, 999)}.{rng.randint(0, 99):02d} {rng.randint(1, 5)}/5 {rng.randint(100, 99999):,}"

    return "\n".join(" | ".join(cell() for _ in range(4)) for _ in range(15))
