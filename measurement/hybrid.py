"""Decoding cache bytes and decode tokens/s against context length, for decoders of any layer pattern.

`measure` fills a `KVCache` of context + new_tokens slots by prefilling random tokens in chunks, records the
bytes the cache holds (computed from the config, `cache_bytes`; measured: the growth of allocated GPU memory
from before the cache to after the prefill, or the buffers' sizes on a CPU), then decodes `new_tokens` tokens
and times them: on CUDA one step captured as a CUDA graph and replayed (no launch overhead), elsewhere eager.
Weights are random: speed and memory do not depend on them. The hybrid technique measures its arms' shapes
with `measure_arms`; `python -m benchmarks.hybrid` measures Jamba's at full width.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import torch

from modules.decoding.engine import DecodeEngine
from modules.nn import Decoder, DecoderConfig
from modules.nn.cache import cache_bytes


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure(model: Decoder, context: int, batch: int, new_tokens: int = 64, prefill_chunk: int = 2048,
            graph: bool | None = None) -> dict[str, Any]:
    """Cache bytes and decode speed of `model` (in eval mode, on its device) after `context` tokens per row."""
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    cuda = device.type == "cuda"
    graph = cuda and not model.moe_layers() if graph is None else graph
    generator = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, context + new_tokens), device=device, generator=generator)
    _sync(device)
    before = torch.cuda.memory_allocated(device) if cuda else 0
    engine = DecodeEngine(model, batch, context + new_tokens, cuda_graph=graph)  # the decode engine's static cache
    cache = engine.cache
    start = time.perf_counter()
    for chunk in range(0, context, prefill_chunk):
        engine.prefill(ids[:, chunk : min(context, chunk + prefill_chunk)])
    _sync(device)
    prefill_s = time.perf_counter() - start
    measured = torch.cuda.memory_allocated(device) - before if cuda else cache.nbytes()
    engine.step(ids[:, context : context + 1])  # the first step captures the graph: not timed
    _sync(device)
    start = time.perf_counter()
    for t in range(context + 1, context + new_tokens):
        engine.step(ids[:, t : t + 1])
    _sync(device)
    seconds = time.perf_counter() - start
    return {
        "context": context, "batch": batch, "dtype": str(dtype).removeprefix("torch."),
        "computed_bytes": cache_bytes(model.config, batch, context + new_tokens, dtype),
        "measured_bytes": measured, "buffer_bytes": cache.nbytes(),
        "prefill_s": prefill_s, "decode_tokens_per_s": batch * (new_tokens - 1) / seconds,
        "decode": "CUDA graph" if graph else "eager",
    }


def show(r: dict[str, Any]) -> None:
    """One line per record, as the sweep goes."""
    print(f"{r['arm']:12} batch {r['batch']:2} context {r['context']:6}: cache {r['measured_bytes'] / 2**20:9.1f} MiB "
          f"(computed {r['computed_bytes'] / 2**20:9.1f}), decode {r['decode_tokens_per_s']:9.1f} tokens/s", flush=True)


def measure_arms(configs: dict[str, DecoderConfig], contexts: list[int], batches: list[int], device: torch.device,
                 dtype: torch.dtype, new_tokens: int = 64, prefill_chunk: int = 2048,
                 progress: Any = None) -> list[dict[str, Any]]:
    """`measure` for every arm x batch x context; each arm built once, with block_size the longest context."""
    records = []
    longest = max(contexts) + new_tokens
    for name, config in configs.items():
        torch.manual_seed(0)
        model = Decoder(replace(config, block_size=max(longest, config.block_size))).to(device, dtype).eval()
        params = model.num_params(exclude_embeddings=True, active=True)
        # one unrecorded pass first: the first prefill and decode also allocate workspaces (cuBLAS, the graph pool)
        measure(model, min(contexts), batches[0], min(new_tokens, 4), prefill_chunk)
        for batch in batches:
            for context in contexts:
                record = measure(model, context, batch, new_tokens, prefill_chunk)
                records.append({"arm": name, "layer_pattern": config.layer_pattern, "params": params, **record})
                if progress is not None:
                    progress(records[-1])
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return records
