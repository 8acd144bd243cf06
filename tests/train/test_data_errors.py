"""Malformed data files: a DataFileError naming the file, the line and the field, never a traceback."""

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from train.data import DataFileError, load_token_data

GOOD = "".join(json.dumps({"text": f"document number {i} " * 4}) + "\n" for i in range(20))


def load(tmp_path, *names):
    return load_token_data([str(tmp_path / n) for n in names], seq_len=8, cache_dir=tmp_path / "cache")


@pytest.mark.parametrize(("lines", "where", "what"), [
    (['{"text": "fine"}', '{"text": "cut off'], ":2:", "not valid JSON .* column 10"),
    (['["a", "list"]', '{"text": "fine"}'], ":1:", "a JSON object.*got list"),  # a .jsonl is never one array
    (['{"text": "fine"}', '{"text": "fine"}', '{"text": 5}'], ":3:", r"field 'text' is 5 \(int\)"),
    (['{"text": "fine"}', '{"text": {"nested": 1}}'], ":2:", "field 'text'"),
])
def test_a_bad_jsonl_line_is_named(tmp_path, lines, where, what):
    (tmp_path / "good.jsonl").write_text(GOOD)
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFileError, match=rf"bad\.jsonl{where}.*{what}"):
        load(tmp_path, "good.jsonl", "bad.jsonl")


def test_a_bad_line_in_a_gzipped_jsonl_is_named(tmp_path):
    with gzip.open(tmp_path / "bad.jsonl.gz", "wt") as f:
        f.write(GOOD + '{"text": \n')
    with pytest.raises(DataFileError, match=r"bad\.jsonl\.gz:21:.*not valid JSON"):
        load(tmp_path, "bad.jsonl.gz")


def parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


GZIPPED = gzip.compress(" ".join(str(i) for i in range(2000)).encode())
HALF_A_GZIP = GZIPPED[: len(GZIPPED) // 2]


@pytest.mark.parametrize(("name", "data", "message"), [
    ("bad.json", b'[{"text": "a"},\n {"text": "b"},\n {"text":', r"bad\.json:3:.*not valid JSON"),
    ("bad.json", json.dumps([{"text": "a" * 50}, {"text": ["b"]}]).encode(),
     r"bad\.json: item 2: field 'text' is \['b'\] \(list\)"),
    ("bin.txt", b"plain text\nmore text\n\x89PNG\r\n\x1a\n\x00\x00\xff", r"bin\.txt:3:.*not UTF-8 text.*0x89"),
    ("cut.txt.gz", HALF_A_GZIP, r"cut\.txt\.gz.*gzip"),
    ("n.parquet", parquet_bytes(pa.table({"text": [1, 2, 3]})), r"n\.parquet.*column 'text'.*int64"),
    ("x.parquet", b"PAR1 not really", r"x\.parquet.*Parquet"),
])
def test_a_bad_file_is_named_with_the_line_and_field(tmp_path, name, data, message):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(DataFileError, match=message):
        load(tmp_path, name)


def test_data_errors_are_value_errors_the_cli_prints(tmp_path, capsys):
    from zoo.cli import main

    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{oops}\n')
    code = main(["train", "lm-dense-tiny", "--set", "n_layers=1", "--steps", "1", "--seq-len", "8",
                 "--out", str(tmp_path / "run"), "--data", str(tmp_path / "bad.jsonl")])
    assert code == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2:" in err and "Traceback" not in err


def test_a_parquet_file_without_the_text_column_lists_its_columns(tmp_path):
    (tmp_path / "p.parquet").write_bytes(parquet_bytes(pa.table({"body": ["a", "b"], "n": [1, 2]})))
    with pytest.raises(ValueError, match=r"no text column 'text'.*body.*n.*--text-column"):
        load(tmp_path, "p.parquet")


def test_the_text_column_flag_names_the_column_in_errors(tmp_path):
    (tmp_path / "c.jsonl").write_text(GOOD + json.dumps({"text": "fine", "body": 3}) + "\n")
    with pytest.raises(DataFileError, match=r"c\.jsonl:21: field 'body' is 3 \(int\)"):
        load_token_data([str(tmp_path / "c.jsonl")], seq_len=8, cache_dir=tmp_path / "cache", text_column="body")


@pytest.mark.parametrize(("name", "data"), [("empty.txt", b""), ("blank.jsonl", b'{"text": ""}\n\n{"text": null}\n')])
def test_a_file_without_text_is_an_error_naming_it(tmp_path, name, data):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(ValueError, match=rf"{name.replace('.', '[.]')}.*empty"):
        load(tmp_path, name)


def test_a_gzipped_file_cut_short_is_named(tmp_path):
    data = gzip.compress(GOOD.encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataFileError, match=r"cut\.jsonl\.gz.*gzip"):
        load(tmp_path, "cut.jsonl.gz")
