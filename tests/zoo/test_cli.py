"""The `zoo` command line, called through zoo.cli.main (and once as `python -m zoo`)."""

import json
import subprocess
import sys
from importlib.metadata import entry_points

import pytest
import torch

from zoo import CATALOG, load
from zoo.cli import main


def test_list_prints_every_catalog_name(capsys):
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = {line.split()[0] for line in lines[1:]}
    assert names == set(CATALOG)


def test_list_with_a_glob_prints_only_matches(capsys):
    assert main(["list", "*-tiny"]) == 0
    names = {line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]}
    assert names == {n for n in CATALOG if n.endswith("-tiny")}


def test_list_without_match_exits_1(capsys):
    assert main(["list", "nomatch*"]) == 1
    assert "nomatch*" in capsys.readouterr().err


def test_info_prints_json_with_the_exact_parameter_count(capsys):
    assert main(["info", "lm-dense-tiny"]) == 0
    info = json.loads(capsys.readouterr().out)
    model = load("lm-dense-tiny")
    assert info["cost"]["total_params"] == sum(p.numel() for p in model.parameters())
    assert info["config"]["n_layers"] == CATALOG["lm-dense-tiny"].config["n_layers"]


def test_generate_continues_the_prompt(capsys):
    code = main(["generate", "lm-dense-tiny", "--prompt", "hi", "--max-new-tokens", "5", "--greedy"])
    assert code == 0
    out = capsys.readouterr().out
    assert out.startswith("hi")
    assert len(out.rstrip("\n").encode("utf-8", errors="replace")) > len("hi"), "something was generated"


def test_generate_from_a_folder_is_greedy_decoding(tmp_path, capsys):
    torch.manual_seed(0)
    model = load("lm-dense-tiny", n_layers=1, d_model=64)
    model.save_pretrained(tmp_path)
    assert main(["generate", str(tmp_path), "--prompt", "hack", "--max-new-tokens", "6", "--greedy"]) == 0
    ids = torch.tensor([list(b"hack")])
    with torch.no_grad():  # greedy decoding by hand: full forward each step, append the argmax
        for _ in range(6):
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    expected = bytes(ids[0].tolist()).decode("utf-8", errors="replace")
    assert capsys.readouterr().out == expected + "\n"


def test_generate_unknown_model_exits_2_with_a_message(capsys):
    assert main(["generate", "lm-dense-tiy", "--prompt", "hi", "--max-new-tokens", "2"]) == 2
    captured = capsys.readouterr()
    assert "lm-dense-tiny" in captured.err  # the suggestion
    assert captured.out == ""


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("list", "info", "generate", "train", "eval", "publish", "quickstart"):
        assert command in out


def test_train_help_names_the_trainer_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--resume", "--wandb-project", "--steps"):
        assert flag in out


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    assert "usage" in capsys.readouterr().err


def test_console_script_points_at_main():
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "zoo"]
    assert script.value == "zoo.cli:main"
    assert script.load() is main


def test_python_dash_m_zoo_lists_the_catalog():
    result = subprocess.run([sys.executable, "-m", "zoo", "list"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert all(name in result.stdout for name in CATALOG)
