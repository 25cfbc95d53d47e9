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
