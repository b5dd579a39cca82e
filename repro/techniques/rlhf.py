"""RLHF: PPO with a KL penalty against a learned reward model (Ziegler et al. 2019; InstructGPT, Ouyang et al. 2022).

The run starts from a `reward` stage (which starts from `pretrain`): its prompts, its reward model
and its base. The policy and the frozen reference start as the base; PPO (`modules/training/ppo.py`) rolls
out on the reward stage's training prompts and optimizes the reward model's score (`ppo.reward=model`,
the default) or the true VADER reward (`ppo.reward=true`, the DPO paper's comparison), minus the
KL penalty. The base plays the SFT policy of the DPO paper's sentiment task: a model trained on the
corpus whose prefixes are the prompts. Scored on the held-out prompts, several samples each: mean
true reward of the base and of the PPO policy, sequence KL(pi || ref), and the share of distinct
samples per prompt.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from datamodules.preference import PromptDataModule
from datamodules.tokenizer import EOT_ID
from evaluation.sentiment import sentiment
from modules.training.ppo import PPOConfig, PPOModule
from modules.training.reward import RewardModule
from reports.claims import ClaimResult, check_above, check_below, not_measured
from reports.plots import reward_kl
from repro.callbacks import History
from repro.checkpoints import load_model, load_module
from repro.config import ConfigError
from repro.golden import CORPUS, SHRINK
from repro.registry import Finished, Measured, Step, Technique, register
from repro.steps import SPEED
from repro.techniques.reward import PREFERENCES, base_of
from repro.trainer import EvalConfig, TrainConfig, check_manual_optimization

SOURCE = "Ziegler et al. 2019; InstructGPT (Ouyang et al. 2022)"
KL_SLACK = 1.5  # the held-out KL must stay under this multiple of the controller's target
DISTINCT = 0.5  # no collapse: distinct samples per prompt, as a share of the samples, must stay above this
SAMPLES = 4  # samples per held-out prompt
SE_MARGIN = 2.0  # "clearly above": PPO's mean true reward exceeds the base's by this many standard errors


@dataclass
class RolloutDataConfig:
    """The `data.` section: prompts come from the reward stage's `preference.json`."""

    batch_size: int = 64  # prompts per PPO iteration (one rollout each)
    eval_prompts: int = 64  # held-out prompts scored at each validation, `SAMPLES` samples each

    def __post_init__(self) -> None:
        if self.batch_size <= 0 or self.eval_prompts <= 0:
            raise ValueError("data.batch_size and data.eval_prompts must be positive")


@dataclass
class RLHFConfig:
    """Sections of an RLHF preset. The decoder is the base's; it has no `model.` section."""

    data: RolloutDataConfig = field(default_factory=RolloutDataConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(grad_clip=0.0))
    eval: EvalConfig = field(default_factory=EvalConfig)  # lm-eval on the policy: how far RL moved it off the corpus

    def __post_init__(self) -> None:
        check_manual_optimization(self.train, "PPO clips its own minibatch gradients; set ppo.grad_clip and train.grad_clip=0",
                                  "PPO steps once per minibatch; set ppo.minibatch_size instead")


def true_reward_of(tokenizer: Any):
    """Token rows -> VADER scores of their text (the end-of-text token dropped)."""
    return lambda rows: sentiment([tokenizer.decode([t for t in row if t != EOT_ID]) for row in rows])


def build(config: RLHFConfig, seed: int, stages: dict[str, Path]) -> tuple[PPOModule, PromptDataModule]:
    reward_dir = Path(stages["reward"]).parent.parent
    if not (reward_dir / PREFERENCES).is_file():
        raise ConfigError(f"{reward_dir}: no {PREFERENCES}; PPO needs a reward run on the embedded sentiment task "
                          "(reward data.source=sentiment), which keeps its prompts there")
    preferences = json.loads((reward_dir / PREFERENCES).read_text())
    reward_model = load_module(RewardModule, stages["reward"]).model
    base_dir = base_of(stages)
    base, tokenizer = load_model(base_dir)
    # rollouts run the full response length, as the reward stage sampled its pairs: a response cut at the
    # end-of-text token is one the reward model never saw, and its score is an invitation to exploit it
    module = PPOModule(base.config, config.ppo, config.train.max_steps, eos_id=None, true_reward=true_reward_of(tokenizer),
                       base_dir=base_dir, reward_dir=reward_dir)
    module.init_from(base, reward_model)
    train_prompts = preferences["prompts"]["train"]
    k = len(preferences["samples_train"]["responses"]) // len(train_prompts)
    module.normalize_scores([p + r for p, r in zip((p for p in train_prompts for _ in range(k)), preferences["samples_train"]["responses"])])
    prompts = preferences["prompts"]
    datamodule = PromptDataModule(prompts["train"], prompts["held_out"][: config.data.eval_prompts], config.data.batch_size, seed)
    datamodule.tokenizer = tokenizer
    return module, datamodule


def _mean_se(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan


def _samples_table(tokenizer: Any, prompts: list[list[int]], before: dict, after: dict, n: int = 4) -> list[str]:
    def text(ids: list[int]) -> str:
        return tokenizer.decode([t for t in ids if t != EOT_ID]).replace("|", "\\|").replace("\n", " ").strip()

    lines = ["Held-out prompts, the first sample of each policy (VADER score in brackets):", "",
             "| prompt | base (SFT) policy | PPO policy |", "|---|---|---|"]
    for i in range(min(n, len(prompts))):
        j = i * SAMPLES
        lines.append(f"| {text(prompts[i])} | {text(before['rows'][j])} [{before['true_reward'][j]:+.2f}] "
                     f"| {text(after['rows'][j])} [{after['true_reward'][j]:+.2f}] |")
    return lines


def _reward_kl_plot(finished: Finished) -> Measured:
    """The true reward, the score and the KL over training, from the run's history (its trainer's `History`)."""
    c = finished.config.ppo
    history = next(cb for cb in finished.module.trainer.callbacks if isinstance(cb, History)).series
    (finished.run_dir / "reward_kl.png").write_bytes(
        reward_kl(history, f"PPO against the {'reward model' if c.reward == 'model' else 'true reward'}", c.kl_target))
    return Measured(sections={"Reward and KL over training": ["![reward and KL over training](reward_kl.png)"]})


def _held_out_samples(finished: Finished) -> Measured:
    """The PPO policy and the base (its reference) sampled on the held-out prompts, the same seed for both."""
    module, datamodule, c = finished.module, finished.datamodule, finished.config.ppo
    prompts = datamodule.val_prompts
    batch = torch.tensor(prompts, device=module.device)
    after = module.evaluate_prompts(batch, seed=20_000, samples=SAMPLES)
    before = module.evaluate_prompts(batch, seed=20_000, samples=SAMPLES, policy=module.reference)
    (ppo_mean, ppo_se), (base_mean, base_se) = _mean_se(after["true_reward"]), _mean_se(before["true_reward"])
    metrics: dict[str, Any] = {
        "true_reward/base": base_mean, "true_reward/ppo": ppo_mean, "true_reward/base_se": base_se, "true_reward/ppo_se": ppo_se,
        "kl/ppo": statistics.fmean(after["kl"]), "kl/target": c.kl_target if c.kl_target is not None else "none",
        "kl/final_coef": float(module.kl_coef), "distinct/base": before["distinct"], "distinct/ppo": after["distinct"],
        "eval/prompts": len(prompts), "eval/samples_per_prompt": SAMPLES,
    }
    notes = [
        f"Base (SFT policy and frozen reference): {module.base_dir}; reward model and prompts: {module.reward_dir}.",
        f"Held-out: {len(prompts)} prompts the reward model's pairs and PPO's rollouts never used, {SAMPLES} samples each "
        f"at temperature {c.temperature}; KL is the sampled sum over response tokens of log pi - log ref.",
    ]
    return Measured(metrics, notes, {"Samples before and after": _samples_table(datamodule.tokenizer, prompts, before, after)})


def _reward_stage(finished: Finished) -> Measured:
    """The reward stage's own held-out accuracy and rank correlation with the true reward, beside this run's."""
    path = finished.module.reward_dir / "metrics.json"
    if not path.is_file():
        return Measured()
    record = json.loads(path.read_text())["metrics"]
    return Measured({f"reward_stage/{key.split('/')[-1]}": record[key]
                     for key in ("val/accuracy", "reward_model/spearman_true_reward") if key in record})


def claims(config: RLHFConfig, metrics: Mapping[str, Any]) -> list[ClaimResult]:
    c = config.ppo
    optimized = "learned reward model" if c.reward == "model" else "true reward"
    ppo_mean, ppo_se, base_mean, base_se = (metrics.get(f"true_reward/{k}") for k in ("ppo", "ppo_se", "base", "base_se"))
    measured_all = None not in (ppo_mean, ppo_se, base_mean, base_se)
    n = metrics.get("eval/prompts", 0) * metrics.get("eval/samples_per_prompt", 0)  # samples of each policy
    base_distinct, ppo_distinct = metrics.get("distinct/base"), metrics.get("distinct/ppo")
    return [
        check_above(
            claim="PPO raises the reward: the policy's samples score higher on the ground truth than the SFT policy's",
            source=SOURCE, metric="mean true reward (VADER) of samples on held-out prompts, PPO policy",
            measured=ppo_mean, bound=base_mean + SE_MARGIN * math.hypot(ppo_se, base_se) if measured_all else None, factor=1.0,
            paper="reward rises over training (Ziegler et al. Fig. 2; InstructGPT)",
            bound_name=f"base's mean + {SE_MARGIN:g} standard errors",
            detail=f"base {base_mean:.3f} ± {base_se:.3f} -> PPO {ppo_mean:.3f} ± {ppo_se:.3f} (mean ± s.e., "
                   f"{n} samples each); optimized against the {optimized}" if measured_all else "",
        ),
        check_below(
            claim="The KL penalty keeps the policy near the reference", source=SOURCE,
            metric="mean KL(pi || ref) per sequence on held-out prompts (nats)", measured=metrics.get("kl/ppo"),
            bound=c.kl_target, factor=KL_SLACK, paper="the adaptive controller holds KL near its target",
            bound_name="KL target",
        ) if c.kl_target is not None else not_measured("The KL penalty keeps the policy near the reference", SOURCE,
                                                      "KL per sequence", "KL near the target", "ppo.kl_target is null (fixed coefficient)"),
        check_above(
            claim="No collapse to one completion", source=SOURCE,
            metric=f"distinct samples per held-out prompt, share of {SAMPLES}", measured=ppo_distinct, bound=DISTINCT, factor=1.0,
            paper="a KL-regularized policy keeps its diversity", bound_name="stated floor",
            detail=f"base {base_distinct:.3f} -> PPO {ppo_distinct:.3f}" if None not in (base_distinct, ppo_distinct) else "",
        ),
    ]


register(
    Technique(
        name="rlhf",
        summary="PPO with an adaptive KL penalty against a Bradley-Terry reward model",
        config=RLHFConfig,
        module=PPOModule,
        build=build,
        steps=(Step("reward-KL plot", _reward_kl_plot), Step("held-out samples", _held_out_samples),
               Step("reward stage", _reward_stage), SPEED),
        claims=claims,
        requires=("reward",),
        eval_tasks=("repro_corpus_ppl",),
        step_metrics=("train/loss", "ppo/score", "ppo/true_reward", "ppo/kl", "ppo/kl_coef"),
        val_metrics=("val/true_reward", "val/kl", "val/distinct"),
        golden_metrics=("train/loss", "ppo/score", "ppo/kl"),
        golden_overrides=(
            *(f"reward.pretrain.{o}" for o in (*CORPUS, *SHRINK)),
            "reward.data.prompts=24", "reward.data.held_out_prompts=8", "reward.data.samples_per_prompt=2",
            "reward.data.response_tokens=8", "reward.data.min_gap=0.0", "reward.data.batch_size=4", "reward.train.max_steps=2",
            "reward.train.val_every=2", "reward.train.val_batches=1", "reward.train.checkpoint_every=2",
            "data.batch_size=8", "data.eval_prompts=4", "ppo.response_tokens=8", "ppo.minibatch_size=4", "ppo.epochs=2",
            "train.max_steps=4", "train.val_every=2", "train.val_batches=1", "train.checkpoint_every=4", "train.speed_window=2",
            "eval.enabled=false",
        ),
    )
)
