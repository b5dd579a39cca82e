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
from typing import Any

from datamodules.pretrain import CorpusConfig, PretrainDataModule
from measurement.speculative import PROMPTS_FILE, measure_arms
from modules.training.mtp import MTPModule, MTPSettings
from modules.nn import DecoderConfig
from modules.training.pretrain import OptimConfig
from reports.claims import check_above, check_below, not_measured
from reports.plots import loss_curves
from repro.arm_findings import arm_metrics
from repro.evaluate import arm_scores
from repro.golden import CORPUS, SHRINK
from repro.registry import Findings, Technique, register
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


def findings(config: MTPConfig, final: dict[str, float], module: MTPModule, datamodule: PretrainDataModule,
             speed: list[dict[str, float]]) -> Findings:
    run_dir = Path(module.trainer.default_root_dir)
    seq = config.model.block_size

    def sizes(arm: Any) -> dict[str, Any]:
        decoder, heads = module.decoder(arm.name), module.mtp_heads(arm.name)
        return {
            **{f"val_mtp{k}": final.get(f"val/{arm.name}/mtp{k}") for k in range(1, arm.depth + 1)},
            "params": decoder.num_params() + (heads.num_params() if heads else 0),
            "flops_per_token": decoder.flops_per_token(seq) + (heads.flops_per_token(seq) if heads else 0),
        }

    metrics = arm_metrics(module, final, datamodule, speed, sizes)

    scores = arm_scores(run_dir, [a.name for a in module.arms], config.eval, str(module.device), final) if config.eval.enabled else {}
    prompts = _prompts(datamodule, config.decode)
    (run_dir / PROMPTS_FILE).write_text(json.dumps({"new_tokens": config.decode.new_tokens, "prompts": prompts}))
    decoding = measure_arms(module, prompts, config.decode.new_tokens, tuple(config.decode.temperatures), config.decode.repeats)
    (run_dir / "decoding.json").write_text(json.dumps(decoding, indent=2))
    for r in decoding:
        tag = f"decode/{r['arm']}/d{r['depth']}/t{r['temperature']:g}"
        metrics |= {f"{tag}/acceptance_1": r["acceptance"][0], f"{tag}/tokens_per_round": r["tokens_per_round"],
                    f"{tag}/speedup": r["speedup"]}
        if "identical" in r:
            metrics[f"{tag}/identical"] = r["identical"]

    claims = _claims(config, module, final, decoding)
    sections = _sections(config, module, metrics, scores, decoding)
    (run_dir / "arm_losses.png").write_bytes(loss_curves(module.loss_curves(), "Main-head loss of each arm (equal tokens)"))
    sections = {"Arms": ["![main-head loss per arm](arm_losses.png)", "", *sections.pop("Arms")], **sections}
    notes = [
        f"All arms train on the same {config.train.max_steps} batches of {config.data.batch_size} x {seq} tokens from the same "
        f"initial decoder weights; lambda {' then '.join(map(str, config.mtp.lambdas))} (step down at "
        f"{config.mtp.switch_at:.3f} of training), heads' losses averaged over depth as in DeepSeek-V3.",
        "Equal tokens, not equal FLOPs: the heads add the FLOPs per token shown beside each arm; the heads are dropped "
        "for plain generation and lm-eval, which score each arm's decoder alone.",
        f"Decoding: {len(prompts)} held-out prompts of {config.decode.prompt_tokens} tokens, {config.decode.new_tokens} new "
        f"tokens each, batch 1, eager PyTorch on {module.device.type}; tokens/s is the best of {config.decode.repeats} passes.",
    ]
    return Findings(metrics=metrics, claims=claims, notes=notes, sections=sections)


def _claims(config: MTPConfig, module: MTPModule, final: dict[str, float], decoding: list[dict[str, Any]]) -> list:
    claims = []
    base = next((a for a in module.arms if a.depth == 0), None)
    mtp = next((a for a in module.arms if a.depth and a.kind == "sequential"), None)
    if base and mtp:
        claims.append(check_below(
            claim="Training with MTP does not hurt the main model's next-token loss at equal tokens", source=SOURCE,
            metric=f"main-head validation loss of {mtp.name} (nats/token)", measured=final.get(f"val/{mtp.name}/loss"),
            bound=final.get(f"val/{base.name}/loss"), factor=1 + config.loss_margin,
            paper="MTP improves most benchmarks at 16B and 228B (Table 4); Gloeckle et al. find it hurts small models",
            bound_name=f"{base.name}'s loss", detail=f"margin {config.loss_margin:.0%} of the next-token arm's loss"))
    else:
        claims.append(not_measured("MTP does not hurt the main model's loss", SOURCE, "main-head validation loss",
                                   "improves benchmarks", "needs a depth-0 arm and a sequential MTP arm"))
    greedy = [r for r in decoding if r["temperature"] == 0.0 and r["depth"] == 1 and r["kind"] == "sequential"]
    first = greedy[0] if greedy else None
    claims.append(check_above(
        claim="The MTP module predicts the second token well enough to draft it", source=SOURCE,
        metric=f"share of drafted second tokens the decoder accepts, greedy, {first['arm'] if first else 'a D=1 arm'}",
        measured=first["acceptance"][0] if first else None, bound=ACCEPTANCE, factor=1.0,
        paper="85-90% acceptance of the second token (DeepSeek-V3, 671B)", bound_name="DeepSeek-V3's lower end"))
    claims.append(check_above(
        claim="Self-speculative decoding with the MTP module speeds up generation", source=SOURCE,
        metric=f"tokens/s with drafting / without, batch 1, greedy, {first['arm'] if first else 'a D=1 arm'}",
        measured=first["speedup"] if first else None, bound=SPEEDUP, factor=1.0,
        paper="1.8x tokens per second (DeepSeek-V3)", bound_name="DeepSeek-V3's 1.8x"))
    exact = [r for r in decoding if "identical" in r]
    claims.append(check_below(
        claim="Greedy speculative decoding returns exactly the decoder's own tokens", source="Leviathan et al. 2023, Sec. 2.3",
        metric="prompts whose speculative output differs from plain decoding, all arms and depths",
        measured=sum(r["prompts"] - r["identical"] for r in exact) if exact else None, bound=1, factor=1.0,
        paper="identical outputs", bound_name="one prompt"))
    return claims


def _sections(config: MTPConfig, module: MTPModule, metrics: dict[str, Any], scores: dict[str, dict[str, float]],
              decoding: list[dict[str, Any]]) -> dict[str, list[str]]:
    tasks = list(dict.fromkeys(t for s in scores.values() for t in s))
    head = ["| arm | heads | main-head val loss | heads' val losses | params | train GFLOPs/token | train s |"
            + "".join(f" {t} |" for t in tasks),
            "|---|---|---:|---|---:|---:|---:|" + "---:|" * len(tasks)]
    rows = []
    for arm in module.arms:
        name = arm.name
        heads = ", ".join(f"{metrics[f'{name}/val_mtp{k}']:.3f}" for k in range(1, arm.depth + 1)
                          if metrics.get(f"{name}/val_mtp{k}") is not None)
        kind = f"{arm.kind} D={arm.depth}" if arm.depth else "none"
        loss = metrics.get(f"{name}/val_loss")
        rows.append(f"| {name} | {kind} | {'' if loss is None else f'{loss:.4f}'} | {heads} | {metrics[f'{name}/params']:,} | "
                    f"{metrics[f'{name}/flops_per_token'] / 1e9:.4f} | {metrics[f'{name}/train_seconds']:.1f} |"
                    + "".join(f" {scores.get(name, {}).get(t, float('nan')):.4f} |" for t in tasks))
    decode = ["| arm | depth | temperature | acceptance per depth | tokens per decoder pass | plain tokens/s | speculative tokens/s "
              "| speedup | identical (greedy) |", "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in decoding:
        accept = ", ".join(f"{a:.2f}" for a in r["acceptance"])
        decode.append(f"| {r['arm']} | {r['depth']} | {r['temperature']:g} | {accept} | {r['tokens_per_round']:.2f} | "
                      f"{r['plain_tokens_per_s']:.1f} | {r['speculative_tokens_per_s']:.1f} | {r['speedup']:.2f}x | "
                      f"{r.get('identical', '')}{'/' + str(r['prompts']) if 'identical' in r else ''} |")
    return {"Arms": head + rows, "Self-speculative decoding": decode}


register(
    Technique(
        name="mtp",
        summary="multi-token prediction (DeepSeek-V3, Gloeckle et al.) and self-speculative decoding",
        config=MTPConfig,
        module=MTPModule,
        build=build,
        findings=findings,
        golden_overrides=(*CORPUS, *SHRINK, "decode.prompts=2", "decode.prompt_tokens=8", "decode.new_tokens=8",
                          "decode.repeats=1"),
    )
)
