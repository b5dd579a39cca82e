"""Decoding with the KV cache equals recomputing the whole prefix; sampling keeps its promises."""

from __future__ import annotations

import pytest
import torch

from modules.generation import generate, sample_next
from modules.nn import Decoder, DecoderConfig

PROMPTS = [[5, 17, 3], [42], [7, 7, 1, 9, 30, 2, 11], [60, 61]]


def model(**overrides) -> Decoder:
    torch.manual_seed(0)
    cfg = dict(vocab_size=67, block_size=32, n_layer=2, n_head=4, n_embd=32, pad_vocab_to=16)
    return Decoder(DecoderConfig(**{**cfg, **overrides})).eval()


def recompute_greedy(m: Decoder, prompt: list[int], n: int) -> list[int]:
    """The reference: no cache, no padding, the whole sequence through the model every step."""
    seq = list(prompt)
    for _ in range(n):
        logits = m(torch.tensor([seq]))[0, -1, : m.config.vocab_size]
        seq.append(int(logits.argmax()))
    return seq[len(prompt) :]


@pytest.mark.parametrize(
    "variant",
    [{}, dict(position="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2), dict(n_kv_head=1)],
    ids=["gpt2", "llama-gqa", "mqa"],
)
def test_cached_batched_greedy_equals_recomputing_each_prompt(variant: dict) -> None:
    m = model(**variant)
    got = generate(m, PROMPTS, max_new_tokens=12)
    assert got == [recompute_greedy(m, p, 12) for p in PROMPTS]


def test_cached_logits_match_full_forward_for_a_left_padded_row() -> None:
    from modules.nn.cache import KVCache

    m = model(position="rope")
    prompt = torch.tensor([[0, 0, 0, 4, 8, 15, 16, 23]])
    valid = prompt != 0
    cache = KVCache(m.config, 1, 12, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        prefill = m(prompt, cache, valid)[0, 3:]
        step = m(torch.tensor([[42]]), cache)[0, -1]
        full = m(torch.tensor([[4, 8, 15, 16, 23, 42]]))[0]
    torch.testing.assert_close(prefill, full[:5], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step, full[5], atol=1e-5, rtol=1e-5)


def test_eos_stops_rows_and_seed_repeats_samples() -> None:
    m = model()
    first = generate(m, PROMPTS, 10, temperature=1.0, seed=3)
    assert first == generate(m, PROMPTS, 10, temperature=1.0, seed=3)
    assert first != generate(m, PROMPTS, 10, temperature=1.0, seed=4)
    eos = first[0][2]
    cut = generate(m, PROMPTS, 10, temperature=1.0, seed=3, eos_id=eos)
    assert cut[0] == first[0][: first[0].index(eos) + 1]
    assert all(len(row) <= 10 and max(row) < 67 for row in cut)  # padded vocabulary never sampled


def test_top_k_and_top_p_keep_only_the_allowed_tokens() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, 1.0, top_k=2, generator=g).tolist()) == {0, 1}
    # nucleus 0.75: tokens 0 and 1 are needed to reach it (0.5, then 0.8); token 2 is outside
    picks = sample_next(logits, 1.0, top_p=0.75, generator=g)
    assert set(picks.tolist()) == {0, 1}
    assert (picks == 0).float().mean().item() == pytest.approx(0.5 / 0.8, abs=0.04)
    assert sample_next(logits[:1], 0.0).item() == 0


def test_generation_rejects_bad_input() -> None:
    m = model()
    with pytest.raises(ValueError, match="empty"):
        generate(m, [[1], []], 3)
    with pytest.raises(ValueError, match="block_size 32"):
        generate(m, [[1] * 30], 5)
