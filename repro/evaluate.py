"""Score a run with lm-evaluation-harness: `python repro/evaluate.py --checkpoint RUN [--tasks ...]`.

Prints lm-eval's table and writes `eval.json` (lm-eval's results) and `eval.md` (task, metric,
value, stderr) into the run folder, or into `--out`. The suite's tasks live in `evaluation/tasks/`;
any other lm-eval task name works too when its data is reachable.
"""

from __future__ import annotations

import json
import sys
from argparse import ArgumentError
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the project's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lm_eval
import torch
import yaml
from jsonargparse import ArgumentParser
from lm_eval.tasks import TaskManager
from lm_eval.utils import handle_non_serializable, make_table
from tokenizers import Tokenizer

from datamodules.chat import is_chat_tokenizer
from evaluation import TASKS_DIR
from evaluation.build_tasks import data_dir_for
from evaluation.lm import ReproLM  # the import registers "llm-repro" with lm-eval
from evaluation.task_checks import check_tasks
from repro import registry
from repro.checkpoints import locate
from repro.config import ConfigError



def is_chat_run(checkpoint: str | Path) -> bool:
    """Whether the run's tokenizer carries the chat template's tokens (an instruction-tuned model)."""
    _, run_dir = locate(checkpoint)
    path = run_dir / "tokenizer.json"
    return path.is_file() and is_chat_tokenizer(Tokenizer.from_file(str(path)))


def default_tasks(checkpoint: str | Path) -> list[str]:
    """The tasks a run of this checkpoint is scored on: its config's `eval.tasks`, else its technique's."""
    _, run_dir = locate(checkpoint)
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    tasks = ((config or {}).get("eval") or {}).get("tasks")
    if tasks:
        return list(tasks)
    run_json = run_dir / "run.json"
    if not run_json.is_file():
        raise ConfigError(f"{run_dir}: no run.json to name the technique whose tasks to use; pass --tasks")
    return list(registry.get(json.loads(run_json.read_text())["technique"]).eval_tasks)


def evaluate(
    checkpoint: str | Path,
    tasks: str | list[str | dict] | tuple[str, ...] | None = None,
    limit: int | float | None = None,
    batch_size: int = 16,
    device: str | None = None,
    include_path: str | Path | list[str | Path] | None = None,
    data_dir: str | Path | None = None,
    arm: str | None = None,
) -> dict[str, Any]:
    """lm-eval's results dict for `checkpoint` (a run folder or a .ckpt) on `tasks`.

    `tasks`: "a,b", or a list of names and task config dicts (see `evaluation.standard_tasks`);
    None: the run's own (`default_tasks`).
    Goes through `lm_eval.simple_evaluate(model="llm-repro", ...)`, the path lm-eval's command line
    takes. Task rows come from `data_dir`, else from the run's own held-out corpus
    (`evaluation.build_tasks`). Raises TaskConfigError (a ConfigError) for an unknown task or an
    incomplete task config before the model is loaded. `arm` scores one of several models a run
    trained side by side (SFT's "lora"). A chat model (its tokenizer has the chat tokens) reads each
    prompt through its chat template, as lm-eval's `--apply_chat_template` does.
    """
    locate(checkpoint)  # a bad path fails here, with the message load_model would give
    tasks = default_tasks(checkpoint) if tasks is None else tasks
    names = [t.strip() for t in tasks.split(",") if t.strip()] if isinstance(tasks, str) else list(tasks)
    model_args = {"checkpoint": str(checkpoint), **({"arm": arm} if arm else {})}
    # lm-eval's command line hands --model_args to tasks as metadata; evaluation.build_tasks.load reads it
    metadata = model_args | ({"data_dir": str(data_dir)} if data_dir is not None else {})
    manager = _task_manager(names, include_path, metadata)
    check_tasks(names, manager)
    results = lm_eval.simple_evaluate(
        model="llm-repro",
        model_args=model_args,
        tasks=names,
        limit=limit,
        batch_size=batch_size,
        device=device,
        task_manager=manager,
        apply_chat_template=is_chat_run(checkpoint),
    )
    if any(name.startswith("repro_") for name in results["configs"]):
        folder = data_dir_for(checkpoint, data_dir)
        results["task_data"] = {"path": str(folder)} | json.loads((folder / "manifest.json").read_text())
    return results


def evaluate_model(
    model: Any, tokenizer: Any, checkpoint: str | Path, name: str, tasks: list[str], limit: int | float | None = None,
    batch_size: int = 16, device: str | None = None,
) -> dict[str, float]:
    """lm-eval's "task/metric" scores of a decoder held in memory (a quantized copy of a run's model, say),
    on the held-out data of the run `checkpoint` names, through the same tasks and harness as `evaluate`."""
    locate(checkpoint)
    metadata = {"checkpoint": str(checkpoint)}
    manager = _task_manager(list(tasks), None, metadata)
    check_tasks(list(tasks), manager)
    lm = ReproLM(str(checkpoint), device=device, batch_size=batch_size, model=model, tokenizer=tokenizer)
    lm.checkpoint = f"{checkpoint} ({name})"
    results = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit, batch_size=batch_size, task_manager=manager)
    return {f"{r['task']}/{r['metric']}": r["value"] for r in result_rows(results)}


def arm_scores(run_dir: str | Path, arms: list[str], settings: Any, device: str, final: dict[str, float]) -> dict[str, dict[str, float]]:
    """lm-eval's scores of each arm of a run that trained several side by side, as "task/metric" -> value:
    the first arm's from the run's own evaluation (`eval/<task>/<metric>` in `final`), the others
    scored here on the same tasks, limit and batch size (`settings`: the run's `eval.` section)."""
    scores = {arms[0]: {k.removeprefix("eval/"): v for k, v in final.items() if k.startswith("eval/")}}
    for arm in arms[1:]:
        results = evaluate(run_dir, settings.tasks, settings.limit, settings.batch_size, device, arm=arm)
        scores[arm] = {f"{r['task']}/{r['metric']}": r["value"] for r in result_rows(results)}
    return scores


def _task_manager(names: list[str | dict], include_path: Any, metadata: dict[str, str]) -> Any:
    """A TaskManager over the suite's tasks (and `include_path`), with lm-eval's builtin tasks only when
    a name needs them: indexing their 14,000 YAML files takes 10-15 s on a laptop CPU."""
    extra = include_path if isinstance(include_path, list) else [include_path] if include_path else []
    paths = [str(TASKS_DIR), *map(str, extra)]
    ours = TaskManager(include_path=paths, include_defaults=False, metadata=metadata)
    named = [n for n in names if isinstance(n, str) and not n.endswith(".yaml")]
    if all(ours.match_tasks([n]) for n in named):
        return ours
    return TaskManager(include_path=paths, metadata=metadata)


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else str(value)


def result_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per task (or group) and metric: {"task", "metric", "value", "stderr"}; the filter is
    named in the metric when it is not `none`; stderr is None where lm-eval gives none."""
    rows = []
    for task, metrics in sorted(results["results"].items()):
        label = metrics.get("alias", task).strip().removeprefix("- ")
        for key, value in metrics.items():
            metric, _, filter_name = key.partition(",")
            if key == "alias" or metric.endswith("_stderr") or not filter_name:
                continue
            stderr = metrics.get(f"{metric}_stderr,{filter_name}")
            rows.append({
                "task": label,
                "metric": metric if filter_name == "none" else f"{metric} ({filter_name})",
                "value": value,
                "stderr": stderr if isinstance(stderr, (int, float)) else None,
            })
    return rows


def results_table(results: dict[str, Any]) -> str:
    """Markdown table of every task and group: task, metric, value, stderr, then one line with what
    the numbers depend on (lm-eval version, batch size, limit)."""
    lines = ["| task | metric | value | stderr |", "|---|---|---:|---:|"]
    for row in result_rows(results):
        stderr = "N/A" if row["stderr"] is None else _number(row["stderr"])
        lines.append(f"| {row['task']} | {row['metric']} | {_number(row['value'])} | {stderr} |")
    config = results.get("config", {})
    batch = config.get("model_batch_size", config.get("batch_size"))
    lines += ["", f"lm-eval {results.get('lm_eval_version', '?')}, model {config.get('model')}, batch size {batch}, limit {config.get('limit')}"]
    return "\n".join(lines)


def write_results(results: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """`out/eval.json` (lm-eval's results, samples left out) and `out/eval.md` (the table)."""
    out.mkdir(parents=True, exist_ok=True)
    kept = {k: v for k, v in results.items() if k != "samples"}
    (out / "eval.json").write_text(json.dumps(kept, indent=2, default=handle_non_serializable, ensure_ascii=False))
    (out / "eval.md").write_text(results_table(results) + "\n")
    return out / "eval.json", out / "eval.md"


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="repro/evaluate.py", description=__doc__, exit_on_error=False)
    p.add_argument("--checkpoint", type=str, required=True, help="run folder (final, else last checkpoint) or a .ckpt")
    p.add_argument("--tasks", type=str, default=None,
                   help="comma-separated task or group names (default: the run's eval.tasks, else its technique's)")
    p.add_argument("--limit", type=float, default=None, help="documents per task (a fraction if < 1); for quick checks")
    p.add_argument("--batch-size", type=int, default=16, help="scores move slightly with it (padding); reported")
    p.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=str, default=None, help="folder for eval.json and eval.md (default: the run folder)")
    p.add_argument("--include-path", type=str, default=None, help="another folder of task YAML")
    p.add_argument("--data-dir", type=str, default=None, help="task rows from `python -m evaluation.build_tasks --out`")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
        limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
        results = evaluate(
            args.checkpoint, args.tasks, limit, args.batch_size, args.device, args.include_path, args.data_dir
        )
    except (ConfigError, ArgumentError, FileNotFoundError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2

    print(make_table(results))
    if "groups" in results:
        print(make_table(results, "groups"))
    out = Path(args.out) if args.out else locate(args.checkpoint)[1]
    for path in write_results(results, out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
