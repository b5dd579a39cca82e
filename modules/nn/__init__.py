"""Model pieces written once and composed by config."""

from modules.nn.config import DecoderConfig
from modules.nn.decoder import Block, Decoder

__all__ = ["Block", "Decoder", "DecoderConfig"]
