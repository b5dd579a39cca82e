"""The citable record of a run: `metrics.json`, `config.yaml`, `env.json`, `loss_curve.png`, `report.md`.

Everything is rendered in memory first, then each file is written to a temporary file in the run
folder and moved into place with `os.replace`, `report.md` last: a failure at any point leaves the
previous files (or none) rather than a half-written report.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import numbers
import os
import re
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePath
from typing import Any

import yaml

from reports import plots
from reports.claims import ClaimResult


def jsonable(obj: Any) -> Any:
    """`obj` as plain JSON data: Paths and enums as strings, numpy / torch scalars and arrays as
    numbers and lists, dataclasses as dicts, NaN and ±inf as None."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, PurePath):
        return str(obj)
    if isinstance(obj, enum.Enum):
        return jsonable(obj.value)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return jsonable(dataclasses.asdict(obj))
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in obj]
    if getattr(obj, "ndim", None) == 0 and hasattr(obj, "item"):  # numpy / torch 0-d
        return jsonable(obj.item())
    if hasattr(obj, "tolist"):  # numpy arrays, torch tensors
        return jsonable(obj.tolist())
    return str(obj)


def format_value(value: Any) -> str:
    """A number for a table: ints with thousands separators, floats to 4 significant digits."""
    if value is None:
        return "—"
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # numpy / torch 0-d
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Number):
        return str(value)
    if isinstance(value, numbers.Integral):
        return f"{int(value):,}"
    value = float(value)  # type: ignore[arg-type]
    if not math.isfinite(value):
        return str(value)
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e15):
        return f"{value:.4g}"
    if abs(value) >= 1e4:
        return f"{float(f'{value:.4g}'):,.0f}"
    return f"{value:.4g}"


def _cell(value: Any) -> str:
    text = value if isinstance(value, str) else format_value(value)
    return text.replace("|", "\\|").replace("\n", "<br>")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str = "") -> list[str]:
    align = align or "l" * len(header)
    rule = {"l": "---", "r": "---:", "c": ":---:"}
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(rule[a] for a in align) + "|",
        *("| " + " | ".join(_cell(v) for v in row) + " |" for row in rows),
    ]


def _fence(text: str, lang: str) -> list[str]:
    ticks = "`" * max(3, max(map(len, re.findall("`+", text)), default=0) + 1)
    return [f"{ticks}{lang}", text.rstrip("\n"), ticks]


def render_markdown(
    run_dir: Path, technique: str, title: str, command: str, config_yaml: str, env: Mapping[str, Any],
    metrics: Mapping[str, Any], claims: Sequence[ClaimResult], notes: Sequence[str],
    evaluation: Mapping[str, Any] | None = None,
    sections: Mapping[str, Sequence[str]] | None = None,
) -> str:
    """The body of `report.md`; `sections` (title -> Markdown lines) go after the results."""
    reproduced = sum(c.verdict == "reproduced" for c in claims)
    unmeasured = sum(c.verdict == "not measured" for c in claims)
    summary = f"{reproduced} of {len(claims)} claims reproduced" if claims else "no claims checked"
    if unmeasured:
        summary += f" ({unmeasured} not measured in this run)"
    if claims:
        summary += " · single seed (`--seeds K` tests each verdict over K seeds)"
    lines = [f"# {title}", "", f"Technique `{technique}` · run `{run_dir.name}` · {summary}", ""]
    lines += ["## Command", "", *_fence(command, "bash"), ""]

    lines += ["## Claims", ""]
    if claims:
        rows = [
            (c.claim, c.source, c.metric, c.measured, c.paper, c.threshold, f"**{c.verdict}**") for c in claims
        ]
        lines += _table(("claim", "source", "metric", "measured", "paper", "test", "verdict"), rows, "lllrlll")
        details = [f"- *{c.claim}*: {c.detail}" for c in claims if c.detail]
        lines += ["", *details] if details else []
    else:
        lines.append("No claims were checked in this run.")
    lines.append("")

    lines += ["## Results", ""]
    # lm-eval's scores sit in metrics too (`eval/<task>/<metric>`, where claims read them); the Evaluation section shows them
    shown = [(k, v) for k, v in metrics.items() if not (evaluation and k.startswith("eval/"))]
    lines += _table(("metric", "value"), shown, "lr") if shown else ["No metrics recorded."]
    if evaluation:
        lines += ["", "## Evaluation (lm-evaluation-harness)", ""]
        rows = [(r["task"], r["metric"], r["value"], r.get("stderr")) for r in evaluation["rows"]]
        lines += _table(("task", "metric", "value", "stderr"), rows, "llrr")
        settings = ", ".join(f"{k} {v}" for k, v in evaluation.items() if k != "rows")
        lines += ["", f"Scores move with batch size (padding): {settings}."] if settings else []
    for heading, body in (sections or {}).items():
        lines += ["", f"## {heading}", "", *body]
    lines += ["", "## Loss curve", "", "![loss curve](loss_curve.png)", ""]
    lines += ["## Environment", "", *_table(("", ""), list(env.items())), ""]
    if notes:
        lines += ["## Notes", "", *(f"- {n}" for n in notes), ""]
    lines += [
        "## Config", "", "<details>", "<summary>Resolved config (<code>config.yaml</code>)</summary>", "",
        *_fence(config_yaml, "yaml"), "", "</details>", "",
    ]
    return "\n".join(lines)


def _publish(run_dir: Path, files: Mapping[str, bytes]) -> None:
    """Write every file to a temporary sibling, then move each into place, in order."""
    staged: dict[str, Path] = {}
    try:
        for name, data in files.items():
            staged[name] = tmp = run_dir / f".{name}.{uuid.uuid4().hex}.tmp"
            with open(tmp, "xb") as f:  # honours the umask, unlike mkstemp's 0600
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        for name, tmp in staged.items():
            os.replace(tmp, run_dir / name)
    finally:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)


def write_report(
    run_dir: Path,
    *,
    technique: str,
    title: str,
    command: str,
    config: dict,
    env: dict,
    history: dict[str, list[tuple[int, float]]],
    metrics: dict[str, float | int | str],
    claims: list[ClaimResult],
    notes: Sequence[str] = (),
    evaluation: Mapping[str, Any] | None = None,
    log_y: bool = False,
    sections: Mapping[str, Sequence[str]] | None = None,
) -> Path:
    """Write the run's record into `run_dir` (created if missing) and return the path of `report.md`.

    history: metric name -> [(step, value), ...]; `train/loss` and `val/loss` are plotted.
    metrics: final values, shown in the Results table. claims: computed by `reports.claims`.
    evaluation: lm-eval scores, {"rows": [{"task", "metric", "value", "stderr"}, ...], **settings}.
    sections: extra Markdown sections after the results, title -> lines (figures, sample tables).
    log_y: draw the loss curve on a log scale (when every loss is positive).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_data, env_data, metrics_data = jsonable(config), jsonable(env), jsonable(metrics)
    record = {
        "technique": technique,
        "title": title,
        "command": command,
        "metrics": metrics_data,
        "claims": jsonable(list(claims)),
        "seeds": 1,  # verdicts of one run; reports/seeds.py aggregates runs of several seeds
        "evaluation": jsonable(evaluation),
        "history": jsonable(history),
        "env": env_data,
        "config": config_data,
    }
    config_yaml = yaml.safe_dump(config_data, sort_keys=False, allow_unicode=True)
    markdown = render_markdown(
        run_dir, technique, title, command, config_yaml, env, metrics, claims, list(notes), evaluation, sections
    )
    png = plots.loss_curve(history, title, log_y=log_y)
    _publish(run_dir, {
        "config.yaml": config_yaml.encode(),
        "env.json": (json.dumps(env_data, indent=2, allow_nan=False) + "\n").encode(),
        "loss_curve.png": png,
        "metrics.json": (json.dumps(record, indent=2, allow_nan=False) + "\n").encode(),
        "report.md": markdown.encode(),
    })
    return run_dir / "report.md"
