"""Multi-token prediction heads, the MTP module, and speculative decoding's exactness."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import chisquare

from modules.decoding.generation import generate, sampling_probs
from modules.training.mtp import MTPModule, MTPSettings
from modules.nn import Decoder, DecoderConfig
from modules.nn.mtp import MTPHeads
from modules.training.pretrain import OptimConfig
from modules.decoding.speculative import SpeculativeStats, accept_drafts, mtp_speculator, self_speculative_generate


def tiny(vocab: int = 50, position: str = "learned", block: int = 96) -> DecoderConfig:
    return DecoderConfig(vocab_size=vocab, block_size=block, n_layer=2, n_head=2, n_embd=32, position=position)


def sharpened(config: DecoderConfig, depth: int, kind: str, seed: int = 0, std: float = 0.3) -> tuple[Decoder, MTPHeads]:
    """A decoder and heads with large random weights: peaked distributions that differ from each other."""
    torch.manual_seed(seed)
    decoder, heads = Decoder(config).eval(), MTPHeads(config, depth, kind).eval()
    for p in [*decoder.parameters(), *heads.parameters()]:
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=std)
    return decoder, heads


@pytest.mark.parametrize("kind", ["sequential", "parallel"])
def test_head_losses_match_a_position_by_position_reference(kind: str) -> None:
    """Depth k at i reads (h_i, token i+k) and predicts token i+k+1; recomputed one position at a
    time from the prefix alone (so also causal)."""
    config = tiny(position="rope")
    decoder, heads = sharpened(config, 2, kind, std=0.1)
    tokens = torch.randint(0, config.vocab_size, (2, 13))
    T = tokens.shape[1] - 1
    hidden = decoder.hidden(tokens[:, :T])
    losses = heads.losses(decoder, hidden, tokens)
    previous = hidden
    for k in (1, 2):
        nll, states = [], []
        for i in range(T - k):
            if kind == "sequential":
                h = heads.norm_hidden[k - 1](previous[:, : i + 1])
                e = heads.norm_embed[k - 1](decoder.wte(tokens[:, k : k + i + 1]))
                x = heads.proj[k - 1](torch.cat([h, e], -1))
            else:
                x = hidden[:, : i + 1]
            out = heads.blocks[k - 1](x, decoder.rope[:, : i + 1])[:, -1]
            states.append(out)
            logits = decoder.lm_head(heads.norms[k - 1](out))
            nll.append(F.cross_entropy(logits, tokens[:, i + k + 1], reduction="none"))
        previous = torch.stack(states, 1)
        torch.testing.assert_close(losses[k - 1], torch.stack(nll).mean(), rtol=1e-5, atol=1e-5)


def test_heads_step_with_a_cache_matches_the_full_pass() -> None:
    config = tiny(position="rope")
    decoder, heads = sharpened(config, 1, "sequential", std=0.1)
    tokens = torch.randint(0, config.vocab_size, (1, 11))
    hidden = decoder.hidden(tokens[:, :10])
    full = heads.blocks[0](heads._input(decoder, 1, hidden[:, :9], tokens[:, 1:10]), decoder.rope[:, :9])
    cache = heads.caches(1, 16, torch.device("cpu"), torch.float32)[0]
    chunks = [heads.step(decoder, 1, hidden[:, a:b], tokens[:, a + 1 : b + 1], cache) for a, b in ((0, 4), (4, 5), (5, 9))]
    torch.testing.assert_close(torch.cat(chunks, 1), full, rtol=1e-5, atol=1e-5)
    cache.truncate(5)  # a rejected draft: positions 5.. are recomputed and agree again
    again = heads.step(decoder, 1, hidden[:, 5:9], tokens[:, 6:10], cache)
    torch.testing.assert_close(again, full[:, 5:9], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("position", ["learned", "rope"])
@pytest.mark.parametrize("kind", ["sequential", "parallel"])
def test_greedy_self_speculative_decoding_gives_the_decoders_own_tokens(kind: str, position: str) -> None:
    decoder, heads = sharpened(tiny(position=position), 3, kind)
    for depth in (1, 2, 3):
        for seed in range(3):
            prompt = torch.randint(0, 50, (5 + seed,), generator=torch.Generator().manual_seed(seed)).tolist()
            tokens, stats = self_speculative_generate(decoder, heads, prompt, 30, depth=depth)
            assert tokens == generate(decoder, [prompt], 30)[0]
            assert stats.tokens == 30 and stats.rounds >= 29 / (depth + 1)


def test_a_kept_speculator_gives_what_fresh_ones_give() -> None:
    decoder, heads = sharpened(tiny(position="rope"), 3, "sequential")
    kept = mtp_speculator(decoder, heads, 2)
    for seed in range(3):
        prompt = torch.randint(0, 50, (5 + 2 * seed,), generator=torch.Generator().manual_seed(seed)).tolist()
        for sampling in ({}, dict(temperature=1.0, seed=seed)):
            fresh = self_speculative_generate(decoder, heads, prompt, 24, depth=2, **sampling)
            again = self_speculative_generate(decoder, heads, prompt, 24, depth=2, speculator=kept, **sampling)
            assert again[0] == fresh[0] and again[1].accepted == fresh[1].accepted


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["sequential", "parallel"])
def test_graphed_self_speculation_gives_the_decoders_own_tokens_on_the_gpu(kind: str) -> None:
    """On CUDA the target's verification and each head's pass are captured programs, replayed every round."""
    decoder, heads = sharpened(tiny(position="rope"), 2, kind)
    decoder, heads = decoder.cuda(), heads.cuda()
    kept = mtp_speculator(decoder, heads, 2)
    for seed in range(3):
        prompt = torch.randint(0, 50, (5 + seed,), generator=torch.Generator().manual_seed(seed)).tolist()
        tokens, _ = self_speculative_generate(decoder, heads, prompt, 30, depth=2, speculator=kept)
        assert tokens == generate(decoder, [prompt], 30)[0]
    engine, drafter = next(iter(kept.kept.values()))
    assert engine.cuda_graph and all(p.graph is not None for p in [*engine.programs.values(), *drafter.passes.programs.values()])


def _reference_drafts(decoder: Decoder, heads: MTPHeads, prompt: list[int], new: int, depth: int) -> list[list[int]]:
    """Greedy self-speculative decoding with no cache anywhere: every pass recomputes from scratch."""
    seq, rounds = list(prompt), []
    seq.append(int(decoder(torch.tensor([seq]))[0, -1].argmax()))
    while len(seq) - len(prompt) < new:
        m = len(seq) - 1  # the newest token's index
        hidden = decoder.hidden(torch.tensor([seq[:m]]))
        drafts, previous, extended = [], hidden, list(seq)
        for k in range(1, depth + 1):
            base = previous if heads.kind == "sequential" else hidden
            x = heads._input(decoder, k, base, torch.tensor([extended[k : m + k]]))
            rope = None if decoder.rope is None else decoder.rope[:, :m]
            previous = heads.blocks[k - 1](x, rope)
            drafts.append(int(heads.logits(decoder, k, previous[:, -1]).argmax()))
            extended.append(drafts[-1])
        rounds.append(drafts)
        best = decoder(torch.tensor([extended]))[0, m:].argmax(-1).tolist()  # the decoder at m .. m + depth
        accepted = next((i for i in range(depth) if drafts[i] != best[i]), depth)
        seq += drafts[:accepted] + [best[accepted]]
    return rounds


@pytest.mark.parametrize("kind", ["sequential", "parallel"])
def test_cached_drafts_match_drafting_without_a_cache(kind: str) -> None:
    """The heads' caches keep exactly the positions whose inputs are settled: every round drafts the
    same tokens as recomputing everything."""
    decoder, heads = sharpened(tiny(vocab=5), 2, kind, std=0.15)  # a small vocabulary: drafts often agree
    prompt = [3, 1, 4, 1, 0, 2, 2, 3]
    seen: list[int] = []
    original = heads.logits
    heads.logits = lambda d, k, h: (lambda out: (seen.append(int(out.argmax())), out)[1])(original(d, k, h))  # type: ignore[method-assign]
    _, stats = self_speculative_generate(decoder, heads, prompt, 40, depth=2)
    heads.logits = original  # type: ignore[method-assign]
    reference = _reference_drafts(decoder, heads, prompt, 40, 2)
    assert [seen[i : i + 2] for i in range(0, len(seen), 2)] == reference
    assert 0 < sum(stats.accepted) < sum(stats.proposed)  # both outcomes were exercised


def test_leviathan_rule_keeps_the_target_distribution() -> None:
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    q = torch.tensor([0.1, 0.1, 0.2, 0.3, 0.3])
    g = torch.Generator().manual_seed(0)
    n, out, kept = 20_000, [], 0
    for _ in range(n):
        draft = torch.multinomial(q, 1, generator=g)
        accepted, nxt = accept_drafts(torch.stack([p, p]), q[None], draft, g)
        out.append(int(draft) if accepted else nxt)
        kept += accepted
    counts = torch.bincount(torch.tensor(out), minlength=5).double()
    assert chisquare(counts.numpy(), (p * n).double().numpy()).pvalue > 1e-3
    assert abs(kept / n - float(torch.minimum(p, q).sum())) < 0.015  # Leviathan et al.: alpha = sum min(p, q)
    # the test has power: the drafts themselves, accepted blindly, fail it
    blind = torch.bincount(torch.multinomial(q, n, replacement=True, generator=g), minlength=5).double()
    assert chisquare(blind.numpy(), (p * n).double().numpy()).pvalue < 1e-6


def test_greedy_rule_keeps_the_agreeing_prefix() -> None:
    target = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 1.0], [0.0, 0.0, 9.0]])
    assert accept_drafts(target, None, torch.tensor([1, 0])) == (2, 2)
    assert accept_drafts(target, None, torch.tensor([1, 2])) == (1, 0)
    assert accept_drafts(target, None, torch.tensor([0, 0])) == (0, 1)


def test_sampled_self_speculative_decoding_keeps_the_decoders_distribution() -> None:
    """Three new tokens over a 3-token vocabulary (27 outcomes; the last two from one round of two
    drafts) against the exact joint distribution."""
    config = DecoderConfig(vocab_size=3, block_size=16, n_layer=1, n_head=2, n_embd=16)
    decoder, heads = sharpened(config, 2, "sequential", std=0.5)
    prompt = [1, 2]
    with torch.no_grad():
        exact = {}
        for seq in itertools.product(range(3), repeat=3):
            logits = decoder(torch.tensor([prompt + list(seq[:2])]))[0, len(prompt) - 1 :, :3]
            probs = sampling_probs(logits, 1.0)
            exact[seq] = float(probs[0, seq[0]] * probs[1, seq[1]] * probs[2, seq[2]])
    n, counts, stats = 900, dict.fromkeys(exact, 0), SpeculativeStats(2)
    for seed in range(n):
        tokens, one = self_speculative_generate(decoder, heads, prompt, 3, temperature=1.0, seed=seed)
        counts[tuple(tokens)] += 1
        stats = stats.merge(one)
    observed = torch.tensor([counts[s] for s in exact], dtype=torch.float64)
    expected = torch.tensor([exact[s] for s in exact], dtype=torch.float64) * n
    big = expected >= 5  # pool the rare outcomes into one cell, as the chi-square test needs
    observed = torch.cat([observed[big], observed[~big].sum()[None]])
    expected = torch.cat([expected[big], expected[~big].sum()[None]])
    expected *= observed.sum() / expected.sum()
    assert chisquare(observed.numpy(), expected.numpy()).pvalue > 1e-3
    assert 0 < stats.accepted[0] < stats.proposed[0]  # drafts were both kept and replaced


def test_stats_count_each_depth_only_when_reached() -> None:
    stats = SpeculativeStats(3)
    for accepted in (0, 1, 3, 2):
        stats.record(accepted)
    assert stats.proposed == [4, 3, 2] and stats.accepted == [3, 2, 1]
    assert stats.acceptance() == [0.75, 2 / 3, 0.5]


def test_bad_depths_and_settings_are_refused() -> None:
    decoder, heads = sharpened(tiny(), 2, "sequential")
    with pytest.raises(ValueError, match="between 1 and the model's 2"):
        self_speculative_generate(decoder, heads, [1, 2], 4, depth=3)
    with pytest.raises(ValueError, match="exceed the target's block_size"):
        self_speculative_generate(decoder, heads, [1] * 90, 10)
    with pytest.raises(ValueError, match="kind"):
        MTPHeads(tiny(), 1, "tree")
    with pytest.raises(ValueError, match="names must differ"):
        MTPSettings(arms=[{"name": "a"}, {"name": "a", "depth": 1}])


def test_lambda_steps_down_at_the_switch() -> None:
    settings = MTPSettings(lambdas=[0.3, 0.1], switch_at=0.5)
    assert [settings.weight(s, 10) for s in (0, 4, 5, 9)] == [0.3, 0.3, 0.1, 0.1]


def test_arms_start_equal_and_mtp_training_lowers_every_loss() -> None:
    import lightning as L

    config = tiny(vocab=40, block=16)
    settings = MTPSettings(arms=[{"name": "ntp"}, {"name": "d2", "depth": 2}, {"name": "par", "depth": 1, "kind": "parallel"}])
    torch.manual_seed(0)
    module = MTPModule(config, OptimConfig(lr=1e-2, warmup_steps=1), settings, max_steps=30)
    first = module.decoder("ntp").state_dict()
    assert all(torch.equal(first[k], v) for k, v in module.decoder("d2").state_dict().items())
    batch = torch.randint(0, 40, (8, 17))
    before = {a.name: module.arm_losses(a, batch) for a in module.arms}
    trainer = L.Trainer(max_steps=30, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, accelerator="cpu")
    trainer.fit(module, torch.utils.data.DataLoader([b for b in batch.repeat(30, 1)], batch_size=8))
    for arm in module.arms:
        main, heads = module.arm_losses(arm, batch)
        assert main < before[arm.name][0] - 0.5
        assert all(h < h0 - 0.3 for h, h0 in zip(heads, before[arm.name][1]))
        assert len(heads) == arm.depth
    assert module.arm_seconds["d2"] > 0 and len(module.loss_curves()["d2"]["train/loss"]) == 30


def test_decode_settings_that_overflow_the_context_are_refused() -> None:
    from repro.techniques.mtp import DecodeConfig, MTPConfig

    with pytest.raises(ValueError, match="leave no room for drafts"):
        MTPConfig(model=DecoderConfig(block_size=64), decode=DecodeConfig(prompt_tokens=32, new_tokens=64))
