"""Forward + backward tokens/s of the MoE layer against the dense MLP of equal active parameters.

`python -m benchmarks.moe [--device cuda] [--out FILE]` times both layers on random tokens for the
shapes in `SHAPES` (the tiny preset's and a GPT-2-small-wide one): one training step's forward and
backward through the layer alone, the best of several timed repeats after warm-up. The dense MLP
has the width of the MoE's active experts (shared + top_k routed), so both do the same matmul
FLOPs per token; the MoE pays for routing, sorting and the loop over experts.
"""

from __future__ import annotations

import json
import sys
import time
from argparse import ArgumentParser
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from modules.nn import DecoderConfig
from modules.nn.mlp import build_mlp
from modules.nn.moe import MoE

# name -> (width, routed experts, top_k, shared, expert width, tokens per step)
SHAPES: dict[str, tuple[int, int, int, int, int, int]] = {
    "tiny preset (C=128, 8 experts of 128, top-2 + 1 shared; dense 384)": (128, 8, 2, 1, 128, 16 * 128),
    "gpt2 width (C=768, 16 experts of 1024, top-2 + 1 shared; dense 3072)": (768, 16, 2, 1, 1024, 8 * 1024),
}


def _time(fn: Any, device: torch.device, repeats: int) -> float:
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def measure(width: int, experts: int, top_k: int, shared: int, hidden: int, tokens: int, device: torch.device,
            dtype: torch.dtype = torch.float32, repeats: int = 10, grouped: bool = True) -> dict[str, Any]:
    moe_config = DecoderConfig(n_embd=width, n_head=1, mlp="swiglu", moe_experts=experts, moe_top_k=top_k, moe_shared=shared,
                               moe_hidden=hidden, moe_balance="loss_free")
    dense_config = DecoderConfig(n_embd=width, n_head=1, mlp="swiglu", mlp_hidden=moe_config.moe_hidden_dim * (top_k + shared),
                                 bias=False)
    torch.manual_seed(0)
    moe = MoE(moe_config).to(device, dtype)
    moe.reset_parameters(0.02, 0.02)
    moe.grouped_gemm = grouped
    dense = build_mlp(dense_config).to(device, dtype)
    x = torch.randn(1, tokens, width, device=device, dtype=dtype, requires_grad=True)

    def step(layer: torch.nn.Module) -> None:
        layer(x).float().pow(2).mean().backward()

    record: dict[str, Any] = {"width": width, "experts": experts, "top_k": top_k, "shared": shared, "tokens": tokens,
                              "dtype": str(dtype).removeprefix("torch."), "expert_hidden": moe_config.moe_hidden_dim,
                              "experts_kernel": "grouped GEMM" if moe._grouped_gemm(x.view(-1, width)) else "loop over experts",
                              "moe_params": sum(p.numel() for p in moe.parameters()),
                              "dense_params": sum(p.numel() for p in dense.parameters())}
    for name, layer in (("moe", moe), ("dense", dense)):
        seconds = _time(lambda: step(layer), device, repeats)
        record[f"{name}_tokens_per_s"] = tokens / seconds
    record["moe_over_dense"] = record["moe_tokens_per_s"] / record["dense_tokens_per_s"]
    return record


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    records = [{"shape": name, **measure(*shape, device=device, dtype=dtype, grouped=grouped)}
               for name, shape in SHAPES.items() for grouped in ((True, False) if device.type == "cuda" else (False,))]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    text = json.dumps({"device": name, "torch": torch.__version__, "records": records}, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
