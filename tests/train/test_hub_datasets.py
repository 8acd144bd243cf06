"""`zoo train --data org/name` reads Hub datasets through the real `datasets` and `huggingface_hub` clients from
the loopback Hub: --split, --data-config (and org/name:config), --text-column and --streaming."""

import json
import uuid

import pytest

from train.config import parse_args
from train.data import SEPARATOR, tokens_needed
from train.trainer import Trainer

TINY = ["--set", "d_model=32", "--set", "n_layers=1", "--set", "n_heads=2", "--seq-len", "16",
        "--batch-size", "4", "--eval-batches", "1", "--warmup-steps", "1"]
CONFIGS = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*.jsonl
  - split: validation
    path: data/validation.jsonl
- config_name: poems
  data_files:
  - split: train
    path: poems/train.jsonl
---
# a test corpus
"""


def docs(prefix: str, n: int) -> list[dict]:
    return [{"body": f"{prefix} document {i}: " + "words of the corpus " * 3, "n": i} for i in range(n)]


@pytest.fixture(scope="module")
def dataset(hub, tmp_path_factory):
    """A dataset repo with two train files, a validation split and a second config; its documents by part."""
    folder = tmp_path_factory.mktemp("dataset")
    parts = {"data/train-0.jsonl": docs("first", 300), "data/train-1.jsonl": docs("second", 60),
             "data/validation.jsonl": docs("held", 30), "poems/train.jsonl": docs("poem", 40)}
    for name, rows in parts.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "README.md").write_text(CONFIGS)
    repo = f"zoo-tests/corpus-{uuid.uuid4().hex[:8]}"
    hub.add_repo(repo, folder, repo_type="dataset")
    return repo, {name: SEPARATOR.join(r["body"] for r in rows) for name, rows in parts.items()}


def trainer(tmp_path, *args) -> Trainer:
    return Trainer(parse_args(["lm-dense-tiny", *TINY, "--out", str(tmp_path / "run"), "--steps", "2", *args]))


def test_data_org_name_trains_on_the_hub_dataset(dataset, tmp_path):
    repo, text = dataset
    t = trainer(tmp_path, "--data", repo, "--text-column", "body")  # the CLI gives a list of one name
    expected = text["data/train-0.jsonl"] + SEPARATOR + text["data/train-1.jsonl"]
    assert bytes(t.task.data.tokens) == expected.encode()
    summary = t.run()
    assert summary["val_loss"] > 0 and repo in t.task.description


@pytest.mark.parametrize(("args", "part"), [
    (["--split", "validation"], "data/validation.jsonl"),
    (["--data-config", "poems"], "poems/train.jsonl"),
    ([":poems"], "poems/train.jsonl"),  # org/name:config
])
def test_split_and_config_choose_the_part(dataset, tmp_path, args, part):
    repo, text = dataset
    data = [repo + args[0]] if args[0].startswith(":") else [repo]
    extra = [] if args[0].startswith(":") else args
    t = trainer(tmp_path, "--data", *data, *extra, "--text-column", "body")
    assert bytes(t.task.data.tokens) == text[part].encode()
    t.close()


def test_streaming_reads_only_the_tokens_the_run_needs(hub, dataset, tmp_path):
    repo, text = dataset
    hub.requests.clear()
    t = trainer(tmp_path, "--data", repo, "--text-column", "body", "--streaming", "--steps", "3")
    needed = tokens_needed(3 * 4, 16, 0.05, "interleaved", val_blocks=4)
    assert len(t.task.data.tokens) == needed < len(text["data/train-0.jsonl"])
    assert bytes(t.task.data.tokens) == text["data/train-0.jsonl"].encode()[:needed]
    assert t.task.data.num_train_blocks >= 12 and t.task.data.num_val_blocks >= 1
    fetched = [path for method, path in hub.requests.entries() if method == "GET"]
    assert any(p.endswith("train-0.jsonl") for p in fetched)
    assert not any(p.endswith("train-1.jsonl") for p in fetched), "the second file was never needed"
    t.run()
    assert t.task.fixed_on_resume == ("steps", "eval_batches")


def test_hub_dataset_errors_are_one_line(dataset, tmp_path, capsys):
    from zoo.cli import main

    repo, _ = dataset
    base = ["train", "lm-dense-tiny", *TINY, "--steps", "1", "--out", str(tmp_path / "run")]
    assert main([*base, "--data", repo]) == 2  # the documents are in "body", not "text"
    err = capsys.readouterr().err
    assert "no text column 'text'" in err and "body" in err and "--text-column" in err and "Traceback" not in err
    assert main([*base, "--data", "zoo-tests/no-such-dataset"]) == 2
    err = capsys.readouterr().err
    assert "zoo-tests/no-such-dataset" in err and "Traceback" not in err
    assert main([*base, "--data", repo, "--text-column", "body", "--split", "nope"]) == 2
    err = capsys.readouterr().err
    assert "split 'nope'" in err and "Traceback" not in err
    local = tmp_path / "a.txt"
    local.write_text("some text")
    assert main([*base, "--data", repo, str(local)]) == 2
    assert "must be the only --data" in capsys.readouterr().err
    assert main([*base, "--data", str(local), "--split", "validation"]) == 2
    assert "local files are read whole" in capsys.readouterr().err


def test_a_malformed_streamed_row_is_one_line_naming_the_dataset(hub, tmp_path, capsys):
    from zoo.cli import main

    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in docs("good", 5)) + '{"body": "cut\n')
    repo = f"zoo-tests/bad-{uuid.uuid4().hex[:8]}"
    hub.add_repo(repo, folder, repo_type="dataset")
    code = main(["train", "lm-dense-tiny", *TINY, "--steps", "1", "--out", str(tmp_path / "run"), "--data", repo,
                 "--text-column", "body", "--streaming"])
    err = capsys.readouterr().err
    assert code == 2 and repo in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_zoo_eval_streams_only_the_blocks_it_evaluates(dataset, capsys):
    from zoo.cli import main

    repo, text = dataset
    assert main(["eval", "lm-dense-tiny", "--data", repo, "--text-column", "body", "--streaming", "--seq-len", "16",
                 "--batch-size", "2", "--max-batches", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["val_tokens"] == 2 * 16 and out["val_bytes"] == 2 * 16 and out["tokenizer"] == "byte"
    assert main(["eval", "lm-dense-tiny", "--data", repo, "--text-column", "body", "--streaming"]) == 2
    assert "--max-batches" in capsys.readouterr().err
