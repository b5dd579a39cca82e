"""Shared fixtures: a small real-text corpus and tiny run settings."""

from __future__ import annotations

import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import pytest

# Under xdist each worker gets its share of the cores, for torch's pool and the processes its tests start: set
# before any test module imports torch. Left alone, 14 workers of 16 threads each on a 16-core GPU host spend the
# run waiting on each other (the GPU suite ran at a tenth of its CPU speed).
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_name, str(max(1, (os.cpu_count() or 1) // _workers)))


@pytest.fixture(autouse=True)
def _float32_matmul_precision() -> Iterator[None]:
    """Each test starts with full float32 matmuls and leaves them so: a run through the trainer switches
    the process to TF32 (`set_float32_matmul_precision("high")`), which, left on, moves a later test's
    float32 CUDA result against its float64 reference by 1e-3 (which tests that is depends on xdist's order)."""
    import torch

    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(saved[0])
    torch.backends.cudnn.allow_tf32 = saved[1]


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
