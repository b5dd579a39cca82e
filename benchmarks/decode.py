"""Prefill and decode speed of the one decoder: the decode engine against eager paths and transformers.

Prefill is one forward pass over a prompt, with a cache to fill and without. Decode is greedy,
one token per row per step, each step timed on its own (CUDA events on a GPU, so the host never
waits between steps) to draw the time per step against the sequence length. Decode modes:
- `no cache`: the whole sequence through the model every step, as nanoGPT's `generate` does;
- `cache`: one token through `Decoder.forward` and the `KVCache`, eager;
- `engine`: the decode engine's step (`modules/decoding/engine.py`: the static cache's slot view)
  captured once as a CUDA graph and replayed, `generate`'s default on CUDA;
- `engine+compile`: that step compiled by torch.compile, then captured (`generate(..., compile=True)`);
  `engine+compile+math` the same with attention through SDPA's math backend, which inductor fuses
  into its own kernels instead of calling the memory-efficient attention kernel; `engine+compile+flex` with
  attention through FlexAttention, whose compiled decoding kernel is one kernel per layer.
- `transformers static` / `transformers dynamic`: Hugging Face's `generate` on the same GPT-2
  shape (random weights), greedy, with its static and its default dynamic cache: what users have.
Each decode mode is set against the memory-bandwidth bound, the weight bytes per token over the
copy bandwidth measured in the same call: a step reads every weight matrix once (a tied embedding
once, as the LM head; a position table or an untied token table only for B rows, so not counted)
and each row's keys and values of the mean context, and is shared by the B rows of the batch.
The copy bandwidth counts bytes read plus bytes written (2 x the buffer per copy), STREAM's
convention: it is the DRAM traffic per second, the same unit as the bytes a step reads, so the
bound is the time to move those bytes at the rate copying moves bytes. A pure read stream runs a
few percent faster than a copy on GPUs, so a share slightly over 100% means "at the bound".
The matmul floors are the step's weight products alone, one CUDA graph (cuBLAS, and inductor's
reductions): no step that runs one kernel per weight matrix is faster. `--profile` lists the
kernels of one engine step (count, busy time, the gaps between them).
`python -m benchmarks.decode --preset gpt2-124m --batch 1 16 --new-tokens 256 --out DIR` prints
a table and writes decode-<preset>.json, .md and .png under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from torch.nn.attention import SDPBackend
from torch.profiler import ProfilerActivity, profile
from matplotlib.figure import Figure

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.throughput import preset_model  # noqa: E402
from modules.decoding.engine import DecodeEngine  # noqa: E402
from modules.nn import Decoder  # noqa: E402
from modules.nn.cache import KVCache  # noqa: E402

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")  # recorded with the command: they set the CPU's speed
MODES = ("no cache", "cache", "engine", "engine+compile", "engine+compile+math", "engine+compile+flex")
HF_MODES = ("transformers static", "transformers dynamic")


def build_model(preset: str, device: torch.device, dtype: torch.dtype) -> Decoder:
    """A preset's decoder with random weights, in `dtype` on `device`, in eval mode."""
    cfg = preset_model(preset)
    torch.manual_seed(0)
    return Decoder(cfg).to(device=device, dtype=dtype).eval()


class StepClock:
    """Times consecutive steps: `mark()` before the first and after each one.

    On CUDA each mark records an event and nothing waits until `seconds()`, so a step's time is
    the GPU's time between marks: its own work, or the host's launches when those are slower.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self) -> list[float]:
        if self.cuda:
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def copy_bandwidth(device: torch.device, nbytes: int | None = None, iters: int = 10) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written (STREAM's
    convention, the memory traffic per second); median of `iters` copies of `nbytes`."""
    nbytes = nbytes or (2**30 if device.type == "cuda" else 2**28)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    times = []
    for i in range(iters + 2):  # two warm-ups
        clock = StepClock(device)
        clock.mark()
        dst.copy_(src)
        clock.mark()
        if i >= 2:
            times += clock.seconds()
    del src, dst
    return 2 * nbytes / statistics.median(times)


def weight_bytes(model: Decoder) -> int:
    """Bytes of weights one decode step must read: every parameter once (a tied embedding once, as
    the LM head), less the position table and an untied token table, of which a step gathers B rows."""
    n = model.num_params()
    if model.wpe is not None:
        n -= model.wpe.weight.numel()
    if model.lm_head.weight is not model.wte.weight:
        n -= model.wte.weight.numel()
    return n * next(model.parameters()).element_size()


def bandwidth_bound(model: Decoder, batch: int, context: float, bandwidth: float) -> float:
    """Tokens/s if a decode step only moved the bytes it must, at `bandwidth` bytes/s: the
    `weight_bytes` once for the whole batch and, for each row, the keys and values of `context` tokens."""
    cfg = model.config
    elem = next(model.parameters()).element_size()
    kv = 2 * cfg.n_layer * cfg.kv_heads * cfg.head_dim * context * elem  # keys and values, one row
    return batch * bandwidth / (weight_bytes(model) + batch * kv)


@torch.no_grad()
def matmul_floor(model: Decoder, batch: int, replays: int = 50, compile: bool = False) -> dict:
    """The step's weight matmuls and nothing else: one `F.linear` of (batch, in_features) per
    `nn.Linear` of the model (the LM head included), in the step's order, captured as one CUDA graph;
    cuBLAS's kernels, or with `compile` inductor's (at batch 1, coordinate-descent tuned reductions).

    No decode step that runs these products as separate kernels can be faster. At batch 1 each is
    a matrix-vector product of a few MB, too small to reach the copy bandwidth, so this floor shows
    how much of the gap to the bandwidth bound the model's size alone leaves.
    """
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = [torch.randn(batch, m.in_features, device=m.weight.device, dtype=m.weight.dtype) for m in linears]

    def products(xs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [torch.nn.functional.linear(x, m.weight, m.bias) for m, x in zip(linears, xs)]

    run = torch.compile(products, fullgraph=True, options={"coordinate_descent_tuning": True}) if compile else products
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            run(inputs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run(inputs)
    clock = StepClock(torch.device("cuda"))
    clock.mark()
    for _ in range(replays):
        graph.replay()
        clock.mark()
    seconds = statistics.median(clock.seconds())
    return {"batch": batch, "kernels": len(linears), "compiled": compile, "ms_per_step": 1e3 * seconds,
            "tokens_per_s": batch / seconds}


def random_prompt(model: Decoder, batch: int, length: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    device = next(model.parameters()).device
    return torch.randint(0, model.config.vocab_size, (batch, length), generator=g).to(device)


@torch.no_grad()
def prefill_speed(model: Decoder, batch: int, prompt_len: int, cached: bool, repeats: int = 5, cache_len: int | None = None) -> dict:
    """One forward pass over (batch, prompt_len) tokens, filling a cache of `cache_len` slots or
    with none; median of `repeats` after two warm-ups."""
    device = next(model.parameters()).device
    idx = random_prompt(model, batch, prompt_len)
    dtype = next(model.parameters()).dtype
    cache = KVCache(model.config, batch, cache_len or prompt_len, device, dtype) if cached else None
    times = []
    for i in range(repeats + 2):
        if cache is not None:
            cache.reset()
        clock = StepClock(device)
        clock.mark()
        model(idx, cache)
        clock.mark()
        if i >= 2:
            times += clock.seconds()
    seconds = statistics.median(times)
    return {"batch": batch, "prompt_len": prompt_len, "cache": cached, "ms": 1e3 * seconds, "tokens_per_s": batch * prompt_len / seconds}


def _decode(model: Decoder, prompt: torch.Tensor, new_tokens: int, cache: KVCache | None,
            engine: DecodeEngine | None) -> tuple[list[float], torch.Tensor]:
    """Seconds of each of `new_tokens` greedy steps after the prompt, and the tokens (B, new_tokens)."""
    vocab = model.config.vocab_size
    clock = StepClock(prompt.device)
    tokens = []
    if engine is not None:
        engine.reset()
        logits = engine.prefill(prompt)  # not timed
        clock.mark()
        for _ in range(new_tokens):
            token = logits[:, :vocab].argmax(-1)  # (B,)
            tokens.append(token)
            logits = engine.step(token[:, None])[:, -1]
            clock.mark()
    elif cache is None:  # recompute the whole prefix every step
        seq = prompt
        clock.mark()
        for _ in range(new_tokens):
            token = model(seq)[:, -1, :vocab].argmax(-1)  # (B,)
            seq = torch.cat([seq, token[:, None]], dim=1)
            tokens.append(token)
            clock.mark()
    else:
        cache.reset()
        logits = model(prompt, cache)[:, -1]  # prefill, not timed
        clock.mark()
        for _ in range(new_tokens):
            token = logits[:, :vocab].argmax(-1)  # (B,)
            tokens.append(token)
            logits = model(token[:, None], cache)[:, -1]
            clock.mark()
    return clock.seconds(), torch.stack(tokens, dim=1)


def summarize(mode: str, batch: int, prompt_len: int, new_tokens: int, runs: list[list[float]], warmup_s: float,
              tokens: torch.Tensor | None) -> dict:
    """A decode row from the per-step seconds of each timed run (median per step over runs)."""
    per_step = [statistics.median(s) for s in zip(*runs)]
    head, tail = per_step[: max(1, new_tokens // 16)], per_step[-max(1, new_tokens // 16) :]
    return {
        "mode": mode, "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
        "tokens_per_s": batch * new_tokens / sum(per_step),
        "ms_per_step": 1e3 * statistics.median(per_step),
        "ms_first": 1e3 * statistics.mean(head), "ms_last": 1e3 * statistics.mean(tail),
        "warmup_s": warmup_s,
        "seq_len": [prompt_len + i for i in range(new_tokens)],
        "step_ms": [1e3 * s for s in per_step],
        "tokens": tokens.tolist() if tokens is not None else None,
    }


def engine_for(model: Decoder, batch: int, max_len: int, mode: str) -> DecodeEngine:
    """The engine a decode mode runs: `engine`, `engine+compile`, `engine+compile+math`, `engine+compile+flex`."""
    cuda = next(model.parameters()).device.type == "cuda"
    return DecodeEngine(model, batch, max_len, compile="compile" in mode, cuda_graph=cuda,
                        sdpa=SDPBackend.MATH if mode.endswith("+math") else None,
                        attention="flex" if mode.endswith("+flex") else "sdpa")


@torch.no_grad()
def decode_speed(model: Decoder, batch: int, prompt_len: int, new_tokens: int, mode: str, repeats: int = 3,
                 engine: DecodeEngine | None = None) -> dict:
    """Greedy decode of `new_tokens` after a random prompt in one of `MODES`: per-step times
    (median over `repeats` runs after one warm-up run, which also compiles and captures),
    tokens/s, and the tokens of the first timed run. An engine mode runs `engine` if given."""
    if mode not in MODES:
        raise ValueError(f"unknown decode mode {mode!r}; choose from {MODES}")
    device = next(model.parameters()).device
    prompt = random_prompt(model, batch, prompt_len)
    cache = None
    if mode == "cache":
        cache = KVCache(model.config, batch, prompt_len + new_tokens, device, next(model.parameters()).dtype)
    elif mode.startswith("engine"):
        engine = engine or engine_for(model, batch, prompt_len + new_tokens, mode)
    else:
        engine = None
    runs, tokens = [], None
    for i in range(repeats + 1):
        seconds, out = _decode(model, prompt, new_tokens, cache, engine)
        if i == 0:
            warmup_s = sum(seconds)
        else:
            runs.append(seconds)
            tokens = out if tokens is None else tokens
    return summarize(mode, batch, prompt_len, new_tokens, runs, warmup_s, tokens)


def hf_model(model: Decoder):
    """transformers' GPT-2 of `model`'s shape (learned positions, LayerNorm, GELU MLP, tied head), random
    weights, on its device and in its dtype: the same work per token for Hugging Face's `generate`."""
    from transformers import GPT2Config, GPT2LMHeadModel  # heavy, and only this baseline needs it

    cfg = model.config
    weight = next(model.parameters())
    config = GPT2Config(vocab_size=cfg.padded_vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
                        n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).to(device=weight.device, dtype=weight.dtype).eval()


@torch.no_grad()
def hf_decode_speed(hf, model: Decoder, batch: int, prompt_len: int, new_tokens: int, mode: str, repeats: int = 3) -> dict:
    """transformers' `generate`, greedy, exactly `new_tokens` new tokens, with its static or dynamic cache:
    tokens/s of the median whole call after one warm-up (which compiles what it compiles). The prefill is
    inside the call; it is one pass of `prompt_len` tokens against `new_tokens` decode steps."""
    device = next(model.parameters()).device
    prompt = random_prompt(model, batch, prompt_len)
    options = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                   attention_mask=torch.ones_like(prompt))
    if mode == "transformers static":
        options["cache_implementation"] = "static"
    times = []
    for i in range(repeats + 1):
        clock = StepClock(device)
        start = time.perf_counter()
        clock.mark()
        hf.generate(prompt, **options)
        clock.mark()
        seconds = clock.seconds()[0]
        if i == 0:
            warmup_s = time.perf_counter() - start
        else:
            times.append(seconds)
    seconds = statistics.median(times)
    row = summarize(mode, batch, prompt_len, new_tokens, [[seconds / new_tokens] * new_tokens], warmup_s, None)
    row["transformers"] = sys.modules["transformers"].__version__  # imported by hf_model
    return row


def device_us(event) -> float:
    """A profiler event's total time on the device, in us (its field's name moved between torch versions)."""
    return getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0.0)


@torch.no_grad()
def profile_step(engine: DecodeEngine, replays: int = 20) -> dict:
    """The kernels of one engine step: torch.profiler over `replays` replays of its captured graph.

    Busy time is the sum of kernel durations per step; the rest of the step's wall time is the
    gaps between kernels (launch latency inside the graph, and kernels too short to fill the GPU).
    """
    vocab = engine.model.config.vocab_size
    prompt = random_prompt(engine.model, engine.batch, 8)
    engine.reset()
    token = engine.prefill(prompt)[:, :vocab].argmax(-1, keepdim=True)
    engine.step(token)  # capture
    torch.cuda.synchronize()
    clock = StepClock(prompt.device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        clock.mark()
        for _ in range(replays):
            engine.step(token)
            clock.mark()
        torch.cuda.synchronize()
    rows = [(device_us(a), a.count, a.key)
            for a in prof.key_averages() if a.device_type.name == "CUDA" and "memcpy" not in a.key.lower()
            and "memset" not in a.key.lower()]
    count = sum(calls for _, calls, _ in rows) / replays
    busy_us = sum(us for us, _, _ in rows) / replays
    step_ms = statistics.median(clock.seconds()) * 1e3
    top = sorted(((us / replays, calls / replays, name) for us, calls, name in rows), reverse=True)[:15]
    return {"batch": engine.batch, "kernels_per_step": count, "busy_us_per_step": busy_us, "step_us": 1e3 * step_ms,
            "gap_us_per_step": 1e3 * step_ms - busy_us,
            "top": [{"us_per_step": us, "calls_per_step": calls, "kernel": name[:120]} for us, calls, name in top]}


@torch.no_grad()
def profile_prefill(model: Decoder, batch: int, prompt_len: int, cache_len: int, repeats: int = 10) -> dict:
    """Where a prefill with the cache spends what one without does not: per pass, the host's time to issue it
    (the call returns once every kernel is queued), the kernels and their busy time, and the kernels whose
    count differs between the two (torch.profiler over `repeats` passes of each, after a warm-up)."""
    device = next(model.parameters()).device
    idx = random_prompt(model, batch, prompt_len)
    cache = KVCache(model.config, batch, cache_len, device, next(model.parameters()).dtype)
    out = {"batch": batch, "prompt_len": prompt_len}
    kernels = {}
    for cached in (False, True):
        def run() -> None:
            if cached:
                cache.reset()
            model(idx, cache if cached else None)
        run()
        torch.cuda.synchronize()
        host = []
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(repeats):
                torch.cuda.synchronize()
                began = time.perf_counter()
                run()
                host.append(time.perf_counter() - began)
            torch.cuda.synchronize()
        rows = [a for a in prof.key_averages() if a.device_type.name == "CUDA"]
        kernels[cached] = {a.key[:100]: a.count / repeats for a in rows}
        busy = sum(device_us(a) for a in rows) / repeats
        name = "cache" if cached else "no_cache"
        out[name] = {"host_us": 1e6 * statistics.median(host), "kernels": sum(kernels[cached].values()), "busy_us": busy}
    names = sorted(set(kernels[False]) | set(kernels[True]))
    out["differ"] = {n: [kernels[False].get(n, 0), kernels[True].get(n, 0)] for n in names
                     if kernels[False].get(n, 0) != kernels[True].get(n, 0)}
    return out


def agreement(tokens: list[list[int]], reference: list[list[int]]) -> int:
    """Leading steps at which every row's token equals the reference's."""
    n = 0
    for step in zip(*tokens, *reference):
        half = len(step) // 2
        if step[:half] != step[half:]:
            break
        n += 1
    return n


def plot(rows: list[dict], title: str, path: Path) -> None:
    """ms per decode step against sequence length, one panel per batch size, one line per mode."""
    batches = sorted({r["batch"] for r in rows})
    fig = Figure(figsize=(6 * len(batches), 4.2))
    FigureCanvasAgg(fig)  # drawn off screen, without pyplot's global state
    axes = fig.subplots(1, len(batches), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        for row in (r for r in rows if r["batch"] == batch):
            ax.plot(row["seq_len"], row["step_ms"], label=f"{row['mode']} ({row['tokens_per_s']:,.0f} tok/s)", lw=1.2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (tokens before the step)")
        ax.set_ylabel(f"ms per decode step ({batch} token{'s' if batch > 1 else ''})")
        ax.set_title(f"batch {batch}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def markdown(meta: dict, prefill: list[dict], decode: list[dict], failed: list[dict]) -> str:
    bw = meta["copy_bandwidth_bytes_per_s"]
    lines = [
        f"# Prefill and decode speed, {meta['preset']}, {meta['device']}, {meta['dtype']}", "",
        f"`{meta['command']}`", "",
        f"torch {meta['torch']}, {meta['threads']} CPU threads; random weights, random prompts, greedy. Copy bandwidth measured in this run: "
        f"{bw / 1e9:,.1f} GB/s (bytes read + written); weights read per step {meta['weight_bytes'] / 1e6:.1f} MB. The bound moves "
        f"those weights once per step plus each row's keys and values of the mean context ({meta['mean_context']:.0f} tokens) "
        "at that bandwidth.", "",
        "## Prefill (one forward pass over the prompt)", "",
        "| batch | prompt | cache | ms | tokens/s |", "|---|---|---|---|---|",
    ]
    lines += [f"| {r['batch']} | {r['prompt_len']} | {'yes' if r['cache'] else 'no'} | {r['ms']:.2f} | {r['tokens_per_s']:,.0f} |" for r in prefill]
    lines += [
        "", f"## Decode (prompt {meta['prompt_len']}, {meta['new_tokens']} new tokens, median of {meta['repeats']} runs per step)", "",
        "| batch | mode | ms/step | ms first 1/16 | ms last 1/16 | tokens/s | bound tokens/s | share of bound | vs transformers static | steps equal to `cache` |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in decode:
        hf = next((h for h in decode if h["batch"] == r["batch"] and h["mode"] == "transformers static"), None)
        ratio = f"{r['tokens_per_s'] / hf['tokens_per_s']:.2f}x" if hf else ""
        agree = "" if r["agree_with_cache"] is None else f"{r['agree_with_cache']}/{r['new_tokens']}"
        lines.append(
            f"| {r['batch']} | {r['mode']} | {r['ms_per_step']:.3f} | {r['ms_first']:.3f} | {r['ms_last']:.3f} | "
            f"{r['tokens_per_s']:,.0f} | {r['bound_tokens_per_s']:,.0f} | {r['share_of_bound']:.1%} | {ratio} | {agree} |"
        )
    for f in failed:
        lines.append(f"| {f['batch']} | {f['mode']} | failed or skipped: {f['error']} | | | | | | | |")
    for r in meta.get("matmul_floor", []):
        lines.append(
            f"| {r['batch']} | *floor: the {r['kernels']} weight matmuls alone ({'inductor' if r['compiled'] else 'cuBLAS'}), one CUDA graph* "
            f"| {r['ms_per_step']:.3f} | | | {r['tokens_per_s']:,.0f} | {r['bound_tokens_per_s']:,.0f} | {r['share_of_bound']:.1%} | | |"
        )
    lines += [
        "", "transformers rows time whole `generate` calls (prefill included) and spread them evenly over the steps. "
        "Steps equal to `cache`: leading steps at which every row's greedy token equals the eager cached path's. "
        "Random weights give nearly flat logits (top-2 gaps of a few hundredths), so in bf16 a rounding "
        "difference between kernels flips an argmax within a few steps and the sequences part; in fp32 "
        "the modes agree step for step (tests/test_generation.py checks tokens and logits).",
    ]
    for prof in meta.get("profile", []):
        if prof["mode"] == "prefill":
            plain, cached = prof["no_cache"], prof["cache"]
            lines += [
                "", f"## Prefill of batch {prof['batch']}, prompt {prof['prompt_len']}, profiled", "",
                f"Without the cache: host {plain['host_us']:.0f} us to issue {plain['kernels']:.0f} kernels (busy "
                f"{plain['busy_us']:.0f} us); with it: host {cached['host_us']:.0f} us, {cached['kernels']:.0f} kernels "
                f"(busy {cached['busy_us']:.0f} us).", "",
                "| kernel | per pass without | with the cache |", "|---|---|---|",
            ]
            lines += [f"| `{name}` | {a:g} | {b:g} |" for name, (a, b) in prof["differ"].items()]
            continue
        lines += [
            "", f"## One `{prof['mode']}` step at batch {prof['batch']}, profiled", "",
            f"{prof['kernels_per_step']:.0f} kernels per step, busy {prof['busy_us_per_step']:.1f} us of a "
            f"{prof['step_us']:.1f} us step: {prof['gap_us_per_step']:.1f} us between kernels.", "",
            "| us per step | calls per step | kernel |", "|---|---|---|",
        ]
        lines += [f"| {t['us_per_step']:.1f} | {t['calls_per_step']:.0f} | `{t['kernel']}` |" for t in prof["top"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--prompt", type=int, default=32, help="prompt length for decode and the short prefill")
    parser.add_argument("--long-prompt", type=int, default=None, help="long prefill (default 512 on CUDA, 128 on CPU, capped at block_size)")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", nargs="+", choices=[*MODES, *HF_MODES], default=None,
                        help="decode modes (default: all on CUDA; no cache, cache and engine on the CPU)")
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=None,
                        help="profile one step of the fastest engine mode per batch (default: on CUDA)")
    parser.add_argument("--budget-s", type=float, default=300,
                        help="skip a decode mode that would end past this many seconds, judged by its time at the previous batch size")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    model = build_model(args.preset, device, dtype)
    cfg = model.config
    if args.prompt + args.new_tokens > cfg.block_size:
        parser.error(f"--prompt + --new-tokens = {args.prompt + args.new_tokens} exceeds block_size {cfg.block_size}")
    long_prompt = min(args.long_prompt or (512 if cuda else 128), cfg.block_size)
    modes = args.modes or ([*MODES, *HF_MODES] if cuda else ["no cache", "cache", "engine"])
    profile = cuda if args.profile is None else args.profile

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f}s] {msg}", flush=True)

    bandwidth = copy_bandwidth(device)
    log(f"copy bandwidth {bandwidth / 1e12:.3f} TB/s on {device}")
    prefill = []
    for batch in args.batch:
        for length in dict.fromkeys([args.prompt, long_prompt]):
            for cached in (False, True):
                cache_len = min(length + args.new_tokens, cfg.block_size)
                row = prefill_speed(model, batch, length, cached, repeats=10 if cuda else 5, cache_len=cache_len)
                prefill.append(row)
                log(f"prefill {json.dumps(row)}")
    mean_context = args.prompt + (args.new_tokens + 1) / 2
    decode, failed = [], []
    hf = hf_model(model) if any(m in HF_MODES for m in modes) else None
    took: dict[str, float] = {}  # wall seconds of each mode at the last batch size, compile and capture included
    engines: dict[tuple[int, str], DecodeEngine] = {}
    for batch in args.batch:
        for mode in modes:
            if time.perf_counter() - start + took.get(mode, 0.0) > args.budget_s:
                failed.append({"batch": batch, "mode": mode, "error": f"skipped, would end past the {args.budget_s:.0f} s budget"})
                log(f"skip batch {batch} {mode}: would end past the time budget")
                continue
            began = time.perf_counter()
            try:
                if mode in HF_MODES:
                    row = hf_decode_speed(hf, model, batch, args.prompt, args.new_tokens, mode, repeats=args.repeats)
                else:
                    if mode.startswith("engine"):  # kept for the profile: a second compile would cost as much again
                        engines[batch, mode] = engine_for(model, batch, args.prompt + args.new_tokens, mode)
                    row = decode_speed(model, batch, args.prompt, args.new_tokens, mode, repeats=args.repeats,
                                       engine=engines.get((batch, mode)))
            except Exception as err:  # a fast path that fails here is reported, not fatal
                traceback.print_exc()
                failed.append({"batch": batch, "mode": mode, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"})
                log(f"batch {batch} {mode} FAILED: {failed[-1]['error']}")
                continue
            took[mode] = time.perf_counter() - began
            row["bound_tokens_per_s"] = bandwidth_bound(model, batch, mean_context, bandwidth)
            row["share_of_bound"] = row["tokens_per_s"] / row["bound_tokens_per_s"]
            decode.append(row)
            summary = {k: row[k] for k in ("batch", "mode", "tokens_per_s", "ms_per_step", "ms_first", "ms_last", "share_of_bound", "warmup_s")}
            log(f"decode {json.dumps(summary)}")
    floor, profiles = [], []
    if cuda:
        for batch in args.batch:
            for compiled in (False, True):
                try:
                    row = matmul_floor(model, batch, compile=compiled)
                except Exception as err:  # the compiled floor is a probe, not the benchmark
                    log(f"matmul floor batch {batch} compiled={compiled} FAILED: {type(err).__name__}: {err}")
                    continue
                row["bound_tokens_per_s"] = bandwidth_bound(model, batch, mean_context, bandwidth)
                row["share_of_bound"] = row["tokens_per_s"] / row["bound_tokens_per_s"]
                floor.append(row)
                log(f"matmul floor {json.dumps(row)}")
    if profile and cuda:
        for batch in args.batch:
            for length in dict.fromkeys([args.prompt, long_prompt]):
                try:
                    prof = profile_prefill(model, batch, length, min(length + args.new_tokens, cfg.block_size))
                except Exception as err:  # the profile explains the numbers; it is not one of them
                    log(f"prefill profile batch {batch} prompt {length} FAILED: {type(err).__name__}: {err}")
                    continue
                profiles.append({"mode": "prefill", **prof})
                log(f"prefill profile {json.dumps(profiles[-1])}")
        for batch in args.batch:
            timed = [r for r in decode if r["batch"] == batch and r["mode"].startswith("engine")]
            if not timed:
                continue
            best = max(timed, key=lambda r: r["tokens_per_s"])["mode"]
            try:
                prof = profile_step(engines[batch, best])
            except Exception as err:  # the profile explains the numbers; it is not one of them
                log(f"profile batch {batch} FAILED: {type(err).__name__}: {err}")
                continue
            profiles.append({"mode": best, **prof})
            log(f"profile {json.dumps(profiles[-1])}")
    for row in decode:
        reference = next((r for r in decode if r["batch"] == row["batch"] and r["mode"] == "cache"), None)
        row["agree_with_cache"] = agreement(row["tokens"], reference["tokens"]) if reference and row["tokens"] else None
    for row in decode:  # the tokens of random weights say nothing past that agreement, and are most of the JSON
        del row["tokens"]

    device_name = torch.cuda.get_device_name(device) if cuda else "cpu"
    meta = {"preset": args.preset, "model": asdict(cfg), "device": device_name, "dtype": str(dtype).removeprefix("torch."),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "command": shlex.join([f"{k}={os.environ[k]}" for k in THREAD_VARS if k in os.environ] + ["python", "-m", "benchmarks.decode", *sys.argv[1:]]),
            "copy_bandwidth_bytes_per_s": bandwidth,
            "weight_bytes": weight_bytes(model), "mean_context": mean_context,
            "prompt_len": args.prompt, "new_tokens": args.new_tokens, "repeats": args.repeats, "matmul_floor": floor,
            "profile": profiles, "seconds": time.perf_counter() - start}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"decode-{args.preset}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "prefill": prefill, "decode": decode, "failed": failed}, indent=1))
    plot(decode, f"Decode time per step, {args.preset}, {device_name}, {meta['dtype']}", stem.with_suffix(".png"))
    table = markdown(meta, prefill, decode, failed)
    stem.with_suffix(".md").write_text(table)
    print(table, flush=True)


if __name__ == "__main__":
    main()
