"""Activation checkpointing and FSDP2 sharding, applied to a technique's module from outside its decoders.

`TechniqueModule` is the base of every technique's LightningModule. Lightning calls its
`configure_model` once the strategy is set up; it applies the run's `ParallelPlan` (set by the runner):
activation checkpointing per block of each decoder (`checkpoint_activations`), then, under the
FSDP2 strategy, `fully_shard` on every block and every decoder (`shard`), as torchtitan's
`parallelize` does. The decoders themselves never know.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import lightning as L
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from modules.nn import Decoder
from modules.nn.moe import MoE

Checkpointing = Literal["none", "full", "every_k", "attention", "mlp"]
POLICIES = ("none", "full", "every_k", "attention", "mlp")


@dataclass(frozen=True)
class ParallelPlan:
    """How to recompute activations: none; full (every block); every_k (blocks 0, k, 2k, ...); or
    selectively the token mixer (attention or Mamba) or the MLP of every block."""

    checkpointing: Checkpointing = "none"
    every: int = 2

    def __post_init__(self) -> None:
        if self.checkpointing not in POLICIES:
            raise ValueError(f"train.activation_checkpointing={self.checkpointing!r}: use {', '.join(POLICIES)}")
        if self.every < 1:
            raise ValueError(f"train.activation_checkpointing_every={self.every} must be at least 1")


def _wrap(module: nn.Module) -> nn.Module:
    if isinstance(module, MoE) or any(isinstance(m, MoE) for m in module.modules()):
        raise ValueError("activation checkpointing would run a mixture of experts' router twice and count its expert "
                         "loads twice (the loss-free bias update reads them): checkpoint the attention only "
                         "(train.activation_checkpointing=attention)")
    return checkpoint_wrapper(module)  # non-reentrant torch.utils.checkpoint; state_dict keys stay unprefixed


def checkpoint_activations(decoder: Decoder, plan: ParallelPlan) -> int:
    """Wrap the parts of `decoder`'s blocks that `plan` recomputes in backward; returns how many were wrapped."""
    wrapped = 0
    for index, block in enumerate(decoder.blocks):
        if plan.checkpointing in ("full", "every_k"):
            if plan.checkpointing == "full" or index % plan.every == 0:
                decoder.blocks[index] = _wrap(block)
                wrapped += 1
        elif plan.checkpointing == "attention":
            name = "attn" if block.attn is not None else "mamba"
            setattr(block, name, _wrap(getattr(block, name)))
            wrapped += 1
        elif plan.checkpointing == "mlp":
            block.mlp = _wrap(block.mlp)
            wrapped += 1
    return wrapped


def decoders(module: nn.Module) -> list[Decoder]:
    return [m for m in module.modules() if isinstance(m, Decoder)]


def shard(module: nn.Module, mesh: Any) -> None:
    """FSDP2: `fully_shard` each block of each decoder, then the decoder (embeddings, final norm, head).

    FSDP gathers a module's parameters around its `forward`; `loss` (which calls `forward`) is
    registered as a second entry point. Only the outermost entry may be registered: nested
    registered methods reshard the decoder's parameters when the inner one returns. Trainable
    parameters outside any decoder (a value head, MTP modules) would be neither sharded nor
    averaged: refused, which also keeps out the techniques that call `hidden` or `features` directly.
    """
    # optional: FSDP2's public home, not in every torch the suite allows; only --strategy fsdp2 shards
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    covered = {id(p) for decoder in decoders(module) for p in decoder.parameters()}
    outside = [n for n, p in module.named_parameters() if p.requires_grad and id(p) not in covered]
    if outside:
        raise ValueError(f"--strategy fsdp2 shards decoders only; this technique also trains {', '.join(outside[:3])}"
                         f"{' ...' if len(outside) > 3 else ''}: use --strategy ddp (or fsdp on GPUs)")
    for decoder in decoders(module):
        for block in decoder.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(decoder, mesh=mesh)
        register_fsdp_forward_method(decoder, "loss")


class Plan(L.Callback):
    """Carries a run's `ParallelPlan` on its Trainer (`repro.trainer.build_trainer` adds it from `train.`), as the
    strategy carries the device mesh: the module reads both when Lightning calls its `configure_model`."""

    def __init__(self, plan: ParallelPlan) -> None:
        self.plan = plan


class TechniqueModule(L.LightningModule):
    """A LightningModule whose decoders take the `ParallelPlan` of the Trainer that fits it (its `Plan` callback;
    the default plan on a Trainer without one)."""

    @property
    def parallel(self) -> ParallelPlan:
        trainer = self._trainer  # None outside a Trainer: `self.trainer` would raise
        return next((c.plan for c in (trainer.callbacks if trainer else []) if isinstance(c, Plan)), ParallelPlan())

    def configure_model(self) -> None:
        if getattr(self, "_parallel_applied", False):  # Lightning calls this again for validate and test
            return
        self._parallel_applied = True
        plan = self.parallel
        if plan.checkpointing != "none":
            for decoder in decoders(self):
                checkpoint_activations(decoder, plan)
        mesh = getattr(self, "_device_mesh", None)  # set by ModelParallelStrategy (FSDP2) only
        if mesh is not None:
            shard(self, mesh["data_parallel"])
