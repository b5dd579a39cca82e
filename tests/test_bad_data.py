"""Bad data fails with one line naming the file (and line); the data cache serves the bytes on disk now."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import datasets
import huggingface_hub
import pytest

from datamodules import pretrain
from datamodules.chat import read_records
from datamodules.preference import read_pairs
from datamodules.pretrain import CorpusConfig
from datamodules.sources import DataFormatError, read_local, read_source
from repro.run import main

ROOT = Path(__file__).resolve().parent.parent
DOC = "The quick brown fox jumps over the lazy dog, again and again, until the dog gets up. "


def docs(n: int) -> list[str]:
    return [f"Document {i}. " + DOC * 2 for i in range(n)]


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


# (file name, its bytes, what the message must hold besides the file's name)
CORPORA = {
    "empty": ("empty.jsonl", b"", "0 usable document(s)"),
    "one document": ("one.jsonl", jsonl([{"text": docs(1)[0]}]).encode(), "1 usable document(s)"),
    "broken jsonl": ("broken.jsonl", (jsonl([{"text": d} for d in docs(2)]) + '{"text": "cut o\n').encode(), ":3: invalid JSON"),
    "broken json": ("broken.json", b'[{"text": "one"},\n {"text": "two"\n', ":3:1: invalid JSON"),
    "json lines in .json, one broken": ("lines.json", b'{"text": "one"}\n{"text": two}\n', ":2: invalid JSON"),
    "missing field": ("body.jsonl", jsonl([{"text": "a"}, {"body": "b"}]).encode(), ':2: no "text" field'),
    "latin-1 text": ("latin1.txt", "first line\ncaf\u00e9 cr\u00e8me\n".encode("latin-1"), ":2: not UTF-8 text (byte offset 14: 0xe9)"),
    "latin-1 jsonl": ("latin1.jsonl", '{"text": "ok"}\n{"text": "caf\u00e9"}\n'.encode("latin-1"), ":2: not UTF-8"),
    "random bytes": ("noise.txt", bytes(range(128, 256)) * 4, ":1: not UTF-8 text (byte offset 0: 0x80)"),
}


@pytest.mark.parametrize("name", CORPORA)
def test_bad_corpus_is_one_line_naming_the_file(tmp_path: Path, name: str) -> None:
    file, data, fragment = CORPORA[name]
    (tmp_path / file).write_bytes(data)
    config = CorpusConfig(source=str(tmp_path / file), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataFormatError) as error:
        pretrain.prepare(config, block_size=16)
    message = one_line(error)
    assert str(tmp_path / file) in message and fragment in message
    if "UTF-8" in fragment:
        assert "iconv" in message  # how to fix it


@pytest.mark.parametrize("record, fragment", [
    ({"prompt": "x", "chosen": "a"}, "record 2: missing field(s) ['rejected']"),
    ({"prompt": "x", "rejected": "b"}, "record 2: missing field(s) ['chosen']"),
])
def test_preference_file_with_a_missing_field_names_field_and_line(tmp_path: Path, record: dict, fragment: str) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_text(jsonl([{"prompt": "x", "chosen": "a", "rejected": "b"}]) + "\n" + jsonl([record]))  # record 2 on line 3
    bytes_tokenizer = SimpleNamespace(encode=lambda text: SimpleNamespace(ids=list(text.encode())))
    with pytest.raises(DataFormatError) as error:
        read_pairs(str(path), bytes_tokenizer, cache_dir=tmp_path / "cache")
    assert f"line 3 of {path}, {fragment}" in one_line(error)


@pytest.mark.parametrize("text, fragment", [
    ('{"instruction": "hi", "output": "there"}\n[1, 2]\n', ":2: each instruction record must be a JSON object"),
    ('{"instruction": "hi", "output": "there"}\n{"instruction": \n', ":2: invalid JSON"),
    ("", "no instruction records"),
])
def test_broken_record_file_names_file_and_line(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "chat.jsonl"
    path.write_text(text)
    with pytest.raises(DataFormatError) as error:
        read_records(str(path), cache_dir=tmp_path / "cache")
    assert f"{path}{fragment}" in one_line(error) or f"{path}: {fragment}" in one_line(error)


def test_hub_out_of_reach_fails_fast_with_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: refused at once
    with pytest.raises(DataFormatError) as error:
        read_source("hf:someone/corpus", cache_dir=tmp_path)
    message = one_line(error)
    assert "hf:someone/corpus" in message and "cannot be reached" in message and "local file" in message


def test_hub_offline_and_not_cached_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataFormatError) as error:
        read_source("hf:someone/corpus", cache_dir=tmp_path)
    assert "hf:someone/corpus: cannot be loaded" in one_line(error)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_a_file_replaced_with_its_mtime_kept_reads_as_the_new_text(tmp_path: Path, suffix: str) -> None:
    path, cache = tmp_path / f"corpus{suffix}", tmp_path / "cache"

    def write(texts: list[str]) -> None:
        rows = [{"text": t} for t in texts]
        if suffix == ".parquet":
            datasets.Dataset.from_list(rows).to_parquet(str(path))
        else:
            path.write_text(jsonl(rows) if suffix == ".jsonl" else json.dumps(rows))

    write(["the old text", "more old text"])
    assert [d.text for d in read_local(path, cache_dir=cache)] == ["the old text", "more old text"]
    stat = path.stat()
    write(["the new text", "more new text"])  # as `cp -p`, tar or `touch -r` leave it: same path, same mtime
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_mtime_ns == stat.st_mtime_ns
    assert [d.text for d in read_local(path, cache_dir=cache)] == ["the new text", "more new text"]


def test_records_file_replaced_with_its_mtime_kept_reads_as_the_new_records(tmp_path: Path) -> None:
    path, cache = tmp_path / "chat.jsonl", tmp_path / "cache"
    path.write_text(jsonl([{"instruction": "old", "output": "answer"}]))
    assert read_records(str(path), cache_dir=cache)[0][0]["content"] == "old"
    stat = path.stat()
    path.write_text(jsonl([{"instruction": "new", "output": "answer"}]))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert read_records(str(path), cache_dir=cache)[0][0]["content"] == "new"


def test_sweep_removes_dead_builders_partials_only(tmp_path: Path) -> None:
    folder = tmp_path / "abc-123"
    mine = pretrain.partial_folder(folder)  # this process: alive
    dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / mine.name.replace(f"pid{os.getpid()}@", f"pid{dead_pid.stdout.strip()}@")
    dead.mkdir()
    elsewhere_new = tmp_path / ".abc-123.pid1@another-host.x1y2.partial"
    elsewhere_old = tmp_path / ".abc-123.pid1@another-host.z3w4.partial"
    unnamed_old = tmp_path / ".abc-123.q9r8.partial"  # from before the builder's pid was recorded
    for partial in (elsewhere_new, elsewhere_old, unnamed_old):
        partial.mkdir()
    old = os.stat(tmp_path).st_mtime - pretrain.STALE_AFTER_S - 60
    for partial in (elsewhere_old, unnamed_old):
        os.utime(partial, (old, old))

    assert pretrain.sweep_partials(tmp_path) == sorted([dead, elsewhere_old, unnamed_old])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, elsewhere_new.name])


def test_opening_the_cache_sweeps_a_killed_build(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(jsonl([{"text": d} for d in docs(4)]))
    cache = tmp_path / "cache"
    cache.mkdir()
    killed = cache / f".0123456789abcdef-00000000.pid999999999@{socket.gethostname()}.k1ll.partial"
    killed.mkdir()
    (killed / "tokenizer.json").write_text("{}")
    with pytest.raises(DataFormatError, match="fewer than one block"):  # sweeps first, then fails on too little text
        pretrain.prepare(CorpusConfig(source=str(corpus), cache_dir=str(cache), vocab_size=300), block_size=100_000)
    assert not list(cache.glob(".*.partial"))


def test_cli_bad_corpus_exits_2_with_one_line_and_no_run_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "fine"}\n{"text": nope}\n')
    out = tmp_path / "runs"
    code = main(["--technique", "pretrain", "--set", f"data.source={corpus}", "--set", f"data.cache_dir={tmp_path / 'cache'}",
                 "--accelerator", "cpu", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: ") and f"{corpus}:2: invalid JSON" in err[-1]
    assert not [line for line in err if "Traceback" in line]
    assert not out.exists() or not list(out.rglob("run.json"))
