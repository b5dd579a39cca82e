"""Chat template, instruction records and their encoding with a loss mask on the responses.

A conversation is a list of messages `{"role": "system" | "user" | "assistant", "content": str}`,
rendered as `<|system|>...<|end|><|user|>...<|end|><|assistant|>...<|end|>`; a prompt for
generation ends with `<|assistant|>`. The four tags are special tokens added to the base's BPE.
Training labels are the token ids of each assistant turn's content and its `<|end|>` (so the model
learns to stop) and IGNORE everywhere else: system and user turns, tags, padding.

Records come in the two common formats, from local JSONL / JSON / Parquet or a hub dataset
(`hf:<name>`) through `datasets`: Alpaca (`instruction`, optional `input`, `output`) and chat
(`messages`). A record that is neither, has an empty response or an unknown role raises
`DataFormatError` naming the file and the record.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from datamodules.sources import DataFormatError, load_records
from datamodules.verifiable import GENERATORS, prompt
from modules.nn.decoder import IGNORE

ROLES = ("system", "user", "assistant")
TAGS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
END = "<|end|>"
SPECIAL = (*TAGS.values(), END)
# What each new token's embedding starts from: the mean of these words' token embeddings in the base
# (the end of a turn starts as the base's end of a document, which it already predicts).
INIT_FROM = {"<|system|>": "system", "<|user|>": "user", "<|assistant|>": "assistant", END: "<|endoftext|>"}


def render(messages: Sequence[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """The conversation as text; with `add_generation_prompt`, followed by the assistant's tag."""
    text = "".join(f"{TAGS[m['role']]}{m['content']}{END}" for m in messages)
    return text + (TAGS["assistant"] if add_generation_prompt else "")


def add_chat_tokens(tokenizer: Tokenizer) -> dict[str, int]:
    """Add the template's special tokens to `tokenizer` (in place, once); their ids."""
    tokenizer.add_special_tokens(list(SPECIAL))
    return {token: tokenizer.token_to_id(token) for token in SPECIAL}


def is_chat_tokenizer(tokenizer: Tokenizer) -> bool:
    return all(tokenizer.token_to_id(token) is not None for token in SPECIAL)


def encode(tokenizer: Tokenizer, messages: Sequence[dict[str, str]]) -> tuple[list[int], list[int]]:
    """(ids, labels) of a conversation: labels are the ids on assistant content and its end, IGNORE elsewhere.

    Each turn's content is encoded on its own between the tags, as tokenizing the rendered text
    splits it at the special tokens; text inside a content that looks like a tag stays ordinary bytes.
    """
    ids: list[int] = []
    labels: list[int] = []
    end = tokenizer.token_to_id(END)
    for message in messages:
        content = tokenizer.encode(message["content"]).ids
        tag = tokenizer.token_to_id(TAGS[message["role"]])
        ids += [tag, *content, end]
        if message["role"] == "assistant":
            labels += [IGNORE, *content, end]
        else:
            labels += [IGNORE] * (len(content) + 2)
    return ids, labels


def prompt_ids(tokenizer: Tokenizer, text: str, chat: bool | None = None) -> list[int]:
    """Ids of `text` as a user turn followed by the assistant's tag (chat; default: whether the tokenizer has
    the chat tokens), or as plain text: what a model reads before it answers."""
    if not (is_chat_tokenizer(tokenizer) if chat is None else chat):
        return tokenizer.encode(text).ids
    return encode(tokenizer, [{"role": "user", "content": text}])[0] + [tokenizer.token_to_id(TAGS["assistant"])]


def to_messages(record: dict[str, Any], where: str) -> list[dict[str, str]]:
    """One record (Alpaca or chat format) as messages; `where` names it in errors (file and record)."""
    record = {k: v for k, v in record.items() if v is not None}  # `datasets` fills columns other records have with None
    if "messages" in record and record["messages"] is not None:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataFormatError(f"{where}: `messages` must be a non-empty list of {{role, content}}")
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise DataFormatError(f"{where}: message {i} needs a role in {ROLES} and a string content, got {m!r}")
            out.append({"role": m["role"], "content": m["content"]})
        if out[-1]["role"] != "assistant" or not out[-1]["content"].strip():
            raise DataFormatError(f"{where}: the last message must be a non-empty assistant response")
        return out
    if "instruction" in record or "output" in record:
        for key in ("instruction", "output"):
            if not isinstance(record.get(key), str) or not record[key].strip():
                raise DataFormatError(f"{where}: Alpaca record needs a non-empty `{key}`")
        user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
        return [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
    raise DataFormatError(
        f"{where}: not an instruction record; expected `messages` (chat) or `instruction` + `output` (Alpaca), "
        f"got fields {sorted(record)}"
    )


def read_records(source: str, split: str = "train", cache_dir: Path | None = None) -> list[list[dict[str, str]]]:
    """Conversations from a local .jsonl / .json / .parquet file or `hf:<name>`, through `datasets`."""
    return [to_messages(record, where) for record, where in load_records(source, split, cache_dir, "instruction")]


def verifiable_conversations(
    families: Iterable[str], n: int, seed: int, held_out: dict[str, list[dict]]
) -> dict[str, list[list[dict[str, str]]]]:
    """Training conversations for the verifiable task families, `n` per family, none of whose questions
    is among `held_out`'s (the evaluation rows): the user asks "Q: <question>\\nA:", the assistant answers."""
    out = {}
    for family in families:
        if family not in GENERATORS or family == "arithmetic_mc":
            raise DataFormatError(f"data.families: unknown family {family!r}; choose from "
                                  f"{sorted(k for k in GENERATORS if k != 'arithmetic_mc')}")
        seen = {row["question"] for row in held_out.get(family, [])}
        rows, extra = [], 0
        while len(rows) < n and extra < 8:
            for row in GENERATORS[family](2 * n, seed + 1000 * (extra + 1)):
                if row["question"] not in seen and len(rows) < n:
                    seen.add(row["question"])
                    rows.append(row)
            extra += 1
        out[family] = [[{"role": "user", "content": prompt(r["question"])}, {"role": "assistant", "content": r["answer"]}]
                       for r in rows]
    return out
