"""Shared fixtures: a small real-text corpus and tiny run settings."""

from __future__ import annotations

import sysconfig
from collections.abc import Iterator
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
    """A 2-layer GPT on the small corpus: a dozen steps in a few seconds (the golden trajectories'
    shrunk preset, validated and checkpointed every few steps)."""
    from repro.golden import SHRINK  # the runner's stack (lightning, seconds to import): only tests that train need it

    return [
        f"data.source={text_corpus}",
        f"data.cache_dir={tmp_path / 'cache'}",
        *SHRINK,
        "data.vocab_size=320",
        "train.val_batches=4",
        "train.checkpoint_every=4",
        "train.speed_window=2",
    ]


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Torch on one thread for a module's tests (`pytestmark = pytest.mark.usefixtures("one_thread")`): models this
    small run faster on one thread, and far steadier on a shared CPU, where a thread pool waits on busy cores."""
    import torch  # here, not at the top: a test that needs no torch (tests/test_layers.py) starts in well under a second

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
