"""Speculative decoding with a separate drafter: a small draft model (Leviathan et al. 2023) or an EAGLE head.

Each round the drafter proposes `gamma` tokens one after another; the target scores all of them in one
forward pass, keeps the prefix `accept_drafts` accepts plus one token of its own, and both roll their
key/value caches back to what was kept. Greedy decoding gives exactly the target's tokens; sampling
keeps exactly the target's distribution (Leviathan et al., Thm. 1).

Leviathan et al.'s analysis assumes each draft is accepted independently with probability alpha:
`expected_tokens_per_round` (their Eq. 1) and `expected_speedup` (Thm. 3.8) give what to expect at
draft length gamma, and `estimate_alpha` reads alpha from a measured `SpeculativeStats`.
"""

from __future__ import annotations

import torch

from modules.decoding.engine import DecodeEngine
from modules.decoding.speculative import Sampler, Speculator, SpeculativeStats, cache_length, drafter_passes, speculate
from modules.nn.cache import KVCache, SlotCache
from modules.nn.decoder import Decoder
from modules.nn.eagle import EagleHead


class _DraftModel:
    """An independent draft decoder on its own decode engine, holding every settled token it has read."""

    def __init__(self, target: Decoder, draft: Decoder, max_len: int) -> None:
        self.target, self.draft = target, draft
        self.engine = DecodeEngine(draft, 1, max_len)

    def read(self, idx: torch.Tensor, cache: KVCache | SlotCache) -> tuple[torch.Tensor, ...]:
        return (self.target(idx, cache),)

    def keep(self, start: int, kept: tuple[torch.Tensor, ...]) -> None:
        pass

    def reset(self) -> None:
        self.engine.reset()

    def propose(self, tokens: torch.Tensor, m: int, gamma: int, sampler: Sampler) -> torch.Tensor | None:
        # slots up to m - 1 hold settled tokens (accepted drafts are settled); later ones were rejected
        engine, cache = self.engine, self.engine.cache
        cache.truncate(min(cache.length, m))
        draws, dists = sampler.draw_inputs(gamma, tokens.device), []
        draw = sampler.drawing(lambda idx: (self.draft(idx, engine.view)[0, -1],))
        name = f"draw {sampler.key}"
        unread = tokens[:, cache.length : m + 1]
        for k in range(gamma):
            if k == 0 and cache.length == 0:  # the prompt: one eager pass
                token, dist = sampler.drawing(lambda idx: (engine.prefill(idx)[0],))(unread, *draws[k])
            else:
                token, dist = engine.program(name, draw, unread if k == 0 else tokens[:, m + k : m + 1 + k], *draws[k])
            tokens[0, m + 1 + k : m + 2 + k] = token
            if not sampler.greedy:
                dists.append(dist.clone())  # a replay's outputs are overwritten by the next one
        return None if sampler.greedy else torch.stack(dists)


class _EagleDrafter:
    """An EAGLE head over the target's features: its cache holds, at slot j < `settled`, the entry read from
    the target's state at j and token j + 1; slots from `settled` on hold the last round's chain."""

    def __init__(self, target: Decoder, head: EagleHead, max_len: int) -> None:
        device, dtype = target.wte.weight.device, target.wte.weight.dtype
        self.target, self.head = target, head
        self.cache = head.cache(max_len, device, dtype)
        self.view = SlotCache(self.cache)
        self.passes = drafter_passes(target)
        layers = head.eagle.fuse_layers
        width = target.config.n_embd * (len(layers) if layers else 1)
        self.read_out = torch.zeros(1, max_len, width, device=device, dtype=dtype)  # what the head reads at each position
        self.settled = 0

    def reset(self) -> None:
        self.cache.reset()
        self.settled = 0

    def read(self, idx: torch.Tensor, cache: KVCache | SlotCache) -> tuple[torch.Tensor, ...]:
        features, read = self.head.read_target(self.target, idx, cache)
        return self.target.lm_head(features), read

    def keep(self, start: int, kept: tuple[torch.Tensor, ...]) -> None:
        (read,) = kept
        self.read_out[:, start : start + read.shape[1]] = read  # positions past the accepted prefix are read again later

    def _catch_up(self, read: torch.Tensor, next_tokens: torch.Tensor, cache: KVCache | SlotCache) -> tuple[torch.Tensor, ...]:
        head, target = self.head, self.target
        feature = head.step(target, head.from_target(read), next_tokens, cache)[:, -1:]
        return feature, head.logits(target, feature)[0, -1]

    def _chain(self, feature: torch.Tensor, token: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feature = self.head.step(self.target, feature, token, self.view)
        return feature, self.head.logits(self.target, feature)[0, -1]

    def propose(self, tokens: torch.Tensor, m: int, gamma: int, sampler: Sampler) -> torch.Tensor | None:
        self.cache.truncate(self.settled)  # forget the last chain; catch up on the positions the target has read since
        inputs = (self.read_out[:, self.settled : m], tokens[:, self.settled + 1 : m + 1])
        draws, dists = sampler.draw_inputs(gamma, tokens.device), []
        if self.settled == 0:  # the prompt's positions: one eager pass
            catch_up = sampler.drawing(lambda read, next_tokens: self._catch_up(read, next_tokens, self.cache))
            feature, token, dist = catch_up(*inputs, *draws[0])
        else:
            catch_up = sampler.drawing(lambda read, next_tokens: self._catch_up(read, next_tokens, self.view))
            feature, token, dist = self.passes.run(f"catch-up {sampler.key}", catch_up, (*inputs, *draws[0]),
                                                   [(self.view, m - self.settled)])
        self.settled = m
        chain = sampler.drawing(self._chain)
        for k in range(gamma):
            tokens[0, m + 1 + k : m + 2 + k] = token
            if not sampler.greedy:
                dists.append(dist.clone())  # a replay's outputs are overwritten by the next one
            if k < gamma - 1:
                feature, token, dist = self.passes.run(f"chain {sampler.key}", chain,
                                                       (feature, tokens[:, m + 1 + k : m + 2 + k], *draws[k + 1]),
                                                       [(self.view, 1)])
        return None if sampler.greedy else torch.stack(dists)

    def chain(self, feature: torch.Tensor, token: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One drafting step at the head cache's next slot: the predicted feature (1, 1, C) and the logits of
        the token after `token` (1, 1), as a program (captured on CUDA)."""
        return self.passes.run("chain", self._chain, (feature, token), [(self.view, 1)])


def draft_speculator(target: Decoder, draft: Decoder) -> Speculator:
    """A `Speculator` drafting with a separate draft decoder."""
    return Speculator(target, lambda max_len: _DraftModel(target, draft, max_len), (draft,))


def eagle_speculator(target: Decoder, head: EagleHead) -> Speculator:
    """A `Speculator` drafting with an EAGLE head over the target's features."""
    return Speculator(target, lambda max_len: _EagleDrafter(target, head, max_len))


@torch.no_grad()
def draft_speculative_generate(
    target: Decoder,
    draft: Decoder,
    prompt: list[int],
    max_new_tokens: int,
    gamma: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    seed: int | None = None,
    speculator: Speculator | None = None,
) -> tuple[list[int], SpeculativeStats]:
    """New tokens for one prompt, drafted `gamma` at a time by a small `draft` decoder of the same
    vocabulary and checked by `target` (Leviathan et al. 2023); the tokens of `generation.generate(target, ...)`
    at temperature 0, its distribution when sampling (same temperature, top_k, top_p on both models).

    The draft decodes its gamma proposals one position at a time on its own engine; the target reads its
    newest token and the drafts in one pass. Both caches keep the accepted prefix. Both decoders must be
    attention-only (a Mamba state cannot roll back). Pass the same `draft_speculator(target, draft)` to
    each call to capture the programs once.
    """
    if draft.config.vocab_size != target.config.vocab_size:
        raise ValueError(f"the draft's vocabulary ({draft.config.vocab_size}) must be the target's "
                         f"({target.config.vocab_size}): drafts are token ids the target scores")
    max_len = cache_length(target, prompt, max_new_tokens, gamma, {"draft": draft})
    sampler = Sampler(target.config.vocab_size, temperature, top_k, top_p, seed, target.wte.weight.device)
    speculator = speculator or draft_speculator(target, draft)
    return speculate(speculator, prompt, max_new_tokens, gamma, max_len, sampler, eos_id)


@torch.no_grad()
def eagle_generate(
    target: Decoder,
    head: EagleHead,
    prompt: list[int],
    max_new_tokens: int,
    gamma: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    seed: int | None = None,
    speculator: Speculator | None = None,
) -> tuple[list[int], SpeculativeStats]:
    """New tokens for one prompt, drafted `gamma` at a time in a chain (no tree) by an EAGLE head reading the
    target's features, and checked by the target; exact as `draft_speculative_generate`.

    Each round the head first reads the positions the target settled last round (their features and the
    next tokens), then drafts on its own predicted features; the chain's cache entries are dropped before
    the next round, whose entries come from the target's real features.
    """
    if head.config.n_embd != target.config.n_embd or head.config.vocab_size != target.config.vocab_size:
        raise ValueError(f"the head was built for width {head.config.n_embd} and vocabulary {head.config.vocab_size}; "
                         f"the target has {target.config.n_embd} and {target.config.vocab_size}")
    max_len = cache_length(target, prompt, max_new_tokens, gamma, {})
    sampler = Sampler(target.config.vocab_size, temperature, top_k, top_p, seed, target.wte.weight.device)
    speculator = speculator or eagle_speculator(target, head)
    return speculate(speculator, prompt, max_new_tokens, gamma, max_len, sampler, eos_id)


def _check_alpha(alpha: float, gamma: int) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha is an acceptance rate in [0, 1]; got {alpha}")
    if gamma < 0:
        raise ValueError(f"gamma must be non-negative; got {gamma}")


def expected_tokens_per_round(alpha: float, gamma: int) -> float:
    """Leviathan et al. Eq. 1: tokens one round yields, (1 - alpha^(gamma + 1)) / (1 - alpha), when each of
    gamma drafts is kept independently with probability alpha. Summed as 1 + alpha + ... + alpha^gamma,
    which is gamma + 1 at alpha = 1 with no division by zero."""
    _check_alpha(alpha, gamma)
    return sum(alpha**i for i in range(gamma + 1))


def expected_speedup(alpha: float, gamma: int, c: float) -> float:
    """Leviathan et al. Thm. 3.8: the expected wall-time improvement factor,
    (1 - alpha^(gamma + 1)) / ((1 - alpha)(gamma c + 1)), where c is the time of one draft step over one
    target step: a round costs gamma draft steps and one target pass and yields Eq. 1's tokens."""
    if c < 0:
        raise ValueError(f"c is a ratio of step times, non-negative; got {c}")
    return expected_tokens_per_round(alpha, gamma) / (gamma * c + 1)


def estimate_alpha(stats: SpeculativeStats) -> float:
    """alpha from measured acceptance: drafts kept over drafts checked, all depths pooled. Under Leviathan
    et al.'s model (every checked draft kept independently with probability alpha) this is the maximum
    likelihood estimate: a round that keeps a < gamma drafts contributes a successes and one failure, a
    full round gamma successes. NaN when nothing was checked."""
    proposed = sum(stats.proposed)
    return sum(stats.accepted) / proposed if proposed else float("nan")
