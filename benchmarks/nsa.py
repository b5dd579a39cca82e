"""Native sparse attention against full attention: time per attention layer against context length.

`python -m benchmarks.nsa [--lengths 1024 2048 4096 8192 16384] [--out DIR]` times one attention layer's
forward and forward + backward at batch 1, bf16, for full causal attention (`CausalSelfAttention`:
scaled_dot_product_attention, FlashAttention on an H100) and for NSA (`modules/nn/nsa.py`) through
FlexAttention (compiled) and, up to `--reference-max` tokens, through the plain-PyTorch path. The
shapes follow the paper's (Yuan et al. 2025, Sec. 4.1): GQA with 4 key heads, head size 64 here
(192/128 there), l = 32, d = 16, l' = 64, n = 16, w = 512. It first measures how far compiled and
eager FlexAttention are from the plain path in outputs and gradients at 1,024 tokens. Writes nsa.json (with
the verdicts on the paper's speed claim, `claims`) and nsa.png (milliseconds against tokens, log-log).
"""

from __future__ import annotations

import json
import sys
import time
from argparse import ArgumentParser
from dataclasses import asdict
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

import modules.nn.nsa as nsa
from modules.nn.attention import CausalSelfAttention
from modules.nn.config import DecoderConfig
from modules.nn.nsa import NativeSparseAttention
from reports.claims import check_above
from reports.plots import figure, png


def config(length: int, attention: str) -> DecoderConfig:
    return DecoderConfig(vocab_size=256, block_size=length, n_layer=1, n_head=16, n_kv_head=4, n_embd=1024, position="none",
                         attention=attention, nsa_block=32, nsa_stride=16, nsa_select_block=64, nsa_select=16, nsa_window=512)


def timed(layer: torch.nn.Module, x: torch.Tensor, backward: bool, repeats: int) -> float:
    """Median milliseconds of one call (after two warm-up calls)."""
    def once() -> None:
        y = layer(x)
        if backward:
            y.float().square().mean().backward()

    for _ in range(2):
        once()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize() if x.is_cuda else None
        start = time.perf_counter()
        once()
        torch.cuda.synchronize() if x.is_cuda else None
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[len(times) // 2]


def agreement(device: torch.device, length: int = 1024) -> dict[str, Any]:
    """How far compiled and eager FlexAttention are from the plain path (float32): the largest output
    difference, the norm of the gradient difference over all parameters relative to the gradient's, and the
    same per parameter. Per parameter, compress_k.bias stands out: its exact gradient is zero (it adds q . b
    to every compressed score of a query, which the softmax ignores), so both paths give rounding noise."""
    from torch.nn.attention.flex_attention import flex_attention  # optional: torch >= 2.5

    torch.manual_seed(0)
    layer = NativeSparseAttention(config(length, "nsa")).to(device)
    x = torch.randn(1, length, 1024, device=device)
    compiled = nsa._compiled_flex
    results = {}
    for name, kernel, flex in (("plain", "reference", compiled), ("flex (compiled)", "flex", compiled),
                               ("flex (eager)", "flex", lambda: flex_attention)):
        nsa._compiled_flex = flex
        try:
            layer.kernel = kernel
            layer.zero_grad()
            y = layer(x)
            y.square().mean().backward()
            results[name] = (y.detach(), {n: p.grad.clone() for n, p in layer.named_parameters()})
        finally:
            nsa._compiled_flex = compiled
    y0, g0 = results.pop("plain")
    report = {}
    for name, (y1, g1) in results.items():
        rel = {n: float((g1[n] - g0[n]).norm() / g0[n].norm().clamp(min=1e-30)) for n in g0}
        total = float(torch.stack([(g1[n] - g0[n]).norm() for n in g0]).norm() / torch.stack([g0[n].norm() for n in g0]).norm())
        report[name] = {"output_max_abs_diff": float((y1 - y0).abs().max()), "output_max_abs": float(y0.abs().max()),
                        "grad_rel_diff": total, "grad_rel_diff_per_parameter": rel}
    return report


def measure(lengths: list[int], reference_max: int, repeats: int, device: torch.device) -> dict[str, Any]:
    records = []
    for length in lengths:
        x = torch.randn(1, length, 1024, device=device, dtype=torch.bfloat16, requires_grad=True)
        runs = {"full (SDPA)": (CausalSelfAttention(config(length, "standard")), None), "NSA (flex)": (None, "flex")}
        if length <= reference_max:
            runs["NSA (plain)"] = (None, "reference")
        for name, (layer, kernel) in runs.items():
            if layer is None:
                layer = NativeSparseAttention(config(length, "nsa"))
                layer.kernel = kernel
            layer = layer.to(device, torch.bfloat16)
            record = {"tokens": length, "attention": name}
            for backward in (False, True):
                key = "fwd_bwd_ms" if backward else "fwd_ms"
                try:
                    record[key] = timed(layer, x, backward, repeats)
                except torch.OutOfMemoryError:
                    record[key] = None
                    torch.cuda.empty_cache()
            records.append(record)
            print(json.dumps(record), flush=True)
    return {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "records": records}


def claims(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The paper's speed claim, forward and forward + backward, at the longest context where full attention and
    some NSA path were both timed: full attention's ms over the faster NSA path's, reproduced above 1."""
    out = []
    for key, paper in (("fwd_ms", "9.0x forward at 64k (Fig. 6)"), ("fwd_bwd_ms", "6.0x forward + backward at 64k (Fig. 6)")):
        timed = {(r["tokens"], r["attention"]): r[key] for r in result["records"] if r.get(key)}
        lengths = [t for t, a in timed if a == "full (SDPA)" and any(u == t and b.startswith("NSA") for u, b in timed)]
        longest = max(lengths, default=None)
        nsa = min((ms for (t, a), ms in timed.items() if t == longest and a.startswith("NSA")), default=None)
        out.append(asdict(check_above(
            claim="NSA's attention is faster than full attention at long context", source="Native Sparse Attention (Yuan et al. 2025)",
            metric=f"full attention ms / NSA ms ({key.removesuffix('_ms').replace('_', ' + ')}, {longest} tokens, faster NSA path)",
            measured=None if nsa is None else timed[(longest, "full (SDPA)")] / nsa, bound=1.0, factor=1.0, paper=paper,
            bound_name="equal time")))
    return out


def plot(result: dict[str, Any]) -> bytes:
    fig = figure(11, 4)
    ax = fig.subplots(1, 2)
    for i, key in enumerate(("fwd_ms", "fwd_bwd_ms")):
        for name in dict.fromkeys(r["attention"] for r in result["records"]):
            points = [(r["tokens"], r[key]) for r in result["records"] if r["attention"] == name and r.get(key)]
            ax[i].plot(*zip(*points), marker="o", label=name)
        ax[i].set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="ms per attention layer",
                  title=("forward" if i == 0 else "forward + backward") + f", batch 1, bf16, {result['device']}")
        ax[i].legend()
    return png(fig)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--reference-max", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("runs/nsa"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type != "cuda":
        raise SystemExit("benchmarks.nsa times kernels on a GPU (FlexAttention has no backward on a CPU); pass --device cuda")
    # each length compiles flex and create_block_mask anew for the two masks: past dynamo's default limit of 8
    # graphs they fall back to eager (unfused, the whole score matrix), which is not what is being timed
    torch._dynamo.config.recompile_limit = 64
    check = agreement(device)
    print(json.dumps({"flex_vs_plain": check}), flush=True)
    result = {**measure(args.lengths, args.reference_max, args.repeats, device), "flex_vs_plain": check}
    result["claims"] = claims(result)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "nsa.json").write_text(json.dumps(result, indent=2))
    (args.out / "nsa.png").write_bytes(plot(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
