"""Preference pairs (reward model, DPO) and prompts (PPO).

The embedded source is the controlled-generation task of the DPO paper (Rafailov et al. 2023,
Sec. 6.1) on the suite's corpus: prompts are the first `prompt_tokens` tokens of held-out corpus
paragraphs; the base policy samples `samples_per_prompt` continuations of each; VADER
(`evaluation/sentiment.py`) scores them; any two continuations of a prompt become a pair when their
scores differ by at least `min_gap` (InstructGPT's K-choose-2 comparisons; `every_pair=false` keeps
only the best against the worst). Prompts are split once into the training share (pairs, PPO
rollouts) and a held-out share (evaluation) that share no prompt.

Files and hub datasets are read through `datasets` in the two common layouts: `prompt` /
`chosen` / `rejected` (TRL's), and Anthropic HH's `chosen` / `rejected` whole dialogues, whose
prompt is the text up to the last "\\n\\nAssistant:" they share.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import torch
from rich.progress import track
from tokenizers import Tokenizer
from torch.utils.data import DataLoader

from datamodules.sampler import ResumableBatches
from datamodules.sources import DataFormatError, load_records
from modules.decoding.engine import Engines
from modules.decoding.generation import generate

SENTIMENT = "sentiment"
HH_TURN = "\n\nAssistant:"


@dataclass
class PreferenceDataConfig:
    """The `data.` section of reward-model, PPO and DPO presets."""

    source: str = SENTIMENT  # "sentiment" (embedded), a local .jsonl/.json/.parquet of pairs, or "hf:<name>"
    prompt_tokens: int = 8  # embedded: prompt length, the first tokens of a held-out corpus paragraph
    response_tokens: int = 24  # embedded: continuation length sampled from the policy
    prompts: int = 1500  # embedded: training prompts (pairs, PPO rollouts)
    held_out_prompts: int = 200  # embedded: evaluation prompts, disjoint from the training ones
    samples_per_prompt: int = 8  # embedded: continuations sampled per prompt
    every_pair: bool = True  # embedded: every pair of a prompt's samples (InstructGPT's K choose 2), else best vs worst
    min_gap: float = 0.05  # embedded: smallest true-reward gap that makes a pair (smaller ones are ties)
    temperature: float = 1.0  # embedded: sampling temperature of the base policy
    hub_split: str = "train"
    val_fraction: float = 0.1  # pairs held out for accuracy (files and hub; the embedded source uses its prompts)
    max_len: int = 128  # pairs with a longer prompt + response are dropped (and counted)
    batch_size: int = 32  # pairs per batch
    num_workers: int = 0
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        checks = {
            "data.prompt_tokens and data.response_tokens must be positive": self.prompt_tokens > 0 and self.response_tokens > 0,
            "data.samples_per_prompt must be at least 2 (a pair needs two samples)": self.samples_per_prompt >= 2,
            "data.prompts and data.held_out_prompts must be positive": self.prompts > 0 and self.held_out_prompts > 0,
            "data.val_fraction must be in (0, 1)": 0 < self.val_fraction < 1,
            "data.batch_size must be positive": self.batch_size > 0,
            "data.temperature must be positive (pairs need sampled, different continuations)": self.temperature > 0,
        }
        bad = [message for message, ok in checks.items() if not ok]
        if bad:
            raise ValueError("; ".join(bad))


@dataclass
class Pair:
    """One preference: token ids of the prompt and of the preferred and the other response."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    chosen_reward: float | None = None  # the true reward, where known (embedded source)
    rejected_reward: float | None = None
    ref_chosen: float | None = None  # the reference's sequence log-probs of the responses, once computed (DPO)
    ref_rejected: float | None = None


def corpus_prompts(texts: list[str], tokenizer: Tokenizer, n_tokens: int, n: int, seed: int) -> list[list[int]]:
    """Up to `n` distinct prompts: the first `n_tokens` tokens of prose paragraphs of `texts`, shuffled by `seed`.

    A paragraph counts as prose when it starts with a letter and runs past 80 characters, which
    skips the corpus's headings, directives and code.
    """
    paragraphs = [" ".join(p.split()) for t in texts for p in re.split(r"\n\s*\n", t)]
    prose = [p for p in paragraphs if p[:1].isalpha() and len(p) > 80]
    seen, prompts = set(), []
    for ids in (tokenizer.encode(p).ids[:n_tokens] for p in prose):
        if len(ids) == n_tokens and tuple(ids) not in seen:
            seen.add(tuple(ids))
            prompts.append(ids)
    random.Random(seed).shuffle(prompts)
    return prompts[:n]


def split_prompts(prompts: list[list[int]], n_train: int, n_held_out: int) -> tuple[list[list[int]], list[list[int]]]:
    """(training, held-out) prompts: the held-out ones first, so a larger `n_train` never moves them."""
    if len(prompts) < n_held_out + 2:
        raise DataFormatError(f"only {len(prompts)} prompts in the held-out corpus; lower data.held_out_prompts "
                              f"(now {n_held_out}) and data.prompts, or use a larger corpus")
    return prompts[n_held_out : n_held_out + n_train], prompts[:n_held_out]


def sample_responses(model: Any, prompts: list[list[int]], config: PreferenceDataConfig, seed: int,
                     batch: int = 256, progress: bool = False) -> list[list[int]]:
    """`samples_per_prompt` sampled continuations of each prompt, prompt-major: row i * k + j is prompt i's j-th."""
    k = config.samples_per_prompt
    flat = [p for p in prompts for _ in range(k)]
    out: list[list[int]] = []
    starts = range(0, len(flat), batch)
    if progress:
        starts = track(starts, description=f"sampling {len(flat)} continuations")
    engines = Engines(model)  # every full batch on one captured engine
    with torch.no_grad():
        for i, start in enumerate(starts):
            out += generate(model, flat[start : start + batch], config.response_tokens,
                            temperature=config.temperature, seed=seed * 100_003 + i, engines=engines)
    return out


def label_pairs(prompts: list[list[int]], responses: list[list[int]], rewards: list[float], k: int,
                min_gap: float, every_pair: bool = True) -> list[Pair]:
    """Pairs among each prompt's `k` responses whose rewards differ by at least `min_gap`, the higher one chosen:
    every such pair (InstructGPT's K-choose-2 comparisons per prompt), or only the best against the worst."""
    pairs = []
    for i, prompt in enumerate(prompts):
        scored = sorted(zip(rewards[i * k : (i + 1) * k], responses[i * k : (i + 1) * k]), key=lambda s: -s[0])
        candidates = [(a, b) for n, a in enumerate(scored) for b in scored[n + 1 :]] if every_pair else [(scored[0], scored[-1])]
        seen = set()
        for (high, chosen), (low, rejected) in candidates:
            key = (tuple(chosen), tuple(rejected))
            if high - low >= min_gap and key not in seen:
                seen.add(key)
                pairs.append(Pair(prompt, chosen, rejected, high, low))
    return pairs


def _text(value: Any, where: str, field: str) -> str:
    if isinstance(value, list):  # a message list: the content of its turns
        value = "".join(m.get("content", "") if isinstance(m, dict) else str(m) for m in value)
    if not isinstance(value, str):
        raise DataFormatError(f"{where}: field {field!r} must be text or a list of messages, not {type(value).__name__}")
    return value


def to_pair_text(record: dict[str, Any], where: str) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) text of a record in either layout; a clear error naming the record otherwise."""
    missing = [f for f in ("chosen", "rejected") if record.get(f) is None]  # `datasets` fills absent columns with None
    if missing:
        raise DataFormatError(f"{where}: missing field(s) {missing}; a preference record has 'prompt', 'chosen' and "
                              "'rejected', or Anthropic HH's 'chosen' and 'rejected' dialogues")
    chosen, rejected = _text(record["chosen"], where, "chosen"), _text(record["rejected"], where, "rejected")
    if record.get("prompt") is not None:
        prompt = _text(record["prompt"], where, "prompt")
    else:  # HH: both dialogues share everything up to the last assistant turn
        cut = chosen.rfind(HH_TURN)
        if cut < 0 or not rejected.startswith(chosen[: cut + len(HH_TURN)]):
            raise DataFormatError(f"{where}: no 'prompt' field, and 'chosen' and 'rejected' do not share a dialogue "
                                  f"up to a last {HH_TURN!r} turn (Anthropic HH layout)")
        prompt = chosen[: cut + len(HH_TURN)]
        chosen, rejected = chosen[len(prompt) :], rejected[len(prompt) :]
    if not chosen.strip() or not rejected.strip():
        raise DataFormatError(f"{where}: empty {'chosen' if not chosen.strip() else 'rejected'} response")
    return prompt, chosen, rejected


def read_pairs(source: str, tokenizer: Tokenizer, split: str = "train", cache_dir: Path | None = None) -> list[Pair]:
    """Tokenized pairs of a local file or hub dataset in the `prompt`/`chosen`/`rejected` or HH layout."""
    pairs = []
    for record, where in load_records(source, split, cache_dir, "preference"):
        prompt, chosen, rejected = to_pair_text(record, where)
        pairs.append(Pair(tokenizer.encode(prompt).ids, tokenizer.encode(chosen).ids, tokenizer.encode(rejected).ids))
    return pairs


def collate_pairs(pairs: list[Pair], pad_id: int) -> dict[str, torch.Tensor]:
    """{"ids" (2B, T), "last" (2B,), "prompt_len" (2B,)}: chosen rows then rejected rows, right-padded.

    `last` is the index of each row's final real token (where a reward model reads its score);
    tokens from `prompt_len` to `last` are the response. Where every pair has its reference
    log-probs, "ref_logps" (2B,) holds them in the same order.
    """
    rows = [p.prompt + p.chosen for p in pairs] + [p.prompt + p.rejected for p in pairs]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
    prompt_len = torch.tensor([len(p.prompt) for p in pairs] * 2)
    batch = {"ids": ids, "last": torch.tensor([len(r) - 1 for r in rows]), "prompt_len": prompt_len}
    if all(p.ref_chosen is not None and p.ref_rejected is not None for p in pairs):
        batch["ref_logps"] = torch.tensor([p.ref_chosen for p in pairs] + [p.ref_rejected for p in pairs])
    return batch


class Pairs(torch.utils.data.Dataset):
    def __init__(self, pairs: list[Pair]) -> None:
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> Pair:
        return self.pairs[i]


class PreferenceDataModule(ResumableBatches, L.LightningDataModule):
    """Batches of pairs (`collate_pairs`) from pairs made beforehand (`train`, `val`), e.g. by `label_pairs`."""

    def __init__(self, config: PreferenceDataConfig, train: list[Pair], val: list[Pair], pad_id: int, seed: int = 0) -> None:
        super().__init__()
        self.config, self.seed, self.pad_id = config, seed, pad_id
        self.batches_consumed = 0
        fits = [p for p in train if len(p.prompt) + max(len(p.chosen), len(p.rejected)) <= config.max_len]
        val_fits = [p for p in val if len(p.prompt) + max(len(p.chosen), len(p.rejected)) <= config.max_len]
        if len(fits) < config.batch_size or not val_fits:
            raise DataFormatError(f"{len(fits)} training and {len(val_fits)} held-out pairs fit data.max_len={config.max_len}: "
                                  f"need at least data.batch_size={config.batch_size} and 1; sample more prompts "
                                  "(data.prompts) or lower data.min_gap")
        self.train_set, self.val_set = Pairs(fits), Pairs(val_fits)
        self.stats = {"pairs_train": len(fits), "pairs_val": len(val_fits),
                      "dropped_over_max_len": len(train) + len(val) - len(fits) - len(val_fits)}

    def _loader(self, dataset: Pairs, sampler: Any, drop_last: bool) -> DataLoader:
        return DataLoader(dataset, self.config.batch_size, sampler=sampler, drop_last=drop_last,
                          collate_fn=lambda rows: collate_pairs(rows, self.pad_id), num_workers=self.config.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.train_sampler(len(self.train_set)), drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.eval_sampler(len(self.val_set)), drop_last=False)


class PromptDataModule(ResumableBatches, L.LightningDataModule):
    """Batches of equal-length prompts {"prompt" (B, P)} for PPO rollouts, drawn pass after pass (a batch may
    span two passes); validation is the held-out prompts."""

    def __init__(self, train: list[list[int]], val: list[list[int]], batch_size: int, seed: int = 0) -> None:
        super().__init__()
        if len({len(p) for p in train + val}) != 1:
            raise DataFormatError("PPO prompts must all have the same number of tokens (data.prompt_tokens)")
        if not train or not val:
            raise DataFormatError(f"{len(train)} training and {len(val)} held-out prompts: PPO needs both")
        self.train_prompts, self.val_prompts = train, val
        self.config = SimpleNamespace(batch_size=batch_size)  # what ResumableBatches reads
        self.seed, self.batches_consumed = seed, 0

    @staticmethod
    def _collate(rows: list[list[int]]) -> dict[str, torch.Tensor]:
        return {"prompt": torch.tensor(rows, dtype=torch.long)}

    def train_dataloader(self) -> DataLoader:
        sampler = self.train_sampler(len(self.train_prompts))
        return DataLoader(self.train_prompts, self.config.batch_size, sampler=sampler, drop_last=True, collate_fn=self._collate)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_prompts, self.config.batch_size, sampler=self.eval_sampler(len(self.val_prompts)),
                          collate_fn=self._collate)
