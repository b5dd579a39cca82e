"""The decode engine every generating path runs on: a static cache, and passes over it captured as CUDA graphs.

A decode step of a small model is bound by Python and kernel launches, not by the GPU: an eager
step of GPT-2 small costs ~3.4 ms on an H100 whose memory moves its weights in ~0.09 ms. The engine
removes the host from the loop:
- `DecodeEngine` holds one preallocated `KVCache` (keys and values of MHA/GQA/MQA, MLA's latent,
  the conv and SSM states of Mamba blocks) for `batch` rows of `max_len` slots. The prompt is
  prefilled in one eager pass; every later pass goes through the cache's `SlotCache` view, whose
  slot is a device tensor, so a pass of T tokens is one fixed program at every position.
- `Program` is one such pass, `fn(*inputs)` over static input buffers: compiled by torch.compile if
  asked, captured once as a CUDA graph on CUDA and replayed after, run eagerly elsewhere (the CPU
  path, and the tests' reference). A decode step is the program of T = 1; speculative decoding's
  verification of k drafts the program of T = k + 1; drafters run their own programs.
- `Engines` keeps the engines of one model for reuse across calls (cache lengths rounded up to a
  power of two), so a server or an evaluation loop captures each shape once.
Nothing here waits for the GPU: sampling stays on the device and callers read tokens back when
they must (generation checks for end-of-sequence every few steps).
"""

from __future__ import annotations

import types
from collections import OrderedDict
from typing import Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from modules.nn.cache import KVCache, SlotCache
from modules.nn.decoder import Decoder

Outputs = torch.Tensor | tuple[torch.Tensor, ...]


def private_copy(fn: Callable) -> Callable:
    """`fn` with a code object of its own. Dynamo keeps compiled programs on the code object, at most 8
    per process, and with fullgraph the 9th shape fails hard (FailOnRecompileLimitHit): each program
    compiles a private copy, whose compiled versions live and die with it."""
    code = fn.__code__.replace()
    return types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


class Program:
    """`fn(*inputs)` over static input buffers, feeding `feeds`: (cache view, tokens per call) pairs.

    A call copies its inputs into the buffers, points each view's slot at its cache's next free
    slot, runs `fn` (on CUDA: replays the graph captured on the first call) and advances each cache
    by its tokens. Outputs of a replay live in the graph's buffers, which the next call overwrites.
    `backend` is torch.compile's: "inductor" generates kernels; "aot_eager" traces the same graph and
    runs eager kernels (the CPU tests' choice: seconds instead of most of a minute). `sdpa` runs
    attention through one SDPA backend: MATH leaves inductor plain matmuls and a softmax to fuse.
    """

    def __init__(self, fn: Callable[..., Outputs], inputs: tuple[torch.Tensor, ...], feeds: list[tuple[SlotCache, int]],
                 compile: bool = False, cuda_graph: bool = False, backend: str = "inductor",
                 sdpa: SDPBackend | None = None) -> None:
        device = feeds[0][0].slot.device
        if cuda_graph and device.type != "cuda":
            raise ValueError(f"a CUDA graph needs a CUDA cache; this one is on {device}")
        self.inputs = tuple(torch.empty_like(x) for x in inputs)
        self.feeds, self.cuda_graph = feeds, cuda_graph
        if sdpa is not None:  # attention through one SDPA backend (math: plain ops that inductor fuses)
            plain = fn

            def fn(*args: torch.Tensor) -> Outputs:
                with sdpa_kernel(sdpa):
                    return plain(*args)
        self.fn = fn
        if compile:
            # coordinate-descent tuning turns batch-1 matmuls into fused reductions that inductor
            # tunes to memory bandwidth (gpt-fast's setting); it changes nothing on the CPU
            options = {"coordinate_descent_tuning": True} if backend == "inductor" else None
            self.fn = torch.compile(private_copy(fn), fullgraph=True, dynamic=False, backend=backend, options=options)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: Outputs | None = None

    @torch.no_grad()
    def __call__(self, *inputs: torch.Tensor) -> Outputs:
        for view, n in self.feeds:
            if view.cache.length + n > view.cache.max_len:
                raise ValueError(f"cache full: {view.cache.length} + {n} tokens > {view.cache.max_len} slots")
        for buffer, x in zip(self.inputs, inputs):
            if x.shape != buffer.shape:  # copy_ would broadcast, e.g. one token over every row
                raise ValueError(f"expected an input of shape {tuple(buffer.shape)}; got {tuple(x.shape)}")
            buffer.copy_(x)
        for view, _ in self.feeds:
            view.slot.fill_(view.cache.length)
        if self.cuda_graph:
            if self.graph is None:
                self._capture()
            self.graph.replay()
            out = self.outputs
        else:
            out = self.fn(*self.inputs)
        for view, n in self.feeds:
            view.cache.advance(n)
        return out

    def _capture(self) -> None:
        # Warm up on a side stream (compilation, autotuning, cuBLAS handles), then record. Each run
        # writes this call's keys and values at its slots, which the replay writes again; a Mamba
        # state moves on with each run, so it is put back as it was.
        states = [t for view, _ in self.feeds for state in view.mamba if state is not None for t in (state.conv, state.ssm)]
        saved = [t.clone() for t in states]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                self.fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(stream)
        for tensor, value in zip(states, saved):
            tensor.copy_(value)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = self.fn(*self.inputs)


def fast_paths(model: Decoder, compile: bool, cuda_graph: bool | None) -> tuple[bool, bool]:
    """(compile, cuda_graph) for `model`: graphs by default on CUDA; refused where a pass cannot be one program."""
    device = next(model.parameters()).device
    moe = bool(model.moe_layers())
    if moe and (compile or cuda_graph):
        raise ValueError("a mixture of experts routes tokens with data-dependent shapes, which one compiled or "
                         "captured step cannot hold: decode it eagerly (compile=False, cuda_graph=False)")
    if cuda_graph is None:
        cuda_graph = device.type == "cuda" and not moe and not sharded(model)
    return compile, cuda_graph


def sharded(model: Decoder) -> bool:
    """Whether `model`'s parameters are shards that a forward pass gathers (FSDP2's DTensors, DeepSpeed ZeRO-3's
    partitions): a captured graph would replay one gather into buffers the strategy frees again."""
    from torch.distributed.tensor import DTensor  # light, but only needed here

    return any(isinstance(p, DTensor) or hasattr(p, "ds_id") for p in model.parameters())


class Passes:
    """Programs by name and input shapes, built on first use with one set of options: a decode engine's,
    or a drafter's over its own caches (`SlotCache` views of them, listed as each program's `feeds`)."""

    def __init__(self, compile: bool = False, cuda_graph: bool = False, backend: str = "inductor",
                 sdpa: SDPBackend | None = None) -> None:
        self.options = dict(compile=compile, cuda_graph=cuda_graph, backend=backend, sdpa=sdpa)
        self.programs: dict[tuple, Program] = {}

    def run(self, name: str, fn: Callable[..., Outputs], inputs: tuple[torch.Tensor, ...],
            feeds: list[tuple[SlotCache, int]]) -> Outputs:
        """`fn(*inputs)` as the program `name` for these input shapes. `fn` must read its caches through the
        views in `feeds` and keep no state of its own: a replay runs only its kernels."""
        key = (name, *(tuple(x.shape) for x in inputs))
        program = self.programs.get(key)
        if program is None:
            program = self.programs[key] = Program(fn, inputs, feeds, **self.options)
        return program(*inputs)


class DecodeEngine:
    """One decoder's static cache for `batch` rows of `max_len` slots, and the programs that feed it.

    `prefill(idx, valid)` writes a (left-padded) prompt batch at the next slots in one eager pass;
    `step(tokens)` feeds T tokens per row at the next slots through the program for T; `program(name,
    fn, inputs)` is the same for any pass over this cache's `view` (a drafter's read of the target).
    `reset()` empties the cache and keeps every program: a captured graph reads and writes these buffers.
    `attention` is how its passes read the cache (`SlotCache`'s kernel: "sdpa", or "flex" for FlexAttention's
    decoding kernel, compiled); the eager prefill reads it through SDPA.
    """

    def __init__(self, model: Decoder, batch: int, max_len: int, compile: bool = False,
                 cuda_graph: bool | None = None, backend: str = "inductor", sdpa: SDPBackend | None = None,
                 attention: str = "sdpa") -> None:
        compile, cuda_graph = fast_paths(model, compile, cuda_graph)
        if attention == "flex" and model.config.attention != "standard":
            raise ValueError(f"attention='flex' reads the cache of standard attention blocks; model.attention="
                             f"{model.config.attention!r} reads it its own way: leave attention='sdpa'")
        weight = next(model.parameters())
        self.model = model
        self.cache = KVCache(model.config, batch, max_len, weight.device, weight.dtype)
        self.view = SlotCache(self.cache, kernel=attention)
        self.passes = Passes(compile, cuda_graph, backend, sdpa)

    @property
    def batch(self) -> int:
        return self.cache.valid.shape[0]

    @property
    def cuda_graph(self) -> bool:
        return self.passes.options["cuda_graph"]

    @property
    def programs(self) -> dict[tuple, Program]:
        return self.passes.programs

    def reset(self) -> None:
        self.cache.reset()

    @torch.no_grad()
    def prefill(self, idx: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, padded_vocab) after the prompts idx (B, T), written at the cache's next T slots;
        `valid` (B, T) marks real tokens (False for left padding; None: all real)."""
        if idx.shape[0] != self.batch:
            raise ValueError(f"expected {self.batch} prompts, one per cache row; got {idx.shape[0]}")
        return self.model.lm_head(self.model.features(idx, self.cache, valid)[:, -1])  # the last position only

    def program(self, name: str, fn: Callable[..., Outputs], *inputs: torch.Tensor) -> Outputs:
        """`fn(*inputs)` over this cache's `view`, fed inputs[0].shape[1] tokens per row (see `Passes.run`)."""
        if inputs[0].shape[0] != self.batch:  # one program per shape would take it
            raise ValueError(f"expected tokens for {self.batch} rows, one per cache row; got shape {tuple(inputs[0].shape)}")
        return self.passes.run(name, fn, inputs, [(self.view, inputs[0].shape[1])])

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, padded_vocab) for tokens (B, T) fed at the next T slots of every row."""
        model, view = self.model, self.view
        return self.program("logits", lambda idx: model(idx, view), tokens)


def cache_slots(length: int, block_size: int) -> int:
    """Slots of a kept engine's cache for `length` tokens: the next power of two, at most `block_size`, so
    calls of nearby lengths share one cache and its captured programs."""
    return min(block_size, 1 << max(length - 1, 1).bit_length())


class Engines:
    """The engines of one model, kept for reuse: one per batch size and cache length, the `keep` used last.

    Cache lengths are rounded up to a power of two (at most the model's block_size), so calls of
    different prompt lengths share an engine and its captured programs; a longer cache only widens
    the masked attention over its slots. Keep one per model you generate from many times.
    """

    def __init__(self, model: Decoder, compile: bool = False, cuda_graph: bool | None = None, keep: int = 4,
                 backend: str = "inductor") -> None:
        self.model, self.keep = model, keep
        self.options = dict(compile=compile, cuda_graph=cuda_graph, backend=backend)
        self.engines: OrderedDict[tuple, DecodeEngine] = OrderedDict()

    def get(self, batch: int, length: int) -> DecodeEngine:
        """An empty engine of `batch` rows and at least `length` slots."""
        block = self.model.config.block_size
        if length > block:
            raise ValueError(f"cache of {length} slots exceeds the model's block_size {block}")
        max_len = cache_slots(length, block)
        # parameters replaced (not updated in place) would leave a graph reading the old ones; inference
        # tensors cannot be written outside inference mode, nor dropout switched in a captured pass
        pointers = tuple(p.data_ptr() for p in self.model.parameters())
        key = (batch, max_len, self.model.training, torch.is_inference_mode_enabled(), pointers)
        engine = self.engines.pop(key, None) or DecodeEngine(self.model, batch, max_len, **self.options)
        self.engines[key] = engine
        while len(self.engines) > self.keep:
            self.engines.popitem(last=False)
        engine.reset()
        return engine
