"""Fixtures of the trainer tests."""

from pathlib import Path

import pytest

from train.config import parse_args
from train.trainer import Trainer

SOURCE_LM_WIDTH = 32  # d_model of `source_lm`: the d_in of the SAEs that read it


@pytest.fixture(scope="module")
def source_lm(tmp_path_factory) -> Path:
    """A tiny LM trained for a few steps by the common trainer: the SAEs read its block-1 output."""
    run = tmp_path_factory.mktemp("lm") / "run"
    cfg = parse_args(["lm-dense-tiny", "--set", f"d_model={SOURCE_LM_WIDTH}", "--set", "n_layers=2",
                      "--set", "n_heads=2", "--seq-len", "32", "--batch-size", "8", "--steps", "10",
                      "--eval-every", "10", "--eval-batches", "1", "--warmup-steps", "2", "--lr", "1e-2",
                      "--out", str(run)])
    return Path(Trainer(cfg).run()["final"])
