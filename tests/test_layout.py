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


def module_defs(package: str) -> dict[str, set[str]]:
    """Each module of flashlm.`package` (or "" for all of flashlm) -> the names it defines at
    module level (functions, classes, assigned names)."""
    out = {}
    for path in sorted((SRC / package).rglob("*.py")):
        module = ".".join(("flashlm", *path.relative_to(SRC).with_suffix("").parts)).removesuffix(".__init__")
        names: set[str] = set()
        for node in ast.parse(path.read_text(), str(path)).body:
            if isinstance(node, ast.FunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Assign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names.update(t.id for t in targets if isinstance(t, ast.Name))
        out[module] = names
    return out


def test_the_quant_format_sizes_are_defined_once():
    """The group size, the row / bundle byte counts and the store dtype -> format mapping live in
    flashlm.kernels.formats alone (the store format imports them)."""
    facts = {"GROUP", "QUANT_GROUP", "QUANT_DTYPES", "QUANT_FORMATS", "row_bytes", "quant_row_bytes", "data_bytes",
             "bundle_bytes"}
    where = {name: sorted(m for m, names in module_defs("").items() if name in names) for name in facts}
    assert {k: v for k, v in where.items() if v} == {
        "GROUP": ["flashlm.kernels.formats"], "QUANT_DTYPES": ["flashlm.kernels.formats"],
        "row_bytes": ["flashlm.kernels.formats"], "data_bytes": ["flashlm.kernels.formats"],
        "bundle_bytes": ["flashlm.kernels.formats"]}


def test_every_weight_quantiser_is_in_one_module():
    """Functions that quantise weights (quantize*, not the kernels' activation quantisation op)
    are all in flashlm.kernels.quantizers."""
    found = sorted(f"{m}.{n}" for m, names in module_defs("").items() for n in names
                   if (n.lstrip("_") == "quantize" or n.lstrip("_").startswith("quantize_")) and "activations" not in n
                   and m != "flashlm.kernels.quantizers")
    assert found == [], found


def test_the_format_facts_load_no_torch():
    """The store format (flashlm.io.format: bytes, not tensors) and the quant formats it reads its sizes
    from (flashlm.kernels.formats) import without torch."""
    import os
    import subprocess
    import sys

    code = ("import sys, flashlm.io.format, flashlm.kernels.formats; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch')[:3])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(SRC.parent)})
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize("package", ["models", "kernels", "io", "bench", "pipeline"])
def test_no_module_is_over_400_lines(package):
    long = {str(p.relative_to(SRC)): n for p in sorted((SRC / package).rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


def engine_privates() -> set[str]:
    """Engine's private names, read off the class: its `_methods` and the `self._x` it assigns."""
    tree = ast.parse((SRC / "pipeline" / "engine.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Engine")
    names = {n.name for n in cls.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
    for node in ast.walk(cls):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self" \
                and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def reaches(path: Path, names: set[str]) -> list[str]:
    """`x.name` for a name in `names` where x is not `self` (a class's own attribute of that name)."""
    return [f"{path.name}:{node.lineno} .{node.attr}" for node in ast.walk(ast.parse(path.read_text(), str(path)))
            if isinstance(node, ast.Attribute) and node.attr in names
            and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))]


def test_nothing_outside_the_engine_names_its_privates():
    """Everything but engine.py (generation.py, exact mode's start-up in streaming.py, the benches,
    tools and tests) uses the engine's public API (runner, sparse, caches, actors, trace, submit,
    new_window, check_open ...) or what the engine passes in, never a private `engine._x`."""
    privates = engine_privates()
    assert {"_sparse", "_runner", "_exact", "_trace", "_decoding", "_start"} <= privates, privates
    files = [*(f for f in sorted(SRC.rglob("*.py")) if f != SRC / "pipeline" / "engine.py"),
             *sorted((SRC.parent.parent / "tools").glob("*.py")), *sorted(Path(__file__).parent.glob("*.py"))]
    assert SRC / "pipeline" / "generation.py" in files and SRC / "pipeline" / "streaming.py" in files
    bad = [hit for f in files for hit in reaches(f, privates)]
    assert not bad, bad


def test_a_request_decodes_without_the_engine():
    """generation.py gets what it needs in a `Decoding` record: it imports nothing of the engine
    and its request state holds no engine."""
    tree = ast.parse((SRC / "pipeline" / "generation.py").read_text())
    imports = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "flashlm.pipeline.engine" not in imports and "flashlm" not in imports, imports
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | {
        n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    assert not {"engine", "Engine"} & names, names & {"engine", "Engine"}


SLOT_ARRAYS = {"slot_of", "neuron_of", "num_used"}


def test_only_the_cache_and_its_actor_touch_the_slot_arrays():
    """The compute side asks a NeuronCache narrow questions (slots, n_missing, can_append, n_held);
    its slot arrays are read and written only by neuron_cache.py and actors.py (their unit tests
    in test_neuron_cache.py inspect them too)."""
    owners = {SRC / "pipeline" / "neuron_cache.py", SRC / "pipeline" / "actors.py"}
    bad = [hit for f in sorted(SRC.rglob("*.py")) if f not in owners for hit in reaches(f, SLOT_ARRAYS)]
    assert not bad, bad


CACHE_MUTATORS = {"update", "mark_cached", "tidy", "commit", "clear", "drop_pending"}
DISTINCT_MUTATORS = {"mark_cached", "tidy", "drop_pending"}  # names no other class here uses


def bound_names(tree: ast.AST, kind: str, cls: str) -> set[str]:
    """Names a file binds to a `kind` (cache, actor): loop or comprehension targets over something
    named *kind*, and names assigned a `cls`(...)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.For | ast.AsyncFor | ast.comprehension) and kind in ast.unparse(node.iter).lower():
            names.update(n.id for n in ast.walk(node.target) if isinstance(n, ast.Name))
        elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and cls in ast.unparse(node.value.func):
            names.update(n.id for t in node.targets for n in ast.walk(t) if isinstance(n, ast.Name))
    return names


def looks_like(recv: ast.expr, kind: str, bound: set[str]) -> bool:
    return kind in ast.unparse(recv).lower() or (isinstance(recv, ast.Name) and recv.id in bound)


def cache_writes(source: str, name: str = "<src>") -> list[str]:
    """Calls of a NeuronCache's mutating methods on something that is a cache (named *cache*, or
    bound to one: `cache_names`), or of a mutator no other class has, on anything but self."""
    tree = ast.parse(source, name)
    bound = bound_names(tree, "cache", "NeuronCache")
    hits = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        recv, meth = node.func.value, node.func.attr
        if meth not in CACHE_MUTATORS or (isinstance(recv, ast.Name) and recv.id in ("self", "cls")):
            continue
        if meth in DISTINCT_MUTATORS or looks_like(recv, "cache", bound):
            hits.append((node.lineno, f"{name}:{node.lineno} {ast.unparse(recv)}.{meth}()"))
    return [h for _, h in sorted(hits)]


def actor_attributes() -> set[str]:
    """The attributes a LayerActor assigns itself (`self.x = ...` anywhere in the class)."""
    tree = ast.parse((SRC / "pipeline" / "actors.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "LayerActor")
    return {n.attr for n in ast.walk(cls) if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store)
            and isinstance(n.value, ast.Name) and n.value.id == "self"}


def attribute_writes(source: str, names: set[str], name: str = "<src>") -> list[str]:
    """`x.attr = ...` (or +=, or a tuple target) for an attr in `names`, x not self or cls: a
    private one on anything, a public one (layer, cache, inbox ...: common names) on something
    that is an actor (named *actor*, or bound to one)."""
    tree = ast.parse(source, name)
    bound = bound_names(tree, "actor", "LayerActor")
    return [f"{name}:{n.lineno} {ast.unparse(n)}" for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store) and n.attr in names
            and not (isinstance(n.value, ast.Name) and n.value.id in ("self", "cls"))
            and (n.attr.startswith("_") or looks_like(n.value, "actor", bound))]


def test_the_cache_and_actor_checks_see_what_they_look_for():
    from flashlm.pipeline.neuron_cache import NeuronCache

    assert all(callable(getattr(NeuronCache, m, None)) for m in CACHE_MUTATORS)
    bad = ("cache.update(ids, 0)\nself.caches[1].clear()\nfor c in runner.caches:\n    c.commit(plan)\n"
           "plans = [c.update(s, t) for c in caches]\nnc = NeuronCache(8, 4)\nnc.drop_pending()\n"
           "actor.tidy(3)\nd.update(x=1)\nself.update(ids, 0)\nh.commit()\n")
    assert [h.split(" ")[1] for h in cache_writes(bad)] == [
        "cache.update()", "self.caches[1].clear()", "c.commit()", "c.update()", "nc.drop_pending()", "actor.tidy()"]
    attrs = actor_attributes()
    assert {"inbox", "cache", "_handled", "_changes", "_trace"} <= attrs, attrs
    writes = ("actor.inbox = q\nself.actors[0]._handled += 1\na._trace, b = s, 1\nself._trace = s\n"
              "x = a._handled\nfor b in engine.actors:\n    b.cache = None\ne.layer = 3\n")
    assert [h.split(" ", 1)[1] for h in attribute_writes(writes, attrs)] == [
        "actor.inbox", "self.actors[0]._handled", "a._trace", "b.cache"]


def test_each_cache_has_one_writer_its_actor():
    """Only neuron_cache.py and actors.py change a NeuronCache (update, mark, tidy, commit, clear,
    drop); the compute side sends its actor a message and asks narrow questions. Nothing but the
    actor writes an actor's state: the sender counts what it sent in its own attributes, and
    `set_trace` is the actor's own method. (A cache's unit tests drive it directly: the
    mutator check covers src/ and tools/, the actor check tests too.)"""
    owners = {SRC / "pipeline" / "neuron_cache.py", SRC / "pipeline" / "actors.py"}
    code = [*(f for f in sorted(SRC.rglob("*.py")) if f not in owners),
            *sorted((SRC.parent.parent / "tools").glob("*.py"))]
    bad = [h for f in code for h in cache_writes(f.read_text(), f.name)]
    assert not bad, bad
    attrs = actor_attributes()
    bad = [h for f in [*code, *sorted(Path(__file__).parent.glob("*.py"))]
           for h in attribute_writes(f.read_text(), attrs, f.name)]
    assert not bad, bad
