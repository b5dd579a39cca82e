"""Rotary position embedding (Su et al. 2021), the rotate-half form used by LLaMA."""

from __future__ import annotations

import torch


def rope_cache(seq_len: int, head_dim: int, base: float, device: torch.device | None = None) -> torch.Tensor:
    """Angles for every (position, frequency) pair: cos and sin stacked, shape (2, seq_len, head_dim)."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)  # (T, hs/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, hs)
    return torch.stack([angles.cos(), angles.sin()])


def apply_rope(x: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, nh, T, hs) by angles (2, T, hs), or per row (2, B, 1, T, hs)."""
    cos, sin = cache[0].to(x.dtype), cache[1].to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def rope_at(cache: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The angles `apply_rope` takes at `positions`: (T,) gives (2, T, hs), shared by every row; (B, T)
    gives (2, B, 1, T, hs), per row and broadcast over heads."""
    angles = cache[:, positions]
    return angles if positions.dim() == 1 else angles.unsqueeze(2)
