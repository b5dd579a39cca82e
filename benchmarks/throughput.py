"""Training throughput of the pretrain step: our Lightning path against a plain PyTorch loop.

Both train the same `Decoder` on random tokens with the same batch, precision, fused AdamW,
gradient clipping and (optionally) `torch.compile`; both warm up, then time `steps` optimizer
steps between device synchronisations (ANCHORS.md's method: tokens/s = batch x T / step time).
The plain loop is `train` under a `Lever`'s settings (`benchmarks.levers` changes them one at a time).
`python benchmarks/throughput.py --preset gpt2-124m --batch 16 32` prints a table and writes
JSON and Markdown under --out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import lightning as L
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from measurement.hardware import matmul_tflops, peak_memory_bytes  # noqa: E402
from modules.nn import Decoder, DecoderConfig  # noqa: E402
from modules.training.pretrain import OptimConfig, PretrainModule, decay_groups  # noqa: E402
from repro.callbacks import SpeedMonitor  # noqa: E402
from repro.config import build_config, load_preset  # noqa: E402
from repro.trainer import TrainConfig, TrainerArgs, build_trainer  # noqa: E402


def preset_model(preset: str) -> DecoderConfig:
    """The model section of a pretrain preset, with its data vocabulary (gpt2-124m: the anchors' model, with
    nanoGPT's padded GPT-2 vocabulary of 50,304)."""
    values = load_preset("pretrain", preset)
    vocab = 50304 if preset == "gpt2-124m" else values.get("data", {}).get("vocab_size", DecoderConfig.vocab_size)
    return build_config(DecoderConfig, {**values["model"], "vocab_size": vocab})


class RandomTokens(Dataset):
    """Uniform random token blocks of shape (block_size + 1,), a fixed pool cycled forever."""

    def __init__(self, vocab_size: int, block_size: int, pool: int = 64, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.data = torch.randint(0, vocab_size, (pool, block_size + 1), generator=g)

    def __len__(self) -> int:
        return 1 << 30

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.data[i % len(self.data)]


SDPA = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION}


@dataclass(frozen=True)
class Lever:
    """One training setting; the baseline's fields are the defaults."""

    name: str
    batch: int = 16
    loss_chunk: int = 0  # model.loss_chunk: 0 is the plain head and F.cross_entropy
    sdpa: str | None = None  # pin SDPA to one backend (SDPA keys), None: its own choice
    compile: str | None = "default"  # torch.compile mode; None: eager
    optimizer: str = "fused"  # AdamW's implementation: fused or foreach
    read_every_step: bool = True  # loss.item() each step, as a logging loop does
    fp8: bool = False  # the blocks' linear layers in float8 (torchao's tensorwise recipe), the LM head in bf16


def train(cfg: DecoderConfig, lever: Lever, device: torch.device, warmup: int, steps: int) -> dict:
    """`lever`'s loop from seed 0: tokens/s and ms/step over `steps` after `warmup`, peak memory, every step's loss."""
    torch.manual_seed(0)
    model = Decoder(replace(cfg, loss_chunk=lever.loss_chunk)).to(device)
    if lever.fp8:
        to_float8(model)
    optim = OptimConfig()
    cuda = device.type == "cuda"
    optimizer = torch.optim.AdamW(
        decay_groups(model.parameters(), optim.weight_decay), lr=optim.lr, betas=(optim.beta1, optim.beta2),
        eps=optim.eps, fused=cuda and lever.optimizer == "fused", foreach=lever.optimizer == "foreach" or None,
    )
    loss_fn = model.loss if lever.compile is None else torch.compile(model.loss, mode=lever.compile)
    data = RandomTokens(cfg.padded_vocab_size, cfg.block_size).data
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)
    attention = sdpa_kernel(SDPA[lever.sdpa]) if lever.sdpa else contextlib.nullcontext()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    losses, start = [], 0.0
    for step in range(warmup + steps):
        if step == warmup:
            if cuda:
                torch.cuda.synchronize(device)
            start = time.perf_counter()
        x = data[(torch.arange(lever.batch) + step * lever.batch) % len(data)].to(device, non_blocking=True)
        with autocast, attention:
            loss = loss_fn(x[:, :-1], x[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item() if lever.read_every_step else loss.detach())
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    losses = [float(x) for x in losses]
    return {**asdict(lever), "tokens_per_s": lever.batch * cfg.block_size * steps / seconds, "ms_per_step": 1e3 * seconds / steps,
            "peak_mem_gib": peak_memory_bytes(device) / 2**30, "losses": losses}


def to_float8(model: Decoder) -> None:
    """The blocks' nn.Linear layers trained in float8 in place (torchao: inputs, weights and gradients scaled per
    tensor to e4m3/e5m2 for `torch._scaled_mm`, as DeepSeek-V3 trains its GEMMs in FP8); the LM head stays in
    bf16 (DeepSeek-V3 keeps its output head in higher precision too), as does every layer whose sizes are not
    multiples of 16 (what the FP8 GEMM takes)."""
    from torchao.float8 import convert_to_float8_training  # an optional, GPU-only dependency of this one lever

    def eligible(module: torch.nn.Module, fqn: str) -> bool:
        return fqn.startswith("blocks.") and module.in_features % 16 == 0 and module.out_features % 16 == 0

    convert_to_float8_training(model, module_filter_fn=eligible)


def plain_loop(cfg: DecoderConfig, batch: int, device: torch.device, compile: bool, warmup: int = 10, steps: int = 30) -> dict:
    """A hand-written training loop: the baseline Lightning has to match."""
    settings = Lever("plain PyTorch", batch, loss_chunk=cfg.loss_chunk, compile="default" if compile else None)
    row = train(cfg, settings, device, warmup, steps)
    return {"loop": "plain PyTorch", "batch": batch, "compiled": compile,
            **{k: row[k] for k in ("tokens_per_s", "ms_per_step", "peak_mem_gib")}}


class _RandomData(L.LightningDataModule):
    def __init__(self, cfg: DecoderConfig, batch: int) -> None:
        super().__init__()
        self.cfg, self.batch = cfg, batch

    def train_dataloader(self) -> DataLoader:
        return DataLoader(RandomTokens(self.cfg.padded_vocab_size, self.cfg.block_size), batch_size=self.batch, pin_memory=torch.cuda.is_available())


def lightning_loop(cfg: DecoderConfig, batch: int, device: torch.device, compile: bool, warmup: int = 10, steps: int = 30) -> dict:
    """The suite's own path: PretrainModule in the Trainer that `repro/run.py` builds."""
    torch.manual_seed(0)
    module = PretrainModule(cfg, OptimConfig(), max_steps=warmup + steps, compile=compile)
    train = TrainConfig(max_steps=warmup + steps, speed_window=10, checkpoint_every=10**9, compile=compile, peak_tflops=1.0)
    args = TrainerArgs(accelerator=device.type if device.type == "cpu" else "gpu", devices=1)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(train, args, Path(tmp))
        trainer.fit(module, _RandomData(cfg, batch))
    records = next(c for c in trainer.callbacks if isinstance(c, SpeedMonitor)).records
    # windows after the warm-up one: steps (warmup, warmup + steps]
    timed = [r for r in records if r["step"] > warmup]
    seconds = sum(batch * cfg.block_size * 10 / r["tokens_per_s"] for r in timed)
    n = 10 * len(timed)
    return {"loop": "Lightning (repro)", "batch": batch, "compiled": compile, "tokens_per_s": batch * cfg.block_size * n / seconds,
            "ms_per_step": 1e3 * seconds / n, "peak_mem_gib": max(r["peak_mem_gib"] for r in timed)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, nargs="+", default=[16])
    parser.add_argument("--eager", action="store_true", help="also time without torch.compile")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = preset_model(args.preset)
    peak = matmul_tflops(device) if device.type == "cuda" else None
    flops_per_token = Decoder(cfg).flops_per_token()
    rows = []
    for compile in [True] + ([False] if args.eager else []):
        for batch in args.batch:
            for fn in (plain_loop, lightning_loop):
                row = fn(cfg, batch, device, compile, steps=args.steps)
                row["mfu"] = row["tokens_per_s"] * flops_per_token / (peak * 1e12) if peak else None
                rows.append(row)
                print(json.dumps(row), flush=True)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    meta = {"preset": args.preset, "model": asdict(cfg), "device": device_name, "torch": torch.__version__,
            "lightning": L.__version__, "matmul_tflops_bf16": peak, "flops_per_token": flops_per_token}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"throughput-{args.preset}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [f"# Pretrain throughput, {args.preset}, {device_name}", "",
             f"torch {torch.__version__}, lightning {L.__version__}; bf16 matmul rate measured in this run: "
             + (f"{peak:.0f} TFLOP/s" if peak else "n/a (CPU)") + f"; {flops_per_token / 1e6:.1f} MFLOP/token (6N + 12LHQT).", "",
             "| loop | batch | compiled | ms/step | tokens/s | vs plain | MFU | peak GiB |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        base = next(r for r in rows if r["loop"] == "plain PyTorch" and r["batch"] == row["batch"] and r["compiled"] == row["compiled"])
        mfu = f"{row['mfu']:.1%}" if row["mfu"] else "n/a"
        lines.append(f"| {row['loop']} | {row['batch']} | {'yes' if row['compiled'] else 'no'} | {row['ms_per_step']:.1f} | "
                     f"{row['tokens_per_s']:,.0f} | {row['tokens_per_s'] / base['tokens_per_s']:.3f} | {mfu} | {row['peak_mem_gib']:.2f} |")
    (args.out / f"throughput-{args.preset}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
