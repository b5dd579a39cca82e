"""The tokenizers' invariants: GPT-2's byte alphabet spells every byte once, visibly."""

from __future__ import annotations

from datamodules.subword.bpe import ALPHABET


def test_byte_alphabet_spells_every_byte_once_and_visibly() -> None:
    """GPT-2's byte-to-unicode map: 256 distinct characters, none of them whitespace or a control character, so
    every pre-token is a visible string and every byte sequence (any UTF-8 text) has a spelling."""
    assert len(set(ALPHABET)) == 256
    assert all(ch.isprintable() and not ch.isspace() for ch in ALPHABET)
    assert [ALPHABET[b] for b in range(ord("!"), ord("~") + 1)] == [chr(b) for b in range(ord("!"), ord("~") + 1)]
