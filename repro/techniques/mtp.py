"""Multi-token prediction (DeepSeek-V3, Sec. 2.2; Gloeckle et al. 2024) and self-speculative decoding.

Arms pretrain side by side on the same batches (equal tokens): next-token prediction only, and
the decoder with MTP heads (sequential at D = 1 and D = 2, parallel at D = 1 by default). The
report compares their main-head validation loss and lm-eval scores, then decodes held-out prompts
with each arm's heads drafting and its decoder checking (`modules/decoding/speculative.py`): acceptance
per depth and tokens/s against plain decoding of the same decoder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from datamodules.pretrain import CorpusConfig, PretrainDataModule
from measurement.speculative import PROMPTS_FILE, measure_arms
from modules.training.mtp import MTPArm, MTPModule, MTPSettings
from modules.nn import DecoderConfig
from modules.training.pretrain import OptimConfig
from reports.claims import ClaimResult, check_above, check_below, not_measured
from reports.plots import loss_curves
from repro.golden import CORPUS, SHRINK
from repro.registry import Finished, Measured, Step, Technique, register
from repro.steps import ARM_EVAL, DATA, SPEED, arm_eval_scores, arms
from repro.trainer import EvalConfig, TrainConfig, check_manual_optimization

SOURCE = "DeepSeek-V3 technical report (2024), Sec. 2.2 and 5.4.3"
ACCEPTANCE = 0.85  # DeepSeek-V3: "the acceptance rate of the second token prediction ranges between 85% and 90%"
SPEEDUP = 1.8  # DeepSeek-V3: "1.8 times TPS (Tokens Per Second)"


@dataclass
class DecodeConfig:
    """The `decode.` section: self-speculative decoding of held-out prompts after training."""

    prompts: int = 16  # held-out prompts, decoded one at a time
    prompt_tokens: int = 32  # each prompt: the first tokens of a validation block
    new_tokens: int = 64
    temperatures: list[float] = field(default_factory=lambda: [0.0, 1.0])  # 0: greedy (exactness checked), 1: sampled
    repeats: int = 2  # timing: the best of this many passes over the prompts


@dataclass
class MTPConfig:
    """Sections of an MTP preset. `model.vocab_size` follows `data.vocab_size`."""

    model: DecoderConfig = field(default_factory=DecoderConfig)
    data: CorpusConfig = field(default_factory=CorpusConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    mtp: MTPSettings = field(default_factory=MTPSettings)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    loss_margin: float = 0.01  # the MTP arm's main-head loss may exceed next-token only by this share and still count as no worse
    train: TrainConfig = field(default_factory=lambda: TrainConfig(grad_clip=0.0))
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        self.model.vocab_size = self.data.vocab_size
        check_manual_optimization(self.train, "each arm clips its own gradients; set mtp.grad_clip and train.grad_clip=0",
                                  "the arms step once per batch; raise data.batch_size instead")
        if self.decode.prompt_tokens + self.decode.new_tokens + 4 > self.model.block_size:
            raise ValueError(f"decode.prompt_tokens + decode.new_tokens ({self.decode.prompt_tokens} + {self.decode.new_tokens}) "
                             f"leave no room for drafts within model.block_size {self.model.block_size}")


def build(config: MTPConfig, seed: int, stages: dict[str, Path]) -> tuple[MTPModule, PretrainDataModule]:
    module = MTPModule(config.model, config.optim, config.mtp, config.train.max_steps)
    return module, PretrainDataModule(config.data, block_size=config.model.block_size, seed=seed)


def _prompts(datamodule: PretrainDataModule, decode: DecodeConfig) -> list[list[int]]:
    """The first tokens of evenly spaced validation blocks."""
    rows = datamodule.val_set
    step = max(1, len(rows) // decode.prompts)
    return [rows[i][: decode.prompt_tokens].tolist() for i in range(0, len(rows), step)][: decode.prompts]


def _sizes(module: MTPModule, arm: MTPArm) -> dict[str, Any]:
    """An arm's parameters and training FLOPs per token: its decoder's and its heads'."""
    decoder, heads, seq = module.decoder(arm.name), module.mtp_heads(arm.name), module.config.block_size
    return {
        "params": decoder.num_params() + (heads.num_params() if heads else 0),
        "flops_per_token": decoder.flops_per_token(seq) + (heads.flops_per_token(seq) if heads else 0),
    }


def _head_losses(finished: Finished) -> Measured:
    """Each arm's heads' validation losses (`<arm>/val_mtp<k>`), beside its main-head loss."""
    return Measured({f"{arm.name}/val_mtp{k}": finished.metrics.get(f"val/{arm.name}/mtp{k}")
                     for arm in finished.module.arms for k in range(1, arm.depth + 1)})


def _arms_table(finished: Finished) -> Measured:
    """The arms' losses, sizes and lm-eval scores side by side, their loss curves, and how they were trained."""
    config, module, metrics = finished.config, finished.module, finished.metrics
    scores = arm_eval_scores(metrics, [a.name for a in module.arms])
    tasks = list(dict.fromkeys(t for s in scores.values() for t in s))
    table = ["| arm | heads | main-head val loss | heads' val losses | params | train GFLOPs/token | train s |"
             + "".join(f" {t} |" for t in tasks),
             "|---|---|---:|---|---:|---:|---:|" + "---:|" * len(tasks)]
    for arm in module.arms:
        name = arm.name
        heads = ", ".join(f"{metrics[f'{name}/val_mtp{k}']:.3f}" for k in range(1, arm.depth + 1)
                          if metrics.get(f"{name}/val_mtp{k}") is not None)
        kind = f"{arm.kind} D={arm.depth}" if arm.depth else "none"
        loss = metrics.get(f"{name}/val_loss")
        table.append(f"| {name} | {kind} | {'' if loss is None else f'{loss:.4f}'} | {heads} | {metrics[f'{name}/params']:,} | "
                     f"{metrics[f'{name}/flops_per_token'] / 1e9:.4f} | {metrics[f'{name}/train_seconds']:.1f} |"
                     + "".join(f" {scores.get(name, {}).get(t, float('nan')):.4f} |" for t in tasks))
    (finished.run_dir / "arm_losses.png").write_bytes(loss_curves(module.loss_curves(), "Main-head loss of each arm (equal tokens)"))
    notes = [
        f"All arms train on the same {config.train.max_steps} batches of {config.data.batch_size} x {config.model.block_size} "
        f"tokens from the same initial decoder weights; lambda {' then '.join(map(str, config.mtp.lambdas))} (step down at "
        f"{config.mtp.switch_at:.3f} of training), heads' losses averaged over depth as in DeepSeek-V3.",
        "Equal tokens, not equal FLOPs: the heads add the FLOPs per token shown beside each arm; the heads are dropped "
        "for plain generation and lm-eval, which score each arm's decoder alone.",
    ]
    return Measured(notes=notes, sections={"Arms": ["![main-head loss per arm](arm_losses.png)", "", *table]})


def _tag(arm: str, depth: int, temperature: float) -> str:
    """The prefix of one decoding record's metrics."""
    return f"decode/{arm}/d{depth}/t{temperature:g}"


def _decode(finished: Finished) -> Measured:
    """Held-out prompts decoded with each arm's heads drafting and its decoder checking, against plain decoding:
    per arm, depth and temperature its acceptance of the first draft, tokens per decoder pass, speedup and (greedy)
    how many prompts came out identical (`decode/<arm>/d<depth>/t<temperature>/...`); the records in decoding.json."""
    decode, module, run_dir = finished.config.decode, finished.module, finished.run_dir
    prompts = _prompts(finished.datamodule, decode)
    (run_dir / PROMPTS_FILE).write_text(json.dumps({"new_tokens": decode.new_tokens, "prompts": prompts}))
    records = measure_arms(module, prompts, decode.new_tokens, tuple(decode.temperatures), decode.repeats)
    (run_dir / "decoding.json").write_text(json.dumps(records, indent=2))
    metrics: dict[str, Any] = {"decode/prompts": len(prompts)}
    for r in records:
        tag = _tag(r["arm"], r["depth"], r["temperature"])
        metrics |= {f"{tag}/acceptance_1": r["acceptance"][0], f"{tag}/tokens_per_round": r["tokens_per_round"],
                    f"{tag}/speedup": r["speedup"]}
        if "identical" in r:
            metrics[f"{tag}/identical"] = r["identical"]
    table = ["| arm | depth | temperature | acceptance per depth | tokens per decoder pass | plain tokens/s | speculative tokens/s "
             "| speedup | identical (greedy) |", "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in records:
        accept = ", ".join(f"{a:.2f}" for a in r["acceptance"])
        table.append(f"| {r['arm']} | {r['depth']} | {r['temperature']:g} | {accept} | {r['tokens_per_round']:.2f} | "
                     f"{r['plain_tokens_per_s']:.1f} | {r['speculative_tokens_per_s']:.1f} | {r['speedup']:.2f}x | "
                     f"{r.get('identical', '')}{'/' + str(r['prompts']) if 'identical' in r else ''} |")
    note = (f"Decoding: {len(prompts)} held-out prompts of {decode.prompt_tokens} tokens, {decode.new_tokens} new tokens each, "
            f"batch 1, eager PyTorch on {module.device.type}; tokens/s is the best of {decode.repeats} passes.")
    return Measured(metrics, notes=[note], sections={"Self-speculative decoding": table})


# what a run of MTP arms measures; DeepSeek-V3's technique measures the same, and more
STEPS = (DATA, arms(_sizes), Step("head losses", _head_losses), SPEED, ARM_EVAL, Step("arms table", _arms_table),
         Step("decode", _decode))


def claims(config: MTPConfig, metrics: Mapping[str, Any]) -> list[ClaimResult]:
    found = []
    declared = [MTPArm(**a) if isinstance(a, dict) else a for a in config.mtp.arms]
    base = next((a for a in declared if a.depth == 0), None)
    mtp = next((a for a in declared if a.depth and a.kind == "sequential"), None)
    if base and mtp:
        found.append(check_below(
            claim="Training with MTP does not hurt the main model's next-token loss at equal tokens", source=SOURCE,
            metric=f"main-head validation loss of {mtp.name} (nats/token)", measured=metrics.get(f"val/{mtp.name}/loss"),
            bound=metrics.get(f"val/{base.name}/loss"), factor=1 + config.loss_margin,
            paper="MTP improves most benchmarks at 16B and 228B (Table 4); Gloeckle et al. find it hurts small models",
            bound_name=f"{base.name}'s loss", detail=f"margin {config.loss_margin:.0%} of the next-token arm's loss"))
    else:
        found.append(not_measured("MTP does not hurt the main model's loss", SOURCE, "main-head validation loss",
                                  "improves benchmarks", "needs a depth-0 arm and a sequential MTP arm"))
    greedy = 0.0 in config.decode.temperatures
    # the greedy draft of one token by the first sequential arm with heads
    first = mtp.name if mtp and greedy else None
    tag = _tag(first, 1, 0.0) if first else None
    found.append(check_above(
        claim="The MTP module predicts the second token well enough to draft it", source=SOURCE,
        metric=f"share of drafted second tokens the decoder accepts, greedy, {first or 'a D=1 arm'}",
        measured=metrics.get(f"{tag}/acceptance_1") if tag else None, bound=ACCEPTANCE, factor=1.0,
        paper="85-90% acceptance of the second token (DeepSeek-V3, 671B)", bound_name="DeepSeek-V3's lower end"))
    found.append(check_above(
        claim="Self-speculative decoding with the MTP module speeds up generation", source=SOURCE,
        metric=f"tokens/s with drafting / without, batch 1, greedy, {first or 'a D=1 arm'}",
        measured=metrics.get(f"{tag}/speedup") if tag else None, bound=SPEEDUP, factor=1.0,
        paper="1.8x tokens per second (DeepSeek-V3)", bound_name="DeepSeek-V3's 1.8x"))
    # every arm with heads decodes greedily at each depth up to its own
    identical = [metrics.get(f"{_tag(a.name, d, 0.0)}/identical") for a in declared for d in range(1, a.depth + 1)] if greedy else []
    # reports written before `decode/prompts` was kept decoded `decode.prompts` prompts (their validation sets hold more blocks)
    prompts = metrics.get("decode/prompts", config.decode.prompts)
    differ = sum(prompts - n for n in identical) if identical and None not in identical else None
    found.append(check_below(
        claim="Greedy speculative decoding returns exactly the decoder's own tokens", source="Leviathan et al. 2023, Sec. 2.3",
        metric="prompts whose speculative output differs from plain decoding, all arms and depths",
        measured=differ, bound=1, factor=1.0, paper="identical outputs", bound_name="one prompt"))
    return found


register(
    Technique(
        name="mtp",
        summary="multi-token prediction (DeepSeek-V3, Gloeckle et al.) and self-speculative decoding",
        config=MTPConfig,
        module=MTPModule,
        build=build,
        steps=STEPS,
        claims=claims,
        golden_overrides=(*CORPUS, *SHRINK, "decode.prompts=2", "decode.prompt_tokens=8", "decode.new_tokens=8",
                          "decode.repeats=1"),
    )
)
