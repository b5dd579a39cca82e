"""The suite's Decoder split into pipeline stages and run under `torch.distributed.pipelining` on CPU.

`run_pipeline` spawns one gloo process per stage (torch.multiprocessing, one thread each) and runs
each named schedule on the same weights and batch: GPipe, 1F1B and ZB1P (torch's
`ScheduleInterleavedZeroBubble` with one stage per rank is Qi et al.'s ZB-H1, the simulator's ZB1P).
Per schedule it returns the loss and gradients of the first step (to check against the unsplit
decoder) and the timings of later steps: each step's wall time (`time.perf_counter` on every rank
between two barriers, the slowest rank's) and every rank's busy time (time inside the stage's
forward, backward, weight-backward and loss calls, by wrapping those methods). Idle fraction =
1 - busy / step time. `stage_timing` measures the stages' F, B and W in isolation; `summarize` feeds
them to the simulator and sets its step time and idle fractions beside the measured ones; `compare`
does all three.

On a 2-core machine PP=2 is the default: PP=4 oversubscribes the cores and the measurements mean
little. DualPipe itself needs two stages per rank fed from both ends and is not a torch schedule
(torch's `ScheduleDualPipeV` is the V-shaped variant): it stays simulated only.
"""

from __future__ import annotations

import os
import socket
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleavedZeroBubble

from modules.nn import Decoder, DecoderConfig
from modules.parallel.pipeline.schedules import Timing, build

SCHEDULES = ("GPipe", "1F1B", "ZB1P")


def tiny_config(n_layer: int = 4, n_embd: int = 128) -> DecoderConfig:
    """A small decoder whose stages are nearly equal: a 256-token vocabulary keeps the LM head cheap;
    untied embeddings, because the first and last stages live in different processes."""
    return DecoderConfig(vocab_size=256, block_size=64, n_layer=n_layer, n_head=4, n_embd=n_embd, tie_embeddings=False)


class DecoderStage(nn.Module):
    """Stage `index` of `stages` of a Decoder: a contiguous run of its blocks, with the embeddings in
    front on the first stage and the final norm and LM head behind on the last. Shares the decoder's
    modules (no copies), so its gradients are the decoder's."""

    def __init__(self, decoder: Decoder, index: int, stages: int) -> None:
        super().__init__()
        n = decoder.config.n_layer
        if not 1 <= stages <= n:
            raise ValueError(f"cannot split {n} blocks into {stages} stages")
        self.first, self.last = index == 0, index == stages - 1
        self.layers = range(index * n // stages, (index + 1) * n // stages)
        self.blocks = nn.ModuleList(decoder.blocks[layer] for layer in self.layers)
        self.wte, self.wpe, self.drop = (decoder.wte, decoder.wpe, decoder.drop) if self.first else (None, None, None)
        self.norm, self.lm_head = (decoder.norm, decoder.lm_head) if self.last else (None, None)
        self.rope = decoder.rope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) on the first stage, else the residual stream (B, T, C); returns the residual
        stream (B, T, C), or logits (B, T, vocab) on the last stage."""
        T = x.shape[1]
        if self.first:
            positions = torch.arange(T, device=x.device)
            x = self.wte(x) + (self.wpe(positions) if self.wpe is not None else 0)  # (B, T, C)
            x = self.drop(x)
        rope = self.rope[:, :T] if self.rope is not None else None
        for layer, block in zip(self.layers, self.blocks):
            x = block(x, rope, None, layer, None)
        return self.lm_head(self.norm(x)) if self.last else x


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of logits (B, T, V) against targets (B, T), as `Decoder.loss`."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_schedule(name: str, stage: Any, micro_batches: int, loss_fn: Callable) -> Any:
    if name == "GPipe":
        return ScheduleGPipe(stage, micro_batches, loss_fn=loss_fn)
    if name == "1F1B":
        return Schedule1F1B(stage, micro_batches, loss_fn=loss_fn)
    if name == "ZB1P":
        return ScheduleInterleavedZeroBubble([stage], micro_batches, loss_fn=loss_fn)
    raise ValueError(f"unknown schedule {name!r}: use one of {', '.join(SCHEDULES)}")


def _time_calls(owner: Any, names: list[str], clock: list[float]) -> None:
    """Wrap `owner`'s methods `names` so that the time spent inside them accumulates in clock[0]."""
    for name in names:
        method = getattr(owner, name)

        def timed(*args: Any, _method: Callable = method, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return _method(*args, **kwargs)
            finally:
                clock[0] += time.perf_counter() - start

        setattr(owner, name, timed)


def _worker(rank: int, world: int, port: int, config: DecoderConfig, schedules: list[str], micro_batches: int,
            idx: torch.Tensor, targets: torch.Tensor, steps: int, warmup: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        decoder = Decoder(config)
        module = DecoderStage(decoder, rank, world)
        names = {id(p): n for n, p in decoder.named_parameters()}
        results = {}
        for name in schedules:
            clock = [0.0]
            loss_fn = _timed_loss(clock)
            stage = PipelineStage(module, rank, world, torch.device("cpu"))
            schedule = _make_schedule(name, stage, micro_batches, loss_fn)
            _time_calls(stage, ["forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk"], clock)
            record: dict[str, Any] = {"step_s": [], "busy_s": []}
            for step in range(1 + warmup + steps):
                module.zero_grad(set_to_none=True)
                losses: list[torch.Tensor] = []
                dist.barrier()
                clock[0], start = 0.0, time.perf_counter()
                if rank == 0:
                    schedule.step(idx)
                elif rank == world - 1:
                    schedule.step(target=targets, losses=losses)
                else:
                    schedule.step()
                elapsed = torch.tensor([time.perf_counter() - start])
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the step ends when its slowest rank does
                if step == 0:
                    record["loss"] = torch.stack(losses).mean().item() if losses else None
                    record["grads"] = {names[id(p)]: p.grad.clone() for p in module.parameters() if p.grad is not None}
                elif step > warmup:
                    record["step_s"].append(elapsed.item())
                    record["busy_s"].append(clock[0])
            results[name] = record
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _timed_loss(clock: list[float]) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        loss = lm_loss(logits, targets)
        clock[0] += time.perf_counter() - start
        return loss

    return loss_fn


def run_pipeline(config: DecoderConfig, stages: int = 2, micro_batches: int = 4, batch_size: int = 8, seq_len: int = 32,
                 schedules: tuple[str, ...] = SCHEDULES, steps: int = 5, warmup: int = 2, seed: int = 0) -> dict[str, Any]:
    """Run `schedules` on a `stages`-process pipeline of Decoder(config) (seeded weights, one random
    batch (batch_size, seq_len)). Returns the batch and, per schedule and rank, the first step's loss
    (last rank) and named gradients, and the later steps' wall and busy seconds."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, config.vocab_size, (batch_size, seq_len + 1), generator=generator)
    idx, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_worker, args=(stages, _free_port(), config, list(schedules), micro_batches, idx, targets,
                                          steps, warmup, out), nprocs=stages, start_method="spawn")
        ranks = [torch.load(Path(out) / f"rank{rank}.pt", weights_only=True) for rank in range(stages)]
    return {"idx": idx, "targets": targets, "micro_batches": micro_batches, "ranks": ranks}


def stage_timing(config: DecoderConfig, stages: int = 2, micro_batch: int = 2, seq_len: int = 32,
                 repeats: int = 10) -> Timing:
    """Per-chunk F, B (full backward) and W of the stages in isolation, averaged over the stages.

    One thread, as in the pipeline. F: the stage's forward (+ the loss on the last stage); B: the
    full backward; W = B - (backward for the stage's input only). The first stage's input is token
    ids, so all its backward is weight backward (W = B there). Medians of `repeats` runs.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        decoder = Decoder(config)
        idx = torch.randint(0, config.vocab_size, (micro_batch, seq_len))
        per_stage = []
        for index in range(stages):
            module = DecoderStage(decoder, index, stages)

            def forward() -> tuple[torch.Tensor, torch.Tensor | None]:
                x = idx if module.first else torch.randn(micro_batch, seq_len, config.n_embd, requires_grad=True)
                out = module(x)
                return (lm_loss(out, idx) if module.last else out), (None if module.first else x)

            def backward(inputs_only: bool) -> float:
                out, x = forward()
                grad = torch.ones_like(out) if not module.last else None
                start = time.perf_counter()
                if inputs_only:
                    if x is not None:
                        torch.autograd.grad(out, x, grad)
                else:
                    out.backward(grad)
                return time.perf_counter() - start

            def forward_time() -> float:
                start = time.perf_counter()
                forward()
                return time.perf_counter() - start

            for _ in range(2):
                backward(False)
            f = statistics.median(forward_time() for _ in range(repeats))
            b = statistics.median(backward(False) for _ in range(repeats))
            b_in = statistics.median(backward(True) for _ in range(repeats))
            per_stage.append((f, b, max(0.0, min(b, b - b_in))))
            decoder.zero_grad(set_to_none=True)
        return Timing(*(statistics.mean(t[i] for t in per_stage) for i in range(3)))
    finally:
        torch.set_num_threads(threads)


def summarize(run: dict[str, Any], timing: Timing) -> list[dict]:
    """One record per schedule of `run_pipeline`'s result: measured step seconds (median over the
    timed steps) and per-rank idle fraction (median of 1 - busy / step time), next to the
    simulator's prediction of the same schedule from per-chunk `timing`."""
    ranks, records = run["ranks"], []
    for name in ranks[0]:
        per_rank = [r[name] for r in ranks]
        simulated = build(name, len(ranks), run["micro_batches"], timing)
        idle = [statistics.median(1 - busy / wall for busy, wall in zip(r["busy_s"], r["step_s"])) for r in per_rank]
        records.append({
            "schedule": name, "pp": len(ranks), "micro_batches": run["micro_batches"],
            "F_ms": 1e3 * timing.F, "B_ms": 1e3 * timing.B, "W_ms": 1e3 * timing.W,
            "measured_step_ms": 1e3 * statistics.median(per_rank[0]["step_s"]),
            "simulated_step_ms": 1e3 * simulated.makespan,
            "measured_idle": [round(x, 3) for x in idle],
            "simulated_idle": [round(b / simulated.makespan, 3) for b in simulated.bubbles()],
            "loss": per_rank[-1]["loss"],
        })
    return records


def compare(pp: int = 2, micro_batches: int = 4, config: DecoderConfig | None = None, batch_size: int = 8,
            seq_len: int = 32, schedules: tuple[str, ...] = SCHEDULES, steps: int = 5, warmup: int = 2) -> list[dict]:
    """Measured vs simulated, one record per schedule (`summarize`): the real pipeline's step time and
    idle fractions over `steps` steps after `warmup`, and the simulator's from the stages' isolated
    F, B, W (`stage_timing` at micro-batch = batch_size / micro_batches)."""
    config = config or tiny_config()
    timing = stage_timing(config, pp, batch_size // micro_batches, seq_len)
    return summarize(run_pipeline(config, pp, micro_batches, batch_size, seq_len, schedules, steps, warmup), timing)
