"""Hogwild! inference (Rodionov et al. 2025, "Hogwild! Inference: Parallel LLM Generation via Concurrent
Attention", arXiv:2504.06261): W workers of one decoder generate at once over one shared KV cache, each
reading the others' tokens as they are written.

The paper's cache holds blocks (the prompt, one block per worker) that each worker reads in its own order,
its own block last so its text stays contiguous; RoPE moves a block by rotating the query instead of the
cached keys. A key is then read at a position it was not computed at, and past the first layer it carries
a context its reader does not see: no worker's view is a sequence a plain decoder could read, and the
layout needs RoPE. Here the shared cache is one sequence, the paper's interleaved layout with a step of
one token:

    slots  [ prompt | header_0 | ... | header_{W-1} | x(0,0) x(1,0) ... x(W-1,0) | x(0,1) x(1,1) ... ]

worker w's token of round r at slot S + r W + w (S: prompt and headers), and attention causal over slots.
At round r worker w reads the prompt, every header, every worker's tokens of rounds < r and the round-r
tokens of workers 0..w-1; those of workers w+1.. are read one round later, as they did not exist when
they were computed. Its position is its slot: the number of slots it reads before itself. So
- every worker's view is a prefix of the shared sequence, and the cached computation is exactly the plain
  decoder on that prefix (tested in float64): each key is computed once, by the worker that wrote it;
- learned positions, RoPE, MLA and Mamba blocks (a recurrence over the same sequence) work unchanged: a
  round is `model(tokens (1, W), cache)`, with `Decoder.hidden`'s own causal mask and positions;
- a round is one forward pass over W positions of the one cache row, the compute of a batch of W rows,
  and attention reads one cache of P + W n slots, not W caches of P + n.
The price: a worker's consecutive tokens lie W slots apart, its text interleaved token by token with the
others'. A model reads that well only if trained on such transcripts (`layout` writes them); the paper
keeps each worker's own text contiguous, and runs large pretrained reasoning models without fine-tuning.

Why causal over slots, and not "the prompt, the earlier rounds and itself"? Then the tokens of one round
would not see each other yet share a position: a later query reading both reads keys that no sequence
produces, at one position twice (learned positions collide), and there is no plain-model reference.

Headers: a worker's stream may open with given tokens (the paper names its workers, Alice and Bob),
prefilled with the prompt in one pass, worker after worker; worker w's first token is read at the last
slot of its header. Workers with no headers read their first token from the same logits, so greedy ones
write the same first token (their views differ from then on). Give them headers, or sample.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate

import torch

from modules.decoding.engine import DecodeEngine
from modules.decoding.generation import sample_next
from modules.nn.decoder import Decoder


def layout(prompt: list[int], headers: list[list[int]], streams: list[list[int]]) -> list[int]:
    """The shared cache's tokens in slot order: the prompt, the headers worker after worker, then the
    W streams (of equal length) round by round, worker w's r-th token at slot S + r W + w."""
    if len({len(stream) for stream in streams}) > 1:
        raise ValueError(f"streams interleave round by round, so they need one length; got {[len(s) for s in streams]}")
    rounds = [token for tokens in zip(*streams) for token in tokens]
    return [*prompt, *(token for header in headers for token in header), *rounds]


class HogwildDecoder:
    """W workers of one decoder over one shared `KVCache` row, laid out as the module docstring says.

    `prefill` writes the prompt and the headers, `step` one token per worker (a round, in worker order);
    each returns every worker's next-token logits (W, vocab_size) after one forward pass.
    """

    def __init__(self, model: Decoder, workers: int, max_len: int) -> None:
        if workers < 1:
            raise ValueError(f"Hogwild! inference needs at least one worker; got workers={workers}")
        if max_len > model.config.block_size:
            raise ValueError(f"a shared cache of {max_len} slots exceeds the model's block_size {model.config.block_size}")
        self.model, self.workers = model, workers
        self.engine = DecodeEngine(model, 1, max_len)  # a round is one program of W tokens, captured on CUDA
        self.cache = self.engine.cache

    @torch.no_grad()
    def prefill(self, prompt: list[int], headers: list[list[int]] | None = None) -> torch.Tensor:
        """Logits (W, vocab_size): worker w's read at the last slot of its header (of the prompt, then the
        headers before it, when its own is empty)."""
        headers = headers if headers is not None else [[] for _ in range(self.workers)]
        if not prompt:
            raise ValueError("Hogwild! inference needs a non-empty prompt")
        if len(headers) != self.workers:
            raise ValueError(f"one header per worker: {self.workers} workers, {len(headers)} headers")
        if self.cache.length:
            raise ValueError("prefill writes the prompt at slot 0: this shared cache is not empty")
        device = self.cache.valid.device
        ids = torch.tensor([[*prompt, *(token for header in headers for token in header)]], device=device)  # (1, S)
        ends = torch.tensor([len(prompt) + n - 1 for n in accumulate(len(h) for h in headers)], device=device)  # (W,)
        return self.model(ids, self.cache)[0, ends, : self.model.config.vocab_size]

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Write tokens (W,), worker w's at the round's w-th slot; logits (W, vocab_size), each worker's next."""
        if tokens.shape != (self.workers,):
            raise ValueError(f"one token per worker: expected shape ({self.workers},), got {tuple(tokens.shape)}")
        return self.engine.step(tokens.view(1, self.workers))[0, :, : self.model.config.vocab_size]


@dataclass
class HogwildResult:
    """One run: what each worker wrote, and what finishing cost."""

    tokens: list[list[int]]  # each worker's generated tokens, its header excluded
    steps: int  # forward passes, the prefill included: the sequential steps to finish
    finisher: int | None  # the first worker whose eos or stop ended the run; None: max_new_tokens ran out
    transcript: list[int]  # merged: the prompt, then each worker's header and tokens, worker after worker
    shared: list[int]  # the shared cache's tokens in slot order (`layout`), the last round's included
    seconds: float  # wall time, the prefill included

    @property
    def total_tokens(self) -> int:
        return sum(len(tokens) for tokens in self.tokens)


@torch.no_grad()
def hogwild_generate(
    model: Decoder,
    prompt: list[int],
    workers: int,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_id: int | None = None,
    stop: Callable[[list[int]], bool] | None = None,
    headers: list[list[int]] | None = None,
) -> HogwildResult:
    """`workers` streams after one prompt, at most `max_new_tokens` each, one token per worker per forward pass.

    The run ends after the first round in which a worker writes `eos_id` or its tokens satisfy `stop`
    (the other workers' tokens of that round are kept), or after `max_new_tokens` rounds. Sampling as
    `generate`'s: `seed` seeds one generator that draws the W tokens of a round together.
    """
    if workers < 1:
        raise ValueError(f"Hogwild! inference needs at least one worker; got workers={workers}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be positive; got {max_new_tokens}")
    headers = [list(h) for h in headers] if headers is not None else [[] for _ in range(workers)]
    slots = len(prompt) + sum(map(len, headers)) + workers * max_new_tokens
    if slots > model.config.block_size:
        raise ValueError(f"prompt {len(prompt)} + headers {sum(map(len, headers))} + {workers} workers x "
                         f"{max_new_tokens} new tokens = {slots} slots exceed the model's block_size "
                         f"{model.config.block_size}")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    decoder = HogwildDecoder(model, workers, slots)
    logits = decoder.prefill(prompt, headers)
    tokens: list[list[int]] = [[] for _ in range(workers)]
    steps, finisher = 1, None
    while True:
        token = sample_next(logits, temperature, top_k, top_p, generator)  # (W,)
        for stream, t in zip(tokens, token.tolist()):  # tolist waits for the device: the clock stays honest
            stream.append(t)
        finished = [w for w, stream in enumerate(tokens)
                    if (eos_id is not None and stream[-1] == eos_id) or (stop is not None and stop(stream))]
        if finished or len(tokens[0]) == max_new_tokens:
            finisher = finished[0] if finished else None
            break
        logits = decoder.step(token)
        steps += 1
    seconds = time.perf_counter() - start
    transcript = [*prompt, *(t for header, stream in zip(headers, tokens) for t in (*header, *stream))]
    return HogwildResult(tokens, steps, finisher, transcript, layout(prompt, headers, tokens), seconds)


def sequential_generate(model: Decoder, prompt: list[int], max_new_tokens: int, **options: object) -> HogwildResult:
    """The baseline: one worker, which is plain incremental decoding, token for token
    `generate(model, [prompt], ...)` (tested), under the same finish rule, step count and clock.
    `options` as `hogwild_generate`'s (a header: `headers=[header]`)."""
    return hogwild_generate(model, prompt, 1, max_new_tokens, **options)
