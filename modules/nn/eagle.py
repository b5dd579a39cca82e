"""An EAGLE draft head: one transformer block that drafts from the target's own features.

EAGLE (Li et al. 2024, "EAGLE: Speculative Sampling Requires Rethinking Feature Uncertainty") drafts
at the feature level: at position j the head reads the target's feature f_j and the embedding of the
token j + 1 (already known), predicts the next feature f_{j+1}, and scores it with the target's own
output head; to draft further it feeds its predicted feature back in. EAGLE-3 (Li et al. 2025,
"EAGLE-3: Scaling up Inference Acceleration of Large Language Models via Training-Time Test") changes
two things, both options of `EagleConfig`:

- multi-layer fusion (`fuse_layers`): the head reads the outputs of a low, a middle and a high block of
  the target side by side, projected to the width, where EAGLE-1 reads the last features only;
- training-time test (`ttt_steps` > 1): training unrolls the head on its own predicted features, as
  drafting does, so the second and later drafts are trained on the inputs they meet; with it the
  feature regression goes (`feature_weight=0`) and only the tokens are scored.

A "feature" here is what the target's output head reads: `Decoder.features`, after the final norm
(EAGLE-1's choice). The head ends in a norm of its own, and its output is a predicted feature: scored
by the target's frozen `lm_head`, regressed on the target's next feature (EAGLE-1), and fed back in to
draft the token after. The token embedding and the output head are the target's, frozen: the head
holds no vocabulary-sized matrix (EAGLE-3's reduced draft vocabulary is not implemented).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from modules.nn.cache import KVCache
from modules.nn.config import DecoderConfig
from modules.nn.decoder import Block, Decoder, init_weights
from modules.nn.norm import RMSNorm, build_norm
from modules.nn.position import rope_at


def fusion_layers(n_layer: int) -> tuple[int, int, int]:
    """A low, a middle and the last block of an `n_layer` target (0-based): EAGLE-3's three feature sources.
    EAGLE-3's code reads blocks 2, n/2 and n - 3 of a 32-layer Llama; a tiny target has no room for that."""
    return 0, n_layer // 2, n_layer - 1


@dataclass
class EagleConfig:
    """What the head reads from the target and how it trains. The defaults are EAGLE-1; `eagle3` gives EAGLE-3."""

    fuse_layers: tuple[int, ...] | None = None  # blocks whose outputs are fused (EAGLE-3); None: the final features
    feature_weight: float = 1.0  # smooth-L1 regression on the target's next feature (EAGLE-1: 1; EAGLE-3: 0)
    token_weight: float = 0.1  # cross-entropy against the target's next-token distribution (EAGLE-1: 0.1)
    ttt_steps: int = 1  # training-time test: steps unrolled on the head's own features (EAGLE-3: 7)
    step_decay: float = 0.8  # unrolled step s is weighted step_decay**s (EAGLE-3's training code: 0.8)

    def __post_init__(self) -> None:
        if self.ttt_steps < 1:
            raise ValueError(f"eagle.ttt_steps={self.ttt_steps} must be at least 1 (1: no training-time test)")
        if self.fuse_layers is not None and not self.fuse_layers:
            raise ValueError("eagle.fuse_layers names no block; use None to read the target's final features")
        if self.feature_weight < 0 or self.token_weight < 0 or self.feature_weight + self.token_weight == 0:
            raise ValueError(f"eagle loss weights must be non-negative and not both 0; got feature {self.feature_weight}, "
                             f"token {self.token_weight}")

    @classmethod
    def eagle3(cls, n_layer: int, ttt_steps: int = 7) -> EagleConfig:
        """EAGLE-3: fused low/middle/last features, token loss only, `ttt_steps` unrolled steps."""
        return cls(fuse_layers=fusion_layers(n_layer), feature_weight=0.0, token_weight=1.0, ttt_steps=ttt_steps)


class _UnrolledKeys:
    """Keys and values of the steps unrolled so far, handed to `Block` as its cache (training-time test).

    Step s's query for anchor a (a chain that starts from the target's feature at a) reads the first
    step's keys of every anchor <= a, read from the target's features, and anchor a's own keys of steps
    1..s: what its draft s would read in the head's cache at decoding (EAGLE-3's causal-then-diagonal mask).
    """

    kernel = "sdpa"  # attention reads it through SDPA under `mask`

    def __init__(self) -> None:
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []

    def mask(self, n: int, device: torch.device) -> torch.Tensor:
        """(1, 1, n, S) for the next step's n anchors over every step's keys, these included."""
        sizes = [k.shape[2] for k in self.k] + [n]
        anchor = torch.arange(n, device=device)[:, None]
        blocks = [torch.arange(sizes[0], device=device)[None] <= anchor]  # step 0: causal
        blocks += [torch.arange(size, device=device)[None] == anchor for size in sizes[1:]]  # later steps: the same chain
        return torch.cat(blocks, dim=1)[None, None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep this step's k, v (B, nkv, n, hs); return every step's side by side (B, nkv, S, hs)."""
        self.k.append(k)
        self.v.append(v)
        return torch.cat(self.k, dim=2), torch.cat(self.v, dim=2)


class EagleHead(nn.Module):
    """An EAGLE draft head for a target of `config`: input fusion, one transformer block, a final norm.

    At position j: state_j (B, T, C), the target's feature (or fused features) or the head's own
    prediction, and the embedding of token j + 1, each RMS-normalised (as EAGLE-3), concatenated and
    projected to C (EAGLE's fc), pass through one `Block` with the target's RoPE table (no positions
    with learned ones: the features carry them), and the head's norm gives the predicted feature at j + 1.
    """

    def __init__(self, config: DecoderConfig, eagle: EagleConfig | None = None) -> None:
        super().__init__()
        eagle = eagle or EagleConfig()
        layers = eagle.fuse_layers or ()
        if any(not 0 <= i < config.n_layer for i in layers):
            raise ValueError(f"eagle.fuse_layers={layers}: a target of {config.n_layer} blocks has blocks "
                             f"0..{config.n_layer - 1}")
        self.config, self.eagle = config, eagle
        C = config.n_embd
        self.fuse = nn.Linear(len(layers) * C, C, bias=False) if layers else None
        self.norm_state = RMSNorm(C, config.norm_eps)
        self.norm_embed = RMSNorm(C, config.norm_eps)
        self.fc = nn.Linear(2 * C, C, bias=False)
        self.block = Block(config)  # attention and a dense MLP, whatever the target's layer pattern
        self.norm = build_norm(config)
        self.apply(lambda module: init_weights(module, config.n_layer))

    def read_target(
        self, target: Decoder, idx: torch.Tensor, cache: KVCache | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the target over idx (B, T) (into `cache`'s next T slots if given): its features (B, T, C)
        and what the head reads from it (B, T, C), or with fusion the `fuse_layers` blocks' outputs
        side by side (B, T, k C), caught by forward hooks that are removed again."""
        layers = self.eagle.fuse_layers or ()
        outputs: dict[int, torch.Tensor] = {}
        hooks = [target.blocks[i].register_forward_hook(lambda module, args, out, i=i: outputs.__setitem__(i, out))
                 for i in set(layers)]
        try:
            features = target.features(idx, cache)
        finally:
            for hook in hooks:
                hook.remove()
        return features, torch.cat([outputs[i] for i in layers], dim=-1) if layers else features

    def from_target(self, read: torch.Tensor) -> torch.Tensor:
        """The head's input state (B, T, C) from `read_target`'s second output: fused, or the features as they are."""
        return read if self.fuse is None else self.fuse(read)

    def _input(self, target: Decoder, state: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The block's input (B, L, C) from states (B, L, C) and tokens j + 1 (B, L) (the target's embedding, frozen)."""
        embed = target.wte(tokens).detach()
        return self.fc(torch.cat([self.norm_state(state), self.norm_embed(embed)], dim=-1))

    def logits(self, target: Decoder, feature: torch.Tensor) -> torch.Tensor:
        """Logits (..., padded_vocab) of predicted features (..., C) through the target's frozen output head."""
        return F.linear(feature, target.lm_head.weight.detach())

    def cache(self, max_len: int, device: torch.device, dtype: torch.dtype) -> KVCache:
        """A key/value cache for the head's one block, for drafting."""
        return KVCache(replace(self.config, n_layer=1, layer_pattern="a"), 1, max_len, device, dtype)

    def step(self, target: Decoder, state: torch.Tensor, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Predicted features (B, n, C) at the next n slots of the head's cache: slot j reads state (B, n, C)
        (from `from_target`, or the head's own earlier prediction) and tokens j + 1 (B, n)."""
        n = state.shape[1]
        mask = cache.attention_mask(n)
        rope = None if target.rope is None else rope_at(target.rope, cache.positions(n))
        out = self.block(self._input(target, state, tokens), rope, cache, 0, mask)
        cache.advance(n)
        return self.norm(out)

    def unroll(
        self, target: Decoder, idx: torch.Tensor, steps: int | None = None
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The head's predicted features at each unrolled step, and the target's features (B, T, C) of idx (B, T).

        Step s (0-based) holds (B, T - 1 - s, C): at anchor j, the prediction of feature j + s + 1 by a
        chain that read the target's state at j and then its own predictions, with the true tokens
        j + 1 .. j + s + 1 (teacher-forced, as EAGLE-3). Step 0 is EAGLE-1's one-step prediction. The
        target runs without gradients.
        """
        steps = self.eagle.ttt_steps if steps is None else steps
        T = idx.shape[1]
        if T < steps + 1:
            raise ValueError(f"a block of {T} tokens leaves no target for {steps} unrolled steps: "
                             f"need at least {steps + 1}")
        with torch.no_grad():
            features, read = self.read_target(target, idx)
        keys, state, out = _UnrolledKeys(), self.from_target(read[:, : T - 1]), []
        for s in range(steps):
            n = T - 1 - s  # anchors whose step-s target, feature j + s + 1, lies in the block
            rope = None if target.rope is None else target.rope[:, s : s + n]  # the chain's s-th draft sits at j + s
            x = self._input(target, state[:, :n], idx[:, s + 1 : s + 1 + n])
            state = self.norm(self.block(x, rope, keys, 0, keys.mask(n, idx.device)))
            out.append(state)
        return out, features

    def loss(self, target: Decoder, idx: torch.Tensor) -> torch.Tensor:
        """The head's training loss on token ids idx (B, T), the target frozen (no gradient reaches it).

        Per unrolled step s, weighted step_decay**s: feature_weight x smooth-L1(predicted, target feature)
        + token_weight x cross-entropy of the head's next-token distribution against the target's (soft
        labels, in nats). EAGLE-1: L = L_reg + 0.1 L_cls, one step; EAGLE-3: token loss only over the
        unrolled steps (`EagleConfig.eagle3`).
        """
        predicted, features = self.unroll(target, idx)
        vocab = self.config.vocab_size
        with torch.no_grad():
            target_logp = F.log_softmax(target.lm_head(features)[..., :vocab].float(), dim=-1)  # (B, T, V)
        total = features.new_zeros((), dtype=torch.float32)
        for s, feature in enumerate(predicted):
            n = feature.shape[1]
            goal = features[:, s + 1 : s + 1 + n]
            logp = F.log_softmax(self.logits(target, feature)[..., :vocab].float(), dim=-1)
            token = -(target_logp[:, s + 1 : s + 1 + n].exp() * logp).sum(-1).mean()
            regression = F.smooth_l1_loss(feature.float(), goal.float())
            step = self.eagle.token_weight * token + self.eagle.feature_weight * regression
            total = total + self.eagle.step_decay**s * step
        return total
