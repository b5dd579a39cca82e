"""Supervised fine-tuning (InstructGPT, Ouyang et al. 2022): full fine-tuning and LoRA side by side.

One module trains two arms from the same base on the same batches: `model`, every weight trained,
and `lora_model`, the base frozen with LoRA adapters (Hu et al. 2021) injected by `peft` into the
decoder's linear layers named in `lora.target_modules`. Each arm has its own AdamW, schedule and
gradient clipping (manual optimisation), and its own wall-clock time, so the report can set
quality against trained parameters, optimizer memory and time. The loss is the decoder's
cross-entropy over response tokens only: labels are IGNORE elsewhere (`datamodules/chat.py`).
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig, LoraModel, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics import MeanMetric

from modules.training.arms import arm_optimizers, step_arm
from modules.nn import Decoder, DecoderConfig
from modules.nn.decoder import IGNORE
from modules.training.pretrain import OptimConfig, decay_groups, warmup_cosine
from modules.parallel.plan import TechniqueModule

ARMS = ("full", "lora")


@dataclass
class SFTOptimConfig(OptimConfig):
    """Pretraining's AdamW settings per arm, with fine-tuning defaults, LoRA's own rate and per-arm clipping."""

    lr: float = 3e-4  # full fine-tuning
    lora_lr: float = 3e-3  # LoRA adapters learn from zero, at a higher rate (Hu et al. 2021)
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0


@dataclass
class LoraSettings:
    """The LoRA arm: rank, scale alpha / r, dropout, and which linear layers get adapters."""

    enabled: bool = True
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["qkv", "proj", "fc"])

    def peft_config(self) -> LoraConfig:
        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=list(self.target_modules))


def with_lora(model: Decoder, settings: LoraSettings) -> Decoder:
    """`model` with LoRA adapters injected in place (only they require grad); returns the same object."""
    LoraModel(model, settings.peft_config(), "default")
    return model


def merged(model: Decoder) -> Decoder:
    """A plain decoder whose weights are `model`'s with its LoRA adapters merged in (W + B A alpha / r)."""
    work = copy.deepcopy(model)
    for module in work.modules():
        if isinstance(module, LoraLayer):
            module.merge()
    state = {k.replace(".base_layer", ""): v for k, v in work.state_dict().items() if "lora_" not in k}
    plain = Decoder(model.config).to(next(model.parameters()).device)
    plain.load_state_dict(state)
    return plain.eval()


def save_adapter(model: Decoder, settings: LoraSettings, folder: Path) -> Path:
    """The adapter weights (peft's state dict) and their settings, into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(get_peft_model_state_dict(model), folder / "adapter.pt")
    (folder / "adapter.json").write_text(json.dumps(asdict(settings), indent=2))
    return folder


def load_adapter(base: Decoder, folder: Path) -> Decoder:
    """`base` (plain weights) with the adapter saved in `folder` injected and loaded."""
    settings = LoraSettings(**json.loads((folder / "adapter.json").read_text()))
    model = with_lora(base, settings)
    set_peft_model_state_dict(model, torch.load(folder / "adapter.pt", weights_only=True))
    return model


def response_loss(model: Decoder, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the targets that are not IGNORE; the LM head reads only those positions.

    The same value as `model.loss(ids, targets)`, without the head's matmul and softmax over the
    vocabulary at the prompt's and the padding's positions (most of a batch of short answers).
    """
    keep = targets != IGNORE
    logits = model.lm_head(model.features(ids)[keep])
    return F.cross_entropy(logits.float(), targets[keep])


def trained_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())


class SFTModule(TechniqueModule):
    """Batches {"ids", "labels"} (B, T); next-token loss on labels != IGNORE, for each arm."""

    def __init__(self, model: dict[str, Any] | DecoderConfig, optim: dict[str, Any] | SFTOptimConfig, max_steps: int,
                 lora: dict[str, Any] | LoraSettings | None = None, new_tokens: list[int] | None = None,
                 base_dir: Path | None = None) -> None:
        super().__init__()
        model = asdict(model) if isinstance(model, DecoderConfig) else dict(model)
        optim = asdict(optim) if isinstance(optim, SFTOptimConfig) else dict(optim)
        lora = asdict(lora) if isinstance(lora, LoraSettings) else dict(lora or {})
        new_tokens = list(new_tokens or [])
        self.save_hyperparameters({"model": model, "optim": optim, "max_steps": max_steps, "lora": lora, "new_tokens": new_tokens})
        self.automatic_optimization = False
        self.optim, self.lora, self.max_steps = SFTOptimConfig(**optim), LoraSettings(**lora), max_steps
        config = DecoderConfig(**model)
        self.model = Decoder(config)
        self.lora_model = with_lora(Decoder(config), self.lora) if self.lora.enabled else None
        self.new_tokens = new_tokens
        if self.lora_model is not None and new_tokens:
            # Tokens the base never saw need embeddings of their own (a frozen row cannot become a tag the
            # model reads or the <|end|> it writes): the LoRA arm also trains these rows of the tied table,
            # and only them; the other rows get zero gradient and no weight decay, so they stay the base's.
            table = self.lora_model.wte.weight
            table.requires_grad_(True)
            mask = torch.zeros(table.shape[0], 1)
            mask[new_tokens] = 1.0
            self.register_buffer("_new_rows", mask, persistent=False)
            table.register_hook(lambda grad: grad * self._new_rows.to(grad.dtype))
        self.arms = {"full": self.model, **({"lora": self.lora_model} if self.lora_model is not None else {})}
        self.val_loss = torch.nn.ModuleDict({arm: MeanMetric() for arm in self.arms})
        self.seconds = dict.fromkeys(self.arms, 0.0)  # training time of each arm, forward + backward + step
        self.base_dir = base_dir  # the pretrain run both arms start from, for the report's base scores; not a hyperparameter

    def init_from_base(self, base: Decoder, new_rows: dict[int, list[int]]) -> None:
        """Both arms start from `base`'s weights; each id in `new_rows` (a token the base lacks) starts as the
        mean of the base's embeddings of the listed ids."""
        state = base.state_dict()
        old = state["wte.weight"]
        table = torch.empty(self.model.config.padded_vocab_size, old.shape[1], dtype=old.dtype)
        torch.nn.init.normal_(table, std=0.02)
        table[: old.shape[0]] = old[: table.shape[0]]
        for row, sources in new_rows.items():
            table[row] = old[sources].mean(0)
        state = {**state, "wte.weight": table, "lm_head.weight": table}
        self.model.load_state_dict(state)
        if self.lora_model is not None:
            lora_state = self.lora_model.state_dict()
            for key in lora_state:
                plain = key.replace(".base_layer", "")
                if plain in state:
                    lora_state[key] = state[plain]
            self.lora_model.load_state_dict(lora_state)

    def tokens_in(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["ids"].shape[0] * (batch["ids"].shape[1] - 1))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        ids, labels = batch["ids"], batch["labels"]
        for (arm, model), (opt, sched) in zip(self.arms.items(), arm_optimizers(self), strict=True):
            start = time.perf_counter()
            loss = response_loss(model, ids[:, :-1], labels[:, 1:])
            step_arm(self, opt, loss, self.optim.grad_clip, counts=arm == "full", scheduler=sched)  # the full arm's step counts
            if ids.is_cuda:
                torch.cuda.synchronize(ids.device)
            self.seconds[arm] += time.perf_counter() - start
            self.log("train/loss" if arm == "full" else f"train/loss_{arm}", loss.detach())

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        ids, labels = batch["ids"], batch["labels"]
        weight = (labels[:, 1:] != IGNORE).sum()
        for arm, model in self.arms.items():
            self.val_loss[arm].update(response_loss(model, ids[:, :-1], labels[:, 1:]), weight=weight)

    def on_validation_epoch_end(self) -> None:
        for arm in self.arms:
            loss = self.val_loss[arm].compute()
            self.val_loss[arm].reset()
            suffix = "" if arm == "full" else f"_{arm}"
            self.log_dict({f"val/loss{suffix}": loss, f"val/ppl{suffix}": loss.exp()}, prog_bar=arm == "full")

    def configure_optimizers(self) -> tuple[list, list]:
        o = self.optim
        optimizers, schedulers = [], []
        for arm, model in self.arms.items():
            lr = o.lr if arm == "full" else o.lora_lr
            table = model.wte.weight
            groups = decay_groups((p for p in model.parameters() if p is not table), o.weight_decay)
            if table.requires_grad:
                groups.append({"params": [table], "weight_decay": o.weight_decay if arm == "full" else 0.0})
            opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(o.beta1, o.beta2), eps=o.eps)
            optimizers.append(opt)
            schedule = LambdaLR(opt, lambda step: warmup_cosine(step, o.warmup_steps, self.max_steps, o.min_lr_ratio))
            schedulers.append({"scheduler": schedule, "interval": "step"})
        return optimizers, schedulers

    def arm_model(self, arm: str | None = None) -> Decoder:
        """The decoder of `arm` ("full", default, or "lora", merged into plain weights), in eval mode."""
        if arm in (None, "full"):
            return self.model.eval()
        if arm == "lora" and self.lora_model is not None:
            return merged(self.lora_model)
        raise ValueError(f"no arm {arm!r} in this checkpoint; it has {', '.join(self.arms)}")

    def trained_params(self, arm: str) -> int:
        """Parameters the arm's optimizer changes: every weight for "full"; adapters and new-token rows for "lora"."""
        model = self.arms[arm]
        if arm == "full":
            return trained_parameters(model)
        adapters = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)
        return adapters + len(self.new_tokens) * model.config.n_embd

    def optimizer_state_bytes(self, arm: str) -> int:
        """Gradient plus AdamW's two moments, fp32, for the parameters the arm's optimizer holds (for "lora"
        the whole token table, whose frozen rows get zero updates)."""
        return trained_parameters(self.arms[arm]) * 4 * 3
