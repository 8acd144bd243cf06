"""The README's catalog table, generated from the catalog so that it cannot drift.

`python -m zoo.docs` rewrites the table in README.md; a test fails when it is out of date.
"""

from __future__ import annotations

import sys
from pathlib import Path

from zoo.catalog import FAMILIES, list_models

BEGIN, END = "<!-- catalog:begin -->", "<!-- catalog:end -->"


def _fmt(n: float) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.0f}K"


def catalog_table() -> str:
    """Markdown table of every catalog entry with its size, parameters and FLOPs per token."""
    rows = ["| name | family | size | params (total / active) | fwd FLOPs/token | description |",
            "|---|---|---|---|---|---|"]
    for e in list_models():
        config_cls, model_cls = FAMILIES[e.family]
        import torch

        with torch.device("meta"):  # shapes only: no memory, no init
            cost = model_cls(config_cls(**e.config)).cost()
        rows.append(f"| `{e.name}` | {e.family} | {e.size} | {_fmt(cost['total_params'])} / "
                    f"{_fmt(cost['active_params'])} | {_fmt(cost['flops_per_token'])} @ {cost['seq_len']} | "
                    f"{e.description} |")
    return "\n".join(rows)


def render(readme: str) -> str:
    """README text with the block between the catalog markers replaced by the current table."""
    if BEGIN not in readme or END not in readme:
        raise ValueError(f"README.md lacks the markers {BEGIN} ... {END}")
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{catalog_table()}\n{END}{tail}"


def main() -> int:
    """Rewrite the catalog table of README.md in the current directory."""
    path = Path("README.md")
    path.write_text(render(path.read_text()))
    print(f"updated the catalog table in {path.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
