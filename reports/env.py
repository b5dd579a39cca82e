"""What a run ran on: interpreter, library versions, device, git commit and seed."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "lightning", "torchmetrics", "datasets", "tokenizers", "lm_eval", "peft")


def package_version(name: str) -> str:
    """Installed version of a distribution, or "not installed"."""
    for dist in (name, name.replace("_", "-")):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "not installed"


def torch_version() -> str:
    """`torch.__version__`, build tag included (`2.11.0+cu130`, `2.13.0+cpu`): a wheel's metadata may drop the
    tag (PyPI's CUDA wheels say `2.11.0`), and the tag says which build made the numbers."""
    try:
        import torch  # optional: the environment is described on a machine without torch too
    except ImportError:
        return package_version("torch")
    return str(torch.__version__)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _cuda_version() -> str:
    try:
        import torch  # optional: the environment is described on a machine without torch too
    except ImportError:
        return "none"
    return torch.version.cuda or "none"


def device_description() -> str:
    """CUDA device name and count when CUDA is available, else the CPU model and core count."""
    try:
        import torch  # optional: the environment is described on a machine without torch too

        if torch.cuda.is_available():
            count = torch.cuda.device_count()
            return f"{torch.cuda.get_device_name(0)} × {count}"
    except ImportError:
        pass
    return f"{_cpu_model()} ({os.cpu_count()} cores)"


def git_commit(path: Path = Path(__file__).resolve().parent) -> str:
    """HEAD of the git repository holding `path`, with "-dirty" if it has uncommitted changes.

    `LLM_REPRO_GIT_COMMIT`, where set, names it instead: a copy of the tree on a batch machine may
    lack `.git` or carry a stale one.
    """
    if os.environ.get("LLM_REPRO_GIT_COMMIT"):
        return os.environ["LLM_REPRO_GIT_COMMIT"]

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=path, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        return commit + ("-dirty" if git("status", "--porcelain") else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def collect_env(seed: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run's environment as a flat dict; `extra` (corpus hash, trainer settings) is merged last."""
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        **{name: package_version(name) for name in PACKAGES},
        "torch": torch_version(),
        "cuda": _cuda_version(),
        "device": device_description(),
        "git_commit": git_commit(),
        "seed": seed,
    }
    return {**env, **(extra or {})}
