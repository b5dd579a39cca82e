"""DeepSeekMoE: shared experts plus fine-grained routed experts, with the balancing schemes compared in
Wang et al. 2024 ("Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts") and DeepSeek-V3.

Each token goes through the shared experts and through the top-k of the routed experts, weighted
by its affinity to them: softmax affinities weight the selected experts as they are (DeepSeekMoE),
sigmoid affinities are normalised over the selected ones (DeepSeek-V3). Balancing:

- "aux": the Switch/GShard auxiliary loss alpha * E * sum_i f_i P_i over the batch, f_i the share
  of routed slots that chose expert i and P_i its mean affinity;
- "loss_free": a per-expert bias added to the affinities for the top-k choice only (gates use
  the unbiased affinity), moved after each optimizer step by u * sign(mean load - load_i);
- "loss_free_seq": the bias plus DeepSeek-V3's sequence-wise complementary loss, the same product
  per sequence with affinities normalised over all experts, and a small alpha;
- "none": plain top-k.

Dispatch sorts the (token, expert) slots by expert and runs each expert once on its contiguous
rows (a loop over experts, never over tokens; on Hopper in bf16, three grouped GEMMs over all
experts at once); outputs return by `index_add_`. No token is dropped.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from modules.nn.config import DecoderConfig

BALANCING = ("none", "aux", "loss_free", "loss_free_seq")


class Experts(nn.Module):
    """E feed-forward experts of width `hidden` as stacked weights: (E, C, H) in and (E, H, C) out."""

    def __init__(self, n: int, dim: int, hidden: int, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.w_in = nn.Parameter(torch.empty(n, dim, hidden))
        self.w_gate = nn.Parameter(torch.empty(n, dim, hidden)) if kind == "swiglu" else None
        self.w_out = nn.Parameter(torch.empty(n, hidden, dim))

    def looped(self, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Each expert on its rows (rows sorted by expert, `counts` per expert), one expert at a time.
        The weights are unbound once, so the backward stacks one gradient per matrix rather than
        adding E zero-padded copies."""
        w_in, w_out = self.w_in.unbind(0), self.w_out.unbind(0)
        w_gate = self.w_gate.unbind(0) if self.w_gate is not None else None
        out = []
        for i, x in enumerate(rows.split(counts)):
            if not x.shape[0]:
                out.append(x)
                continue
            h = x @ w_in[i]
            h = F.silu(x @ w_gate[i]) * h if w_gate is not None else F.gelu(h, approximate="tanh")
            out.append(h @ w_out[i])
        return torch.cat(out)

    def grouped(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Every expert on its rows in three grouped GEMMs (rows sorted by expert, `counts` per expert):
        one kernel per matrix instead of one per expert, and no host sync (CUDA bf16, sm90)."""
        offsets = counts.cumsum(0).to(torch.int32)
        dtype = torch.bfloat16

        def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return torch._grouped_mm(a.to(dtype), b.to(dtype), offs=offsets)

        h = mm(rows, self.w_in)
        h = F.silu(mm(rows, self.w_gate)) * h if self.w_gate is not None else F.gelu(h, approximate="tanh")
        return mm(h, self.w_out).to(rows.dtype)

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert on every row, summed: the shared experts (one wide MLP)."""
        h = torch.einsum("nc,ech->neh", x, self.w_in)
        if self.w_gate is not None:
            h = F.silu(torch.einsum("nc,ech->neh", x, self.w_gate)) * h
        else:
            h = F.gelu(h, approximate="tanh")
        return torch.einsum("neh,ehc->nc", h, self.w_out)


class MoE(nn.Module):
    """The feed-forward layer of a block with `config.moe_experts` routed experts (see module doc)."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.n_experts, self.top_k = config.moe_experts, config.moe_top_k
        self.score, self.balance = config.moe_score, config.moe_balance
        self.aux_alpha, self.seq_alpha = config.moe_aux_alpha, config.moe_seq_alpha
        C, H = config.n_embd, config.moe_hidden_dim
        self.router = nn.Linear(C, self.n_experts, bias=False)
        self.experts = Experts(self.n_experts, C, H, config.mlp)
        self.shared = Experts(config.moe_shared, C, H, config.mlp) if config.moe_shared else None
        # the loss-free bias: state, not a parameter (no gradient, moved by `update_bias`)
        self.register_buffer("expert_bias", torch.zeros(self.n_experts))
        self.register_buffer("load", torch.zeros(self.n_experts), persistent=False)  # slots per expert, since last read
        self.grouped_gemm = True  # CUDA bf16 on Hopper: grouped GEMMs instead of the loop over experts
        self.aux_loss: torch.Tensor | None = None  # this forward's balancing loss (already weighted), or None
        self.last_load: torch.Tensor | None = None  # slots per expert in this forward (E,)

    def reset_parameters(self, std: float, residual_std: float) -> None:
        nn.init.normal_(self.router.weight, std=std)
        for experts in (self.experts, self.shared):
            if experts is not None:
                nn.init.normal_(experts.w_in, std=std)
                if experts.w_gate is not None:
                    nn.init.normal_(experts.w_gate, std=std)
                nn.init.normal_(experts.w_out, std=residual_std)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(affinities (N, E), chosen experts (N, k), gate weights (N, k)) for rows x (N, C)."""
        logits = self.router(x)
        logits = logits.float() if logits.element_size() < 4 else logits  # route in at least float32
        affinity = logits.softmax(-1) if self.score == "softmax" else logits.sigmoid()
        biased = affinity + self.expert_bias if self.balance.startswith("loss_free") else affinity
        chosen = biased.topk(self.top_k, dim=-1).indices  # (N, k): the bias picks, it never weighs
        gates = affinity.gather(-1, chosen)
        if self.score == "sigmoid":
            gates = gates / gates.sum(-1, keepdim=True)
        return affinity, chosen, gates

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        flat = x.reshape(-1, C)
        affinity, chosen, gates = self.route(flat)
        slots = chosen.flatten()  # (N k,): slot j belongs to token j // k
        order = slots.argsort(stable=True)
        counts = torch.bincount(slots, minlength=self.n_experts)
        rows = flat[order // self.top_k]  # (N k, C), grouped by expert
        if self._grouped_gemm(rows):
            routed = self.experts.grouped(rows, counts)
        else:
            routed = self.experts.looped(rows, counts.tolist())
        # under autocast the looped experts return bf16 rows for float32 tokens: weigh and sum them in the
        # tokens' dtype, as the grouped path returns them (index_add_ takes no source of another dtype)
        routed = routed.to(flat.dtype) * gates.flatten()[order, None].to(flat.dtype)
        out = torch.zeros_like(flat).index_add_(0, order // self.top_k, routed)
        if self.shared is not None:
            out = out + self.shared.dense(flat)
        self.last_load = counts.detach()
        if self.training:
            self.load += counts.detach().to(self.load.dtype)
        self.aux_loss = self._balancing_loss(affinity, chosen, B, T)
        return out.view(B, T, C)

    def _grouped_gemm(self, rows: torch.Tensor) -> bool:
        """Whether to run the experts as grouped GEMMs: on a CUDA device of compute capability 9+ in bf16
        (the tensor or autocast), with widths the kernel accepts; else the loop over experts."""
        if not (self.grouped_gemm and rows.is_cuda and hasattr(torch, "_grouped_mm")):
            return False
        bf16 = rows.dtype == torch.bfloat16 or (torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == torch.bfloat16)
        widths = (self.experts.w_in.shape[1], self.experts.w_in.shape[2])
        return bf16 and torch.cuda.get_device_capability(rows.device)[0] >= 9 and all(w % 16 == 0 for w in widths)

    def _balancing_loss(self, affinity: torch.Tensor, chosen: torch.Tensor, B: int, T: int) -> torch.Tensor | None:
        """alpha * sum_i f_i P_i (Wang et al. Eq. 2; DeepSeek-V3 Eq. 17-20): f_i = E / (k n) times the
        slots expert i took among n tokens, P_i its mean affinity normalised over all experts; over the
        whole batch ("aux") or per sequence, averaged ("loss_free_seq"). Both are alpha at a uniform split.
        Under data parallelism "aux" counts f over the global batch (an all-reduce of the slot counts in
        training), so N processes train what one process of the whole batch trains."""
        if self.balance not in ("aux", "loss_free_seq"):
            return None
        E, k = self.n_experts, self.top_k
        normalised = affinity / affinity.sum(-1, keepdim=True)
        groups = (1, B * T) if self.balance == "aux" else (B, T)
        hits = torch.zeros(B * T, E, device=chosen.device, dtype=affinity.dtype).scatter_(-1, chosen, 1.0).view(*groups, E)
        counts, n = hits.sum(1), groups[1]
        if self.balance == "aux" and self.training and _world() > 1:
            # the batch is the global one: f counts every process's slots over every process's tokens, and the
            # gradient of alpha * sum_i f_i P_i, averaged over processes, is the whole batch's
            counts = counts.detach().clone()
            torch.distributed.all_reduce(counts)
            n *= _world()
        f = counts * E / (k * n)  # (groups, E)
        P = normalised.view(*groups, E).mean(1)
        alpha = self.aux_alpha if self.balance == "aux" else self.seq_alpha
        return alpha * (f * P).sum(-1).mean()

    @torch.no_grad()
    def update_bias(self, rate: float, load: torch.Tensor | None = None) -> None:
        """Move the bias by rate * sign(mean load - load_i) (Wang et al., Alg. 1) and start counting
        again; `load` is the (all-reduced) count to use, default this layer's own since the last update."""
        load = self.load if load is None else load
        self.expert_bias += rate * torch.sign(load.mean() - load)
        self.load.zero_()


def _world() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_available() and torch.distributed.is_initialized() else 1


@torch.no_grad()
def update_biases(layers: list[MoE], rate: float, reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> torch.Tensor:
    """After an optimizer step: sum each layer's loads since the last call over every process (`reduce`,
    an all-reduce under DDP), move each bias by `rate` (0: count only), start counting again; returns
    the loads (layers, E)."""
    loads = reduce(torch.stack([m.load for m in layers]))
    for layer, load in zip(layers, loads):
        layer.update_bias(rate, load)
    return loads


def max_violation(load: torch.Tensor) -> torch.Tensor:
    """MaxVio (Wang et al. 2024, Eq. 5): (max_i load_i - mean load) / mean load, over the last dim."""
    mean = load.float().mean(-1)
    return (load.float().max(-1).values - mean) / mean
