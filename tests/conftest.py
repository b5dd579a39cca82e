"""Shared fixtures: a small real-text corpus and tiny run settings."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 200 KB of real prose-and-code documents as .txt files (stdlib modules)."""
    folder = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ["argparse", "calendar", "colorsys", "csv", "difflib", "fractions", "textwrap", "string", "shlex", "heapq", "bisect", "fnmatch"]:
        (folder / f"{name}.txt").write_text((stdlib / f"{name}.py").read_text(encoding="utf-8"))
    return folder


@pytest.fixture
def tiny_overrides(text_corpus: Path, tmp_path: Path) -> list[str]:
    """A 2-layer GPT on the small corpus: a dozen steps in a few seconds."""
    return [
        f"data.source={text_corpus}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.vocab_size=320",
        "data.batch_size=8",
        "model.block_size=32",
        "model.n_layer=2",
        "model.n_head=2",
        "model.n_embd=32",
        "optim.warmup_steps=2",
        "optim.lr=1e-2",
        "train.max_steps=12",
        "train.val_every=6",
        "train.val_batches=4",
        "train.checkpoint_every=4",
        "train.speed_window=2",
        "eval.enabled=false",  # lm-eval adds seconds per run; tests that want it turn it on
    ]
