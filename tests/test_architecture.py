"""The layering of helpers/ is checked, not only described.

docs/ARCHITECTURE.md holds a table of the layers (one folder each, bottom first) and the layers each may import.
This test reads that table and every helpers/ source file's imports (top-level and lazy ones alike, read with ast),
and fails on an import that runs up the layers, an import cycle between modules, an eager import of a heavy or
CUDA-only package, or a lazy import of anything else.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HELPERS = REPO / "helpers"
DOC = REPO / "docs" / "ARCHITECTURE.md"

#: packages that may (and, for exllamav2, must) be imported inside functions: heavy to load, or CUDA-only
LAZY_OK = {"torch", "exllamav2", "transformers", "gguf", "matplotlib", "safetensors", "tqdm", "numpy", "pynvml",
           "psutil", "tokenizers", "IPython", "ipywidgets", "jsonschema", "pandas"}
#: must never be imported at module level (importing exllamav2 compiles its CUDA extension)
NEVER_EAGER = {"exllamav2"}


def allowed_edges() -> dict[str, set[str]]:
    """layer -> layers it may import, from the table between the markers in docs/ARCHITECTURE.md."""
    text = DOC.read_text()
    block = text.split("<!-- layers:begin -->", 1)[1].split("<!-- layers:end -->", 1)[0]
    edges: dict[str, set[str]] = {}
    for line in block.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        layer = cells[0].strip("`/").removesuffix(".py")
        may = set(re.findall(r"`([\w]+)/?`", cells[2]))
        edges[layer] = may
    return edges


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def sources() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(HELPERS.rglob("*.py"))}


def imports_of(path: Path, module: str, known: set[str]) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module level) for every import in the file; helpers' names resolved to modules."""
    tree = ast.parse(path.read_text(), str(path))
    top_level = {id(n) for n in tree.body}
    for node in tree.body:  # imports under a module-level `if`/`try` still run at import time
        if isinstance(node, (ast.If, ast.Try)):
            top_level.update(id(n) for n in ast.walk(node))
    out = []
    pkg = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno, id(node) in top_level) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = pkg.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append((sub if sub in known else base, node.lineno, id(node) in top_level))
    return out


def graph() -> dict[str, list[tuple[str, int, bool]]]:
    src = sources()
    known = set(src)
    return {m: imports_of(p, m, known) for m, p in src.items()}


def test_the_table_names_every_folder():
    edges = allowed_edges()
    layers = {layer_of(m) for m in sources()} - {"__init__"}
    assert layers - set(edges) == set(), f"layers missing from docs/ARCHITECTURE.md: {sorted(layers - set(edges))}"
    for layer, may in edges.items():
        assert may <= set(edges), f"{layer} may import unknown layers {sorted(may - set(edges))}"


def test_no_import_runs_up_the_layers():
    edges = allowed_edges()
    bad = []
    for mod, imps in graph().items():
        for target, line, _ in imps:
            if not target.startswith("helpers.") or layer_of(mod) == "__init__":
                continue
            src, dst = layer_of(mod), layer_of(target)
            if dst != src and dst not in edges.get(src, set()):
                bad.append(f"{mod}:{line} imports {target} ({src} may not import {dst})")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    g = {m: {t for t, _, _ in imps if t in sources() and t != m} for m, imps in graph().items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in sorted(g.get(m, ())):
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state and (cycle := visit(t)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(g):
        if m not in state and (cycle := visit(m)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_only_heavy_packages_are_imported_lazily_and_exllamav2_never_eagerly():
    bad = []
    for mod, imps in graph().items():
        for target, line, top in imps:
            root = target.split(".")[0]
            if top and root in NEVER_EAGER:
                bad.append(f"{mod}:{line} imports {target} at module level (it compiles CUDA code on import)")
            if not top and root not in LAZY_OK and not target.startswith("__future__"):
                bad.append(f"{mod}:{line} imports {target} inside a function; only {sorted(LAZY_OK)} may be lazy")
    assert not bad, "\n".join(bad)


def test_no_helpers_file_holds_more_than_one_room():
    long = [f"{p.relative_to(REPO)}: {n} lines" for p in HELPERS.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 700]
    assert not long, "files past 700 lines (split them by idea): " + ", ".join(long)


def test_one_front_door_to_exllamav2():
    sites = [str(p.relative_to(REPO)) for p in HELPERS.rglob("*.py") if "ExLlamaV2Config(" in p.read_text()]
    assert sites == ["helpers/engines/exllama.py"], sites


def test_the_checker_catches_what_it_should(tmp_path):
    """The graph reader itself: an upward import, a lazy import and a relative import are all seen."""
    pkg = tmp_path / "helpers"
    (pkg / "core").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "core" / "__init__.py").write_text("")
    (pkg / "core" / "a.py").write_text("from .b import x\n\ndef f():\n    import json\n    from helpers.cli import c\n")
    (pkg / "core" / "b.py").write_text("x = 1\n")
    known = {"helpers.core.a", "helpers.core.b", "helpers.cli.c"}
    imps = imports_of(pkg / "core" / "a.py", "helpers.core.a", known)
    assert ("helpers.core.b", 1, True) in [(t, ln, top) for t, ln, top in imps]
    assert ("json", 4, False) in imps and ("helpers.cli.c", 5, False) in imps
