"""Build the data of the suite's lm-eval tasks, offline, and hand it to lm-eval.

`build(out, texts, seed)` writes one `<task>.jsonl` per task in `evaluation/tasks/` and a
`manifest.json`. The task YAML reads its rows through `load` (`custom_dataset`), which finds them:

- in `data_dir` when the task metadata names one (`--metadata '{"data_dir": "DIR"}'`);
- else built from the validation documents of the corpus of the run named by `checkpoint`
  (lm-eval's command line puts `--model_args` into task metadata, and so does `repro/evaluate.py`);
- else built from the default corpus (`python-docs`).

Built folders are cached under `<cache>/eval-tasks/<corpus hash>-s<seed>-v<version>/`.

    python -m evaluation.build_tasks --out DIR [--checkpoint RUN | --source SRC] [--seed 0] [--n 200]
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import yaml
from jsonargparse import ArgumentParser

from datamodules.clean import clean, corpus_hash
from datamodules.pretrain import CorpusConfig, cache_root
from datamodules.sources import read_source
from datamodules.verifiable import GENERATORS, HELD_OUT_ROWS, HELD_OUT_SEED, verifiable_rows
from evaluation.corpus_tasks import cloze_passages, perplexity_documents
from repro.checkpoints import locate

BUILD_VERSION = 1  # bump when any row would change, so cached folders are rebuilt
DEFAULT_SEED = HELD_OUT_SEED  # the verifiable rows SFT's data leaves out are this seed's
ROWS = HELD_OUT_ROWS  # rows per cloze and verifiable task


class _NoMetadataHint(logging.Filter):
    """Drops lm-eval's hint, logged once per task with a `custom_dataset`, that such tasks can take
    `--metadata`: the suite's tasks get theirs (checkpoint, data_dir) that way on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed to `--metadata`" not in record.getMessage()


# lm-eval imports this module to resolve `load` before it calls it, on its command line and in Python alike
_task_logger = logging.getLogger("lm_eval.api.task")
if not any(isinstance(f, _NoMetadataHint) for f in _task_logger.filters):
    _task_logger.addFilter(_NoMetadataHint())


def task_rows(texts: Sequence[str], seed: int = DEFAULT_SEED, n: int = ROWS) -> dict[str, list[dict]]:
    """Rows of every task, by task name: corpus tasks from `texts`, verifiable tasks from `seed` alone."""
    return {
        "repro_corpus_ppl": perplexity_documents(texts, seed),
        "repro_cloze": cloze_passages(texts, seed, n),
        **{f"repro_verifiable_{name}": verifiable_rows(name, seed, n) for name in GENERATORS},
    }


def build(out: Path, texts: Sequence[str], seed: int = DEFAULT_SEED, n: int = ROWS, about: dict | None = None) -> Path:
    """Write `<task>.jsonl` for every task and `manifest.json` (seed, version, row counts, `about`) into `out`.

    The folder is written beside `out` and renamed into place, so a reader never sees half of it.
    """
    out = Path(out)
    rows = task_rows(texts, seed, n)
    empty = [name for name, r in rows.items() if not r]
    if empty:
        raise ValueError(f"no rows for {', '.join(empty)}: the {len(texts)} held-out text(s) are too short or too few")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        for name, task in rows.items():
            lines = (json.dumps(row, ensure_ascii=False, sort_keys=True) for row in task)
            (partial / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        manifest = {"version": BUILD_VERSION, "seed": seed, "rows": {k: len(v) for k, v in rows.items()}} | (about or {})
        (partial / "manifest.json").write_text(json.dumps(manifest, indent=2))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out


def held_out_texts(corpus: CorpusConfig) -> tuple[list[str], str]:
    """Validation documents of a corpus, split exactly as pretraining splits it, and the corpus hash."""
    documents, _ = read_source(corpus.source, corpus.text_field, corpus.hub_split, cache_root(corpus))
    cleaned = clean(documents, corpus.min_doc_chars, corpus.max_bytes, corpus.val_fraction)
    return [d.text for d in cleaned.val], corpus_hash(cleaned)


def corpus_of_run(checkpoint: str | Path) -> CorpusConfig:
    """The `data.` settings of the run holding `checkpoint` (default corpus if the run names none); for a
    run that started from other runs (`stages.json`), its base's corpus."""
    _, run_dir = locate(checkpoint)
    stages = run_dir / "stages.json"
    if stages.is_file():  # a model trained from another run: the corpus of its base (through every stage)
        started_from = json.loads(stages.read_text())
        return corpus_of_run(started_from.get("pretrain") or next(iter(started_from.values())))
    data = (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("data") or {}
    names = {f.name for f in dataclasses.fields(CorpusConfig)}
    return CorpusConfig(**{k: v for k, v in data.items() if k in names}) if "source" in data else CorpusConfig()


def cached_data_dir(corpus: CorpusConfig, seed: int = DEFAULT_SEED) -> Path:
    """The task data of `corpus`'s held-out documents, built under the cache on first use."""
    texts, digest = held_out_texts(corpus)
    folder = cache_root(corpus) / "eval-tasks" / f"{digest[:16]}-s{seed}-v{BUILD_VERSION}"
    if not (folder / "manifest.json").is_file():
        build(folder, texts, seed, about={"source": corpus.source, "corpus_hash": digest})
    return folder


@functools.lru_cache(maxsize=8)
def _data_dir_of_run(checkpoint: str | None) -> Path:
    # once per process and run: reading and cleaning a corpus takes seconds, and every task asks
    return cached_data_dir(corpus_of_run(checkpoint) if checkpoint is not None else CorpusConfig())


def data_dir_for(checkpoint: str | Path | None = None, data_dir: str | Path | None = None) -> Path:
    """Where the task rows are: `data_dir` if given, else those of the run's corpus, else of the default corpus."""
    if data_dir is not None:
        return Path(data_dir)
    return _data_dir_of_run(None if checkpoint is None else str(Path(checkpoint).resolve()))


def load(data_file: str, data_dir: str | None = None, checkpoint: str | None = None, **metadata: Any) -> dict[str, datasets.Dataset]:
    """lm-eval's `custom_dataset` hook: `{"test": rows of data_file}`; other task metadata is ignored."""
    path = data_dir_for(checkpoint, data_dir) / data_file
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no task data there; write it with `python -m evaluation.build_tasks --out {path.parent}`"
        )
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    return {"test": datasets.Dataset.from_list(rows)}


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m evaluation.build_tasks", description=__doc__)
    p.add_argument("--out", type=str, required=True, help="folder to write the task JSONL into")
    p.add_argument("--checkpoint", type=str, default=None, help="use the held-out documents of this run's corpus")
    p.add_argument("--source", type=str, default=None, help="or of this corpus source (default: python-docs)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--n", type=int, default=ROWS, help="rows per cloze and verifiable task")
    args = p.parse_args(argv)
    corpus = corpus_of_run(args.checkpoint) if args.checkpoint else CorpusConfig(source=args.source or "python-docs")
    texts, digest = held_out_texts(corpus)
    out = build(Path(args.out), texts, args.seed, args.n, about={"source": corpus.source, "corpus_hash": digest})
    print(f"{out}: {json.loads((out / 'manifest.json').read_text())['rows']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
