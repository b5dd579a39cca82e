"""What the invariants of several techniques build on."""

from __future__ import annotations

from modules.nn import DecoderConfig


def small_config(**overrides) -> DecoderConfig:
    return DecoderConfig(**{"vocab_size": 300, "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 32, **overrides})
