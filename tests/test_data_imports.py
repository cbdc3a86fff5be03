"""data/ imports run one way: no module of data/ imports itself back through another (counting every import,
at any depth of the file, TYPE_CHECKING ones too), and none imports the project's top-level modules except
inside a command line's main() or its `if __name__ == "__main__"` block."""

import ast
from pathlib import Path

from conftest import ROOT

TOP_LEVEL = {p.stem for p in ROOT.glob("*.py")} | {"model", "kernels", "losses", "bench"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> dict[str, list[str]]:
    """{"anywhere": every data.* module imported, "module level": top-level project modules imported outside
    main() and the __main__ block}."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    allowed = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == "main" or \
                isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
            allowed |= {id(n) for n in ast.walk(node)}
    found = {"anywhere": [], "module level": []}
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
        if isinstance(node, ast.ImportFrom) and node.module == "data":
            names = [f"data.{a.name}" for a in node.names]
        for name in names:
            if name.startswith("data."):
                found["anywhere"].append(name)
            elif name.split(".")[0] in TOP_LEVEL and id(node) not in allowed:
                found["module level"].append(name)
    return found


def test_no_import_circle_in_data_and_nothing_above_it():
    modules = {module_name(p): imports(p) for p in sorted((ROOT / "data").rglob("*.py"))}
    graph = {m: {i for i in found["anywhere"] if i in modules and i != m} for m, found in modules.items()}
    assert {m: found["module level"] for m, found in modules.items() if found["module level"]} == {}

    def cycle_from(start: str, node: str, path: list[str]) -> list[str] | None:
        for nxt in graph[node]:
            if nxt == start:
                return [*path, nxt]
            if nxt not in path:
                found = cycle_from(start, nxt, [*path, nxt])
                if found:
                    return found
        return None

    cycles = [c for m in graph if (c := cycle_from(m, m, [m]))]
    assert cycles == [], " ; ".join(" -> ".join(c) for c in cycles)
