"""The Mamba mixer (Gu & Dao 2023): a selective state-space layer, in plain PyTorch.

Per channel d and state n, with input-dependent step Delta_t, input matrix B_t and output matrix C_t:

    h_t = exp(Delta_t A) * h_{t-1} + Delta_t B_t x_t,    y_t = C_t . h_t + D x_t

after a depthwise causal convolution of x, and gated by silu(z). Training runs the recurrence as a
parallel scan (`selective_scan`: Hillis-Steele doubling inside chunks of `chunk` steps, the state
carried from chunk to chunk, so memory stays (batch, chunk, channels, states)); decoding runs it
one token at a time (`MambaMixer.step`) from a `MambaState` holding the last conv inputs and h.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def selective_scan(decay: torch.Tensor, inputs: torch.Tensor, h0: torch.Tensor | None = None,
                   chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """All states of h_t = decay_t * h_{t-1} + inputs_t, and the last one.

    decay, inputs: (B, T, D, N); h0: (B, D, N) or None (zeros). Returns (states (B, T, D, N), h_T).
    Within a chunk, log2(chunk) doubling steps combine (a, b) pairs with (a1, b1) then (a2, b2) =
    (a1 a2, a2 b1 + b2): products of decays never exceed 1, so nothing overflows.
    """
    B, T, D, N = inputs.shape
    h = inputs.new_zeros(B, D, N) if h0 is None else h0
    out = []
    for start in range(0, T, chunk):
        a, b = decay[:, start : start + chunk], inputs[:, start : start + chunk]
        shift = 1
        while shift < a.shape[1]:
            # element t takes in the segment ending at t - shift
            b = torch.cat([b[:, :shift], a[:, shift:] * b[:, :-shift] + b[:, shift:]], dim=1)
            a = torch.cat([a[:, :shift], a[:, shift:] * a[:, :-shift]], dim=1)
            shift *= 2
        states = a * h[:, None] + b  # (B, L, D, N): the carried state decays through the chunk
        out.append(states)
        h = states[:, -1]
    return torch.cat(out, dim=1), h


@dataclass
class MambaState:
    """What decoding carries per sequence: the last d_conv - 1 conv inputs and the SSM state."""

    conv: torch.Tensor  # (B, D_inner, d_conv - 1)
    ssm: torch.Tensor  # (B, D_inner, N)


class MambaMixer(nn.Module):
    """Mamba's mixer for width `dim`: in-projection to x and gate z, causal depthwise conv, selective
    SSM with input-dependent Delta, B, C and diagonal A, gated output, out-projection."""

    def __init__(self, dim: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, dt_rank: int | None = None,
                 dt_min: float = 1e-3, dt_max: float = 0.1, chunk: int = 64) -> None:
        super().__init__()
        self.inner, self.d_state, self.d_conv, self.chunk = expand * dim, d_state, d_conv, chunk
        self.dt_rank = dt_rank or math.ceil(dim / 16)
        self.in_proj = nn.Linear(dim, 2 * self.inner, bias=False)
        self.conv = nn.Conv1d(self.inner, self.inner, d_conv, groups=self.inner, padding=d_conv - 1)
        self.x_proj = nn.Linear(self.inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.inner)
        self.out_proj = nn.Linear(self.inner, dim, bias=False)
        self.out_proj.residual = True
        # A = -exp(A_log), A_log = log(1..N) per channel (S4D-real); D skips the SSM
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(self.inner, 1))
        self.D = nn.Parameter(torch.ones(self.inner))
        # Delta starts log-uniform in [dt_min, dt_max]: the bias is softplus^-1 of it
        dt = torch.exp(torch.rand(self.inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.dt_proj.keep_bias = True  # the decoder's init must not zero it

    def _ssm_terms(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(decay exp(Delta A), input Delta B x, C) for conv outputs x (B, T, D_inner)."""
        dt, Bm, Cm = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.softplus(self.dt_proj(dt)).float()  # (B, T, D)
        A = -torch.exp(self.A_log.float())  # (D, N)
        decay = torch.exp(delta[..., None] * A)  # (B, T, D, N)
        inputs = (delta * x.float())[..., None] * Bm.float()[:, :, None, :]  # (B, T, D, N)
        return decay, inputs, Cm.float()

    def forward(self, u: torch.Tensor, state: MambaState | None = None) -> torch.Tensor:
        """u (B, T, dim) -> (B, T, dim); with `state`, continue from it and leave it at the last token."""
        B, T, _ = u.shape
        x, z = self.in_proj(u).chunk(2, dim=-1)  # (B, T, D) each
        x = x.transpose(1, 2)  # (B, D, T)
        if state is not None:
            x_padded = torch.cat([state.conv, x], dim=-1)  # the conv sees the previous inputs
            state.conv = x_padded[..., -(self.d_conv - 1) :].detach() if self.d_conv > 1 else state.conv
            x = F.conv1d(x_padded, self.conv.weight, self.conv.bias, groups=self.inner)
        else:
            x = self.conv(x)[..., :T]  # causal: drop the right padding's outputs
        x = F.silu(x).transpose(1, 2)  # (B, T, D)
        decay, inputs, Cm = self._ssm_terms(x)
        states, last = selective_scan(decay, inputs, state.ssm if state is not None else None, self.chunk)
        if state is not None:
            state.ssm = last
        y = (states * Cm[:, :, None, :]).sum(-1) + self.D.float() * x.float()  # (B, T, D)
        return self.out_proj((y.to(u.dtype) * F.silu(z)))

    def new_state(self, batch: int, device: torch.device, dtype: torch.dtype = torch.float32) -> MambaState:
        return MambaState(torch.zeros(batch, self.inner, self.d_conv - 1, device=device, dtype=dtype),
                          torch.zeros(batch, self.inner, self.d_state, device=device, dtype=torch.float32))

    def step(self, u: torch.Tensor, state: MambaState) -> torch.Tensor:
        """One token per row, u (B, dim) -> (B, dim), by the recurrence itself: no scan."""
        x, z = self.in_proj(u).chunk(2, dim=-1)  # (B, D)
        window = torch.cat([state.conv, x[..., None]], dim=-1)  # (B, D, d_conv)
        state.conv = window[..., 1:]
        x = F.silu((window * self.conv.weight[:, 0]).sum(-1) + self.conv.bias)  # (B, D)
        decay, inputs, Cm = self._ssm_terms(x[:, None])
        state.ssm = decay[:, 0] * state.ssm + inputs[:, 0]
        y = (state.ssm * Cm[:, 0, None, :]).sum(-1) + self.D.float() * x.float()
        return self.out_proj(y.to(u.dtype) * F.silu(z))

    def state_bytes(self, batch: int = 1, dtype: torch.dtype = torch.float32) -> int:
        """Bytes of the decoding state per `batch` sequences, whatever the context length."""
        size = torch.finfo(dtype).bits // 8
        return batch * self.inner * ((self.d_conv - 1) * size + self.d_state * 4)
