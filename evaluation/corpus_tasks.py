"""Evaluation rows cut from held-out corpus documents: perplexity documents and last-word cloze passages.

Pure functions of the texts and a seed; `evaluation/build_tasks.py` writes their rows to JSONL.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

# A cloze target: a word of 3+ letters ending the passage (after trailing punctuation is dropped),
# separated from its context by one space, as in LAMBADA (Paperno et al. 2016).
LAST_WORD = re.compile(r"(?<= )[A-Za-z]{3,}$")
TRAILING_PUNCTUATION = ".,;:!?"


def perplexity_documents(
    texts: Sequence[str], seed: int = 0, max_docs: int = 50, max_bytes: int = 200_000, max_doc_chars: int = 8_000
) -> list[dict]:
    """Rows `{"text"}`: documents in a seeded order, each cut to its first `max_doc_chars` at a line
    end, taken until `max_docs` documents or `max_bytes` of UTF-8, so a CPU scores them in seconds."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    rows, total = [], 0
    for i in order:
        text = texts[i]
        if len(text) > max_doc_chars:
            cut = text.rfind("\n", 0, max_doc_chars)
            text = text[: cut if cut > 0 else max_doc_chars]
        size = len(text.encode("utf-8"))
        if not text.strip() or total + size > max_bytes:
            continue
        rows.append({"text": text})
        total += size
        if len(rows) == max_docs:
            break
    return rows


def cloze_passage(paragraph: str, min_chars: int = 100, max_chars: int = 1_000) -> str | None:
    """The paragraph as a LAMBADA-style passage ending in its target word, or None if it has no such ending.

    The context is `text.split(' ')[:-1]` and the target `' ' + text.split(' ')[-1]`, exactly
    lm-eval's `lambada_openai` templates, so the passage is stripped of trailing punctuation.
    """
    text = paragraph.strip().rstrip(TRAILING_PUNCTUATION)
    if not min_chars <= len(text) <= max_chars or not LAST_WORD.search(text):
        return None
    return text


def cloze_passages(texts: Sequence[str], seed: int = 0, n: int = 200) -> list[dict]:
    """Rows `{"text"}`: up to `n` passages, paragraphs (blank-line separated) of the texts that end
    in a word, sampled with `seed` and kept in corpus order."""
    candidates = [p for text in texts for p in map(cloze_passage, text.split("\n\n")) if p is not None]
    chosen = sorted(random.Random(seed).sample(range(len(candidates)), min(n, len(candidates))))
    return [{"text": candidates[i]} for i in chosen]
