"""A synthetic needle-retrieval task: key-value pairs hidden in a long context of filler, then queries.

Each sequence is `context` tokens: filler tokens with `pairs` key-value pairs placed at random
positions, then `queries` lookups at the end (query marker, key, value). A model answers a lookup
when it predicts the value after the key, which it can only do by retrieving the pair from far back
in the context: the multi-needle retrieval of the Differential Transformer paper (Ye et al. 2025,
Sec. 3.4) in token form, small enough to train a model for from scratch. Accuracy is the share of
lookups whose value is the model's argmax.

Token ids: 0 the query marker, then `keys` key ids, `values` value ids and `filler` filler ids.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from modules.nn import Decoder, DecoderConfig


@dataclass
class NeedleConfig:
    """The `needle.` section: the task and the training each arm gets on it."""

    enabled: bool = False
    context: int = 256  # tokens per sequence, lookups included
    pairs: int = 8  # key-value pairs hidden in the filler
    queries: int = 4  # lookups at the end (of distinct hidden keys)
    keys: int = 64
    values: int = 64
    filler: int = 64
    steps: int = 600
    batch_size: int = 32
    lr: float = 1e-3
    eval_batches: int = 8

    def __post_init__(self) -> None:
        if self.queries > self.pairs:
            raise ValueError(f"needle.queries={self.queries} must not exceed needle.pairs={self.pairs} (each lookup asks a hidden key)")
        if self.pairs > self.keys:
            raise ValueError(f"needle.pairs={self.pairs} distinct keys need needle.keys >= {self.pairs}")
        if 2 * self.pairs + 3 * self.queries > self.context:
            raise ValueError(f"needle.context={self.context} cannot hold {self.pairs} pairs and {self.queries} lookups")

    @property
    def vocab_size(self) -> int:
        return 1 + self.keys + self.values + self.filler


def make_batch(config: NeedleConfig, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens (batch, context), answer positions (batch, queries)): tokens[:, p] is the value to predict from p - 1."""
    K0, V0, F0 = 1, 1 + config.keys, 1 + config.keys + config.values
    tail = 3 * config.queries
    body = config.context - tail
    tokens = F0 + torch.randint(0, config.filler, (batch, config.context), generator=generator)
    answers = torch.empty(batch, config.queries, dtype=torch.long)
    for row in range(batch):
        keys = torch.randperm(config.keys, generator=generator)[: config.pairs]
        values = torch.randint(0, config.values, (config.pairs,), generator=generator)
        # pair i at slots 2 s_i, 2 s_i + 1 of the body, slots drawn without overlap
        slots = torch.randperm(body // 2, generator=generator)[: config.pairs]
        tokens[row, 2 * slots] = K0 + keys
        tokens[row, 2 * slots + 1] = V0 + values
        asked = torch.randperm(config.pairs, generator=generator)[: config.queries]
        for q, i in enumerate(asked.tolist()):
            at = body + 3 * q
            tokens[row, at : at + 3] = torch.stack([torch.tensor(0), K0 + keys[i], V0 + values[i]])
            answers[row, q] = at + 2
    return tokens, answers


def lookup_loss(model: Decoder, tokens: torch.Tensor, answers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy of the answers, share answered right) for one batch."""
    logits = model(tokens[:, :-1])  # position p - 1 predicts token p
    picked = logits.gather(1, (answers - 1).unsqueeze(-1).expand(-1, -1, logits.shape[-1]))  # (B, Q, V)
    target = tokens.gather(1, answers)
    loss = F.cross_entropy(picked.flatten(0, 1).float(), target.flatten())
    return loss, (picked.argmax(-1) == target).float().mean()


def train_and_score(model_config: DecoderConfig, config: NeedleConfig, seed: int, device: torch.device) -> dict[str, float]:
    """Train a fresh decoder of `model_config`'s shape on the task; its held-out accuracy and loss.

    The same seed gives every arm the same initial random state, the same training batches and the
    same held-out batches.
    """
    shape = replace(model_config, vocab_size=config.vocab_size, block_size=config.context)
    torch.manual_seed(seed)
    model = Decoder(shape).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    data = torch.Generator().manual_seed(seed)
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")
    start, curve = time.perf_counter(), []
    model.train()
    for step in range(config.steps):
        lr = config.lr * min(1.0, (step + 1) / max(1, config.steps // 10))  # linear warm-up over a tenth
        for group in optimizer.param_groups:
            group["lr"] = lr
        tokens, answers = make_batch(config, config.batch_size, data)
        with autocast:
            loss, _ = lookup_loss(model, tokens.to(device), answers.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        curve.append(float(loss.detach()))
    seconds = time.perf_counter() - start
    model.eval()
    held_out = torch.Generator().manual_seed(seed + 1_000_003)
    losses, right = [], []
    with torch.no_grad(), autocast:
        for _ in range(config.eval_batches):
            tokens, answers = make_batch(config, config.batch_size, held_out)
            loss, accuracy = lookup_loss(model, tokens.to(device), answers.to(device))
            losses.append(float(loss))
            right.append(float(accuracy))
    return {"accuracy": sum(right) / len(right), "loss": sum(losses) / len(losses), "train_seconds": seconds,
            "train_loss_last": sum(curve[-20:]) / len(curve[-20:]), "chance": 1 / config.values}
