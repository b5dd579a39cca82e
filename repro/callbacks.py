"""Callbacks every run gets: speed (tokens/s, MFU, memory) and a resumable metric history."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar

from repro.hardware import matmul_tflops, peak_memory_bytes


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
