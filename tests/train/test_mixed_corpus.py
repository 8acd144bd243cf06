"""The mixed corpus (train/corpus/mixed.jsonl.gz): size, domains, interleaving, correct generated facts,
determinism of its builder, and use as --data."""

import gzip
import hashlib
import json
import re
import sys
from decimal import Decimal
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[2] / "train" / "corpus"))
import build_mixed  # noqa: E402

CORPUS = build_mixed.OUT
DOMAINS = {"python", "java", "prose", "arithmetic", "records"}


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_the_corpus_has_20m_byte_tokens_in_five_domains_and_matches_its_manifest(docs):
    manifest = json.loads(build_mixed.MANIFEST.read_text())
    assert hashlib.sha256(CORPUS.read_bytes()).hexdigest() == manifest["sha256"]
    sizes = {}
    for d in docs:
        sizes[d["domain"]] = sizes.get(d["domain"], 0) + len(d["text"].encode("utf-8"))
    assert set(sizes) == DOMAINS
    assert sum(sizes.values()) >= 20_000_000
    assert min(sizes.values()) >= 1_000_000
    assert {k: v["bytes"] for k, v in manifest["domains"].items()} == sizes
    assert CORPUS.stat().st_size < 15_000_000


def test_every_tenth_of_the_file_holds_every_domain(docs):
    tenth = len(docs) // 10
    for i in range(10):
        assert {d["domain"] for d in docs[i * tenth:(i + 1) * tenth]} == DOMAINS, f"slice {i}"


def test_generated_arithmetic_is_correct(docs):
    import math
    ops = {"+": lambda a, b: str(a + b), "-": lambda a, b: str(a - b), "*": lambda a, b: str(a * b),
           "^": lambda a, b: str(a ** b)}
    checked = 0
    for d in (d for d in docs if d["domain"] == "arithmetic"):
        for line in d["text"].splitlines()[:8]:
            if m := re.fullmatch(r"gcd\((\d+), (\d+)\) = (\d+)", line):
                assert math.gcd(int(m[1]), int(m[2])) == int(m[3]), line
            elif m := re.fullmatch(r"(\d+) / (\d+) = (\d+) remainder (\d+)", line):
                a, b, q, r = map(int, m.groups())
                assert a == b * q + r and 0 <= r < b, line
            else:
                m = re.fullmatch(r"(\d+) ([-+*^]) (\d+) = (-?\d+)", line)
                assert m, line
                assert ops[m[2]](int(m[1]), int(m[3])) == m[4], line
            checked += 1
    assert checked > 10_000


def test_generated_records_are_consistent(docs):
    rows = 0
    for d in (d for d in docs if d["domain"] == "records"):
        text = d["text"]
        if text.startswith("order,"):
            lines = text.splitlines()
            header = lines[0].split(",")
            records = [dict(zip(header, line.split(","), strict=True)) for line in lines[1:]]
        else:
            records = [json.loads(line) for line in text.splitlines()]
        for r in records:
            qty, price, total = int(r["qty"]), Decimal(str(r["unit_price"])), Decimal(str(r["total"]))
            assert qty * price == total, r
            assert (int(r["order"]) + qty + int(price * 100)) % 97 == int(r["check"]), r
            rows += 1
    assert rows > 20_000


def test_the_generators_are_deterministic():
    first = [next(build_mixed.arithmetic_docs()) for _ in range(2)] + [next(build_mixed.records_docs())]
    again = [next(build_mixed.arithmetic_docs()) for _ in range(2)] + [next(build_mixed.records_docs())]
    assert first == again


def test_a_rebuild_gives_the_same_bytes_where_the_inputs_are_those_it_was_built_from(tmp_path):
    inputs = json.loads(build_mixed.MANIFEST.read_text())["inputs"]
    if sys.version.split()[0] != inputs["python_version"] or not Path(inputs["jdk_src_zip"]).is_file():
        pytest.skip("another Python or no JDK sources: the inputs differ from the committed file's")
    data, manifest = build_mixed.build(Path(inputs["python_stdlib"]), Path(inputs["jdk_src_zip"]),
                                       build_mixed.HERE / "jargon.txt.gz")
    assert manifest["sha256"] == json.loads(build_mixed.MANIFEST.read_text())["sha256"]
    assert data == CORPUS.read_bytes()


def test_the_trainer_reads_it_as_data(tmp_path, docs):
    from train.data import load_token_data

    data = load_token_data(str(CORPUS), seq_len=256, cache_dir=tmp_path)
    separators = len(docs) - 1
    assert len(data.tokens) == sum(len(d["text"].encode("utf-8")) for d in docs) + 2 * separators
    first = docs[0]["text"].encode("utf-8")[:100]
    assert bytes(data.tokens[:100].tolist()) == first
