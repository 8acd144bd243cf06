"""The trainer's settings: one dataclass, filled from command-line flags and/or a YAML/JSON file."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from train.data import VAL_SPLITS


@dataclass
class TrainConfig:
    """Everything a training run needs besides the model's own config."""

    model: str = "lm-dense-tiny"  # catalog name, checkpoint folder or Hub repo id (fine-tuning)
    model_overrides: dict = field(default_factory=dict)  # model config fields, e.g. {"n_layers": 2}
    data: list[str] | None = None  # None: the bundled corpus; else files/globs or one Hub dataset name
    data_config: str | None = None  # the Hub dataset's config (subset), e.g. "wikitext-2-raw-v1"
    split: str = "train"  # the Hub dataset's split to train on
    streaming: bool = False  # stream the Hub dataset: read and tokenize only the tokens the run uses
    text_column: str = "text"  # the column (JSONL field, Parquet column) that holds the documents
    out: str | None = None  # run folder; default runs/<model name>
    steps: int = 300
    batch_size: int = 16  # sequences per optimizer step, across all ranks and micro-batches
    grad_accum: int = 1  # micro-batches per step (on each rank)
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 30
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # 0 disables clipping
    eval_every: int = 100
    eval_batches: int = 20  # validation batches per evaluation (0: the whole split)
    checkpoint_every: int = 100
    keep_last: int = 3
    seed: int = 0
    resume: str | None = None  # a run folder: continue from its newest valid checkpoint
    wandb_project: str | None = None
    compile: bool = False
    fsdp: bool = False
    device: str | None = None  # default: cuda if available, else cpu
    val_fraction: float = 0.05
    # How validation blocks are held out (train/data.py validation_blocks): "interleaved" (new runs) or "tail"
    # (the last val_fraction of the corpus: runs made before the interleaved split). None: "interleaved" for a
    # new run; a resumed run keeps its checkpoint's (the Trainer fills it in before loading the data).
    val_split: str | None = None
    log_every: int = 10
    force_download: bool = False  # download a Hub --model again even if cached (repairs a damaged cache)
    allow_change: list[str] = field(default_factory=list)  # --resume: settings allowed to differ (FREE_ON_RESUME)

    def __post_init__(self):
        checks = [
            ("steps", self.steps >= 1, ">= 1"), ("batch_size", self.batch_size >= 1, ">= 1"),
            ("grad_accum", self.grad_accum >= 1, ">= 1"), ("seq_len", self.seq_len >= 1, ">= 1"),
            ("lr", self.lr > 0, "> 0"), ("warmup_steps", self.warmup_steps >= 0, ">= 0"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"), ("grad_clip", self.grad_clip >= 0, ">= 0"),
            ("eval_every", self.eval_every >= 1, ">= 1"), ("checkpoint_every", self.checkpoint_every >= 1, ">= 1"),
            ("keep_last", self.keep_last >= 1, ">= 1"), ("eval_batches", self.eval_batches >= 0, ">= 0"),
            ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "in [0, 1]"),
            ("val_fraction", 0 < self.val_fraction < 1, "in (0, 1)"), ("log_every", self.log_every >= 1, ">= 1"),
        ]
        # NaN passes no comparison but inf passes "> 0": every float setting must be finite first.
        floats = [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self) if f.type == "float"]
        floats += [("betas", beta) for beta in self.betas]
        for name, value in floats:
            if not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise ValueError(f"--{name.replace('_', '-')} = {value!r} is invalid: must be a finite number")
        checks.append(("betas", len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
                       "two numbers in [0, 1)"))
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"--{name.replace('_', '-')} = {getattr(self, name)!r} is invalid: must be {allowed}")
        if self.val_split not in (None, *VAL_SPLITS):
            raise ValueError(f"--val-split = {self.val_split!r} is invalid: must be one of {', '.join(VAL_SPLITS)}")
        if not self.text_column:
            raise ValueError("--text-column must name a column, got an empty string")
        if isinstance(self.data, str):
            self.data = [self.data]
        self.betas = tuple(self.betas)
        self.allow_change = [self.allow_change] if isinstance(self.allow_change, str) else list(self.allow_change)

    @property
    def run_dir(self) -> Path:
        """The run folder (checkpoints, metrics log, final Hub checkpoint in final/)."""
        if self.out:
            return Path(self.out)
        return Path("runs") / Path(self.model.rstrip("/")).name

    def to_dict(self) -> dict:
        """JSON-ready dict of every setting."""
        return dataclasses.asdict(self)


HELP = {
    "model": "catalog name (fresh weights), checkpoint folder or Hub repo id to start from",
    "data": "text/JSONL/Parquet files or globs, or a Hub dataset name (default: the bundled Jargon File)",
    "out": "run folder (default runs/MODEL); the final Hub checkpoint goes to OUT/final",
    "resume": "continue from the newest valid checkpoint of this run folder",
    "wandb_project": "log to Weights & Biases (offline when no API key is set)",
    "compile": "torch.compile the model",
    "fsdp": "shard parameters with FSDP2 (fully_shard) instead of DDP under torchrun",
    "grad_accum": "micro-batches per optimizer step on each rank",
    "batch_size": "sequences per optimizer step, summed over ranks and micro-batches",
    "eval_batches": "validation batches per evaluation (0: the whole split)",
    "steps": "optimizer steps",
    "seq_len": "tokens per training sequence",
    "lr": "peak learning rate: linear warmup, then cosine decay to lr * min-lr-ratio",
    "min_lr_ratio": "final learning rate as a fraction of --lr",
    "warmup_steps": "steps of linear warmup",
    "weight_decay": "AdamW weight decay of the weight matrices (not of norms, biases, embeddings)",
    "grad_clip": "clip the global gradient norm to this (0: off)",
    "eval_every": "evaluate on the validation split every N steps (and at the end)",
    "checkpoint_every": "save a resumable checkpoint every N steps (and on Ctrl-C)",
    "keep_last": "resumable checkpoints kept in the run folder",
    "seed": "seed of the weights and of the batch order",
    "device": "cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)",
    "val_fraction": "fraction of the corpus held out for validation",
    "val_split": "how validation blocks are held out: 'interleaved' (every 1/val-fraction-th block of "
                 "seq-len tokens, the same for every seed and model; default for a new run) or 'tail' (the "
                 "last val-fraction of the corpus, the split of runs made before); --resume keeps the run's",
    "data_config": "config (subset) of a Hub --data dataset, e.g. wikitext-2-raw-v1 (also as --data org/name:config)",
    "split": "split of a Hub --data dataset to train on (default train); local files are read whole",
    "streaming": "stream a Hub --data dataset instead of downloading it whole: only the tokens the run needs "
                 "(steps x batch size blocks and the validation blocks) are read and tokenized",
    "text_column": "column (JSONL field, Parquet column) that holds the text (default text)",
    "log_every": "print and log metrics every N steps",
    "force_download": "download a Hub --model again even if it is cached (repairs a damaged cache)",
    "allow_change": "with --resume: apply this setting or model field although it differs from the checkpoint's "
                    "(recorded in train_config.json and metrics.jsonl; repeatable)",
}


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def build_parser(prog: str = "zoo train") -> argparse.ArgumentParser:
    """Flags of `zoo train` / `python -m train.pretrain`: one per TrainConfig field, plus --config and --set."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Train a zoo model with the common trainer. Runs on one process, or data-parallel "
                    "under `torchrun --nproc-per-node N -m train.pretrain ...` with the same flags.",
        epilog="A --config YAML/JSON file may give any flag by its field name (e.g. batch_size: 32); "
               "flags on the command line win.")
    parser.add_argument("model", nargs="?", default=None, help=HELP["model"] + " (default lm-dense-tiny)")
    parser.add_argument("--config", help="YAML or JSON file of settings")
    parser.add_argument("--set", dest="model_overrides", action="append", metavar="FIELD=VALUE", default=None,
                        help="override a model config field, e.g. --set n_layers=2 (repeatable)")
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("model", "model_overrides"):
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if isinstance(default, bool):
            parser.add_argument(flag, action="store_true", default=None, help=HELP.get(f.name, ""))
        elif f.name == "data":
            parser.add_argument(flag, nargs="+", default=None, help=HELP[f.name])
        elif f.name == "val_split":
            parser.add_argument(flag, choices=VAL_SPLITS, default=None, help=HELP[f.name])
        elif f.name == "allow_change":
            parser.add_argument(flag, action="append", metavar="FIELD", default=None, help=HELP[f.name])
        elif f.name == "betas":
            parser.add_argument(flag, nargs=2, type=float, default=None, help=f"AdamW betas (default {default})")
        else:
            kind = type(default) if default is not None else str
            text = HELP.get(f.name, "")
            if "default" not in text and default is not None:
                text = f"{text} (default {default})".strip()
            parser.add_argument(flag, type=kind, default=None, help=text)
    return parser


def read_config_file(path: Path) -> tuple[dict, dict[str, int]]:
    """The settings of a --config YAML/JSON file and the line of each (YAML); bad syntax names file and line."""
    if not path.is_file():
        raise FileNotFoundError(f"--config {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"--config {path}: not UTF-8 text ({err})") from err
    lines: dict[str, int] = {}
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            values = yaml.safe_load(text)
            node = yaml.compose(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f":{mark.line + 1}" if mark is not None else ""
            why = getattr(err, "problem", None) or err
            raise ValueError(f"--config {path}{where}: not valid YAML ({why})") from err
        if isinstance(node, yaml.MappingNode):
            lines = {key.value: key.start_mark.line + 1 for key, _ in node.value if isinstance(key, yaml.ScalarNode)}
    else:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"--config {path}:{err.lineno}: not valid JSON ({err.msg} at column {err.colno})") from err
    if values is None:
        return {}, {}
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: expected a mapping of settings (e.g. batch_size: 32), "
                         f"got {type(values).__name__}")
    return values, lines


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_types(values: dict, where: dict[str, str]) -> None:
    """Raise a ValueError naming the first setting whose value has the wrong type for its TrainConfig field."""
    defaults = TrainConfig()
    for key, value in values.items():
        default = getattr(defaults, key)
        if key == "data":
            ok = value is None or isinstance(value, str) or (
                isinstance(value, list) and all(isinstance(v, str) for v in value))
            allowed = "a path, glob or Hub dataset name, or a list of them"
        elif key == "allow_change":
            ok = isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))
            allowed = "a setting or model field name, or a list of them"
        elif key == "model_overrides":
            ok, allowed = isinstance(value, dict), "a mapping of model config fields to values"
        elif key == "betas":
            ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_number(v) for v in value)
            allowed = "a list of two numbers, e.g. [0.9, 0.95]"
        elif isinstance(default, bool):
            ok, allowed = isinstance(value, bool), "true or false"
        elif isinstance(default, int):
            ok, allowed = isinstance(value, int) and not isinstance(value, bool), "an integer"
        elif isinstance(default, float):
            ok, allowed = _is_number(value), "a finite number"
        else:
            ok, allowed = value is None or isinstance(value, str), "a string"
        if not ok:
            raise ValueError(f"{where[key]}: {key} = {value!r} ({type(value).__name__}) is invalid: must be {allowed}")


def parse_args(argv: list[str] | None, prog: str = "zoo train") -> TrainConfig:
    """TrainConfig from argv: defaults < --config file < command-line flags."""
    args = build_parser(prog).parse_args(argv)
    values: dict = {}
    if args.config:
        path = Path(args.config)
        values, lines = read_config_file(path)
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"--config {path}: unknown settings {unknown}; known: {sorted(known)}")
        check_types(values, {key: f"--config {path}" + (f":{lines[key]}" if key in lines else "") for key in values})
    for key, value in vars(args).items():
        if key in ("config",) or value is None:
            continue
        if key == "model_overrides":
            pairs = {}
            for item in value:
                if "=" not in item:
                    raise ValueError(f"--set {item!r}: expected FIELD=VALUE")
                k, v = item.split("=", 1)
                pairs[k] = _parse_value(v)
            value = {**values.get("model_overrides", {}), **pairs}
        values[key] = value
    return TrainConfig(**values)


# ---- --resume with other settings ------------------------------------------------------------------------

# Settings a resumed run may change without --allow-change: where and how it runs, what it logs, evaluates
# and keeps, and when it ends. None changes the steps already taken; a changed --steps moves the end of the
# cosine schedule, so the learning rate of the remaining steps follows the new end (said when resuming).
FREE_ON_RESUME = frozenset({"steps", "eval_every", "eval_batches", "checkpoint_every", "keep_last", "log_every",
                            "wandb_project", "device", "compile", "out"})
# Not compared: how this start was asked for (not a setting of the training), and model_overrides, compared
# through the model config they make (the same model may be asked for in two ways).
_NOT_COMPARED = frozenset({"resume", "allow_change", "force_download", "model_overrides"})


# Settings that runs made before they existed did not record, with the value those runs had in effect: a
# resumed old run is compared as if it had recorded them (an old run's contiguous validation tail is "tail").
LEGACY_VALUES = {"val_split": "tail", "data_config": None, "split": "train", "streaming": False,
                 "text_column": "text"}


def _plain(value):
    """A value as JSON has it (tuples are lists), so that saved and current settings compare."""
    return json.loads(json.dumps(value, default=str))


def resume_changes(saved: dict, cfg: TrainConfig, saved_model: dict, model_config: dict) -> dict[str, tuple]:
    """{name: (checkpoint's value, this run's value)} for every setting and model config field that differs.

    `saved` / `saved_model` are the train settings and model config stored in the checkpoint; a name the
    checkpoint did not record (written by an older version) is compared with the value that version had in
    effect (LEGACY_VALUES: an old run's validation split is "tail"), or else not compared.
    """
    now = _plain(cfg.to_dict())
    if saved:
        saved = {**{k: v for k, v in LEGACY_VALUES.items() if k in now}, **saved}
    changes = {name: (saved[name], now[name]) for name in now
               if name in saved and name not in _NOT_COMPARED and _plain(saved[name]) != now[name]}
    model_now = _plain(model_config)
    changes.update({name: (saved_model[name], model_now[name]) for name in model_now
                    if name in saved_model and _plain(saved_model[name]) != model_now[name]})
    return changes


def check_resume_changes(changes: dict[str, tuple], cfg: TrainConfig, checkpoint: Path, model_fields: set[str],
                         fixed: tuple[str, ...] = ()) -> None:
    """Refuse changes that break exact resumption unless --allow-change names them; a ValueError says which.

    `fixed`: settings of FREE_ON_RESUME that the model family's task cannot change exactly.
    """
    known = {f.name for f in dataclasses.fields(TrainConfig)} | model_fields
    unknown = sorted(set(cfg.allow_change) - known)
    if unknown:
        raise ValueError(f"--allow-change {', '.join(unknown)}: not a setting or a model config field; "
                         f"settings: {sorted(known - model_fields)}, model fields: {sorted(model_fields)}")
    free = FREE_ON_RESUME - set(fixed)
    refused = {k: v for k, v in changes.items() if k not in free and k not in cfg.allow_change}
    if refused:
        listed = "; ".join(f"{'model field ' + k if k in model_fields else '--' + k.replace('_', '-')} "
                           f"{old!r} -> {new!r}" for k, (old, new) in refused.items())
        flags = " ".join(f"--allow-change {k}" for k in refused)
        raise ValueError(f"--resume: {checkpoint} was trained with other settings, and resuming with these would "
                         f"not continue that run exactly: {listed}. Resume with the checkpoint's values, or apply "
                         f"the change on purpose with {flags} (recorded in train_config.json and metrics.jsonl)")
