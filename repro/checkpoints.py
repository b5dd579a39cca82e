"""Load what a run wrote, for inference and evaluation: the model and its tokenizer.

A checkpoint names the LightningModule class that loads it (`MODULE_CLASS`, written by the trainer's checkpoint
callback), so loading needs no technique registry: the loader sits below evaluation, the techniques and the runner
(notes/layers.md). Only a class of the suite's own `modules` package is imported. A checkpoint written before
checkpoints named their class is loaded by its run's technique (`run.json`), through `BEFORE_NAMING`; one that names
its class where it lived before `modules/` was split by what the code is, through `MOVED`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pickle
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import lightning as L
import torch
from tokenizers import Tokenizer

from modules.nn import Decoder
from repro.config import ConfigError

Module = TypeVar("Module", bound=L.LightningModule)
MODULE_CLASS = "module_class"  # the checkpoint's key for its module class, by import path: "modules.training.sft.SFTModule"
CLASS_PATH = re.compile(r"modules(\.[A-Za-z_]\w*)+")  # the only classes a checkpoint may name
# the module class of each technique's runs from before checkpoints named theirs; a checkpoint written since names its
# own, so a new technique adds nothing here
BEFORE_NAMING = {
    "architectures": "modules.training.architectures.ArchitecturesModule",
    "data": "modules.training.corpus_arms.CorpusArmsModule",
    "deepseek-v3": "modules.training.mtp.MTPModule",
    "diff-attn": "modules.training.architectures.ArchitecturesModule",
    "dpo": "modules.training.dpo.DPOModule",
    "hybrid": "modules.training.hybrid.HybridModule",
    "inference": "modules.training.inference.InferenceModule",
    "memory": "modules.training.pretrain.PretrainModule",
    "moe": "modules.training.moe.MoEModule",
    "mtp": "modules.training.mtp.MTPModule",
    "nsa": "modules.training.architectures.ArchitecturesModule",
    "pretrain": "modules.training.pretrain.PretrainModule",
    "reward": "modules.training.reward.RewardModule",
    "rlhf": "modules.training.ppo.PPOModule",
    "sft": "modules.training.sft.SFTModule",
}
# each module class by the path checkpoints named it at before modules/ was split into nn, parallel, decoding and
# training (the module classes moved to modules/training/): a checkpoint written before names the old path. A closed
# table, as BEFORE_NAMING is: a class written since is named where it lives
MOVED = {
    "modules.architectures.ArchitecturesModule": "modules.training.architectures.ArchitecturesModule",
    "modules.corpus_arms.CorpusArmsModule": "modules.training.corpus_arms.CorpusArmsModule",
    "modules.dpo.DPOModule": "modules.training.dpo.DPOModule",
    "modules.hybrid.HybridModule": "modules.training.hybrid.HybridModule",
    "modules.inference.InferenceModule": "modules.training.inference.InferenceModule",
    "modules.moe.MoEModule": "modules.training.moe.MoEModule",
    "modules.mtp.MTPModule": "modules.training.mtp.MTPModule",
    "modules.ppo.PPOModule": "modules.training.ppo.PPOModule",
    "modules.pretrain.PretrainModule": "modules.training.pretrain.PretrainModule",
    "modules.reward.RewardModule": "modules.training.reward.RewardModule",
    "modules.sft.SFTModule": "modules.training.sft.SFTModule",
}


def locate(path: str | Path) -> tuple[Path, Path]:
    """(checkpoint, run folder) for a run folder (its final, else last checkpoint) or a .ckpt inside one."""
    path = Path(path)
    if path.suffix == ".ckpt":
        if not path.is_file():
            raise ConfigError(f"--checkpoint {path}: no such checkpoint")
        return path, path.parent.parent
    for name in ("final.ckpt", "last.ckpt"):
        if (path / "checkpoints" / name).is_file():
            return path / "checkpoints" / name, path
    raise ConfigError(f"--checkpoint {path}: not a run folder with checkpoints/final.ckpt or last.ckpt")


def run_folder_argument(text: str) -> str:
    """An argparse `type` for `--checkpoint`: the text, once `locate` finds a run there (else a usage error)."""
    try:
        locate(text)
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error).removeprefix("--checkpoint ")) from None
    return text


@contextmanager
def weights_only(checkpoint: str | Path) -> Iterator[None]:
    """Torch's weights-only unpickler refusing `checkpoint` (it names a class or function, which a pickle may
    call on load) as one ConfigError line: a run folder is shared and downloaded, and loading one never runs it."""
    try:
        yield
    except pickle.UnpicklingError as err:
        named = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        raise ConfigError(f"{checkpoint}: refused to load: it holds objects other than tensors and plain data "
                          f"(weights-only loading{f'; it names {named.group(1)}' if named else ''}); "
                          "a checkpoint is data, and loading one never runs code") from err


def check_weights_only(checkpoint: str | Path) -> Path:
    """`checkpoint`, once torch's weights-only unpickler reads it (its tensors memory-mapped, not read); else ConfigError."""
    with weights_only(checkpoint):
        torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    return Path(checkpoint)


def class_path(module: type[L.LightningModule]) -> str:
    """What a checkpoint of `module` names under MODULE_CLASS: its import path."""
    return f"{module.__module__}.{module.__qualname__}"


def module_class(checkpoint: str | Path, technique: str | None = None) -> type[L.LightningModule]:
    """The LightningModule class that loads `checkpoint`: the one it names, else (a checkpoint from before they named
    it) `technique`'s; read weights-only, and imported only from the suite's `modules` package (else ConfigError)."""
    with weights_only(checkpoint):
        named = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True).get(MODULE_CLASS)
    path = named or BEFORE_NAMING.get(technique)
    if path is None:
        raise ConfigError(f"{checkpoint}: the checkpoint names no module class ({MODULE_CLASS}) and its run's technique "
                          f"{technique!r} has none from before checkpoints named theirs")
    if not isinstance(path, str) or not CLASS_PATH.fullmatch(path):
        raise ConfigError(f"{checkpoint}: refused to load: it names module class {path!r}, outside the suite's modules package")
    module_path, _, name = MOVED.get(path, path).rpartition(".")
    try:
        found = getattr(importlib.import_module(module_path), name, None)
    except ImportError as err:
        raise ConfigError(f"{checkpoint}: names module class {path}, which does not import here: {err}") from err
    if not (isinstance(found, type) and issubclass(found, L.LightningModule)):
        raise ConfigError(f"{checkpoint}: names module class {path}, which is no LightningModule of this suite")
    return found


def load_module(module: type[Module], checkpoint: str | Path, device: str | torch.device = "cpu") -> Module:
    """`module.load_from_checkpoint` through torch's weights-only unpickler: tensors and plain data only
    (hyperparameters are dicts of primitives); anything else is refused with one ConfigError line."""
    with weights_only(checkpoint):
        return module.load_from_checkpoint(checkpoint, map_location=device, weights_only=True)


def load_model(path: str | Path, device: str | torch.device = "cpu", arm: str | None = None) -> tuple[Decoder, Tokenizer]:
    """The decoder (eval mode, on `device`) and the tokenizer of a run folder or checkpoint.

    `arm` picks one of several models a run trained side by side (SFT's "full" and "lora"), through
    the module's `arm_model(arm)`; None is the run's main model.
    """
    checkpoint, run_dir = locate(path)
    run_json, tokenizer_json = run_dir / "run.json", run_dir / "tokenizer.json"
    if not run_json.is_file() or not tokenizer_json.is_file():
        raise ConfigError(f"{run_dir}: a run folder needs run.json and tokenizer.json beside checkpoints/")
    technique = json.loads(run_json.read_text())["technique"]
    module = load_module(module_class(checkpoint, technique), checkpoint, device)
    if arm is not None:
        if not hasattr(module, "arm_model"):
            raise ConfigError(f"{run_dir}: a {technique} run has one model; drop arm={arm}")
        try:
            model = module.arm_model(arm)
        except ValueError as err:
            raise ConfigError(f"{run_dir}: {err}") from err
    else:
        model = module.model
    return model.eval(), Tokenizer.from_file(str(tokenizer_json))
