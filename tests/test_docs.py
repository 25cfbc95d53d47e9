"""The docs say what the code does."""
import re
from pathlib import Path

from tpmax.core.sharding import sharding_markdown

ROOT = Path(__file__).parent.parent


def test_sharding_doc_is_the_table():
    text = (ROOT / "docs" / "sharding.md").read_text()
    table = re.search(r"<!-- table:begin -->\n(.*)<!-- table:end -->", text, re.S).group(1)
    assert table == sharding_markdown()


def test_readme_commands_and_ci_agree():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    test_cmd = re.search(r"Run the tests.*?```bash\n(.*?)\n```", readme, re.S).group(1).strip()
    assert test_cmd in ci


def test_every_test_named_in_claims_exists():
    """docs/claims.md maps each claim of the docs to tests: every test it names is a test
    function of that file, and every row names one or says why not (no test, measured)."""
    import ast

    text = (ROOT / "docs" / "claims.md").read_text()
    rows = [line for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| claim") and not line.startswith("| ---")]
    assert len(rows) > 50
    named = set()
    for row in rows:
        tests = re.findall(r"`(tests/[\w/]+\.py)::(test_\w+)`", row.split(" | ")[-1])
        assert tests or re.search(r"\*\*(no test|measured)\*\*", row), row
        named.update(tests)
    defined = {}
    for path in {p for p, _ in named}:
        tree = ast.parse((ROOT / path).read_text())  # a missing file fails here
        defined[path] = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    missing = sorted(f"{p}::{t}" for p, t in named if t not in defined[p])
    assert not missing, missing


def test_modules_import_only_modules_above_them_in_the_architecture_table():
    """docs/architecture.md: "Each module depends only on modules above it in this table" —
    every relative import (lazy ones included) of every module of the package names a module
    of its row or above; every module has a row."""
    import ast

    rows = [line.split(" | ")[0] for line in (ROOT / "docs" / "architecture.md").read_text().splitlines()
            if line.startswith("| `") or line.startswith("| **`")]
    row_of = {}
    for i, cell in enumerate(rows):
        for path in re.findall(r"`([\w/]+?)(?:\.py)?`", cell):
            row_of[path.rstrip("/").replace("/", ".")] = i  # "core.devices"; a folder ("kernels") as a whole

    def row(module: str) -> int:  # a module's row, or its folder's
        while module not in row_of and "." in module:
            module = module.rsplit(".", 1)[0]
        return row_of.get(module, -1)

    modules = {".".join(p.relative_to(ROOT / "tpmax").with_suffix("").parts): p
               for p in (ROOT / "tpmax").rglob("*.py") if p.name != "__init__.py"}
    assert not [m for m in modules if row(m) < 0], "modules without a row in docs/architecture.md"
    upward = []
    for module, path in modules.items():
        package = module.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package[:len(package) - node.level + 1]
                targets = [node.module] if node.module else [a.name for a in node.names]
                for t in targets:
                    target = ".".join(base + t.split("."))
                    if target and row(target) > row(module):
                        upward.append(f"{module}:{node.lineno} imports {target}")
    assert len(modules) > 30 and not upward, upward
