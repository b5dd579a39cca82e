"""Decoding with the KV cache equals recomputing the whole prefix; sampling keeps its promises."""

from __future__ import annotations

import functools

import pytest
import torch

from modules.decoding import generation
from modules.decoding.generation import CompiledDecoder, generate, sample_next
from modules.nn import Decoder, DecoderConfig
from modules.nn.cache import KVCache

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


VARIANTS = [
    pytest.param({}, id="gpt2"),  # learned positions, multi-head
    pytest.param(dict(position="rope"), id="rope-mha"),
    pytest.param(dict(position="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2), id="llama-gqa"),
    pytest.param(dict(n_kv_head=1), id="mqa"),  # learned positions, one key/value head
    # the cache holds MLA's latent and shared RoPE key; decoding reads it in the absorbed form
    pytest.param(dict(position="rope", norm="rmsnorm", attention="mla", mla_q_rank=16, mla_rope_dim=4), id="mla"),
    # Mamba blocks carry their conv and SSM state in the cache; left padding must leave it untouched
    pytest.param(dict(layer_pattern="mam", n_layer=3, position="none", mamba_d_state=4), id="hybrid"),
    pytest.param(dict(layer_pattern="m", position="none", mamba_d_state=4, mamba_scan="parallel", mamba_chunk=3),
                 id="mamba-parallel-scan"),
    pytest.param(dict(layer_pattern="ma", n_layer=4, position="none", mlp="swiglu", moe_experts=4, moe_every=2,
                      mamba_d_state=4), id="jamba"),
]


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_batched_greedy_equals_recomputing_each_prompt(variant: dict) -> None:
    m = model(**variant)
    got = generate(m, PROMPTS, max_new_tokens=12)
    assert got == [recompute_greedy(m, p, 12) for p in PROMPTS]


def test_cached_logits_match_full_forward_for_a_left_padded_row() -> None:
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


def left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, T) and valid mask (B, T) of prompts left-padded with token 0 to the longest."""
    T = max(len(p) for p in prompts)
    idx = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    return idx, torch.tensor([[False] * (T - len(p)) + [True] * len(p) for p in prompts])


@torch.no_grad()
def greedy(
    m: Decoder, cache: KVCache, prompts: list[list[int]], n: int, step: CompiledDecoder | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens (B, n) and the logits each was taken from (B, n, vocab), from an emptied `cache`.

    Prefill through `Decoder.forward`; then each step through `step` (`decode_step` at a device
    slot) or, without one, through `Decoder.forward` on one token (the eager cached path).
    """
    vocab = m.config.vocab_size
    cache.reset()
    idx, valid = left_padded(prompts)
    logits = m(idx.to(cache.valid.device), cache, valid.to(cache.valid.device))[:, -1, :vocab]
    tokens, steps = [], []
    for i in range(n):
        steps.append(logits.float().cpu())
        tokens.append(logits.argmax(-1))
        if i < n - 1:
            logits = (step(tokens[-1]) if step else m(tokens[-1][:, None], cache)[:, -1])[:, :vocab]
    return torch.stack(tokens, 1).cpu(), torch.stack(steps, 1)


@torch.no_grad()
def recomputed_logits(m: Decoder, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """The reference: logits (n, vocab) that predicted each of `tokens`, from one unpadded pass, no cache."""
    seq = torch.tensor([prompt + tokens[:-1]])
    return m(seq)[0, len(prompt) - 1 :, : m.config.vocab_size]


def cpu_cache(m: Decoder, batch: int, length: int) -> KVCache:
    return KVCache(m.config, batch, length, torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("variant", VARIANTS)
def test_slot_decode_step_equals_cached_forward_and_recomputing(variant: dict) -> None:
    """`decode_step` through a `SlotCache` (what `CompiledDecoder` compiles and captures), run eagerly."""
    m, n = model(**variant), 12
    length = max(map(len, PROMPTS)) + n
    eager_tokens, eager_logits = greedy(m, cpu_cache(m, len(PROMPTS), length), PROMPTS, n)
    cache = cpu_cache(m, len(PROMPTS), length)
    slot_tokens, slot_logits = greedy(m, cache, PROMPTS, n, CompiledDecoder(m, cache, compile=False, cuda_graph=False))
    assert slot_tokens.tolist() == eager_tokens.tolist() == generate(m, PROMPTS, n)
    torch.testing.assert_close(slot_logits, eager_logits, atol=1e-5, rtol=1e-5)
    for row, prompt in enumerate(PROMPTS):
        assert slot_tokens[row].tolist() == recompute_greedy(m, prompt, n)
        reference = recomputed_logits(m, prompt, slot_tokens[row].tolist())
        torch.testing.assert_close(slot_logits[row], reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS[:-1])  # not the MoE: see the test below
def test_compiled_step_equals_eager(variant: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.compile through AOTAutograd (`aot_eager`): the graph inductor gets, with its in-place
    writes to the cache's buffers functionalized and written back, run without inductor's codegen,
    which costs 40-50 s per model on a 2-core CPU; `test_compiled_generate_with_inductor` runs that."""
    m, n = model(**variant), 12
    length = max(map(len, PROMPTS)) + n
    cache = cpu_cache(m, len(PROMPTS), length)
    compiled = CompiledDecoder(m, cache, compile=True, cuda_graph=False, backend="aot_eager")
    tokens, logits = greedy(m, cache, PROMPTS, n, compiled)
    eager_tokens, eager_logits = greedy(m, cpu_cache(m, len(PROMPTS), length), PROMPTS, n)
    assert tokens.tolist() == eager_tokens.tolist()
    torch.testing.assert_close(logits, eager_logits, atol=1e-5, rtol=1e-5)
    # generate(compile=True) wires the same decoder in; here with the cheap backend
    monkeypatch.setattr(generation, "CompiledDecoder", functools.partial(CompiledDecoder, backend="aot_eager"))
    assert generate(m, PROMPTS, n, compile=True) == eager_tokens.tolist()


@pytest.mark.slow
def test_compiled_generate_with_inductor() -> None:
    """The real path of generate(compile=True) on this machine: inductor's C++ code for the CPU."""
    m = model(position="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2)
    assert generate(m, PROMPTS, 12, compile=True) == generate(m, PROMPTS, 12)
    sampled = dict(temperature=1.0, top_k=20, seed=5)
    assert generate(m, PROMPTS, 12, compile=True, **sampled) == generate(m, PROMPTS, 12, **sampled)


@pytest.mark.parametrize("slot", [False, True], ids=["forward", "slot"])
def test_reset_cache_gives_the_same_output_as_a_new_one(slot: bool) -> None:
    m, n = model(position="rope", n_kv_head=2), 8
    first, second = PROMPTS, [[9, 8, 7, 6, 5, 4, 3, 2], [1], [33, 34], [2, 4, 6]]
    cache = cpu_cache(m, 4, 8 + n)
    step = CompiledDecoder(m, cache, compile=False, cuda_graph=False) if slot else None
    a_tokens, a_logits = greedy(m, cache, first, n, step)
    b_tokens, b_logits = greedy(m, cache, second, n, step)  # over the first run's keys and values
    fresh = cpu_cache(m, 4, 8 + n)
    fresh_tokens, fresh_logits = greedy(m, fresh, second, n, CompiledDecoder(m, fresh, False, False) if slot else None)
    assert torch.equal(b_tokens, fresh_tokens) and torch.equal(b_logits, fresh_logits)
    again_tokens, again_logits = greedy(m, cache, first, n, step)
    assert torch.equal(again_tokens, a_tokens) and torch.equal(again_logits, a_logits)


def test_compiled_decoder_rejects_a_full_cache_a_cpu_graph_a_wrong_batch_and_experts() -> None:
    with pytest.raises(ValueError, match="mixture of experts routes tokens with data-dependent shapes"):
        jamba = model(**VARIANTS[-1].values[0])
        CompiledDecoder(jamba, cpu_cache(jamba, 1, 4), compile=True, cuda_graph=False)
    m = model()
    cache = cpu_cache(m, 2, 5)
    with pytest.raises(ValueError, match="CUDA graph needs a CUDA cache; this one is on cpu"):
        CompiledDecoder(m, cache, compile=False, cuda_graph=True)
    step = CompiledDecoder(m, cache, compile=False, cuda_graph=False)
    with torch.no_grad():
        m(torch.tensor([[1, 2, 3], [4, 5, 6]]), cache)
    with pytest.raises(ValueError, match="expected 2 tokens, one per cache row"):
        step(torch.tensor([7]))
    step(torch.tensor([7, 8]))
    step(torch.tensor([9, 10]))
    with pytest.raises(ValueError, match="cache full: all 5 slots are used"):
        step(torch.tensor([11, 12]))
    assert cache.length == 5


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@CUDA
@pytest.mark.parametrize(
    "compile", [pytest.param(False, id="eager-graph"), pytest.param(True, id="compiled-graph", marks=pytest.mark.slow)]
)
@pytest.mark.parametrize("variant", [VARIANTS[0], VARIANTS[2], VARIANTS[4]])
def test_cuda_graph_replay_equals_eager_cached_decoding(variant: dict, compile: bool) -> None:
    """The captured step, replayed at later slots and again after `reset()` with other prompts."""
    m, n = model(**variant).cuda(), 12
    device = torch.device("cuda")
    cache = KVCache(m.config, 4, 8 + n, device, torch.float32)
    step = CompiledDecoder(m, cache, compile=compile, cuda_graph=True)
    for prompts in (PROMPTS, [[9, 8, 7, 6, 5, 4, 3, 2], [1], [33, 34], [2, 4, 6]]):
        tokens, logits = greedy(m, cache, prompts, n, step)
        eager_tokens, eager_logits = greedy(m, KVCache(m.config, 4, 8 + n, device, torch.float32), prompts, n)
        assert tokens.tolist() == eager_tokens.tolist()
        torch.testing.assert_close(logits, eager_logits, atol=1e-4, rtol=1e-4)
    assert step.graph is not None


def test_compiled_decoders_of_many_shapes_in_one_process() -> None:
    """Dynamo allows 8 compiled versions of one function; with fullgraph the 9th used to fail hard.
    Each decoder compiles its own copy of the step, so generate(compile=True) over many prompt
    lengths keeps working."""
    m = model(n_layer=1)
    for length in range(4, 14):
        cache = cpu_cache(m, 1, length)
        step = CompiledDecoder(m, cache, compile=True, cuda_graph=False, backend="eager")
        with torch.no_grad():
            m(torch.tensor([[1, 2]]), cache)
        step(torch.tensor([3]))
    assert cache.length == 3
