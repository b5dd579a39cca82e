"""Try a trained model: `python repro/generate.py --checkpoint RUN_OR_CKPT --prompt "def main("`."""

from __future__ import annotations

import sys
from argparse import ArgumentError
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from jsonargparse import ArgumentParser

from modules.decoding.generation import generate_text
from repro.checkpoints import load_model
from repro.config import ConfigError


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="repro/generate.py", description=__doc__, exit_on_error=False)
    p.add_argument("--checkpoint", type=str, required=True, help="run folder (final, else last checkpoint) or a .ckpt")
    p.add_argument("--prompt", type=str, action="append", required=True, help="a prompt; repeat for a batch")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--stop", type=str, action="append", default=[], help="stop string; repeatable")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
        model, tokenizer = load_model(args.checkpoint, args.device)
    except (ConfigError, ArgumentError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    texts = generate_text(
        model, tokenizer, args.prompt, args.max_new_tokens, args.stop,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
    )
    for prompt, text in zip(args.prompt, texts):
        print(f"{prompt}{text}")
        print("-" * 40)
    return 0


if __name__ == "__main__":
    sys.exit(main())
