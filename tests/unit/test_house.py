"""The house rules a newcomer can rely on (STYLE.md): the package's modules import one way, with no cycle; its
docstrings and comments say what and why, with the evidence in docs/ and reports/; and only ftcluster/patches.py
imports another library's private modules."""

import ast
import io
import re
import tokenize
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "ftcluster"
LAB_NOTES = re.compile(r"20\d\d-\d\d-\d\d"  # a date
                       r"|reports/"  # a path into the reports
                       r"|\bH[12]00\b"  # a GPU host's measurement
                       r"|\bhost [A-H]\b"
                       r"|\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*\d)[0-9a-f]{7,40}\b")  # a commit hash


def modules() -> dict[str, Path]:
    return {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
            for p in PACKAGE.rglob("*.py")}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The package's modules ``path`` imports anywhere (in functions too), except under ``if TYPE_CHECKING``."""
    tree = ast.parse(path.read_text())
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
               and getattr(node.test, "id", getattr(node.test, "attr", "")) == "TYPE_CHECKING"
               for n in ast.walk(node)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ftcluster"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                out.add(full if full in known else node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("ftcluster")}
    return {m for m in out if m in known}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_package_imports_one_way():
    mods = modules()
    # A package imports its submodules only to say what they are: its own name is not a dependency.
    graph = {m: imports_of(p, set(mods)) - {m} - {m.rsplit(".", 1)[0]} for m, p in mods.items()}
    assert cycles(graph) == []
    assert cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]  # the check itself finds one


def _docs_and_comments(path: Path):
    source = path.read_text()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            yield node.lineno, node.value.value  # docstrings, of modules, classes, functions and attributes
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            yield tok.start[0], tok.string


def test_docstrings_and_comments_hold_no_lab_notes():
    """No dates, report paths, commit hashes or GPU hosts' measurements in the package's prose: those belong in
    docs/ and reports/, which the prose may point to."""
    notes = [f"{path.relative_to(PACKAGE.parent)}:{line}: {m.group(0)}" for path in sorted(PACKAGE.rglob("*.py"))
             for line, text in _docs_and_comments(path) for m in LAB_NOTES.finditer(text)]
    assert notes == []
    assert LAB_NOTES.search("0.3 s on an H200, reports/x/2026-11-27-1xh200, at 9f5ca73")  # the check itself


def test_only_the_patches_module_imports_private_modules_of_other_libraries():
    private = re.compile(r"^(ray|deepspeed|transformers|bitsandbytes|peft|liger_kernel|torch)(\.[^.]+)*\._")
    assert private.match("torch._functorch.config.") and private.match("ray.train.v2._internal.execution.")
    found = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "patches.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            found += [f"{path.name}: {n}" for n in names if private.match(n + ".")]
    assert found == []
