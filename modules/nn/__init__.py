"""Layers and models, written once and composed by config: the one decoder (`Decoder`, built from a `DecoderConfig`) and
its pieces (attention variants, norms, positions, MLPs, the mixture of experts and its routers, Mamba, MTP heads,
native sparse attention, the EAGLE head, the decoding caches, parameter and cache-byte counts from a config), and
weight-only quantization of its linear layers (`quant`: int8, int4, GPTQ). No LightningModule lives here;
`modules.training` holds those."""

from modules.nn.config import DecoderConfig
from modules.nn.decoder import Block, Decoder

__all__ = ["Block", "Decoder", "DecoderConfig"]
