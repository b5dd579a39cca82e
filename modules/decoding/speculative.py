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

from dataclasses import dataclass, field
from typing import Protocol

import torch

from modules.decoding.generation import sampling_probs
from modules.nn.cache import KVCache
from modules.nn.decoder import Decoder
from modules.nn.mtp import MTPHeads


def accept_drafts(
    target: torch.Tensor, draft: torch.Tensor | None, tokens: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[int, int]:
    """(drafts accepted, the target's next token) for one sequence.

    target (n + 1, V): the target's distribution at each drafted position and one past the last;
    tokens (n,): the drafts. Greedy when `draft` is None: a draft is kept while it is the target's
    argmax, and the next token is the argmax where it stops. Sampled when draft (n, V) holds the
    distributions the drafts were drawn from: Leviathan et al.'s rule.
    """
    n = tokens.shape[0]
    if draft is None:
        best = target.argmax(-1)  # (n + 1,)
        agree = (best[:n] == tokens).long()
        accepted = int(agree.cumprod(0).sum())
        return accepted, int(best[accepted])
    rows = torch.arange(n, device=tokens.device)
    p, q = target[rows, tokens], draft[rows, tokens]  # (n,)
    u = torch.rand(n, generator=generator, device=tokens.device)
    keep = (u * q <= p).long()  # u < p / q without dividing by q = 0 (a draft q cannot draw)
    accepted = int(keep.cumprod(0).sum())
    if accepted < n:
        residual = (target[accepted] - draft[accepted]).clamp(min=0)
        # p == q leaves no residual; rejection then has probability 0, but float rounding can land here
        residual = residual if float(residual.sum()) > 0 else target[accepted]
        return accepted, int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
    return accepted, int(torch.multinomial(target[n], 1, generator=generator))


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
    """Logits to the distribution decoding draws from (the logits themselves when greedy), and draws from it."""

    def __init__(self, vocab: int, temperature: float, top_k: int | None, top_p: float | None, seed: int | None,
                 device: torch.device) -> None:
        self.vocab, self.temperature, self.top_k, self.top_p = vocab, temperature, top_k, top_p
        self.greedy = temperature == 0.0
        self.generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None

    def dist(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits[..., : self.vocab]  # padded vocabulary rows are never drawn
        return logits if self.greedy else sampling_probs(logits, self.temperature, self.top_k, self.top_p)

    def pick(self, dist: torch.Tensor) -> int:
        return int(dist.argmax(-1)) if self.greedy else int(torch.multinomial(dist, 1, generator=self.generator))


class Drafter(Protocol):
    """What `speculate` asks of a drafter: to follow the target's reading, and to propose."""

    def read(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """The target's features (1, T, C) for idx (1, T) at `cache`'s next T slots, keeping what drafting needs."""

    def propose(self, tokens: torch.Tensor, m: int, gamma: int, sampler: Sampler) -> torch.Tensor:
        """Write gamma drafts into tokens[0, m + 1 : m + 1 + gamma], given settled tokens 0..m and the target
        read up to m - 1; return the distributions (gamma, V) they were drawn from."""


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


def speculate(target: Decoder, drafter: Drafter, prompt: list[int], max_new_tokens: int, gamma: int, max_len: int,
              sampler: Sampler, eos_id: int | None) -> tuple[list[int], SpeculativeStats]:
    """The rounds every drafter shares: the target prefills, then each round checks gamma drafts in one pass."""
    device = target.wte.weight.device
    cache = KVCache(target.config, 1, max_len, device, target.wte.weight.dtype)
    tokens = torch.zeros(1, max_len + 1, dtype=torch.long, device=device)
    n = len(prompt)
    tokens[0, :n] = torch.tensor(prompt, device=device)
    features = drafter.read(tokens[:, :n], cache)
    m = n  # the newest settled token, not yet read by the target
    tokens[0, m] = sampler.pick(sampler.dist(target.lm_head(features[0, -1])))
    out = [int(tokens[0, m])]
    stats = SpeculativeStats(gamma)
    while len(out) < max_new_tokens and not (eos_id is not None and out[-1] == eos_id):
        drafts = drafter.propose(tokens, m, gamma, sampler)  # (gamma, V)
        features = drafter.read(tokens[:, m : m + gamma + 1], cache)
        target_dist = sampler.dist(target.lm_head(features[0]))  # (gamma + 1, V)
        accepted, nxt = accept_drafts(target_dist, None if sampler.greedy else drafts, tokens[0, m + 1 : m + 1 + gamma],
                                      sampler.generator)
        stats.record(accepted)
        out.extend(tokens[0, m + 1 : m + 1 + accepted].tolist() + [nxt])
        m += accepted + 1
        tokens[0, m] = nxt
        cache.truncate(m)
    if eos_id is not None and eos_id in out:
        out = out[: out.index(eos_id) + 1]
    out = out[:max_new_tokens]
    stats.tokens = len(out)
    return out, stats


class _MTPDrafter:
    """A decoder's own MTP heads. Head k at position j reads depth k - 1's hidden state at j and token j + k
    (parallel heads read the decoder's state at j and no token); its cache keeps the positions whose token
    j + k was settled when computed, and each round runs the heads over the positions whose inputs changed."""

    def __init__(self, decoder: Decoder, heads: MTPHeads, depth: int, max_len: int) -> None:
        device, dtype = decoder.wte.weight.device, decoder.wte.weight.dtype
        self.decoder, self.heads = decoder, heads
        self.caches = heads.caches(1, max_len, device, dtype)[:depth]
        # hidden[k][j]: depth k's hidden state at position j (k = 0: the decoder's)
        self.hidden = [torch.zeros(1, max_len, decoder.config.n_embd, device=device, dtype=dtype) for _ in range(depth)]

    def read(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        start = cache.length
        h = self.decoder.hidden(idx, cache)
        self.hidden[0][:, start : start + idx.shape[1]] = h  # positions past the accepted prefix are read again later
        return self.decoder.norm(h)

    def propose(self, tokens: torch.Tensor, m: int, gamma: int, sampler: Sampler) -> torch.Tensor:
        dists = []
        for k in range(1, gamma + 1):
            cache = self.caches[k - 1]
            keep = min(cache.length, max(0, m - k))  # positions j whose token j + k was settled: j <= m - 1 - k
            cache.truncate(keep)
            previous = self.hidden[0 if self.heads.kind == "parallel" else k - 1][:, keep:m]
            h = self.heads.step(self.decoder, k, previous, tokens[:, keep + k : m + k], cache)
            if k < gamma:
                self.hidden[k][:, keep:m] = h
            dists.append(sampler.dist(self.heads.logits(self.decoder, k, h[:, -1])[0]))
            tokens[0, m + k] = sampler.pick(dists[-1])
        return torch.stack(dists)


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
) -> tuple[list[int], SpeculativeStats]:
    """New tokens for one prompt, drafted `depth` at a time (default: every head) by the decoder's MTP
    heads and checked by the decoder; the same tokens as `generation.generate` at temperature 0,
    the same distribution when sampling.

    Each round feeds the newest token and the drafts to the decoder at once (D + 1 positions), keeps the
    accepted prefix of its key/value cache, and runs each head over the positions whose inputs changed
    (`_MTPDrafter`). One sequence at a time: rows of a batch accept different numbers of drafts.
    """
    depth = heads.depth if depth is None else depth
    if not 1 <= depth <= heads.depth:
        raise ValueError(f"draft depth must be between 1 and the model's {heads.depth} MTP heads; got {depth}")
    max_len = cache_length(decoder, prompt, max_new_tokens, depth, {})
    sampler = Sampler(decoder.config.vocab_size, temperature, top_k, top_p, seed, decoder.wte.weight.device)
    return speculate(decoder, _MTPDrafter(decoder, heads, depth, max_len), prompt, max_new_tokens, depth, max_len, sampler, eos_id)
