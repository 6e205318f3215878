"""The package layout: no import cycle between modules, no import between parts that tools/layout.py's ALLOWED does
not list (imports inside functions count: the graph is parsed with ast), and docs/architecture.md showing that same
data. Function and module sizes stay readable."""
import ast
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def layout():
    spec = importlib.util.spec_from_file_location("layout", ROOT / "tools" / "layout.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_no_import_cycles(layout):
    assert layout.cycles(layout.imports()) == []


def test_imports_follow_the_allowed_edges(layout):
    assert layout.violations(layout.imports()) == []


def test_every_part_is_in_the_layout(layout):
    parts = {layout.part(m) for m in layout.modules()} - {None}
    assert parts == set(layout.ALLOWED) == set(layout.ROLES)


def test_the_checker_sees_imports_inside_functions(layout, tmp_path, monkeypatch):
    """A function-level import that closes a cycle, and one that crosses a forbidden edge, are both found."""
    pkg = tmp_path / "trt_dm"
    for part in ("core", "runtime", "quant"):
        (pkg / part).mkdir(parents=True)
        (pkg / part / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "core" / "a.py").write_text("def f():\n    from trt_dm.core import b\n")
    (pkg / "core" / "b.py").write_text("from . import a\n")
    (pkg / "runtime" / "r.py").write_text("def g():\n    import trt_dm.quant.q\n")
    (pkg / "quant" / "q.py").write_text("")
    monkeypatch.setattr(layout, "ROOT", tmp_path)
    monkeypatch.setattr(layout, "PACKAGE", pkg)
    edges = layout.imports()
    assert layout.cycles(edges) == [["trt_dm.core.a", "trt_dm.core.b"]]
    assert layout.violations(edges) == ["trt_dm.runtime.r imports trt_dm.quant.q: runtime may not import quant"]


def test_runtime_and_serve_never_reach_quant_targets_or_the_builder(layout):
    """Transitively: what the runtime and the service import never leads to calibration, export or the builder."""
    edges = layout.imports()
    for start in [m for m in edges if layout.part(m) in ("runtime", "serve")]:
        seen, todo = set(), [start]
        while todo:
            for nxt in edges[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        assert not {layout.part(m) for m in seen} & {"quant", "export", "targets", "eval", "api", "cli"}, start


def test_architecture_doc_shows_the_layout_data(layout):
    section = layout.doc_section(layout.DOC.read_text())
    assert section == layout.render(), "run `python tools/layout.py --write`"


def test_functions_and_modules_stay_readable():
    """No function over 80 lines (one job each), no module over 520 (one file per job)."""
    long_functions, long_modules = [], []
    for path in sorted((ROOT / "trt_dm").rglob("*.py")):
        text = path.read_text()
        if len(text.splitlines()) > 520:
            long_modules.append(str(path.relative_to(ROOT)))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long_functions.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert long_functions == [] and long_modules == []
