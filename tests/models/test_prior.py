"""PNET_S1, PNET_S2, the EPD diffusion and the losses (SPEC 3.2, 3.6, 3.7, Eq. 13, 14, 16, 17)."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from lldif.models.config import LossConfig, lldif_base, lldif_tiny
from lldif.models.diffusion import Denoiser, PriorDiffusion
from lldif.models.losses import classification_loss, prior_kl, prior_loss
from lldif.models.pnet import PNetS1, PNetS2

PRESETS = {"base": lldif_base, "tiny": lldif_tiny}

# SPEC 3.7, T = 4: beta, alpha, alpha_bar, sqrt(alpha_bar), sqrt(1 - alpha_bar), c1, c2, posterior variance
SPEC_TABLE = [
    [0.10000, 0.90000, 0.90000, 0.94868, 0.31623, 1.00000, 0.00000, 0.0],
    [0.29429, 0.70571, 0.63514, 0.79696, 0.60403, 0.76519, 0.23025, 0.08066],
    [0.59095, 0.40905, 0.25980, 0.50971, 0.86035, 0.63627, 0.31526, 0.29129],
    [0.99000, 0.01000, 0.0025980, 0.05097, 0.99870, 0.50593, 0.07421, 0.73470],
]


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def diffusion(**changes) -> PriorDiffusion:
    torch.manual_seed(0)
    return PriorDiffusion(dataclasses.replace(lldif_tiny().prior, **changes))


@pytest.mark.parametrize("preset", ["base", "tiny"])
def test_pnet_s2_maps_the_internal_image_to_the_condition_vector(preset):
    config = PRESETS[preset]()
    image = torch.randn(2, 3, config.internal_size, config.internal_size)
    c = PNetS2(config.prior)(image)
    assert c.shape == (2, config.prior.dim) and torch.isfinite(c).all()
    assert not torch.allclose(c[0], c[1])


@pytest.mark.parametrize("preset", ["base", "tiny"])
@pytest.mark.parametrize("kind", ["cross_attention", "mlp"])
def test_pnet_s1_maps_the_two_embeddings_to_the_epd(preset, kind):
    config = PRESETS[preset]()
    prior = dataclasses.replace(config.prior, pnet_s1=kind)
    e = config.la_clip.embed_dim
    net = PNetS1(prior, e, e + 8)
    z = net(torch.randn(3, e), torch.randn(3, e + 8))
    assert z.shape == (3, prior.dim)
    # the label embedding changes Z: the prior sees the label
    assert not torch.allclose(z, net(torch.randn(3, e), torch.randn(3, e + 8)))


def test_pnet_s1_cross_attention_uses_divisible_heads():
    base = PNetS1(lldif_base().prior, 512, 512)
    tiny = PNetS1(lldif_tiny().prior, 64, 64)
    assert base.blocks[0].attn.heads == 4 and tiny.blocks[0].attn.heads == 4
    assert PNetS1(dataclasses.replace(lldif_tiny().prior, dim=40), 64, 64).blocks[0].attn.heads == 2


@pytest.mark.parametrize("preset", ["base", "tiny"])
def test_denoiser_shapes_and_time_scaling(preset):
    prior = PRESETS[preset]().prior
    net = Denoiser(prior.dim, prior.denoiser_blocks, prior.steps)
    assert net.resmlp[0].in_features == 2 * prior.dim + 1
    z, c = torch.randn(1, prior.dim).expand(2, -1), torch.randn(1, prior.dim).expand(2, -1)
    out = net(z, torch.tensor([3, 0]), c)
    assert out.shape == (2, prior.dim)
    assert not torch.allclose(out[0], out[1])  # the step index is an input
    assert net.max_period == 40


def test_base_prior_parameter_counts_match_spec():
    prior = lldif_base().prior
    pnet, denoiser = n_params(PNetS2(prior)), n_params(Denoiser(prior.dim, prior.denoiser_blocks, prior.steps))
    print(f"PNET_S2 {pnet / 1e6:.3f} M + denoiser {denoiser / 1e6:.3f} M = {(pnet + denoiser) / 1e6:.3f} M (spec 1.3)")
    assert abs(pnet + denoiser - 1.3e6) / 1.3e6 < 0.10
    assert denoiser == 513 * 256 + 256 + 256 * 256 + 256


def test_schedule_matches_the_spec_table():
    d = PriorDiffusion(lldif_base().prior)
    got = torch.stack([d.betas, d.alphas, d.alphas_cumprod, d.alphas_cumprod.sqrt(),
                       d.sqrt_one_minus_alphas_cumprod, d.posterior_mean_coef1, d.posterior_mean_coef2,
                       d.posterior_variance], dim=1)
    torch.testing.assert_close(got, torch.tensor(SPEC_TABLE), atol=1e-4, rtol=0)


def test_x0_and_eps_parameterisations_take_the_same_step():
    x0_form, eps_form = diffusion(prediction="x0"), diffusion(prediction="eps")
    z_t, x0 = torch.randn(4, 64), torch.randn(4, 64)
    for t in range(4):
        eps = (z_t - x0_form.sqrt_alphas_cumprod[t] * x0) / x0_form.sqrt_one_minus_alphas_cumprod[t]
        torch.testing.assert_close(eps_form.predict_x0(z_t, t, eps), x0, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(eps_form.step(z_t, t, eps), x0_form.step(z_t, t, x0), atol=2e-4, rtol=1e-4)


def test_reverse_at_t0_returns_the_x0_prediction_exactly():
    d = diffusion()
    c, z = torch.randn(3, 64), torch.randn(3, 64)
    expected = d.denoiser(z, torch.zeros(3, dtype=torch.long), c)
    assert torch.equal(d.reverse(c, z, steps=1), expected)


def test_reverse_runs_the_last_indices_and_gradients_reach_every_step():
    d = diffusion()
    calls = []
    d.denoiser.register_forward_hook(lambda m, args, out: calls.append((args[1][0].item(), args[0], out)))
    c = torch.randn(2, 64, requires_grad=True)
    z = d.reverse(c, torch.randn(2, 64))
    assert [t for t, _, _ in calls] == [3, 2, 1, 0]
    for _, z_t, out in calls:
        out.retain_grad()
        if z_t.requires_grad:
            z_t.retain_grad()
    z.square().sum().backward()
    assert all(out.grad is not None and out.grad.abs().sum() > 0 for _, _, out in calls)
    assert all(z_t.grad.abs().sum() > 0 for _, z_t, _ in calls[1:])
    assert c.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in d.denoiser.parameters())
    calls.clear()
    d.reverse(c, torch.randn(2, 64), steps=2)
    assert [t for t, _, _ in calls] == [1, 0]
    with pytest.raises(ValueError, match="steps"):
        d.reverse(c, torch.randn(2, 64), steps=5)


def test_training_prior_starts_from_the_noised_teacher():
    d = diffusion()
    z_teacher, c = torch.randn(2, 64), torch.randn(2, 64)
    got = d.training_prior(z_teacher, c, generator=torch.Generator().manual_seed(3))
    noise = torch.randn(2, 64, generator=torch.Generator().manual_seed(3))
    z_T = d.alphas_cumprod[3].sqrt() * z_teacher + (1 - d.alphas_cumprod[3]).sqrt() * noise
    torch.testing.assert_close(got, d.reverse(c, z_T))
    plain = diffusion(insert_noise=False)
    got = plain.training_prior(z_teacher, c, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(got, plain.reverse(c, noise))


def test_sample_is_repeatable_with_a_seeded_generator():
    d = diffusion()
    c = torch.randn(2, 64)
    a = d.sample(c, generator=torch.Generator().manual_seed(7))
    b = d.sample(c, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert not torch.equal(a, d.sample(c, generator=torch.Generator().manual_seed(8)))
    s = diffusion(stochastic_reverse=True)
    z_T = torch.randn(2, 64)
    noisy = s.reverse(c, z_T, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(noisy, s.reverse(c, z_T, generator=torch.Generator().manual_seed(2)))


def test_without_diffusion_the_condition_is_the_prior():
    d = diffusion(use_diffusion=False)
    c = torch.randn(2, 64)
    assert d.denoiser is None and n_params(d) == 0
    assert d.sample(c) is c and d.training_prior(torch.randn(2, 64), c) is c


def test_kl_is_zero_for_equal_inputs_and_positive_otherwise():
    z = torch.randn(4, 64)
    assert prior_kl(z, z.clone(), 0.15).abs() < 1e-6
    assert prior_kl(z, z + torch.randn(4, 64), 0.15) > 0
    # softmax is shift-invariant per row
    assert prior_kl(z, z + 3.0, 0.15).abs() < 1e-5


@pytest.mark.parametrize("tau", [0.15, 1.0])
def test_kl_gradient_matches_eq17(tau):
    z = torch.randn(5, 64, dtype=torch.float64, requires_grad=True)
    z_hat = torch.randn(5, 64, dtype=torch.float64, requires_grad=True)
    prior_kl(z, z_hat, tau).backward()
    expected = (F.softmax(z_hat / tau, dim=1) - F.softmax(z / tau, dim=1)) / (tau * 5)
    torch.testing.assert_close(z_hat.grad, expected)
    assert z.grad is None


def test_prior_loss_switches():
    z, z_hat = torch.randn(4, 64), torch.randn(4, 64)
    kl, l1 = prior_kl(z, z_hat, 0.15), (z - z_hat).abs().mean()
    torch.testing.assert_close(prior_loss(z, z_hat, LossConfig(prior_loss="kl")), kl)
    torch.testing.assert_close(prior_loss(z, z_hat, LossConfig(prior_loss="l1")), l1)
    torch.testing.assert_close(prior_loss(z, z_hat, LossConfig(prior_loss="kl+l1")), kl + l1)
    assert prior_loss(z, z_hat, LossConfig(prior_loss="none")) == 0
    with pytest.raises(ValueError, match="prior_loss"):
        prior_loss(z, z_hat, LossConfig(prior_loss="mse"))


def test_classification_loss_is_eq13():
    logits, labels = torch.randn(6, 7), torch.tensor([0, 1, 2, 3, 4, 6])
    expected = -F.log_softmax(logits, dim=1)[torch.arange(6), labels].mean()
    torch.testing.assert_close(classification_loss(logits, labels), expected)
    smooth = classification_loss(logits, labels, 0.1)
    torch.testing.assert_close(smooth, 0.9 * expected - 0.1 * F.log_softmax(logits, dim=1).mean())


def test_bad_shapes_raise_naming_the_argument():
    prior = lldif_tiny().prior
    with pytest.raises(ValueError, match="image"):
        PNetS2(prior)(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="divisible by 4"):
        PNetS2(prior)(torch.randn(1, 3, 62, 64))
    with pytest.raises(ValueError, match="label_embed"):
        PNetS1(prior, 64, 64)(torch.randn(2, 64), torch.randn(2, 32))
    d = diffusion()
    with pytest.raises(ValueError, match="z_T"):
        d.reverse(torch.randn(2, 64), torch.randn(3, 64))
    with pytest.raises(ValueError, match="c must"):
        d.denoiser(torch.randn(2, 64), torch.tensor([0, 1]), torch.randn(2, 32))
    with pytest.raises(ValueError, match="z_teacher"):
        prior_kl(torch.randn(2, 63), torch.randn(2, 64), 0.15)
    with pytest.raises(ValueError, match="labels"):
        classification_loss(torch.randn(2, 7), torch.tensor([1.0, 2.0]))


# --- the normalised prior: PNET_S1's out_norm and the denoiser's linear output ---------------------------------


def pnet_s1(kind: str = "cross_attention", normalize: str = "batch") -> PNetS1:
    torch.manual_seed(0)
    return PNetS1(dataclasses.replace(lldif_tiny().prior, pnet_s1=kind, normalize=normalize), 64, 64)


def embeddings(batch: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 64, generator=generator), torch.randn(batch, 64, generator=generator)


def raw_prior(net: PNetS1) -> dict[str, torch.Tensor]:
    """Records Z before out_norm on every call of `net`."""
    seen = {}
    net.out_norm.register_forward_hook(lambda module, args, out: seen.update(raw=args[0].detach().clone()))
    return seen


@pytest.mark.parametrize("kind", ["cross_attention", "mlp"])
def test_pnet_s1_batch_norm_standardises_each_dimension_in_training(kind):
    net = pnet_s1(kind).train()
    assert isinstance(net.out_norm, torch.nn.BatchNorm1d) and not net.out_norm.affine
    assert lldif_tiny().prior.normalize == "batch" == lldif_base().prior.normalize
    seen = raw_prior(net)
    z = net(*embeddings(32))
    raw = seen["raw"]
    torch.testing.assert_close(z.mean(0), torch.zeros(64), rtol=0, atol=1e-5)
    # unit variance up to BatchNorm's eps, which is not negligible against the small spread of Z at initialisation
    variance = raw.var(0, unbiased=False)
    torch.testing.assert_close(z.var(0, unbiased=False), variance / (variance + net.out_norm.eps), rtol=1e-4,
                               atol=1e-5)
    assert z.var(0, unbiased=False).min() > 0.7 and z.var(0, unbiased=False).max() <= 1
    # the running statistics follow the batch (momentum 0.1 from 0 and 1)
    torch.testing.assert_close(net.out_norm.running_mean, 0.1 * raw.mean(0))
    torch.testing.assert_close(net.out_norm.running_var, 0.9 + 0.1 * raw.var(0, unbiased=True))


@pytest.mark.parametrize("kind", ["cross_attention", "mlp"])
def test_pnet_s1_batch_norm_uses_its_running_statistics_in_eval(kind):
    net = pnet_s1(kind).train()
    for seed in range(3):
        net(*embeddings(16, seed))
    net.eval()
    seen = raw_prior(net)
    running_mean, running_var = net.out_norm.running_mean.clone(), net.out_norm.running_var.clone()
    image, label = embeddings(5, seed=9)
    z = net(image, label)
    expected = (seen["raw"] - running_mean) / torch.sqrt(running_var + net.out_norm.eps)
    torch.testing.assert_close(z, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(net.out_norm.running_mean, running_mean) and torch.equal(net.out_norm.running_var, running_var)
    # each sample's prior is its own, not its batch's
    torch.testing.assert_close(net(image[:1], label[:1]), z[:1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["cross_attention", "mlp"])
def test_pnet_s1_without_normalisation_returns_the_raw_prior(kind):
    plain, normalised = pnet_s1(kind, normalize="none").train(), pnet_s1(kind).train()
    assert isinstance(plain.out_norm, torch.nn.Identity)
    assert not [key for key in plain.state_dict() if key.startswith("out_norm.")]
    extra = {key for key in normalised.state_dict() if key not in plain.state_dict()}
    assert extra == {"out_norm.running_mean", "out_norm.running_var", "out_norm.num_batches_tracked"}
    seen = raw_prior(normalised)
    image, label = embeddings(8)
    z = normalised(image, label)
    torch.testing.assert_close(plain(image, label), seen["raw"])
    assert not torch.allclose(z, seen["raw"])


def test_pnet_s1_bad_normalize_raises():
    with pytest.raises(ValueError, match=r"config\.normalize must be one of .*'layer'"):
        PNetS1(dataclasses.replace(lldif_tiny().prior, normalize="layer"), 64, 64)


def test_denoiser_linear_output_drops_only_the_last_activation():
    torch.manual_seed(0)
    default = Denoiser(64, 2, 4)
    torch.manual_seed(0)
    linear = Denoiser(64, 2, 4, linear_output=True)
    assert isinstance(default.resmlp[-1], torch.nn.LeakyReLU) and isinstance(linear.resmlp[-1], torch.nn.Linear)
    assert len(default.resmlp) == len(linear.resmlp) + 1
    with torch.no_grad():  # pull the output far below zero: only the linear output can follow
        default.resmlp[-2].bias.fill_(-5.0)
        linear.resmlp[-1].bias.fill_(-5.0)
    z, c, t = torch.randn(3, 64), torch.randn(3, 64), torch.tensor([0, 2, 3])
    out, out_default = linear(z, t, c), default(z, t, c)
    assert out.max() < -2
    assert out_default.min() > -1
    torch.testing.assert_close(out_default, F.leaky_relu(out, 0.1))


@pytest.mark.parametrize(("normalize", "last"), [("batch", torch.nn.Linear), ("none", torch.nn.LeakyReLU)])
def test_diffusion_denoiser_output_follows_the_prior_normalisation(normalize, last):
    assert isinstance(diffusion(normalize=normalize).denoiser.resmlp[-1], last)
