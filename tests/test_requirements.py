"""requirements.txt holds every package the project imports outside tests/ and bench/: what a user with
`pip install -r requirements.txt` alone runs (a plot module missing from it once ended the README's first
command after ten minutes of training)."""

import ast
import importlib.metadata
import re
import sys

from conftest import ROOT

OPTIONAL = {"flash_attn"}  # imported inside a try: the run goes on without it (docs/kernels.md)


def third_party_imports() -> dict[str, str]:
    """{top-level module: a file importing it} over the project's own code (tests/ and bench/ excluded)."""
    ours = {p.stem if p.suffix == ".py" else p.name for p in ROOT.iterdir()}
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        if path.relative_to(ROOT).parts[0] in ("tests", "bench", "runs", ".git"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            for name in names:
                top = name.split(".")[0]
                if top not in ours and top not in sys.stdlib_module_names and top not in OPTIONAL:
                    found.setdefault(top, str(path.relative_to(ROOT)))
    return found


def test_every_imported_package_is_a_runtime_requirement():
    listed = {re.split(r"[=<>~!;\s\[]", line.strip())[0].lower().replace("_", "-")
              for line in (ROOT / "requirements.txt").read_text().splitlines()
              if line.strip() and not line.lstrip().startswith("#")}
    distributions = importlib.metadata.packages_distributions()
    missing = {}
    for module, where in third_party_imports().items():
        names = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
        if not names & listed:
            missing[module] = where
    assert not missing, f"imported but not in requirements.txt: {missing}"
