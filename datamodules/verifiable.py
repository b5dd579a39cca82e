"""Tasks whose answers a program can check: arithmetic, copying, reversing, sorting, counting letters.

Each generator is a pure function of `(n, seed)` returning `n` rows `{"question", "answer", ...}`;
the same generators make the evaluation rows (`verifiable_rows`, which `evaluation.build_tasks` writes for the
lm-eval YAML under `evaluation/tasks/`) and the SFT and alignment data, which leave those rows' questions out.
A prompt is `Q: <question>\\nA:` and the model should continue with ` <answer>`.
"""

from __future__ import annotations

import random
from collections.abc import Callable

# Short, common, lowercase words: one BPE token or two on any English corpus, so the task is
# about the operation, not about spelling rare words.
WORDS = (
    "apple bread chair cloud dance earth field glass green happy horse house light money music "
    "night ocean paper party phone plant queen river round sheep shirt smile snake sound south "
    "space stone storm sugar table tiger train water whale white world young black brown clock "
    "dream heart lemon mouse north pilot salad spoon sweet truck voice"
).split()


def prompt(question: str) -> str:
    """The text the model reads; its answer follows after one space."""
    return f"Q: {question}\nA:"


def _rng(task: str, seed: int) -> random.Random:
    # a separate stream per task, so adding rows to one task never changes another
    return random.Random(f"{task}-{seed}")


def arithmetic(n: int, seed: int = 0, max_operand: int = 99) -> list[dict]:
    """`What is a + b?` / `What is a - b?` with 0 <= a, b <= max_operand; answers may be negative."""
    rng, rows = _rng("arithmetic", seed), []
    for _ in range(n):
        a, b, op = rng.randint(0, max_operand), rng.randint(0, max_operand), rng.choice("+-")
        rows.append({"question": f"What is {a} {op} {b}?", "answer": str(a + b if op == "+" else a - b)})
    return rows


def arithmetic_choices(n: int, seed: int = 0, n_choices: int = 4) -> list[dict]:
    """`arithmetic` as multiple choice: the sum or difference among near misses (off by 1, 2 or 10).

    Adds `choices` (answers as strings, in random order) and `label` (index of the right one).
    """
    rng, rows = _rng("arithmetic_choices", seed), []
    for row in arithmetic(n, seed):
        answer = int(row["answer"])
        wrong = rng.sample([answer + d for d in (-10, -2, -1, 1, 2, 10)], n_choices - 1)
        choices = [str(c) for c in rng.sample([answer, *wrong], n_choices)]
        rows.append(row | {"choices": choices, "label": choices.index(row["answer"])})
    return rows


def _word_list(rng: random.Random, min_len: int = 3, max_len: int = 6) -> list[str]:
    return rng.sample(WORDS, rng.randint(min_len, max_len))


def copy_words(n: int, seed: int = 0) -> list[dict]:
    """`Repeat the words: a b c` -> `a b c`."""
    rng, rows = _rng("copy", seed), []
    for _ in range(n):
        words = " ".join(_word_list(rng))
        rows.append({"question": f"Repeat the words: {words}", "answer": words})
    return rows


def reverse_words(n: int, seed: int = 0) -> list[dict]:
    """`Reverse the words: a b c` -> `c b a`."""
    rng, rows = _rng("reverse", seed), []
    for _ in range(n):
        words = _word_list(rng)
        rows.append({"question": f"Reverse the words: {' '.join(words)}", "answer": " ".join(words[::-1])})
    return rows


def sort_numbers(n: int, seed: int = 0, max_value: int = 99) -> list[dict]:
    """`Sort ascending: 42 7 19` -> `7 19 42` (3 to 6 integers in [0, max_value], repeats allowed)."""
    rng, rows = _rng("sort", seed), []
    for _ in range(n):
        values = [rng.randint(0, max_value) for _ in range(rng.randint(3, 6))]
        rows.append({
            "question": f"Sort ascending: {' '.join(map(str, values))}",
            "answer": " ".join(map(str, sorted(values))),
        })
    return rows


def count_letter(n: int, seed: int = 0) -> list[dict]:
    """`How many times does the letter r appear in storm?` -> `1`; one letter in five is absent (answer 0)."""
    rng, rows = _rng("count_letter", seed), []
    for _ in range(n):
        word = rng.choice(WORDS)
        letter = rng.choice(word) if rng.random() < 0.8 else rng.choice("abcdefghijklmnopqrstuvwxyz")
        rows.append({
            "question": f"How many times does the letter {letter} appear in {word}?",
            "answer": str(word.count(letter)),
        })
    return rows


# Task name suffix -> generator; `repro_verifiable_<name>` in evaluation/tasks/.
GENERATORS: dict[str, Callable[..., list[dict]]] = {
    "arithmetic": arithmetic,
    "arithmetic_mc": arithmetic_choices,
    "copy": copy_words,
    "reverse": reverse_words,
    "sort": sort_numbers,
    "count_letter": count_letter,
}

HELD_OUT_SEED = 0  # the seed of the evaluation rows (`evaluation.build_tasks`' default)
HELD_OUT_ROWS = 200  # rows per evaluation task


def verifiable_rows(name: str, seed: int = HELD_OUT_SEED, n: int = HELD_OUT_ROWS) -> list[dict]:
    """The rows of `repro_verifiable_<name>`: a function of the seed alone (SFT trains on none of them)."""
    return GENERATORS[name](n, seed)
