"""Incremental decoding with a KV cache: batched prompts of different lengths, greedy or sampled."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from modules.nn.cache import KVCache
from modules.nn.decoder import Decoder

if TYPE_CHECKING:
    from tokenizers import Tokenizer


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V): greedy at temperature 0, else sampled.

    top-k keeps the k largest logits; top-p (nucleus, Holtzman et al. 2020) keeps the smallest
    set of tokens whose probability reaches p, always including the most likely one.
    """
    if temperature == 0.0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # mass before this token already reaches p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: Decoder,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    seed: int | None = None,
) -> list[list[int]]:
    """New token ids for each prompt, at most `max_new_tokens`, cut after `eos_id`.

    Prompts are left-padded into one batch and prefilled in one forward pass; each further
    token costs one forward pass of one position per row over the cached keys and values.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, and no prompt may be empty")
    device = next(model.parameters()).device
    T0 = max(len(p) for p in prompts)
    idx = torch.zeros(len(prompts), T0, dtype=torch.long, device=device)
    valid = torch.zeros(len(prompts), T0, dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompts):
        idx[row, T0 - len(prompt) :] = torch.tensor(prompt, device=device)
        valid[row, T0 - len(prompt) :] = True
    dtype = next(model.parameters()).dtype
    cache = KVCache(model.config, len(prompts), T0 + max_new_tokens, device, dtype)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    vocab = model.config.vocab_size

    logits = model(idx, cache, valid)[:, -1, :vocab]  # prefill; padded vocabulary rows are never sampled
    out = torch.empty(len(prompts), 0, dtype=torch.long, device=device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        token = sample_next(logits, temperature, top_k, top_p, generator)
        out = torch.cat([out, token[:, None]], dim=1)
        if eos_id is not None:
            done |= token == eos_id
            if bool(done.all()):
                break
        if out.shape[1] == max_new_tokens:
            break
        logits = model(token[:, None], cache)[:, -1, :vocab]
    rows = out.tolist()
    if eos_id is not None:
        rows = [row[: row.index(eos_id) + 1] if eos_id in row else row for row in rows]
    return rows


def generate_text(
    model: Decoder,
    tokenizer: Tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    stop: list[str] | tuple[str, ...] = (),
    **sampling: object,
) -> list[str]:
    """Continuations of `prompts`, each cut before the first of the `stop` strings.

    `sampling` goes to `generate` (temperature, top_k, top_p, eos_id, seed).
    """
    encoded = [tokenizer.encode(p).ids for p in prompts]
    texts = [tokenizer.decode(ids) for ids in generate(model, encoded, max_new_tokens, **sampling)]
    return [truncate_at_stop(text, stop) for text in texts]


def truncate_at_stop(text: str, stop: list[str] | tuple[str, ...]) -> str:
    """`text` up to (not including) the earliest occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]
