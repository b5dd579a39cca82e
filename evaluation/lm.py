"""The lm-eval adapter: a suite checkpoint as an lm-eval `TemplateLM`, registered as `llm-repro`.

Importing this module registers the model; `python -m evaluation` is lm-eval's own command line
with it imported, and `lm_eval.simple_evaluate(model="llm-repro", ...)` works after the import.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from datamodules.chat import END, is_chat_tokenizer, render
from datamodules.tokenizer import EOT_ID  # <|endoftext|>: separates documents in training; the model has no BOS
from modules.decoding.engine import Engines
from modules.decoding.generation import generate, truncate_at_stop
from repro.checkpoints import load_model

log = logging.getLogger(__name__)


def resolve_device(device: str | None) -> torch.device:
    """`device`, or CUDA when there is one; a CUDA device on a machine without one falls back to the CPU
    (lm-eval's command line asks for `cuda:0` unless told otherwise)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        log.warning("device %s requested but CUDA is not available; using the CPU", device)
        return torch.device("cpu")
    return torch.device(device)


@register_model("llm-repro")
class ReproLM(TemplateLM):
    """A run folder's decoder and tokenizer behind lm-eval's three request types.

    Scores depend slightly on `batch_size` (rows are padded to the longest in a batch, which changes
    the floating-point reduction order), so `get_model_info` reports it with the results.
    """

    def __init__(
        self,
        checkpoint: str,
        device: str | None = None,
        batch_size: int | str = 16,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        max_batch_size: int | None = None,
        arm: str | None = None,
        model: Any = None,
        tokenizer: Any = None,
    ) -> None:
        """`model` and `tokenizer` (both or neither) score a decoder held in memory (a quantized copy, say)
        instead of loading `checkpoint`'s; the checkpoint still names the run whose held-out data the tasks read."""
        super().__init__()
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(f"llm-repro: batch_size must be a positive integer, got {batch_size!r} ('auto' is not supported)")
        if (model is None) != (tokenizer is None):
            raise ValueError("llm-repro: give both model and tokenizer, or neither")
        self._device = resolve_device(device)
        # `self.tokenizer` is read by lm-eval as a HF tokenizer, hence `bpe`
        if model is None:
            self.model, self.bpe = load_model(checkpoint, self._device, arm or None)
        else:
            self.model, self.bpe = model.to(self._device).eval(), tokenizer
        self.arm = arm
        self.engines = Engines(self.model)  # generate_until's batches reuse each captured shape
        # A chat model (SFT) reads its template's tags as special tokens, as `datamodules.chat.encode` wrote
        # them, and ends a turn with <|end|>. Otherwise, as in pretraining, "<|endoftext|>" in a text is bytes.
        self.chat = is_chat_tokenizer(self.bpe)
        self.bpe.encode_special_tokens = not self.chat
        self.stop_id = self.bpe.token_to_id(END) if self.chat else EOT_ID
        self.checkpoint = str(checkpoint)
        self.batch_size = int(batch_size)
        block_size = self.model.config.block_size
        self.max_length = min(int(max_length), block_size) if max_length else block_size
        self.max_gen_toks = int(max_gen_toks)
        self.vocab_size = self.model.config.vocab_size  # logits past it are padding of the embedding table

    @property
    def eot_token_id(self) -> int:
        return EOT_ID

    @property
    def tokenizer_name(self) -> str:
        return "llm-repro-chat" if self.chat else "llm-repro"

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """lm-eval's messages through the suite's chat template (`datamodules.chat.render`)."""
        if not self.chat:
            raise ValueError(f"{self.checkpoint}: this model has no chat template (its tokenizer lacks the chat tokens)")
        return render(chat_history, add_generation_prompt=add_generation_prompt)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.bpe.encode(string).ids

    def tok_decode(self, tokens: list[int]) -> str:
        return self.bpe.decode(tokens)

    def get_model_info(self) -> dict[str, Any]:
        """Merged into lm-eval's `results["config"]`."""
        return {
            "checkpoint": self.checkpoint,
            "arm": self.arm,
            "chat_template": self.chat,
            "model_batch_size": self.batch_size,
            "max_length": self.max_length,
            "model_num_parameters": self.model.num_params(),
            "model_dtype": str(next(self.model.parameters()).dtype),
        }

    @torch.no_grad()
    def _log_probs(self, rows: list[list[int]]) -> torch.Tensor:
        """Next-token log-probabilities (B, T, vocab_size), float32, for rows right-padded to the longest T."""
        T = max(len(r) for r in rows)
        idx = torch.full((len(rows), T), EOT_ID, dtype=torch.long, device=self._device)  # causal: padding after a row never reaches it
        for i, row in enumerate(rows):
            idx[i, : len(row)] = torch.tensor(row, device=self._device)
        return self.model(idx)[..., : self.vocab_size].float().log_softmax(-1)

    def _loglikelihood_tokens(
        self, requests: list[tuple[tuple[str, str] | None, list[int], list[int]]], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        """(log p(continuation | context), whether greedy decoding gives the continuation) per request.

        Each (context, continuation) is cut from the left to the last `max_length + 1` tokens; the
        model reads all but the last token. Longest requests go first, as in lm-eval's own models.
        """
        collator = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])))
        answers = []
        for chunk in collator.get_batched(n=self.batch_size):
            inputs = []
            for _, context, continuation in chunk:
                if not 0 < len(continuation) <= self.max_length:
                    raise ValueError(f"llm-repro: a continuation of {len(continuation)} tokens does not fit max_length {self.max_length}")
                inputs.append((context + continuation)[-(self.max_length + 1) :][:-1])
            log_probs = self._log_probs(inputs)  # (B, T, vocab)
            for (request, _, continuation), row, lp in zip(chunk, inputs, log_probs):
                lp = lp[len(row) - len(continuation) : len(row)]  # (n, vocab): the positions that predict the continuation
                target = torch.tensor(continuation, device=lp.device)
                answer = (float(lp.gather(-1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all()))
                answers.append(answer)
                if request is not None:
                    self.cache_hook.add_partial("loglikelihood", request, answer)
        return collator.get_original(answers)

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """log p(text) of whole texts, each scored from an EOT prefix in disjoint windows of `max_length`."""
        windows, owner = [], []
        for i, (text,) in enumerate(r.args for r in requests):
            tokens = self.tok_encode(text)
            for context, continuation in map(
                make_disjoint_window, get_rolling_token_windows(tokens, self.prefix_token_id, self.max_length, context_len=1)
            ):
                windows.append((None, context, continuation))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (log_prob, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm=True)):
            totals[i] += log_prob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Continuations of each context, cut before the first `until` string, through the KV-cache generator.

        Requests are batched by identical generation settings, longest context first. A context is
        cut from the left so that it and `max_gen_toks` new tokens fit `max_length`.
        """
        collator = Collator(
            [r.args for r in requests],
            sort_fn=lambda r: (-len(self.tok_encode(r[0])), r[0]),
            group_fn=lambda r: r[1],
            group_by="gen_kwargs",
        )
        answers = []
        for chunk in collator.get_batched(n=self.batch_size):
            settings = sampling_settings(chunk[0][1], self.max_gen_toks)
            until = settings.pop("until")
            max_new = min(settings.pop("max_gen_toks"), self.max_length - 1)
            prompts = [self.tok_encode(context)[-(self.max_length - max_new) :] or [EOT_ID] for context, _ in chunk]
            outputs = generate(self.model, prompts, max_new, eos_id=self.stop_id, engines=self.engines, **settings)
            for (context, gen_kwargs), ids in zip(chunk, outputs):
                text = truncate_at_stop(self.tok_decode([i for i in ids if i != self.stop_id]), until)
                answers.append(text)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return collator.get_original(answers)


def sampling_settings(gen_kwargs: dict[str, Any], default_max_gen_toks: int) -> dict[str, Any]:
    """lm-eval's generation kwargs as `until`, `max_gen_toks` and `generate`'s temperature/top_k/top_p.

    Greedy unless `do_sample` is true or a positive temperature is given without `do_sample: false`.
    """
    kwargs = dict(gen_kwargs)
    until = kwargs.pop("until", None) or []
    settings: dict[str, Any] = {
        "until": [until] if isinstance(until, str) else list(until),
        "max_gen_toks": int(kwargs.pop("max_gen_toks", default_max_gen_toks)),
        "top_k": kwargs.pop("top_k", None),
        "top_p": kwargs.pop("top_p", None),
    }
    do_sample, temperature = kwargs.pop("do_sample", None), float(kwargs.pop("temperature", 0.0))
    if do_sample is False:
        temperature = 0.0
    elif do_sample and temperature == 0.0:
        temperature = 1.0
    settings["temperature"] = temperature
    if kwargs:
        log.warning("llm-repro: ignoring generation kwargs %s", sorted(kwargs))
    return settings
