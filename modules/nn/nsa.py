"""Native sparse attention (Yuan et al. 2025, "Native Sparse Attention", DeepSeek): three branches per query.

- compressed: the keys and values of each block of `nsa_block` tokens (stride `nsa_stride`) are mapped
  to one key and one value by a learned map of the flattened block with intra-block positions (the
  paper's phi, Eq. 7); a query sees the blocks that end at or before it.
- selected: the compressed branch's attention scores, summed over each group of query heads sharing a
  key head (Eq. 10), rank blocks of `nsa_select_block` tokens; each query attends to the tokens of its
  top `nsa_select` blocks (Eq. 11-12), the first block and its two local blocks always among them.
- sliding window: the last `nsa_window` tokens.

Each branch has its own keys and values (Sec. 3.3.3: so that the window does not short-cut the
others), and the output is their sum weighted by learned per-head sigmoid gates (Eq. 5).

Two paths compute the selected and window branches: `reference` builds each query's mask densely in
plain PyTorch (scaled_dot_product_attention with a boolean mask; exact, O(T^2) memory), `flex` gives
the same masks to FlexAttention as block-sparse masks, so it skips the 128 x 128 tiles no query of a tile
reads (the sliding window's; the selection's tiles are skipped only where no query of the tile
selected the block). Both give the same outputs and gradients (benchmarks/nsa.py checks on the GPU; tests on
the CPU, where flex has no backward, check outputs). `auto` is flex on CUDA from `FLEX_FROM` tokens and the
plain path below: on the H100 the plain path is the faster one up to 4,096 tokens (forward and backward) and
flex from 8,192 (reports/nsa/README.md). The compressed branch is dense in both: T / stride keys.
Training and scoring only: there is no KV-cache decoding path.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from modules.nn.config import DecoderConfig
from modules.nn.position import apply_rope

BRANCHES = ("compressed", "selected", "window")
FLEX_FROM = 8192  # tokens: `auto` uses FlexAttention on CUDA from here (measured crossover on the H100)


class NativeSparseAttention(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        self.block, self.stride = config.nsa_block, config.nsa_stride
        self.select_block, self.select, self.window = config.nsa_select_block, config.nsa_select, config.nsa_window
        kv = self.n_kv_head * self.head_dim
        self.q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=config.bias)
        self.kv = nn.Linear(config.n_embd, 6 * kv, bias=config.bias)  # keys and values of each branch
        # phi (Eq. 7): one key (value) from a block of keys (values) and their positions in the block
        self.block_pos = nn.Parameter(torch.zeros(2, self.block, self.head_dim))
        self.compress_k = nn.Linear(self.block * self.head_dim, self.head_dim)
        self.compress_v = nn.Linear(self.block * self.head_dim, self.head_dim)
        self.gate = nn.Linear(config.n_embd, 3 * self.n_head)
        self.proj = nn.Linear(self.n_head * self.head_dim, config.n_embd, bias=config.bias)
        self.proj.residual = True
        self.kernel = "auto"  # reference | flex | auto (flex on CUDA from FLEX_FROM tokens)

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor | None = None,
        cache: object | None = None,
        layer: int = 0,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C), causal."""
        if cache is not None:
            raise NotImplementedError("model.attention=nsa has no KV-cache decoding path: score and train it without a cache "
                                      "(lm-eval loglikelihood tasks), or generate with an attention that has one")
        B, T, _ = x.shape
        H, Hkv, hs = self.n_head, self.n_kv_head, self.head_dim
        q = self.q(x).view(B, T, H, hs).transpose(1, 2)  # (B, H, T, hs)
        kc, vc, ks, vs, kw, vw = (t.view(B, T, Hkv, hs).transpose(1, 2) for t in self.kv(x).chunk(6, dim=-1))
        if rope is not None:  # token positions for the query and the selected and window keys
            q, ks, kw = apply_rope(q, rope), apply_rope(ks, rope), apply_rope(kw, rope)
        out_c, p_c = self.compressed(q, kc, vc)
        selected = self.selection(p_c, T)  # (B, Hkv, T, n_blocks)
        kernel = self.kernel if self.kernel != "auto" else ("flex" if x.is_cuda and T >= FLEX_FROM else "reference")
        attend = _flex if kernel == "flex" else _dense
        out_s = attend(q, ks, vs, self._selected_mask(selected), selected)
        out_w = attend(q, kw, vw, self._window_mask(), None)
        g = torch.sigmoid(self.gate(x)).view(B, T, H, 3).permute(3, 0, 2, 1).unsqueeze(-1)  # (3, B, H, T, 1)
        y = g[0] * out_c + g[1] * out_s + g[2] * out_w  # (B, H, T, hs)
        return self.proj(y.transpose(1, 2).reshape(B, T, H * hs))

    def compressed(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The compressed branch's output (B, H, T, hs) and its attention probabilities (B, H, T, n_cmp)."""
        B, H, T, hs = q.shape
        n_cmp = (T - self.block) // self.stride + 1 if T >= self.block else 0
        if n_cmp == 0:
            return q.new_zeros(B, H, T, hs), q.new_zeros(B, H, T, 0)

        def phi(t: torch.Tensor, pos: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
            blocks = t.unfold(2, self.block, self.stride).transpose(-1, -2)  # (B, Hkv, n_cmp, block, hs)
            return linear((blocks + pos).flatten(-2))  # (B, Hkv, n_cmp, hs)

        kc, vc = phi(k, self.block_pos[0], self.compress_k), phi(v, self.block_pos[1], self.compress_v)
        group = H // self.n_kv_head
        kc, vc = kc.repeat_interleave(group, 1), vc.repeat_interleave(group, 1)
        scores = q @ kc.transpose(-1, -2) / math.sqrt(hs)  # (B, H, T, n_cmp)
        ends = torch.arange(n_cmp, device=q.device) * self.stride + self.block - 1
        visible = ends[None, :] <= torch.arange(T, device=q.device)[:, None]  # (T, n_cmp): blocks ended by t
        scores = scores.masked_fill(~visible, float("-inf"))
        wide = torch.promote_types(scores.dtype, torch.float32)  # bf16 scores: softmax in float32
        p = torch.softmax(scores.to(wide), dim=-1).nan_to_num(0.0).to(q.dtype)  # a query before the first block sees none
        return p @ vc, p

    def selection(self, p_cmp: torch.Tensor, T: int) -> torch.Tensor:
        """(B, Hkv, T, n_blocks) bool: the selection blocks each query reads (shared by a group's heads)."""
        B, H, _, n_cmp = p_cmp.shape
        n_blocks = math.ceil(T / self.select_block)
        device = p_cmp.device
        # a compressed block's score counts for every selection block it overlaps (Eq. 9)
        starts = torch.arange(n_cmp, device=device) * self.stride
        first = starts // self.select_block
        last = (starts + self.block - 1) // self.select_block
        j = torch.arange(n_blocks, device=device)
        overlap = ((j[None, :] >= first[:, None]) & (j[None, :] <= last[:, None])).to(p_cmp.dtype)  # (n_cmp, n_blocks)
        importance = (p_cmp.detach() @ overlap).view(B, self.n_kv_head, H // self.n_kv_head, T, n_blocks).sum(2)
        own = torch.arange(T, device=device) // self.select_block  # (T,)
        causal = j[None, :] <= own[:, None]  # (T, n_blocks)
        behind = own[:, None] - j[None, :]
        forced = (j[None, :] == 0) | ((behind >= 0) & (behind < 2))  # the first block and the two local ones
        importance = importance.masked_fill(~causal, float("-inf")).masked_fill(forced, float("inf"))
        top = importance.topk(min(self.select, n_blocks), dim=-1).indices
        chosen = torch.zeros_like(importance, dtype=torch.bool).scatter_(-1, top, True)
        return chosen & causal

    def _selected_mask(self, selected: torch.Tensor):
        block, group = self.select_block, self.n_head // self.n_kv_head

        def mask(b, h, q_idx, kv_idx):
            return selected[b, h // group, q_idx, kv_idx // block] & (kv_idx <= q_idx)
        return mask

    def _window_mask(self):
        window = self.window

        def mask(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & (q_idx - kv_idx < window)
        return mask


def _dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_mod, selected: torch.Tensor | None) -> torch.Tensor:
    """Plain PyTorch: the mask of every (head, query, key), then scaled_dot_product_attention."""
    B, H, T, _ = q.shape
    group = H // k.shape[1]
    b, h, t, s = (torch.arange(n, device=q.device) for n in (B, H, T, T))
    allowed = mask_mod(b[:, None, None, None], h[None, :, None, None], t[None, None, :, None], s[None, None, None, :])
    allowed = allowed.expand(B, H, T, T)
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_mod, selected: torch.Tensor | None) -> torch.Tensor:
    """FlexAttention with the same mask as a block-sparse mask (compiled on CUDA: eager flex is a slow reference)."""
    # optional: FlexAttention came with torch 2.5, and only this kernel needs it (the reference path runs without)
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, H, T, _ = q.shape
    block_mask = create_block_mask(mask_mod, B if selected is not None else None, H if selected is not None else None,
                                   T, T, device=q.device, _compile=q.is_cuda)
    kernel = _compiled_flex() if q.is_cuda else flex_attention
    return kernel(q, k, v, block_mask=block_mask, enable_gqa=k.shape[1] != H)


_COMPILED = None


def _compiled_flex():
    global _COMPILED
    if _COMPILED is None:
        from torch.nn.attention.flex_attention import flex_attention  # optional, as in `_flex`

        _COMPILED = torch.compile(flex_attention, dynamic=False)
    return _COMPILED
