"""Decoding cache bytes and decode tokens/s against context length, for decoders of any layer pattern.

`python -m benchmarks.hybrid [--device cuda] [--contexts 1024 4096 16384 32768] [--batch 1 8] [--out FILE]`
builds the `SHAPES` arms (a transformer, pure Mamba and Jamba's 1:7 hybrid at equal parameters, random
weights: speed and memory do not depend on them) and, per context length: fills a `KVCache` of
context + new_tokens slots by prefilling random tokens in chunks, records the bytes the cache holds
(computed from the config, `cache_bytes`; measured: the growth of allocated GPU memory from before
the cache to after the prefill, or the buffers' sizes on a CPU), then decodes `new_tokens` tokens and
times them: on CUDA one step captured as a CUDA graph and replayed (no launch overhead), elsewhere eager.
"""

from __future__ import annotations

import json
import sys
from argparse import ArgumentParser
from dataclasses import replace
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from measurement.hybrid import measure_arms, show
from modules.nn import DecoderConfig

# Jamba's shape at a small width: GQA (16 query heads of 64, 4 key/value heads), Mamba d_state 16,
# expand 2, d_conv 4; the transformer's MLP widened so every arm has about the same parameters
BASE = DecoderConfig(vocab_size=32000, n_layer=8, n_head=16, n_kv_head=4, n_embd=1024, norm="rmsnorm", mlp="swiglu",
                     mlp_hidden=2816, bias=False, tie_embeddings=False, pad_vocab_to=64)
SHAPES: dict[str, DecoderConfig] = {
    "transformer": replace(BASE, layer_pattern="a", position="rope", mlp_hidden=4160),
    "mamba": replace(BASE, layer_pattern="m", position="none"),
    "hybrid": replace(BASE, layer_pattern="mmmmammm", position="none"),
}


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prefill-chunk", type=int, default=2048)
    parser.add_argument("--arms", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))

    records = measure_arms({a: SHAPES[a] for a in args.arms}, args.contexts, args.batch, device, dtype, args.new_tokens,
                           args.prefill_chunk, show)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    text = json.dumps({"device": name, "torch": torch.__version__, "records": records}, indent=2)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
