"""The open-model architecture knobs, arms side by side (LLaMA; GQA, Ainslie et al. 2023; DeepSeek-V2's MLA).

Each arm is the preset's decoder with some `model:` fields changed (`ConfigArm`): by default a
cumulative walk from GPT-2 (LayerNorm, GELU, learned positions, multi-head attention) to the
LLaMA-2/3 recipe (RMSNorm, SwiGLU, RoPE, grouped-query attention), multi-query attention, and
DeepSeek-V2's multi-head latent attention (d_c = 4 d_h, d_R = d_h / 2: the paper's proportions).
All arms train on the same batches from the same random state.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from modules.training.arms import ConfigArm, DecoderArms, check_arm_names
from modules.nn import DecoderConfig
from modules.training.pretrain import OptimConfig


@dataclass
class ArchitectureSettings:
    """The `architectures.` section: the arms, each `{name, model: {DecoderConfig overrides}}`."""

    arms: list[dict[str, Any]] = field(default_factory=lambda: [
        {"name": "gpt2", "model": {}},
        {"name": "+rmsnorm", "model": {"norm": "rmsnorm"}},
        {"name": "+swiglu", "model": {"norm": "rmsnorm", "mlp": "swiglu"}},
        {"name": "+rope", "model": {"norm": "rmsnorm", "mlp": "swiglu", "position": "rope"}},
        {"name": "+gqa", "model": {"norm": "rmsnorm", "mlp": "swiglu", "position": "rope", "n_kv_head": 2}},
        {"name": "+mqa", "model": {"norm": "rmsnorm", "mlp": "swiglu", "position": "rope", "n_kv_head": 1}},
        {"name": "+mla", "model": {"norm": "rmsnorm", "mlp": "swiglu", "position": "rope", "attention": "mla"}},
    ])
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        check_arm_names("architectures", [a["name"] if isinstance(a, dict) else a.name for a in self.arms])
        for arm in self.arms:
            ConfigArm(**arm)  # raises on a field DecoderConfig lacks, before any run folder exists


class ArchitecturesModule(DecoderArms):
    """Arms side by side on packed blocks (batch, block_size + 1); `model` is the first arm's decoder."""

    def __init__(self, model: dict[str, Any] | DecoderConfig, optim: dict[str, Any] | OptimConfig,
                 architectures: dict[str, Any] | ArchitectureSettings, max_steps: int) -> None:
        model = asdict(model) if isinstance(model, DecoderConfig) else dict(model)
        optim = asdict(optim) if isinstance(optim, OptimConfig) else dict(optim)
        architectures = asdict(architectures) if isinstance(architectures, ArchitectureSettings) else dict(architectures)
        self.settings = ArchitectureSettings(**architectures)
        super().__init__(DecoderConfig(**model), [ConfigArm(**a) for a in self.settings.arms], OptimConfig(**optim),
                         max_steps, self.settings.grad_clip)
        self.save_hyperparameters({"model": model, "optim": optim, "architectures": architectures, "max_steps": max_steps})

    def arm_config(self, arm: ConfigArm) -> DecoderConfig:
        return arm.config(self.config)
