"""The layout of docs/architecture.md: every module imports only from its own package and the layers
below it, no import cycle exists between modules (imports inside functions count), a method module
is self-contained, at most 12 modules sit loose at the package's top level, and every command the
README names answers --help."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "scbch_dist"

# docs/architecture.md's table: a unit (a top-level module or package) may import the units of lower layers
LAYERS = {
    "errors": 0,
    "atomic": 1, "cli": 1, "dist": 1,
    "digests": 2,
    "data": 3, "metrics": 3, "id_table": 3, "plots": 3, "knn": 3,
    "models": 4, "losses": 4, "run": 4,
    "methods": 5,
    "config": 6,
    "engine": 7,
    "train": 8, "retrieval": 8, "extract": 8,
    "experiments": 9, "evaluate": 9, "refit": 9,
}
# the pure parts: no process group, no training state (docs/objective.md, docs/evaluation.md). The
# losses' neighbour reference is knn.exact_topk; knn's sharded search is a collective, so the rest of
# knn stays free of it
PURE = {"losses": ("scbch_dist.dist", "torch.distributed", "scbch_dist.knn.sharded", "scbch_dist.id_table",
                   "scbch_dist.data"),
        "metrics": ("scbch_dist.dist", "torch.distributed"),
        "knn/__init__.py": ("scbch_dist.dist", "torch.distributed", "scbch_dist.knn.sharded"),
        "knn/backends.py": ("scbch_dist.dist", "torch.distributed", "scbch_dist.knn.sharded"),
        "knn/exact.py": ("scbch_dist.dist", "torch.distributed"),
        "knn/settings.py": ("scbch_dist.dist", "torch.distributed")}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def resolve(name: str) -> str:
    """The module an imported name lives in (``scbch_dist.knn.knn`` -> ``scbch_dist.knn``)."""
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name if name in MODULES else ""


def run_time_tree(path: Path) -> ast.Module:
    """A file's syntax tree without its ``if TYPE_CHECKING:`` blocks (imports for annotations only:
    the methods name the config's type that way, while the config imports the methods)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            node.body = []
    return tree


def imports_of(path: Path) -> set[str]:
    """The scbch_dist modules a file imports at run time, at any depth (function-level imports too)."""
    found = set()
    for node in ast.walk(run_time_tree(path)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("scbch_dist"):
            found.update(resolve(f"{node.module}.{a.name}") or resolve(node.module) for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(resolve(a.name) for a in node.names if a.name.startswith("scbch_dist"))
    return found - {"", module_name(path)}


def raw_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(run_time_tree(path)):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.update({node.module, *(f"{node.module}.{a.name}" for a in node.names)})
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


GRAPH = {name: imports_of(path) for name, path in MODULES.items()}


def unit(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def test_every_unit_has_a_layer():
    units = {unit(m) for m in MODULES} - {""}
    assert units == set(LAYERS), f"add to LAYERS and docs/architecture.md: {sorted(units ^ set(LAYERS))}"


def test_no_module_imports_upward():
    upward = sorted(f"{m} imports {t}" for m, targets in GRAPH.items() for t in targets
                    if unit(m) and unit(t) != unit(m) and LAYERS[unit(t)] >= LAYERS[unit(m)])
    assert not upward, upward


def test_no_import_cycle():
    """Tarjan's strongly connected components over the module graph: every one a single module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert not cycles, cycles


@pytest.mark.parametrize("part, forbidden", PURE.items(), ids=list(PURE))
def test_the_pure_modules_reach_no_process_group(part, forbidden):
    target = PACKAGE / part
    paths = sorted(target.rglob("*.py")) if target.is_dir() else [target]
    broken = sorted(f"{p.relative_to(PACKAGE)} imports {m}" for p in paths for m in raw_imports(p)
                    if m.startswith(forbidden))
    assert not broken, broken


def test_a_method_module_is_self_contained():
    """A method imports the method interface and the library below it: never another method, the
    config module, the engine or an entry point (docs/methods.md, "Adding a method")."""
    methods = PACKAGE / "methods"
    own = {module_name(p) for p in methods.glob("*.py")}
    shared = {"scbch_dist.methods.base"}
    for path in sorted(methods.glob("*.py")):
        name = module_name(path)
        if name in shared | {"scbch_dist.methods"}:
            continue
        others = sorted(t for t in GRAPH[name] if t in own and t not in shared)
        assert not others, f"{name} imports {others}"


def test_at_most_twelve_modules_sit_loose_at_the_top_level():
    loose = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
    assert len(loose) <= 12, loose


def test_the_entry_point_reads_as_a_table_of_contents():
    tree = ast.parse((PACKAGE / "train.py").read_text())
    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    assert main.end_lineno - main.lineno + 1 <= 50


README_COMMANDS = sorted(set(re.findall(r"python -m (scbch_dist(?:\.\w+)+)", (ROOT / "README.md").read_text())))


def test_the_readme_names_the_commands():
    jobs = {"scbch_dist.train", "scbch_dist.data.convert", "scbch_dist.retrieval.index", "scbch_dist.retrieval.search",
            "scbch_dist.retrieval.serve", "scbch_dist.experiments.report"}
    assert jobs <= set(README_COMMANDS), sorted(jobs - set(README_COMMANDS))


@pytest.mark.parametrize("module", README_COMMANDS)
def test_every_readme_command_answers_help(module, capsys):
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_every_console_command_names_a_module_with_main():
    """pyproject's [project.scripts] point at each job's ``console`` (cli.run around ``main``)."""
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"scbch-train", "scbch-index", "scbch-search", "scbch-serve", "scbch-extract", "scbch-convert",
            "scbch-report", "scbch-sweep"} <= set(scripts)
    for command, target in scripts.items():
        module, function = target.split(":")
        loaded = importlib.import_module(module)
        assert callable(getattr(loaded, function)) and callable(loaded.main), command


def test_the_readme_names_every_console_command():
    """pyproject's [project.scripts] against the README's list (scbch-evaluate was missing)."""
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    readme = (ROOT / "README.md").read_text()
    assert [name for name in scripts if f"`{name}`" not in readme] == []


def test_the_readme_is_a_front_door():
    """At most 250 lines (it had grown to 296): the detail lives in docs/, and every local link of
    the README names a file that exists and, with an anchor, a heading of it."""
    import re

    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]+))?\)", readme):
        if target.startswith("http"):
            continue
        page = ROOT / target if target else ROOT / "README.md"
        assert page.is_file(), target
        if anchor:
            slugs = {re.sub(r"[^a-z0-9 _-]", "", h.strip().lower()).replace(" ", "-")
                     for h in re.findall(r"^#+ (.+)$", page.read_text(), flags=re.M)}
            slugs |= set(re.findall(r'<a id="([^"]+)"', page.read_text()))
            assert anchor in slugs, f"{target}#{anchor}"


def test_the_engine_names_every_module_it_holds():
    """engine/__init__.py's list of its modules named 7 of 11: it names each module there is."""
    import scbch_dist.engine as engine

    listed = {line.split()[0] for line in engine.__doc__.splitlines() if line.startswith("    ") and line.split()}
    assert listed == {p.stem for p in (PACKAGE / "engine").glob("*.py") if p.stem != "__init__"}


def code_strings(path: Path) -> list[tuple[int, str]]:
    """The string constants of a file's code (f-string parts included), docstrings left out."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body
                  and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def test_only_the_run_folder_type_names_a_runs_codes_and_summary():
    """run/folder.py's RunFolder is where a run's codes.npz and summary.json live: every other module
    reaches them through it, so that renaming or moving one is one edit."""
    from scbch_dist.run import RunFolder

    home = PACKAGE / "run" / "folder.py"
    names = (RunFolder.CODES, RunFolder.SUMMARY)
    assert names == ("codes.npz", "summary.json")
    named = [f"{path.relative_to(ROOT)}:{line}: {text[:60]!r}" for path in MODULES.values() if path != home
             for line, text in code_strings(path) if any(name in text for name in names)]
    assert not named, "\n".join(named)
    assert any(RunFolder.CODES in text for _, text in code_strings(home))
