"""The architecture ablation's invariants: the KV cache shrinks with the KV heads (MLA as GQA with 2.25 groups); every
arm starts near ln V."""

from __future__ import annotations

import math

import torch

from modules.nn import DecoderConfig
from modules.nn.cache import cache_bytes
from modules.training.architectures import ArchitectureSettings, ArchitecturesModule
from modules.training.arms import ConfigArm
from repro.config import load_preset


def test_kv_cache_shrinks_with_the_kv_heads() -> None:
    """Keys and values of every layer in bf16: 2 x 2 bytes x n_layer x n_kv_head x head_dim per token, so
    the tiny preset's GQA (2 of 4 heads) halves the multi-head cache and MQA quarters it; MLA caches
    d_c + d_R = 4.5 head widths per layer (DeepSeek-V2: as much as GQA with 2.25 groups)."""
    preset = load_preset("architectures", "tiny")
    base = DecoderConfig(**{**preset["model"], "vocab_size": 300})

    configs = {a["name"]: ConfigArm(**a).config(base) for a in ArchitectureSettings().arms}
    for name, c in configs.items():
        values = c.kv_rank + c.rope_dim if c.attention == "mla" else 2 * c.kv_heads * c.head_dim
        assert cache_bytes(c, 1, 1, torch.bfloat16) == 2 * c.n_layer * values, name
    assert cache_bytes(configs["+rope"], 1, 1) == 2 * cache_bytes(configs["+gqa"], 1, 1) == 4 * cache_bytes(configs["+mqa"], 1, 1)
    assert cache_bytes(configs["+mla"], 1, 1) * 2 / 4.5 == cache_bytes(configs["+mqa"], 1, 1)  # MLA: GQA with 2.25 groups


def test_arms_start_at_log_vocab() -> None:
    """Every arm of the default ablation, untrained, costs about ln(V): the knobs do not change the initial logits' scale."""
    preset = load_preset("architectures", "tiny")
    module = ArchitecturesModule({**preset["model"], "vocab_size": 300}, {}, {}, 10)
    batch = torch.randint(0, 300, (8, 65), generator=torch.Generator().manual_seed(0))
    for arm in module.arms:
        with torch.no_grad():
            loss = module.decoder(arm.name).loss(batch[:, :-1], batch[:, 1:]).item()
        assert abs(loss - math.log(300)) < 0.1, (arm.name, loss)
