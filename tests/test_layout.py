"""The package map of docs/CONTRACTS.md, enforced: which package may import which, no import cycles, the reader
never imports the writer, and `trainer.config` (what the CLI is built from) loads without torch or PIL."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# package -> the packages it may import (besides itself). Longest prefix wins; every module belongs to one.
ALLOWED = {
    "pipeline.core": set(),
    "pipeline.sources": {"pipeline.core"},
    "pipeline.cache": {"pipeline.core"},
    "pipeline.reader": {"pipeline.core", "pipeline.cache"},
    "pipeline.shards": {"pipeline.core", "pipeline.sources", "pipeline.reader"},
    "pipeline": {"pipeline.core", "pipeline.sources", "pipeline.cache", "pipeline.reader", "pipeline.shards"},
    "trainer.config": {"pipeline.core", "pipeline.shards.options", "pipeline.reader.backends.registry",
                       "trainer.options", "trainer.config_base", "trainer.config_commands"},
    "trainer.config_base": {"pipeline.core", "trainer.options"},
    "trainer.config_commands": {"pipeline.core", "pipeline.reader.backends.registry", "trainer.config_base"},
    "trainer.options": {"pipeline.core", "trainer.config", "trainer.config_base"},
    "trainer.engine": {"pipeline", "trainer.config", "trainer.options"},
    "trainer.report": {"pipeline", "trainer.config", "trainer.options", "trainer.engine"},
    "trainer.jobs": {"pipeline", "trainer.config", "trainer.options", "trainer.engine", "trainer.report"},
    "trainer.cli": {"pipeline", "trainer"},
    "trainer": set(),  # the package's __init__: a docstring
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def kdpipe_imports(path: Path) -> set[str]:
    """Every pipeline/trainer module this file imports, at the top or inside a function (a lazy import is still a
    dependency). `from pkg import name` counts as pkg.name when that is a module."""
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            if node.module.split(".")[0] in ("pipeline", "trainer"):
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    out.add(sub if sub in MODULES else node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] in ("pipeline", "trainer")}
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import; kdpipe imports by absolute name")
    return out


FILES = sorted(p for pkg in ("pipeline", "trainer") for p in (ROOT / pkg).rglob("*.py"))
MODULES = {module_name(p) for p in FILES}
GRAPH = {module_name(p): kdpipe_imports(p) for p in FILES}


def package_of(module: str, table: dict) -> str:
    return max((k for k in table if module == k or module.startswith(k + ".")), key=len)


def within(module: str, packages: set[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def test_every_import_follows_the_map():
    bad = []
    for mod, deps in GRAPH.items():
        own = package_of(mod, ALLOWED)
        for dep in deps:
            if not (within(dep, {own}) or within(dep, ALLOWED[own])):
                bad.append(f"{mod} -> {dep}")
    assert not bad, "imports against docs/CONTRACTS.md's map:\n" + "\n".join(sorted(bad))


def test_no_import_cycles():
    """Tarjan's strongly connected components over module imports (lazy ones included)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in GRAPH.get(v, ()):
            if w not in GRAPH or w == v:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_reader_never_imports_the_writer():
    readers = [m for m in GRAPH if m.startswith(("pipeline.reader", "pipeline.cache"))]
    assert readers
    for mod in readers:
        assert not any(d.startswith("pipeline.shards") for d in GRAPH[mod]), mod


def test_pipeline_never_imports_trainer():
    for mod, deps in GRAPH.items():
        if mod.startswith("pipeline"):
            assert not any(d.startswith("trainer") for d in deps), mod


@pytest.mark.parametrize("module", ["trainer.config", "trainer.options", "pipeline", "pipeline.shards.options"])
def test_light_modules_load_without_torch_or_pil(module):
    code = (f"import sys, {module}; heavy = [m for m in ('torch', 'PIL', 'torchvision', 'zarr') if m in sys.modules];"
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "", f"import {module} loaded {out.stdout.strip()}"


def test_the_map_covers_every_module_and_the_docs_show_it():
    for mod in MODULES:
        assert package_of(mod, ALLOWED)  # no module outside the map
    doc = (ROOT / "docs" / "CONTRACTS.md").read_text()
    for pkg in ALLOWED:
        assert f"`{pkg}`" in doc.split("\n## ", 2)[1], f"docs/CONTRACTS.md's map does not name {pkg}"


def test_every_public_name_of_pipeline_loads():
    code = "import pipeline; [getattr(pipeline, n) for n in pipeline.__all__]; print(len(pipeline.__all__))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert int(out.stdout) >= 10


def test_kdpipe_bench_loads_the_tools_package():
    from click.testing import CliRunner

    from trainer.cli import main

    res = CliRunner().invoke(main, ["bench", "train", "-h"])
    assert res.exit_code == 0 and "usage:" in res.output and "--students" in res.output
    assert "tools.bench_train" in sys.modules
