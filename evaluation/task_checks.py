"""Check task names and task YAML before any model is loaded, with errors that say what to fix.

lm-eval skips a YAML it cannot index without a word, and a task missing a field fails deep inside
a run; these checks turn both into one line naming the file, the task and the missing fields.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from lm_eval.tasks import TaskManager
from lm_eval.tasks._index import Kind
from lm_eval.tasks._yaml_loader import load_yaml

from repro.config import ConfigError

# Fields a task needs besides a dataset (dataset_path or custom_dataset) and an evaluation split.
REQUIRED_BY_OUTPUT_TYPE = {
    "loglikelihood": ("doc_to_text", "doc_to_target"),
    "loglikelihood_rolling": ("doc_to_target",),
    "multiple_choice": ("doc_to_text", "doc_to_target", "doc_to_choice"),
    "generate_until": ("doc_to_text", "doc_to_target"),
}


class TaskConfigError(ConfigError):
    """An unknown task, or a task YAML that lacks a field lm-eval needs."""


def missing_fields(config: dict[str, Any]) -> list[str]:
    """The fields `config` (one task's YAML, includes merged) lacks; empty when it is complete."""
    missing = [] if "task" in config else ["task"]
    if not (config.get("dataset_path") or config.get("custom_dataset")):
        missing.append("dataset_path (or custom_dataset)")
    if not (config.get("test_split") or config.get("validation_split")):
        missing.append("test_split (or validation_split)")
    output_type = config.get("output_type", "generate_until")  # lm-eval's default
    if output_type not in REQUIRED_BY_OUTPUT_TYPE:
        return [*missing, f"a valid output_type (got {output_type!r}; one of {', '.join(REQUIRED_BY_OUTPUT_TYPE)})"]
    return missing + [name for name in REQUIRED_BY_OUTPUT_TYPE[output_type] if name not in config]


def check_task_config(config: dict[str, Any], source: str) -> None:
    """Raise TaskConfigError naming `source` and the missing fields, if any."""
    missing = missing_fields(config)
    if missing:
        output_type = config.get("output_type", "generate_until")
        raise TaskConfigError(
            f"task {config.get('task', '?')!r} ({source}) is missing required field(s): {', '.join(missing)}. "
            f"A {output_type} task needs task, dataset_path or custom_dataset, test_split or validation_split, "
            f"{', '.join(REQUIRED_BY_OUTPUT_TYPE.get(output_type, ()))}"
        )


def check_tasks(names: list[str | dict[str, Any]], manager: TaskManager) -> None:
    """Every name is a task, group or tag `manager` knows (or a YAML path, or a task config dict),
    and every task under it is complete."""
    if not names:
        raise TaskConfigError(f"no tasks given. {_valid_repro_tasks(manager)}")
    for name in names:
        if isinstance(name, dict):
            check_task_config(name, "inline config")
        elif name.endswith(".yaml"):
            check_task_config(load_yaml(name, resolve_func=False), name)
        elif name in manager.task_index:
            _check_entry(name, manager, set())
        elif not manager.match_tasks([name]):  # lm-eval also accepts glob patterns
            raise TaskConfigError(unknown_task_message(name, manager))


def _check_entry(name: str, manager: TaskManager, seen: set[str]) -> None:
    if name in seen:
        return
    seen.add(name)
    entry = manager.task_index[name]
    if entry.kind == Kind.TASK:
        check_task_config(entry.cfg or {}, str(entry.yaml_path))
    elif entry.kind == Kind.TAG:
        for task in sorted(entry.tags):
            _check_entry(task, manager, seen)
    elif entry.kind == Kind.GROUP:
        members = entry.cfg.get("task") or []
        for member in members if isinstance(members, list) else [members]:
            child = member if isinstance(member, str) else member.get("task") or member.get("group")
            if isinstance(child, str) and child in manager.task_index:
                _check_entry(child, manager, seen)
            elif isinstance(child, str) and isinstance(member, str):
                raise TaskConfigError(f"group {name!r} ({entry.yaml_path}) lists {child!r}, which is no known task")


def unknown_task_message(name: str, manager: TaskManager) -> str:
    """One line: the unknown name, a close match, the suite's repro_* tasks, and a YAML that failed to index."""
    close = difflib.get_close_matches(name, manager.all_tasks, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"unknown task {name!r}.{hint}{_why_not_indexed(name, manager)} {_valid_repro_tasks(manager)}"


def _valid_repro_tasks(manager: TaskManager) -> str:
    repro = [t for t in manager.all_tasks if t.startswith("repro_")]
    return f"Valid repro tasks: {', '.join(repro)} (or any lm-eval task; `python -m evaluation ls tasks` lists them)"


def _why_not_indexed(name: str, manager: TaskManager) -> str:
    """Why `<name>.yaml` under an include path, if there is one, gave no task of that name."""
    roots = manager.include_path or []
    for root in roots if isinstance(roots, (list, tuple)) else [roots]:
        for path in Path(root).glob(f"**/{name}.yaml"):
            try:
                config = load_yaml(path, resolve_func=False)
            except Exception as err:  # YAML syntax, a missing include: lm-eval skips such files silently
                return f" {path} exists but does not load ({' '.join(str(err).split())})."
            if "task" not in config and "group" not in config:
                return f" {path} exists but has no `task:` field (nor `group:`), so lm-eval skipped it."
            return f" {path} exists but names {config.get('task') or config.get('group')!r}."
    return ""
