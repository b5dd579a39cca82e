"""Jamba-style hybrid (Lieber et al. 2024): a little attention, mostly Mamba, for far less memory at long context.

Arms pretrain side by side on the same batches at equal parameters (`modules/training/hybrid.py`): a
transformer, pure Mamba and Jamba's 1 attention : 7 Mamba pattern (the `jamba` preset adds the
pattern with MoE every other layer). The report compares their validation loss and lm-eval scores,
and, for each arm's architecture, the decoding cache's bytes and decode tokens/s against context
length (`measurement/hybrid.py`): computed from the config and measured.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import torch

from datamodules.pretrain import CorpusConfig, PretrainDataModule
from measurement.hybrid import measure_arms, show
from modules.training.arms import ConfigArm
from modules.training.hybrid import HybridModule, HybridSettings, arm_config, check_equal_params
from modules.nn import DecoderConfig
from modules.nn.cache import KVCache, cache_bytes
from modules.training.pretrain import OptimConfig
from reports.claims import ClaimResult, check_above, check_below, not_measured
from reports.plots import context_curves, loss_curves
from repro.golden import CORPUS, SHRINK
from repro.registry import Finished, Measured, Step, Technique, register
from repro.steps import ARM_EVAL, DATA, SPEED, arm_eval_scores, arms
from repro.trainer import EvalConfig, TrainConfig, check_manual_optimization

SOURCE = "Jamba (Lieber et al. 2024, arXiv 2403.19887)"
MEMORY_RATIO = 4.0  # the bar at 32k; Jamba: 4 GB against Mixtral's 32 GB at 256k (Table 1), 8x
THROUGHPUT_RATIO = 3.0  # Jamba, Fig. 3: "3x throughput" against Mixtral at long contexts


@dataclass
class ContextConfig:
    """The `context.` section: cache bytes and decode speed of each arm's architecture against context length."""

    lengths: list[int] = field(default_factory=lambda: [256, 1024, 4096])  # contexts prefilled, then decoded from
    batches: list[int] = field(default_factory=lambda: [1])  # sequences decoded together
    new_tokens: int = 32  # decode steps timed after each prefill
    prefill_chunk: int = 2048  # tokens per prefill pass
    memory_at: int = 32768  # the context of the memory claim: a cache of that many tokens is allocated per arm


@dataclass
class HybridConfig:
    """Sections of a hybrid preset. `model.vocab_size` follows `data.vocab_size`; each arm overrides `model:` fields."""

    model: DecoderConfig = field(default_factory=lambda: DecoderConfig(mlp="swiglu", norm="rmsnorm", bias=False))
    data: CorpusConfig = field(default_factory=CorpusConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    # the default arms at the default model: the transformer's MLP widened (2048 -> 2560) to the Mamba blocks' parameters,
    # as every preset widens it, so that the defaults alone are a valid config
    hybrid: HybridSettings = field(default_factory=lambda: HybridSettings(arms=[
        {"name": "transformer", "model": {"layer_pattern": "a", "position": "rope", "mlp_hidden": 2560}},
        {"name": "mamba", "model": {"layer_pattern": "m", "position": "none"}},
        {"name": "hybrid", "model": {"layer_pattern": "mmmmammm", "position": "none"}},
    ]))
    context: ContextConfig = field(default_factory=ContextConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(grad_clip=0.0))
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        self.model.vocab_size = self.data.vocab_size
        check_equal_params(self.model, self.hybrid)  # here, so a bad preset stops before any run folder exists
        check_manual_optimization(self.train, "each arm clips its own gradients; set hybrid.grad_clip and train.grad_clip=0",
                                  "the arms step once per batch; raise data.batch_size instead")
        if not self.context.lengths or min(self.context.lengths) < 1 or not self.context.batches:
            raise ValueError(f"context.lengths={self.context.lengths} and context.batches={self.context.batches}: "
                             "name at least one positive context length and one batch size")


def build(config: HybridConfig, seed: int, stages: dict[str, Path]) -> tuple[HybridModule, PretrainDataModule]:
    module = HybridModule(config.model, config.optim, config.hybrid, config.train.max_steps)
    return module, PretrainDataModule(config.data, block_size=config.model.block_size, seed=seed)


def memory_at(module: HybridModule, context: int, dtype: Any) -> dict[str, dict[str, int]]:
    """Per arm: the decoding cache of one sequence of `context` tokens, computed and allocated (its buffers' bytes)."""
    out = {}
    for arm in module.arms:
        config = replace(module.decoder(arm.name).config, block_size=context)
        cache = KVCache(config, 1, context, torch.device("cpu"), dtype)
        out[arm.name] = {"computed": cache_bytes(config, 1, context, dtype), "allocated": cache.nbytes()}
        del cache
    return out


def _sizes(module: HybridModule, arm: ConfigArm) -> dict[str, Any]:
    decoder = module.decoder(arm.name)
    return {
        "params": decoder.num_params(),
        "active_params": decoder.num_params(exclude_embeddings=True, active=True),  # no embeddings
        "flops_per_token": decoder.flops_per_token(module.config.block_size),
    }


def _cache(finished: Finished) -> Measured:
    """Per arm the bf16 decoding cache of one sequence of `context.memory_at` tokens: allocated, and computed."""
    at = finished.config.context.memory_at
    metrics = {}
    for name, m in memory_at(finished.module, at, torch.bfloat16).items():
        metrics |= {f"{name}/cache_bytes_{at}": m["allocated"], f"{name}/cache_bytes_{at}_computed": m["computed"]}
    return Measured(metrics)


def _arms_table(finished: Finished) -> Measured:
    """The arms' layers, losses, sizes, caches and lm-eval scores side by side, their loss curves, and how they trained."""
    config, module, metrics = finished.config, finished.module, finished.metrics
    at = config.context.memory_at
    png = loss_curves(module.loss_curves(), "Validation and train loss per arm (equal tokens)")
    (finished.run_dir / "arm_losses.png").write_bytes(png)
    scores = arm_eval_scores(metrics, [a.name for a in module.arms])
    tasks = list(dict.fromkeys(t for s in scores.values() for t in s))
    table = ["| arm | layers (a attention, m Mamba) | MoE | val loss | params (active, non-embedding) | "
             f"cache at {at:,} tokens (bf16) | train s |" + "".join(f" {t} |" for t in tasks),
             "|---|---|---|---:|---:|---:|---:|" + "---:|" * len(tasks)]
    for arm in module.arms:
        cfg, name = module.decoder(arm.name).config, arm.name
        loss = metrics[f"{name}/val_loss"]
        pattern = "".join(cfg.layer_pattern[i % len(cfg.layer_pattern)] for i in range(cfg.n_layer))
        moe = f"{cfg.moe_experts} experts, top-{cfg.moe_top_k}, every {cfg.moe_every}" if cfg.moe_experts else "-"
        table.append(f"| {name} | {pattern} | {moe} | {'' if loss is None else f'{loss:.4f}'} | {metrics[f'{name}/params']:,} "
                     f"({metrics[f'{name}/active_params']:,}) | {metrics[f'{name}/cache_bytes_{at}'] / 2**20:,.1f} MiB | "
                     f"{metrics[f'{name}/train_seconds']:.1f} |" + "".join(f" {scores.get(name, {}).get(t, float('nan')):.4f} |" for t in tasks))
    note = (f"All arms train on the same {config.train.max_steps} batches of {config.data.batch_size} x {config.model.block_size} "
            f"tokens; parameter counts within {config.hybrid.param_tolerance:.0%} of the first arm's (active, non-embedding). "
            f"Mamba: d_state {config.model.mamba_d_state}, d_conv {config.model.mamba_d_conv}, expand {config.model.mamba_expand}.")
    return Measured(notes=[note], sections={"Arms": ["![loss per arm](arm_losses.png)", "", *table]})


def _long_context(finished: Finished) -> Measured:
    """Cache bytes and decode tokens/s of each arm's architecture (random weights) against context length and batch:
    `<arm>/decode_tokens_per_s/b<batch>/<context>`, the records in context.json, two plots and their table."""
    c, module, run_dir = finished.config.context, finished.module, finished.run_dir
    device = module.device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    configs = {a.name: module.decoder(a.name).config for a in module.arms}
    print(f"long context: {len(configs)} arms x {len(c.batches)} batch sizes x {len(c.lengths)} contexts", flush=True)
    records = measure_arms(configs, c.lengths, c.batches, device, dtype, c.new_tokens, c.prefill_chunk, show)
    (run_dir / "context.json").write_text(json.dumps(records, indent=2))
    # how the first arm's steps were timed, which the speed claim names
    metrics: dict[str, Any] = {"long_context/decode": records[0]["decode"]}
    metrics |= {f"{r['arm']}/decode_tokens_per_s/b{r['batch']}/{r['context']}": r["decode_tokens_per_s"] for r in records}

    batch = c.batches[-1]
    rows = [r for r in records if r["batch"] == batch]
    measured = {name: [(r["context"], r["measured_bytes"] / batch / 2**20) for r in rows if r["arm"] == name] for name in configs}
    contexts = sorted({*c.lengths, c.memory_at})
    computed = {name: [(n, cache_bytes(config, 1, n, dtype) / 2**20) for n in contexts] for name, config in configs.items()}
    (run_dir / "cache_bytes.png").write_bytes(context_curves(
        measured, f"cache per sequence (MiB, {str(dtype).removeprefix('torch.')})", "Decoding cache against context length",
        computed))
    speeds = {name: [(r["context"], r["decode_tokens_per_s"]) for r in rows if r["arm"] == name] for name in configs}
    (run_dir / "decode_speed.png").write_bytes(context_curves(
        speeds, f"decode tokens/s (batch {batch})", f"Decode speed against context length ({device.type})"))

    table = ["| arm | batch | context | cache computed (MiB) | cache measured (MiB) | prefill s | decode tokens/s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        table.append(f"| {r['arm']} | {r['batch']} | {r['context']:,} | {r['computed_bytes'] / 2**20:,.2f} | "
                     f"{r['measured_bytes'] / 2**20:,.2f} | {r['prefill_s']:.2f} | {r['decode_tokens_per_s']:,.1f} |")
    note = (f"Long context: each arm's architecture with random weights (speed and cache size do not depend on them) and "
            f"block_size raised to the longest context; prefill in chunks of {c.prefill_chunk}, then {c.new_tokens} decode "
            f"steps timed ({'one step captured as a CUDA graph' if device.type == 'cuda' else 'eager'}, "
            f"{str(dtype).removeprefix('torch.')}). "
            "Measured cache: growth of allocated GPU memory over the prefill on CUDA, the buffers' bytes on a CPU. "
            f"At {c.memory_at:,} tokens a bf16 cache is allocated per arm and its buffers counted.")
    return Measured(metrics, notes=[note], sections={"Long context": [
        "![cache bytes against context](cache_bytes.png)", "", "![decode speed against context](decode_speed.png)", "", *table]})


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return None if numerator is None or denominator is None else numerator / denominator


def claims(config: HybridConfig, metrics: Mapping[str, Any]) -> list[ClaimResult]:
    declared = [ConfigArm(**a) if isinstance(a, dict) else a for a in config.hybrid.arms]
    patterns = {a.name: arm_config(config.model, a).layer_pattern for a in declared}
    transformer = next((n for n in patterns if set(patterns[n]) == {"a"}), None)
    mamba = next((n for n in patterns if set(patterns[n]) == {"m"}), None)
    hybrid = next((n for n in patterns if set(patterns[n]) == {"a", "m"}), None)
    if not (transformer and hybrid):
        why = "needs a transformer arm (layer_pattern a) and a hybrid arm"
        return [not_measured("A hybrid's cache is far smaller at long context", SOURCE, "cache bytes", "8x", why)]
    at = config.context.memory_at
    results = [check_above(
        claim="Jamba's 1:7 hybrid keeps a much smaller decoding cache than a transformer of equal size", source=SOURCE,
        metric=f"cache bytes per sequence at {at:,} tokens, {transformer} / {hybrid} (allocated buffers)",
        measured=_ratio(metrics.get(f"{transformer}/cache_bytes_{at}"), metrics.get(f"{hybrid}/cache_bytes_{at}")),
        bound=MEMORY_RATIO, factor=1.0, paper="KV cache 4 GB vs 32 GB (Mixtral) at 256k tokens: 8x (Table 1)",
        bound_name=f"the {MEMORY_RATIO:g}x bar at 32k")]
    longest, batch = max(config.context.lengths), max(config.context.batches)
    # reports written before `long_context/decode` was kept name no timing mode
    mode = f" ({metrics['long_context/decode']})" if "long_context/decode" in metrics else ""
    results.append(check_above(
        claim="The hybrid decodes faster than a transformer at long context", source=SOURCE,
        metric=f"decode tokens/s at {longest:,} tokens, batch {batch}, {hybrid} / {transformer}{mode}",
        measured=_ratio(metrics.get(f"{hybrid}/decode_tokens_per_s/b{batch}/{longest}"),
                        metrics.get(f"{transformer}/decode_tokens_per_s/b{batch}/{longest}")),
        bound=THROUGHPUT_RATIO, factor=1.0,
        paper="3x the throughput of Mixtral at long context (Fig. 3b)", bound_name=f"Jamba's {THROUGHPUT_RATIO:g}x"))
    if mamba:
        pure = min(metrics.get(f"{transformer}/val_loss") or float("inf"), metrics.get(f"{mamba}/val_loss") or float("inf"))
        results.append(check_below(
            claim="The hybrid reaches a lower loss than pure attention and pure Mamba at equal size", source=f"{SOURCE}, Sec. 6.1",
            metric=f"validation loss of {hybrid} (nats/token)", measured=metrics.get(f"{hybrid}/val_loss"), bound=pure, factor=1.0,
            paper="hybrid below both at 1.3B and 7B (Table 4, Fig. 5)", bound_name=f"the better of {transformer} and {mamba}"))
    return results


register(
    Technique(
        name="hybrid",
        summary="Jamba-style hybrid: Mamba layers with a little attention (and MoE) vs transformer vs pure Mamba",
        config=HybridConfig,
        module=HybridModule,
        build=build,
        steps=(DATA, arms(_sizes), SPEED, ARM_EVAL, Step("cache", _cache), Step("arms table", _arms_table),
               Step("long context", _long_context)),
        claims=claims,
        aliases=("jamba",),
        golden_overrides=(*CORPUS, *SHRINK, "model.n_layer=8", "hybrid.param_tolerance=10", "context.lengths=[16,32]",
                          "context.new_tokens=4", "context.memory_at=64"),
    )
)
