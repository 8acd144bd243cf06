"""--config files: bad syntax or a wrongly typed value is a ValueError naming the file, line and field."""

import pytest

from train.config import parse_args


@pytest.mark.parametrize(("text", "message"), [
    ('steps: 3\nseed: "zero"\n', r"c\.yaml:2: seed = 'zero' \(str\) is invalid: must be an integer"),
    ("steps: [1\n", r"c\.yaml:2: not valid YAML"),
    ("- steps\n", r"c\.yaml: expected a mapping"),
    ("lr: .inf\n", r"c\.yaml:1: lr = inf .*finite number"),
    ("betas: 5\n", r"c\.yaml:1: betas = 5 .*two numbers"),
    ('compile: "no"\n', r"c\.yaml:1: compile = 'no' .*true or false"),
])
def test_a_bad_yaml_config_names_file_line_and_field(tmp_path, text, message):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ValueError, match=message):
        parse_args(["--config", str(tmp_path / "c.yaml")])


def test_a_bad_json_config_names_the_line(tmp_path):
    (tmp_path / "c.json").write_text('{"steps": 3,\n "lr": }')
    with pytest.raises(ValueError, match=r"c\.json:2: not valid JSON"):
        parse_args(["--config", str(tmp_path / "c.json")])
