"""The package layout holds: no import cycles, and the model depends on the memory package alone."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "knnmem"
OFF_LIMITS_FOR_MODEL = ("faiss", "ray", "knnmem.store", "knnmem.ingest", "knnmem.train", "knnmem.eval", "knnmem.cli",
                        "knnmem.cluster")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, *, top_level_only: bool) -> set[str]:
    """Modules `path` imports (relative imports resolved), at module level only or anywhere."""
    tree = ast.parse(path.read_text())
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}  # `from . import module`
    return found


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def graph(top_level_only: bool) -> dict[str, set[str]]:
    return {name: {m for m in imports(path, top_level_only=top_level_only) if m in MODULES} - {name}
            for name, path in MODULES.items()}


def test_no_import_cycles_at_module_level():
    edges, cycles = graph(top_level_only=True), []

    def visit(node, stack):
        if node in stack:
            cycle = stack[stack.index(node):] + [node]
            # a package importing its own submodules, which import siblings, is not a cycle between modules
            if not all(a.startswith(b + ".") or b.startswith(a + ".") or a == b for a, b in zip(cycle, cycle[1:])):
                cycles.append(cycle)
            return
        for nxt in edges[node]:
            if not nxt.startswith(node + "."):  # a package's own submodules
                visit(nxt, stack + [node])

    for name in edges:
        visit(name, [])
    assert not cycles, cycles[:3]


def test_the_model_package_imports_neither_faiss_ray_nor_store_ingestion_training_eval_or_cluster():
    for name, path in MODULES.items():
        if name.startswith("knnmem.model"):
            bad = {m for m in imports(path, top_level_only=False) if m.startswith(OFF_LIMITS_FOR_MODEL)}
            assert not bad, f"{path} imports {sorted(bad)}"
    # nor does anything the model imports at module level, transitively
    edges = graph(top_level_only=True)
    seen, todo = set(), [n for n in MODULES if n.startswith("knnmem.model")]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += edges[name]
    reached = {m for name in seen for m in imports(MODULES[name], top_level_only=True)}
    assert not {m for m in reached if m.startswith(OFF_LIMITS_FOR_MODEL)}


def test_no_type_dispatch_on_backends_outside_the_memory_package():
    backends = r"(FaissBackend|DenseBackend|TorchTopKBackend|CrossBatchMemory)"
    pattern = re.compile(rf"isinstance\([^)]*{backends}|hasattr\(\s*\w*backend")
    for name, path in MODULES.items():
        if not name.startswith("knnmem.memory"):
            assert not pattern.search(path.read_text()), path
