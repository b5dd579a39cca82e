"""Speculative decoding with a draft model and with an EAGLE head: exactness, the target's distribution,
Leviathan et al.'s formulas, and the head's training."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from scipy.stats import chisquare

from modules.decoding import speculative as speculative_module
from modules.decoding.draft import (
    draft_speculative_generate,
    draft_speculator,
    eagle_generate,
    eagle_speculator,
    estimate_alpha,
    expected_speedup,
    expected_tokens_per_round,
)
from modules.decoding.generation import generate, sampling_probs
from modules.nn import Decoder, DecoderConfig
from modules.nn.eagle import EagleConfig, EagleHead, fusion_layers
from modules.decoding.speculative import SpeculativeStats, accept_drafts, greedy_verdict


pytestmark = pytest.mark.usefixtures("one_thread")


def config(vocab: int = 50, position: str = "learned", n_layer: int = 2, n_embd: int = 32,
           block: int = 96) -> DecoderConfig:
    return DecoderConfig(vocab_size=vocab, block_size=block, n_layer=n_layer, n_head=2, n_embd=n_embd, position=position)


def sharpened(module: torch.nn.Module, seed: int, std: float) -> torch.nn.Module:
    """Large random weights (peaked distributions that differ between modules), in eval mode."""
    torch.manual_seed(seed)
    for p in module.parameters():
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=std)
    return module.eval()


def prompts(vocab: int, count: int = 3) -> list[list[int]]:
    return [torch.randint(0, vocab, (4 + 2 * s,), generator=torch.Generator().manual_seed(s)).tolist()
            for s in range(count)]


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_greedy_draft_model_decoding_gives_the_targets_tokens(position: str) -> None:
    target = sharpened(Decoder(config(position=position)), 0, 0.3)
    small = sharpened(Decoder(config(position=position, n_layer=1, n_embd=16)), 1, 0.3)  # disagrees on most tokens
    new = 30
    for gamma in (1, 2, 4):
        for prompt in prompts(50):
            reference = generate(target, [prompt], new)[0]
            tokens, stats = draft_speculative_generate(target, small, prompt, new, gamma)
            assert tokens == reference and stats.tokens == new
            assert sum(stats.accepted) < sum(stats.proposed)
            tokens, stats = draft_speculative_generate(target, target, prompt, new, gamma)
            assert tokens == reference
            # the target drafting for itself: every draft kept, gamma + 1 tokens a round
            assert stats.accepted == stats.proposed and stats.rounds == math.ceil((new - 1) / (gamma + 1))


@pytest.mark.parametrize("position", ["learned", "rope"])
@pytest.mark.parametrize("variant", ["eagle1", "eagle3"])
def test_greedy_eagle_decoding_gives_the_targets_tokens(position: str, variant: str) -> None:
    cfg = config(position=position, n_layer=3)
    target = sharpened(Decoder(cfg), 0, 0.3)
    head = sharpened(EagleHead(cfg, EagleConfig.eagle3(3) if variant == "eagle3" else EagleConfig()), 2, 0.3)
    for gamma in (1, 3):
        for prompt in prompts(50, 2):
            tokens, stats = eagle_generate(target, head, prompt, 25, gamma)
            assert tokens == generate(target, [prompt], 25)[0] and stats.tokens == 25


@pytest.mark.parametrize("kind", ["draft model", "EAGLE"])
def test_a_speculator_kept_across_prompts_gives_what_fresh_ones_give(kind: str) -> None:
    """One target engine and drafter, reset between prompts of different lengths, greedy and sampled at two settings
    (each its own verification program: one captured for T = 1 must not judge T = 0.5's drafts)."""
    cfg = config(position="rope", n_layer=3)
    target = sharpened(Decoder(cfg), 0, 0.3)
    if kind == "draft model":
        drafter = sharpened(Decoder(config(position="rope", n_layer=1, n_embd=16)), 1, 0.3)
        run, make = draft_speculative_generate, draft_speculator
    else:
        drafter = sharpened(EagleHead(cfg, EagleConfig.eagle3(3)), 2, 0.3)
        run, make = eagle_generate, eagle_speculator
    kept = make(target, drafter)
    for prompt, gamma, sampling in itertools.product(prompts(50), (1, 3), ({}, dict(temperature=1.0, seed=4),
                                                                                 dict(temperature=0.5, top_k=5, seed=4))):
        fresh = run(target, drafter, prompt, 20, gamma, **sampling)
        again = run(target, drafter, prompt, 20, gamma, speculator=kept, **sampling)
        assert again[0] == fresh[0] and again[1].accepted == fresh[1].accepted
    assert len(kept.kept) == 1  # every prompt fit the one cache length


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["draft model", "EAGLE"])
def test_graphed_speculation_gives_the_targets_tokens_on_the_gpu(kind: str) -> None:
    cfg = config(position="rope", n_layer=3)
    target = sharpened(Decoder(cfg), 0, 0.3).cuda()
    if kind == "draft model":
        drafter = sharpened(Decoder(config(position="rope", n_layer=1, n_embd=16)), 1, 0.3).cuda()
        run, make = draft_speculative_generate, draft_speculator
    else:
        drafter = sharpened(EagleHead(cfg, EagleConfig.eagle3(3)), 2, 0.3).cuda()
        run, make = eagle_generate, eagle_speculator
    kept = make(target, drafter)
    for prompt in prompts(50):
        tokens, _ = run(target, drafter, prompt, 20, 3, speculator=kept)
        assert tokens == generate(target, [prompt], 20)[0]
    engine, _ = next(iter(kept.kept.values()))
    assert engine.cuda_graph and all(p.graph is not None for p in engine.programs.values())


def test_eos_cuts_the_output_as_generate_does() -> None:
    target = sharpened(Decoder(config(vocab=6)), 0, 0.3)
    small = sharpened(Decoder(config(vocab=6, n_layer=1, n_embd=16)), 1, 0.3)
    prompt = [1, 2, 3]
    reference = generate(target, [prompt], 20)[0]
    eos = reference[5]
    tokens, stats = draft_speculative_generate(target, small, prompt, 20, 3, eos_id=eos)
    assert tokens == generate(target, [prompt], 20, eos_id=eos)[0] == reference[: reference.index(eos) + 1]
    assert stats.tokens == len(tokens)


def test_sampling_with_top_k_1_is_greedy() -> None:
    """The sampled path with one-hot distributions on both sides: Leviathan's rule then keeps a draft exactly
    when it is the target's argmax and replaces it with that argmax."""
    target = sharpened(Decoder(config()), 0, 0.3)
    small = sharpened(Decoder(config(n_layer=1, n_embd=16)), 1, 0.3)
    head = sharpened(EagleHead(config()), 2, 0.3)
    reference = generate(target, [[5, 6, 7]], 20)[0]
    assert draft_speculative_generate(target, small, [5, 6, 7], 20, 3, temperature=0.7, top_k=1, seed=0)[0] == reference
    assert eagle_generate(target, head, [5, 6, 7], 20, 3, temperature=0.7, top_k=1, seed=0)[0] == reference


def test_fused_read_matches_running_the_blocks_by_hand() -> None:
    cfg = config(position="rope", n_layer=4)
    target = sharpened(Decoder(cfg), 0, 0.1)
    head = EagleHead(cfg, EagleConfig(fuse_layers=fusion_layers(4)))
    idx = torch.randint(0, 50, (2, 9))
    features, read = head.read_target(target, idx)
    x, outputs = target.wte(idx), []
    for block in target.blocks:
        x = block(x, target.rope[:, :9])
        outputs.append(x)
    torch.testing.assert_close(features, target.norm(x))
    torch.testing.assert_close(read, torch.cat([outputs[0], outputs[2], outputs[3]], dim=-1))
    assert all(not block._forward_hooks for block in target.blocks)  # the hooks are gone


@pytest.mark.parametrize("fuse", [False, True])
def test_training_time_test_unrolls_as_cached_drafting_runs(fuse: bool) -> None:
    """Step s of the unrolled training pass at anchor a equals draft s of a chain decoded with the head's
    cache from the target's features at 0..a, fed the same tokens."""
    cfg = config(position="rope", n_layer=3)
    target = sharpened(Decoder(cfg), 0, 0.1)
    head = sharpened(EagleHead(cfg, EagleConfig.eagle3(3) if fuse else EagleConfig(ttt_steps=3)), 3, 0.1)
    idx = torch.randint(0, 50, (1, 12))
    with torch.no_grad():
        unrolled, _ = head.unroll(target, idx, 3)
        _, read = head.read_target(target, idx)
        for a in (0, 4, 8):
            cache = head.cache(16, torch.device("cpu"), torch.float32)
            feature = head.step(target, head.from_target(read[:, : a + 1]), idx[:, 1 : a + 2], cache)[:, -1:]
            torch.testing.assert_close(feature[:, 0], unrolled[0][:, a], rtol=1e-5, atol=1e-5)
            for s in (1, 2):
                feature = head.step(target, feature, idx[:, a + s + 1 : a + s + 2], cache)
                torch.testing.assert_close(feature[:, 0], unrolled[s][:, a], rtol=1e-5, atol=1e-5)


def scratch_drafts(target: Decoder, drafter: Decoder | EagleHead, seq: list[int], gamma: int) -> list[int]:
    """Greedy drafts after the settled tokens `seq`, recomputed with fresh caches and nothing carried over."""
    if isinstance(drafter, Decoder):
        return generate(drafter, [seq], gamma)[0]
    idx, m = torch.tensor([seq]), len(seq) - 1
    with torch.no_grad():
        _, read = drafter.read_target(target, idx[:, :m])  # the target has read every settled token but the newest
        cache = drafter.cache(len(seq) + gamma, torch.device("cpu"), torch.float32)
        feature = drafter.step(target, drafter.from_target(read), idx[:, 1:], cache)[:, -1:]
        drafts: list[int] = []
        for _ in range(gamma):
            drafts.append(int(drafter.logits(target, feature)[0, -1, : target.config.vocab_size].argmax()))
            feature = drafter.step(target, feature, torch.tensor([drafts[-1:]]), cache)
    return drafts


@pytest.mark.parametrize("kind", ["draft", "eagle"])
def test_cached_drafts_match_drafting_from_scratch(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every round proposes what a drafter with no cache would: the rollbacks keep exactly the settled entries."""
    cfg = config(vocab=3, position="rope")  # a small vocabulary: drafts often agree, so rounds keep 0..gamma
    target = sharpened(Decoder(cfg), 0, 0.3)
    if kind == "draft":  # the target with noise: mostly the same tokens
        drafter = copy.deepcopy(target)
        torch.manual_seed(1)
        with torch.no_grad():
            for p in drafter.parameters():
                p.add_(0.1 * torch.randn_like(p))
    else:
        drafter = sharpened(EagleHead(cfg), 0, 0.3)
    rounds: list[tuple[list[int], int]] = []

    def recording(target_logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        verdict = greedy_verdict(target_logits, tokens)  # on the CPU the verification pass runs eagerly: this is called
        rounds.append((tokens.tolist(), int(verdict[0])))
        return verdict

    monkeypatch.setattr(speculative_module, "greedy_verdict", recording)
    prompt, gamma = [2, 1, 0, 1, 0], 3
    run = draft_speculative_generate if kind == "draft" else eagle_generate
    out, _ = run(target, drafter, prompt, 40, gamma)
    settled = 1  # new tokens settled before the round: the prefill's first one
    for drafts, accepted in rounds:
        assert drafts == scratch_drafts(target, drafter, prompt + out[:settled], gamma)
        settled += accepted + 1
    assert {accepted for _, accepted in rounds} == set(range(gamma + 1))  # every outcome, each rollback, occurred


def exact_three_tokens(target: Decoder, prompt: list[int], vocab: int) -> dict[tuple[int, ...], float]:
    """The target's probability of each sequence of 3 new tokens, by enumeration."""
    pairs = list(itertools.product(range(vocab), repeat=2))
    with torch.no_grad():
        logits = target(torch.tensor([prompt + list(pair) for pair in pairs]))[:, len(prompt) - 1 :, :vocab]
    probs = sampling_probs(logits, 1.0)  # (V^2, 3, V)
    return {(a, b, c): float(probs[i, 0, a] * probs[i, 1, b] * probs[i, 2, c])
            for i, (a, b) in enumerate(pairs) for c in range(vocab)}


def chi_square_pvalue(samples: list[tuple[int, ...]], exact: dict[tuple[int, ...], float]) -> float:
    n = len(samples)
    counts = dict.fromkeys(exact, 0)
    for s in samples:
        counts[s] += 1
    observed = torch.tensor([counts[s] for s in exact], dtype=torch.float64)
    expected = torch.tensor([exact[s] for s in exact], dtype=torch.float64) * n
    big = expected >= 5  # pool the rare outcomes into one cell, as the chi-square test needs
    observed = torch.cat([observed[big], observed[~big].sum()[None]])
    expected = torch.cat([expected[big], expected[~big].sum()[None]])
    expected *= observed.sum() / expected.sum()
    return float(chisquare(observed.numpy(), expected.numpy()).pvalue)


def always_accept(target: torch.Tensor, draft: torch.Tensor, tokens: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """A broken rule: every draft kept, whatever the target thinks of it."""
    nxt = speculative_module.inverse_cdf(target[-1], u[-1:])
    return torch.cat([torch.tensor([tokens.shape[0]], device=tokens.device), nxt, tokens])


VOCAB, PROMPT = 3, [1, 2]


def sampling_models() -> tuple[DecoderConfig, Decoder]:
    cfg = config(vocab=VOCAB, n_layer=1, n_embd=16, block=16)
    return cfg, sharpened(Decoder(cfg), 0, 0.2)


def test_sampled_draft_model_decoding_keeps_the_targets_distribution(monkeypatch: pytest.MonkeyPatch) -> None:
    """3 new tokens over 3 (27 outcomes): the first from the target, the other two one round of gamma = 2
    drafts; a chi-square test against the exact joint distribution accepts the rule and rejects a broken one."""
    _, target = sampling_models()
    small = sharpened(Decoder(config(vocab=VOCAB, n_layer=1, n_embd=8, block=16)), 5, 0.8)  # keeps about 60%
    exact = exact_three_tokens(target, PROMPT, VOCAB)
    samples, stats = [], SpeculativeStats(2)
    for seed in range(800):
        tokens, one = draft_speculative_generate(target, small, PROMPT, 3, 2, temperature=1.0, seed=seed)
        samples.append(tuple(tokens))
        stats = stats.merge(one)
    assert chi_square_pvalue(samples, exact) > 1e-3
    assert 0 < stats.accepted[0] < stats.proposed[0] and 0 < stats.accepted[1] < stats.proposed[1]
    monkeypatch.setattr(speculative_module, "sampled_verdict", always_accept)
    broken = [tuple(draft_speculative_generate(target, small, PROMPT, 3, 2, temperature=1.0, seed=s)[0])
              for s in range(200)]
    assert chi_square_pvalue(broken, exact) < 1e-6


def test_sampled_eagle_decoding_keeps_the_targets_distribution() -> None:
    cfg, target = sampling_models()
    head = sharpened(EagleHead(cfg, EagleConfig.eagle3(1)), 6, 0.8)
    with torch.no_grad():
        head.norm.weight.mul_(4)  # sharper drafts, which the target rejects often (about 35%)
    exact = exact_three_tokens(target, PROMPT, VOCAB)
    samples, stats = [], SpeculativeStats(2)
    for seed in range(800):
        tokens, one = eagle_generate(target, head, PROMPT, 3, 2, temperature=1.0, seed=seed)
        samples.append(tuple(tokens))
        stats = stats.merge(one)
    assert chi_square_pvalue(samples, exact) > 1e-3
    assert 0 < stats.accepted[0] < stats.proposed[0]


def test_a_draft_equal_to_the_target_yields_gamma_plus_one_tokens_a_round_when_sampling() -> None:
    target = sharpened(Decoder(config()), 0, 0.3)
    for gamma in (2, 5):
        tokens, stats = draft_speculative_generate(target, target, [1, 2, 3], 36, gamma, temperature=1.0, seed=0)
        assert estimate_alpha(stats) == 1.0 and stats.rounds == math.ceil(35 / (gamma + 1))
        assert expected_tokens_per_round(estimate_alpha(stats), gamma) == gamma + 1


def test_leviathan_formulas() -> None:
    for gamma in (1, 3, 7):
        assert expected_tokens_per_round(1.0, gamma) == gamma + 1
        assert expected_tokens_per_round(0.0, gamma) == 1
        for alpha in (0.3, 0.8, 0.999):
            assert expected_tokens_per_round(alpha, gamma) == pytest.approx((1 - alpha ** (gamma + 1)) / (1 - alpha))
            assert expected_speedup(alpha, gamma, 0.0) == pytest.approx(expected_tokens_per_round(alpha, gamma))
        assert expected_speedup(0.0, gamma, 0.1) == pytest.approx(1 / (gamma * 0.1 + 1))  # every draft wasted
    for alpha, c in ((0.3, 0.5), (0.6, 0.05)):  # one draft: (1 + alpha) / (1 + c), a gain exactly when alpha > c
        assert expected_speedup(alpha, 1, c) == pytest.approx((1 + alpha) / (1 + c))
    with pytest.raises(ValueError, match="alpha"):
        expected_tokens_per_round(1.2, 3)


def test_tokens_per_round_match_a_monte_carlo_of_the_acceptance_rule() -> None:
    """Drafts drawn i.i.d. from q at every depth against a target p at every depth: each is kept with
    probability alpha = sum min(p, q), independently, so Eq. 1 holds and `estimate_alpha` recovers alpha."""
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    q = torch.tensor([0.2, 0.1, 0.3, 0.2, 0.2])
    alpha = float(torch.minimum(p, q).sum())
    g = torch.Generator().manual_seed(0)
    for gamma in (1, 4):
        stats, rounds = SpeculativeStats(gamma), 3000
        target, draft = p.expand(gamma + 1, 5), q.expand(gamma, 5)
        yielded = []
        for _ in range(rounds):
            accepted, _ = accept_drafts(target, draft, torch.multinomial(q, gamma, replacement=True, generator=g), g)
            stats.record(accepted)
            yielded.append(accepted + 1)
        mean, std = torch.tensor(yielded, dtype=torch.float64).mean(), torch.tensor(yielded, dtype=torch.float64).std()
        assert abs(float(mean) - expected_tokens_per_round(alpha, gamma)) < 4 * float(std) / math.sqrt(rounds)
        assert estimate_alpha(stats) == pytest.approx(alpha, abs=0.03)


@pytest.mark.parametrize("eagle", [EagleConfig(), EagleConfig(ttt_steps=3), EagleConfig.eagle3(3, ttt_steps=3)],
                         ids=["eagle1", "eagle1-ttt", "eagle3"])
def test_training_lowers_the_heads_loss_raises_acceptance_and_leaves_the_target_alone(eagle: EagleConfig) -> None:
    cfg = config(vocab=32, position="rope", n_layer=3, block=48)
    target = sharpened(Decoder(cfg), 0, 0.2)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    # the target's own samples: the text the head will draft
    data = torch.tensor(generate(target, [[i % 32] for i in range(16)], 24, temperature=1.0, seed=0))
    torch.manual_seed(1)
    head = EagleHead(cfg, eagle)

    def tokens_per_round() -> float:
        stats = SpeculativeStats(3)
        for p in range(6):
            stats = stats.merge(eagle_generate(target, head.eval(), [p, p + 1], 30, 3)[1])
        head.train()
        return stats.tokens_per_round()

    untrained = tokens_per_round()
    optimizer = torch.optim.AdamW(head.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = head.loss(target, data)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0]  # the token loss's floor is the target's entropy, not 0
    assert untrained < 1.2 and tokens_per_round() > 1.7  # drafts the target now accepts
    assert all(p.grad is None for p in target.parameters())
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_bad_settings_are_refused() -> None:
    target = Decoder(config())
    with pytest.raises(ValueError, match="gamma"):
        draft_speculative_generate(target, target, [1, 2], 4, 0)
    with pytest.raises(ValueError, match="vocabulary"):
        draft_speculative_generate(target, Decoder(config(vocab=40)), [1, 2], 4, 2)
    with pytest.raises(ValueError, match="draft's block_size 16"):
        draft_speculative_generate(target, Decoder(config(block=16)), [1] * 10, 6, 2)
    with pytest.raises(ValueError, match="target's block_size 96"):
        eagle_generate(target, EagleHead(config()), [1] * 90, 6, 2)
    with pytest.raises(ValueError, match="non-empty prompt"):
        eagle_generate(target, EagleHead(config()), [], 6, 2)
    with pytest.raises(ValueError, match="width"):
        eagle_generate(target, EagleHead(config(n_embd=16)), [1, 2], 6, 2)
    with pytest.raises(ValueError, match="fuse_layers"):
        EagleHead(config(), EagleConfig(fuse_layers=(0, 2)))
    with pytest.raises(ValueError, match="ttt_steps"):
        EagleConfig(ttt_steps=0)
    with pytest.raises(ValueError, match="unrolled steps"):
        EagleHead(config(), EagleConfig(ttt_steps=4)).loss(target, torch.zeros(2, 4, dtype=torch.long))


def test_inverse_cdf_draws_in_proportion_to_the_weights_and_never_a_zero_weight() -> None:
    weights = torch.tensor([0.0, 2.0, 0.0, 1.0, 5.0, 0.0])  # any positive scale; zeros at both ends and inside
    u = torch.rand(20_000, generator=torch.Generator().manual_seed(0))
    draws = torch.cat([speculative_module.inverse_cdf(weights, x[None]) for x in u])
    counts = torch.bincount(draws, minlength=6).double()
    assert counts[[0, 2, 5]].sum() == 0
    expected = weights[[1, 3, 4]] / weights.sum() * len(u)
    assert chisquare(counts[[1, 3, 4]].numpy(), expected.double().numpy()).pvalue > 1e-3
    assert int(speculative_module.inverse_cdf(weights, torch.tensor([0.0]))) == 1  # u = 0: the first positive weight
    assert int(speculative_module.inverse_cdf(weights, torch.tensor([1.0]))) == 4  # u * total rounded up: the last
