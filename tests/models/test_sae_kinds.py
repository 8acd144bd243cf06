"""SAE kinds are classes in one registry: a kind defined here, in the test file alone, works from a config
through training, encode/decode, the step hook, SAELens export, evaluation budgets, `zoo info` and the trainer."""

import json

import pytest
import torch

from layers.sparse_activations import topk_code
from models.sae import KINDS, SAE, SAEConfig, kind_descriptions
from models.sae_kinds import SAE_KINDS, SAEKind, check_field
from zoo import load

D_IN, D_SAE = 16, 64


class Toy(SAEKind):
    """A toy kind: the k largest latents per row, free decoder rows, MSE plus an L1 aux loss; k must be even."""

    description = "toy: top k per row with an L1 penalty, k even"
    normalize_decoder = False
    sae_lens_architecture = "topk"
    OPTIONS = {"l1": (lambda v: isinstance(v, float) and v >= 0, "must be a float >= 0")}  # kind_kwargs

    def validate(self, config):
        check_field(config.k % 2 == 0, "k", config.k, "the toy kind wants an even k")

    def select(self, sae, pre, k=None, batch_threshold=None):
        return topk_code(pre, k or sae.config.k)

    def forward(self, sae, x_scaled, k=None, batch_threshold=None):
        out = super().forward(sae, x_scaled, k, batch_threshold)  # sparse code, MSE, AuxK
        weight = self.option(sae.config, "l1", 1e-3)
        out.aux["toy_l1"] = weight * sae.encode(x_scaled / sae.scale, k).abs().sum(-1).mean()
        return out

    def eval_budgets(self, config):
        return [{"k": config.k // 2}, {}]

    def after_optimizer_step(self, sae, stats):
        return {"toy_rows": float(stats["rows"])}

    def sae_lens_export(self, sae, k):
        return {"k": k or sae.config.k, "rescale_acts_by_decoder_norm": False}, {}


@pytest.fixture(autouse=True)
def toy_kind():
    SAE_KINDS.register("toy", Toy)
    yield Toy
    SAE_KINDS.pop("toy")


def make(**fields) -> SAE:
    torch.manual_seed(0)
    return SAE(SAEConfig(**{"kind": "toy", "d_in": D_IN, "d_sae": D_SAE, "k": 4, "source_model": "lm",
                            "hook_point": "blocks.1", **fields}))


def data(rows: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(rows, D_IN, generator=torch.Generator().manual_seed(seed))


def test_every_built_in_kind_is_a_registered_class_with_a_description():
    assert set(KINDS) >= {"relu", "topk", "batchtopk", "hierarchical_topk", "matryoshka"}
    for name in ("relu", "topk", "batchtopk", "hierarchical_topk", "matryoshka"):
        assert issubclass(SAE_KINDS[name], SAEKind) and SAE_KINDS[name].description
        assert SAE_KINDS[name].sae_lens_architecture in ("standard", "topk", "jumprelu")


def test_an_unknown_kind_names_the_field_and_the_known_kinds_including_added_ones():
    with pytest.raises(ValueError, match=r"'kind' = 'nope'.*known: \[.*'toy'"):
        load("sae-topk-tiny", kind="nope")


def test_a_kinds_own_options_come_from_kind_kwargs_and_are_checked_by_the_kind():
    x = data()
    plain, heavy = make().train(), make(kind_kwargs={"l1": 1.0}).train()
    a, b = plain(x).aux_losses["toy_l1"], heavy(x).aux_losses["toy_l1"]
    torch.testing.assert_close(b, a * 1000)  # same weights (same seed), the option scales the penalty
    with pytest.raises(Exception, match="kind_kwargs.*'l2' is not an option of Toy"):
        make(kind_kwargs={"l2": 1.0})
    with pytest.raises(Exception, match="kind_kwargs.l1"):
        make(kind_kwargs={"l1": -1.0})


def test_a_kind_defined_in_a_test_file_is_built_from_a_config_and_validates_its_field():
    sae = make()
    assert isinstance(sae.kind, Toy) and sae.config.normalize_decoder is False, "the kind's default"
    with pytest.raises(ValueError, match="'k' = 3.*even"):
        load("sae-topk-tiny", kind="toy", d_sae=64, k=3)


def test_the_toy_kind_trains_encodes_and_decodes():
    sae = make(dead_tokens=8).train()
    opt = torch.optim.SGD(sae.parameters(), lr=0.1)
    losses = []
    for step in range(1, 4):
        out = sae(data())
        assert set(out.aux_losses) == {"auxk", "toy_l1"} and float(out.metrics["l0"]) <= 4
        (out.loss + sum(out.aux_losses.values())).backward()
        assert sae.W_enc.grad.abs().sum() > 0 and sae.W_dec.grad.abs().sum() > 0
        opt.step()
        opt.zero_grad()
        assert sae.after_optimizer_step(out.step_stats, step)["toy_rows"] == 32.0, "the kind's step hook ran"
        losses.append(float(out.loss.detach()))
    assert losses[-1] < losses[0]
    sae.eval()
    z = sae.encode(data().view(4, 8, D_IN))
    assert z.shape == (4, 8, D_SAE) and ((z != 0).sum(-1) <= 4).all()
    assert ((sae.encode(data(), k=2) != 0).sum(-1) <= 2).all()
    assert sae.decode(z).shape == (4, 8, D_IN)
    torch.testing.assert_close(sae.reconstruct(data())[0], sae.decode(sae.encode(data())))


def test_the_toy_kind_exports_to_saelens_and_back(tmp_path):
    from zoo.sae_lens_format import export_sae_lens, import_sae_lens

    sae = make(act_scale=0.5).eval()
    export_sae_lens(sae, tmp_path)
    assert json.loads((tmp_path / "cfg.json").read_text())["architecture"] == "topk"
    back = import_sae_lens(tmp_path)
    assert back.config.kind == "toy" and back.config.act_scale == 0.5
    torch.testing.assert_close(back.reconstruct(data())[0], sae.reconstruct(data())[0])


def test_a_kind_without_a_saelens_architecture_is_refused_by_export(tmp_path, monkeypatch):
    from zoo.sae_lens_format import export_sae_lens

    monkeypatch.setattr(Toy, "sae_lens_architecture", None)
    with pytest.raises(ValueError, match="'toy' has no SAELens architecture"):
        export_sae_lens(make(), tmp_path)


def test_the_toy_kind_picks_its_evaluation_budgets():
    from train.sae_eval import default_budgets

    assert default_budgets(make()) == [{"k": 2}, {}]


def test_zoo_info_describes_a_saved_toy_sae(tmp_path, capsys):
    from transformers import AutoModel

    from zoo.cli import main

    assert KINDS["toy"] is Toy and kind_descriptions()["toy"] == Toy.description
    sae = make()
    sae.save_pretrained(tmp_path)
    for loaded in (load(str(tmp_path)), AutoModel.from_pretrained(tmp_path)):
        assert isinstance(loaded.kind, Toy)
        torch.testing.assert_close(loaded.encode(data()), sae.encode(data()))
    assert main(["info", str(tmp_path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["config"]["kind"] == "toy"
    assert info["cost"]["active_params"] == D_IN * D_SAE + D_SAE + 4 * D_IN + D_IN


def test_the_trainer_trains_the_toy_kind(tmp_path):
    from train.config import parse_args
    from train.trainer import Trainer

    lm = tmp_path / "lm"
    torch.manual_seed(0)
    load("lm-dense-tiny", d_model=32, n_layers=2, n_heads=2, max_seq_len=64).save_pretrained(lm)
    run = tmp_path / "sae"
    args = ["sae-topk-tiny", "--set", "kind=toy", "--set", f"source_model={lm}", "--set", "d_in=32",
            "--set", "d_sae=64", "--set", "k=4", "--set", "hook_point=blocks.1", "--seq-len", "16",
            "--batch-size", "4", "--steps", "4", "--eval-every", "4", "--eval-batches", "1", "--warmup-steps", "1",
            "--grad-accum", "2", "--out", str(run)]
    Trainer(parse_args(args)).run()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "step" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(r["toy_rows"] == 64.0 and r["l0"] <= 4 and "toy_l1" in r for r in steps), steps[0]
    assert "val_fvu" in steps[-1]
    assert load(str(run / "final")).config.kind == "toy"
