"""`--technique architectures`: the open-model knobs as a measured ablation (LLaMA; GQA; MQA; MLA).

Arms side by side on the same batches (`modules/training/architectures.py`): GPT-2's LayerNorm, GELU, learned
positions and multi-head attention, then RMSNorm, SwiGLU, RoPE, grouped-query, multi-query and
latent attention added one at a time. The report tables validation loss, training tokens/s and
KV-cache bytes per token per arm, and checks the claims from the run: the LLaMA recipe trains to a
lower loss than GPT-2's, and GQA / MQA / MLA keep that loss at a fraction of the KV cache.

`--technique diff-attn` (differential attention against softmax attention of equal size, with the
needle-retrieval task of `modules/training/needle.py`) and `--technique nsa` (native sparse attention against
full attention) are the same machinery with their own presets and claims.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from datamodules.pretrain import CorpusConfig, PretrainDataModule
from modules.training.architectures import ArchitectureSettings, ArchitecturesModule
from modules.training.arms import ConfigArm
from modules.training.needle import NeedleConfig, train_and_score
from modules.nn import DecoderConfig
from modules.nn.cache import cache_bytes
from modules.training.pretrain import OptimConfig
from reports.claims import check_above, check_below, not_measured
from reports.plots import loss_curves
from repro.arm_findings import arm_metrics
from repro.evaluate import arm_scores
from repro.golden import CORPUS, SHRINK
from repro.registry import Findings, Technique, register
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


def findings(config: ArchitecturesConfig, final: dict[str, float], module: ArchitecturesModule,
             datamodule: PretrainDataModule, speed: list[dict[str, float]]) -> Findings:
    run_dir = Path(module.trainer.default_root_dir)
    seq = config.model.block_size
    tokens = config.train.max_steps * config.data.batch_size * seq * module.trainer.world_size

    def sizes(arm: ConfigArm) -> dict[str, Any]:
        decoder = module.decoder(arm.name)
        return {
            "params": decoder.num_params(),
            "params_non_embedding": decoder.num_params(exclude_embeddings=True),
            "flops_per_token": decoder.flops_per_token(seq),
            "kv_bytes_per_token": cache_bytes(decoder.config, 1, 1, torch.bfloat16),
            "train_tokens_per_s": tokens / module.arm_seconds[arm.name] if module.arm_seconds[arm.name] else None,
        }

    metrics = arm_metrics(module, final, datamodule, speed, sizes)
    sections: dict[str, list[str]] = {}
    if config.needle.enabled:
        metrics.update(needle_metrics(config.needle, module))
        sections["Needle retrieval"] = needle_table(config.needle, module, metrics)
    scores = arm_scores(run_dir, [a.name for a in module.arms], config.eval, str(module.device), final) if config.eval.enabled else {}
    (run_dir / "arm_losses.png").write_bytes(loss_curves(module.loss_curves(), "Validation and train loss per arm (equal tokens)"))

    tasks = list(dict.fromkeys(t for s in scores.values() for t in s))
    table = ["| arm | norm, MLP, positions, attention | val loss | params (non-embedding) | KV cache bytes/token (bf16) | "
             "train tokens/s | train s |" + "".join(f" {t} |" for t in tasks), "|---|---|---:|---:|---:|---:|---:|" + "---:|" * len(tasks)]
    for arm in module.arms:
        m = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith(f"{arm.name}/")}
        loss = "" if m["val_loss"] is None else f"{m['val_loss']:.4f}"
        rate = "" if m["train_tokens_per_s"] is None else f"{m['train_tokens_per_s']:,.0f}"
        table.append(f"| {arm.name} | {describe(module.decoder(arm.name).config)} | {loss} | {m['params']:,} "
                     f"({m['params_non_embedding']:,}) | {m['kv_bytes_per_token']:,} | {rate} | {m['train_seconds']:.1f} |"
                     + "".join(f" {scores.get(arm.name, {}).get(t, float('nan')):.4f} |" for t in tasks))
    notes = [f"All arms train on the same {config.train.max_steps} batches of {config.data.batch_size} x {seq} tokens from "
             "the same random state. Train tokens/s: each arm's tokens over its own forward, backward and optimizer time "
             "(the arms take turns on one device). KV cache bytes per token: keys and values of every layer in bf16, "
             "`modules/nn/cache.py::cache_bytes` (MLA: its latent and shared RoPE key)."]
    return Findings(metrics=metrics, claims=_claims(module, metrics), notes=notes,
                    sections={"Arms": ["![loss per arm](arm_losses.png)", "", *table], **sections})


def needle_metrics(needle: NeedleConfig, module: ArchitecturesModule) -> dict[str, float]:
    """Each arm's shape trained from scratch on the needle task (same seed, batches and held-out set for all)."""
    out = {}
    for arm in module.arms:
        result = train_and_score(module.decoder(arm.name).config, needle, seed=0, device=module.device)
        out.update({f"{arm.name}/needle_{k}": v for k, v in result.items()})
    return out


def needle_table(needle: NeedleConfig, module: ArchitecturesModule, metrics: dict[str, Any]) -> list[str]:
    lines = [f"Each arm's shape, trained from scratch for {needle.steps} steps of {needle.batch_size} sequences on the "
             f"needle task (`modules/training/needle.py`): {needle.pairs} key-value pairs hidden among filler in {needle.context} "
             f"tokens, then {needle.queries} lookups; accuracy on {needle.eval_batches * needle.batch_size} held-out "
             f"sequences (chance {1 / needle.values:.3f}).", "",
             "| arm | lookup accuracy | lookup loss | train s |", "|---|---:|---:|---:|"]
    for arm in module.arms:
        m = {k: metrics[f"{arm.name}/needle_{k}"] for k in ("accuracy", "loss", "train_seconds")}
        lines.append(f"| {arm.name} | {m['accuracy']:.3f} | {m['loss']:.4f} | {m['train_seconds']:.1f} |")
    return lines


def _claims(module: ArchitecturesModule, metrics: dict[str, Any]) -> list:
    configs = {a.name: module.decoder(a.name).config for a in module.arms}
    diff = next((n for n, c in configs.items() if c.attention == "diff"), None)
    if diff is not None:
        return _diff_claims(configs, diff, metrics)
    nsa = next((n for n, c in configs.items() if c.attention == "nsa"), None)
    if nsa is not None:
        return _nsa_claims(configs, nsa, metrics)
    gpt2 = next((n for n, c in configs.items() if (c.norm, c.mlp, c.position, c.kv_heads) == ("layernorm", "gelu", "learned", c.n_head)), None)
    llama = next((n for n, c in configs.items() if (c.norm, c.mlp, c.position, c.kv_heads, c.attention)
                  == ("rmsnorm", "swiglu", "rope", c.n_head, "standard")), None)
    if not (gpt2 and llama):
        why = "needs a GPT-2 arm (layernorm, gelu, learned, MHA) and a LLaMA arm (rmsnorm, swiglu, rope, MHA)"
        return [not_measured("The LLaMA recipe trains to a lower loss than GPT-2's", SOURCE, "validation loss", "-", why)]
    claims = [check_below(
        claim="RMSNorm, SwiGLU and RoPE together (LLaMA) train to a lower loss than LayerNorm, GELU and learned positions (GPT-2)",
        source=SOURCE, metric=f"validation loss of {llama} (nats/token)", measured=metrics[f"{llama}/val_loss"],
        bound=metrics[f"{gpt2}/val_loss"], factor=1.0, paper="LLaMA's choices, each reported to help (PaLM, Shazeer 2020, RoFormer)",
        bound_name=f"{gpt2}'s loss")]
    for name, c in configs.items():
        if name == llama or (c.kv_heads == c.n_head and c.attention == "standard") or (c.norm, c.mlp, c.position) != ("rmsnorm", "swiglu", "rope"):
            continue
        kind = "MLA" if c.attention == "mla" else "MQA" if c.kv_heads == 1 else "GQA"
        ratio = metrics[f"{llama}/kv_bytes_per_token"] / metrics[f"{name}/kv_bytes_per_token"]
        heads = f"latent {c.kv_rank} + RoPE key {c.rope_dim}" if kind == "MLA" else f"{c.kv_heads} KV heads of {c.n_head}"
        paper = ("MLA: better than MHA at a cache of GQA with 2.25 groups (DeepSeek-V2, Table 1 and App. D.2)" if kind == "MLA"
                 else "GQA-8: quality close to MHA, speed close to MQA (Ainslie et al. 2023, Table 1)")
        claims.append(check_below(
            claim=f"{kind} keeps multi-head quality at 1/{ratio:.3g} of the KV cache", source=SOURCE,
            metric=f"validation loss of {name} ({heads}; cache {ratio:.3g}x smaller)",
            measured=metrics[f"{name}/val_loss"], bound=metrics[f"{llama}/val_loss"], factor=LOSS_SLACK,
            paper=paper, bound_name=f"{llama}'s loss"))
    return claims


def _diff_claims(configs: dict[str, DecoderConfig], diff: str, metrics: dict[str, Any]) -> list:
    """Differential attention against the softmax arm of twice its heads at half the width (equal size)."""
    d = configs[diff]
    twin = next((n for n, c in configs.items() if c.attention == "standard" and c.n_head == 2 * d.n_head), None)
    source = "Differential Transformer (Ye et al., ICLR 2025)"
    retrieval = "Differential attention cancels attention noise: better key retrieval in long context"
    needle_paper = "multi-needle retrieval 0.85-0.9 vs 0.55-0.6 at 4k (Table 2)"
    if twin is not None and f"{diff}/needle_accuracy" in metrics:
        claims = [check_above(
            claim=retrieval, source=source, metric=f"needle lookup accuracy of {diff} against {twin}",
            measured=metrics[f"{diff}/needle_accuracy"], bound=metrics[f"{twin}/needle_accuracy"], factor=1.0,
            paper=needle_paper, bound_name=f"{twin}'s accuracy")]
    else:
        claims = [not_measured(retrieval, source, "needle (key-value lookup) accuracy", needle_paper,
                               "set needle.enabled=true (and a softmax arm of twice the heads)")]
    if twin is None:
        return [*claims, not_measured("DIFF reaches a lower loss than softmax attention of equal size", source, "validation loss",
                                      "matches a 1.5x larger transformer", f"needs a softmax arm with {2 * d.n_head} heads")]
    return [check_below(
        claim="DIFF reaches a lower loss than softmax attention of equal size", source=source,
        metric=f"validation loss of {diff} ({d.n_head} heads of {d.head_dim}) against {twin} ({2 * d.n_head} heads of "
        f"{d.head_dim // 2})", measured=metrics[f"{diff}/val_loss"], bound=metrics[f"{twin}/val_loss"], factor=1.0,
        paper="about 65% of the size or tokens for the same loss (Fig. 3, 4)", bound_name=f"{twin}'s loss"), *claims]


def _nsa_claims(configs: dict[str, DecoderConfig], nsa: str, metrics: dict[str, Any]) -> list:
    """NSA against the full-attention arm of the same shape."""
    n = configs[nsa]
    full = next((k for k, c in configs.items() if c.attention == "standard" and c.kv_heads == n.kv_heads), None)
    source = "Native Sparse Attention (Yuan et al. 2025)"
    speed = not_measured("NSA's attention is faster than full attention at long context", source,
                         "attention ms against context length", "9.0x forward, 6.0x backward at 64k (Fig. 6)",
                         "kernel timing is `python -m benchmarks.nsa` on a GPU (reports/nsa/README.md)")
    if full is None:
        return [not_measured("NSA trains to a loss no worse than full attention", source, "validation loss",
                             "lower pretraining loss than full attention (Fig. 4)", f"needs a standard arm with {n.kv_heads} KV heads"), speed]
    return [check_below(
        claim="NSA trains to a lower loss than full attention", source=source,
        metric=f"validation loss of {nsa} against {full}", measured=metrics[f"{nsa}/val_loss"],
        bound=metrics[f"{full}/val_loss"], factor=1.0, paper="lower pretraining loss than full attention (Fig. 4, 27B model)",
        bound_name=f"{full}'s loss"), speed]


ARCHITECTURES = dict(config=ArchitecturesConfig, module=ArchitecturesModule, build=build, findings=findings,
                     golden_overrides=(*CORPUS, *SHRINK, "needle.enabled=false"))

register(
    Technique(
        name="architectures",
        summary="open-model knobs: LayerNorm/RMSNorm, GELU/SwiGLU, learned/RoPE, MHA/GQA/MQA/MLA side by side",
        **ARCHITECTURES,
    )
)
register(Technique(name="diff-attn", summary="differential attention against softmax attention of equal size, and needle retrieval",
                   aliases=("differential-attention",), **ARCHITECTURES))
register(Technique(name="nsa", summary="native sparse attention (compressed, selected, sliding-window branches) against full attention",
                   aliases=("native-sparse-attention",), **ARCHITECTURES))
