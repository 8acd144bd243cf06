"""`import zoo` asks torch for huge pages on large CPU tensors, only as a default and only before torch loads."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def thp_after(code: str, env_value: str | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if env_value is not None:
        env["THP_MEM_ALLOC_ENABLE"] = env_value
    out = subprocess.run([sys.executable, "-c", code + "; import os; print(os.environ.get('THP_MEM_ALLOC_ENABLE'))"],
                         capture_output=True, text=True, cwd=ROOT, env=env, check=True)
    return out.stdout.strip().splitlines()[-1]


def test_import_zoo_first_turns_huge_pages_on_unless_the_user_set_it():
    assert thp_after("import zoo") == "1"
    assert thp_after("import zoo", env_value="0") == "0"  # the user's choice stands


def test_import_zoo_after_torch_changes_nothing():
    assert thp_after("import torch; import zoo") == "None"  # torch has read it already: setting it would mislead


def test_the_trainer_entry_point_imports_zoo_before_torch():
    code = ("import sys, train.pretrain as p; sys.argv = ['p', '--help']\n"
            "try:\n    p.main()\nexcept SystemExit:\n    pass")
    assert thp_after(code) == "1"
