"""The layering of docs/engine.md: dependencies point one way (library <- methods <- engine <- train),
data never imports models, and the pure modules reach no process group and no training state."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "scbch_dist"


def imports_of(path: Path) -> set[str]:
    """Every scbch_dist module (or torch.distributed) a file imports, at any depth in the file."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m.startswith(("scbch_dist", "torch.distributed"))}


def modules(*parts: str) -> list[Path]:
    out = []
    for part in parts:
        target = PACKAGE / part
        out += sorted(target.rglob("*.py")) if target.is_dir() else [target]
    return out


RULES = [
    # (files, forbidden import prefixes)
    (("data",), ("scbch_dist.models", "scbch_dist.engine", "scbch_dist.methods", "scbch_dist.train")),
    (("losses", "metrics.py"), ("scbch_dist.dist", "torch.distributed", "scbch_dist.knn", "scbch_dist.id_table",
                                "scbch_dist.data", "scbch_dist.engine", "scbch_dist.methods")),
    (("knn/backends.py",), ("scbch_dist.dist", "torch.distributed", "scbch_dist.engine", "scbch_dist.methods")),
    (("models", "id_table.py", "dist.py", "config.py"), ("scbch_dist.engine", "scbch_dist.methods", "scbch_dist.train")),
    (("methods",), ("scbch_dist.engine", "scbch_dist.train")),
    (("engine",), ("scbch_dist.train",)),
]


@pytest.mark.parametrize("parts, forbidden", RULES, ids=["+".join(r[0]) for r in RULES])
def test_dependencies_point_one_way(parts, forbidden):
    broken = {f"{path.relative_to(PACKAGE)} imports {m}" for path in modules(*parts) for m in imports_of(path)
              if m.startswith(forbidden)}
    assert not broken, sorted(broken)


def test_the_entry_point_reads_as_a_table_of_contents():
    tree = ast.parse((PACKAGE / "train.py").read_text())
    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    assert main.end_lineno - main.lineno + 1 <= 50
