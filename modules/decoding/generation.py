"""Generation on the decode engine: batched prompts of different lengths, greedy or sampled, on the device."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from modules.decoding.engine import DecodeEngine, Engines
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
    """Next token ids (B,) from logits (B, V): greedy at temperature 0, else sampled from `sampling_probs`."""
    if temperature == 0.0:
        return logits.argmax(-1)
    return torch.multinomial(sampling_probs(logits, temperature, top_k, top_p), 1, generator=generator).squeeze(-1)


def sampling_probs(
    logits: torch.Tensor, temperature: float, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """The distribution (..., V) that sampling at `temperature` > 0 draws from, in float32.

    top-k keeps the k largest logits; top-p (nucleus, Holtzman et al. 2020) keeps the smallest
    set of tokens whose probability reaches p, always including the most likely one.
    """
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # mass before this token already reaches p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits.softmax(-1)


def left_pad(prompts: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompts as one batch idx (B, T0), left-padded, and `valid` (B, T0) marking real tokens (None: no padding)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, and no prompt may be empty")
    T0 = max(len(p) for p in prompts)
    idx = torch.zeros(len(prompts), T0, dtype=torch.long)
    valid = torch.zeros(len(prompts), T0, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        idx[row, T0 - len(prompt) :] = torch.tensor(prompt)
        valid[row, T0 - len(prompt) :] = True
    padded = any(len(p) < T0 for p in prompts)
    return idx.to(device), valid.to(device) if padded else None


@torch.no_grad()
def decode(
    engine: DecodeEngine,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    seed: int | None = None,
    check_every: int = 16,
) -> Iterator[torch.Tensor]:
    """Each step's new tokens (B,), on the device, for prompts prefilled into `engine` (emptied first).

    Sampling stays on the device and nothing waits for the GPU, except every `check_every` steps a
    look at whether every row has produced `eos_id` (then it stops); rows that finished earlier go
    on sampling, and callers cut them after their first `eos_id`.
    """
    model = engine.model
    idx, valid = left_pad(prompts, engine.cache.valid.device)
    if idx.shape[1] + max_new_tokens > engine.cache.max_len:
        raise ValueError(f"prompt {idx.shape[1]} + {max_new_tokens} new tokens exceed the engine's "
                         f"{engine.cache.max_len} cache slots")
    engine.reset()
    generator = torch.Generator(device=idx.device).manual_seed(seed) if seed is not None else None
    vocab = model.config.vocab_size
    logits = engine.prefill(idx, valid)[:, :vocab]  # padded vocabulary rows are never sampled
    done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    for produced in range(1, max_new_tokens + 1):
        token = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
        yield token
        if produced == max_new_tokens:
            return
        if eos_id is not None:
            done |= token == eos_id
            if produced % check_every == 0 and bool(done.all()):
                return
        logits = engine.step(token[:, None])[:, -1, :vocab]


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
    compile: bool = False,
    engines: Engines | None = None,
) -> list[list[int]]:
    """New token ids for each prompt, at most `max_new_tokens`, cut after `eos_id`.

    Prompts are left-padded into one batch and prefilled in one forward pass; each further token
    costs one pass of one position per row over the static cache (`engine.DecodeEngine`), captured
    as a CUDA graph on CUDA. `compile=True` also compiles that step with torch.compile: faster per
    token, after a compile for this batch size and cache length (about 30 s for gpt2-124m on an
    H100). `engines` keeps engines across calls (pass the same `Engines(model)` to each), so each
    shape is captured and compiled once; without it each call builds its own.
    """
    if engines is None:
        length = max((len(p) for p in prompts), default=0) + max_new_tokens
        if length > model.config.block_size:
            raise ValueError(f"cache of {length} slots exceeds the model's block_size {model.config.block_size}")
        engine = DecodeEngine(model, len(prompts), length, compile=compile)
    else:
        engine = engines.get(len(prompts), max((len(p) for p in prompts), default=0) + max_new_tokens)
    steps = list(decode(engine, prompts, max_new_tokens, temperature, top_k, top_p, eos_id, seed))
    rows = torch.stack(steps, dim=1).tolist()
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
