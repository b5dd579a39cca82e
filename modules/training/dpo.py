"""Direct preference optimization (Rafailov et al. 2023) and the losses it is compared with, side by side.

Each loss is a pure function of sequence log-probabilities of the chosen and the rejected response
(sums over response tokens) under the policy and, where it has one, the reference:

- `dpo_loss`: -log sigmoid(beta * (h_chosen - h_rejected)), h = log pi - log ref; with
  `label_smoothing` eps it is conservative DPO (cDPO, Mitchell 2023): each label is trusted with
  probability 1 - eps.
- `ipo_loss`: IPO (Azar et al. 2023): (h_chosen - h_rejected - 1 / (2 beta))^2, a regression to a
  fixed margin, which does not push the margin to infinity on deterministic preferences.
- `simpo_loss`: SimPO (Meng et al. 2024), reference-free: -log sigmoid(beta * (mean log pi_chosen -
  mean log pi_rejected) - gamma), with per-token means (length-normalized).

The reference's log-probabilities are computed once per pair before training and travel with the
batch (`ref_logps`): the reference never changes, so a frozen copy would recompute the same numbers
every epoch and hold another model in memory. `DPOModule` trains several arms (a loss and its beta,
optionally LoRA) from the same base on the same batches, each with its own AdamW: an `ArmsModule`
(`modules/training/arms.py`) whose arms are policies.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from modules.training.arms import ArmsModule, check_arm_names
from modules.nn import Decoder, DecoderConfig
from modules.training.ppo import response_logprobs
from modules.training.pretrain import OptimConfig
from modules.training.sft import LoraSettings, merged, with_lora

LOSSES = ("dpo", "ipo", "simpo")


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair DPO loss (cDPO with `label_smoothing` > 0)."""
    logits = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def ipo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float) -> torch.Tensor:
    """Per-pair IPO loss: the log-ratio margin regressed to 1 / (2 beta) (beta plays IPO's tau)."""
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return (margin - 1 / (2 * beta)) ** 2


def simpo_loss(mean_chosen: torch.Tensor, mean_rejected: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """Per-pair SimPO loss from per-token mean log-probs of each response; no reference."""
    return -F.logsigmoid(beta * (mean_chosen - mean_rejected) - gamma)


def implicit_rewards(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO's implicit reward of a response: beta * (log pi - log ref)."""
    return beta * (policy - reference)


def sequence_logps(logits: torch.Tensor, ids: torch.Tensor, prompt_len: torch.Tensor, last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum, count) of log p(token) over each row's response tokens, positions `prompt_len` .. `last`.

    logits (B, T - 1, V) are the model's on ids[:, :-1]; ids (B, T) right-padded; the rows' prompt
    lengths and last real indices are (B,) (`datamodules.preference.collate_pairs`).
    """
    logp = response_logprobs(logits, ids[:, 1:])  # (B, T - 1)
    position = torch.arange(1, ids.shape[1], device=ids.device)[None, :]  # the token each logit predicts
    mask = (position >= prompt_len[:, None]) & (position <= last[:, None])
    return (logp * mask).sum(1), mask.sum(1)


@torch.no_grad()
def reference_logps(model: Decoder, batches: Any) -> torch.Tensor:
    """Sequence log-probs of every row of `batches` (dicts from `collate_pairs`, without `ref_logps`) under `model`."""
    model.eval()
    out = []
    for batch in batches:
        total, _ = sequence_logps(model(batch["ids"][:, :-1]), batch["ids"], batch["prompt_len"], batch["last"])
        out.append(total)
    return torch.cat(out)


@dataclass
class Arm:
    """One policy trained side by side: its loss and beta; cDPO's label smoothing, SimPO's gamma; LoRA or not."""

    name: str
    loss: str = "dpo"
    beta: float = 0.1
    label_smoothing: float = 0.0
    gamma: float = 0.0
    lora: bool = False

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"dpo.arms: arm {self.name!r} has loss {self.loss!r}; choose from {', '.join(LOSSES)}")
        if self.beta <= 0 or not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"dpo.arms: arm {self.name!r} needs beta > 0 and label_smoothing in [0, 0.5)")

    def loss_of(self, chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
                n_chosen: torch.Tensor, n_rejected: torch.Tensor) -> torch.Tensor:
        """Mean loss over the pairs, from sequence log-probs and response lengths."""
        if self.loss == "dpo":
            return dpo_loss(chosen, rejected, ref_chosen, ref_rejected, self.beta, self.label_smoothing).mean()
        if self.loss == "ipo":
            return ipo_loss(chosen, rejected, ref_chosen, ref_rejected, self.beta).mean()
        return simpo_loss(chosen / n_chosen.clamp(min=1), rejected / n_rejected.clamp(min=1), self.beta, self.gamma).mean()


def default_arms() -> list[dict[str, Any]]:
    return [asdict(Arm("dpo-beta0.1", "dpo", 0.1))]


@dataclass
class DPOSettings:
    """The `dpo.` section: the arms and their optimizer."""

    arms: list[dict[str, Any]] = field(default_factory=default_arms)
    lr: float = 1e-4
    lora_lr: float = 1e-3
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    lora: LoraSettings = field(default_factory=LoraSettings)

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):
            self.lora = LoraSettings(**self.lora)
        arms = [Arm(**a) if isinstance(a, dict) else a for a in self.arms]
        check_arm_names("dpo", [a.name for a in arms])
        self.arms = [asdict(a) for a in arms]


class DPOModule(ArmsModule):
    """Batches from `collate_pairs` with `ref_logps`; `model` is the first arm's decoder (for lm-eval and generation).

    `base_dir` and `reward_dir` name the runs the base policy and the pairs came from, for the report;
    they are not hyperparameters (a checkpoint rebuilds its module without them).
    """

    decoders_attr = "policies"  # DPO's checkpoints hold policies.<arm>.*

    def __init__(self, model: dict[str, Any] | DecoderConfig, dpo: dict[str, Any] | DPOSettings, max_steps: int,
                 base_dir: Path | None = None, reward_dir: Path | None = None) -> None:
        model = asdict(model) if isinstance(model, DecoderConfig) else dict(model)
        dpo = asdict(dpo) if isinstance(dpo, DPOSettings) else dict(dpo)
        self.settings, self.config = DPOSettings(**dpo), DecoderConfig(**model)
        s = self.settings
        # every arm's schedule: warmup, then cosine to a tenth of its rate; its AdamW is `arm_optimizer`'s
        optim = OptimConfig(lr=s.lr, min_lr_ratio=0.1, warmup_steps=s.warmup_steps, weight_decay=s.weight_decay,
                            beta1=0.9, beta2=0.95)
        super().__init__([Arm(**a) for a in s.arms], optim, max_steps, s.grad_clip)
        self.save_hyperparameters({"model": model, "dpo": dpo, "max_steps": max_steps})
        self.base_dir, self.reward_dir = base_dir, reward_dir

    def build_arm(self, arm: Arm) -> tuple[Decoder, None]:
        decoder = Decoder(self.config)
        return (with_lora(decoder, self.settings.lora) if arm.lora else decoder), None

    def arm_optimizer(self, arm: Arm) -> torch.optim.Optimizer:
        """AdamW over the arm's trained parameters (LoRA arms: the adapters, at `lora_lr`), one weight decay for all."""
        o = self.optim
        params = [p for p in self.decoder(arm.name).parameters() if p.requires_grad]
        lr = self.settings.lora_lr if arm.lora else o.lr
        return torch.optim.AdamW(params, lr=lr, weight_decay=o.weight_decay, betas=(o.beta1, o.beta2), eps=o.eps)

    def policy(self, name: str) -> Decoder:
        """The decoder of the arm named `name` (trained form: LoRA arms keep their adapters)."""
        return self.decoder(name)

    def init_from(self, base: Decoder) -> None:
        state = base.state_dict()
        for arm in self.arms:
            policy = self.policy(arm.name)
            if arm.lora:
                own = policy.state_dict()
                policy.load_state_dict({k: state.get(k.replace(".base_layer", ""), v) for k, v in own.items()})
            else:
                policy.load_state_dict(state)

    def tokens_in(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["ids"].numel()) * len(self.arms)

    def arm_model(self, arm: str | None = None) -> Decoder:
        name = arm or self.arms[0].name
        policy = self.policy(name)
        return merged(policy) if any(a.lora for a in self.arms if a.name == name) else policy.eval()

    def _arm_terms(self, arm: Arm, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ids = batch["ids"]
        total, count = sequence_logps(self.policy(arm.name)(ids[:, :-1]), ids, batch["prompt_len"], batch["last"])
        chosen, rejected = total.chunk(2)
        n_chosen, n_rejected = count.chunk(2)
        ref_chosen, ref_rejected = batch["ref_logps"].chunk(2)
        loss = arm.loss_of(chosen, rejected, ref_chosen, ref_rejected, n_chosen, n_rejected)
        reward_chosen = implicit_rewards(chosen, ref_chosen, arm.beta)
        reward_rejected = implicit_rewards(rejected, ref_rejected, arm.beta)
        stats = {"accuracy": (reward_chosen > reward_rejected).float().mean(), "margin": (reward_chosen - reward_rejected).mean(),
                 "logp_chosen": chosen.mean(), "logp_rejected": rejected.mean()}
        return loss, {k: v.detach() for k, v in stats.items()}

    def arm_loss(self, arm: Arm, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        loss, stats = self._arm_terms(arm, batch)
        return loss, loss, stats

    def arm_metrics(self, arm: Arm, batch: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, int]]:
        pairs = batch["ids"].shape[0] // 2
        loss, stats = self._arm_terms(arm, batch)
        return {"loss": (loss, pairs), "accuracy": (stats["accuracy"], pairs)}

    def val_summary(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"val/loss": values["loss"], "val/accuracy": values["accuracy"]}
