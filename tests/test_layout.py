"""The layering, read from the source: the engine's lower layers never import the ones above them
(io/ and models/ know nothing of the engine, the benchmarks or the surfaces; pipeline/ nothing of
the benchmarks)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "flashlm"
SURFACES = ("flashlm.pipeline", "flashlm.bench", "flashlm.tui", "flashlm.cli")
RULES = [("io", SURFACES), ("models", SURFACES), ("pipeline", ("flashlm.bench",))]


def imports(package: str) -> dict[str, set[str]]:
    """Each module of flashlm.`package` -> every name it imports, anywhere in the file (inside
    functions too), relative imports made absolute; `from a import b` gives both a and a.b."""
    found = {}
    for path in sorted((SRC / package).rglob("*.py")):
        module = ".".join(("flashlm", *path.relative_to(SRC).with_suffix("").parts)).removesuffix(".__init__")
        here = module if path.name == "__init__.py" else module.rpartition(".")[0]
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = ".".join(here.split(".")[: len(here.split(".")) - node.level + 1])
                    base = f"{up}.{base}" if base else up
                names.add(base)
                names.update(f"{base}.{a.name}" for a in node.names)
        found[module] = names
    return found


def test_the_walk_sees_the_imports():
    assert "flashlm.io.format" in imports("io")["flashlm.io.reader"]
    assert "flashlm.pipeline.actors" in imports("pipeline")["flashlm.pipeline.sparse"]


@pytest.mark.parametrize("package,banned", RULES, ids=[p for p, _ in RULES])
def test_a_layer_imports_nothing_above_it(package, banned):
    bad = sorted(f"{module} imports {name}" for module, names in imports(package).items() for name in names
                 if any(name == b or name.startswith(b + ".") for b in banned))
    assert not bad, bad
