"""The package's shape: no import cycles, short functions, no repeated blocks, a light ``import grouter``.

These read the source with ``ast``; they guard the code-style rules of the project (one place per
concept, functions that fit a screen) so that they hold after every change, not only after a review.
"""

import ast
import importlib
import importlib.util
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "grouter"
MAX_FUNCTION_LINES = 80
REPEAT_LINES = 6


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def package_imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``name`` imports, anywhere in the file (function-level too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            candidates = [base] + [f"{base}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        found |= {c for c in candidates if c in known and c != name}
    return found - {"grouter"}  # the package's __init__ imports nothing eagerly


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles():
    mods = modules()
    graph = {name: package_imports(name, path, set(mods)) for name, path in mods.items()}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def function_lengths() -> list[tuple[int, str]]:
    out = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out.append((node.end_lineno - node.lineno + 1, f"{name}.{node.name}"))
    return sorted(out, reverse=True)


def test_functions_fit_a_screen():
    too_long = [(n, f) for n, f in function_lengths() if n >= MAX_FUNCTION_LINES]
    assert not too_long, f"functions of {MAX_FUNCTION_LINES}+ lines: {too_long}"


def code_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, normalised text) of the lines that carry code: no blanks, comments, docstring
    text, imports or lone brackets; argparse declarations are left out (they repeat by nature)."""
    tree = ast.parse(path.read_text())
    doc = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(
                getattr(body[0], "value", None), ast.Constant) and isinstance(body[0].value.value, str):
            doc |= set(range(body[0].lineno, body[0].end_lineno + 1))
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        text = " ".join(line.split("#")[0].split()) if not line.strip().startswith("#") else ""
        if (i in doc or not text or re.fullmatch(r"[\])}(\[{,:]+", text) or text.startswith(("import ", "from "))
                or "add_argument(" in text):
            continue
        out.append((i, text))
    return out


def repeated_blocks(paths: list[Path]) -> list[str]:
    """Every run of ``REPEAT_LINES`` code lines found at more than one place (within a file too)."""
    seen: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for path in paths:
        lines = code_lines(path)
        for j in range(len(lines) - REPEAT_LINES + 1):
            window = lines[j:j + REPEAT_LINES]
            seen[tuple(t for _, t in window)].append(f"{path.name}:{window[0][0]}")
    return [" and ".join(places) for places in seen.values() if len(places) > 1]


def test_no_repeated_blocks():
    found = repeated_blocks(list(modules().values()))
    assert not found, f"blocks of {REPEAT_LINES}+ identical code lines: " + "; ".join(found)


def test_repeated_blocks_are_found(tmp_path):
    body = "".join(f"    x{i} = f(x, {i})  # step {i}\n" for i in range(REPEAT_LINES))
    (tmp_path / "a.py").write_text(f"def a(x):\n{body}    return x\n")
    (tmp_path / "b.py").write_text(f'def b(x):\n    """Doc."""\n\n{body}    return x\n')
    assert "a.py:2 and b.py:4" in repeated_blocks([tmp_path / "a.py", tmp_path / "b.py"])
    (tmp_path / "b.py").write_text(f"def b(x):\n{body.replace('x3 =', 'y3 =')}    return x\n")
    assert repeated_blocks([tmp_path / "a.py", tmp_path / "b.py"]) == []


ROOT = SRC.parent
TEXT_DIRS = ("src", "tests", "benchmarks", "docs", "examples")


def text_files() -> list[Path]:
    """The repository's code and prose: every .py and .md file (but generated study results)."""
    found = [ROOT / "README.md"]
    for d in TEXT_DIRS:
        found += [p for p in sorted((ROOT / d).rglob("*")) if p.suffix in (".py", ".md") and "study/cells" not in str(p)]
    return found


def test_no_references_outside_the_repository():
    for path in text_files():
        if path == Path(__file__).resolve():  # this check names what it looks for
            continue
        assert not re.search(r"SPEC ?§|\.\./SPEC|shared/SPEC", path.read_text()), f"{path} points to SPEC"


def unresolved(name: str) -> bool:
    """Whether a dotted name (grouter.a.b.c) names no module or attribute of the package."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        module = ".".join(parts[:cut])
        try:
            obj = importlib.import_module(module)
        except ImportError:
            continue
        except Exception:  # it exists, but refuses to load here (an engine entry point needing a newer engine)
            return importlib.util.find_spec(module) is None
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return True
            obj = getattr(obj, attr)
        return False
    return True


def test_dotted_names_in_code_and_docs_exist():
    """Every dotted grouter name (grouter.x.y) that the code's docstrings, the docs, the benchmarks and
    the examples name in backquotes is still there: a module moved or renamed is found here, not by a
    reader."""
    stale = []
    for path in text_files():
        for name in set(re.findall(r"(?<=[`~])grouter(?:\.[A-Za-z_]\w*)+", path.read_text())):
            if unresolved(name.rstrip(".")):
                stale.append(f"{path.relative_to(ROOT)}: {name}")
    assert not stale, stale


FORMAT_MAY_IMPORT = {"grouter", "grouter.errors", "grouter.artifacts", "grouter.integrity", "grouter.routers",
                     "grouter.losses", "grouter.chunking", "grouter.options"}


@pytest.mark.parametrize("name", sorted(m for m in modules() if m.startswith("grouter.formats.")))
def test_a_format_imports_no_stage_and_no_heavy_library(name):
    """An engine adapter that reads a store and a plan pulls in nothing else (grouter.formats)."""
    code = (f"import sys, {name}; print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('scipy', 'matplotlib', 'transformers', 'sklearn') or (m.startswith('grouter') "
            "and not m.startswith('grouter.formats'))))")
    loaded = eval(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert set(loaded) <= FORMAT_MAY_IMPORT, set(loaded) - FORMAT_MAY_IMPORT


def test_the_readme_maps_every_module():
    text = (ROOT / "README.md").read_text()
    where = text[text.index("## What is where"):]
    where = where[:where.index("\n## ", 4)] if "\n## " in where[4:] else where
    missing = [m.removeprefix("grouter.") for m in modules() if m != "grouter" and not m.endswith("__main__")
               and f"`{m.removeprefix('grouter.')}`" not in where]
    assert not missing, f"README's 'What is where' leaves out {missing}"


def test_import_grouter_is_light_and_exports_the_interface():
    code = ("import sys, grouter; light = 'torch' not in sys.modules; "
            "from grouter import Grouter, RoutingStore, GrouterError, Routing, MoELM, Plan, PlanSampler; "
            "print(light, Grouter.__module__, RoutingStore.__module__, sorted(grouter.__all__) == grouter.__all__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "grouter.network", "grouter.formats.store", "True"]
    with pytest.raises(AttributeError, match="no attribute 'Nothing'"):
        import grouter

        grouter.Nothing  # noqa: B018
