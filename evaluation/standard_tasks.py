"""lm-eval's own tasks on local data files, for machines that cannot reach the Hugging Face Hub.

`local(task, data_file)` is the builtin task's config (templates, metrics, `process_docs`) with its
dataset replaced by a JSON-lines file whose rows have the fields of the task's Hub dataset:

    rows = [{"text": "... the last word of a passage"}]          # lambada_openai's format
    evaluate(run, [local("lambada_openai", "lambada.jsonl")])    # repro.evaluate, or lm_eval.simple_evaluate

The file is the split that gets scored; there are no few-shot examples (training and validation
splits are dropped), so use it with `num_fewshot` 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lm_eval.tasks
from lm_eval.tasks._yaml_loader import load_yaml

from evaluation.task_checks import TaskConfigError

BUILTIN_TASKS_DIR = Path(lm_eval.tasks.__file__).parent

# Task -> its YAML under lm_eval/tasks/ and the fields of one row of its dataset.
BUILTIN = {
    "lambada_openai": ("lambada/lambada_openai.yaml", "text"),
    "arc_easy": ("arc/arc_easy.yaml", "question, choices {text: [...], label: [...]}, answerKey"),
    "arc_challenge": ("arc/arc_challenge.yaml", "question, choices {text: [...], label: [...]}, answerKey"),
    "hellaswag": ("hellaswag/hellaswag.yaml", "activity_label, ctx_a, ctx_b, endings: [4], label (\"0\"-\"3\")"),
    "piqa": ("piqa/piqa.yaml", "goal, sol1, sol2, label (0 or 1)"),
    "winogrande": ("winogrande/default.yaml", "sentence (with _), option1, option2, answer (\"1\" or \"2\")"),
    "wikitext": ("wikitext/wikitext.yaml", "page"),
}


def local(task: str, data_file: str | Path, name: str | None = None) -> dict[str, Any]:
    """lm-eval's builtin `task` as a task config dict named `name` (default `<task>_local`) whose rows
    are the JSON lines of `data_file`, in the format of `BUILTIN[task]`."""
    if task not in BUILTIN:
        raise TaskConfigError(f"no local-file config for {task!r}; known: {', '.join(BUILTIN)}")
    config = load_yaml(BUILTIN_TASKS_DIR / BUILTIN[task][0])  # includes merged, `!function`s imported
    for key in ("tag", "training_split", "validation_split", "fewshot_split"):
        config.pop(key, None)
    return config | {
        "task": name or f"{task}_local",
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test",
    }
