"""Constitutional AI (Bai et al. 2022): critique-revise (SL-CAI) and AI feedback (RL-CAI) from a written constitution.

SL-CAI (Sec. 3.1): a model's response to a red-team prompt is critiqued by the model itself under a
principle drawn at random from the constitution, then revised; each further round critiques the
latest revision under a new draw; the final revisions are supervised fine-tuning data.
RL-CAI (Sec. 4.1): a feedback model reads two responses as a multiple-choice question on a drawn
principle, and the normalized probabilities of the answers "A" and "B" label the pair; here the
labelled pairs train the policy with DPO instead of a preference model and PPO.

Models are functions of text, so the one that critiques or judges may be any suite checkpoint or a
larger causal LM: `generate_many(texts) -> texts` (`decoder_generator`, `hf_generator`) and
`score_fn(context, continuation) -> log p(continuation | context)` (`decoder_logprob`, `hf_logprob`).
"""

from __future__ import annotations

import functools
import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tokenizers import Tokenizer

from datamodules.chat import END, is_chat_tokenizer, prompt_ids
from datamodules.constitution import EMAIL, PHONE, URL, Principle, checkable, has_phrase, phrase_pattern
from datamodules.preference import Pair, to_pair_text
from datamodules.tokenizer import EOT_ID
from modules.decoding.engine import Engines
from modules.decoding.generation import generate, truncate_at_stop
from modules.nn import Decoder

GenerateFn = Callable[[str], str]
GenerateMany = Callable[[list[str]], list[str]]
ScoreFn = Callable[[str, str], float]
# a generated critique or revision ends where the model starts the next section of the transcript
STOPS = ("Human:", "Assistant:", "Critique Request:", "Critique:", "Revision Request:", "Revision:")


def critique_prompt(prompt: str, response: str, principle: Principle, few_shot: str = "") -> str:
    """The paper's critique request after the conversation (Appendix C), ending in "Critique:" for the model."""
    return (f"{few_shot}Human: {prompt}\n\nAssistant: {response}\n\n"
            f"Critique Request: {principle.critique_request}\n\nCritique:")


def revision_prompt(critique_context: str, critique: str, principle: Principle) -> str:
    """The critique prompt, the model's critique, and the revision request, ending in "Revision:"."""
    return f"{critique_context} {critique}\n\nRevision Request: {principle.revision_request}\n\nRevision:"


def feedback_prompt(prompt: str, option_a: str, option_b: str, principle: Principle) -> str:
    """The multiple-choice question of AI feedback (Sec. 4.1), ending in "(" so the next token is the answer."""
    return (f"Consider the following conversation between a human and an assistant:\nHuman: {prompt}\n"
            f"{principle.choice_question}\nOptions:\n(A) {option_a}\n(B) {option_b}\nThe answer is: (")


@dataclass
class CritiqueStep:
    """One round: the principle drawn, the response critiqued, the model's critique and revision, and both prompts."""

    principle: str
    response: str
    critique: str
    revision: str
    critique_prompt: str
    revision_prompt: str


def _clean(text: str) -> str:
    return truncate_at_stop(text, STOPS).strip()


def critique_revise_batch(generate_many: GenerateMany, prompts: Sequence[str], responses: Sequence[str],
                          principles: Sequence[Principle], rounds: int = 1, rng: random.Random | None = None,
                          few_shot: str = "") -> list[list[CritiqueStep]]:
    """`rounds` critique-revision steps per (prompt, response), each under a principle drawn by `rng`.

    Round k critiques round k - 1's revision (the response itself first); an empty revision leaves
    the response as it was. Each round is two calls of `generate_many` over all prompts.
    """
    if len(prompts) != len(responses) or not principles or rounds < 1:
        raise ValueError("critique_revise needs one response per prompt, at least one principle and rounds >= 1")
    rng = rng or random.Random(0)
    current, chains = list(responses), [[] for _ in prompts]
    for _ in range(rounds):
        drawn = [rng.choice(list(principles)) for _ in prompts]
        asks = [critique_prompt(p, r, d, few_shot) for p, r, d in zip(prompts, current, drawn)]
        critiques = [_clean(t) for t in _checked(generate_many, asks)]
        revise = [revision_prompt(a, c, d) for a, c, d in zip(asks, critiques, drawn)]
        revisions = [_clean(t) for t in _checked(generate_many, revise)]
        for i in range(len(prompts)):
            chains[i].append(CritiqueStep(drawn[i].name, current[i], critiques[i], revisions[i], asks[i], revise[i]))
            current[i] = revisions[i] or current[i]
    return chains


def critique_revise(generate_fn: GenerateFn, prompt: str, response: str, principles: Sequence[Principle],
                    rounds: int = 1, rng: random.Random | None = None, few_shot: str = "") -> list[CritiqueStep]:
    """`critique_revise_batch` for one prompt, with a generator of one text at a time."""
    many = lambda texts: [generate_fn(t) for t in texts]
    return critique_revise_batch(many, [prompt], [response], principles, rounds, rng, few_shot)[0]


def _checked(generate_many: GenerateMany, texts: list[str]) -> list[str]:
    out = generate_many(texts)
    if len(out) != len(texts):
        raise ValueError(f"the generator returned {len(out)} texts for {len(texts)} prompts")
    return out


def _answer_a(score_fn: ScoreFn, context: str) -> float:
    """p(A) / (p(A) + p(B)) after `context`: a logistic of the log-prob difference."""
    return 0.5 * (1 + math.tanh((score_fn(context, "A") - score_fn(context, "B")) / 2))


def ai_feedback(score_fn: ScoreFn, prompt: str, response_a: str, response_b: str, principle: Principle) -> tuple[float, float]:
    """(p_a, p_b), summing to 1: the feedback model's preference between two responses under `principle`.

    Each order of the options gives normalized probabilities of the answers A and B; the two orders
    are averaged, which cancels a bias toward either position: swapping the responses swaps the result.
    """
    first = _answer_a(score_fn, feedback_prompt(prompt, response_a, response_b, principle))
    second = 1 - _answer_a(score_fn, feedback_prompt(prompt, response_b, response_a, principle))
    p_a = (first + second) / 2
    return p_a, 1 - p_a


def build_sl_data(prompts: Sequence[str], chains: Sequence[Sequence[CritiqueStep]]) -> list[dict[str, Any]]:
    """SL-CAI rows: chat records `{"messages": [user prompt, assistant final revision]}` (`datamodules.chat.to_messages`'s
    chat format; written as JSONL they are an `SFTDataModule` source). Prompts whose every revision is empty are left out."""
    rows = []
    for prompt, chain in zip(prompts, chains, strict=True):
        final = next((s.revision for s in reversed(chain) if s.revision.strip()), "")
        if final:
            rows.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": final}]})
    return rows


def build_preference_pairs(score_fn: ScoreFn, prompts: Sequence[str], responses: Sequence[tuple[str, str]],
                           principles: Sequence[Principle], rng: random.Random | None = None,
                           min_margin: float = 0.0) -> list[dict[str, Any]]:
    """RL-CAI pairs labelled by AI feedback, one principle drawn per pair: records
    `{"prompt", "chosen", "rejected", "principle", "p_chosen"}` (the `prompt`/`chosen`/`rejected` layout of
    `datamodules.preference.read_pairs`; `to_pairs` tokenizes them). Pairs of equal or empty responses, and
    pairs whose |p_a - p_b| is under `min_margin`, are left out."""
    if len(prompts) != len(responses) or not principles:
        raise ValueError("build_preference_pairs needs two responses per prompt and at least one principle")
    rng = rng or random.Random(0)
    records = []
    for prompt, (a, b) in zip(prompts, responses):
        principle = rng.choice(list(principles))
        if not a.strip() or not b.strip() or a.strip() == b.strip():
            continue
        p_a, p_b = ai_feedback(score_fn, prompt, a, b, principle)
        if abs(p_a - p_b) < min_margin:
            continue
        chosen, rejected = (a, b) if p_a >= p_b else (b, a)
        records.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "principle": principle.name,
                        "p_chosen": max(p_a, p_b)})
    return records


def to_pairs(records: Sequence[dict[str, Any]], tokenizer: Tokenizer) -> list[Pair]:
    """Token-id `Pair`s for `PreferenceDataModule`. With a chat tokenizer, the prompt is the user turn and the
    assistant's tag, and each response ends with `<|end|>`: the tokens `datamodules.chat.encode` gives the
    same conversation, so DPO scores what SFT trained on. Otherwise the texts are encoded as they are."""
    chat = is_chat_tokenizer(tokenizer)
    end = [tokenizer.token_to_id(END)] if chat else []
    pairs = []
    for i, record in enumerate(records):
        prompt, chosen, rejected = to_pair_text(record, f"AI-feedback pair {i + 1}")
        context = prompt_ids(tokenizer, prompt, chat)
        pairs.append(Pair(context, tokenizer.encode(chosen).ids + end, tokenizer.encode(rejected).ids + end))
    return pairs


def checker_agreement(records: Sequence[dict[str, Any]], principles: Sequence[Principle]) -> tuple[float | None, int]:
    """(share, n): of the `n` pairs whose drawn principle's checker flags exactly one response, the share where
    AI feedback chose the one that does not violate (None when n is 0). Unchecked principles are skipped."""
    by_name = {p.name: p for p in checkable(principles)}
    verdicts = [(by_name[r["principle"]].violates(r["chosen"]), by_name[r["principle"]].violates(r["rejected"]))
                for r in records if r["principle"] in by_name]
    separated = [(c, r) for c, r in verdicts if c != r]
    return (sum(r for _, r in separated) / len(separated) if separated else None), len(separated)


def decoder_generator(model: Decoder, tokenizer: Tokenizer, max_new_tokens: int, chat: bool | None = None,
                      batch_size: int = 64, **sampling: Any) -> GenerateMany:
    """`generate_many` over a suite decoder: each text as a user turn (`chat`; default: whether the tokenizer has the
    chat tokens), stopped at `<|end|>`, or as plain text stopped at `<|endoftext|>`. Prompts longer than the context
    leaves room for are cut from the left. `sampling` goes to `generate` (temperature, top_k, top_p, seed)."""
    chat = is_chat_tokenizer(tokenizer) if chat is None else chat
    stop = tokenizer.token_to_id(END) if chat else EOT_ID
    room = model.config.block_size - max_new_tokens
    if room < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in block_size={model.config.block_size}")
    model.eval()
    seed = sampling.pop("seed", None)
    engines = Engines(model)  # every batch of one shape on one captured engine

    def generate_many(texts: list[str]) -> list[str]:
        out = []
        for start in range(0, len(texts), batch_size):
            prompts = [prompt_ids(tokenizer, t, chat)[-room:] for t in texts[start : start + batch_size]]
            rows = generate(model, prompts, max_new_tokens, eos_id=stop, seed=None if seed is None else seed + start,
                            engines=engines, **sampling)
            out += [tokenizer.decode([t for t in row if t != stop]) for row in rows]
        return out

    return generate_many


def decoder_logprob(model: Decoder, tokenizer: Tokenizer, chat: bool = False) -> ScoreFn:
    """`score_fn(context, continuation)`: the sum of log p over the continuation's tokens under a suite decoder
    (softmax over the real vocabulary, not the padding of the embedding table). The context is plain text, or a
    user turn with `chat` (the continuation then starts the assistant's turn); it is cut from the left to fit."""
    device, vocab, block = next(model.parameters()).device, model.config.vocab_size, model.config.block_size
    model.eval()

    @torch.no_grad()
    def score(context: str, continuation: str) -> float:
        cont = tokenizer.encode(continuation).ids
        ids = (prompt_ids(tokenizer, context, chat) + cont)[-(block + 1) :]  # the model reads all but the last
        if not cont or len(cont) >= len(ids):
            raise ValueError(f"a continuation of {len(cont)} tokens needs 1 to {block} tokens and some context")
        logp = model(torch.tensor([ids[:-1]], device=device))[0, :, :vocab].float().log_softmax(-1)  # (T - 1, V)
        targets = torch.tensor(ids[1:], device=device)[:, None]  # (T - 1, 1): the token each position predicts
        return float(logp.gather(1, targets)[-len(cont) :].sum())

    return score


@functools.lru_cache(maxsize=2)
def _hf(name_or_path: str, device: str) -> tuple[Any, Any]:
    """A Hugging Face causal LM and its tokenizer (eval mode, on `device`), loaded once per process."""
    # optional: transformers is a test dependency only, needed for a Hugging Face critic or judge
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    return AutoModelForCausalLM.from_pretrained(name_or_path).to(device).eval(), tokenizer


def _device(device: str | None) -> str:
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def hf_logprob(name_or_path: str, device: str | None = None) -> ScoreFn:
    """`score_fn` over a larger causal LM a user points at (a local folder or a hub name, as `from_pretrained`
    resolves it): the context as its tokenizer encodes it (with its BOS, if it adds one), then the continuation."""
    model, tokenizer = _hf(name_or_path, _device(device))
    limit = getattr(model.config, "max_position_embeddings", None) or 1 << 30

    @torch.no_grad()
    def score(context: str, continuation: str) -> float:
        cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        ids = (tokenizer(context)["input_ids"] + cont)[-limit:]
        if not cont or len(cont) >= len(ids):
            raise ValueError(f"a continuation of {len(cont)} tokens does not fit {limit} positions with its context")
        ids = torch.tensor([ids], device=model.device)  # (1, T)
        logp = model(ids).logits[0, :-1].float().log_softmax(-1)  # (T - 1, V): position t predicts token t + 1
        return float(logp.gather(1, ids[0, 1:, None])[-len(cont) :].sum())

    return score


def hf_generator(name_or_path: str, max_new_tokens: int, device: str | None = None, batch_size: int = 16,
                 **generation: Any) -> GenerateMany:
    """`generate_many` over a Hugging Face causal LM: plain-text prompts, left-padded batches, the new text only.
    `generation` goes to `model.generate` (greedy unless `do_sample=True`)."""
    model, tokenizer = _hf(name_or_path, _device(device))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @torch.no_grad()
    def generate_many(texts: list[str]) -> list[str]:
        tokenizer.padding_side = "left"
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token_id = pad
        out = []
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True).to(model.device)
            rows = model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=pad, **generation)
            out += tokenizer.batch_decode(rows[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        return out

    return generate_many


# ORACLE baseline, not a model: programmatic fixes of what each checker flags, for tests and as an
# upper-bound ablation of SL-CAI (training on oracle revisions). Never a stand-in for the model's revisions.
def _without(pattern: re.Pattern[str] | str, text: str, by: str = "") -> str:
    pattern = re.compile(pattern, re.IGNORECASE) if isinstance(pattern, str) else pattern
    return " ".join(pattern.sub(by, text).split())


def _dedupe(text: str, max_n: int = 6, **_: Any) -> str:
    """Drop every immediate repeat of a run of 1 to `max_n` words (compared without case and punctuation)."""
    words, changed = text.split(), True
    key = lambda ws: [re.sub(r"\W", "", w.lower()) for w in ws]
    while changed:
        changed = False
        for n in range(1, max_n + 1):
            i = 0
            while i + 2 * n <= len(words):
                if key(words[i : i + n]) == key(words[i + n : i + 2 * n]):
                    del words[i + n : i + 2 * n]
                    changed = True
                else:
                    i += 1
    return " ".join(words)


FIXERS: dict[str, Callable[..., str]] = {
    "profanity": lambda text, words: _without(phrase_pattern(words), text),
    "personal_data": lambda text: _without(PHONE, _without(EMAIL, text, "[email removed]"), "[phone removed]"),
    "shouting": lambda text, **_: re.sub(r"[^\W\d_]{2,}", lambda m: m[0].lower() if m[0].isupper() else m[0], text),
    "repetition": _dedupe,
    "length": lambda text, max_words=30: " ".join(text.split()[:max_words]),
    "dangerous": lambda text, items, cues: "I can't help with that." if has_phrase(text, items) else text,
    "urls": lambda text: _without(URL, text),
}


def rule_based_revision(response: str, principles: Sequence[Principle]) -> str:
    """ORACLE: `response` with each checkable principle it violates fixed by rule, in the constitution's order."""
    for principle in checkable(principles):
        if principle.violates(response):
            response = FIXERS[principle.checker](response, **principle.checker_args)
    return response
