"""Imports go one way (notes/layers.md): a module imports from its own layer or the layers below it, never above.

`LAYERS` is the one table of the layers, bottom to top. The checker reads every module of the suite's packages
with `ast` (nothing is imported, so it takes a fraction of a second) and collects every import statement that
names one of the suite's modules: at module level, inside functions and under `if TYPE_CHECKING:` alike (a
type-only import is still a dependency of the code that reads it). An import naming a module of a higher layer
fails, with its file and line, the statement and both layers.
"""

from __future__ import annotations

import ast
import functools
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
UNLAYERED = ("tests",)  # test code may import every layer

# Bottom to top. A module belongs to the layer of the longest entry that is its name or the name of a package
# holding it: `modules` places the package itself, and any module of modules/ outside its four folders, with training.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("config", ("repro.config",)),
    ("nn", ("modules.nn",)),
    ("parallel", ("modules.parallel",)),
    ("decoding", ("modules.decoding",)),
    ("training", ("modules.training", "modules", "repro.checkpoints")),
    ("data", ("datamodules",)),
    ("evaluation", ("evaluation",)),
    ("reports", ("reports",)),
    ("measurement", ("measurement",)),
    ("techniques", ("repro",)),
    ("commands", ("benchmarks", "repro.run", "repro.compare", "repro.generate")),
)


@dataclass(frozen=True)
class Import:
    file: str  # relative to the root
    line: int
    statement: str
    module: str  # the importing module
    target: str  # the suite module it names


def suite_modules(root: Path) -> dict[str, Path]:
    """Dotted name -> file of every module of the packages at `root` (folders with an `__init__.py`)."""
    found = {}
    for package in sorted(p.parent for p in root.glob("*/__init__.py")):
        if package.name in UNLAYERED:
            continue
        for path in sorted(package.rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


@functools.cache
def parsed(root: Path) -> dict[str, tuple[Path, list[str], ast.Module]]:
    """Dotted name -> (file, its lines, its syntax tree) of every suite module; read once per root."""
    out = {}
    for name, path in suite_modules(root).items():
        text = path.read_text(encoding="utf-8")
        out[name] = (path, text.splitlines(), ast.parse(text, str(path)))
    return out


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, modules: dict, packages: set[str]) -> list[str]:
    """The suite modules an import statement names (a `from X import name` names X.name where that is a module, else X);
    a name under a suite package (`packages`) that is no module is returned as it is, for the caller to report."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative: from the importing module's package, one level up per extra dot
            here = module.split(".") if is_package else module.split(".")[:-1]
            base = ".".join(here[: len(here) - node.level + 1] + ([base] if base else []))
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
    return list(dict.fromkeys(name for name in names if name.split(".")[0] in packages))


def imports(root: Path) -> list[Import]:
    """Every import statement of the suite's modules that names a suite module (at module level, in a function or
    under `if TYPE_CHECKING:` alike), with where it stands."""
    modules = parsed(root)
    packages = {name.split(".")[0] for name in modules}
    found = []
    for module, (path, _, tree) in modules.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _targets(node, module, path.name == "__init__.py", modules, packages):
                    found.append(Import(str(path.relative_to(root)), node.lineno, ast.unparse(node), module, target))
    return sorted(found, key=lambda i: (i.file, i.line, i.target))


def layer_of(module: str, layers: tuple[tuple[str, tuple[str, ...]], ...] = LAYERS) -> int | None:
    """Index (0 = bottom) of the layer whose longest entry holds `module`; None when no entry does."""
    best = None
    for index, (_, entries) in enumerate(layers):
        for entry in entries:
            if (module == entry or module.startswith(entry + ".")) and (best is None or len(entry) > len(best[1])):
                best = (index, entry)
    return None if best is None else best[0]


def violations(root: Path, layers: tuple[tuple[str, tuple[str, ...]], ...] = LAYERS) -> list[str]:
    """One line per module outside every layer and per import that names a higher layer's module or no module."""
    modules = suite_modules(root)
    problems = [f"{path.relative_to(root)}: module {name} is in no layer; give it one in LAYERS (tests/test_layers.py)"
                for name, path in modules.items() if layer_of(name, layers) is None]
    for i in imports(root):
        if i.target not in modules:
            problems.append(f"{i.file}:{i.line}: `{i.statement}` names {i.target}, which is no module of the suite")
            continue
        low, high = layer_of(i.module, layers), layer_of(i.target, layers)
        if low is not None and high is not None and high > low:
            problems.append(f"{i.file}:{i.line}: `{i.statement}` imports upward: {i.module} is in layer "
                            f"{layers[low][0]}, {i.target} in layer {layers[high][0]} (above it)")
    return problems


def test_imports_go_one_way() -> None:
    problems = violations(ROOT)
    assert not problems, "imports against the layer order (notes/layers.md):\n" + "\n".join(problems)


def test_every_entry_places_a_module_and_every_package_is_packaged() -> None:
    """No stale entry in LAYERS, and the packages it layers are the ones pyproject.toml ships."""
    modules = suite_modules(ROOT)
    stale = [entry for _, entries in LAYERS for entry in entries
             if not any(m == entry or m.startswith(entry + ".") for m in modules)]
    assert not stale, f"LAYERS entries that name no module: {stale}"
    include = re.search(r"^include = \[(.*)\]$", (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    shipped = {name.strip(' "*') for name in include.split(",")}
    assert shipped == {name.split(".")[0] for name in modules}


def test_layers_md_lists_the_table() -> None:
    """notes/layers.md documents LAYERS row by row: the same layers in the same order, with the same entries."""
    rows = re.findall(r"^\| (\d+) \| (\w+) \| ([^|]+) \|", (ROOT / "notes" / "layers.md").read_text(), re.M)
    documented = [(name, tuple(re.findall(r"`([\w.]+)`", entries))) for _, name, entries in rows]
    assert documented == list(LAYERS)


def test_function_level_imports_say_why() -> None:
    """An import inside a function is for a heavy or optional dependency, and a comment on its line or just above
    its group of imports says so; an import that only dodged a cycle belongs at the top of its module."""
    silent = []
    for path, lines, tree in parsed(ROOT).values():
        inside = {id(n): n for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                  for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
        import_lines = {line for n in inside.values() for line in range(n.lineno, n.end_lineno + 1)}
        for node in sorted(inside.values(), key=lambda n: n.lineno):
            if any("#" in lines[line - 1] for line in range(node.lineno, node.end_lineno + 1)):
                continue
            above = node.lineno - 1  # walk up over the group's other imports and blank lines
            while above > 0 and (above in import_lines or not lines[above - 1].strip()):
                above -= 1
            if not lines[above - 1].strip().startswith("#"):
                silent.append(f"{path.relative_to(ROOT)}:{node.lineno}: `{ast.unparse(node)}`")
    assert not silent, "imports inside functions without a comment saying why:\n" + "\n".join(silent)


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_the_checker_names_an_upward_import(tmp_path: Path) -> None:
    """A layer of models that imports the runner, three ways (module level, in a function, for type checking only),
    a module outside every layer and an import of no module: each is one line naming file, line and layers."""
    _write(tmp_path, {
        "modules/__init__.py": "",
        "modules/nn/__init__.py": "from . import decoder\n",
        "modules/nn/decoder.py": ("from typing import TYPE_CHECKING\n\nfrom repro.runner import run\n"
                                  "from modules.nn import attention\n\nif TYPE_CHECKING:\n    from repro import runner\n\n\n"
                                  "def f():\n    from ..training.pretrain import step\n    import repro.runner\n"),
        "modules/nn/attention.py": "from modules.nn.decoder import Decoder\nimport modules.nn.moe\n",
        "modules/training/pretrain.py": "from repro.config import ConfigError\n",
        "repro/__init__.py": "",
        "repro/config.py": "",
        "repro/runner.py": "from modules.nn import decoder\n",
        "extra/__init__.py": "",
    })
    assert violations(tmp_path) == [
        "extra/__init__.py: module extra is in no layer; give it one in LAYERS (tests/test_layers.py)",
        "modules/nn/attention.py:2: `import modules.nn.moe` names modules.nn.moe, which is no module of the suite",
        "modules/nn/decoder.py:3: `from repro.runner import run` imports upward: modules.nn.decoder is in layer nn, "
        "repro.runner in layer techniques (above it)",
        "modules/nn/decoder.py:7: `from repro import runner` imports upward: modules.nn.decoder is in layer nn, "
        "repro.runner in layer techniques (above it)",
        "modules/nn/decoder.py:11: `from ..training.pretrain import step` imports upward: modules.nn.decoder is in layer nn, "
        "modules.training.pretrain in layer training (above it)",
        "modules/nn/decoder.py:12: `import repro.runner` imports upward: modules.nn.decoder is in layer nn, "
        "repro.runner in layer techniques (above it)",
    ]


def test_layer_of_takes_the_longest_entry() -> None:
    assert [LAYERS[layer_of(m)][0] for m in ("repro.config", "repro.runner", "repro.run", "modules.nn.moe", "modules.nn.quant",
                                             "modules.parallel.plan", "modules.parallel.pipeline.real",
                                             "modules.decoding.speculative", "modules.training.moe", "modules",
                                             "repro.checkpoints", "benchmarks.memory")] == [
        "config", "techniques", "commands", "nn", "nn", "parallel", "parallel", "decoding", "training", "training",
        "training", "commands"]
    assert layer_of("tests.test_layers") is None
