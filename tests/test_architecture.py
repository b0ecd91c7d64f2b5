"""The layout rules, checked on the source: no import cycle (imports inside functions included), no stage module
importing a command-line module, no module over 500 lines and no function over 60, and the stages talking to each
other in Python (no stage builds another command's argv)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("extract", "probes", "train")
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 500, 60


def _name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(["headprobe", *(parts[:-1] if parts[-1] == "__init__" else parts)])


def modules() -> dict[str, Path]:
    found = {_name(p): p for d in PACKAGES for p in (ROOT / d).rglob("*.py")}
    return {**found, "headprobe": ROOT / "__init__.py"}


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules ``path`` imports anywhere in its body (lazy imports too), resolved to module files."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            while name.startswith("headprobe") and name not in known and "." in name:
                name = name.rsplit(".", 1)[0]
            if name in known:
                out.add(name)
    return out


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {m: imports(p, known) - {m} for m, p in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def is_cli(module: str) -> bool:
    """A command-line module: ``cli.py`` or ``*_cli.py`` (a command's parser and its entry point)."""
    return module.endswith((".cli", "_cli"))


def test_the_import_graph_has_no_cycle():
    assert cycles(import_graph()) == []


def test_cycles_are_found_when_there_is_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_stage_imports_a_command_line_module():
    offenders = {m: sorted(d for d in deps if is_cli(d)) for m, deps in import_graph().items() if not is_cli(m)}
    assert {m: d for m, d in offenders.items() if d} == {}


def test_modules_and_functions_stay_small():
    too_long = []
    for module, path in modules().items():
        source = path.read_text()
        if source.count("\n") > MAX_MODULE_LINES:
            too_long.append(f"{module}: {source.count(chr(10))} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{module}.{node.name}: {length} lines")
    assert too_long == []


def test_no_stage_builds_a_command_line_for_another():
    """Stages call each other's functions: no module but the CLIs passes argv lists of `--option` strings to a
    parser or a command's entry point."""
    offenders = []
    for module, path in modules().items():
        if is_cli(module):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                    "parse_args", "expand_short_form"):
                offenders.append(f"{module}: line {node.lineno}")
    assert offenders == []
