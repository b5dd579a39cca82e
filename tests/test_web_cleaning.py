"""Cleaning web-like text document by document: normalisation, exact and near dedup, quality rules, planted defects."""

from __future__ import annotations

import random

import pytest

from datamodules.sources import Document
from datamodules.web_cleaning import (
    MOJIBAKE,
    STAGES,
    CleaningConfig,
    PlantRates,
    STOP_WORDS,
    QualityConfig,
    broken_rules,
    make_raw_corpus,
    near_duplicates,
    normalize_text,
    plant_kind,
    run_cleaning,
    score_against_plants,
    shingles,
)

PROSE = (
    "The river rose slowly through the night, and by morning the lower fields were under a sheet of brown "
    "water. Farmers who had lived in the valley for decades said they had never seen it climb so quickly. "
    "Volunteers from the nearby town arrived with sandbags and tractors, working beside the families to "
    "protect the houses that stood closest to the bank. By the afternoon the rain had eased, and the water "
    "began to settle back into its usual course."
)
PROSE_LINES = PROSE.replace(". ", ".\n")  # one sentence a line
# A distinct document on the same subject: similar words, different text.
SAME_TOPIC = (
    "Flooding along the valley is common in spring, when melting snow from the hills swells the river. "
    "Engineers have proposed a series of small reservoirs upstream that would hold back water during the "
    "worst weeks and release it slowly over the summer. Local farmers support the plan, although some worry "
    "that the reservoirs will cover good grazing land and change the way the river floods the lower fields."
)
# Twice the default plants per document, so more plants per test. Near copies edit 1% of the words (the default 2%
# leaves their 5-gram Jaccard near 0.82, next to the 0.8 threshold, where MinHash's estimate decides by chance).
DENSE = PlantRates(exact_dup=0.2, near_dup=0.2, mojibake=0.1, spam=0.2, near_edit_fraction=0.01)


# Made-up prose, the same on every machine (the interpreter's own texts, such as pydoc's language reference, change
# with its version): pseudo-words of 2-4 syllables between common English words, with quotes, apostrophes and dashes
# that `make_raw_corpus` sets typographically. It breaks no Gopher rule, and no two documents share a 5-gram.
SYLLABLES = ("ba be bi bo da de di do fa fe fi fo ga ge gi go ka ke ki ko la le li lo ma me mi mo na ne ni no "
             "pa pe pi po ra re ri ro sa se si so ta te ti to va ve vi vo za ze zi zo").split()
GLUE = "the of and to in that with for on by as from a is was it".split()
_words = random.Random(0)
VOCABULARY = sorted({"".join(_words.choices(SYLLABLES, k=_words.randint(2, 4))) + _words.choice(["", "n", "s", "r"])
                     for _ in range(4000)})


def made_up_prose(seed: int, paragraphs: int) -> str:
    """`paragraphs` paragraphs of 3-6 sentences of 8-18 words (about 60 words a paragraph)."""
    rng = random.Random(seed)
    out = []
    for _ in range(paragraphs):
        sentences = []
        for _ in range(rng.randint(3, 6)):
            words = [rng.choice(GLUE) if rng.random() < 0.35 else rng.choice(VOCABULARY) for _ in range(rng.randint(8, 18))]
            mark = rng.random()
            if mark < 0.2:  # a quoted phrase
                i = rng.randrange(1, len(words) - 3)
                words[i], words[i + 2] = '"' + words[i], words[i + 2] + '"'
            elif mark < 0.3:
                words[rng.randrange(1, len(words))] += "'s"
            elif mark < 0.4:
                words.insert(rng.randrange(2, len(words) - 1), "--")
            text = " ".join(words)
            sentences.append(text[0].upper() + text[1:] + ".")
        out.append(" ".join(sentences))
    return "\n\n".join(out) + "\n"


def clean_documents(n: int = 50) -> list[Document]:
    """`n` made-up documents of 4-8 paragraphs (about 190 to 520 words)."""
    return [Document(f"doc{d:02d}", made_up_prose(d, random.Random(1000 + d).randint(4, 8))) for d in range(n)]


LONG = [made_up_prose(100 + k, 8) for k in range(4)]  # four distinct documents of 300+ words


def test_ftfy_repairs_mojibake_and_escapes_but_keeps_curly_quotes() -> None:
    text = "The café’s “menu” — naïve prices"
    assert normalize_text(text.encode("utf-8").decode("sloppy-windows-1252")) == text  # a browser's cp1252
    assert normalize_text("The cafÃ© is open") == "The café is open"
    assert normalize_text("Fish &amp; chips\r\nline  \n") == "Fish & chips\nline\n"
    assert normalize_text(text) == text


def test_exact_dedup_keeps_the_first_copy_after_normalisation() -> None:
    docs = [
        Document("a", PROSE + "\n"),
        Document("a-crlf", PROSE + "  \r\n"),  # the same after normalisation
        Document("b", SAME_TOPIC),
        Document("a-lines", PROSE_LINES),  # the same words on other lines: a near duplicate, not an exact one
    ]
    kept, stats = run_cleaning(docs)
    assert [d.id for d in kept] == ["a", "b"]
    assert stats["removed"] == {"a-crlf": "exact_dedup", "a-lines": "near_dedup"}
    assert stats["duplicate_of"] == {"a-crlf": "a", "a-lines": "a"}


def test_minhash_lsh_finds_a_near_duplicate_and_keeps_a_distinct_document() -> None:
    original = LONG[1]
    words = original.split(" ")
    for i in (40, 90, 150, 220):  # four words of 300+ changed
        words[i] = "changed"
    near = " ".join(words)
    jaccard = len(shingles(original) & shingles(near)) / len(shingles(original) | shingles(near))
    assert 0.8 < jaccard < 0.95
    texts = [LONG[0], original, LONG[2], near, LONG[3]]  # distinct texts of the same words
    assert near_duplicates(texts, CleaningConfig()) == {3: 1}
    assert near_duplicates([PROSE, SAME_TOPIC, PROSE.replace("slowly", "steadily")], CleaningConfig()) == {2: 0}


def test_near_duplicate_clusters_keep_their_first_document() -> None:
    base = LONG[1].split(" ")
    chain = [" ".join(base[: 300 - 20 * k]) for k in range(3)]  # each is ~90% of the one before
    assert near_duplicates(chain[::-1], CleaningConfig()) == {1: 0, 2: 0}


def test_normal_prose_breaks_no_quality_rule() -> None:
    assert broken_rules(PROSE, QualityConfig()) == []
    assert broken_rules(PROSE_LINES, QualityConfig()) == []
    assert broken_rules(SAME_TOPIC + "\n\n" + PROSE, QualityConfig()) == []


REPEATED_PARAGRAPHS = "\n\n".join([PROSE, "Read more below.", SAME_TOPIC] + ["Read more below."] * 3)
VIOLATIONS = {
    "min_words": "The river rose slowly through the night.",
    "max_words": " ".join(f"w{i}" for i in range(100_001)),
    "min_mean_word_length": " ".join(["it is a bit of an odd day to go on and on"] * 8),
    "max_mean_word_length": " ".join(["internationalization characteristically incomprehensibilities"] * 20),
    "max_hash_word_ratio": PROSE + " " + " ".join(f"#flood{i}" for i in range(12)),
    "max_ellipsis_word_ratio": PROSE.replace(",", "...").replace(" the ", " the... "),
    "max_bullet_lines_ratio": "\n".join(f"- {line}" for line in PROSE_LINES.splitlines()),
    "max_ellipsis_lines_ratio": PROSE_LINES.replace(".\n", "...\n"),
    "min_alpha_words_ratio": PROSE + " " + " ".join(str(i) for i in range(40)),
    "min_stop_words": " ".join(w for w in PROSE.split() if w.lower().strip(".,") not in STOP_WORDS),
    "max_dup_line_fraction": PROSE_LINES + "\nRead more.\nRead more.\nRead more.\nRead more.",
    "max_dup_paragraph_fraction": REPEATED_PARAGRAPHS,
    "max_dup_line_char_fraction": PROSE_LINES + "\n" + "\n".join([PROSE_LINES.splitlines()[2]] * 2),
    "max_dup_paragraph_char_fraction": PROSE + "\n\n" + PROSE,
    **{f"max_top_{n}gram_char_fraction": PROSE + " " + "buy cheap shoes online " * 20 for n in (2, 3, 4)},
    **{f"max_dup_{n}gram_char_fraction": PROSE + " " + PROSE for n in range(5, 11)},
}


def test_every_rule_has_a_violation() -> None:
    assert set(VIOLATIONS) == {rule for rule, *_ in QualityConfig().rules()}


@pytest.mark.parametrize("rule", sorted(VIOLATIONS))
def test_each_quality_rule_removes_a_document_made_to_break_it(rule: str) -> None:
    assert rule in broken_rules(VIOLATIONS[rule], QualityConfig())


def test_a_rule_turned_off_removes_nothing() -> None:
    assert broken_rules(VIOLATIONS["min_words"], QualityConfig(min_words=None)) == []


def test_make_raw_corpus_is_deterministic_and_labels_its_plants() -> None:
    clean = clean_documents()
    raw = make_raw_corpus(clean, seed=3, rates=DENSE)
    assert raw == make_raw_corpus(clean, seed=3, rates=DENSE)
    assert raw != make_raw_corpus(clean, seed=4, rates=DENSE)
    kinds = [plant_kind(d.id) for d in raw]
    n = len(clean)
    assert kinds.count("dup-of") == round(0.2 * n) and kinds.count("near-of") == round(0.2 * n)
    assert kinds.count("mojibake") == round(0.1 * n)
    assert sum(k is not None and k.startswith("spam:") for k in kinds) == round(0.2 * n)
    by_id = {d.id: d.text for d in clean}
    position = {d.id: i for i, d in enumerate(raw)}
    for doc in raw:
        kind, source = plant_kind(doc.id), doc.id.partition(":")[2].rpartition("#")[0]
        if kind == "dup-of":
            assert normalize_text(doc.text) == normalize_text(by_id[source]) and position[source] < position[doc.id]
        elif kind == "near-of":
            assert doc.text != by_id[source] and position[source] < position[doc.id]
        elif kind == "mojibake":
            assert MOJIBAKE.search(doc.text) and not MOJIBAKE.search(normalize_text(doc.text))
            assert doc.id.partition(":")[2] not in position  # it replaces its clean original
        elif kind is None:
            assert doc.text == by_id[doc.id]


@pytest.fixture(scope="module")
def cleaning_run() -> tuple[list[Document], list[Document], dict]:
    """A raw corpus of 45 made-up documents and 35 plants, through the whole cleaning."""
    raw = make_raw_corpus(clean_documents(), seed=0, rates=DENSE)
    kept, stats = run_cleaning(raw)
    return raw, kept, stats


def test_run_cleaning_removes_planted_defects_and_few_clean_documents(cleaning_run) -> None:
    raw, kept, stats = cleaning_run
    scores = score_against_plants(raw, kept, stats["removed"])
    plants = sum(scores[k]["docs"] for k in ("dup-of", "near-of", "spam", "mojibake"))
    handled = sum(scores[k]["removed"] for k in ("dup-of", "near-of", "spam")) + scores["mojibake"]["repaired"]
    assert handled / plants >= 0.9
    assert scores["dup-of"]["removed_fraction"] == 1 and scores["spam"]["removed_fraction"] == 1
    assert scores["near-of"]["removed_fraction"] >= 0.8
    # the clean documents are prose that breaks no rule and shares no 5-gram with another: nothing removes them
    assert scores["stages"]["exact_dedup"]["precision"] == 1 and scores["stages"]["near_dedup"]["precision"] == 1
    assert scores["clean"]["removed"] == 0 and scores["mojibake"]["repaired"] == scores["mojibake"]["docs"]


def test_stage_counts_add_up(cleaning_run) -> None:
    raw, kept, stats = cleaning_run
    assert list(stats)[: len(STAGES)] == list(STAGES)
    for stage in STAGES:
        s = stats[stage]
        assert s["docs_in"] == s["docs_out"] + s["docs_removed"]
        assert s["chars_in"] == s["chars_out"] + s["chars_removed"]
    for before, after in zip(STAGES, STAGES[1:]):
        assert stats[before]["docs_out"] == stats[after]["docs_in"]
        assert stats[before]["chars_out"] == stats[after]["chars_in"]
    assert stats["normalize"]["docs_in"] == len(raw) and stats["quality"]["docs_out"] == len(kept)
    assert stats["normalize"]["chars_in"] == sum(len(d.text) for d in raw)
    assert sum(stats["quality_rules"].values()) == stats["quality"]["docs_removed"]
    assert len(stats["removed"]) == sum(stats[s]["docs_removed"] for s in STAGES)
    assert set(stats["duplicate_of"]) == {i for i, why in stats["removed"].items() if why.endswith("dedup")}


def test_run_cleaning_needs_unique_ids() -> None:
    with pytest.raises(ValueError, match="unique"):
        run_cleaning([Document("a", PROSE), Document("a", SAME_TOPIC)])
