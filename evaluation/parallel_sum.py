"""Sums of many terms: a verifiable task on which to compare Hogwild! inference (`modules/decoding/hogwild.py`)
with one worker, in sequential steps and wall time to finish, and in accuracy.

A row asks for the sum of `terms` integers in the verifiable tasks' format (`Q: What is 12 + 7 + ... + 40?\\nA:`,
answer ` <sum>`). `solve` runs a row with W workers (W = 1: the sequential baseline) under one finish rule:
the run ends when a worker completes a line (a newline in its text, or `eos_id`: a chat model's `<|end|>`, whose
prompt is a user turn), and the answer is the first integer of that line, read from the finishing worker's
block of the merged transcript. A model reads the
workers' interleaved tokens well only if trained on such transcripts (see `modules/decoding/hogwild.py`).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from statistics import mean
from typing import Any

from tokenizers import Tokenizer

from datamodules.chat import END, is_chat_tokenizer, prompt_ids
from datamodules.verifiable import prompt
from modules.decoding.hogwild import hogwild_generate
from modules.nn.decoder import Decoder


def sum_rows(n: int, seed: int = 0, terms: int = 8, max_operand: int = 99) -> list[dict]:
    """`What is a + b + ... ?` over `terms` integers in [0, max_operand]; rows carry the `terms` too."""
    rng, rows = random.Random(f"parallel_sum-{seed}"), []
    for _ in range(n):
        values = [rng.randint(0, max_operand) for _ in range(terms)]
        rows.append({"question": f"What is {' + '.join(map(str, values))}?", "answer": str(sum(values)), "terms": values})
    return rows


def answer_of(text: str) -> str | None:
    """The integer a continuation's first line opens with (` 42\\nQ: ...` -> `42`), or None."""
    match = re.match(r"\s*(-?\d+)", text.split("\n")[0])
    return match.group(1) if match else None


def solve(
    model: Decoder,
    tokenizer: Tokenizer,
    row: dict,
    workers: int,
    max_new_tokens: int,
    headers: Sequence[str] | None = None,
    **sampling: Any,
) -> dict[str, Any]:
    """One row with `workers` workers: its answer, whether it is right, steps, tokens and seconds to finish.
    `headers`: one text per worker (e.g. its name); `sampling` as `hogwild_generate`'s (temperature, seed, eos_id)."""
    ids = prompt_ids(tokenizer, prompt(row["question"]))  # a chat model reads it as a user turn, and ends at <|end|>
    if is_chat_tokenizer(tokenizer):
        sampling.setdefault("eos_id", tokenizer.token_to_id(END))
    header_ids = [tokenizer.encode(h).ids for h in headers] if headers is not None else None
    result = hogwild_generate(model, ids, workers, max_new_tokens, headers=header_ids,
                              stop=lambda tokens: "\n" in tokenizer.decode(tokens), **sampling)
    answer = None if result.finisher is None else answer_of(tokenizer.decode(result.tokens[result.finisher]))
    return {"answer": answer, "correct": answer == row["answer"], "finished": result.finisher is not None,
            "steps": result.steps, "tokens": result.total_tokens, "seconds": result.seconds}


def compare(
    model: Decoder,
    tokenizer: Tokenizer,
    rows: list[dict],
    workers: Sequence[int] = (1, 2, 4),
    max_new_tokens: int = 16,
    headers: Callable[[int], Sequence[str] | None] | None = None,
    **sampling: Any,
) -> dict[int, dict[str, float]]:
    """Per worker count, means over `rows`: steps, seconds and tokens to finish, accuracy, and the share of
    runs a worker finished (the rest ran out of `max_new_tokens`). Each count is warmed up on the first row.
    `headers(W)`: the W workers' header texts."""
    out = {}
    for W in workers:
        texts = headers(W) if headers is not None else None
        solve(model, tokenizer, rows[0], W, max_new_tokens, texts, **sampling)
        runs = [solve(model, tokenizer, row, W, max_new_tokens, texts, **sampling) for row in rows]
        out[W] = {key: mean(float(run[key]) for run in runs) for key in ("steps", "seconds", "tokens", "finished")}
        out[W]["accuracy"] = mean(float(run["correct"]) for run in runs)
    return out
