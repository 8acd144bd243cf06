"""benchmarks/imported_sparsity.py at a tiny size: its core functions on a few-step Mixtral and Llama.

Asserts what could fail: the imported logits equal transformers', a finished training is reused, the
k = E row counts more active parameters than k = 1, top-p's measured mean k lies in [1, E], a local window
covering the whole sequence changes no logit, and the Markdown section replaces itself in place.
"""

import importlib.util
import json
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "imported_sparsity.py"
SEQ = 16


def _module():
    spec = importlib.util.spec_from_file_location("imported_sparsity", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.VERBOSE = False
    return module


@pytest.fixture(scope="module")
def bench():
    return _module()


@pytest.fixture(scope="module")
def data():
    from train.data import load_token_data
    from zoo.tokenizer import ByteTokenizer

    return load_token_data(None, seq_len=SEQ, tokenizer=ByteTokenizer())


@pytest.fixture(scope="module")
def trained(bench, data, tmp_path_factory):
    """{arch: (folder, record)} of 3-step trainings at d_model 16, 2 experts, top-1."""
    work = tmp_path_factory.mktemp("imported-sparsity")
    args = Namespace(d_model=16, layers=1, heads=2, seq_len=SEQ, expert_width=16, experts=2, top_k=1)
    configs = bench.model_settings(args)
    out = {}
    for arch in ("mixtral", "llama"):
        record = bench.train_transformers(arch, work / arch, configs[arch], data, steps=3, batch_size=2, lr=1e-2)
        out[arch] = (work / arch, record, configs[arch])
    return out


def test_help():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    for word in ("--steps", "--json", "--write-md", "--from-json", "--smoke", "MixtralForCausalLM", "top_p"):
        assert word in proc.stdout


def test_training_saves_a_transformers_folder_and_is_reused(bench, data, trained):
    from transformers import AutoConfig, AutoTokenizer

    for arch, (folder, record, config) in trained.items():
        assert not record["reused"] and record["settings"]["steps"] == 3
        assert AutoConfig.from_pretrained(str(folder)).model_type == arch
        tok = AutoTokenizer.from_pretrained(str(folder))
        assert tok("hi")["input_ids"][-2:] == list(b"hi")
        again = bench.train_transformers(arch, folder, config, data, steps=3, batch_size=2, lr=1e-2)
        assert again["reused"] and again["wall_s"] == record["wall_s"]
    # other settings: trained again
    folder, _, config = trained["llama"]
    other = bench.train_transformers("llama", folder.with_name("llama-4"), config, data, steps=4, batch_size=2, lr=1e-2)
    assert not other["reused"]


def test_imported_logits_equal_transformers(bench, data, trained):
    for arch, (folder, _, _) in trained.items():
        parity = bench.import_parity(folder, data, batch_size=4, batches=2, eval_batches=2)
        assert parity["max_abs_logit_diff"] <= 1e-4, (arch, parity)
        assert parity["zoo_val_loss"] == pytest.approx(parity["transformers_val_loss"], abs=1e-4)
        assert parity["tokenizer_is_bytes"]
        assert parity["architecture"] == {"mixtral": "MixtralForCausalLM", "llama": "LlamaForCausalLM"}[arch]


def test_moe_table_counts_active_experts(bench, data, trained):
    folder = trained["mixtral"][0]
    rows = bench.moe_table(folder, data, ks=[1, 2], top_ps=[0.5, 0.95], batch_size=4, eval_batches=2)
    by = {r["setting"]: r for r in rows}
    assert set(by) == {"top-k k=1", "top-k k=2", "top-p p=0.5", "top-p p=0.95"}
    assert by["top-k k=2"]["active_params"] > by["top-k k=1"]["active_params"]
    assert by["top-k k=2"]["flops_per_token"] > by["top-k k=1"]["flops_per_token"]
    assert by["top-k k=1"]["total_params"] == by["top-k k=2"]["total_params"]
    for p in ("top-p p=0.5", "top-p p=0.95"):
        assert 1.0 - 1e-6 <= by[p]["mean_k"] <= 2.0 + 1e-6
    # with two experts a threshold of 0.95 needs both unless one holds 95% of the mass
    assert by["top-p p=0.95"]["mean_k"] >= by["top-p p=0.5"]["mean_k"]
    assert len({r["val_tokens"] for r in rows}) == 1  # the same validation batches for every row


def test_local_window_covering_the_sequence_changes_no_logit(bench, data, trained):
    folder = trained["llama"][0]
    rows = bench.attention_table(folder, data, budgets={"local": [{"window": SEQ}, {"window": 2}]},
                                 batch_size=4, eval_batches=2, logit_batches=2)
    assert [r["kind"] for r in rows] == ["dense", "local", "local"]
    dense, full, narrow = rows
    assert full["max_abs_logit_change"] <= 1e-4
    assert full["val_loss"] == pytest.approx(dense["val_loss"], abs=1e-4)
    assert narrow["max_abs_logit_change"] > 1e-3  # a 2-token window does change the model


def test_markdown_section_replaces_itself(bench, tmp_path):
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\n## A\n\na\n\n## B\n\nb\n")
    bench.write_section(md, bench.SECTION + "\n\nfirst\n")
    assert md.read_text().endswith(bench.SECTION + "\n\nfirst\n")
    md.write_text(md.read_text() + "\n## C\n\nc\n")
    bench.write_section(md, bench.SECTION + "\n\nsecond\n")
    text = md.read_text()
    assert "first" not in text and text.count(bench.SECTION) == 1
    assert text.index("## B") < text.index("second") < text.index("## C") and text.endswith("c\n")
    assert json.dumps(text)  # plain text
