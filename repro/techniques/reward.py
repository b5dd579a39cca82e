"""A Bradley-Terry reward model from preference pairs (Stiennon et al. 2020; InstructGPT, Ouyang et al. 2022).

The run starts from the `pretrain` stage of its preset: the base policy samples continuations of
held-out corpus prompts, VADER labels the pairs (`datamodules/preference.py`), and the reward
model, the base with a scalar head, learns from the pairs alone. Scored by pairwise accuracy on
the pairs of held-out prompts and by rank correlation with the true reward over every held-out
sample. The run folder keeps the prompts and pairs (`preference.json`) for the stages after it
(PPO, DPO).
"""

from __future__ import annotations

import json
import random
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from scipy.stats import spearmanr

from datamodules.preference import (SENTIMENT, Pair, PreferenceDataConfig, PreferenceDataModule, corpus_prompts, label_pairs,
                                    read_pairs, sample_responses, split_prompts)
from datamodules.tokenizer import EOT_ID
from evaluation.build_tasks import corpus_of_run, held_out_texts
from evaluation.sentiment import sentiment
from modules.training.pretrain import OptimConfig
from modules.training.reward import RewardModule, concordance
from reports.claims import ClaimResult, check_above, not_measured
from repro.checkpoints import load_model
from repro.golden import CORPUS, SHRINK
from repro.registry import Finished, Measured, Step, Technique, register
from repro.steps import DATA, SPEED
from repro.trainer import TrainConfig

SOURCE = "Stiennon et al. 2020; InstructGPT (Ouyang et al. 2022)"
ACCURACY = 0.65  # held-out pairwise accuracy the reward model must exceed ("well above 50%")
CONCORDANCE = 0.65  # Harrell's C against the true reward over all held-out samples, same bar
PREFERENCES = "preference.json"


@dataclass
class RewardConfig:
    """Sections of a reward-model preset. The decoder is the base's; it has no `model.` section."""

    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, warmup_steps=20, weight_decay=0.0))
    train: TrainConfig = field(default_factory=TrainConfig)


def base_of(stages: dict[str, Path]) -> Path:
    """The run folder of the base a stage chain started from (`pretrain`, directly or through `stages.json`)."""
    for name in ("pretrain", "reward", "rlhf"):
        if name in stages:
            run_dir = Path(stages[name]).parent.parent
            if name == "pretrain":
                return run_dir
            return base_of({k: Path(v) for k, v in json.loads((run_dir / "stages.json").read_text()).items()})
    raise ValueError(f"no pretrain stage among {sorted(stages)}")


def sentiment_data(base_dir: Path, config: PreferenceDataConfig, seed: int) -> dict[str, Any]:
    """Prompts, samples and pairs of the embedded task, from the base at `base_dir` (see the module docstring)."""
    base, tokenizer = load_model(base_dir)
    texts, _ = held_out_texts(corpus_of_run(base_dir))
    prompts = corpus_prompts(texts, tokenizer, config.prompt_tokens, config.prompts + config.held_out_prompts, seed)
    train, held_out = split_prompts(prompts, config.prompts, config.held_out_prompts)
    out: dict[str, Any] = {"prompts": {"train": train, "held_out": held_out}}
    k = config.samples_per_prompt
    for split, split_prompts_ in (("train", train), ("held_out", held_out)):
        responses = sample_responses(base, split_prompts_, config, seed + (split == "held_out"), progress=True)
        rewards = sentiment([tokenizer.decode([t for t in r if t != EOT_ID]) for r in responses])
        out[f"samples_{split}"] = {"responses": responses, "rewards": rewards}
        out[f"pairs_{split}"] = [asdict(p) for p in label_pairs(split_prompts_, responses, rewards, k, config.min_gap, config.every_pair)]
    return out


def build(config: RewardConfig, seed: int, stages: dict[str, Path]) -> tuple[RewardModule, PreferenceDataModule]:
    base_dir = base_of(stages)
    base, tokenizer = load_model(base_dir)
    module = RewardModule(base.config, config.optim, config.train.max_steps, base_dir=base_dir)
    module.init_from_base(base)
    data = config.data
    if data.source == SENTIMENT:
        preferences = sentiment_data(base_dir, data, seed)
        train = [Pair(**p) for p in preferences["pairs_train"]]
        val = [Pair(**p) for p in preferences["pairs_held_out"]]
    else:
        preferences = None
        pairs = read_pairs(data.source, tokenizer, data.hub_split, Path(data.cache_dir) if data.cache_dir else None)
        random.Random(seed).shuffle(pairs)
        n_val = max(1, int(len(pairs) * data.val_fraction))
        train, val = pairs[n_val:], pairs[:n_val]
    datamodule = PreferenceDataModule(data, train, val, pad_id=EOT_ID, seed=seed)
    datamodule.tokenizer, datamodule.preferences = tokenizer, preferences
    return module, datamodule


def agreement(model: Any, preferences: dict[str, Any], k: int) -> dict[str, float]:
    """How the reward model's scores of the held-out samples agree with their true rewards (none if those are all equal)."""
    held = preferences["samples_held_out"]
    rewards = held["rewards"]
    out = {"true_reward/held_out_mean": statistics.fmean(rewards),
           "true_reward/held_out_nonzero_share": sum(r != 0 for r in rewards) / len(rewards)}
    if len(set(rewards)) < 2:
        return out
    prompts = [p for p in preferences["prompts"]["held_out"] for _ in range(k)]
    model.eval()
    scores = model.score([p + r for p, r in zip(prompts, held["responses"])]).cpu()
    truth = torch.tensor(rewards)
    # ties in the true reward (most samples score 0) cap a rank correlation below 1: the cap is the
    # truth's correlation with itself, its ties broken at random
    jitter = 1e-9 * torch.randn(len(truth), generator=torch.Generator().manual_seed(0))
    return out | {"reward_model/concordance_true_reward": concordance(scores, truth),
                  "reward_model/spearman_true_reward": float(spearmanr(scores.numpy(), truth.numpy()).statistic),
                  "reward_model/spearman_ceiling_with_ties": float(spearmanr((truth + jitter).numpy(), truth.numpy()).statistic)}


def _preferences(finished: Finished) -> Measured:
    """Keep the prompts and pairs in the run folder for the stages after it; say where the base and the pairs came from."""
    module, preferences = finished.module, finished.datamodule.preferences
    notes = [f"Base: the pretrain stage at {module.base_dir}."]
    if preferences is not None:
        (finished.run_dir / PREFERENCES).write_text(json.dumps(preferences))
        c = finished.config.data
        which = "every pair" if c.every_pair else "the best and the worst"
        notes.append(f"Pairs: {which} of {c.samples_per_prompt} continuations ({c.response_tokens} tokens, "
                     f"temperature {c.temperature}) of {c.prompt_tokens}-token prompts from held-out corpus paragraphs, "
                     f"labelled by VADER; gaps under {c.min_gap} are ties and dropped.")
    return Measured(notes=notes)


def _agreement(finished: Finished) -> Measured:
    """The trained reward model's agreement with the true reward over the held-out samples (`agreement`)."""
    preferences = finished.datamodule.preferences
    if preferences is None:  # pairs from a file or the hub: no ground-truth reward
        return Measured()
    return Measured(agreement(finished.module.model, preferences, finished.config.data.samples_per_prompt))


def claims(config: RewardConfig, metrics: Mapping[str, Any]) -> list[ClaimResult]:
    pairs = metrics.get("data/pairs_val")
    results = [check_above(
        claim="A Bradley-Terry reward model learns the pairwise preferences", source=SOURCE,
        metric="pairwise accuracy on held-out pairs", measured=metrics.get("val/accuracy"), bound=ACCURACY, factor=1.0,
        paper="InstructGPT's reward models: about 72% on held-out human comparisons", bound_name="target",
        detail=f"{pairs} held-out pairs; chance is 0.5" if pairs is not None else "",
    )]
    agreement_keys = ("reward_model/concordance_true_reward", "reward_model/spearman_true_reward",
                      "reward_model/spearman_ceiling_with_ties")
    c_index, spearman, ceiling = (metrics.get(k) for k in agreement_keys)
    if None not in (c_index, spearman, ceiling):
        samples = config.data.held_out_prompts * config.data.samples_per_prompt  # every held-out prompt, k samples each
        results.append(check_above(
            claim="The reward model agrees with the ground-truth reward it never saw", source=SOURCE,
            metric="concordance (Harrell's C) with VADER over all held-out samples", measured=c_index, bound=CONCORDANCE,
            factor=1.0, paper="reward models track the preference they were trained on", bound_name="target",
            detail=f"{samples} samples of held-out prompts, compared across prompts too; "
                   f"chance is 0.5; Spearman {spearman:.3f} (at most {ceiling:.3f} with these ties)",
        ))
    else:
        if config.data.source != SENTIMENT:
            why = "pairs from a file or the hub carry no ground-truth reward"
        elif "true_reward/held_out_mean" in metrics:
            why = "every held-out sample has the same true reward"
        else:
            why = "the held-out samples were not scored"
        results.append(not_measured("The reward model agrees with the ground-truth reward", SOURCE, "rank correlation",
                                    "tracks the preference", why))
    return results


register(
    Technique(
        name="reward",
        summary="a Bradley-Terry reward model from preference pairs labelled by a sentiment lexicon",
        config=RewardConfig,
        module=RewardModule,
        build=build,
        steps=(DATA, SPEED, Step("preferences", _preferences), Step("agreement", _agreement)),
        claims=claims,
        requires=("pretrain",),
        eval_tasks=(),
        step_metrics=("train/loss", "train/accuracy"),
        golden_metrics=("train/loss", "val/loss"),
        quick=("data.prompts=8", "data.held_out_prompts=4", "data.samples_per_prompt=4", "data.min_gap=0.0"),
        golden_overrides=(
            *(f"pretrain.{o}" for o in (*CORPUS, *SHRINK)),
            "data.prompts=24", "data.held_out_prompts=8", "data.samples_per_prompt=2", "data.response_tokens=8",
            "data.min_gap=0.0", "data.batch_size=4", "train.max_steps=6", "train.val_every=3", "train.val_batches=2",
            "train.checkpoint_every=6", "train.speed_window=3",
        ),
    )
)
