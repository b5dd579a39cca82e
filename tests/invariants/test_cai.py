"""Constitutional AI's invariants: AI feedback is free of the options' order; an SL-CAI row supervises only the revision."""

from __future__ import annotations

import pytest
import torch

from datamodules.cai import CritiqueStep, ai_feedback, build_sl_data, decoder_logprob
from datamodules.chat import END, add_chat_tokens, encode
from datamodules.constitution import load_constitution
from datamodules.tokenizer import train_bpe
from modules.nn import Decoder
from modules.nn.decoder import IGNORE

from ._helpers import small_config


def test_feedback_is_order_free_and_sl_rows_supervise_the_revision() -> None:
    """AI feedback averages both orders of the options: swapping the responses swaps (p_a, p_b) exactly, and a judge
    that scores "A" and "B" alike gives 1/2. An SL-CAI row trains on the final revision and `<|end|>`, nothing else."""
    principle = load_constitution()[0]
    tokenizer = train_bpe(["Human: repeat the words apple river. Assistant: apple river (A) (B) " * 40], 300)
    add_chat_tokens(tokenizer)
    torch.manual_seed(0)
    judge = decoder_logprob(Decoder(small_config(vocab_size=tokenizer.get_vocab_size(), block_size=256)).eval(), tokenizer, chat=True)
    p_a, p_b = ai_feedback(judge, "repeat: apple", "apple", "you idiot", principle)
    q_a, q_b = ai_feedback(judge, "repeat: apple", "you idiot", "apple", principle)
    assert p_a + p_b == pytest.approx(1.0) and (p_a, p_b) == pytest.approx((q_b, q_a), abs=1e-12)
    assert ai_feedback(lambda context, answer: -1.0, "q", "a", "b", principle) == (0.5, 0.5)
    chain = [CritiqueStep(principle.name, "you idiot", "rude", "apple river", "", "")]
    row = build_sl_data(["repeat: apple"], [chain])[0]
    ids, labels = encode(tokenizer, row["messages"])
    supervised = [t for t, label in zip(ids, labels) if label != IGNORE]
    assert supervised == tokenizer.encode("apple river").ids + [tokenizer.token_to_id(END)]
