"""Feed-forward blocks, picked by `DecoderConfig.mlp`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from modules.nn.config import DecoderConfig


class GeluMLP(nn.Module):
    """GPT-2's MLP: Linear -> GELU (tanh approximation) -> Linear."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, config.hidden_dim, bias=config.bias)
        self.proj = nn.Linear(config.hidden_dim, config.n_embd, bias=config.bias)
        self.proj.residual = True  # scaled at init (GPT-2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class SwiGLU(nn.Module):
    """SwiGLU (Shazeer 2020), as in LLaMA: W2 (silu(W1 x) * W3 x)."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.gate = nn.Linear(config.n_embd, config.hidden_dim, bias=config.bias)
        self.up = nn.Linear(config.n_embd, config.hidden_dim, bias=config.bias)
        self.proj = nn.Linear(config.hidden_dim, config.n_embd, bias=config.bias)
        self.proj.residual = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.silu(self.gate(x)) * self.up(x))


MLPS: dict[str, type[nn.Module]] = {"gelu": GeluMLP, "swiglu": SwiGLU}


def build_mlp(config: DecoderConfig) -> nn.Module:
    return MLPS[config.mlp](config)
