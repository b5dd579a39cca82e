"""Callbacks every run gets: speed (tokens/s, MFU, memory), a resumable metric history, its checkpoints and the
random state they carry."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar

from measurement.hardware import matmul_tflops, peak_memory_bytes
from repro.checkpoints import MODULE_CLASS, class_path


def batch_tokens(module: L.LightningModule, batch: Any) -> int:
    """Tokens one micro-batch trains on: the module's `tokens_in(batch)` where it defines one, else
    batch x (seq - 1) for a packed (batch, seq) tensor of token ids."""
    if hasattr(module, "tokens_in"):
        return int(module.tokens_in(batch))
    return batch.shape[0] * (batch.shape[1] - 1)


class SpeedMonitor(L.Callback):
    """Tokens/s over windows of `window` optimizer steps, MFU on CUDA and peak memory.

    MFU = tokens/s per device x FLOPs per token / peak FLOP/s, with FLOPs per token from the
    model's `flops_per_token()` (6N + 12 L H Q T, PaLM App. B) and the peak the bf16 matmul
    rate measured on this device when fit starts (or `peak_tflops` if given). The first window
    after a start or a validation is warm-up (compilation, allocator growth) and is not kept.
    """

    def __init__(self, window: int = 10, peak_tflops: float | None = None) -> None:
        self.window = window
        self.peak_tflops = peak_tflops
        self.flops_per_token = 0.0
        self.records: list[dict[str, float]] = []
        self._tokens = 0
        self._start: float | None = None
        self._warm = False

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = getattr(pl_module, "model", None)
        self.flops_per_token = model.flops_per_token() if hasattr(model, "flops_per_token") else 0.0
        if pl_module.device.type == "cuda":
            if self.peak_tflops is None:
                self.peak_tflops = matmul_tflops(pl_module.device)
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    @staticmethod
    def _now(device: torch.device) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            if self._start is not None:
                self._tokens += batch_tokens(pl_module, batch) * trainer.world_size
            return
        if self._start is None:
            self._start, self._tokens, self._warm = self._now(pl_module.device), 0, False
            return
        self._tokens += batch_tokens(pl_module, batch) * trainer.world_size  # targets, all processes
        if trainer.global_step % self.window:
            return
        now = self._now(pl_module.device)
        tokens_per_s = self._tokens / (now - self._start)
        self._start, self._tokens = now, 0
        if not self._warm:
            self._warm = True
            return
        record = {
            "step": trainer.global_step,
            "tokens_per_s": tokens_per_s,
            "peak_mem_gib": peak_memory_bytes(pl_module.device) / 2**30,
        }
        if self.peak_tflops:
            record["mfu"] = tokens_per_s / trainer.world_size * self.flops_per_token / (self.peak_tflops * 1e12)
        self.records.append(record)
        pl_module.log_dict({f"perf/{k}": v for k, v in record.items() if k != "step"}, rank_zero_only=True)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = None  # validation time is not training time

    def state_dict(self) -> dict[str, Any]:
        return {"records": self.records}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.records = list(state_dict["records"])


class History(L.Callback):
    """(step, value) series of the train loss per optimizer step and of validation metrics.

    Step values are kept as device tensors and read back only when asked for, so recording
    them never makes the host wait for the GPU. Stateful: saved in checkpoints, so a resumed
    run's history is the whole run's.
    """

    def __init__(self, step_keys: tuple[str, ...] = ("train/loss",), val_keys: tuple[str, ...] = ("val/loss", "val/ppl")) -> None:
        self.step_keys, self.val_keys = step_keys, val_keys
        self._series: dict[str, list[tuple[int, float | torch.Tensor]]] = {k: [] for k in step_keys + val_keys}

    @property
    def series(self) -> dict[str, list[tuple[int, float]]]:
        self._series = {k: [(step, float(v)) for step, v in points] for k, points in self._series.items()}
        return self._series

    def latest(self, key: str) -> float | None:
        points = self._series[key]
        return float(points[-1][1]) if points else None

    def _record(self, trainer: L.Trainer, keys: tuple[str, ...]) -> None:
        metrics = trainer.callback_metrics
        for key in keys:
            value = metrics.get(key)
            points = self._series[key]
            if value is not None and not (points and points[-1][0] == trainer.global_step):
                points.append((trainer.global_step, value.detach().clone()))

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
            self._record(trainer, self.step_keys)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._record(trainer, self.val_keys)

    def state_dict(self) -> dict[str, Any]:
        return {"series": self.series}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._series = {k: [tuple(p) for p in v] for k, v in state_dict["series"].items()}


class LossProgressBar(TQDMProgressBar):
    """Lightning's progress bar, showing the latest train loss from `History` at each refresh.

    Metrics logged with `prog_bar=True` are read back to the host every step; reading the loss
    only when the bar refreshes keeps the GPU queue full between refreshes.
    """

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        history = next((c for c in trainer.callbacks if isinstance(c, History)), None)
        loss = history.latest("train/loss") if history else None
        return {"loss": f"{loss:.4f}", **items} if loss is not None else items


class StepCheckpoint(ModelCheckpoint):
    """`last.ckpt` every `every` optimizer steps; at a step that also validates (a multiple of `val_every`),
    saved once that validation has ended, so the checkpoint holds its point in `History`. Every checkpoint the
    trainer saves (the final one too) names the module class that loads it (`repro.checkpoints.MODULE_CLASS`).

    Lightning's ModelCheckpoint saves at train-batch end, before the validation that follows the same batch; a
    run resumed from there counts that validation as done and skips it, so its history loses the point. A
    checkpoint written at validation end resumes with the next batch, the validation not run twice.
    """

    def __init__(self, dirpath: Path, every: int, val_every: int) -> None:
        super().__init__(dirpath=dirpath, every_n_train_steps=every, save_top_k=0, save_last=True)
        self.val_every = val_every
        self._after_validation = False

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        due = step % self._every_n_train_steps == 0 and step != self._last_global_step_saved
        if due and step % self.val_every == 0 and trainer.enable_validation:
            self._after_validation = True  # this batch's validation runs next; save at its end
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if self._after_validation and not self._should_skip_saving_checkpoint(trainer):
            self._after_validation = False
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[MODULE_CLASS] = class_path(type(pl_module))


class RandomState(L.Callback):
    """The process's random generators (torch's CPU and CUDA ones, Python's `random`, NumPy's), saved in each
    checkpoint and put back just before a resumed run trains its first batch.

    A technique that draws from them while training (PPO's minibatch order, dropout) would otherwise go on from
    the run's seed, not from where the checkpoint left them. Put back at that batch, not when the checkpoint
    loads: in between, Lightning makes the data loaders' iterators, each drawing a seed from torch's generator.
    Lightning keeps rank 0's callback state, so every rank gets rank 0's generators back.
    """

    def __init__(self) -> None:
        self._restored: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain data only, so the checkpoint still loads weights-only."""
        _, keys, pos, has_gauss, gauss = np.random.get_state()  # Mersenne Twister: 624 words and a position
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(),
            "numpy": (torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = state_dict

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._restored is None:
            return
        state, self._restored = self._restored, None
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        random.setstate(state["python"])
        keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
