"""DPO against PPO on controlled sentiment generation: the reward/KL frontier of Rafailov et al. 2023, Fig. 2 (left).

The run starts from a `reward` stage (which starts from `pretrain`): its VADER-labelled pairs, its
prompts and its base. The DPO arms (`dpo.arms`: DPO at several betas, IPO, conservative DPO,
SimPO, LoRA-DPO) train side by side on the same batches from the base, the reference's
log-probabilities cached once per pair (`modules/training/dpo.py`). PPO arms train against the true reward
at several KL targets (`frontier.kl_targets`), as the paper ran PPO with the ground-truth reward.
Every arm and the base are then scored on the same held-out prompts, several samples each:
(mean KL(pi || ref) per sequence, mean true reward) is one point of the frontier.
"""

from __future__ import annotations

import json
import math
import random
import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import torch

from datamodules.preference import SENTIMENT, Pair, PreferenceDataConfig, PreferenceDataModule, PromptDataModule, collate_pairs, read_pairs
from datamodules.tokenizer import EOT_ID
from modules.training.dpo import Arm, DPOModule, DPOSettings, reference_logps, sequence_logps
from modules.training.ppo import PPOConfig, PPOModule
from reports.claims import ClaimResult, check_above, check_below, not_measured
from reports.plots import frontier_plot
from repro.checkpoints import load_model
from repro.config import ConfigError
from repro.golden import CORPUS, SHRINK
from repro.registry import Finished, Fit, Measured, Step, Technique, register
from repro.steps import DATA
from repro.techniques.reward import ACCURACY, PREFERENCES, base_of
from repro.techniques.rlhf import SAMPLES, true_reward_of
from repro.trainer import EvalConfig, TrainConfig, check_manual_optimization

SOURCE = "DPO (Rafailov et al. 2023), Fig. 2 left"


@dataclass
class DPODataConfig:
    """The `data.` section: pairs from the reward stage (embedded), a local file or the hub."""

    source: str = SENTIMENT  # "sentiment": the reward stage's VADER-labelled pairs; else a .jsonl/.json/.parquet or hf:<name>
    batch_size: int = 32  # pairs per batch
    max_len: int = 128
    val_fraction: float = 0.1  # files and hub only; the embedded pairs of held-out prompts are the validation set
    hub_split: str = "train"
    cache_dir: str | None = None
    eval_prompts: int = 64  # held-out prompts every arm is scored on, `SAMPLES` samples each


@dataclass
class FrontierConfig:
    """The `frontier.` section: PPO arms against the true reward, one per KL target."""

    kl_targets: list[float] = field(default_factory=lambda: [2.0, 4.0, 8.0])  # [] trains no PPO arm
    ppo_steps: int = 100  # PPO iterations per arm
    ppo_batch_size: int = 64  # prompts per PPO iteration
    ppo: PPOConfig = field(default_factory=lambda: PPOConfig(reward="true"))

    def __post_init__(self) -> None:
        if isinstance(self.ppo, dict):
            self.ppo = PPOConfig(**self.ppo)
        if self.ppo.reward != "true":
            raise ValueError("frontier.ppo.reward must be 'true': the frontier compares DPO and PPO on the ground-truth reward")


@dataclass
class DPOConfig:
    """Sections of a DPO preset. The decoder is the base's; it has no `model.` section."""

    data: DPODataConfig = field(default_factory=DPODataConfig)
    dpo: DPOSettings = field(default_factory=DPOSettings)
    frontier: FrontierConfig = field(default_factory=FrontierConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(grad_clip=0.0))
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(tasks=["repro_corpus_ppl"]))

    def __post_init__(self) -> None:
        check_manual_optimization(self.train, "each DPO arm clips its own gradients; set dpo.grad_clip and train.grad_clip=0",
                                  "DPO steps each arm once per batch; raise data.batch_size instead")


def with_reference(datamodule: PreferenceDataModule, base: Any, batch: int = 256) -> None:
    """Cache the base's sequence log-probs of every pair's responses on the pairs themselves."""
    for dataset in (datamodule.train_set, datamodule.val_set):
        pairs = dataset.pairs
        chunks = [pairs[i : i + batch] for i in range(0, len(pairs), batch)]
        for chunk in chunks:
            logps = reference_logps(base, [collate_pairs(chunk, datamodule.pad_id)])
            chosen, rejected = logps.chunk(2)
            for pair, c, r in zip(chunk, chosen.tolist(), rejected.tolist()):
                pair.ref_chosen, pair.ref_rejected = c, r


def build(config: DPOConfig, seed: int, stages: dict[str, Path]) -> tuple[DPOModule, PreferenceDataModule]:

    reward_dir = Path(stages["reward"]).parent.parent
    base_dir = base_of(stages)
    base, tokenizer = load_model(base_dir)
    d = config.data
    preferences = json.loads((reward_dir / PREFERENCES).read_text()) if (reward_dir / PREFERENCES).is_file() else None
    if d.source == SENTIMENT:
        if preferences is None:
            raise ConfigError(f"{reward_dir}: no {PREFERENCES}; data.source=sentiment needs a reward run on the embedded task")
        train = [Pair(**p) for p in preferences["pairs_train"]]
        val = [Pair(**p) for p in preferences["pairs_held_out"]]
    else:
        pairs = read_pairs(d.source, tokenizer, d.hub_split, Path(d.cache_dir) if d.cache_dir else None)
        random.Random(seed).shuffle(pairs)
        n_val = max(1, int(len(pairs) * d.val_fraction))
        train, val = pairs[n_val:], pairs[:n_val]
    data = PreferenceDataConfig(source=d.source, batch_size=d.batch_size, max_len=d.max_len, val_fraction=d.val_fraction,
                                hub_split=d.hub_split, cache_dir=d.cache_dir)
    datamodule = PreferenceDataModule(data, train, val, pad_id=EOT_ID, seed=seed)
    with_reference(datamodule, base)
    datamodule.tokenizer, datamodule.preferences = tokenizer, preferences
    module = DPOModule(base.config, config.dpo, config.train.max_steps, base_dir=base_dir, reward_dir=reward_dir)
    module.init_from(base)
    return module, datamodule


def _point(result: dict[str, Any]) -> dict[str, float]:
    rewards = result["true_reward"]
    return {"kl": statistics.fmean(result["kl"]), "reward": statistics.fmean(rewards),
            "reward_se": statistics.stdev(rewards) / math.sqrt(len(rewards)), "distinct": result["distinct"]}


def kind_of(arm: Any) -> str:
    """The arm's family on the frontier: plain DPO arms make DPO's frontier; cDPO, LoRA-DPO, IPO and SimPO are shown apart."""
    name = {"dpo": "DPO", "ipo": "IPO", "simpo": "SimPO"}[arm.loss]
    if arm.loss == "dpo" and arm.label_smoothing:
        name = "cDPO"
    return f"LoRA-{name}" if arm.lora else name


def undominated(dpo: list[dict[str, float]], ppo: list[dict[str, float]]) -> list[dict[str, float]]:
    """PPO points that no DPO point matches: none at or below their KL with at least their reward."""
    return [p for p in ppo if not any(d["kl"] <= p["kl"] and d["reward"] >= p["reward"] for d in dpo)]


def ppo_arms(config: DPOConfig, module: DPOModule, datamodule: PreferenceDataModule, seed: int) -> list[Fit]:
    """One PPO arm per KL target, each from the base against the true reward on the reward stage's prompts, trained by
    the runner after the DPO arms."""
    f = config.frontier
    if datamodule.preferences is None:  # pairs from a file or the hub: no prompts to roll out, no true reward
        return []
    prompts = datamodule.preferences["prompts"]
    held_out = prompts["held_out"][: config.data.eval_prompts]  # one validation batch at the end, shared over the ranks
    train = replace(config.train, max_steps=f.ppo_steps, val_every=f.ppo_steps, val_batches=1)

    def arm(target: float) -> PPOModule:
        base = load_model(module.base_dir)[0]
        ppo = PPOModule(base.config, replace(f.ppo, kl_target=target), f.ppo_steps, eos_id=None,
                        true_reward=true_reward_of(datamodule.tokenizer))
        ppo.init_from(base, None)
        return ppo

    return [Fit(f"ppo-kl{target:g}", module=lambda target=target: arm(target),
                datamodule=lambda: PromptDataModule(prompts["train"], held_out, f.ppo_batch_size, seed),
                train=train, step_metrics=("train/loss", "ppo/kl", "ppo/true_reward"), val_metrics=("val/kl", "val/true_reward"))
            for target in f.kl_targets]


def _held_out_pairs(finished: Finished) -> Measured:
    """Per arm, on the held-out pairs: the implicit reward's accuracy (from the last validation) and the log-prob drift."""
    module = finished.module
    metrics = {f"{arm.name}/implicit_reward_accuracy": finished.metrics.get(f"val/{arm.name}/accuracy") for arm in module.arms}
    for name, (chosen, rejected) in _logp_drift(module, finished.datamodule).items():
        metrics |= {f"{name}/logp_chosen_change": chosen, f"{name}/logp_rejected_change": rejected}
    return Measured(metrics)


def _frontier(finished: Finished) -> Measured:
    """The base, every DPO arm and every PPO arm scored on the same held-out prompts: one (KL, true reward) point each,
    the frontier's plot and table. The evaluator samples and scores them all: the base is its policy and reference."""
    config, module, datamodule = finished.config, finished.module, finished.datamodule
    notes = [f"Base (reference, and the start of every arm): {module.base_dir}; pairs and prompts: {module.reward_dir}.",
             f"Every point: {config.data.eval_prompts} held-out prompts x {SAMPLES} samples at temperature 1; KL is the "
             "sampled sum over response tokens of log pi - log ref; the true reward is VADER's compound score.",
             f"PPO arms: {config.frontier.ppo_steps} iterations of {config.frontier.ppo_batch_size} prompts against the true reward."]
    if datamodule.preferences is None:  # pairs from a file or the hub: no prompts to roll out, no true reward
        return Measured(notes=notes)
    base = load_model(module.base_dir, device=module.device)[0]
    evaluator = PPOModule(base.config, PPOConfig(reward="true", response_tokens=config.frontier.ppo.response_tokens), 1,
                          eos_id=None, true_reward=true_reward_of(datamodule.tokenizer)).to(module.device)
    evaluator.init_from(base, None)
    prompts = torch.tensor(datamodule.preferences["prompts"]["held_out"][: config.data.eval_prompts], device=module.device)

    def point(policy: Any, **about: Any) -> dict[str, Any]:
        return _point(evaluator.evaluate_prompts(prompts, 30_000, SAMPLES, policy=policy)) | about

    points = {"base": point(evaluator.reference, kind="base")}
    for arm in module.arms:
        points[arm.name] = point(module.arm_model(arm.name), kind=kind_of(arm), beta=arm.beta, loss=arm.loss, lora=arm.lora)
    for target in config.frontier.kl_targets:
        points[f"ppo-kl{target:g}"] = point(finished.fits[f"ppo-kl{target:g}"].model, kind="PPO", kl_target=target)
    metrics = {}
    for name, p in points.items():
        metrics |= {f"frontier/{name}/kl": p["kl"], f"frontier/{name}/true_reward": p["reward"]}
    (finished.run_dir / "frontier.png").write_bytes(frontier_plot(points, "Reward vs KL on held-out prompts"))
    rows = ["| arm | kind | beta / KL target | KL(pi \\|\\| ref), nats | true reward (± s.e.) | distinct | implicit-reward accuracy |",
            "|---|---|---:|---:|---:|---:|---:|"]
    for name, p in points.items():
        setting = p.get("beta", p.get("kl_target", ""))
        accuracy = finished.metrics.get(f"{name}/implicit_reward_accuracy")
        rows.append(f"| {name} | {p['kind']} | {setting} | {p['kl']:.2f} | {p['reward']:.3f} ± {p['reward_se']:.3f} | "
                    f"{p['distinct']:.2f} | {'' if accuracy is None else f'{accuracy:.3f}'} |")
    return Measured(metrics, notes, {"Frontier": ["![reward vs KL](frontier.png)", "", *rows]})


def _drift_table(finished: Finished) -> Measured:
    """The report's table of the log-prob drift `_held_out_pairs` measured; a step of its own, so that it follows the
    frontier's in the report."""
    m = finished.metrics
    return Measured(sections={"Log-prob drift on held-out pairs": [
        "Mean change of the sequence log-prob from the reference, chosen and rejected responses (both falling is the "
        "known failure where DPO lowers the rejected response faster than the chosen one):", "",
        "| arm | chosen | rejected |", "|---|---:|---:|",
        *(f"| {a.name} | {m[f'{a.name}/logp_chosen_change']:+.2f} | {m[f'{a.name}/logp_rejected_change']:+.2f} |"
          for a in finished.module.arms)]})


def claims(config: DPOConfig, metrics: Mapping[str, Any]) -> list[ClaimResult]:
    arms = [Arm(**a) for a in config.dpo.arms]

    def point(name: str, **about: Any) -> dict[str, Any] | None:
        """The frontier's point of `name` as `_frontier` measured it, or None where it measured none."""
        kl, reward = metrics.get(f"frontier/{name}/kl"), metrics.get(f"frontier/{name}/true_reward")
        return None if kl is None or reward is None else {"kl": kl, "reward": reward, **about}

    dpo_points = [p for p in (point(a.name, beta=a.beta) for a in arms if kind_of(a) == "DPO") if p]
    ppo_points = [p for p in (point(f"ppo-kl{t:g}", kl_target=t) for t in config.frontier.kl_targets) if p]
    if dpo_points and ppo_points:
        beaten = undominated(dpo_points, ppo_points)
        frontier = check_below(
            claim="DPO's reward/KL frontier dominates PPO's on controlled sentiment generation", source=SOURCE,
            metric="PPO points no DPO point matches (KL at most, reward at least)", measured=len(beaten), bound=1, factor=1.0,
            paper="DPO's frontier lies above PPO's at every KL (Fig. 2 left)", bound_name="one point",
            detail=f"{len(dpo_points)} DPO points (betas {', '.join(format(p['beta'], 'g') for p in dpo_points)}), {len(ppo_points)} "
                   f"PPO points (KL targets {', '.join(format(p['kl_target'], 'g') for p in ppo_points)}), the same "
                   f"{config.data.eval_prompts} held-out prompts",
        )
    else:
        frontier = not_measured("DPO's frontier dominates PPO's", SOURCE, "reward/KL points", "DPO above PPO",
                                "needs DPO arms, PPO arms (frontier.kl_targets) and the embedded sentiment task")
    main = arms[0]
    return [frontier, check_above(
        claim="DPO's implicit reward ranks held-out preference pairs", source="DPO (Rafailov et al. 2023), Sec. 5",
        metric=f"held-out pairs whose implicit reward beta*(log pi - log ref) orders them right, arm {main.name}",
        measured=metrics.get(f"val/{main.name}/accuracy"), bound=ACCURACY, factor=1.0,
        paper="the policy is a reward model", bound_name="the reward model's target",
    )]


@torch.no_grad()
def _logp_drift(module: DPOModule, datamodule: PreferenceDataModule) -> dict[str, tuple[float, float]]:
    """Per arm, mean (log pi - log ref) over held-out pairs for the chosen and the rejected responses."""
    out = {}
    batch = collate_pairs(datamodule.val_set.pairs, datamodule.pad_id)
    batch = {k: v.to(module.device) for k, v in batch.items()}
    ref = torch.tensor([p.ref_chosen for p in datamodule.val_set.pairs] + [p.ref_rejected for p in datamodule.val_set.pairs],
                       device=module.device)
    for arm in module.arms:
        policy = module.policy(arm.name).eval()
        total, _ = sequence_logps(policy(batch["ids"][:, :-1]), batch["ids"], batch["prompt_len"], batch["last"])
        chosen, rejected = (total - ref).chunk(2)
        out[arm.name] = (float(chosen.mean()), float(rejected.mean()))
    return out


register(
    Technique(
        name="dpo",
        summary="DPO and its variants against PPO: the reward/KL frontier on controlled sentiment generation",
        config=DPOConfig,
        module=DPOModule,
        build=build,
        fits=ppo_arms,
        steps=(DATA, Step("held-out pairs", _held_out_pairs), Step("frontier", _frontier),
               Step("log-prob drift table", _drift_table)),
        claims=claims,
        requires=("reward",),
        eval_tasks=("repro_corpus_ppl",),
        step_metrics=("train/loss",),
        val_metrics=("val/loss", "val/accuracy"),
        golden_metrics=("train/loss", "val/loss"),
        golden_overrides=(
            *(f"reward.pretrain.{o}" for o in (*CORPUS, *SHRINK)),
            "reward.data.prompts=24", "reward.data.held_out_prompts=8", "reward.data.samples_per_prompt=2",
            "reward.data.response_tokens=8", "reward.data.min_gap=0.0", "reward.data.batch_size=4", "reward.train.max_steps=2",
            "reward.train.val_every=2", "reward.train.val_batches=1", "reward.train.checkpoint_every=2",
            "data.batch_size=4", "data.eval_prompts=2", "frontier.kl_targets=[]", "train.max_steps=6", "train.val_every=3",
            "train.val_batches=1", "train.checkpoint_every=6", "train.speed_window=3", "eval.enabled=false",
        ),
    )
)
