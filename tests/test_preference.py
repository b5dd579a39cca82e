"""Preference data: both record layouts, their errors, pairs from sampled continuations; the reward model's loss;
the sentiment reward; a reward-model and an RLHF run through the runner."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from datamodules.preference import (PreferenceDataConfig, collate_pairs, corpus_prompts, label_pairs, read_pairs, split_prompts,
                                    to_pair_text)
from datamodules.sources import DataFormatError
from datamodules.tokenizer import train_bpe
from evaluation.sentiment import sentiment
from modules.training.reward import bradley_terry_loss


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return train_bpe(["Human: how are you? Assistant: fine, thanks. The cat sat on the mat. " * 30], 300)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_reads_prompt_chosen_rejected_records(tmp_path, tokenizer) -> None:
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "The cat", "chosen": " sat on the mat.", "rejected": " how"}] * 3)
    pairs = read_pairs(str(path), tokenizer)
    assert len(pairs) == 3
    assert tokenizer.decode(pairs[0].prompt) == "The cat" and tokenizer.decode(pairs[0].chosen) == " sat on the mat."


def test_reads_anthropic_hh_dialogues(tmp_path, tokenizer) -> None:
    record = {"chosen": "\n\nHuman: how are you?\n\nAssistant: fine, thanks.",
              "rejected": "\n\nHuman: how are you?\n\nAssistant: the mat."}
    prompt, chosen, rejected = to_pair_text(record, "r1")
    assert prompt == "\n\nHuman: how are you?\n\nAssistant:" and chosen == " fine, thanks." and rejected == " the mat."
    pairs = read_pairs(str(write_jsonl(tmp_path / "hh.jsonl", [record])), tokenizer)
    assert tokenizer.decode(pairs[0].prompt + pairs[0].chosen) == record["chosen"]


@pytest.mark.parametrize("record, message", [
    ({"prompt": "x", "chosen": "a"}, r"record 2: missing field\(s\) \['rejected'\]"),
    ({"prompt": "x", "chosen": "a", "rejected": "  "}, "record 2: empty rejected response"),
    ({"chosen": "no turns here", "rejected": "none"}, "record 2: no 'prompt' field"),
    ({"prompt": "x", "chosen": 3, "rejected": "b"}, "record 2: field 'chosen' must be text"),
])
def test_malformed_records_name_the_record(tmp_path, tokenizer, record, message) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "chosen": "a", "rejected": "b"}, record])
    with pytest.raises(DataFormatError, match=message):
        read_pairs(str(path), tokenizer)


def test_pairs_are_every_pair_or_best_and_worst_and_ties_are_dropped() -> None:
    prompts = [[1], [2]]
    responses = [[10], [11], [12], [20], [21], [22]]
    rewards = [0.1, 0.9, -0.5, 0.0, 0.02, 0.01]
    pairs = label_pairs(prompts, responses, rewards, k=3, min_gap=0.05, every_pair=False)
    assert len(pairs) == 1  # prompt 2's samples differ by 0.02 < 0.05: a tie
    assert (pairs[0].prompt, pairs[0].chosen, pairs[0].rejected) == ([1], [11], [12])
    assert (pairs[0].chosen_reward, pairs[0].rejected_reward) == (0.9, -0.5)
    every = label_pairs(prompts, responses, rewards, k=3, min_gap=0.05)  # K choose 2 per prompt
    assert [(p.chosen, p.rejected) for p in every] == [([11], [10]), ([11], [12]), ([10], [12])]


def test_collated_pairs_mark_each_rows_last_token() -> None:
    from datamodules.preference import Pair

    batch = collate_pairs([Pair([1, 2], [3], [4, 5, 6]), Pair([7], [8, 9], [10])], pad_id=0)
    assert batch["ids"].tolist() == [[1, 2, 3, 0, 0], [7, 8, 9, 0, 0], [1, 2, 4, 5, 6], [7, 10, 0, 0, 0]]
    assert batch["last"].tolist() == [2, 2, 4, 1] and batch["prompt_len"].tolist() == [2, 1, 2, 1]


def test_corpus_prompts_are_distinct_prose_prefixes_and_splits_are_disjoint(tokenizer) -> None:
    paragraphs = [f"Cat {i:02d} sat on the mat, and then the cat sat on the mat again, and again, and again." for i in range(30)]
    texts = ["Heading\n\n.. directive:: x\n\n" + "\n\n".join(paragraphs) + "\n\nCat 00 sat on the mat, short."]
    prompts = corpus_prompts(texts, tokenizer, n_tokens=8, n=20, seed=0)
    assert len(prompts) == 20 and all(len(p) == 8 for p in prompts)
    assert len({tuple(p) for p in prompts}) == 20  # distinct, the short duplicate prefix too
    assert all(tokenizer.decode(p).startswith("Cat ") for p in prompts)  # prose only: no heading, no directive
    train, held_out = split_prompts(prompts, 15, 5)
    assert not {tuple(p) for p in train} & {tuple(p) for p in held_out}
    with pytest.raises(DataFormatError, match="held_out_prompts"):
        split_prompts(prompts, 15, 50)


def test_bradley_terry_loss_matches_its_formula() -> None:
    chosen, rejected = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 0.0, -1.0])
    expected = sum(math.log1p(math.exp(-d)) for d in (1.0, 0.0, 3.0)) / 3
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(expected, rel=1e-6)


def test_sentiment_reward_reads_the_vader_lexicon() -> None:
    good, bad, neutral = sentiment(["This is a great and wonderful result.", "A terrible, awful failure.", "The file has 3 lines."])
    assert good > 0.5 and bad < -0.5 and neutral == 0.0


def test_config_errors_name_the_setting() -> None:
    with pytest.raises(ValueError, match="samples_per_prompt"):
        PreferenceDataConfig(samples_per_prompt=1)
    with pytest.raises(ValueError, match="temperature"):
        PreferenceDataConfig(temperature=0.0)


def test_concordance_matches_a_pair_by_pair_count() -> None:
    from itertools import permutations

    from modules.training.reward import concordance

    truth = torch.tensor([0.0, 0.0, 0.5, -0.3, 0.9, 0.0])
    scores = torch.tensor([0.1, 0.4, 0.2, -1.0, 0.2, 0.1])
    agree = total = 0.0
    for i, j in permutations(range(6), 2):
        if truth[i] > truth[j]:
            total += 1
            agree += 1.0 if scores[i] > scores[j] else 0.5 if scores[i] == scores[j] else 0.0
    assert concordance(scores, truth) == pytest.approx(agree / total)
    assert concordance(truth, truth) == 1.0 and concordance(-truth, truth) == 0.0
