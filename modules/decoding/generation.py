"""Incremental decoding with a KV cache: batched prompts of different lengths, greedy or sampled."""

from __future__ import annotations

import types
from typing import TYPE_CHECKING

import torch

from modules.nn.cache import KVCache, SlotCache
from modules.nn.decoder import Decoder

if TYPE_CHECKING:
    from tokenizers import Tokenizer


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V): greedy at temperature 0, else sampled from `sampling_probs`."""
    if temperature == 0.0:
        return logits.argmax(-1)
    return torch.multinomial(sampling_probs(logits, temperature, top_k, top_p), 1, generator=generator).squeeze(-1)


def sampling_probs(
    logits: torch.Tensor, temperature: float, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """The distribution (..., V) that sampling at `temperature` > 0 draws from, in float32.

    top-k keeps the k largest logits; top-p (nucleus, Holtzman et al. 2020) keeps the smallest
    set of tokens whose probability reaches p, always including the most likely one.
    """
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # mass before this token already reaches p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits.softmax(-1)


def decode_step(model: Decoder, token: torch.Tensor, cache: SlotCache) -> torch.Tensor:
    """Logits (B, padded_vocab) for one new token per row, token (B, 1), fed at `cache.slot`.

    `model(token, kv_cache)[:, -1]` at slot `kv_cache.length`, with the slot, the mask and the
    positions taken from device tensors instead of Python ints, so one trace serves every
    position. The mask is additive (0 or -inf) and built once for all layers.
    """
    visible = cache.visible()  # (B, max_len)
    positions = visible.sum(-1, keepdim=True) - 1  # (B, 1): real tokens before this one, as Decoder.forward counts
    dtype = cache.cache.dtype
    mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill(~visible, float("-inf"))
    mask = mask[:, None, None, :]  # (B, 1, 1, max_len)
    x = model.wte(token)  # (B, 1, C)
    if model.wpe is not None:
        x = x + model.wpe(positions)
    x = model.drop(x)
    rope = None if model.rope is None else model.rope[:, positions].unsqueeze(2)  # (2, B, 1, 1, hs)
    for layer, block in enumerate(model.blocks):
        x = block(x, rope, cache, layer, mask)
    return model.lm_head(model.norm(x))[:, -1]


class CompiledDecoder:
    """`decode_step` over one `KVCache`, compiled once and, on CUDA, captured once as a CUDA graph.

    At batch 1 an eager step of a small model is bound by Python and kernel launches, not by
    the GPU; replaying a captured step costs one launch. Prefill the cache with `Decoder.forward`,
    then call this with each token (B,): it feeds the token at the cache's next slot and returns
    the logits (B, padded_vocab), in a buffer that the next call overwrites. The graph reads and
    writes this cache's buffers: to start again, `cache.reset()` and prefill the same cache, which
    reuses the compiled step and the graph (a new decoder traces and compiles again).
    `backend` is torch.compile's: "inductor" generates kernels; "aot_eager" traces the same graph
    and runs it with eager kernels (the CPU tests' choice: seconds instead of most of a minute).
    """

    def __init__(
        self,
        model: Decoder,
        cache: KVCache,
        compile: bool = True,
        cuda_graph: bool | None = None,
        backend: str = "inductor",
    ) -> None:
        device = cache.valid.device
        self.cuda_graph = device.type == "cuda" if cuda_graph is None else cuda_graph
        if (compile or self.cuda_graph) and model.moe_layers():
            raise ValueError("a mixture of experts routes tokens with data-dependent shapes, which one compiled or "
                             "captured step cannot hold: decode it eagerly (generate(..., compile=False))")
        if self.cuda_graph and device.type != "cuda":
            raise ValueError(f"a CUDA graph needs a CUDA cache; this one is on {device}")
        self.model, self.cache = model, cache
        self.token = torch.zeros(cache.valid.shape[0], 1, dtype=torch.long, device=device)  # (B, 1), read by the graph
        self.slots = SlotCache(cache, torch.zeros(1, dtype=torch.long, device=device))
        self.step = decode_step
        if compile:
            # Shapes are static, so each batch size and cache length is its own program. Dynamo keeps
            # compiled programs on the function's code object, at most 8 per process, and with
            # fullgraph the 9th shape fails hard (FailOnRecompileLimitHit): each decoder compiles a
            # private copy of decode_step, whose programs live and die with it.
            code = decode_step.__code__.replace()
            private = types.FunctionType(code, decode_step.__globals__, decode_step.__name__)
            # coordinate-descent tuning lets inductor turn batch-1 matmuls into fused reductions
            # that reach memory bandwidth (gpt-fast's setting); it changes nothing on the CPU
            options = {"coordinate_descent_tuning": True} if backend == "inductor" else None
            self.step = torch.compile(private, fullgraph=True, dynamic=False, backend=backend, options=options)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits = torch.empty(0)

    @torch.no_grad()
    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        if self.cache.length >= self.cache.max_len:
            raise ValueError(f"cache full: all {self.cache.max_len} slots are used")
        if token.numel() != self.token.shape[0]:  # copy_ would broadcast one token over every row
            raise ValueError(f"expected {self.token.shape[0]} tokens, one per cache row; got shape {tuple(token.shape)}")
        self.token.copy_(token.reshape(-1, 1))
        self.slots.slot.fill_(self.cache.length)
        if self.cuda_graph:
            if self.graph is None:
                self._capture()
            self.graph.replay()
        else:
            self.logits = self.step(self.model, self.token, self.slots)
        self.cache.advance(1)
        return self.logits

    def _capture(self) -> None:
        # Warm up on a side stream (compilation, autotuning, cuBLAS handles), then record. Each
        # run writes this token's keys and values at this slot, which the replay writes again; a
        # Mamba state would move on with each run, so it is put back as it was before the replay.
        states = [t for state in self.cache.mamba if state is not None for t in (state.conv, state.ssm)]
        saved = [t.clone() for t in states]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                self.step(self.model, self.token, self.slots)
        torch.cuda.current_stream().wait_stream(stream)
        for tensor, value in zip(states, saved):
            tensor.copy_(value)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self.step(self.model, self.token, self.slots)


@torch.no_grad()
def generate(
    model: Decoder,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    seed: int | None = None,
    compile: bool = False,
) -> list[list[int]]:
    """New token ids for each prompt, at most `max_new_tokens`, cut after `eos_id`.

    Prompts are left-padded into one batch and prefilled in one forward pass; each further
    token costs one forward pass of one position per row over the cached keys and values.
    `compile=True` runs those steps through a `CompiledDecoder` (torch.compile, and a CUDA graph
    on CUDA): the same tokens, without Python and launch overhead per step, after a compile for
    this call's batch size and cache length (prompt + max_new_tokens) that every call pays again
    (about 30 s for gpt2-124m on an H100): worth it for long generations, not for many short ones.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, and no prompt may be empty")
    device = next(model.parameters()).device
    T0 = max(len(p) for p in prompts)
    idx = torch.zeros(len(prompts), T0, dtype=torch.long, device=device)
    valid = torch.zeros(len(prompts), T0, dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompts):
        idx[row, T0 - len(prompt) :] = torch.tensor(prompt, device=device)
        valid[row, T0 - len(prompt) :] = True
    dtype = next(model.parameters()).dtype
    cache = KVCache(model.config, len(prompts), T0 + max_new_tokens, device, dtype)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    vocab = model.config.vocab_size

    step = CompiledDecoder(model, cache) if compile else None
    logits = model(idx, cache, valid)[:, -1, :vocab]  # prefill; padded vocabulary rows are never sampled
    out = torch.empty(len(prompts), 0, dtype=torch.long, device=device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        token = sample_next(logits, temperature, top_k, top_p, generator)
        out = torch.cat([out, token[:, None]], dim=1)
        if eos_id is not None:
            done |= token == eos_id
            if bool(done.all()):
                break
        if out.shape[1] == max_new_tokens:
            break
        logits = (step(token) if step else model(token[:, None], cache)[:, -1])[:, :vocab]
    rows = out.tolist()
    if eos_id is not None:
        rows = [row[: row.index(eos_id) + 1] if eos_id in row else row for row in rows]
    return rows


def generate_text(
    model: Decoder,
    tokenizer: Tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    stop: list[str] | tuple[str, ...] = (),
    **sampling: object,
) -> list[str]:
    """Continuations of `prompts`, each cut before the first of the `stop` strings.

    `sampling` goes to `generate` (temperature, top_k, top_p, eos_id, seed).
    """
    encoded = [tokenizer.encode(p).ids for p in prompts]
    texts = [tokenizer.decode(ids) for ids in generate(model, encoded, max_new_tokens, **sampling)]
    return [truncate_at_stop(text, stop) for text in texts]


def truncate_at_stop(text: str, stop: list[str] | tuple[str, ...]) -> str:
    """`text` up to (not including) the earliest occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]
