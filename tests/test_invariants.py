"""Invariants: states a test can set up for which theory gives an exact number, per technique.

`INVARIANTS` maps every registered technique to its checks; a technique registered without any
fails `test_every_technique_states_its_invariants`. Later techniques add theirs here (a KL of a
policy against itself is zero, an advantage of a constant reward is zero, a router that splits
tokens evenly has a MaxVio of zero, ...).
"""

from __future__ import annotations

import math
from typing import Callable

import pytest
import torch

from modules.nn import Decoder, DecoderConfig
from modules.nn.decoder import IGNORE
from modules.training.pretrain import OptimConfig, PretrainModule, warmup_cosine
from modules.training.sft import LoraSettings, SFTModule, SFTOptimConfig
from repro.registry import techniques


def small_config(**overrides) -> DecoderConfig:
    return DecoderConfig(**{"vocab_size": 300, "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 32, **overrides})


def pretrain_uniform_model_loss_is_log_vocab() -> None:
    """With the token table (tied to the LM head) zeroed, every logit is 0: the loss is ln(V) exactly,
    V the padded vocabulary, whose extra rows take part in the training softmax as in nanoGPT."""
    torch.manual_seed(0)
    for pad in (1, 64):
        model = Decoder(small_config(pad_vocab_to=pad)).double()
        with torch.no_grad():
            model.wte.weight.zero_()
        idx = torch.randint(0, 300, (3, 16))
        targets = torch.randint(0, 300, (3, 16))
        loss = model.loss(idx, targets).item()
        assert loss == pytest.approx(math.log(model.config.padded_vocab_size), rel=1e-6), pad  # the loss is taken in fp32


def pretrain_initial_loss_is_near_log_vocab() -> None:
    """GPT-2 initialisation (std 0.02) gives logits of spread about 0.02 * sqrt(n_embd) after the final
    norm: the first loss sits just above ln(V), by about half the logits' variance."""
    torch.manual_seed(0)
    model = Decoder(small_config(n_embd=64))
    idx, targets = torch.randint(0, 300, (8, 16)), torch.randint(0, 300, (8, 16))
    with torch.no_grad():
        logits = model(idx)
        spread = logits.float().var(-1).mean().item()
        loss = model.loss(idx, targets).item()
    assert loss == pytest.approx(math.log(300) + spread / 2, abs=0.02)


def pretrain_schedule_hits_its_formula() -> None:
    """Warmup reaches 1 at its last step; cosine is (1 + min) / 2 half way and `min` at max_steps."""
    assert warmup_cosine(0, 10, 110, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 110, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(60, 10, 110, 0.1) == pytest.approx(0.55)
    assert warmup_cosine(110, 10, 110, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(500, 10, 110, 0.1) == pytest.approx(0.1)


def pretrain_validation_perplexity_is_exp_loss() -> None:
    """val/loss is the token-weighted mean over batches of unequal size, and val/ppl its exponential."""
    module = PretrainModule(small_config(), OptimConfig(), max_steps=1)
    logged: dict[str, torch.Tensor] = {}
    module.log_dict = lambda values, **_: logged.update(values)
    torch.manual_seed(0)
    batches = [torch.randint(0, 300, (b, 17)) for b in (3, 1, 2)]
    with torch.no_grad():
        for i, batch in enumerate(batches):
            module.validation_step(batch, i)
        module.on_validation_epoch_end()
        whole = torch.cat([module.model.loss(b[:, :-1], b[:, 1:]).repeat(b.shape[0]) for b in batches]).mean()
    assert logged["val/loss"].item() == pytest.approx(whole.item(), rel=1e-6)
    assert logged["val/ppl"].item() == pytest.approx(math.exp(logged["val/loss"].item()), rel=1e-6)


def sft_module() -> tuple[SFTModule, Decoder]:
    torch.manual_seed(0)
    base = Decoder(small_config())
    module = SFTModule(small_config(vocab_size=304), SFTOptimConfig(), max_steps=1, lora=LoraSettings(r=4))
    module.init_from_base(base, {300: [1, 2], 301: [3], 302: [4, 5, 6], 303: [0]})
    return module, base


def sft_arms_start_equal_to_the_base() -> None:
    """LoRA's B starts at zero and both arms copy the base: at step 0 every arm's logits are the base's
    on the base's tokens, exactly."""
    module, base = sft_module()
    idx = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        expected = base.eval()(idx)[..., :300]
        for model in module.arms.values():
            assert torch.equal(model.eval()(idx)[..., :300], expected)


def sft_new_token_rows_are_the_mean_of_their_sources() -> None:
    module, base = sft_module()
    table, old = module.model.wte.weight, base.wte.weight
    assert torch.equal(table[:300], old[:300]) and torch.equal(module.model.lm_head.weight, table)
    torch.testing.assert_close(table[302], old[[4, 5, 6]].mean(0), rtol=0, atol=0)


def sft_loss_counts_only_supervised_tokens() -> None:
    """With one supervised label in a batch, the loss is -log p of that one token (float64 reference)."""
    module, _ = sft_module()
    ids = torch.randint(0, 304, (2, 9))
    labels = torch.full_like(ids, IGNORE)
    labels[1, 5] = ids[1, 5]
    with torch.no_grad():
        loss = module.model.loss(ids[:, :-1], labels[:, 1:]).item()
        logits = module.model.double()(ids[:, :-1])
    assert loss == pytest.approx(-logits[1, 4].log_softmax(-1)[ids[1, 5]].item(), rel=1e-5)


def sft_lora_arm_moves_only_adapters_and_new_token_rows() -> None:
    """One LoRA step changes the adapters and the new tokens' rows of the tied table, and no other weight."""
    torch.manual_seed(0)
    base = Decoder(small_config())
    module = SFTModule(small_config(vocab_size=304), SFTOptimConfig(lora_lr=1e-2, warmup_steps=0), max_steps=10,
                       lora=LoraSettings(r=4), new_tokens=[300, 301, 302, 303])
    module.init_from_base(base, {300: [1], 301: [2], 302: [3], 303: [0]})
    before = {k: v.clone() for k, v in module.lora_model.state_dict().items()}
    optimizers, _ = module.configure_optimizers()
    ids = torch.randint(0, 304, (4, 12))
    loss = module.lora_model.loss(ids[:, :-1], ids[:, 1:])
    loss.backward()
    optimizers[1].step()
    after = module.lora_model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all("lora_" in k or k in ("wte.weight", "lm_head.weight") for k in moved)
    table_moved = (before["wte.weight"] != after["wte.weight"]).any(-1).nonzero().flatten().tolist()
    assert table_moved == [300, 301, 302, 303]
    assert module.trained_params("lora") == sum(p.numel() for n, p in module.lora_model.named_parameters() if "lora_" in n) + 4 * 32


def reward_equal_scores_cost_ln2() -> None:
    """Bradley-Terry with r_chosen = r_rejected is -log sigmoid(0) = ln 2, whatever the scores."""
    from modules.training.reward import bradley_terry_loss

    scores = torch.randn(7, dtype=torch.float64)
    assert bradley_terry_loss(scores, scores).item() == pytest.approx(math.log(2))


def reward_trunk_starts_as_the_base_and_reads_the_last_token() -> None:
    """After `init_from_base` the trunk is the base; a row's reward depends only on tokens up to `last`."""
    from modules.training.reward import RewardModule

    torch.manual_seed(0)
    base = Decoder(small_config())
    module = RewardModule(small_config(), OptimConfig(), max_steps=1)
    module.init_from_base(base)
    ids = torch.randint(0, 300, (2, 10))
    torch.testing.assert_close(module.model.trunk(ids), base(ids))
    changed = ids.clone()
    changed[:, 6:] = 7  # after `last`
    last = torch.tensor([5, 5])
    torch.testing.assert_close(module.model(ids, last), module.model(changed, last))


def rlhf_policy_starts_at_zero_kl_from_its_reference() -> None:
    """Before any update the policy is the reference: the sampled KL of every rollout is exactly 0."""
    from modules.training.ppo import PPOConfig, PPOModule

    torch.manual_seed(0)
    module = PPOModule(small_config(), PPOConfig(reward="true", response_tokens=5), max_steps=1)
    module.init_from(Decoder(small_config()), None)
    rollout = module.rollout(torch.randint(1, 300, (4, 3)), seed=0)
    assert ((rollout["logp"] - rollout["ref_logp"]) * rollout["mask"]).abs().max().item() == 0.0


def rlhf_perfect_values_leave_no_advantage() -> None:
    """A constant final reward with values equal to it gives zero advantage everywhere (gamma = lambda = 1)."""
    from modules.training.ppo import gae

    rewards = torch.zeros(3, 5)
    rewards[:, -1] = 0.7
    advantages, returns = gae(rewards, torch.full((3, 5), 0.7), torch.ones(3, 5), 1.0, 1.0)
    assert advantages.abs().max().item() < 1e-7
    torch.testing.assert_close(returns, torch.full((3, 5), 0.7))


def dpo_policy_equal_to_reference_costs_ln2() -> None:
    """At the start every arm is the reference: DPO's loss is ln 2 and every implicit reward is 0, whatever the pair."""
    from modules.training.dpo import DPOModule, DPOSettings

    torch.manual_seed(0)
    base = Decoder(small_config())
    arms = [{"name": "dpo", "loss": "dpo", "beta": 0.3}, {"name": "lora", "loss": "dpo", "beta": 0.3, "lora": True}]
    module = DPOModule(small_config(), DPOSettings(arms=arms), max_steps=1)
    module.init_from(base)
    ids = torch.randint(1, 300, (4, 9))
    batch = {"ids": ids, "last": torch.tensor([8, 6, 8, 7]), "prompt_len": torch.tensor([3, 3, 3, 3])}
    from modules.training.dpo import reference_logps

    batch["ref_logps"] = reference_logps(base, [batch])
    for arm in module.arms:
        loss, stats = module._arm_terms(arm, batch)
        assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
        assert stats["margin"].abs().item() < 1e-5


def dpo_ipo_is_zero_at_its_target_margin() -> None:
    """IPO's loss vanishes exactly when the log-ratio margin equals 1 / (2 beta)."""
    from modules.training.dpo import ipo_loss

    beta = 0.25
    loss = ipo_loss(torch.tensor([2.0], dtype=torch.float64), torch.tensor([0.0], dtype=torch.float64),
                    torch.tensor([0.0], dtype=torch.float64), torch.tensor([0.0], dtype=torch.float64), beta)
    assert loss.item() == 0.0


def mtp_uniform_heads_cost_log_vocab() -> None:
    """With the shared token table (and so the output head) zeroed, every head's logits are 0: each
    depth's loss is ln(V) exactly, V the padded vocabulary."""
    from modules.nn.mtp import MTPHeads

    torch.manual_seed(0)
    for kind in ("sequential", "parallel"):
        config = small_config()
        decoder, heads = Decoder(config), MTPHeads(config, 2, kind)
        with torch.no_grad():
            decoder.wte.weight.zero_()
        tokens = torch.randint(0, 300, (3, 17))
        losses = heads.losses(decoder, decoder.hidden(tokens[:, :16]), tokens)
        assert [round(x.item(), 5) for x in losses] == [round(math.log(config.padded_vocab_size), 5)] * 2, kind


def mtp_zero_weight_leaves_the_decoder_as_next_token_training() -> None:
    """At lambda 0 the heads add nothing to the decoder's gradient: after a step, an MTP arm's decoder
    equals the next-token arm's (same start, same batch, same optimizer)."""
    import lightning as L

    from modules.training.mtp import MTPModule, MTPSettings

    torch.manual_seed(0)
    settings = MTPSettings(arms=[{"name": "ntp"}, {"name": "mtp", "depth": 2}], lambdas=[0.0])
    module = MTPModule(small_config(), OptimConfig(lr=1e-2, warmup_steps=1), settings, max_steps=2)
    start = module.decoder("ntp").wte.weight.detach().clone()
    batch = torch.randint(0, 300, (4, 17))
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, accelerator="cpu")
    trainer.fit(module, torch.utils.data.DataLoader([b for b in batch.repeat(2, 1)], batch_size=4))
    ntp, mtp = module.decoder("ntp").state_dict(), module.decoder("mtp").state_dict()
    # Adam turns float noise in a gradient that is 0 analytically (the key bias) into steps of
    # up to 1e-5; a real difference moves weights by about the learning rate, 1e-2
    assert max((ntp[k] - mtp[k]).abs().max().item() for k in ntp) < 1e-4
    assert (ntp["wte.weight"] - start).abs().max().item() > 1e-3


def moe_even_split_has_no_violation_and_aux_loss_alpha() -> None:
    """A router that splits tokens evenly over the experts has MaxVio 0, and both balance losses equal
    their alpha there (f_i = 1 and P_i = 1 / E for every expert); a lopsided split costs more."""
    from modules.nn.moe import MoE, max_violation

    assert max_violation(torch.full((3, 8), 5.0)).abs().max().item() == 0
    for balance in ("aux", "loss_free_seq"):
        config = small_config(mlp="swiglu", moe_experts=4, moe_top_k=2, moe_balance=balance, moe_aux_alpha=0.01, moe_seq_alpha=0.01)
        moe = MoE(config)
        affinity = torch.full((32, 4), 0.5)
        even = torch.stack([torch.arange(32) % 4, (torch.arange(32) + 1) % 4], -1)  # every expert takes 16 of 64 slots
        assert moe._balancing_loss(affinity, even, 2, 16).item() == pytest.approx(0.01, rel=1e-6), balance
        lopsided = torch.tensor([[0, 1]] * 32)
        skewed = torch.tensor([[0.9, 0.9, 0.1, 0.1]] * 32)
        assert moe._balancing_loss(skewed, lopsided, 2, 16).item() > 0.01, balance


def hybrid_forgetful_ssm_reduces_to_its_per_token_formula() -> None:
    """With A -> -inf every state decays to 0 in one step and with a 1-wide conv nothing mixes tokens:
    Mamba's output at t is then out(silu(z_t) * (Delta_t (B_t . C_t) x_t + D x_t)), x_t = silu(conv(x_t)),
    computed here by hand in float64."""
    import torch.nn.functional as F

    from modules.nn.mamba import MambaMixer

    torch.manual_seed(0)
    m = MambaMixer(8, d_state=4, d_conv=1, expand=2).double()
    with torch.no_grad():
        m.A_log.fill_(50.0)  # A = -e^50: exp(Delta A) underflows to 0 for any Delta > 0
    u = torch.randn(2, 6, 8, dtype=torch.float64)
    x, z = m.in_proj(u).chunk(2, dim=-1)
    x = F.silu(x * m.conv.weight[:, 0, 0] + m.conv.bias)
    dt, Bm, Cm = m.x_proj(x).split([m.dt_rank, 4, 4], dim=-1)
    delta = F.softplus(m.dt_proj(dt))
    y = delta * (Bm * Cm).sum(-1, keepdim=True) * x + m.D * x
    torch.testing.assert_close(m(u), m.out_proj(y * F.silu(z)))


def hybrid_arms_start_at_equal_size_and_log_vocab() -> None:
    """The tiny preset's arms hold parameter counts within its tolerance, and each untrained arm's loss
    is near ln(V) (GPT-2 initialisation keeps the logits near 0 whatever the mixers)."""
    from modules.training.hybrid import HybridModule, HybridSettings, check_equal_params
    from repro.config import load_preset

    preset = load_preset("hybrid", "tiny")
    config = DecoderConfig(**{**preset["model"], "vocab_size": 300})
    counts = check_equal_params(config, HybridSettings(**preset["hybrid"]))
    assert max(counts.values()) / min(counts.values()) < 1.05
    module = HybridModule({**preset["model"], "vocab_size": 300, "n_layer": 8}, {}, preset["hybrid"], 10)
    batch = torch.randint(0, 300, (2, 33))
    for arm in module.arms:
        with torch.no_grad():
            loss = module.decoder(arm.name).loss(batch[:, :-1], batch[:, 1:]).item()
        assert abs(loss - math.log(300)) < 0.1, (arm.name, loss)


def memory_zero_bytes_follow_the_paper() -> None:
    """ZeRO (Rajbhandari et al. 2020, Sec. 5.1) with K = 12: 16 bytes per parameter unsharded; stage 1
    4 + 12/N, stage 2 2 + 14/N, stage 3 16/N; on one device every stage keeps all 16."""
    from measurement.memory import zero_bytes_per_param

    for n in (1, 8, 64):
        assert zero_bytes_per_param("ddp", n) == 16
        assert zero_bytes_per_param("deepspeed_stage_1", n) == pytest.approx(4 + 12 / n)
        assert zero_bytes_per_param("deepspeed_stage_2", n) == pytest.approx(2 + 14 / n)
        assert zero_bytes_per_param("deepspeed_stage_3", n) == pytest.approx(16 / n)
        assert zero_bytes_per_param("fsdp2", n) == zero_bytes_per_param("deepspeed_stage_3", n)


def architectures_kv_cache_shrinks_with_the_kv_heads() -> None:
    """Keys and values of every layer in bf16: 2 x 2 bytes x n_layer x n_kv_head x head_dim per token, so
    the tiny preset's GQA (2 of 4 heads) halves the multi-head cache and MQA quarters it; MLA caches
    d_c + d_R = 4.5 head widths per layer (DeepSeek-V2: as much as GQA with 2.25 groups)."""
    from modules.training.architectures import ArchitectureSettings
    from modules.training.arms import ConfigArm
    from modules.nn.cache import cache_bytes
    from repro.config import load_preset

    preset = load_preset("architectures", "tiny")
    base = DecoderConfig(**{**preset["model"], "vocab_size": 300})

    configs = {a["name"]: ConfigArm(**a).config(base) for a in ArchitectureSettings().arms}
    for name, c in configs.items():
        values = c.kv_rank + c.rope_dim if c.attention == "mla" else 2 * c.kv_heads * c.head_dim
        assert cache_bytes(c, 1, 1, torch.bfloat16) == 2 * c.n_layer * values, name
    assert cache_bytes(configs["+rope"], 1, 1) == 2 * cache_bytes(configs["+gqa"], 1, 1) == 4 * cache_bytes(configs["+mqa"], 1, 1)
    assert cache_bytes(configs["+mla"], 1, 1) * 2 / 4.5 == cache_bytes(configs["+mqa"], 1, 1)  # MLA: GQA with 2.25 groups


def architectures_arms_start_at_log_vocab() -> None:
    """Every arm of the default ablation, untrained, costs about ln(V): the knobs do not change the initial logits' scale."""
    from modules.training.architectures import ArchitecturesModule
    from repro.config import load_preset

    preset = load_preset("architectures", "tiny")
    module = ArchitecturesModule({**preset["model"], "vocab_size": 300}, {}, {}, 10)
    batch = torch.randint(0, 300, (8, 65), generator=torch.Generator().manual_seed(0))
    for arm in module.arms:
        with torch.no_grad():
            loss = module.decoder(arm.name).loss(batch[:, :-1], batch[:, 1:]).item()
        assert abs(loss - math.log(300)) < 0.1, (arm.name, loss)


def dualpipe_schedules_meet_table2_at_the_reports_setting() -> None:
    """PP 8, 20 micro-batches, F=1, B=2, W=1: 1F1B idles 7 x 3 = 21, ZB1P 7 x 1 = 7, DualPipe (4-1)(3+2-3) = 6."""
    from modules.parallel.pipeline.schedules import Timing, build

    bubbles = {m: max(build(m, 8, 20, Timing(1.0, 2.0, 1.0)).bubbles()) for m in ("1F1B", "ZB1P", "DualPipe")}
    assert bubbles == {"1F1B": 21, "ZB1P": 7, "DualPipe": 6}


def data_arms_start_equal_and_read_their_own_corpus() -> None:
    """Every arm starts from the same weights; each arm's loss reads its own corpus's rows of a zipped batch."""
    from modules.training.corpus_arms import CorpusArmsModule

    module = CorpusArmsModule({"vocab_size": 64, "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 16}, {}, {}, 10)
    first, *others = (module.decoder(a.name) for a in module.arms)
    for other in others:
        for (name, a), b in zip(first.state_dict().items(), other.state_dict().values()):
            assert torch.equal(a, b), name
    gen = torch.Generator().manual_seed(0)
    batch = {arm.corpus: torch.randint(0, 64, (2, 17), generator=gen) for arm in module.arms}
    for arm in module.arms:
        _, main, _ = module.arm_loss(arm, batch)
        rows = batch[arm.corpus]
        torch.testing.assert_close(main, first.loss(rows[:, :-1], rows[:, 1:]))
    assert module.tokens_in(batch) == len(module.arms) * 2 * 16


def tokenizers_byte_alphabet_spells_every_byte_once_and_visibly() -> None:
    """GPT-2's byte-to-unicode map: 256 distinct characters, none of them whitespace or a control character, so
    every pre-token is a visible string and every byte sequence (any UTF-8 text) has a spelling."""
    from datamodules.subword.bpe import ALPHABET

    assert len(set(ALPHABET)) == 256
    assert all(ch.isprintable() and not ch.isspace() for ch in ALPHABET)
    assert [ALPHABET[b] for b in range(ord("!"), ord("~") + 1)] == [chr(b) for b in range(ord("!"), ord("~") + 1)]


def deepseek_v3_published_config_counts_671b() -> None:
    """The calculator on DeepSeek-V3's config.json: 671B parameters; the tiny preset's model as the module counts it."""
    from modules.nn.calculator import DEEPSEEK_V3, count
    from repro.config import load_preset

    assert round(count(DEEPSEEK_V3).total / 1e9) == 671
    config = DecoderConfig(**{**load_preset("deepseek-v3", "tiny")["model"], "vocab_size": 300})
    with torch.device("meta"):
        assert Decoder(config).num_params() == count(config).total


def diff_attn_lambda_init_and_equal_size() -> None:
    """The diff-attn preset: block l's lambda_init is 0.8 - 0.6 exp(-0.3 (l - 1)) (Ye et al. Eq. 2), and the DIFF arm
    (4 heads of 32) has exactly the parameters of the softmax arm (8 heads of 16) but the lambdas and the head norms."""
    from modules.training.architectures import ArchitecturesModule
    from repro.config import load_preset

    preset = load_preset("diff-attn", "tiny")
    module = ArchitecturesModule({**preset["model"], "vocab_size": 300}, {}, preset["architectures"], 10)
    diff, softmax = module.decoder("diff"), module.decoder("softmax")
    for layer, block in enumerate(diff.blocks):
        assert block.attn.lambda_init == pytest.approx(0.8 - 0.6 * math.exp(-0.3 * layer))
    extra = sum(p.numel() for n, p in diff.named_parameters() if "lambdas" in n or "subln" in n)
    assert diff.num_params() - extra == softmax.num_params()


def nsa_arms_start_at_log_vocab_and_stay_causal() -> None:
    """The nsa preset's arms, untrained, cost about ln(V); the NSA arm's outputs at a position ignore every later token."""
    from modules.training.architectures import ArchitecturesModule
    from repro.config import load_preset

    preset = load_preset("nsa", "tiny")
    module = ArchitecturesModule({**preset["model"], "vocab_size": 300}, {}, preset["architectures"], 10)
    batch = torch.randint(0, 300, (2, 257), generator=torch.Generator().manual_seed(0))
    for arm in module.arms:
        with torch.no_grad():
            loss = module.decoder(arm.name).loss(batch[:, :-1], batch[:, 1:]).item()
        assert abs(loss - math.log(300)) < 0.1, (arm.name, loss)
    changed = batch.clone()
    changed[:, 200:] = (changed[:, 200:] + 1) % 300
    with torch.no_grad():
        nsa = module.decoder("nsa")
        torch.testing.assert_close(nsa(batch[:, :256])[:, :200], nsa(changed[:, :256])[:, :200])


def inference_target_frozen_and_drafters_start_at_log_vocab() -> None:
    """The target takes no gradient; the untrained draft costs about ln(V); a draft that always agrees (alpha 1)
    yields gamma + 1 tokens a pass and, at zero cost, a (gamma + 1)x speedup (Leviathan et al. Eq. 1, Thm. 3.8)."""
    from modules.decoding.draft import expected_speedup, expected_tokens_per_round
    from modules.training.inference import InferenceModule

    module = InferenceModule({"vocab_size": 300, "block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 32}, {}, {}, 10)
    assert not any(p.requires_grad for p in module.target.parameters())
    batch = torch.randint(0, 300, (4, 33), generator=torch.Generator().manual_seed(0))
    losses = module.drafter_losses(batch)
    assert abs(float(losses["draft"]) - math.log(300)) < 0.1
    losses["eagle"].backward()
    assert all(p.grad is None for p in module.target.parameters())
    for gamma in (1, 3, 5):
        assert expected_tokens_per_round(1.0, gamma) == gamma + 1 == expected_speedup(1.0, gamma, 0.0)


def pipeline_prerequisites_get_the_pipelines_own_overrides() -> None:
    """A stage's prerequisites get the overrides the pipeline gave those techniques, prefixed down the chain
    (DPO requires reward requires pretrain), so the stage a technique requires is the run the pipeline ran."""
    from repro.techniques.pipeline import PipelineSettings, stage_overrides

    settings = PipelineSettings(stages=["pretrain", "reward", "dpo"], overrides={"pretrain": ["a=1"], "reward": ["b=2"], "dpo": ["c=3"]},
                                serve={"stage": "dpo"})
    assert stage_overrides("pretrain", settings) == ["a=1"]
    assert stage_overrides("dpo", settings) == ["c=3", "reward.b=2", "reward.pretrain.a=1"]


def cai_feedback_is_order_free_and_sl_rows_supervise_the_revision() -> None:
    """AI feedback averages both orders of the options: swapping the responses swaps (p_a, p_b) exactly, and a judge
    that scores "A" and "B" alike gives 1/2. An SL-CAI row trains on the final revision and `<|end|>`, nothing else."""
    from datamodules.chat import END, add_chat_tokens, encode
    from datamodules.constitution import load_constitution
    from datamodules.tokenizer import train_bpe
    from datamodules.cai import CritiqueStep, ai_feedback, build_sl_data, decoder_logprob

    principle = load_constitution()[0]
    tokenizer = train_bpe(["Human: repeat the words apple river. Assistant: apple river (A) (B) " * 40], 300)
    add_chat_tokens(tokenizer)
    torch.manual_seed(0)
    judge = decoder_logprob(Decoder(small_config(vocab_size=tokenizer.get_vocab_size(), block_size=256)).eval(), tokenizer, chat=True)
    p_a, p_b = ai_feedback(judge, "repeat: apple", "apple", "you idiot", principle)
    q_a, q_b = ai_feedback(judge, "repeat: apple", "you idiot", "apple", principle)
    assert p_a + p_b == pytest.approx(1.0) and (p_a, p_b) == pytest.approx((q_b, q_a), abs=1e-12)
    assert ai_feedback(lambda context, answer: -1.0, "q", "a", "b", principle) == (0.5, 0.5)
    chain = [CritiqueStep(principle.name, "you idiot", "rude", "apple river", "", "")]
    row = build_sl_data(["repeat: apple"], [chain])[0]
    ids, labels = encode(tokenizer, row["messages"])
    supervised = [t for t, label in zip(ids, labels) if label != IGNORE]
    assert supervised == tokenizer.encode("apple river").ids + [tokenizer.token_to_id(END)]


INVARIANTS: dict[str, list[Callable[[], None]]] = {
    "cai": [cai_feedback_is_order_free_and_sl_rows_supervise_the_revision],
    "pipeline": [pipeline_prerequisites_get_the_pipelines_own_overrides],
    "inference": [inference_target_frozen_and_drafters_start_at_log_vocab],
    "diff-attn": [diff_attn_lambda_init_and_equal_size],
    "nsa": [nsa_arms_start_at_log_vocab_and_stay_causal],
    "deepseek-v3": [deepseek_v3_published_config_counts_671b],
    "tokenizers": [tokenizers_byte_alphabet_spells_every_byte_once_and_visibly],
    "data": [data_arms_start_equal_and_read_their_own_corpus],
    "dualpipe": [dualpipe_schedules_meet_table2_at_the_reports_setting],
    "architectures": [architectures_kv_cache_shrinks_with_the_kv_heads, architectures_arms_start_at_log_vocab],
    "memory": [memory_zero_bytes_follow_the_paper],
    "hybrid": [hybrid_forgetful_ssm_reduces_to_its_per_token_formula, hybrid_arms_start_at_equal_size_and_log_vocab],
    "moe": [moe_even_split_has_no_violation_and_aux_loss_alpha],
    "mtp": [mtp_uniform_heads_cost_log_vocab, mtp_zero_weight_leaves_the_decoder_as_next_token_training],
    "dpo": [dpo_policy_equal_to_reference_costs_ln2, dpo_ipo_is_zero_at_its_target_margin],
    "reward": [reward_equal_scores_cost_ln2, reward_trunk_starts_as_the_base_and_reads_the_last_token],
    "rlhf": [rlhf_policy_starts_at_zero_kl_from_its_reference, rlhf_perfect_values_leave_no_advantage],
    "sft": [sft_arms_start_equal_to_the_base, sft_new_token_rows_are_the_mean_of_their_sources, sft_loss_counts_only_supervised_tokens,
            sft_lora_arm_moves_only_adapters_and_new_token_rows],
    "pretrain": [
        pretrain_uniform_model_loss_is_log_vocab,
        pretrain_initial_loss_is_near_log_vocab,
        pretrain_schedule_hits_its_formula,
        pretrain_validation_perplexity_is_exp_loss,
    ],
}


def test_every_technique_states_its_invariants() -> None:
    missing = sorted(set(techniques()) - set(INVARIANTS))
    assert not missing, f"techniques without invariants in tests/test_invariants.py: {', '.join(missing)}"


@pytest.mark.parametrize("check", [c for checks in INVARIANTS.values() for c in checks], ids=lambda c: c.__name__)
def test_invariant(check: Callable[[], None]) -> None:
    check()
