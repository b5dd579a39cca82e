"""Evaluation through lm-evaluation-harness: the `llm-repro` model adapter and the suite's own tasks.

- `evaluation.lm`: the adapter (importing it registers `llm-repro` with lm-eval);
- `evaluation/tasks/`: task YAML (pass it as lm-eval's `--include_path`);
- `evaluation.build_tasks`: the tasks' data, built offline from a run's held-out corpus and a seed (the verifiable
  tasks' rows from `datamodules.verifiable`, whose generators SFT data shares);
- `evaluation.standard_tasks`: lm-eval's builtin tasks (lambada, arc, hellaswag, ...) on local data files.
"""

from pathlib import Path

TASKS_DIR = Path(__file__).parent / "tasks"
