"""The Mamba mixer (Gu & Dao 2023): a selective state-space layer, in plain PyTorch.

Per channel d and state n, with input-dependent step Delta_t, input matrix B_t and output matrix C_t:

    h_t = exp(Delta_t A) * h_{t-1} + Delta_t B_t x_t,    y_t = C_t . h_t + D x_t

after a depthwise causal convolution of x, and gated by silu(z). Training runs the recurrence as a
parallel scan (`selective_scan`: Hillis-Steele doubling inside chunks of `chunk` steps, the state
carried from chunk to chunk, so memory stays (batch, chunk, channels, states)); decoding runs it
one token at a time (`MambaMixer.step`) from a `MambaState` holding the last conv inputs and h.
`linear_recurrence` computes the same states by the plain recurrence, one step after another, with a
hand-written backward: on a CPU, where memory traffic and not parallelism bounds the scan, the fastest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

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


class _LinearRecurrence(torch.autograd.Function):
    """h_t = decay_t * h_{t-1} + inputs_t step by step; backward runs the adjoint recurrence
    g_t = dh_t + decay_{t+1} * g_{t+1} the other way, so autograd keeps no per-step graph."""

    @staticmethod
    def forward(ctx, decay: torch.Tensor, inputs: torch.Tensor, h0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, D, N = inputs.shape
        states = inputs.new_empty(B, T + 1, D, N)  # states[:, t + 1] = h_t; states[:, 0] = h0
        states[:, 0] = h0
        for t in range(T):
            torch.addcmul(inputs[:, t], decay[:, t], states[:, t], out=states[:, t + 1])
        ctx.save_for_backward(decay, states)
        return states[:, 1:], states[:, -1]

    @staticmethod
    def backward(ctx, d_states: torch.Tensor, d_last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        decay, states = ctx.saved_tensors
        T = decay.shape[1]
        g = torch.empty_like(decay)  # g[:, t] = dLoss/dh_t through every path
        g[:, -1] = d_states[:, -1] + d_last
        for t in range(T - 2, -1, -1):
            torch.addcmul(d_states[:, t], decay[:, t + 1], g[:, t + 1], out=g[:, t])
        return g * states[:, :-1], g, g[:, 0] * decay[:, 0]


def linear_recurrence(decay: torch.Tensor, inputs: torch.Tensor, h0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """What `selective_scan` returns, by T sequential steps over (B, D, N) slices."""
    h0 = inputs.new_zeros(inputs.shape[0], *inputs.shape[2:]) if h0 is None else h0
    return _LinearRecurrence.apply(decay, inputs, h0)


@dataclass
class MambaState:
    """What decoding carries per sequence: the last d_conv - 1 conv inputs and the SSM state."""

    conv: torch.Tensor  # (B, D_inner, d_conv - 1)
    ssm: torch.Tensor  # (B, D_inner, N)


Scan = Literal["auto", "parallel", "sequential"]


class MambaMixer(nn.Module):
    """Mamba's mixer for width `dim`: in-projection to x and gate z, causal depthwise conv, selective
    SSM with input-dependent Delta, B, C and diagonal A, gated output, out-projection.

    `scan` picks how a sequence's states are computed: "parallel" (`selective_scan`, chunks of
    `chunk`), "sequential" (`linear_recurrence`), or "auto": sequential on a CPU, parallel elsewhere.
    """

    def __init__(self, dim: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, dt_rank: int | None = None,
                 dt_min: float = 1e-3, dt_max: float = 0.1, chunk: int = 64, scan: Scan = "auto") -> None:
        super().__init__()
        if scan not in ("auto", "parallel", "sequential"):
            raise ValueError(f"scan={scan!r}: use auto, parallel or sequential")
        self.inner, self.d_state, self.d_conv, self.chunk, self.scan = expand * dim, d_state, d_conv, chunk, scan
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
        self.A_log.no_weight_decay = True  # a matrix, but decay would pull A towards -1 (Mamba excludes both)
        # Delta starts log-uniform in [dt_min, dt_max]: the bias is softplus^-1 of it
        dt = torch.exp(torch.rand(self.inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.dt_proj.keep_bias = True  # the decoder's init must not zero it

    def _ssm_terms(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(decay exp(Delta A), input Delta B x, C) for conv outputs x (B, T, D_inner); where `valid`
        (B, T) is False, Delta is 0: decay 1 and input 0, so padding leaves the state as it was."""
        dt, Bm, Cm = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.softplus(self.dt_proj(dt)).float()  # (B, T, D)
        if valid is not None:
            delta = delta * valid[..., None]
        A = -torch.exp(self.A_log.float())  # (D, N)
        decay = torch.exp(delta[..., None] * A)  # (B, T, D, N)
        inputs = (delta * x.float())[..., None] * Bm.float()[:, :, None, :]  # (B, T, D, N)
        return decay, inputs, Cm.float()

    def _states(self, decay: torch.Tensor, inputs: torch.Tensor, h0: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        sequential = self.scan == "sequential" or (self.scan == "auto" and decay.device.type == "cpu")
        return linear_recurrence(decay, inputs, h0) if sequential else selective_scan(decay, inputs, h0, self.chunk)

    def forward(self, u: torch.Tensor, state: MambaState | None = None, valid: torch.Tensor | None = None) -> torch.Tensor:
        """u (B, T, dim) -> (B, T, dim); with `state`, continue from it and leave it at the last token
        (updated in place, so a CUDA graph over it stays valid). `valid` (B, T) marks real tokens:
        a left-padded row leaves the same state as its tokens alone."""
        B, T, _ = u.shape
        x, z = self.in_proj(u).chunk(2, dim=-1)  # (B, T, D) each
        if valid is not None:
            x = x * valid[..., None]  # padding feeds the conv zeros, as a fresh state holds
        x = x.transpose(1, 2)  # (B, D, T)
        if state is not None:
            x_padded = torch.cat([state.conv.to(x.dtype), x], dim=-1)  # the conv sees the previous inputs
            if self.d_conv > 1:
                state.conv.copy_(x_padded[..., -(self.d_conv - 1) :])
            x = F.conv1d(x_padded, self.conv.weight, self.conv.bias, groups=self.inner)
        else:
            x = self.conv(x)[..., :T]  # causal: drop the right padding's outputs
        x = F.silu(x).transpose(1, 2)  # (B, T, D)
        decay, inputs, Cm = self._ssm_terms(x, valid)
        states, last = self._states(decay, inputs, state.ssm if state is not None else None)
        if state is not None:
            state.ssm.copy_(last)
        y = (states @ Cm[..., None]).squeeze(-1) + self.D.float() * x.float()  # (B, T, D)
        return self.out_proj((y.to(u.dtype) * F.silu(z)))

    def new_state(self, batch: int, device: torch.device, dtype: torch.dtype = torch.float32) -> MambaState:
        return MambaState(torch.zeros(batch, self.inner, self.d_conv - 1, device=device, dtype=dtype),
                          torch.zeros(batch, self.inner, self.d_state, device=device, dtype=torch.float32))

    def step(self, u: torch.Tensor, state: MambaState) -> torch.Tensor:
        """One token per row, u (B, dim) -> (B, dim), by the recurrence itself: no scan; `state` in place."""
        x, z = self.in_proj(u).chunk(2, dim=-1)  # (B, D)
        window = torch.cat([state.conv.to(x.dtype), x[..., None]], dim=-1)  # (B, D, d_conv)
        state.conv.copy_(window[..., 1:])
        x = F.silu((window * self.conv.weight[:, 0]).sum(-1) + self.conv.bias)  # (B, D)
        decay, inputs, Cm = self._ssm_terms(x[:, None])
        state.ssm.copy_(decay[:, 0] * state.ssm + inputs[:, 0])
        y = (state.ssm @ Cm[:, 0, :, None]).squeeze(-1) + self.D.float() * x.float()
        return self.out_proj(y.to(u.dtype) * F.silu(z))

    def state_bytes(self, batch: int = 1, dtype: torch.dtype = torch.float32) -> int:
        """Bytes of the decoding state per `batch` sequences, whatever the context length."""
        size = torch.finfo(dtype).bits // 8
        return batch * self.inner * ((self.d_conv - 1) * size + self.d_state * 4)
