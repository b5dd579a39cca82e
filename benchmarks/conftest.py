"""Benchmark session settings: versions and thread count in the JSON's machine_info, a calibration
beside every case that does not interleave its own, and a small corpus for the training steps."""

from __future__ import annotations

import os
import statistics
from pathlib import Path

import lightning as L
import pytest
import pytest_benchmark
import torch

from benchmarks.calibration import DESCRIPTION, calibrate
from benchmarks.train_step import write_sample_corpus


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    machine_info["versions"] = {"torch": torch.__version__, "lightning": L.__version__,
                                "pytest-benchmark": pytest_benchmark.__version__}
    machine_info["torch_threads"] = torch.get_num_threads()  # normalised figures compare only at equal counts
    machine_info["calibration"] = DESCRIPTION
    if torch.cuda.is_available():
        machine_info["cuda_device"] = torch.cuda.get_device_name()


@pytest.fixture(autouse=True)
def calibration_beside(request: pytest.FixtureRequest):
    """Time the calibration just before and just after a benchmark case and record the median as
    `extra_info["calibration_s"]`, unless the case measured its own between its steps."""
    if "benchmark" not in request.fixturenames:
        yield
        return
    benchmark = request.getfixturevalue("benchmark")
    before = calibrate(blocks=3)
    yield
    if "calibration_s" not in benchmark.extra_info:
        benchmark.extra_info["calibration_s"] = statistics.median([before, calibrate(blocks=3)])
        benchmark.extra_info["calibration"] = "before and after"


@pytest.fixture(scope="session")
def sample_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sample_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Data caches and prerequisite stages, shared by the cases of one session."""
    return tmp_path_factory.mktemp("shared")


def pytest_benchmark_update_commit_info(config: pytest.Config, commit_info: dict) -> None:
    """Where the tree is a copy without its own .git (a lent GPU machine), `LLM_REPRO_GIT_COMMIT` names it."""
    commit = os.environ.get("LLM_REPRO_GIT_COMMIT")
    if commit:
        commit_info["id"] = commit
        commit_info["source"] = "LLM_REPRO_GIT_COMMIT"
