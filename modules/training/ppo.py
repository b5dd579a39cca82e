"""PPO with a KL penalty against a frozen reference (Ziegler et al. 2019; InstructGPT, Ouyang et al. 2022).

One training step is one PPO iteration: sample a continuation of each prompt of the batch through
the KV-cache generator, score it (the learned reward model, or the true reward), turn the score
and a per-token KL penalty against the reference into per-token rewards, estimate advantages
with GAE (Schulman et al. 2016), then run `epochs` passes of minibatch updates of the clipped
policy loss and the clipped value loss (Schulman et al. 2017). The KL coefficient follows the
adaptive controller of Ziegler et al. (2019). The policy and its value head share the trunk.

The math is in pure functions of tensors (`gae`, `policy_loss`, `value_loss`, `penalized_rewards`,
`AdaptiveKLController`) so tests can hold them against hand-computed values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric

from modules.training.arms import step_arm
from modules.decoding.engine import Engines
from modules.decoding.generation import generate
from modules.nn import Decoder, DecoderConfig
from modules.training.reward import RewardModel
from modules.parallel.plan import TechniqueModule


@dataclass
class PPOConfig:
    """The `ppo.` section: rollouts, losses, the KL controller and the optimizer."""

    reward: str = "model"  # "model": the learned reward model (RLHF); "true": the ground-truth reward (DPO's comparison)
    response_tokens: int = 24
    temperature: float = 1.0
    epochs: int = 2  # passes over each rollout batch
    minibatch_size: int = 16
    clip: float = 0.2  # policy ratio clip epsilon
    value_clip: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    init_kl_coef: float = 0.2
    kl_target: float | None = 4.0  # nats per sequence; None keeps the coefficient fixed
    kl_horizon: int = 500  # samples over which the controller closes the gap (Ziegler et al.: 10,000 for far longer runs)
    lr: float = 1e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    whiten_advantages: bool = True

    def __post_init__(self) -> None:
        if self.reward not in ("model", "true"):
            raise ValueError(f"ppo.reward: {self.reward!r}; choose 'model' (the learned reward model) or 'true' (VADER)")
        if self.minibatch_size <= 0 or self.epochs <= 0 or self.response_tokens <= 0:
            raise ValueError("ppo.minibatch_size, ppo.epochs and ppo.response_tokens must be positive")
        if self.kl_target is not None and self.kl_target <= 0:
            raise ValueError("ppo.kl_target must be positive, or null for a fixed coefficient")


# --- pure functions -----------------------------------------------------------------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std over the masked entries (the shift matters: advantages of both signs)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def penalized_rewards(score: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                      kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token rewards (B, T), per-token KL estimate (B, T)).

    Every response token pays -kl_coef * (log pi - log ref) (the sampled estimate of KL(pi || ref));
    the sequence's score (B,) is added at its last real token.
    """
    kl = (logp - ref_logp) * mask
    rewards = -kl_coef * kl
    last = mask.sum(1).long() - 1  # (B,)
    rewards[torch.arange(len(score)), last] += score
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), both (B, T): generalised advantage estimation over right-padded rows.

    delta_t = r_t + gamma V_{t+1} - V_t with V = 0 past a row's last token;
    A_t = delta_t + gamma lam A_{t+1}; returns = A + V.
    """
    B, T = rewards.shape
    values = values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(clipped surrogate loss, fraction of tokens clipped, approximate KL(old || new)), masked means over tokens."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = masked_mean(0.5 * (logp - old_logp) ** 2, mask)
    return loss, clip_fraction, approx_kl


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(0.5 * masked mean of max((V - R)^2, (V_clipped - R)^2), fraction clipped); V_clipped stays within
    `clip` of the rollout's values."""
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    loss_unclipped, loss_clipped = (values - returns) ** 2, (clipped_values - returns) ** 2
    return 0.5 * masked_mean(torch.maximum(loss_unclipped, loss_clipped), mask), masked_mean((loss_clipped > loss_unclipped).float(), mask)


class AdaptiveKLController:
    """Ziegler et al. (2019): beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon)."""

    def __init__(self, init_kl_coef: float, target: float | None, horizon: int) -> None:
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, kl: float, n_samples: int) -> float:
        if self.target is not None:
            error = min(max(kl / self.target - 1, -0.2), 0.2)
            self.value *= 1 + error * n_samples / self.horizon
        return self.value


def response_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(tokens) (B, T) under logits (B, T, V)."""
    return torch.gather(F.log_softmax(logits.float(), -1), 2, tokens.unsqueeze(-1)).squeeze(-1)


def response_mask(responses: torch.Tensor, eos_id: int | None) -> torch.Tensor:
    """(B, T) 1.0 up to and including each row's first `eos_id`, 0 after (all ones without an eos)."""
    if eos_id is None:
        return torch.ones_like(responses, dtype=torch.float)
    after = (responses == eos_id).long().cumsum(1) - (responses == eos_id).long()  # eos tokens before this one
    return (after == 0).float()


def distinct_share(rows: list[list[int]], group: int) -> float:
    """Mean over consecutive groups of `group` rows (samples of one prompt) of distinct rows / group."""
    shares = [len({tuple(r) for r in rows[i : i + group]}) / len(rows[i : i + group]) for i in range(0, len(rows), group)]
    return sum(shares) / len(shares)


# --- the module ---------------------------------------------------------------------------------------


class PolicyWithValue(torch.nn.Module):
    """A decoder and a scalar value head on its final hidden states."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.decoder = Decoder(config)
        self.value_head = torch.nn.Linear(config.n_embd, 1)
        torch.nn.init.zeros_(self.value_head.weight)
        torch.nn.init.zeros_(self.value_head.bias)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.decoder.features(ids)
        return self.decoder.lm_head(hidden), self.value_head(hidden).squeeze(-1).float()


class PPOModule(TechniqueModule):
    """Batches {"prompt" (B, P)} of equal-length prompts; `model` is the policy decoder (for lm-eval and generation)."""

    def __init__(self, model: dict[str, Any] | DecoderConfig, ppo: dict[str, Any] | PPOConfig, max_steps: int,
                 eos_id: int | None = None, true_reward: Callable[[list[list[int]]], list[float]] | None = None,
                 base_dir: Path | None = None, reward_dir: Path | None = None) -> None:
        super().__init__()
        model = asdict(model) if isinstance(model, DecoderConfig) else dict(model)
        ppo = asdict(ppo) if isinstance(ppo, PPOConfig) else dict(ppo)
        self.save_hyperparameters({"model": model, "ppo": ppo, "max_steps": max_steps, "eos_id": eos_id})
        self.automatic_optimization = False
        self.ppo, self.max_steps, self.eos_id = PPOConfig(**ppo), max_steps, eos_id
        config = DecoderConfig(**model)
        self.policy = PolicyWithValue(config)
        self.model = self.policy.decoder
        self.reference = Decoder(config).requires_grad_(False)
        self.reward_model = RewardModel(config).requires_grad_(False) if self.ppo.reward == "model" else None
        self.true_reward = true_reward  # token rows -> ground-truth rewards (for ppo.reward=true, and to report)
        # the runs the policy and the reward model came from, for the report; like `true_reward`, not hyperparameters
        self.base_dir, self.reward_dir = base_dir, reward_dir
        self.engines: dict[Decoder, Engines] = {}  # decode engines of each sampling decoder, kept across rollouts
        self.register_buffer("kl_coef", torch.tensor(self.ppo.init_kl_coef, dtype=torch.float64))
        # the reward model's score is used as (score - shift) / scale: set by `normalize_scores` so that the
        # reference policy's samples score 0 +- 1 and the KL coefficient is in units of that spread
        self.register_buffer("score_shift", torch.tensor(0.0))
        self.register_buffer("score_scale", torch.tensor(1.0))
        self.val_reward, self.val_kl, self.val_distinct = MeanMetric(), MeanMetric(), MeanMetric()  # synced over ranks

    def init_from(self, base: Decoder, reward_model: RewardModel | None) -> None:
        self.policy.decoder.load_state_dict(base.state_dict())
        self.reference.load_state_dict(base.state_dict())
        if self.reward_model is not None:
            if reward_model is None:
                raise ValueError("ppo.reward=model needs a reward model")
            self.reward_model.load_state_dict(reward_model.state_dict())

    @torch.no_grad()
    def normalize_scores(self, rows: list[list[int]]) -> tuple[float, float]:
        """Set the score's shift and scale to the mean and standard deviation of the reward model's scores
        of `rows` (prompt + response samples of the reference policy); returns them."""
        if self.reward_model is None:
            return 0.0, 1.0
        scores = self.reward_model.score(rows)
        self.score_shift.fill_(scores.mean())
        self.score_scale.fill_(scores.std().clamp(min=1e-6))
        return float(self.score_shift), float(self.score_scale)

    def tokens_in(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["prompt"].shape[0] * (batch["prompt"].shape[1] + self.ppo.response_tokens))

    # rollouts ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def rollout(self, prompts: torch.Tensor, seed: int, repeat: int = 1, policy: Decoder | None = None) -> dict[str, torch.Tensor]:
        """Sampled continuations of `prompts` (each `repeat` times) with their log-probs, reference log-probs and
        values; `policy` samples and scores instead of the trained one (values are then zero)."""
        prompts = prompts.repeat_interleave(repeat, 0)
        B, P = prompts.shape
        self.policy.eval()
        sampler = policy if policy is not None else self.model
        engines = self.engines.setdefault(sampler, Engines(sampler))
        rows = generate(sampler, prompts.tolist(), self.ppo.response_tokens, temperature=self.ppo.temperature,
                        eos_id=self.eos_id, seed=seed, engines=engines)
        pad = self.eos_id if self.eos_id is not None else 0
        responses = torch.full((B, self.ppo.response_tokens), pad, dtype=torch.long, device=prompts.device)
        for i, row in enumerate(rows):
            responses[i, : len(row)] = torch.tensor(row, device=prompts.device)
        mask = response_mask(responses, self.eos_id)
        ids = torch.cat([prompts, responses], 1)
        if policy is None:
            logits, values = self.policy(ids[:, :-1])
        else:
            logits, values = policy(ids[:, :-1]), torch.zeros(ids[:, :-1].shape, device=ids.device)
        logp = response_logprobs(logits[:, P - 1 :], responses)
        ref_logp = response_logprobs(self.reference(ids[:, :-1])[:, P - 1 :], responses)
        return {"ids": ids, "responses": responses, "mask": mask, "logp": logp, "ref_logp": ref_logp,
                "values": values[:, P - 1 :], "prompt_len": torch.tensor(P)}

    @torch.no_grad()
    def score(self, rollout: dict[str, torch.Tensor], true: bool = False) -> torch.Tensor:
        """Reward of each sequence (B,): the reward model's at the last real token (normalized), or the true reward."""
        if true or self.reward_model is None:
            if self.true_reward is None:
                raise RuntimeError("no true reward attached (PPOModule.true_reward)")
            rows = [r[: int(m.sum())] for r, m in zip(rollout["responses"].tolist(), rollout["mask"])]
            return torch.tensor(self.true_reward(rows), dtype=torch.float, device=rollout["ids"].device)
        last = int(rollout["prompt_len"]) + rollout["mask"].sum(1).long() - 1
        return (self.reward_model(rollout["ids"], last) - self.score_shift) / self.score_scale

    # training ------------------------------------------------------------------------------------------

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        c = self.ppo
        rollout = self.rollout(batch["prompt"], seed=int(self.global_step) * 1_000_003 + self.trainer.global_rank + 1)
        score = self.score(rollout)
        mask, P = rollout["mask"], int(rollout["prompt_len"])
        rewards, kl = penalized_rewards(score, rollout["logp"], rollout["ref_logp"], mask, float(self.kl_coef))
        advantages, returns = gae(rewards, rollout["values"], mask, c.gamma, c.lam)
        if c.whiten_advantages:
            advantages = masked_whiten(advantages, mask)

        opt = self.optimizers()
        B = rollout["ids"].shape[0]
        stats: dict[str, list[torch.Tensor]] = {k: [] for k in ("policy_loss", "value_loss", "clip_frac", "approx_kl", "entropy", "value_error")}
        self.policy.train()
        minibatches = [start for _ in range(c.epochs) for start in range(0, B, c.minibatch_size)]
        for update, start in enumerate(minibatches):
            if start == 0:  # each epoch visits the rollouts in a fresh order
                order = torch.randperm(B, device=mask.device)
            rows = order[start : start + c.minibatch_size]
            logits, values = self.policy(rollout["ids"][rows, :-1])
            logits, values = logits[:, P - 1 :], values[:, P - 1 :]
            logp = response_logprobs(logits, rollout["responses"][rows])
            m = mask[rows]
            pg, clip_frac, approx_kl = policy_loss(logp, rollout["logp"][rows], advantages[rows], m, c.clip)
            vf, _ = value_loss(values, rollout["values"][rows], returns[rows], m, c.value_clip)
            # one global step per PPO iteration: the last minibatch's update counts
            step_arm(self, opt, pg + c.vf_coef * vf, c.grad_clip, counts=update == len(minibatches) - 1)
            with torch.no_grad():
                probs = logits.float().softmax(-1)
                entropy = -(probs * probs.clamp(min=1e-12).log()).sum(-1)
                for key, value in (("policy_loss", pg), ("value_loss", vf), ("clip_frac", clip_frac), ("approx_kl", approx_kl),
                                   ("entropy", masked_mean(entropy, m)), ("value_error", masked_mean((values - returns[rows]) ** 2, m))):
                    stats[key].append(value.detach())
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()

        sequence_kl = kl.sum(1).mean()
        controller = AdaptiveKLController(float(self.kl_coef), c.kl_target, c.kl_horizon)
        self.kl_coef.fill_(controller.update(float(sequence_kl), B))
        logged = {f"ppo/{k}": torch.stack(v).mean() for k, v in stats.items()}
        logged |= {"ppo/score": score.mean(), "ppo/kl": sequence_kl, "ppo/kl_coef": self.kl_coef.float(),
                   "ppo/response_tokens": mask.sum(1).mean(), "train/loss": logged["ppo/policy_loss"] + c.vf_coef * logged["ppo/value_loss"]}
        if self.true_reward is not None:
            logged["ppo/true_reward"] = self.score(rollout, true=True).mean() if c.reward == "model" else score.mean()
        self.log_dict(logged)

    # validation: the held-out prompts, several samples each -----------------------------------------------

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        result = self.evaluate_prompts(batch["prompt"], seed=10_000 + batch_idx)
        n = len(result["true_reward"])
        if result["true_reward"]:
            self.val_reward.update(torch.tensor(result["true_reward"]).mean(), weight=n)
        self.val_kl.update(torch.tensor(result["kl"]).mean(), weight=n)
        self.val_distinct.update(torch.tensor(float(result["distinct"])))

    def on_validation_epoch_end(self) -> None:
        logged = {"val/kl": self.val_kl.compute(), "val/distinct": self.val_distinct.compute()}
        if self.true_reward is not None:
            logged["val/true_reward"] = self.val_reward.compute()
        self.log_dict(logged, prog_bar=True)
        self.val_reward.reset()
        self.val_kl.reset()
        self.val_distinct.reset()

    @torch.no_grad()
    def evaluate_prompts(self, prompts: torch.Tensor, seed: int, samples: int = 4, policy: Decoder | None = None) -> dict[str, Any]:
        """`samples` continuations of each prompt: their true rewards, sequence KL(pi || ref), distinct share, rows
        (of the trained policy, or of `policy`)."""
        rollout = self.rollout(prompts, seed, repeat=samples, policy=policy)
        kl = ((rollout["logp"] - rollout["ref_logp"]) * rollout["mask"]).sum(1)
        rows = [r[: int(m.sum())] for r, m in zip(rollout["responses"].tolist(), rollout["mask"])]
        true = self.true_reward(rows) if self.true_reward is not None else []
        return {"true_reward": true, "kl": kl.tolist(), "distinct": distinct_share(rows, samples), "rows": rows}

    def configure_optimizers(self) -> dict[str, Any]:
        c = self.ppo
        params = [p for p in self.policy.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay, betas=(0.9, 0.95), eps=1e-5)
        return {"optimizer": opt}
