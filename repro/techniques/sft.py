"""Supervised fine-tuning on instructions (InstructGPT, Ouyang et al. 2022), full and LoRA (Hu et al. 2021).

The run starts from a pretrained base: the `pretrain` stage of the same preset, trained once and
reused (its settings can be changed with `--set pretrain.<section>.<key>=...`). It adds the chat
tokens to the base's tokenizer, trains both arms (`modules/training/sft.py`), and scores the base, the
full fine-tune and the LoRA fine-tune on the held-out rows of every verifiable family through
lm-eval (the fine-tunes through their chat template), with trained parameters and time per arm.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from datamodules.chat import INIT_FROM, add_chat_tokens
from datamodules.sft import FAMILIES, VERIFIABLE, SFTDataConfig, SFTDataModule
from datamodules.tokenizer import EOT, EOT_ID
from modules.training.sft import LoraSettings, SFTModule, SFTOptimConfig
from reports.claims import ClaimResult, check_above, check_below, not_measured
from repro.checkpoints import load_model
from repro.evaluate import evaluate
from repro.golden import CORPUS, SHRINK
from repro.registry import Finished, Measured, Step, Technique, register
from repro.steps import DATA, SPEED
from repro.trainer import EvalConfig, TrainConfig, check_manual_optimization

SOURCE = "InstructGPT (Ouyang et al. 2022)"
LORA_SOURCE = "LoRA (Hu et al. 2021); InstructGPT"
EASIEST_TARGET = 0.8  # held-out exact match the easiest family must exceed after SFT
LORA_NEAR = 0.9  # LoRA's mean exact match over families, as a share of full fine-tuning's
LORA_FEW = 0.1  # LoRA's trained parameters, as a share of full fine-tuning's


def task_of(family: str) -> str:
    return f"repro_verifiable_{family}"


@dataclass
class SFTConfig:
    """Sections of an SFT preset. The decoder is the base's (plus the chat tokens); it has no `model.` section."""

    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    optim: SFTOptimConfig = field(default_factory=SFTOptimConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(grad_clip=0.0))
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        check_manual_optimization(self.train, "SFT clips each arm's gradients itself; set optim.grad_clip and train.grad_clip=0",
                                  "SFT steps each arm once per batch; raise data.batch_size instead")
        if self.eval.tasks is None:  # every family, trained on or not: the report shows what did not transfer too
            self.eval.tasks = [task_of(f) for f in FAMILIES]


def build(config: SFTConfig, seed: int, stages: dict[str, Path]) -> tuple[SFTModule, SFTDataModule]:
    base_dir = Path(stages["pretrain"]).parent.parent
    base, tokenizer = load_model(base_dir)
    chat_ids = add_chat_tokens(tokenizer)
    module = SFTModule(replace(base.config, vocab_size=tokenizer.get_vocab_size()), config.optim, config.train.max_steps,
                       config.lora, new_tokens=sorted(chat_ids.values()), base_dir=base_dir)
    sources = {chat_ids[token]: [EOT_ID] if word == EOT else tokenizer.encode(word).ids for token, word in INIT_FROM.items()}
    module.init_from_base(base, sources)
    # a conversation of n tokens trains on n - 1 positions: at most block_size + 1 tokens fit the base
    data = replace(config.data, max_len=min(config.data.max_len, base.config.block_size + 1))
    return module, SFTDataModule(data, tokenizer, seed)


def evaluated_families(config: SFTConfig) -> list[str]:
    """The verifiable families among the evaluation tasks, in the order of `eval.tasks`."""
    return [f for f in FAMILIES if task_of(f) in (config.eval.tasks or [])]


def _scores(results: dict[str, Any], families: list[str]) -> dict[str, float]:
    return {f: results["results"][task_of(f)]["exact_match,strip"] for f in families if task_of(f) in results["results"]}


def _data(finished: Finished) -> Measured:
    """The shared `data` step, and the share of the conversations' tokens the loss is taken on."""
    measured, stats = DATA.run(finished), finished.datamodule.stats
    measured.metrics["data/supervised_share"] = stats.get("supervised_tokens", 0) / max(1, stats.get("tokens", 1))
    return measured


def _arms(finished: Finished) -> Measured:
    """Per arm (full, lora): its trained parameters, its optimizer state and its training seconds."""
    module, metrics = finished.module, {}
    for arm in module.arms:
        metrics[f"{arm}/trained_params"] = module.trained_params(arm)
        metrics[f"{arm}/train_state_mib"] = module.optimizer_state_bytes(arm) / 2**20
        metrics[f"{arm}/train_seconds"] = module.seconds[arm]
    return Measured(metrics)


def _exact_match(finished: Finished) -> Measured:
    """Held-out exact match per family (`exact_match/<family>/<arm>`) of the base, the full fine-tune (the run's own
    lm-eval scores) and the LoRA fine-tune, through lm-eval."""
    config, module = finished.config, finished.module
    notes = [f"Base: the pretrain stage at {module.base_dir}. Exact match on the first {config.eval.limit or 'all'} held-out rows "
             "per family; the base reads plain `Q: ...\\nA:` prompts, the fine-tunes the same prompts through the chat template."]
    if not config.eval.enabled:
        return Measured(notes=notes)
    families, settings, device = evaluated_families(config), config.eval, str(module.device)
    tasks = [task_of(f) for f in families]
    scores = {"base": _scores(evaluate(module.base_dir, tasks, settings.limit, settings.batch_size, device), families),
              "full": {f: finished.metrics[f"eval/{task_of(f)}/exact_match (strip)"] for f in families
                       if f"eval/{task_of(f)}/exact_match (strip)" in finished.metrics}}
    if "lora" in module.arms:
        scores["lora"] = _scores(evaluate(finished.run_dir, tasks, settings.limit, settings.batch_size, device, arm="lora"), families)
    metrics = {f"exact_match/{family}/{arm}": value for arm, by_family in scores.items() for family, value in by_family.items()}
    return Measured(metrics, notes)


def claims(config: SFTConfig, metrics: Mapping[str, Any]) -> list[ClaimResult]:
    families = evaluated_families(config)
    # the claims are about what SFT teaches: the families trained on, when the data is the embedded source
    taught = [f for f in families if f in config.data.families] if config.data.source == VERIFIABLE else families
    full, base, lora = ({f: metrics[f"exact_match/{f}/{arm}"] for f in taught if f"exact_match/{f}/{arm}" in metrics}
                        for arm in ("full", "base", "lora"))
    results = []
    if full:
        easiest = max(full, key=full.get)
        results.append(check_above(
            claim="Supervised demonstrations teach instruction following: held-out exact match rises from near 0 (base) to high",
            source=SOURCE, metric=f"held-out exact match, easiest family trained on ({easiest}), full SFT",
            measured=full[easiest], bound=EASIEST_TARGET, factor=1.0,
            paper="instruction-following rises sharply after SFT on demonstrations", bound_name="target",
            detail=f"base {base.get(easiest, float('nan')):.3g} -> SFT {full[easiest]:.3g} on {easiest}; per family in the results",
        ))
    else:
        results.append(not_measured("Supervised demonstrations teach instruction following", SOURCE, "held-out exact match",
                                    "rises after SFT", "lm-eval was off (eval.enabled=false)"))
    if full and lora:
        full_mean, lora_mean = statistics.fmean(full.values()), statistics.fmean(lora[f] for f in full if f in lora)
        results.append(check_above(
            claim="LoRA reaches near full fine-tuning", source=LORA_SOURCE,
            metric="mean held-out exact match over the families trained on, LoRA", measured=lora_mean, bound=full_mean, factor=LORA_NEAR,
            paper="LoRA matches or nears full fine-tuning", bound_name="full fine-tuning's",
        ))
    else:
        results.append(not_measured("LoRA reaches near full fine-tuning", LORA_SOURCE, "mean held-out exact match", "near full FT",
                                    "needs lm-eval and the LoRA arm (lora.enabled)"))
    if config.lora.enabled:  # the LoRA arm trained
        results.append(check_below(
            claim="LoRA trains far fewer parameters", source=LORA_SOURCE, metric="trained parameters, LoRA",
            measured=metrics.get("lora/trained_params"), bound=metrics.get("full/trained_params"), factor=LORA_FEW,
            paper="10,000x fewer for GPT-3 175B", bound_name="full fine-tuning's",
        ))
    return results


register(
    Technique(
        name="sft",
        summary="instruction tuning: full fine-tuning and LoRA side by side from a pretrained base",
        config=SFTConfig,
        module=SFTModule,
        build=build,
        steps=(Step("data", _data), Step("arms", _arms), SPEED, Step("exact match", _exact_match)),
        claims=claims,
        requires=("pretrain",),
        eval_tasks=tuple(task_of(f) for f in FAMILIES),
        step_metrics=("train/loss", "train/loss_lora"),
        golden_metrics=("train/loss", "train/loss_lora", "val/loss"),
        golden_overrides=(
            *(f"pretrain.{o}" for o in (*CORPUS, *SHRINK)),
            "data.families=[copy,reverse,sort,count_letter,arithmetic]", "data.per_family=40", "data.batch_size=8", "train.max_steps=8", "train.val_every=4", "train.val_batches=2",
            "train.checkpoint_every=8", "train.speed_window=4", "eval.enabled=false",
        ),
    )
)
