"""Where documents come from: the embedded Python-docs corpus, local files, or the datasets hub.

Every reader returns `Document`s sorted by `id`, so a corpus reads the same on every machine.
"""

from __future__ import annotations

import json
import os
import sys
import sysconfig
from pathlib import Path
from typing import NamedTuple

import datasets

DEFAULT_SOURCE = "python-docs"
# Debian's python3.X-doc installs the reST sources of the documentation here.
# Debian's python3.X-doc; setup installs python3.11-doc. $LLM_REPRO_PYTHON_DOCS points elsewhere.
DOCS_DIRS = [Path(f"/usr/share/doc/python{v}/html/_sources") for v in (f"{sys.version_info.major}.{sys.version_info.minor}", "3.11")]


def docs_dir_default() -> Path:
    """Where the Python documentation's reST sources are: the variable, this Python's docs, or 3.11's."""
    if os.environ.get("LLM_REPRO_PYTHON_DOCS"):
        return Path(os.environ["LLM_REPRO_PYTHON_DOCS"])
    return next((d for d in DOCS_DIRS if d.is_dir()), DOCS_DIRS[-1])
PLAIN = (".txt", ".md", ".rst")
STRUCTURED = (".jsonl", ".json", ".parquet")


class Document(NamedTuple):
    id: str  # where it came from: a relative path, or a path and row number
    text: str


class DataFormatError(ValueError):
    """A corpus file that cannot be read as documents; the message names the file and how to fix it."""


def read_source(
    source: str, text_field: str = "text", hub_split: str = "train", cache_dir: Path | None = None
) -> tuple[list[Document], str]:
    """Documents of `source` ("python-docs", a local file or folder, or "hf:<name>"), sorted by id, and a note.

    The note is empty unless the corpus is not what was asked for (the Python docs missing).
    """
    if source == DEFAULT_SOURCE:
        return python_docs()
    if source.startswith("hf:"):
        return _from_hub(source[3:], text_field, hub_split, cache_dir), ""
    return read_local(Path(source).expanduser(), text_field, cache_dir), ""


def python_docs(docs_dir: Path | None = None, stdlib: Path | None = None) -> tuple[list[Document], str]:
    """The reST sources of the Python documentation plus the standard library's `.py` files.

    Ids are `docs/<path>` and `stdlib/<path>`; installed packages (site-packages, dist-packages) are left out.
    """
    docs_dir = Path(docs_dir or docs_dir_default())
    stdlib = Path(stdlib or sysconfig.get_paths()["stdlib"])
    docs = [_read_plain(p, f"docs/{p.relative_to(docs_dir)}") for p in sorted(docs_dir.rglob("*.rst.txt"))]
    code = [
        _read_plain(p, f"stdlib/{p.relative_to(stdlib)}")
        for p in sorted(stdlib.rglob("*.py"))
        if not {"site-packages", "dist-packages"} & set(p.relative_to(stdlib).parts)
    ]
    note = ""
    if not docs:
        note = f"Python docs not found at {docs_dir} (apt-get install python3.11-doc); corpus is the standard library alone"
    return sorted(docs + code), note


def read_local(path: Path, text_field: str = "text", cache_dir: Path | None = None) -> list[Document]:
    """One document per .txt/.md/.rst file, one per row of .jsonl/.json/.parquet; a folder is read recursively."""
    if not path.exists():
        raise FileNotFoundError(
            f"data.source {path}: no such file or folder (give a file, a folder, 'python-docs' or 'hf:<name>')"
        )
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in PLAIN + STRUCTURED)
        if not files:
            raise DataFormatError(f"{path}: no {', '.join(PLAIN + STRUCTURED)} files in this folder")
        root = path
    else:
        files, root = [path], path.parent
    documents = []
    for file in files:
        name = str(file.relative_to(root))
        if file.suffix in PLAIN:
            documents.append(_read_plain(file, name))
        elif file.suffix in STRUCTURED:
            texts = _read_structured(file, text_field, cache_dir)
            documents += [Document(f"{name}:{row}", text) for row, text in enumerate(texts, start=1)]
        else:
            raise DataFormatError(f"{file}: unknown format {file.suffix!r}; use one of {', '.join(PLAIN + STRUCTURED)}")
    return sorted(documents)


def check_jsonl(path: Path, text_field: str) -> None:
    """Raise `DataFormatError` at the first line that is not a JSON object with a string `text_field`."""
    fix = f'each line must be one JSON object with a "{text_field}" field'
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataFormatError(f"{path}:{number}: invalid JSON ({error}); {fix}") from None
            if not isinstance(row, dict) or text_field not in row:
                found = f"keys {sorted(row)}" if isinstance(row, dict) else type(row).__name__
                raise DataFormatError(
                    f'{path}:{number}: no "{text_field}" field (found {found}); {fix}, or set data.text_field'
                )
            if not isinstance(row[text_field], str):
                raise DataFormatError(
                    f'{path}:{number}: "{text_field}" is {type(row[text_field]).__name__}, not a string; {fix}'
                )


def _read_plain(path: Path, id: str) -> Document:
    # A few stdlib test files are deliberately not UTF-8; replacement keeps them readable and the corpus deterministic.
    return Document(id, path.read_bytes().decode("utf-8", errors="replace"))


def _read_structured(path: Path, text_field: str, cache_dir: Path | None) -> list[str]:
    """The `text_field` column of a .jsonl/.json/.parquet file, read through `datasets`."""
    if path.suffix == ".jsonl":
        check_jsonl(path, text_field)
    builder = "parquet" if path.suffix == ".parquet" else "json"
    table = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=_hf_cache(cache_dir))
    return _texts(table, text_field, str(path))


def _from_hub(name: str, text_field: str, split: str, cache_dir: Path | None) -> list[Document]:
    table = datasets.load_dataset(name, split=split, cache_dir=_hf_cache(cache_dir))
    return [
        Document(f"hf:{name}/{split}:{row}", text)
        for row, text in enumerate(_texts(table, text_field, f"hf:{name}"), start=1)
    ]


def _texts(table: datasets.Dataset, text_field: str, where: str) -> list[str]:
    if text_field not in table.column_names:
        raise DataFormatError(
            f'{where}: no "{text_field}" column (columns: {", ".join(table.column_names)}); '
            "set data.text_field to one of them"
        )
    texts = table[text_field]
    for row, text in enumerate(texts, start=1):
        if not isinstance(text, str):
            raise DataFormatError(f'{where}: row {row}: "{text_field}" is {type(text).__name__}, not a string')
    return list(texts)


def _hf_cache(cache_dir: Path | None) -> str | None:
    return None if cache_dir is None else str(cache_dir / "hf")


def load_table(source: str, split: str = "train", cache_dir: Path | None = None, kind: str = "record"):
    """(`datasets.Dataset`, its name for messages) of a local .jsonl / .json / .parquet file or `hf:<name>`.

    `kind` names what the file should hold ("instruction", "preference") in the errors.
    """
    if source.startswith("hf:"):
        dataset = datasets.load_dataset(source[3:], split=split, cache_dir=str(cache_dir) if cache_dir else None)
        return dataset, source
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"data.source {source}: no such file (give a .jsonl, .json or .parquet, or hf:<name>)")
    builder = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(path.suffix)
    if builder is None:
        raise DataFormatError(f"{path}: unsupported {kind} file type {path.suffix!r}; use .jsonl, .json or .parquet")
    try:
        dataset = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=str(cache_dir) if cache_dir else None)
    except Exception as err:  # datasets wraps the parser's error; keep its first line
        raise DataFormatError(f"{path}: cannot be read as {builder}: {str(err).splitlines()[0]}") from err
    return dataset, str(path)
