"""Hogwild! inference: one worker is plain decoding, and every worker's logits are the plain model's on
the sequence its view holds, so it reads another worker's token from the slot after it is written."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from evaluation.parallel_sum import answer_of, compare, solve, sum_rows
from modules.decoding.generation import generate
from modules.decoding.hogwild import HogwildDecoder, hogwild_generate, layout, sequential_generate
from modules.nn import Decoder, DecoderConfig

VOCAB = 67
PROMPT = [5, 17, 3, 9]
HEADERS = [[40, 41], [], [50, 51, 52]]  # unequal, one empty: worker 1 reads its first token after worker 0's header

VARIANTS = [
    pytest.param({}, id="gpt2"),  # learned positions
    pytest.param(dict(position="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2), id="llama-gqa"),
    pytest.param(dict(position="rope", norm="rmsnorm", attention="mla", mla_q_rank=16, mla_rope_dim=4), id="mla"),
    pytest.param(dict(layer_pattern="ma", position="none", mamba_d_state=4), id="hybrid"),
]


pytestmark = pytest.mark.usefixtures("one_thread")


def model(**overrides) -> Decoder:
    torch.manual_seed(0)
    cfg = dict(vocab_size=VOCAB, block_size=64, n_layer=2, n_head=4, n_embd=32, pad_vocab_to=16)
    return Decoder(DecoderConfig(**{**cfg, **overrides})).eval()


def view(prompt: list[int], headers: list[list[int]], rounds: list[list[int]], worker: int, fed: int) -> list[int]:
    """What `worker` reads after `fed` rounds (rounds[r][w]: worker w's token of round r), built token by token:
    before any round, the prompt and the headers up to its own; then every header, the earlier rounds
    whole, and the newest round up to its own token."""
    if fed == 0:
        return [*prompt, *(t for header in headers[: worker + 1] for t in header)]
    seq = [*prompt, *(t for header in headers for t in header)]
    for r in range(fed):
        seq += [rounds[r][w] for w in range(len(headers)) if r < fed - 1 or w <= worker]
    return seq


def run(m: Decoder, rounds: torch.Tensor, headers: list[list[int]] = HEADERS) -> list[torch.Tensor]:
    """Each pass's logits (W, V) when the workers write `rounds` (R, W): the prefill, then one pass per round."""
    W = rounds.shape[1]
    decoder = HogwildDecoder(m, W, len(PROMPT) + sum(map(len, headers)) + rounds.numel())
    return [decoder.prefill(PROMPT, headers)] + [decoder.step(tokens) for tokens in rounds]


@pytest.mark.parametrize("variant", VARIANTS)
def test_one_worker_is_plain_generation(variant: dict) -> None:
    m = model(**variant)
    prompt = [7, 7, 1, 9, 30, 2, 11]
    assert sequential_generate(m, prompt, 12).tokens == generate(m, [prompt], 12)
    sampled = dict(temperature=1.0, top_k=20, seed=3)
    assert hogwild_generate(m, prompt, 1, 12, **sampled).tokens == generate(m, [prompt], 12, **sampled)
    eos = generate(m, [prompt], 12, **sampled)[0][4]
    assert hogwild_generate(m, prompt, 1, 12, eos_id=eos, **sampled).tokens == generate(m, [prompt], 12, eos_id=eos,
                                                                                          **sampled)


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_worker_reads_the_plain_model_on_its_view(variant: dict) -> None:
    m = model(**variant).double()
    rounds = torch.randint(0, VOCAB, (4, 3), generator=torch.Generator().manual_seed(0))  # (R, W)
    with torch.no_grad():
        for fed, logits in enumerate(run(m, rounds)):
            for w in range(3):
                seq = view(PROMPT, HEADERS, rounds.tolist(), w, fed)
                reference = m(torch.tensor([seq]))[0, -1, :VOCAB]
                torch.testing.assert_close(logits[w], reference, atol=1e-10, rtol=0, msg=f"worker {w}, {fed} rounds")


def test_a_worker_reads_another_workers_token_once_it_is_written() -> None:
    m = model(position="rope").double()
    rounds = torch.randint(0, VOCAB, (5, 3), generator=torch.Generator().manual_seed(1))
    s = 2
    changed = rounds.clone()
    changed[s, 1] = (rounds[s, 1] + 1) % VOCAB  # worker 1's token of round s, written by pass s + 1
    before, after = run(m, rounds), run(m, changed)
    # pass p reads rounds < p; in pass s + 1 worker 0's slot precedes worker 1's, worker 2's follows it
    first_affected = {0: s + 2, 1: s + 1, 2: s + 1}
    for p, (a, b) in enumerate(zip(before, after)):
        for w, first in first_affected.items():
            gap = float((a[w] - b[w]).abs().max())
            assert (gap > 1e-9) == (p >= first), f"worker {w}, pass {p}: logits moved by {gap}"


def test_w_workers_write_w_tokens_per_forward_pass() -> None:
    m = model()
    passes = []
    m.register_forward_hook(lambda *_: passes.append(1))
    for W in (1, 2, 4):
        passes.clear()
        result = hogwild_generate(m, PROMPT, W, 6)
        assert result.steps == len(passes) == 6
        assert result.total_tokens == 6 * W and result.finisher is None
    passes.clear()
    one, four = sequential_generate(m, PROMPT, 12), hogwild_generate(m, PROMPT, 4, 3)
    assert one.total_tokens == four.total_tokens == 12
    assert (one.steps, four.steps, len(passes)) == (12, 3, 15)


def test_the_first_worker_to_finish_ends_the_run() -> None:
    m = model(position="rope")
    sampled = dict(headers=HEADERS, temperature=1.0, seed=5)  # one generator: the same draws until a run stops
    free = hogwild_generate(m, PROMPT, 3, 8, **sampled)
    assert free.finisher is None
    eos = free.tokens[1][3]
    r = min(tokens.index(eos) for tokens in free.tokens if eos in tokens)  # the first round that writes it
    stopped = hogwild_generate(m, PROMPT, 3, 8, eos_id=eos, **sampled)
    assert stopped.steps == r + 1
    assert stopped.tokens == [tokens[: r + 1] for tokens in free.tokens]
    assert stopped.finisher == min(w for w, tokens in enumerate(free.tokens) if tokens[r] == eos)
    by_stop = hogwild_generate(m, PROMPT, 3, 8, stop=lambda tokens: len(tokens) == 3 and tokens[0] % 2 == 1, **sampled)
    odd = [w for w, tokens in enumerate(free.tokens) if tokens[0] % 2 == 1]
    assert by_stop.steps == (3 if odd else 8) and by_stop.finisher == (odd[0] if odd else None)
    # the merged transcript: worker after worker; the shared layout: round by round
    assert free.transcript == [*PROMPT, 40, 41, *free.tokens[0], *free.tokens[1], 50, 51, 52, *free.tokens[2]]
    assert free.shared == layout(PROMPT, HEADERS, free.tokens)
    assert free.shared[len(PROMPT) + 5 : len(PROMPT) + 8] == [free.tokens[w][0] for w in range(3)]


def test_bad_arguments_raise_clear_errors() -> None:
    m = model()
    with pytest.raises(ValueError, match="at least one worker"):
        hogwild_generate(m, PROMPT, 0, 4)
    with pytest.raises(ValueError, match="max_new_tokens must be positive"):
        hogwild_generate(m, PROMPT, 2, 0)
    with pytest.raises(ValueError, match="non-empty prompt"):
        hogwild_generate(m, [], 2, 4)
    with pytest.raises(ValueError, match="one header per worker"):
        hogwild_generate(m, PROMPT, 2, 4, headers=[[1]])
    with pytest.raises(ValueError, match="4 workers x 16 new tokens = 68 slots exceed the model's block_size 64"):
        hogwild_generate(m, PROMPT, 4, 16)
    assert hogwild_generate(m, PROMPT, 4, 15).total_tokens == 60  # 4 + 60 slots: the whole block
    with pytest.raises(ValueError, match="one token per worker"):
        HogwildDecoder(m, 3, 16).step(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="one length"):
        layout(PROMPT, [[], []], [[1, 2], [3]])


class CharTokenizer:
    """One id per character: enough of `tokenizers.Tokenizer` (encode(...).ids, decode) for the task helper."""

    chars = sorted(set("0123456789 +?:\nQAWhatis()-"))

    def encode(self, text: str) -> SimpleNamespace:
        return SimpleNamespace(ids=[self.chars.index(c) for c in text])

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] if i < len(self.chars) else "" for i in ids)

    def token_to_id(self, token: str) -> None:  # no special tokens: not a chat tokenizer
        return None


def test_parallel_sum_rows_answers_and_the_finish_rule() -> None:
    rows = sum_rows(20, seed=1, terms=8)
    assert rows == sum_rows(20, seed=1, terms=8) and rows != sum_rows(20, seed=2, terms=8)
    for row in rows:
        terms = [int(x) for x in row["question"].removeprefix("What is ").removesuffix("?").split(" + ")]
        assert terms == row["terms"] and len(terms) == 8 and row["answer"] == str(sum(terms))
    assert [answer_of(t) for t in (" 42\nQ: 7", "-3", " x 42", "\n42", "")] == ["42", "-3", None, None, None]
    tokenizer = CharTokenizer()
    m = model(vocab_size=len(tokenizer.chars), block_size=96)
    row = rows[0]
    one, three = (solve(m, tokenizer, row, W, 12, temperature=1.0, seed=4) for W in (1, 3))
    # one worker: the first line plain decoding writes (seed 4: a line that opens with an integer), in as
    # many steps as it takes to end it
    ids = tokenizer.encode(f"Q: {row['question']}\nA:").ids
    text = tokenizer.decode(generate(m, [ids], 12, temperature=1.0, seed=4)[0])
    assert one["finished"] and one["answer"] == answer_of(text) is not None
    assert one["steps"] == one["tokens"] == text.index("\n") + 1
    assert three["tokens"] == 3 * three["steps"] and three["correct"] == (three["answer"] == row["answer"])
    report = compare(m, tokenizer, rows[:3], workers=(1, 2), max_new_tokens=12, temperature=1.0, seed=0)
    assert set(report) == {1, 2} and all(0 <= r["accuracy"] <= r["finished"] <= 1 for r in report.values())
    assert report[2]["tokens"] == 2 * report[2]["steps"]


def test_a_chat_model_reads_the_sum_as_a_user_turn_and_finishes_at_its_end_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """A chat model answers after <|assistant|> and closes with <|end|>, not a newline: without both, no worker
    of an SFT model would ever finish a line."""
    import evaluation.parallel_sum as parallel_sum
    from datamodules.chat import END, TAGS, add_chat_tokens
    from datamodules.tokenizer import train_bpe

    tokenizer = train_bpe(["Q: What is 1 + 2?\nA: 3 " * 20], 300)
    add_chat_tokens(tokenizer)
    calls = []

    def fake(model, ids, workers, max_new_tokens, **kwargs):
        calls.append((ids, kwargs))
        answer = tokenizer.encode(" 3").ids + [tokenizer.token_to_id(END)]
        return SimpleNamespace(finisher=0, tokens=[answer] * workers, steps=len(answer), total_tokens=workers * len(answer),
                               seconds=0.0)

    monkeypatch.setattr(parallel_sum, "hogwild_generate", fake)
    result = solve(None, tokenizer, {"question": "What is 1 + 2?", "answer": "3"}, 2, 8)
    ids, kwargs = calls[0]
    assert ids[0] == tokenizer.token_to_id(TAGS["user"]) and ids[-1] == tokenizer.token_to_id(TAGS["assistant"])
    assert kwargs["eos_id"] == tokenizer.token_to_id(END)
    assert result["answer"] == "3" and result["correct"] and result["finished"]


def test_the_hogwild_technique_runs_on_its_sft_stage_and_reports_both_claims(tmp_path: Path) -> None:
    """`--technique hogwild` trains its SFT stage (a few steps), then measures 1 and 2 workers on two sums."""
    from repro.golden import write_corpus
    from repro.registry import get
    from repro.runner import RunSpec, run
    from repro.trainer import TrainerArgs

    corpus = write_corpus(tmp_path / "corpus")
    stage = [f"sft.{o.format(corpus=corpus, cache=tmp_path / 'cache')}" for o in get("sft").golden_overrides]
    spec = RunSpec("hogwild", "tiny", [*stage, "sums.rows=2", "sums.terms=2", "sums.workers=[1,2]", "sums.max_new_tokens=2"],
                   trainer=TrainerArgs(accelerator="cpu"))
    record = json.loads((run(spec, out=tmp_path / "runs") / "metrics.json").read_text())
    assert [c["claim"] for c in record["claims"]] == [c.claim for c in get("hogwild").claims(get("hogwild").config(), {})]
    assert {"workers/1/steps", "workers/2/steps", "workers/2/accuracy", "steps/parallel sums/seconds"} <= set(record["metrics"])
    assert record["metrics"]["workers/1/steps"] == record["metrics"]["workers/1/tokens"]  # one worker: a token per pass
