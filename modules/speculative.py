"""Speculative decoding: drafts checked by the target model with the rejection rule of Leviathan et al. 2023.

A draft proposes the next few tokens; the target scores all of them in one forward pass and keeps
the longest prefix the rule accepts, plus one token of its own. Greedy decoding gives exactly the
target's tokens; sampling keeps exactly the target's distribution (Leviathan et al., Thm. 1): a
draft token x drawn from q is kept with probability min(1, p(x) / q(x)), and on rejection the
replacement is drawn from norm(max(0, p - q)).

`self_speculative_generate` drafts with a decoder's own MTP heads (`modules/nn/mtp.py`), the use
DeepSeek-V3 suggests for its MTP modules (Sec. 5.4.3).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from modules.generation import sampling_probs
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

    Each round feeds the newest token and the drafts to the decoder at once (D + 1 positions),
    keeps the accepted prefix of its key/value cache, and runs each head over the positions whose
    inputs changed. Head k at position j reads the depth k - 1 hidden state at j and token j + k;
    its cache keeps the positions whose token j + k is settled (parallel heads read the decoder's
    hidden state at j and no token). One sequence at a time: rows of a
    batch accept different numbers of drafts.
    """
    depth = heads.depth if depth is None else depth
    if not 1 <= depth <= heads.depth:
        raise ValueError(f"draft depth must be between 1 and the model's {heads.depth} MTP heads; got {depth}")
    if not prompt:
        raise ValueError("self_speculative_generate needs a non-empty prompt")
    device, dtype = decoder.wte.weight.device, decoder.wte.weight.dtype
    vocab, width = decoder.config.vocab_size, decoder.config.n_embd
    max_len = len(prompt) + max_new_tokens + depth + 1
    if max_len > decoder.config.block_size:
        raise ValueError(f"prompt {len(prompt)} + {max_new_tokens} new + {depth + 1} drafted tokens exceed block_size "
                         f"{decoder.config.block_size}")
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    greedy = temperature == 0.0

    def distribution(logits: torch.Tensor) -> torch.Tensor:
        logits = logits[..., :vocab]
        return logits if greedy else sampling_probs(logits, temperature, top_k, top_p)

    def pick(dist: torch.Tensor) -> int:
        return int(dist.argmax(-1)) if greedy else int(torch.multinomial(dist, 1, generator=generator))

    cache = KVCache(decoder.config, 1, max_len, device, dtype)
    head_caches = heads.caches(1, max_len, device, dtype)[:depth]
    # hidden[k][j]: depth k's hidden state at position j (k = 0: the decoder's); tokens[j]: token j
    hidden = [torch.zeros(1, max_len, width, device=device, dtype=dtype) for _ in range(depth)]
    tokens = torch.zeros(1, max_len + depth, dtype=torch.long, device=device)
    n = len(prompt)
    tokens[0, :n] = torch.tensor(prompt, device=device)
    h = decoder.hidden(tokens[:, :n], cache)
    hidden[0][:, :n] = h
    m = n  # the newest settled token, not yet fed to the decoder
    tokens[0, m] = pick(distribution(decoder.lm_head(decoder.norm(h[:, -1]))[0]))
    out = [int(tokens[0, m])]
    stats = SpeculativeStats(depth)
    while len(out) < max_new_tokens and not (eos_id is not None and out[-1] == eos_id):
        drafts = []
        for k in range(1, depth + 1):
            head_cache = head_caches[k - 1]
            # positions j whose token j + k was settled when computed are still right: j <= m - 1 - k
            keep = min(head_cache.length, max(0, m - k))
            head_cache.truncate(keep)
            previous = hidden[0 if heads.kind == "parallel" else k - 1][:, keep:m]
            h = heads.step(decoder, k, previous, tokens[:, keep + k : m + k], head_cache)
            if k < depth:
                hidden[k][:, keep:m] = h
            dist = distribution(heads.logits(decoder, k, h[:, -1])[0])
            tokens[0, m + k] = pick(dist)
            drafts.append(dist)
        # the decoder checks the newest token's successor and the drafts in one pass
        h = decoder.hidden(tokens[:, m : m + depth + 1], cache)
        hidden[0][:, m : m + depth + 1] = h
        target = distribution(decoder.lm_head(decoder.norm(h))[0])  # (depth + 1, V)
        accepted, nxt = accept_drafts(target, None if greedy else torch.stack(drafts), tokens[0, m + 1 : m + 1 + depth],
                                      generator)
        stats.record(accepted)
        new = tokens[0, m + 1 : m + 1 + accepted].tolist() + [nxt]
        m += accepted + 1
        tokens[0, m] = nxt
        cache.truncate(m)
        out.extend(new)
    if eos_id is not None and eos_id in out:
        out = out[: out.index(eos_id) + 1]
    out = out[:max_new_tokens]
    stats.tokens = len(out)
    return out, stats
