"""Where documents come from: the embedded Python-docs corpus, local files, or the datasets hub.

Every reader returns `Document`s sorted by `id`, so a corpus reads the same on every machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import datasets
import huggingface_hub

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
HUB_TIMEOUT_S = 5  # one request to the hub's endpoint before loading; `datasets` itself retries for ~20 s


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
            documents.append(Document(name, read_utf8(file)))
        elif file.suffix in STRUCTURED:
            texts = _read_structured(file, text_field, cache_dir)
            documents += [Document(f"{name}:{row}", text) for row, text in enumerate(texts, start=1)]
        else:
            raise DataFormatError(f"{file}: unknown format {file.suffix!r}; use one of {', '.join(PLAIN + STRUCTURED)}")
    return sorted(documents)


def check_jsonl(path: Path, text_field: str) -> list[str]:
    """The `text_field` of every row of a .jsonl file; `DataFormatError` at the first line that is not a JSON
    object with a string `text_field`."""
    fix = f'each line must be one JSON object with a "{text_field}" field'
    texts = []
    for number, row in json_lines(path, fix):
        if not isinstance(row, dict) or text_field not in row:
            found = f"keys {sorted(row)}" if isinstance(row, dict) else type(row).__name__
            raise DataFormatError(f'{path}:{number}: no "{text_field}" field (found {found}); {fix}, or set data.text_field')
        if not isinstance(row[text_field], str):
            raise DataFormatError(f'{path}:{number}: "{text_field}" is {type(row[text_field]).__name__}, not a string; {fix}')
        texts.append(row[text_field])
    return texts


def json_lines(path: Path, fix: str = "each line must be one JSON value") -> list[tuple[int, Any]]:
    """(line number, parsed value) of each non-blank line of a JSON-lines file; `DataFormatError` at the first
    line that is not JSON."""
    rows = []
    for number, line in enumerate(read_utf8(path).splitlines(), start=1):
        if line.strip():
            try:
                rows.append((number, json.loads(line)))
            except json.JSONDecodeError as error:
                raise DataFormatError(f"{path}:{number}: invalid JSON ({error}); {fix}") from None
    return rows


def read_utf8(path: Path) -> str:
    """The text of a local file; `DataFormatError` naming the line and byte offset where it is not UTF-8."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise DataFormatError(
            f"{path}:{line}: not UTF-8 text (byte offset {error.start}: 0x{data[error.start]:02x}); re-encode it as "
            f"UTF-8, e.g. iconv -f latin1 -t utf-8 {path.name} > utf8-{path.name}"
        ) from None


def file_digest(path: Path) -> str:
    """sha256 of the file's bytes, hex."""
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def _read_plain(path: Path, id: str) -> Document:
    # A few stdlib test files are deliberately not UTF-8; replacement keeps them readable and the corpus deterministic.
    return Document(id, path.read_bytes().decode("utf-8", errors="replace"))


def _read_structured(path: Path, text_field: str, cache_dir: Path | None) -> list[str]:
    """The `text_field` column of a .jsonl (read line by line) or .json/.parquet file (read through `datasets`)."""
    if path.suffix == ".jsonl":
        return check_jsonl(path, text_field)
    return _texts(_load_local(path, _hf_cache(cache_dir)), text_field, str(path))


def _load_local(path: Path, cache_dir: Path | None, kind: str = "records") -> datasets.Dataset:
    """A local .jsonl/.json/.parquet file through `datasets`, cached in a folder named for the file's bytes.

    `datasets` keys its cache by path and mtime, so a file replaced with its mtime kept (cp -p, tar, touch -r)
    would read as the old text; a folder per content hash never holds other bytes.
    """
    builder = "parquet" if path.suffix == ".parquet" else "json"
    if builder == "json":
        read_utf8(path)  # a clear error for Latin-1 or binary data, before `datasets` guesses
    cache = Path(cache_dir or datasets.config.HF_DATASETS_CACHE) / "by-content" / file_digest(path)[:16]
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=str(cache))
    except Exception as error:  # `datasets` buries the parser's error in pages of traceback naming no file
        if builder == "json" and (problem := _json_problem(path)):
            raise DataFormatError(problem) from error
        raise DataFormatError(f"{path}: cannot be read as {kind} ({builder}): {_first_line(error)}") from error


def _json_problem(path: Path) -> str | None:
    """Where a .json/.jsonl file is not one JSON document nor JSON lines, or None."""
    text = read_utf8(path)
    if not text.strip():
        return f"{path}: the file is empty"
    try:
        json.loads(text)
        return None
    except json.JSONDecodeError as error:
        if text.lstrip().startswith("["):  # one JSON document, a list of records
            return f"{path}:{error.lineno}:{error.colno}: invalid JSON ({error.msg}); the file must be a JSON list of records"
    try:
        json_lines(path, "each line must be one JSON object (JSON lines), or the file one JSON list of records")
    except DataFormatError as error:
        return str(error)
    return None


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _from_hub(name: str, text_field: str, split: str, cache_dir: Path | None) -> list[Document]:
    table = _load_hub(name, split, _hf_cache(cache_dir))
    return [
        Document(f"hf:{name}/{split}:{row}", text)
        for row, text in enumerate(_texts(table, text_field, f"hf:{name}"), start=1)
    ]


def _load_hub(name: str, split: str, cache_dir: Path | None) -> datasets.Dataset:
    """A hub dataset's split; fails in seconds, with one line, where the hub cannot be reached."""
    if not datasets.config.HF_HUB_OFFLINE:
        endpoint = huggingface_hub.constants.ENDPOINT
        try:
            huggingface_hub.get_session().head(endpoint, timeout=HUB_TIMEOUT_S)
        except Exception as error:  # DNS, refused, timeout, proxy: all mean the same to the user
            raise DataFormatError(
                f"hf:{name}: the Hugging Face hub ({endpoint}) cannot be reached ({_first_line(error)}); pass a local "
                "file instead (data.source=corpus.jsonl), or set HF_HUB_OFFLINE=1 to use a copy already cached"
            ) from error
    try:
        return datasets.load_dataset(name, split=split, cache_dir=str(cache_dir) if cache_dir else None)
    except Exception as error:  # not found, not cached while offline, no such split: one line, not pages
        raise DataFormatError(f"hf:{name}: cannot be loaded: {_first_line(error)}") from error


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


def load_records(
    source: str, split: str = "train", cache_dir: Path | None = None, kind: str = "record"
) -> Iterator[tuple[dict[str, Any], str]]:
    """(record, where it is for messages) of a local .jsonl / .json / .parquet file or `hf:<name>`.

    `where` is "<file>, record <n>", after "line <l> of " for .jsonl; `kind` names what the file should hold
    ("instruction", "preference") in the errors. Columns some records lack are None in the others (`datasets`).
    """
    if source.startswith("hf:"):
        dataset, lines, name = _load_hub(source[3:], split, cache_dir), None, source
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"data.source {source}: no such file (give a .jsonl, .json or .parquet, or hf:<name>)")
        if path.suffix not in STRUCTURED:
            raise DataFormatError(f"{path}: unsupported {kind} file type {path.suffix!r}; use .jsonl, .json or .parquet")
        lines = None
        if path.suffix == ".jsonl":
            rows = json_lines(path, f"each line must be one JSON object, a {kind} record")
            for number, row in rows:
                if not isinstance(row, dict):
                    raise DataFormatError(f"{path}:{number}: each {kind} record must be a JSON object, not {type(row).__name__}")
            if not rows:
                raise DataFormatError(f"{path}: no {kind} records (the file is empty)")
            lines = [number for number, _ in rows]
        dataset, name = _load_local(path, cache_dir, f"{kind} records"), str(path)
    for i, record in enumerate(dataset):
        yield record, (f"line {lines[i]} of " if lines else "") + f"{name}, record {i + 1}"
