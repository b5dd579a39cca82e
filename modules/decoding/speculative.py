"""Speculative decoding: drafts checked by the target model with the rejection rule of Leviathan et al. 2023.

A draft proposes the next few tokens; the target scores all of them in one forward pass and keeps
the longest prefix the rule accepts, plus one token of its own. Greedy decoding gives exactly the
target's tokens; sampling keeps exactly the target's distribution (Leviathan et al., Thm. 1): a
draft token x drawn from q is kept with probability min(1, p(x) / q(x)), and on rejection the
replacement is drawn from norm(max(0, p - q)).

`speculate` runs the rounds for any `Drafter`: `self_speculative_generate` drafts with a decoder's own MTP
heads (`modules/nn/mtp.py`), the use DeepSeek-V3 suggests for its MTP modules (Sec. 5.4.3); `modules/decoding/draft.py`
drafts with a separate draft model or an EAGLE head.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from modules.decoding.engine import DecodeEngine, Passes, cache_slots, fast_paths
from modules.decoding.generation import sampling_probs
from modules.nn.cache import KVCache, SlotCache
from modules.nn.decoder import Decoder
from modules.nn.mtp import MTPHeads


def greedy_verdict(target: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(2 + n,) on the device: drafts accepted, the target's next token, then the n drafts themselves.

    target (n + 1, V): the target's logits at each drafted position and one past the last; tokens (n,):
    the drafts. A draft is kept while it is the target's argmax; the next token is the argmax where the
    run stops. Pure tensor work, so a verification program computes it inside its graph and the host
    reads the round's outcome back in one transfer.
    """
    best = target.argmax(-1)  # (n + 1,)
    accepted = (best[:-1] == tokens).long().cumprod(0).sum()
    return torch.cat([accepted[None], best.gather(0, accepted[None]), tokens])  # gather: indexing by a tensor would sync


def inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """(1,): the index drawn from weights (V,) (any positive scale) by inverting their cumulative sum at u (1,) in
    [0, 1). Pure tensor work (no generator, no sync), so a captured program draws with its uniform as an input."""
    cdf = weights.cumsum(0)
    # u * total can round up to total itself; the clamp then keeps the draw on the last positive weight
    last = cdf.argmax()  # the first index at the full sum
    return torch.minimum(torch.searchsorted(cdf, (u * cdf[-1]).contiguous(), right=True), last)


def sampled_verdict(target: torch.Tensor, draft: torch.Tensor, tokens: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """(2 + n,) on the device, as `greedy_verdict`'s, for sampled drafts: Leviathan et al.'s rule.

    target (n + 1, V): the target's distribution at each drafted position and one past the last; draft (n, V):
    the distributions the drafts were drawn from; tokens (n,); u (n + 1,): uniforms in [0, 1), drawn
    outside (a captured program replays fixed kernels, so its randomness comes in as an input). Draft i
    is kept while u_i q(x_i) <= p(x_i); where the run stops the next token is drawn from norm(max(0, p - q))
    (past the last draft q is 0: from p itself) by inverting its cumulative sum at u_n.
    """
    n = tokens.shape[0]
    rows = torch.arange(n, device=tokens.device)
    p, q = target[rows, tokens], draft[rows, tokens]  # (n,)
    keep = (u[:n] * q <= p).long()  # u < p / q without dividing by q = 0 (a draft q cannot draw)
    accepted = keep.cumprod(0).sum()[None]  # (1,): gathers, never indexing by a tensor (that would sync)
    p_next = target.index_select(0, accepted)[0]
    q_next = torch.cat([draft, torch.zeros_like(draft[:1])]).index_select(0, accepted)[0]
    residual = (p_next - q_next).clamp(min=0)
    # p == q leaves no residual; rejection then has probability 0, but float rounding can land here
    residual = torch.where(residual.sum() > 0, residual, p_next)
    return torch.cat([accepted, inverse_cdf(residual, u[n:]), tokens])


def accept_drafts(
    target: torch.Tensor, draft: torch.Tensor | None, tokens: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[int, int]:
    """(drafts accepted, the target's next token) for one sequence, read back from the device once.

    target (n + 1, V): the target's distribution at each drafted position and one past the last;
    tokens (n,): the drafts. Greedy when `draft` is None (`greedy_verdict`). Sampled when draft (n, V)
    holds the distributions the drafts were drawn from (`sampled_verdict`, its uniforms from `generator`).
    """
    if draft is None:
        verdict = greedy_verdict(target, tokens)
    else:
        u = torch.rand(tokens.shape[0] + 1, generator=generator, device=tokens.device)
        verdict = sampled_verdict(target, draft, tokens, u)
    accepted, nxt = verdict[:2].tolist()
    return accepted, nxt


@dataclass
class SpeculativeStats:
    """Counts of one or more speculative generations: drafts proposed and accepted at each depth."""

    depth: int
    proposed: list[int] = field(default_factory=list)  # per depth: drafts the target checked
    accepted: list[int] = field(default_factory=list)  # per depth: drafts it kept
    rounds: int = 0  # target forward passes after the prefill
    tokens: int = 0  # tokens generated

    def __post_init__(self) -> None:
        self.proposed = self.proposed or [0] * self.depth
        self.accepted = self.accepted or [0] * self.depth

    def record(self, accepted: int) -> None:
        """One round that checked `depth` drafts and kept the first `accepted`: a draft is checked only
        when every draft before it was kept, so depth k's rate is conditional on depths < k."""
        self.rounds += 1
        for k in range(self.depth):
            if k <= accepted:
                self.proposed[k] += 1
                self.accepted[k] += int(k < accepted)

    def acceptance(self) -> list[float]:
        """Per depth, the share of checked drafts that were kept."""
        return [a / p if p else float("nan") for a, p in zip(self.accepted, self.proposed)]

    def tokens_per_round(self) -> float:
        return self.tokens / self.rounds if self.rounds else float("nan")

    def merge(self, other: SpeculativeStats) -> SpeculativeStats:
        return SpeculativeStats(self.depth, [a + b for a, b in zip(self.proposed, other.proposed)],
                                [a + b for a, b in zip(self.accepted, other.accepted)],
                                self.rounds + other.rounds, self.tokens + other.tokens)


class Sampler:
    """Logits to the distribution decoding draws from (the logits themselves when greedy), and draws from it
    on the device."""

    def __init__(self, vocab: int, temperature: float, top_k: int | None, top_p: float | None, seed: int | None,
                 device: torch.device) -> None:
        self.vocab, self.temperature, self.top_k, self.top_p = vocab, temperature, top_k, top_p
        self.greedy = temperature == 0.0
        self.generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None

    def dist(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits[..., : self.vocab]  # padded vocabulary rows are never drawn
        return logits if self.greedy else sampling_probs(logits, self.temperature, self.top_k, self.top_p)

    def pick(self, dist: torch.Tensor) -> torch.Tensor:
        """The token id drawn from dist (V,), a 0-d tensor on the device (nothing waits for it)."""
        return dist.argmax(-1) if self.greedy else torch.multinomial(dist, 1, generator=self.generator)[0]

    @property
    def key(self) -> str:
        """The settings, for the names of programs that draw (each setting its own: a kept engine keeps them)."""
        return "greedy" if self.greedy else f"T={self.temperature} top_k={self.top_k} top_p={self.top_p}"

    def uniforms(self, n: int, device: torch.device) -> torch.Tensor | None:
        """A round's n uniforms for passes that draw, drawn outside them (None when greedy: nothing is random)."""
        return None if self.greedy else torch.rand(n, generator=self.generator, device=device)

    def draw_inputs(self, n: int, device: torch.device) -> list[tuple[torch.Tensor, ...]]:
        """The extra inputs of a round's n `drawing` passes, one tuple each: its uniform (1,), or none when greedy."""
        u = self.uniforms(n, device)
        return [() if u is None else (u[k : k + 1],) for k in range(n)]

    def drawing(self, fn: Callable[..., tuple[torch.Tensor, ...]]) -> Callable[..., tuple[torch.Tensor, ...]]:
        """A drafter's pass fn(*inputs) -> (..., logits (V',)) that also draws its draft: (..., token (1,), dist (V,)).

        Pure tensor work, so a drafter's program draws inside its graph. Sampled, the pass takes a uniform
        u (1,) as its last input and inverts the distribution's CDF at it; greedy, the argmax (dist is then
        the logits, which `propose` does not return)."""
        def drawn(*inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
            if self.greedy:
                *out, logits = fn(*inputs)
                return (*out, logits[: self.vocab].argmax(-1, keepdim=True), logits)
            *inputs, u = inputs
            *out, logits = fn(*inputs)
            dist = self.dist(logits)
            return (*out, inverse_cdf(dist, u), dist)
        return drawn


class Drafter(Protocol):
    """What `speculate` asks of a drafter: to follow the target's reading, and to propose.

    `read` is a pure pass (the target engine runs it as a captured program); what it returns past the
    logits goes to `keep`, which stores it where later proposals look."""

    def read(self, idx: torch.Tensor, cache: KVCache | SlotCache) -> tuple[torch.Tensor, ...]:
        """The target's logits (1, T, padded_vocab) for idx (1, T) at `cache`'s next T slots, then what drafting
        needs of that pass."""

    def keep(self, start: int, kept: tuple[torch.Tensor, ...]) -> None:
        """Store `read`'s extra outputs for the positions from `start` on."""

    def reset(self) -> None:
        """Forget every prompt: the next call reads a new one from slot 0."""

    def propose(self, tokens: torch.Tensor, m: int, gamma: int, sampler: Sampler) -> torch.Tensor | None:
        """Write gamma drafts into tokens[0, m + 1 : m + 1 + gamma], given settled tokens 0..m and the target
        read up to m - 1; return the distributions (gamma, V) they were drawn from (None when greedy)."""


def cache_length(target: Decoder, prompt: list[int], max_new_tokens: int, gamma: int, others: dict[str, Decoder]) -> int:
    """The cache length a run needs, after refusing settings that cannot run."""
    if gamma < 1:
        raise ValueError(f"gamma (drafts per round) must be at least 1; got {gamma}")
    if not prompt:
        raise ValueError("speculative decoding needs a non-empty prompt")
    # the last round starts at most max_new_tokens - 1 tokens in and reads its newest token and gamma drafts
    max_len = len(prompt) + max_new_tokens + gamma - 1
    for name, model in {"target": target, **others}.items():
        if max_len > model.config.block_size:
            raise ValueError(f"prompt {len(prompt)} + {max_new_tokens} new + {gamma - 1} more drafted tokens exceed the "
                             f"{name}'s block_size {model.config.block_size}")
    return max_len


class Speculator:
    """A target's decode engine and a drafter, kept across prompts so their programs are captured once.

    `make_drafter(max_len)` builds the drafter for caches of `max_len` slots. Cache lengths round up
    to a power of two (at most the smallest block_size of `models`), as `Engines` does, so prompts of
    nearby lengths share one engine and one drafter; both are reset before each prompt.
    """

    def __init__(self, target: Decoder, make_drafter: Callable[[int], Drafter], models: tuple[Decoder, ...] = ()) -> None:
        self.target, self.make_drafter = target, make_drafter
        self.block = min(m.config.block_size for m in (target, *models))
        self.kept: dict[int, tuple[DecodeEngine, Drafter]] = {}

    def get(self, length: int) -> tuple[DecodeEngine, Drafter]:
        max_len = cache_slots(length, self.block)
        if max_len not in self.kept:
            self.kept = {max_len: (DecodeEngine(self.target, 1, max_len), self.make_drafter(max_len))}  # one kept
        engine, drafter = self.kept[max_len]
        engine.reset()
        drafter.reset()
        return engine, drafter


def speculate(speculator: Speculator, prompt: list[int], max_new_tokens: int, gamma: int, max_len: int,
              sampler: Sampler, eos_id: int | None) -> tuple[list[int], SpeculativeStats]:
    """The rounds every drafter shares, on the decode engine: the target prefills, then each round checks gamma
    drafts in one pass of gamma + 1 tokens (one captured program on CUDA, which also judges greedy drafts) and
    reads the outcome back once."""
    engine, drafter = speculator.get(max_len)
    device = engine.cache.valid.device
    tokens = torch.zeros(1, engine.cache.max_len + 1, dtype=torch.long, device=device)
    n = len(prompt)
    tokens[0, :n] = torch.tensor(prompt, device=device)
    logits, *kept = drafter.read(tokens[:, :n], engine.cache)  # the prefill, eager
    drafter.keep(0, tuple(kept))
    m = n  # the newest settled token, not yet read by the target
    tokens[0, m] = sampler.pick(sampler.dist(logits[0, -1]))
    out = [int(tokens[0, m])]
    stats = SpeculativeStats(gamma)
    vocab = sampler.vocab

    def verify(idx: torch.Tensor, *sampled: torch.Tensor) -> tuple[torch.Tensor, ...]:  # the round's outcome, in the program
        logits, *kept = drafter.read(idx, engine.view)
        if sampler.greedy:
            return greedy_verdict(logits[0, :, :vocab], idx[0, 1:]), *kept
        draft, u = sampled
        return sampled_verdict(sampler.dist(logits[0]), draft, idx[0, 1:], u), *kept

    while len(out) < max_new_tokens and not (eos_id is not None and out[-1] == eos_id):
        drafts = drafter.propose(tokens, m, gamma, sampler)  # (gamma, V), or None when greedy
        window = tokens[:, m : m + gamma + 1]
        if sampler.greedy:
            verdict, *kept = engine.program("verify", verify, window)
        else:
            # a kept engine keeps its programs, so the sampling settings that `verify` closes over name its own
            verdict, *kept = engine.program(f"verify {sampler.key}", verify, window, drafts, sampler.uniforms(gamma + 1, device))
        drafter.keep(m, tuple(kept))
        accepted, nxt, *proposed = verdict.tolist()  # the one read-back of the round
        stats.record(accepted)
        out.extend(proposed[:accepted] + [nxt])
        m += accepted + 1
        tokens[0, m] = nxt
        engine.cache.truncate(m)
    if eos_id is not None and eos_id in out:
        out = out[: out.index(eos_id) + 1]
    out = out[:max_new_tokens]
    stats.tokens = len(out)
    return out, stats


def drafter_passes(model: Decoder) -> Passes:
    """The passes a drafter runs over its own caches, with the options a decode engine of `model` gets."""
    compile, cuda_graph = fast_paths(model, False, None)
    return Passes(compile, cuda_graph)


class _MTPDrafter:
    """A decoder's own MTP heads. Head k at position j reads depth k - 1's hidden state at j and token j + k
    (parallel heads read the decoder's state at j and no token); its cache keeps the positions whose token
    j + k was settled when computed, and each round runs the heads over the positions whose inputs changed."""

    def __init__(self, decoder: Decoder, heads: MTPHeads, depth: int, max_len: int) -> None:
        device, dtype = decoder.wte.weight.device, decoder.wte.weight.dtype
        self.decoder, self.heads = decoder, heads
        self.caches = heads.caches(1, max_len, device, dtype)[:depth]
        self.views = [SlotCache(cache) for cache in self.caches]
        self.passes = drafter_passes(decoder)
        # hidden[k][j]: depth k's hidden state at position j (k = 0: the decoder's)
        self.hidden = [torch.zeros(1, max_len, decoder.config.n_embd, device=device, dtype=dtype) for _ in range(depth)]

    def reset(self) -> None:
        for cache in self.caches:
            cache.reset()

    def read(self, idx: torch.Tensor, cache: KVCache | SlotCache) -> tuple[torch.Tensor, ...]:
        h = self.decoder.hidden(idx, cache)
        return self.decoder.lm_head(self.decoder.norm(h)), h

    def keep(self, start: int, kept: tuple[torch.Tensor, ...]) -> None:
        (h,) = kept
        self.hidden[0][:, start : start + h.shape[1]] = h  # positions past the accepted prefix are read again later

    def propose(self, tokens: torch.Tensor, m: int, gamma: int, sampler: Sampler) -> torch.Tensor | None:
        decoder, heads = self.decoder, self.heads
        draws, dists = sampler.draw_inputs(gamma, tokens.device), []
        for k in range(1, gamma + 1):
            cache, view = self.caches[k - 1], self.views[k - 1]
            keep = min(cache.length, max(0, m - k))  # positions j whose token j + k was settled: j <= m - 1 - k
            cache.truncate(keep)
            previous = self.hidden[0 if heads.kind == "parallel" else k - 1][:, keep:m]
            inputs = (previous, tokens[:, keep + k : m + k], *draws[k - 1])

            def depth_k(previous: torch.Tensor, next_tokens: torch.Tensor, k: int = k,
                        cache: KVCache | SlotCache = view) -> tuple[torch.Tensor, ...]:
                h = heads.step(decoder, k, previous, next_tokens, cache)
                return h, heads.logits(decoder, k, h[:, -1])[0]

            if keep == 0:  # the prompt's positions: one eager pass
                h, token, dist = sampler.drawing(functools.partial(depth_k, cache=cache))(*inputs)
            else:
                h, token, dist = self.passes.run(f"mtp-{k} {sampler.key}", sampler.drawing(depth_k), inputs, [(view, m - keep)])
            if k < gamma:
                self.hidden[k][:, keep:m] = h
            tokens[0, m + k : m + k + 1] = token
            if not sampler.greedy:
                dists.append(dist.clone())  # a replay's outputs are overwritten by the next one
        return None if sampler.greedy else torch.stack(dists)


def mtp_speculator(decoder: Decoder, heads: MTPHeads, depth: int) -> Speculator:
    """A `Speculator` drafting with the first `depth` of the decoder's MTP heads."""
    return Speculator(decoder, lambda max_len: _MTPDrafter(decoder, heads, depth, max_len))


@torch.no_grad()
def self_speculative_generate(
    decoder: Decoder,
    heads: MTPHeads,
    prompt: list[int],
    max_new_tokens: int,
    depth: int | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    seed: int | None = None,
    speculator: Speculator | None = None,
) -> tuple[list[int], SpeculativeStats]:
    """New tokens for one prompt, drafted `depth` at a time (default: every head) by the decoder's MTP
    heads and checked by the decoder; the same tokens as `generation.generate` at temperature 0,
    the same distribution when sampling.

    Each round feeds the newest token and the drafts to the decoder at once (D + 1 positions), keeps the
    accepted prefix of its key/value cache, and runs each head over the positions whose inputs changed
    (`_MTPDrafter`). One sequence at a time: rows of a batch accept different numbers of drafts. Pass the
    same `mtp_speculator(decoder, heads, depth)` to each call to capture its programs once.
    """
    depth = heads.depth if depth is None else depth
    if not 1 <= depth <= heads.depth:
        raise ValueError(f"draft depth must be between 1 and the model's {heads.depth} MTP heads; got {depth}")
    max_len = cache_length(decoder, prompt, max_new_tokens, depth, {})
    sampler = Sampler(decoder.config.vocab_size, temperature, top_k, top_p, seed, decoder.wte.weight.device)
    speculator = speculator or mtp_speculator(decoder, heads, depth)
    return speculate(speculator, prompt, max_new_tokens, depth, max_len, sampler, eos_id)
