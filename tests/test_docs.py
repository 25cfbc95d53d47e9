"""The docs say what the code does."""
import re
from pathlib import Path

from tpmax.sharding import sharding_markdown

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
    """docs/architecture.md: "Each depends only on the ones above it in this table" — every
    `from .x import` (lazy ones included) of a listed module names a module of its row or above."""
    import ast

    rows = [line for line in (ROOT / "docs" / "architecture.md").read_text().splitlines() if line.startswith("| `")]
    row_of = {m: i for i, line in enumerate(rows) for m in re.findall(r"`(\w+)\.py`", line.split(" | ")[0])}
    upward = []
    for module, row in row_of.items():
        path = ROOT / "tpmax" / f"{module}.py"
        if not path.exists():
            continue  # a row the docs still list after a rename: nothing to check
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                for target in [node.module] if node.module else [a.name for a in node.names]:
                    if row_of.get(target.split(".")[0], -1) > row:
                        upward.append(f"{module}.py:{node.lineno} imports {target}")
    assert len(row_of) > 15 and not upward, upward
