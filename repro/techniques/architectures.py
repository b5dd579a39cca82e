"""`--technique architectures`: the open-model knobs as a measured ablation (LLaMA; GQA; MQA; MLA).

Arms side by side on the same batches (`modules/training/architectures.py`): GPT-2's LayerNorm, GELU, learned
positions and multi-head attention, then RMSNorm, SwiGLU, RoPE, grouped-query, multi-query and
latent attention added one at a time. The report tables validation loss, training tokens/s and
KV-cache bytes per token per arm, and checks the claims from the run: the LLaMA recipe trains to a
lower loss than GPT-2's, and GQA / MQA / MLA keep that loss at a fraction of the KV cache.

`--technique diff-attn` (differential attention against softmax attention of equal size, with the
needle-retrieval task of `modules/training/needle.py`; `diff_attn.py`) and `--technique nsa` (native sparse
attention against full attention; `nsa.py`) are the same machinery, `ARCHITECTURES` (config, module,
steps), with their own presets and claims.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from datamodules.pretrain import CorpusConfig, PretrainDataModule
from modules.nn import DecoderConfig
from modules.nn.cache import cache_bytes
from modules.training.architectures import ArchitectureSettings, ArchitecturesModule
from modules.training.arms import ConfigArm
from modules.training.needle import NeedleConfig, NeedleDataModule, NeedleModule
from modules.training.pretrain import OptimConfig
from reports.claims import ClaimResult, check_below, not_measured
from reports.plots import loss_curves
from repro.golden import CORPUS, SHRINK
from repro.registry import Finished, Fit, Measured, Step, Technique, register
from repro.steps import ARM_EVAL, DATA, SPEED, arm_eval_scores, arms
from repro.trainer import EvalConfig, TrainConfig, check_manual_optimization

SOURCE = "LLaMA (Touvron et al. 2023); GQA (Ainslie et al. 2023); MQA (Shazeer 2019); MLA (DeepSeek-V2, Liu et al. 2024)"
LOSS_SLACK = 1.02  # "same quality": within 2% of the multi-head arm's validation loss


@dataclass
class ArchitecturesConfig:
    """Sections of an architectures preset. `model.vocab_size` follows `data.vocab_size`; arms override `model:` fields."""

    model: DecoderConfig = field(default_factory=DecoderConfig)
    data: CorpusConfig = field(default_factory=CorpusConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    architectures: ArchitectureSettings = field(default_factory=ArchitectureSettings)
    needle: NeedleConfig = field(default_factory=NeedleConfig)  # enabled: every arm's shape also trains on the needle task
    train: TrainConfig = field(default_factory=lambda: TrainConfig(grad_clip=0.0))
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        self.model.vocab_size = self.data.vocab_size
        for arm in self.architectures.arms:  # an arm's config error (heads, RoPE width) stops the run here
            ConfigArm(**arm).config(self.model)
        check_manual_optimization(self.train, "each arm clips its own gradients; set architectures.grad_clip and "
                                  "train.grad_clip=0", "the arms step once per batch; raise data.batch_size instead")


def build(config: ArchitecturesConfig, seed: int, stages: dict[str, Path]) -> tuple[ArchitecturesModule, PretrainDataModule]:
    module = ArchitecturesModule(config.model, config.optim, config.architectures, config.train.max_steps)
    return module, PretrainDataModule(config.data, block_size=config.model.block_size, seed=seed)


def arm_configs(config: ArchitecturesConfig) -> dict[str, DecoderConfig]:
    """Each arm's decoder config, name -> config: the preset's `model:` with the arm's fields changed."""
    return {arm["name"]: ConfigArm(**arm).config(config.model) for arm in config.architectures.arms}


def describe(cfg: DecoderConfig) -> str:
    heads = "MHA" if cfg.kv_heads == cfg.n_head else "MQA" if cfg.kv_heads == 1 else f"GQA ({cfg.kv_heads} KV heads)"
    if cfg.attention == "diff":
        heads = f"DIFF ({cfg.n_head} heads of {cfg.head_dim})"
    if cfg.attention == "nsa":
        heads = (f"NSA ({cfg.kv_heads} KV heads; l {cfg.nsa_block}, d {cfg.nsa_stride}, l' {cfg.nsa_select_block}, "
                 f"n {cfg.nsa_select}, w {cfg.nsa_window})")
    if cfg.attention == "mla":
        heads = f"MLA (d_c {cfg.kv_rank}, d_R {cfg.rope_dim}{f', queries {cfg.mla_q_rank}' if cfg.mla_q_rank else ''})"
    return f"{cfg.norm}, {cfg.mlp}, {cfg.position}, {heads}"


def kv_bytes_per_token(cfg: DecoderConfig) -> int:
    """Keys and values of every layer for one token in bf16 (MLA: its latent and shared RoPE key)."""
    return cache_bytes(cfg, 1, 1, torch.bfloat16)


def _corpus(finished: Finished) -> Measured:
    """DATA's metrics; its note on the source is left out of these reports."""
    return Measured(DATA.run(finished).metrics)


CORPUS_STATS = Step("data", _corpus)  # the data technique's arms report their corpus so too


def _arms(finished: Finished) -> Measured:
    """Per arm: loss, sizes, KV-cache bytes per token, and its training tokens over its own training seconds."""
    config, module = finished.config, finished.module
    seq = config.model.block_size
    tokens = config.train.max_steps * config.data.batch_size * seq * module.trainer.world_size

    def sizes(module: ArchitecturesModule, arm: ConfigArm) -> dict[str, Any]:
        decoder, seconds = module.decoder(arm.name), module.arm_seconds[arm.name]
        return {
            "params": decoder.num_params(),
            "params_non_embedding": decoder.num_params(exclude_embeddings=True),
            "flops_per_token": decoder.flops_per_token(seq),
            "kv_bytes_per_token": kv_bytes_per_token(decoder.config),
            "train_tokens_per_s": tokens / seconds if seconds else None,
        }

    return arms(sizes).run(finished)


def needle_fits(config: ArchitecturesConfig, module: ArchitecturesModule, datamodule: Any, seed: int) -> list[Fit]:
    """With `needle.enabled`, each arm's shape trained from scratch on the needle task (`needle-<arm>`): the same seed,
    batches and held-out set for all, one validation at the end."""
    needle = config.needle
    if not needle.enabled:
        return []
    train = TrainConfig(max_steps=needle.steps, grad_clip=1.0, val_every=needle.steps, val_batches=needle.eval_batches,
                        checkpoint_every=needle.steps, speed_window=max(1, min(10, needle.steps // 4)))
    return [Fit(f"needle-{arm.name}", module=lambda shape=module.decoder(arm.name).config: NeedleModule(shape, needle),
                datamodule=lambda: NeedleDataModule(needle, seed), train=train, val_metrics=("val/loss", "val/accuracy"))
            for arm in module.arms]


def _needle(finished: Finished) -> Measured:
    """Each arm's needle fit: held-out accuracy and loss, training seconds, last training loss, chance."""
    metrics = {}
    for arm in finished.module.arms if finished.config.needle.enabled else []:
        result = finished.fits[f"needle-{arm.name}"].summary()
        metrics |= {f"{arm.name}/needle_{k}": v for k, v in result.items()}
    return Measured(metrics)


def arms_table(config: ArchitecturesConfig, metrics: Mapping[str, Any]) -> list[str]:
    """One row per arm: its shape, loss, parameters, KV-cache bytes, training speed and lm-eval scores."""
    configs = arm_configs(config)
    scores = arm_eval_scores(dict(metrics), list(configs))
    tasks = list(dict.fromkeys(t for s in scores.values() for t in s))
    lines = ["| arm | norm, MLP, positions, attention | val loss | params (non-embedding) | KV cache bytes/token (bf16) | "
             "train tokens/s | train s |" + "".join(f" {t} |" for t in tasks), "|---|---|---:|---:|---:|---:|---:|" + "---:|" * len(tasks)]
    for name, cfg in configs.items():
        m = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith(f"{name}/")}
        loss = "" if m["val_loss"] is None else f"{m['val_loss']:.4f}"
        rate = "" if m["train_tokens_per_s"] is None else f"{m['train_tokens_per_s']:,.0f}"
        lines.append(f"| {name} | {describe(cfg)} | {loss} | {m['params']:,} ({m['params_non_embedding']:,}) | "
                     f"{m['kv_bytes_per_token']:,} | {rate} | {m['train_seconds']:.1f} |"
                     + "".join(f" {scores[name].get(t, float('nan')):.4f} |" for t in tasks))
    return lines


def needle_table(needle: NeedleConfig, arms: list[str], metrics: Mapping[str, Any]) -> list[str]:
    lines = [f"Each arm's shape, trained from scratch for {needle.steps} steps of {needle.batch_size} sequences on the "
             f"needle task (`modules/training/needle.py`): {needle.pairs} key-value pairs hidden among filler in {needle.context} "
             f"tokens, then {needle.queries} lookups; accuracy on {needle.eval_batches * needle.batch_size} held-out "
             f"sequences (chance {1 / needle.values:.3f}).", "",
             "| arm | lookup accuracy | lookup loss | train s |", "|---|---:|---:|---:|"]
    for arm in arms:
        m = {k: metrics[f"{arm}/needle_{k}"] for k in ("accuracy", "loss", "train_seconds")}
        lines.append(f"| {arm} | {m['accuracy']:.3f} | {m['loss']:.4f} | {m['train_seconds']:.1f} |")
    return lines


def _report(finished: Finished) -> Measured:
    """The loss curves of every arm (arm_losses.png), the arms table and the needle table."""
    config = finished.config
    title = "Validation and train loss per arm (equal tokens)"
    (finished.run_dir / "arm_losses.png").write_bytes(loss_curves(finished.module.loss_curves(), title))
    sections = {"Arms": ["![loss per arm](arm_losses.png)", "", *arms_table(config, finished.metrics)]}
    if config.needle.enabled:
        sections["Needle retrieval"] = needle_table(config.needle, list(arm_configs(config)), finished.metrics)
    notes = [f"All arms train on the same {config.train.max_steps} batches of {config.data.batch_size} x "
             f"{config.model.block_size} tokens from the same random state. Train tokens/s: each arm's tokens over its own "
             "forward, backward and optimizer time (the arms take turns on one device). KV cache bytes per token: keys and "
             "values of every layer in bf16, `modules/nn/cache.py::cache_bytes` (MLA: its latent and shared RoPE key)."]
    return Measured(notes=notes, sections=sections)


# What every technique of this machinery measures: corpus, arms, speed, the needle task, lm-eval per arm, the tables
STEPS = (CORPUS_STATS, Step("arms", _arms), SPEED, Step("needle", _needle), ARM_EVAL, Step("report", _report))


def recorded_kv_bytes(config: ArchitecturesConfig, metrics: Mapping[str, Any], arm: str) -> int:
    """An arm's KV-cache bytes per token as its run recorded them, else computed from its config."""
    return metrics.get(f"{arm}/kv_bytes_per_token") or kv_bytes_per_token(arm_configs(config)[arm])


def claims(config: ArchitecturesConfig, metrics: Mapping[str, Any]) -> list[ClaimResult]:
    """The LLaMA arm against GPT-2's, then every GQA / MQA / MLA arm on the LLaMA recipe against the LLaMA arm."""
    configs = arm_configs(config)
    gpt2 = next((n for n, c in configs.items() if (c.norm, c.mlp, c.position, c.kv_heads) == ("layernorm", "gelu", "learned", c.n_head)), None)
    llama = next((n for n, c in configs.items() if (c.norm, c.mlp, c.position, c.kv_heads, c.attention)
                  == ("rmsnorm", "swiglu", "rope", c.n_head, "standard")), None)
    if not (gpt2 and llama):
        why = "needs a GPT-2 arm (layernorm, gelu, learned, MHA) and a LLaMA arm (rmsnorm, swiglu, rope, MHA)"
        return [not_measured("The LLaMA recipe trains to a lower loss than GPT-2's", SOURCE, "validation loss", "-", why)]
    results = [check_below(
        claim="RMSNorm, SwiGLU and RoPE together (LLaMA) train to a lower loss than LayerNorm, GELU and learned positions (GPT-2)",
        source=SOURCE, metric=f"validation loss of {llama} (nats/token)", measured=metrics.get(f"{llama}/val_loss"),
        bound=metrics.get(f"{gpt2}/val_loss"), factor=1.0, paper="LLaMA's choices, each reported to help (PaLM, Shazeer 2020, RoFormer)",
        bound_name=f"{gpt2}'s loss")]
    for name, c in configs.items():
        if (name == llama or (c.kv_heads == c.n_head and c.attention == "standard") or c.attention not in ("standard", "mla")
                or (c.norm, c.mlp, c.position) != ("rmsnorm", "swiglu", "rope")):
            continue  # diff-attn's and nsa's arms are claimed by their own techniques
        kind = "MLA" if c.attention == "mla" else "MQA" if c.kv_heads == 1 else "GQA"
        ratio = recorded_kv_bytes(config, metrics, llama) / recorded_kv_bytes(config, metrics, name)
        heads = f"latent {c.kv_rank} + RoPE key {c.rope_dim}" if kind == "MLA" else f"{c.kv_heads} KV heads of {c.n_head}"
        paper = ("MLA: better than MHA at a cache of GQA with 2.25 groups (DeepSeek-V2, Table 1 and App. D.2)" if kind == "MLA"
                 else "GQA-8: quality close to MHA, speed close to MQA (Ainslie et al. 2023, Table 1)")
        results.append(check_below(
            claim=f"{kind} keeps multi-head quality at 1/{ratio:.3g} of the KV cache", source=SOURCE,
            metric=f"validation loss of {name} ({heads}; cache {ratio:.3g}x smaller)",
            measured=metrics.get(f"{name}/val_loss"), bound=metrics.get(f"{llama}/val_loss"), factor=LOSS_SLACK,
            paper=paper, bound_name=f"{llama}'s loss"))
    return results


# What diff-attn and nsa register too: the config, module and steps; each technique states its own claims
ARCHITECTURES = dict(config=ArchitecturesConfig, module=ArchitecturesModule, build=build, fits=needle_fits, steps=STEPS,
                     golden_overrides=(*CORPUS, *SHRINK, "needle.enabled=false"))

register(
    Technique(
        name="architectures",
        summary="open-model knobs: LayerNorm/RMSNorm, GELU/SwiGLU, learned/RoPE, MHA/GQA/MQA/MLA side by side",
        claims=claims,
        **ARCHITECTURES,
    )
)
