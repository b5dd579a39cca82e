"""Every registered technique states its invariants in its own file of this folder, found by walking the registry.

A technique registered without `tests/invariants/test_<technique>.py` ('-' as '_'), or with one that defines no
test function, fails `test_every_registered_technique_has_its_invariants`, which names the technique and the file.
The files are read with `ast`, not imported: pytest collects and runs their tests as any others.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

from repro.registry import techniques

FOLDER = Path(__file__).resolve().parent
ROOT = FOLDER.parent.parent


def invariants_file(name: str, folder: Path = FOLDER) -> Path:
    return folder / f"test_{name.replace('-', '_')}.py"


def defines_a_test(path: Path) -> bool:
    """Whether the module at `path` defines a function pytest collects (a top-level `def test...`)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    return any(isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test") for node in tree.body)


def missing_invariants(names: Iterable[str], folder: Path = FOLDER) -> list[str]:
    """One line per technique in `names` (the registry's keys) without its invariants file, or whose file defines no test."""
    problems = []
    for name in sorted(names):
        path = invariants_file(name, folder)
        shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        if not path.is_file():
            problems.append(f"{name}: no invariants; add {shown} with its invariants as test functions")
        elif not defines_a_test(path):
            problems.append(f"{name}: {shown} defines no test function; state its invariants there as test_... functions")
    return problems


def test_every_registered_technique_has_its_invariants() -> None:
    problems = missing_invariants(techniques())
    assert not problems, "techniques without invariants:\n" + "\n".join(problems)


def test_the_check_names_a_technique_without_a_file() -> None:
    registry = {"dpo": techniques()["dpo"], "no-such-technique": None}
    assert missing_invariants(registry) == [
        "no-such-technique: no invariants; add tests/invariants/test_no_such_technique.py with its invariants as test functions"
    ]


def test_the_check_names_a_file_without_test_functions(tmp_path: Path) -> None:
    (tmp_path / "test_stated.py").write_text("def test_holds() -> None:\n    assert True\n")
    (tmp_path / "test_empty.py").write_text('"""Nothing yet."""\n\n\ndef helper() -> int:\n    return 1\n\n\ntest_value = 2\n')
    assert missing_invariants(["stated", "empty"], tmp_path) == [
        f"empty: {tmp_path / 'test_empty.py'} defines no test function; state its invariants there as test_... functions"
    ]
