"""The SAE family: sparsity of each kind, losses on hand-computed cases, unit-norm decoder, the pure forward and
its step hook, save/load."""

import pytest
import torch

from models.sae import SAE, SAEConfig
from train.trainer import param_groups
from zoo import load

D_IN, D_SAE = 16, 64
ALL_KINDS = ["relu", "topk", "batchtopk", "hierarchical_topk", "matryoshka"]


def make(kind: str = "topk", **fields) -> SAE:
    torch.manual_seed(0)
    fields = {"d_in": D_IN, "d_sae": D_SAE, "k": 4, **fields}
    if kind == "matryoshka":
        fields.setdefault("matryoshka_widths", [8, 32, D_SAE])
    return SAE(SAEConfig(kind=kind, **fields))


def data(rows: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(rows, D_IN, generator=torch.Generator().manual_seed(seed))


def trained_step(sae: SAE, x: torch.Tensor, step: int = 1):
    """A training forward on x, then the step hook with its statistics (one process, one micro-batch)."""
    out = sae(x)
    sae.after_optimizer_step(out.step_stats, step)
    return out


def test_topk_keeps_exactly_k_nonzeros_per_row():
    sae = make("topk", k=5).eval()
    with torch.no_grad():
        sae.b_enc.fill_(10.0)  # every pre-activation positive, so ReLU zeroes none of the k kept
    z = sae.encode(data().view(4, 8, D_IN))  # any leading shape
    assert z.shape == (4, 8, D_SAE)
    assert ((z != 0).sum(-1) == 5).all()
    pre = sae.pre_activations(data())
    kept = torch.zeros_like(pre, dtype=torch.bool).scatter(1, pre.topk(5, dim=1).indices, True)
    assert torch.equal(z.view(-1, D_SAE) != 0, kept), "the k kept are the k largest pre-activations"


def test_encode_k_changes_the_budget_at_inference():
    sae = make("topk", k=8).eval()
    with torch.no_grad():
        sae.b_enc.fill_(10.0)
    assert ((sae.encode(data(), k=2) != 0).sum(-1) == 2).all()
    assert ((sae.encode(data()) != 0).sum(-1) == 8).all()


def test_batchtopk_keeps_k_times_batch_per_batch_and_a_threshold_at_inference():
    sae = make("batchtopk", k=4).train()
    with torch.no_grad():
        sae.b_enc.fill_(10.0)
    x = data(rows=32)
    out = sae(x)
    assert float(out.metrics["l0"]) * 32 == 4 * 32, "k * batch latents active over the batch"
    per_row = sae.encode(x)  # training mode: BatchTopK over these rows
    counts = (per_row != 0).sum(-1)
    assert counts.sum() == 4 * 32 and counts.min() != counts.max(), "rows share the budget unevenly"
    assert (sae.threshold == 0).all(), "the forward leaves the threshold to the step hook"
    assert float(out.step_stats["threshold_min"]) == float(per_row[per_row > 0].min().detach())
    sae.after_optimizer_step(out.step_stats, 1)
    assert (sae.threshold > 0).all(), "training estimated the inference threshold"
    sae.eval()
    pre = sae.pre_activations(x)
    assert torch.equal(sae.encode(x) != 0, pre > sae.threshold), "inference keeps what exceeds the threshold"


def test_hierarchical_topk_at_its_largest_k_equals_plain_topk_decoding():
    hier, plain = make("hierarchical_topk", k=6, k_min=1), make("topk", k=6)
    plain.load_state_dict(hier.state_dict())
    x = data()
    for model in (hier, plain):
        model.train()
    torch.testing.assert_close(hier(x).x_hat, plain(x).x_hat, rtol=1e-5, atol=1e-5)
    hier.eval(), plain.eval()
    torch.testing.assert_close(hier.decode(hier.encode(x)), plain.decode(plain.encode(x)))


def test_hierarchical_loss_is_the_mean_of_the_prefix_losses_on_a_hand_computed_case():
    # d_in 2, three atoms e1, e2, (e1+e2)/sqrt2; x = (3, 1) ranks latent 0 (3), latent 1 (1), latent 2 (0.5).
    sae = SAE(SAEConfig(kind="hierarchical_topk", d_in=2, d_sae=3, k=2, k_min=1, auxk_coeff=0.0, hier_loss="mean"))
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0, 0.125], [0.0, 1.0, 0.125]]))
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [2**-0.5, 2**-0.5]]))
        sae.b_enc.zero_(), sae.b_dec.zero_()
    x = torch.tensor([[3.0, 1.0], [1.0, 4.0]])
    # row 1: pre = (3, 1, 0.5). top-1 = 3 e1 -> error |(0, 1)|^2 = 1; top-2 = 3 e1 + e2 = x -> error 0.
    # row 2: pre = (1, 4, 0.625). top-1 = 4 e2 -> error |(1, 0)|^2 = 1; top-2 = x -> error 0.
    # prefix losses (mean over rows): j=1: 1.0, j=2: 0.0. Their sum, 1.0, over the 2 budgets: 0.5.
    out = sae.train()(x)
    assert out.loss.item() == pytest.approx((1.0 + 0.0) / 2)
    torch.testing.assert_close(out.x_hat, x)
    sae.config.k_min = 2  # only the top-2 prefix: the plain TopK loss
    assert sae(x).loss.item() == pytest.approx(0.0)


def test_hierarchical_log_area_loss_is_the_1_over_j_weighted_geometric_mean_of_the_prefix_losses():
    # d_in 2, atoms e1, e2, e1; the encoder reads x straight, latent 2 has b_enc 1.5 (ranked third).
    sae = SAE(SAEConfig(kind="hierarchical_topk", d_in=2, d_sae=3, k=3, k_min=1, auxk_coeff=0.0))
    assert sae.config.hier_loss == "log_area"
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]))
        sae.b_enc.copy_(torch.tensor([0.0, 0.0, 1.5])), sae.b_dec.zero_()
    x = torch.tensor([[3.0, 2.5], [4.0, 2.0]])
    # row 1: pre (3, 2.5, 1.5): top-1 3 e1 -> |(0, 2.5)|^2 = 6.25; top-2 = x -> 0; top-3 = x + 1.5 e1 -> 2.25.
    # row 2: pre (4, 2, 1.5):   top-1 4 e1 -> |(0, 2)|^2 = 4;      top-2 = x -> 0; top-3 -> 2.25.
    # Mean over rows: E = (5.125, 0, 2.25); E_2 is floored at 1e-6 * mean |x|^2 = 1e-6 * 18.0625.
    errors = torch.tensor([5.125, 1e-6 * (3**2 + 2.5**2 + 4**2 + 2**2) / 2, 2.25], dtype=torch.float64)
    c = torch.tensor([1.0, 1 / 2, 1 / 3], dtype=torch.float64)
    c = c / c.sum()
    assert sae.train()(x).loss.item() == pytest.approx(float(torch.exp((c * errors.log()).sum())), rel=1e-4)
    sae.config.k_min = 3  # only the top-3 prefix: its own error
    assert sae(x).loss.item() == pytest.approx(2.25, rel=1e-5)


def test_matryoshka_loss_is_the_mean_of_each_prefix_reconstructing_alone():
    sae = make("matryoshka", k=6, auxk_coeff=0.0).train()
    x = data(rows=16)
    out = sae(x)
    z = sae.encode(x)  # training mode: the same BatchTopK selection
    w = sae.decoder_weight()
    losses = [((x - (z[:, :m] @ w[:m] + sae.b_dec)) ** 2).sum(-1).mean() for m in (8, 32, D_SAE)]
    assert out.loss.item() == pytest.approx(torch.stack(losses).mean().item(), rel=1e-5)
    torch.testing.assert_close(out.x_hat, z @ w + sae.b_dec, rtol=1e-5, atol=1e-5)


def test_relu_l1_is_weighted_by_decoder_norms():
    sae = make("relu", l1_coeff=0.5).train()
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.5, 3.0, D_SAE)[:, None])  # unequal norms: relu keeps them
    x = data()
    out = sae(x)
    z = sae.encode(x)
    expected = 0.5 * (z * sae.W_dec.norm(dim=1)).sum(-1).mean()
    assert float(out.aux_losses["l1"].detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    assert out.loss.item() == pytest.approx(float(((x - sae.decode(z)) ** 2).sum(-1).mean().detach()), rel=1e-5)


def test_encoder_starts_as_the_decoder_transpose_with_unit_rows():
    sae = make("topk")
    torch.testing.assert_close(sae.W_enc, sae.W_dec.t())
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(D_SAE))


@pytest.mark.parametrize("kind", ["topk", "batchtopk", "hierarchical_topk", "matryoshka"])
def test_decoder_rows_stay_unit_norm_through_adamw_steps(kind):
    sae = make(kind, k=4, dead_tokens=8).train()
    opt = torch.optim.AdamW(param_groups(sae, 0.1), lr=0.05)  # the trainer's optimizer, weight decay included
    start = sae.W_dec.detach().clone()
    for step in range(5):
        out = sae(data(seed=step))
        (out.loss + sum(out.aux_losses.values())).backward()
        # the gradient has no component along the (unit) rows: it moves them on the sphere
        along = (sae.W_dec.grad * sae.W_dec).sum(1)
        assert along.abs().max() < 1e-5
        opt.step()
        opt.zero_grad()
        torch.testing.assert_close(sae.decoder_weight().norm(dim=1), torch.ones(D_SAE))
        assert (sae.W_dec.norm(dim=1) - 1).abs().max() > 1e-6, "AdamW moved the stored rows off the sphere"
        sae.after_optimizer_step(out.step_stats, step + 1)  # the step hook renormalises the stored rows
        torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(D_SAE))
    assert (sae.W_dec - start).abs().max() > 1e-3, "the decoder did train"


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_a_training_forward_changes_no_module_state(kind):
    sae = make(kind, dead_tokens=8).train()
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.5, 2.0, D_SAE)[:, None])  # stored rows off the sphere, as after AdamW
    trained_step(sae, data(seed=2))  # some latents dead, a threshold for the BatchTopK kinds
    before = {name: t.clone() for name, t in sae.state_dict().items()}
    for _ in range(2):
        out = sae(data(seed=3))
        (out.loss + sum(out.aux_losses.values())).backward()
    for name, t in sae.state_dict().items():
        assert torch.equal(t, before[name]), f"{kind}: the forward changed {name}"
    assert all(not v.requires_grad for v in {**out.metrics, **out.step_stats}.values())


def test_the_threshold_follows_an_ema_of_the_smallest_kept_value_once_per_step():
    sae = make("batchtopk", threshold_momentum=0.25).train()
    first = trained_step(sae, data(seed=1), 1).step_stats["threshold_min"]
    torch.testing.assert_close(sae.threshold, first.expand(D_SAE))
    second = trained_step(sae, data(seed=2), 2).step_stats["threshold_min"]
    torch.testing.assert_close(sae.threshold, (0.75 * first + 0.25 * second).expand(D_SAE))
    sae.after_optimizer_step({"threshold_min": torch.tensor(float("inf"))}, 3)  # nothing positive was kept
    torch.testing.assert_close(sae.threshold, (0.75 * first + 0.25 * second).expand(D_SAE))


def test_dead_latents_are_counted_in_tokens_and_feed_auxk():
    sae = make("topk", k=2, dead_tokens=64, auxk_coeff=1.0).train()
    x = data(rows=32)
    out = sae(x)
    assert (sae.tokens_since_fired == 0).all(), "the forward counts nothing itself"
    sae.after_optimizer_step(out.step_stats, 1)
    fired = out.step_stats["fire_counts"] > 0
    assert int(out.step_stats["rows"]) == 32
    assert (sae.tokens_since_fired[fired] == 0).all() and (sae.tokens_since_fired[~fired] == 32).all()
    assert out.aux_losses["auxk"].item() == 0.0, "nothing has been silent for 64 tokens yet"
    trained_step(sae, x, 2)
    out = sae(x)  # the never-firing latents have 64 silent tokens: dead
    assert sae.dead_fraction() > 0
    assert out.aux_losses["auxk"].item() > 0
    out.aux_losses["auxk"].backward()
    dead = sae.tokens_since_fired >= 64
    assert sae.W_enc.grad[:, dead].abs().sum() > 0, "AuxK trains the dead latents' encoder columns"


def test_scale_is_applied_on_encode_and_undone_on_decode():
    a, b = make("topk", act_scale=4.0).eval(), make("topk", act_scale=1.0).eval()
    b.load_state_dict(a.state_dict())
    x = data()
    torch.testing.assert_close(a.encode(x), b.encode(4.0 * x))
    z = a.encode(x)
    torch.testing.assert_close(a.decode(z), b.decode(z) / 4.0)
    torch.testing.assert_close(a(x).x_hat, b(4.0 * x).x_hat / 4.0)


def test_save_and_load_keep_weights_buffers_and_work_with_automodel(tmp_path):
    from transformers import AutoModel

    sae = make("batchtopk", act_scale=2.0).train()
    trained_step(sae, data())
    assert (sae.threshold > 0).all() and (sae.tokens_since_fired > 0).any()
    sae.save_pretrained(tmp_path)
    for loaded in (load(str(tmp_path)), AutoModel.from_pretrained(tmp_path)):
        assert isinstance(loaded, SAE)
        torch.testing.assert_close(loaded.threshold, sae.threshold)
        assert torch.equal(loaded.tokens_since_fired, sae.tokens_since_fired)
        torch.testing.assert_close(loaded.eval().encode(data()), sae.eval().encode(data()))
    assert "zoo_sae" in (tmp_path / "README.md").read_text()


def test_hierarchical_checkpoint_from_before_hier_loss_loads_with_the_mean_loss_it_was_trained_with(tmp_path):
    import json

    make("hierarchical_topk", resample_every=5).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config.pop("hier_loss") == "log_area" and config.pop("resample_every") == 5
    for field in ("config_version", "kind_kwargs"):  # what a checkpoint of that time lacked too
        config.pop(field)
    (tmp_path / "config.json").write_text(json.dumps(config))
    old = load(str(tmp_path)).config
    assert old.hier_loss == "mean" and old.resample_every == 0
    config.pop("k_min")  # a field that was always there is still required
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="k_min"):
        load(str(tmp_path))


def test_cost_counts_the_dense_encoder_and_k_decoder_rows():
    sae = make("topk", k=4)
    cost = sae.cost()
    assert cost["total_params"] == sum(p.numel() for p in sae.parameters()) == 2 * D_IN * D_SAE + D_SAE + D_IN
    assert cost["active_params"] == D_IN * D_SAE + D_SAE + 4 * D_IN + D_IN
    assert cost["flops_per_token"] == 2 * D_IN * D_SAE + 2 * 4 * D_IN


@pytest.mark.parametrize("fields, name", [
    ({"kind": "gated"}, "kind.*gated.*known.*batchtopk"), ({"k": 99}, "k"),
    ({"kind": "hierarchical_topk", "k_min": 9, "k": 8}, "k_min"),
    ({"kind": "matryoshka", "matryoshka_widths": [8, 32]}, "matryoshka_widths"),
    ({"kind": "matryoshka", "matryoshka_widths": [32, 8, 64]}, "matryoshka_widths"),
    ({"kind": "matryoshka", "matryoshka_widths": [64], "threshold_momentum": 0.0}, "threshold_momentum"),
    ({"kind": "batchtopk", "threshold_momentum": 1.5}, "threshold_momentum"),
    ({"kind": "relu", "l1_coeff": -0.1}, "l1_coeff"), ({"k_min": 0}, "k_min"),
    ({"act_scale": -1.0}, "act_scale"),
    ({"kind": "hierarchical_topk", "hier_loss": "sum"}, "hier_loss.*log_area.*mean"),
    ({"resample_every": -1}, "resample_every"), ({"resample_every": True}, "resample_every")])
def test_bad_config_is_a_value_error_naming_the_field(fields, name):
    with pytest.raises(ValueError, match=name):
        load("sae-topk-tiny", **{"d_sae": 64, **fields})


def test_a_kind_checks_only_the_fields_it_reads():
    # hier_loss and k_min belong to hierarchical_topk, matryoshka_widths to matryoshka, l1_coeff to relu
    sae = load("sae-topk-tiny", d_sae=64, k=8, hier_loss="sum", k_min=9, matryoshka_widths=[3], l1_coeff=-1.0)
    assert sae.config.kind == "topk"


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_the_normalize_decoder_default_is_the_kinds(kind):
    assert make(kind).config.normalize_decoder == (kind != "relu")
    assert make(kind, normalize_decoder=kind == "relu").config.normalize_decoder == (kind == "relu")


@pytest.mark.parametrize("name", ["sae-relu-tiny", "sae-topk-tiny", "sae-batchtopk-tiny", "sae-hier-topk-tiny",
                                  "sae-matryoshka-tiny"])
def test_catalog_entries_read_lm_dense_tiny_and_reconstruct(name):
    sae = load(name)
    assert sae.config.d_in == 256 and sae.config.source_model == "runs/lm-dense-tiny/final"
    x = data(rows=8, seed=3).repeat(1, 16)
    assert sae(x).x_hat.shape == (8, 256)


def test_resampling_points_dead_latents_at_badly_reconstructed_inputs_and_zeroes_their_adam_moments():
    sae = make("topk", k=2, dead_tokens=64).train()
    optimizer = torch.optim.AdamW(sae.parameters(), lr=1e-3)
    x = data(rows=32) * 0.01
    x[7] = torch.randn(D_IN, generator=torch.Generator().manual_seed(5)) * 100  # its error dwarfs the rest
    out = sae(x)
    out.loss.backward()
    optimizer.step()
    fired = (out.step_stats["fire_counts"] > 0).nonzero().squeeze(1)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[fired[:2]] = True  # latents that trained this step, so their moments are not zero yet
    before = {name: p.detach().clone() for name, p in sae.named_parameters()}
    moments = {name: optimizer.state[p]["exp_avg"].clone() for name, p in sae.named_parameters()}
    assert moments["W_dec"][dead].abs().sum() > 0 and moments["W_enc"][:, dead].abs().sum() > 0
    sae.tokens_since_fired[dead] = 64
    sae.tokens_since_fired[~dead] = 3

    assert sae.resample_dead(x, optimizer, torch.Generator().manual_seed(0)) == 2

    r = x[7] * sae.scale - before["b_dec"]
    u = r / r.norm()
    live_enc_norm = before["W_enc"][:, ~dead].norm(dim=0).mean()
    for i in dead.nonzero().squeeze(1).tolist():
        torch.testing.assert_close(sae.W_dec[i], u)
        torch.testing.assert_close(sae.W_enc[:, i], u * 0.2 * live_enc_norm)
        assert sae.b_enc[i] == 0
    assert torch.equal(sae.W_dec[~dead], before["W_dec"][~dead])
    assert torch.equal(sae.W_enc[:, ~dead], before["W_enc"][:, ~dead])
    assert torch.equal(sae.b_enc[~dead], before["b_enc"][~dead]) and torch.equal(sae.b_dec, before["b_dec"])
    assert (sae.tokens_since_fired[dead] == 0).all() and (sae.tokens_since_fired[~dead] == 3).all()
    for name, param in sae.named_parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            state = optimizer.state[param][key]
            if name == "W_dec":
                assert state[dead].abs().sum() == 0 and state[~dead].abs().sum() > 0
            elif name == "W_enc":
                assert state[:, dead].abs().sum() == 0 and state[:, ~dead].abs().sum() > 0
            elif name == "b_enc":
                assert state[dead].abs().sum() == 0
    torch.testing.assert_close(optimizer.state[sae.W_dec]["exp_avg"][~dead], moments["W_dec"][~dead])
    pre = sae.pre_activations(x[7:8] * sae.scale)[0]
    torch.testing.assert_close(pre[dead], (0.2 * live_enc_norm * r.norm()).expand(2))  # bias 0, aligned with r


def test_resampling_nothing_dead_changes_nothing():
    sae = make("relu")
    before = {name: p.detach().clone() for name, p in sae.named_parameters()}
    assert sae.resample_dead(data()) == 0
    assert all(torch.equal(p, before[name]) for name, p in sae.named_parameters())


@pytest.mark.parametrize("kind", ["topk", "relu", "hierarchical_topk"])
def test_bad_inputs_and_budgets_are_value_errors_that_say_what_was_expected(kind):
    sae = make(kind)
    with pytest.raises(ValueError, match=f"d_in={D_IN}.*shape \\(3, 5\\)"):
        sae.encode(torch.randn(3, 5))
    with pytest.raises(ValueError, match=f"d_in={D_IN}"):
        sae(torch.randn(3, 5))
    with pytest.raises(ValueError, match=f"d_sae={D_SAE}"):
        sae.decode(torch.randn(3, D_IN))
    for k in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="k .*positive integer"):
            sae.encode(data(), k=k)
        with pytest.raises(ValueError, match="k .*positive integer"):
            sae.reconstruct(data(), k=k)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_every_kind_resamples_its_dead_latents_towards_the_worst_input_and_keeps_its_mode(kind, monkeypatch):
    import models.sae as sae_module

    monkeypatch.setattr(sae_module, "RESAMPLE_CHUNK_ROWS", 5)  # the errors are measured in several chunks
    sae = make(kind).train()
    trained_step(sae, data())  # a training step's bookkeeping (threshold, counts)
    x = data(rows=32) * 0.01
    x[20] = torch.randn(D_IN, generator=torch.Generator().manual_seed(5)) * 100
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[[1, 40]] = True
    before = sae.W_dec.detach().clone()
    assert sae.resample_dead(x, dead=dead, generator=torch.Generator().manual_seed(0)) == 2
    assert sae.training, "resampling puts the SAE back in training mode"
    r = x[20] * sae.scale - sae.b_dec
    norm = 0.1 if kind == "relu" else 1.0  # relu decoder rows start at norm 0.1, the others are unit norm
    for i in (1, 40):
        torch.testing.assert_close(sae.W_dec[i], r / r.norm() * norm)
    assert torch.equal(sae.W_dec[~dead], before[~dead])
    with pytest.raises(ValueError, match=f"d_in={D_IN}"):
        sae.resample_dead(torch.randn(4, D_IN + 1), dead=dead)
    assert sae.training
