"""Decoding with the KV cache equals recomputing the whole prefix; sampling keeps its promises."""

from __future__ import annotations

import pytest
import torch

from modules.decoding.engine import DecodeEngine, Engines, sharded
from modules.decoding.generation import decode, generate, sample_next
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
def greedy(m: Decoder, prompts: list[list[int]], n: int, engine: DecodeEngine | None = None,
           device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens (B, n) and the logits each was taken from (B, n, vocab).

    Without an engine, the eager cached path: `Decoder.forward` over a fresh `KVCache`, one token a
    step. With one, its prefill and then its step program (the slot view; compiled or captured as
    the engine says), from an emptied cache.
    """
    vocab = m.config.vocab_size
    idx, valid = (t.to(device) for t in left_padded(prompts))
    if engine is None:
        cache = KVCache(m.config, len(prompts), idx.shape[1] + n, torch.device(device), torch.float32)
        logits = m(idx, cache, valid)[:, -1, :vocab]
    else:
        engine.reset()
        logits = engine.prefill(idx, valid)[:, :vocab]
    tokens, steps = [], []
    for i in range(n):
        steps.append(logits.float().cpu())
        tokens.append(logits.argmax(-1))
        if i < n - 1:
            logits = (engine.step(tokens[-1][:, None]) if engine else m(tokens[-1][:, None], cache))[:, -1, :vocab]
    return torch.stack(tokens, 1).cpu(), torch.stack(steps, 1)


@torch.no_grad()
def recomputed_logits(m: Decoder, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """The reference: logits (n, vocab) that predicted each of `tokens`, from one unpadded pass, no cache."""
    seq = torch.tensor([prompt + tokens[:-1]])
    return m(seq)[0, len(prompt) - 1 :, : m.config.vocab_size]


def engine(m: Decoder, batch: int, length: int, **options) -> DecodeEngine:
    return DecodeEngine(m, batch, length, **{"cuda_graph": False, **options})


@pytest.mark.parametrize("variant", VARIANTS)
def test_engine_step_equals_cached_forward_and_recomputing(variant: dict) -> None:
    """The slot view's step (what the engine compiles and captures), run eagerly."""
    m, n = model(**variant), 12
    length = max(map(len, PROMPTS)) + n
    eager_tokens, eager_logits = greedy(m, PROMPTS, n)
    slot_tokens, slot_logits = greedy(m, PROMPTS, n, engine(m, len(PROMPTS), length))
    assert slot_tokens.tolist() == eager_tokens.tolist() == generate(m, PROMPTS, n)
    torch.testing.assert_close(slot_logits, eager_logits, atol=1e-5, rtol=1e-5)
    for row, prompt in enumerate(PROMPTS):
        assert slot_tokens[row].tolist() == recompute_greedy(m, prompt, n)
        reference = recomputed_logits(m, prompt, slot_tokens[row].tolist())
        torch.testing.assert_close(slot_logits[row], reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", [v for v in VARIANTS if "mamba" not in str(v.values[0])])
def test_a_step_of_several_tokens_equals_feeding_them_one_by_one(variant: dict) -> None:
    """Speculative decoding's verification pass: k tokens per row at once through the slot view."""
    m = model(**variant)
    tokens = torch.tensor([[3, 9, 27, 14], [5, 1, 2, 8]])
    one, many = engine(m, 2, 16), engine(m, 2, 16)
    prompts = [[5, 17, 3], [42, 1, 4]]
    one.prefill(*left_padded(prompts))
    many.prefill(*left_padded(prompts))
    singles = torch.cat([one.step(tokens[:, i : i + 1]) for i in range(4)], dim=1)
    torch.testing.assert_close(many.step(tokens), singles, atol=1e-5, rtol=1e-5)
    assert one.cache.length == many.cache.length == 7


@pytest.mark.parametrize("variant", VARIANTS[:-1])  # not the MoE: see the test below
def test_compiled_step_equals_eager(variant: dict) -> None:
    """torch.compile through AOTAutograd (`aot_eager`): the graph inductor gets, with its in-place
    writes to the cache's buffers functionalized and written back, run without inductor's codegen,
    which costs 40-50 s per model on a 2-core CPU; `test_compiled_generate_with_inductor` runs that."""
    m, n = model(**variant), 12
    length = max(map(len, PROMPTS)) + n
    tokens, logits = greedy(m, PROMPTS, n, engine(m, len(PROMPTS), length, compile=True, backend="aot_eager"))
    eager_tokens, eager_logits = greedy(m, PROMPTS, n)
    assert tokens.tolist() == eager_tokens.tolist()
    torch.testing.assert_close(logits, eager_logits, atol=1e-5, rtol=1e-5)
    # generate through kept engines wires the same program in; here with the cheap backend
    engines = Engines(m, compile=True, cuda_graph=False, backend="aot_eager")
    assert generate(m, PROMPTS, n, engines=engines) == eager_tokens.tolist()


FLEX = [VARIANTS[0], VARIANTS[2], VARIANTS[3]]  # the standard attention blocks: multi-head, grouped, multi-query


@pytest.mark.parametrize("compile", [pytest.param(False, id="eager"), pytest.param(True, id="aot_eager")])
@pytest.mark.parametrize("variant", FLEX)
def test_flex_attention_reads_the_cache_as_sdpa_does(variant: dict, compile: bool) -> None:
    """The engine's passes with attention through FlexAttention (GQA inside it, the mask as a score_mod): the
    tokens and logits of SDPA's, one token a step and k at a time (a verification pass)."""
    m, n = model(**variant), 12
    length = max(map(len, PROMPTS)) + n
    options = dict(compile=compile, backend="aot_eager")
    tokens, logits = greedy(m, PROMPTS, n, engine(m, len(PROMPTS), length, attention="flex", **options))
    sdpa_tokens, sdpa_logits = greedy(m, PROMPTS, n, engine(m, len(PROMPTS), length, **options))
    assert tokens.tolist() == sdpa_tokens.tolist()
    torch.testing.assert_close(logits, sdpa_logits, atol=1e-5, rtol=1e-5)
    flex, sdpa = engine(m, 2, 16, attention="flex", **options), engine(m, 2, 16, **options)
    drafts = torch.tensor([[3, 9, 27, 14], [5, 1, 2, 8]])
    for kept in (flex, sdpa):
        kept.prefill(*left_padded([[5, 17, 3], [42, 1, 4]]))
    torch.testing.assert_close(flex.step(drafts), sdpa.step(drafts), atol=1e-5, rtol=1e-5)


def test_flex_attention_is_refused_where_a_block_reads_the_cache_its_own_way() -> None:
    with pytest.raises(ValueError, match="attention='flex' reads the cache of standard attention blocks"):
        engine(model(**VARIANTS[4].values[0]), 1, 8, attention="flex")  # MLA's latent
    with pytest.raises(ValueError, match="attention kernel 'fused'"):
        engine(model(), 1, 8, attention="fused")


@pytest.mark.slow
def test_compiled_generate_with_inductor() -> None:
    """The real path of generate(compile=True) on this machine: inductor's C++ code for the CPU."""
    m = model(position="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2)
    assert generate(m, PROMPTS, 12, compile=True) == generate(m, PROMPTS, 12)
    sampled = dict(temperature=1.0, top_k=20, seed=5)
    assert generate(m, PROMPTS, 12, compile=True, **sampled) == generate(m, PROMPTS, 12, **sampled)


def test_reset_engine_gives_the_same_output_as_a_new_one() -> None:
    m, n = model(position="rope", n_kv_head=2), 8
    first, second = PROMPTS, [[9, 8, 7, 6, 5, 4, 3, 2], [1], [33, 34], [2, 4, 6]]
    kept = engine(m, 4, 8 + n)
    a_tokens, a_logits = greedy(m, first, n, kept)
    b_tokens, b_logits = greedy(m, second, n, kept)  # over the first run's keys and values
    fresh_tokens, fresh_logits = greedy(m, second, n, engine(m, 4, 8 + n))
    assert torch.equal(b_tokens, fresh_tokens) and torch.equal(b_logits, fresh_logits)
    again_tokens, again_logits = greedy(m, first, n, kept)
    assert torch.equal(again_tokens, a_tokens) and torch.equal(again_logits, a_logits)


def test_kept_engines_are_reused_rounded_up_and_rebuilt_when_the_model_changes() -> None:
    m = model(position="rope")
    engines = Engines(m, keep=2)
    first = engines.get(4, 20)
    assert first.cache.max_len == 32 and engines.get(4, 17) is first  # 17 and 20 slots both round up to 32
    assert engines.get(4, 9).cache.max_len == 16 and engines.get(2, 9) is not first
    assert engines.get(4, 20) is not first  # kept two: the first was dropped
    again = engines.get(4, 20)
    m.train()
    assert engines.get(4, 20) is not again  # dropout on: another pass
    m.eval()
    assert generate(m, PROMPTS, 6, engines=engines) == generate(m, PROMPTS, 6)
    assert generate(m, PROMPTS[:1], 6, temperature=1.0, seed=2, engines=engines) == generate(
        m, PROMPTS[:1], 6, temperature=1.0, seed=2)
    with pytest.raises(ValueError, match="exceeds the model's block_size 32"):
        engines.get(1, 33)


def test_eos_is_checked_every_few_steps_and_rows_are_cut_after_it() -> None:
    m = model()
    free = generate(m, PROMPTS, 20, temperature=1.0, seed=11)
    eos = free[0][1]
    steps = list(decode(engine(m, 4, 32), PROMPTS, 20, temperature=1.0, seed=11, eos_id=eos, check_every=4))
    assert len(steps) in (20, *range(4, 21, 4))  # stops only at a check, once every row has produced eos
    cut = generate(m, PROMPTS, 20, temperature=1.0, seed=11, eos_id=eos)
    assert cut == [row[: row.index(eos) + 1] if eos in row else row for row in free]


def test_engine_rejects_a_full_cache_a_cpu_graph_a_wrong_batch_and_experts() -> None:
    jamba = model(**VARIANTS[-1].values[0])
    with pytest.raises(ValueError, match="mixture of experts routes tokens with data-dependent shapes"):
        DecodeEngine(jamba, 1, 4, compile=True)
    assert not DecodeEngine(jamba, 1, 4).cuda_graph  # eager by default, on any device
    m = model()
    with pytest.raises(ValueError, match="CUDA graph needs a CUDA cache; this one is on cpu"):
        DecodeEngine(m, 2, 5, cuda_graph=True).step(torch.tensor([[1], [2]]))
    kept = engine(m, 2, 5)
    kept.prefill(torch.tensor([[1, 2, 3], [4, 5, 6]]))
    with pytest.raises(ValueError, match=r"expected tokens for 2 rows, one per cache row; got shape \(1, 1\)"):
        kept.step(torch.tensor([[7]]))
    kept.step(torch.tensor([[7], [8]]))
    kept.step(torch.tensor([[9], [10]]))
    with pytest.raises(ValueError, match=r"cache full: 5 \+ 1 tokens > 5 slots"):
        kept.step(torch.tensor([[11], [12]]))
    assert kept.cache.length == 5
    with pytest.raises(ValueError, match="expected 2 prompts"):
        kept.prefill(torch.tensor([[1, 2]]))


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@CUDA
@pytest.mark.parametrize(
    "compile", [pytest.param(False, id="eager-graph"), pytest.param(True, id="compiled-graph", marks=pytest.mark.slow)]
)
@pytest.mark.parametrize("variant", [VARIANTS[0], VARIANTS[2], VARIANTS[4], VARIANTS[5]])
def test_cuda_graph_replay_equals_eager_cached_decoding(variant: dict, compile: bool) -> None:
    """The captured step, replayed at later slots and again after `reset()` with other prompts."""
    m, n = model(**variant).cuda(), 12
    kept = DecodeEngine(m, 4, 8 + n, compile=compile, cuda_graph=True)
    for prompts in (PROMPTS, [[9, 8, 7, 6, 5, 4, 3, 2], [1], [33, 34], [2, 4, 6]]):
        tokens, logits = greedy(m, prompts, n, kept, device="cuda")
        eager_tokens, eager_logits = greedy(m, prompts, n, device="cuda")
        assert tokens.tolist() == eager_tokens.tolist()
        torch.testing.assert_close(logits, eager_logits, atol=1e-4, rtol=1e-4)
    assert all(program.graph is not None for program in kept.programs.values())


@CUDA
@pytest.mark.parametrize("variant", FLEX[:2])
def test_compiled_flex_attention_graph_equals_eager_cached_decoding(variant: dict) -> None:
    """FlexAttention's compiled decoding kernel inside the captured step, against the eager cached path."""
    m, n = model(**variant).cuda(), 12
    kept = DecodeEngine(m, 4, 8 + n, compile=True, cuda_graph=True, attention="flex")
    tokens, logits = greedy(m, PROMPTS, n, kept, device="cuda")
    eager_tokens, eager_logits = greedy(m, PROMPTS, n, device="cuda")
    assert tokens.tolist() == eager_tokens.tolist()
    torch.testing.assert_close(logits, eager_logits, atol=1e-4, rtol=1e-4)


@CUDA
def test_graphed_generate_equals_eager_generate_on_the_gpu() -> None:
    """generate's default on CUDA (a captured step), greedy and sampled, against the eager engine."""
    m = model(position="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2).cuda()
    engines, eager = Engines(m), Engines(m, cuda_graph=False)
    for sampling in ({}, dict(temperature=1.0, top_k=20, seed=5)):
        assert generate(m, PROMPTS, 12, engines=engines, **sampling) == generate(m, PROMPTS, 12, engines=eager, **sampling)


def test_compiled_engines_of_many_shapes_in_one_process() -> None:
    """Dynamo allows 8 compiled versions of one function; with fullgraph the 9th used to fail hard.
    Each program compiles its own copy of its pass, so many cache lengths keep working."""
    m = model(n_layer=1)
    for length in range(4, 14):
        kept = engine(m, 1, length, compile=True, backend="eager")
        kept.prefill(torch.tensor([[1, 2]]))
        kept.step(torch.tensor([[3]]))
    assert kept.cache.length == 3


def test_sharded_parameters_are_seen_so_no_graph_replays_a_gather() -> None:
    m = model()
    assert not sharded(m)
    next(m.parameters()).ds_id = 0  # how DeepSpeed ZeRO-3 marks a partitioned parameter
    assert sharded(m)


class _Kernels(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the aten ops that compute or write (views excluded): what an eager pass launches."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("variant", VARIANTS[:5])
def test_prefill_into_an_empty_cache_launches_what_a_pass_without_one_does(variant: dict) -> None:
    """Every layer's cache write waits for one multi-tensor copy at the end of the pass, so an eager
    prefill (launch-bound on a GPU) is not slower for filling a cache; the cache then decodes exactly."""
    m = model(**variant)
    idx = torch.tensor([[5, 17, 3, 9, 30]])
    cache = KVCache(m.config, 1, 12, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        with _Kernels() as plain:
            expected = m(idx)
        with _Kernels() as cached:
            got = m(idx, cache)
        step = m(torch.tensor([[42]]), cache)[0, -1]
        full = m(torch.tensor([[5, 17, 3, 9, 30, 42]]))[0, -1]
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5)
    assert cached.count <= plain.count + 2, (cached.count, plain.count)  # the copy and marking the slots valid
