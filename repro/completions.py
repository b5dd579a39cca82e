"""OpenAI's /v1/completions for one of our decoders: the request checked, the response generated.

`Completions.parse` turns a JSON body into a `CompletionRequest` or raises a `RequestError` that
carries the HTTP status and OpenAI's error fields; `complete` answers with every prompt generated
in one batch by `generate`; `stream` yields the chunks of a streamed answer, token by token, whose
texts join into the text `complete` returns. Transport-free: `repro/serve.py` puts it on HTTP.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from tokenizers import Tokenizer

from datamodules.chat import END, is_chat_tokenizer
from datamodules.tokenizer import EOT
from modules.decoding.engine import Engines
from modules.decoding.generation import decode, generate, truncate_at_stop
from modules.nn import Decoder

MAX_PROMPTS = 64  # prompts in one request, generated as one batch
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
# OpenAI fields this server does not implement: accepted at their neutral value, refused otherwise
NEUTRAL = {"echo": False, "logprobs": None, "best_of": 1, "frequency_penalty": 0, "presence_penalty": 0,
           "suffix": "", "logit_bias": {}}
FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "n", "stream",
          "stream_options", "user", *NEUTRAL}


class RequestError(Exception):
    """A request the server refuses: its HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        kind = "server_error" if self.status >= 500 else "invalid_request_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class CompletionRequest:
    """A checked /v1/completions request: prompts as token ids, sampling settings as `generate` takes them."""

    prompts: list[list[int]]
    max_tokens: int
    temperature: float
    top_p: float | None  # None: no nucleus cut (OpenAI's top_p 1)
    top_k: int | None
    stop: tuple[str, ...]
    seed: int | None
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the token counts


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _optional(body: dict, name: str, check: Any, expected: str, default: Any) -> Any:
    """body[name], or `default` when absent or null; 400 unless `check(value)`."""
    value = body.get(name)
    if value is None:
        return default
    if not check(value):
        raise RequestError(400, f"`{name}` must be {expected}; got {json.dumps(value)[:200]}", name, "invalid_value")
    return value


class Completions:
    """The model behind the endpoint: checks requests, generates whole completions or streams them."""

    def __init__(self, model: Decoder, tokenizer: Tokenizer, name: str, max_prompts: int = MAX_PROMPTS) -> None:
        self.model, self.tokenizer, self.name, self.max_prompts = model, tokenizer, name, max_prompts
        self.block_size, self.vocab_size = model.config.block_size, model.config.vocab_size
        # a completion ends at the token that ends a document (a chat model's: the end of its turn)
        self.stop_id = tokenizer.token_to_id(END if is_chat_tokenizer(tokenizer) else EOT)
        self.lock = threading.Lock()  # one generation at a time on the model
        self.engines = Engines(model)  # each batch size and cache length captured once, reused by later requests

    def parse(self, body: Any) -> CompletionRequest:
        """A checked request from the JSON body; RequestError (400, or 404 for another model) otherwise."""
        if not isinstance(body, dict):
            raise RequestError(400, "the body must be a JSON object")
        for name in body:
            if name not in FIELDS:
                raise RequestError(400, f"unknown field `{name}`; this server reads {', '.join(sorted(FIELDS))}",
                                   name, "unknown_field")
        for name, neutral in NEUTRAL.items():
            value = body.get(name)
            if value is not None and (isinstance(value, bool) != isinstance(neutral, bool) or value != neutral):
                raise RequestError(400, f"`{name}` is not supported by this server (only {json.dumps(neutral)})",
                                   name, "unsupported_value")
        _optional(body, "user", lambda v: isinstance(v, str), "a string", None)
        model = _optional(body, "model", lambda v: isinstance(v, str), "a string", self.name)
        if model != self.name:
            raise RequestError(404, f"model `{model}` is not served here; this server serves `{self.name}`",
                               "model", "model_not_found")
        if _optional(body, "n", _is_int, "an integer", 1) != 1:
            raise RequestError(400, "only n=1 is supported: one completion per prompt", "n", "unsupported_value")
        temperature = _optional(body, "temperature", lambda v: _is_number(v) and 0 <= v <= 2,
                                "a number from 0 (greedy) to 2", 1.0)
        top_p = _optional(body, "top_p", lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]", 1.0)
        top_k = _optional(body, "top_k", lambda v: _is_int(v) and v >= 1, "a positive integer", None)
        seed = _optional(body, "seed", lambda v: _is_int(v) and 0 <= v < 2**64, "an integer in [0, 2**64)", None)
        stream = _optional(body, "stream", lambda v: isinstance(v, bool), "true or false", False)
        options = _optional(body, "stream_options", lambda v: isinstance(v, dict) and set(v) <= {"include_usage"}
                            and isinstance(v.get("include_usage", False), bool), '{"include_usage": bool}', {})
        stop = _optional(body, "stop", lambda v: isinstance(v, str) or isinstance(v, list)
                         and all(isinstance(s, str) for s in v), "a string or a list of strings", [])
        prompts = self._prompts(body.get("prompt"))
        longest = max(map(len, prompts))
        if longest >= self.block_size:
            raise RequestError(400, f"a prompt of {longest} tokens leaves no room to generate in the model's context "
                               f"of {self.block_size} tokens", "prompt", "context_length_exceeded")
        room = self.block_size - longest
        max_tokens = _optional(body, "max_tokens", lambda v: _is_int(v) and v >= 1, "a positive integer",
                               min(DEFAULT_MAX_TOKENS, room))
        if max_tokens > room:
            raise RequestError(400, f"max_tokens {max_tokens} + {longest} prompt tokens exceed the model's context of "
                               f"{self.block_size} tokens: ask for at most {room}", "max_tokens",
                               "context_length_exceeded")
        return CompletionRequest(
            prompts=prompts, max_tokens=max_tokens, temperature=float(temperature),
            top_p=None if top_p == 1 else float(top_p), top_k=top_k,
            stop=(stop,) if isinstance(stop, str) else tuple(stop), seed=seed, stream=stream,
            include_usage=options.get("include_usage", False),
        )

    def _prompts(self, value: Any) -> list[list[int]]:
        """Token ids of each prompt: a string, a list of strings, a list of token ids, or a list of such lists."""
        if value is None:
            raise RequestError(400, "`prompt` is required", "prompt", "missing_field")
        if isinstance(value, str):
            value = [value]
        elif isinstance(value, list) and value and all(map(_is_int, value)):
            value = [value]
        if not (isinstance(value, list) and value and all(
                isinstance(p, str) or isinstance(p, list) and all(map(_is_int, p)) for p in value)):
            raise RequestError(400, "`prompt` must be a non-empty string, a list of strings, a list of token ids "
                               f"or a list of such lists; got {json.dumps(value)[:200]}", "prompt", "invalid_value")
        if len(value) > self.max_prompts:
            raise RequestError(400, f"{len(value)} prompts in one request; at most {self.max_prompts}", "prompt",
                               "invalid_value")
        prompts = [self.tokenizer.encode(p).ids if isinstance(p, str) else p for p in value]
        for i, ids in enumerate(prompts):
            if not ids:
                raise RequestError(400, f"prompt {i} is empty: there is nothing to continue", "prompt", "empty_prompt")
            if not all(0 <= t < self.vocab_size for t in ids):
                raise RequestError(400, f"prompt {i} has token ids outside the vocabulary [0, {self.vocab_size})",
                                   "prompt", "invalid_value")
        return prompts

    def complete(self, request: CompletionRequest) -> dict[str, Any]:
        """The response to a request without `stream`: every prompt generated in one batch."""
        with self.lock, torch.inference_mode():
            rows = generate(self.model, request.prompts, request.max_tokens, eos_id=self.stop_id, engines=self.engines,
                            **_sampling(request))
        choices = []
        for index, ids in enumerate(rows):
            text = self.tokenizer.decode(ids)
            kept = truncate_at_stop(text, request.stop)
            finish = "stop" if len(kept) < len(text) or ids[-1] == self.stop_id else "length"
            choices.append({"text": kept, "index": index, "finish_reason": finish, "logprobs": None})
        usage = _usage(sum(map(len, request.prompts)), sum(map(len, rows)))
        return {**self._header(), "choices": choices, "usage": usage}

    def stream(self, request: CompletionRequest) -> Iterator[dict[str, Any]]:
        """The chunks of a streamed response: the text each token settles, prompt after prompt, then the
        finish reason; their texts joined are the text `complete` returns. Holds the model until closed."""
        header, completion_tokens = self._header(), 0
        with self.lock, torch.inference_mode():
            for index, prompt in enumerate(request.prompts):
                ids, sent, finish = [], "", "length"
                for token in stream_tokens(self.model, prompt, request.max_tokens, eos_id=self.stop_id,
                                           engines=self.engines, **_sampling(request)):
                    ids.append(token)
                    text = self.tokenizer.decode(ids)
                    if token == self.stop_id or len(truncate_at_stop(text, request.stop)) < len(text):
                        finish = "stop"
                        break
                    settled = settled_length(text, request.stop)
                    if settled > len(sent):
                        yield _chunk(header, index, text[len(sent) : settled], None)
                        sent = text[:settled]
                rest = truncate_at_stop(self.tokenizer.decode(ids), request.stop)[len(sent) :]
                yield _chunk(header, index, rest, finish)
                completion_tokens += len(ids)
        if request.include_usage:
            yield {**header, "choices": [], "usage": _usage(sum(map(len, request.prompts)), completion_tokens)}

    def _header(self) -> dict[str, Any]:
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.name}


def _sampling(request: CompletionRequest) -> dict[str, Any]:
    return {"temperature": request.temperature, "top_k": request.top_k, "top_p": request.top_p, "seed": request.seed}


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _chunk(header: dict[str, Any], index: int, text: str, finish: str | None) -> dict[str, Any]:
    return {**header, "choices": [{"text": text, "index": index, "finish_reason": finish, "logprobs": None}]}


@torch.no_grad()
def stream_tokens(
    model: Decoder,
    prompt: list[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    seed: int | None = None,
    engines: Engines | None = None,
) -> Iterator[int]:
    """The tokens `generate(model, [prompt], ...)` returns, yielded as each is sampled.

    The same steps on the same engine as `generate` for a batch of one (a prefill, then one cached
    position per token, one generator seeded once), so the same seed draws the same tokens.
    """
    engine = (engines or Engines(model)).get(1, len(prompt) + max_new_tokens)
    for token in decode(engine, [prompt], max_new_tokens, temperature, top_k, top_p, eos_id, seed, check_every=1):
        yield int(token)
        if int(token) == eos_id:
            return


def settled_length(text: str, stop: tuple[str, ...]) -> int:
    """How much of `text`, a completion so far, no later token can change.

    Byte-level BPE decodes a character whose bytes are not all generated yet as U+FFFD, and the
    end of `text` may be the start of a stop string, which cuts the text there if it completes.
    """
    end = len(text.rstrip("\ufffd"))
    start_of_stop = max((k for s in stop for k in range(1, len(s)) if text[:end].endswith(s[:k])), default=0)
    return end - start_of_stop
