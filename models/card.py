"""Model cards: the README.md of every zoo checkpoint."""

from __future__ import annotations

import json
import platform

import torch


def _fmt(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:g}"


def render_model_card(config, cost: dict, training: dict | None = None) -> str:
    """Markdown model card with Hub metadata, the architecture, its cost and (if given) how it was trained."""
    name = getattr(config, "zoo_name", None) or config.model_type
    lines = [
        "---",
        "library_name: sparse-model-zoo",
        "tags: [sparse-model-zoo, " + config.model_type + "]",
        "---",
        f"# {name}",
        "",
        "A checkpoint of the sparse model zoo (`pip install sparse-model-zoo`). Load it with",
        "",
        "```python",
        "from zoo import load",
        "model = load(\"<this folder or repo id>\")",
        "```",
        "",
        "or, after `import zoo`, with `transformers.AutoModelForCausalLM.from_pretrained`.",
        "",
        "## Cost",
        "",
        f"- total parameters: {_fmt(cost['total_params'])} ({cost['total_params']:,})",
        f"- active parameters per token: {_fmt(cost['active_params'])}",
        f"- forward FLOPs per token at sequence length {cost['seq_len']}: {_fmt(cost['flops_per_token'])}",
        "",
    ]
    if training:
        lines += ["## Training", ""]
        lines += [f"- {key}: {value}" for key, value in training.items() if not isinstance(value, dict)]
        for key, value in training.items():
            if isinstance(value, dict):
                lines += ["", f"### {key}", "", "```json", json.dumps(value, indent=2, sort_keys=True), "```"]
        lines.append("")
    lines += [
        "## Configuration",
        "",
        "```json",
        config.to_json_string(use_diff=False).strip(),
        "```",
        "",
        f"Written with torch {torch.__version__} on {platform.machine()}.",
        "",
    ]
    return "\n".join(lines)
