import re
from pathlib import Path

from zoo.docs import render

ROOT = Path(__file__).resolve().parent.parent


def test_readme_catalog_table_is_current():
    readme = (ROOT / "README.md").read_text()
    assert render(readme) == readme, "run `python -m zoo.docs` to regenerate the catalog table"


def test_ci_runs_the_test_command_the_readme_gives():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = re.search(r"^(pip install .*pytest.*)$", readme, re.M).group(1)
    assert command in ci.splitlines()
