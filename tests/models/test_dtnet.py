"""DTNet: shapes and parameter counts of both presets, fused vs reference ops, and a block against plain DiffIR."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import lldif_kernels
from lldif.models.config import lldif_base, lldif_tiny
from lldif.models.dtnet import DTNet, TransformerBlock
from lldif_kernels.nn import GatedDepthwiseFeedForward, ModulatedLayerNorm


def _model(config, seed: int = 0, **overrides) -> DTNet:
    torch.manual_seed(seed)
    dtnet = dataclasses.replace(config.dtnet, **overrides)
    return DTNet(dtnet, config.prior.dim, config.in_channels, backend=config.backend)


def _inputs(config, batch: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, config.in_channels, config.internal_size, config.internal_size, generator=generator)
    return image, torch.randn(batch, config.prior.dim, generator=generator)


def _expected_shapes(config, batch: int) -> list[tuple[int, ...]]:
    side, dim = config.internal_size, config.dtnet.dim
    return [(batch, dim * 2, side // 4, side // 4), (batch, dim * 4, side // 8, side // 8),
            (batch, dim * 8, side // 16, side // 16)]


@pytest.mark.parametrize("taps", ["decoder", "encoder"])
def test_tiny_shapes_and_taps(taps: str) -> None:
    config = lldif_tiny()
    model = _model(config, taps=taps)
    dim = config.dtnet.dim
    assert model.tap_channels == (2 * dim, 4 * dim, 8 * dim)
    assert hasattr(model, "decoder_level2") == (taps == "decoder")
    image, z = _inputs(config, batch=2)
    out = model(image, z)
    assert [tuple(o.shape) for o in out] == _expected_shapes(config, 2)
    assert all(o.isfinite().all() for o in out)


def test_parameter_names_follow_restormer() -> None:
    names = set(_model(lldif_tiny()).state_dict())
    restormer = {"patch_embed.proj.weight", "down1_2.body.0.weight", "down3_4.body.0.weight", "up4_3.body.0.weight",
                 "reduce_chan_level3.weight", "reduce_chan_level2.weight", "latent.0.attn.temperature",
                 "encoder_level1.0.attn.qkv.weight", "encoder_level1.0.attn.qkv_dwconv.weight",
                 "encoder_level1.0.attn.project_out.weight", "decoder_level2.0.ffn.project_in.weight",
                 "decoder_level2.0.ffn.dwconv.weight", "decoder_level2.0.ffn.project_out.weight",
                 "decoder_level3.0.norm1.weight", "decoder_level3.0.norm2.bias"}
    assert restormer <= names
    # DiffIR's attn.kernel / ffn.kernel, moved into the two norms of each block.
    assert {"encoder_level1.0.norm1.kernel.weight", "encoder_level1.0.norm2.kernel.weight"} <= names


def test_encoder_taps_are_the_encoder_outputs() -> None:
    config = lldif_tiny()
    model = _model(config, taps="encoder")
    image, z = _inputs(config, batch=1)
    seen = {}
    for name in ("encoder_level2", "encoder_level3", "latent"):
        getattr(model, name)[-1].register_forward_hook(lambda m, i, o, name=name: seen.update({name: o}))
    out = model(image, z)
    for tap, conv, name in zip(out, model.tap_convs, ("encoder_level2", "encoder_level3", "latent"), strict=True):
        torch.testing.assert_close(tap, conv(seen[name]))


def _perturb_kernels(model: torch.nn.Module, std: float = 0.05) -> None:
    """Moves every modulation kernel off its initialisation (adaln's zero), as training would."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, ModulatedLayerNorm):
                module.kernel.weight.normal_(0, std)


@pytest.mark.parametrize("modulation", ["diffir", "adaln"])
def test_prior_changes_every_tap(modulation: str) -> None:
    config = lldif_tiny()
    model = _model(config, modulation=modulation)
    if modulation == "adaln":
        _perturb_kernels(model)  # zero-initialised: the prior acts once the kernels have learned
    image, z = _inputs(config, batch=1)
    for a, b in zip(model(image, z), model(image, z + 1.0), strict=True):
        assert (a - b).abs().max() > 1e-3


def test_modulation_reaches_every_norm_and_defaults_to_adaln() -> None:
    config = lldif_tiny()
    assert config.dtnet.modulation == "adaln" and lldif_base().dtnet.modulation == "adaln"
    for modulation in ("diffir", "adaln"):
        norms = [m for m in _model(config, modulation=modulation).modules() if isinstance(m, ModulatedLayerNorm)]
        blocks = sum(config.dtnet.encoder_blocks) + sum(config.dtnet.decoder_blocks)
        assert len(norms) == 2 * blocks and all(norm.modulation == modulation for norm in norms)
        assert all((torch.count_nonzero(norm.kernel.weight) == 0) == (modulation == "adaln") for norm in norms)


def test_adaln_blocks_start_independent_of_the_prior_and_diffir_ones_do_not() -> None:
    config = lldif_tiny()
    image, z = _inputs(config, batch=2)
    others = (torch.zeros_like(z), 10 * torch.randn_like(z))
    adaln = _model(config, modulation="adaln")
    with torch.no_grad():
        start = adaln(image, z)
        for other in others:
            assert all(torch.equal(a, b) for a, b in zip(start, adaln(image, other), strict=True))
        diffir = _model(config, modulation="diffir")
        for other in others:
            assert all((a - b).abs().max() > 1e-3 for a, b in zip(diffir(image, z), diffir(image, other), strict=True))
    # the prior's gradient still reaches every zero kernel, so it starts to modulate after one step
    sum(tap.square().sum() for tap in adaln(image, z)).backward()
    kernels = [m.kernel.weight for m in adaln.modules() if isinstance(m, ModulatedLayerNorm)]
    assert all(kernel.grad is not None and kernel.grad.abs().sum() > 0 for kernel in kernels)


def test_base_parameter_counts_shapes_and_fused_forward() -> None:
    config = lldif_base()
    model = _model(config)
    blocks = [m for m in model.modules() if isinstance(m, TransformerBlock)]
    block_params = sum(p.numel() for b in blocks for p in b.parameters())
    kernel_params = sum(b.norm1.kernel.weight.numel() + b.norm2.kernel.weight.numel() for b in blocks)
    conv_params = sum(p.numel() for p in model.parameters()) - block_params
    print(f"DTNet base: blocks {block_params / 1e6:.2f} M (kernels {kernel_params / 1e6:.2f} M in {2 * len(blocks)} "
          f"Linears), convs {conv_params / 1e6:.2f} M, total {(block_params + conv_params) / 1e6:.2f} M")
    assert len(blocks) == 36
    assert abs(block_params - 28.3e6) < 0.1 * 28.3e6 and abs(kernel_params - 6.9e6) < 0.1 * 6.9e6
    assert abs(block_params + conv_params - 33.7e6) < 0.1 * 33.7e6
    # The spec's table, level by level: width, heads and FFN hidden width H' = int(C * 2.66).
    for name, width, heads, hidden in [("encoder_level1", 48, 1, 127), ("encoder_level2", 96, 2, 255),
                                       ("encoder_level3", 192, 4, 510), ("latent", 384, 8, 1021),
                                       ("decoder_level3", 192, 4, 510), ("decoder_level2", 96, 2, 255)]:
        block = getattr(model, name)[0]
        assert block.attn.temperature.shape == (heads, 1, 1) and block.norm1.kernel.weight.shape == (2 * width, 256)
        assert block.ffn.project_out.weight.shape == (width, hidden, 1, 1)

    image, z = _inputs(config, batch=1)
    with torch.no_grad():
        fused = model(image, z)
        with lldif_kernels.use_backend("reference"):
            reference = model(image, z)
    assert [tuple(o.shape) for o in fused] == _expected_shapes(config, 1)
    for got, want in zip(fused, reference, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_tiny_fused_matches_reference_forward_and_gradients() -> None:
    config = lldif_tiny()
    fused = _model(config)
    reference = copy.deepcopy(fused)
    image, z = _inputs(config, batch=2)
    outputs = []
    for model, backend in [(fused, None), (reference, "reference")]:
        with lldif_kernels.use_backend(backend):
            zz = z.clone().requires_grad_()
            out = model(image, zz)
            sum((o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() for o in out).backward()
        outputs.append((out, zz.grad, dict(model.named_parameters())))
    (out_f, dz_f, params_f), (out_r, dz_r, params_r) = outputs
    for got, want in zip(out_f, out_r, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dz_f, dz_r, rtol=1e-4, atol=1e-5)
    assert params_f.keys() == params_r.keys()
    for name, param in params_f.items():
        assert param.grad is not None, name
        torch.testing.assert_close(param.grad, params_r[name].grad, rtol=1e-3, atol=1e-5, msg=name)


def _diffir_block(block: TransformerBlock, x: torch.Tensor, z: torch.Tensor, modulation: str = "diffir"
                  ) -> torch.Tensor:
    """DiffIR's S1 TransformerBlock in plain PyTorch, reading the weights of `block` (`modulation="adaln"`: the
    norms' scale is 1 + k1 instead of k1)."""

    def norm(module, y: torch.Tensor) -> torch.Tensor:
        mu, var = y.mean(1, keepdim=True), y.var(1, keepdim=True, unbiased=False)
        centred = y if module.bias is None else y - mu
        y = centred / torch.sqrt(var + 1e-5) * module.weight.view(1, -1, 1, 1)
        if module.bias is not None:
            y = y + module.bias.view(1, -1, 1, 1)
        k1, k2 = (z @ module.kernel.weight.t()).view(z.shape[0], -1, 1, 1).chunk(2, dim=1)
        return y * (1 + k1 if modulation == "adaln" else k1) + k2

    def conv(layer, y: torch.Tensor) -> torch.Tensor:
        return F.conv2d(y, layer.weight, layer.bias, padding=layer.padding, groups=layer.groups)

    def attention(module, y: torch.Tensor) -> torch.Tensor:
        b, c, h, w = y.shape
        heads = module.temperature.shape[0]
        q, k, v = (t.reshape(b, heads, c // heads, h * w) for t in conv(module.qkv_dwconv, conv(module.qkv, y))
                   .chunk(3, dim=1))
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        attn = (q @ k.transpose(-2, -1) * module.temperature).softmax(dim=-1)
        return conv(module.project_out, (attn @ v).reshape(b, c, h, w))

    def feed_forward(module: GatedDepthwiseFeedForward, y: torch.Tensor) -> torch.Tensor:
        y1, y2 = conv(module.dwconv, conv(module.project_in, y)).chunk(2, dim=1)
        return conv(module.project_out, F.gelu(y1) * y2)

    x = x + attention(block.attn, norm(block.norm1, x))
    return x + feed_forward(block.ffn, norm(block.norm2, x))


@pytest.mark.parametrize("modulation", ["diffir", "adaln"])
@pytest.mark.parametrize("backend", [None, "reference"])
@pytest.mark.parametrize(("bias", "bias_free_norm"), [(False, False), (True, True)])
def test_block_matches_plain_diffir_block(backend: str | None, bias: bool, bias_free_norm: bool,
                                          modulation: str) -> None:
    torch.manual_seed(0)
    block = TransformerBlock(32, 4, 2.66, prior_dim=24, bias=bias, bias_free_norm=bias_free_norm, backend=backend,
                             modulation=modulation)
    with torch.no_grad():  # move off the ones/zeros init so every parameter matters
        for name, param in block.named_parameters():
            if ("kernel" not in name and param.dim() == 1) or "temperature" in name:
                param.uniform_(0.5, 1.5)
            elif "kernel" in name and modulation == "adaln":
                param.normal_(0, 0.1)
    assert len([n for n, _ in block.named_parameters() if "kernel" in n]) == 2
    x, z = torch.randn(2, 32, 12, 10), torch.randn(2, 24)
    torch.testing.assert_close(block(x, z), _diffir_block(block, x, z, modulation), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("image_shape", "z_shape", "argument"), [
    ((1, 3, 56, 56), (1, 64), "image"),    # 56 is not divisible by 16
    ((1, 3, 64, 72), (1, 64), "image"),
    ((1, 1, 64, 64), (1, 64), "image"),    # wrong channel count
    ((3, 64, 64), (1, 64), "image"),
    ((1, 3, 64, 64), (1, 32), "z"),        # wrong prior width
    ((2, 3, 64, 64), (1, 64), "z"),        # batch mismatch
])
def test_bad_shapes_raise_naming_the_argument(image_shape, z_shape, argument: str) -> None:
    config = lldif_tiny()
    model = _model(config)
    with pytest.raises(ValueError, match=f"^{argument} must be"):
        model(torch.zeros(image_shape), torch.zeros(z_shape))


def test_bad_config_raises() -> None:
    config = lldif_tiny()
    with pytest.raises(ValueError, match="taps"):
        _model(config, taps="middle")
    with pytest.raises(ValueError, match="encoder_blocks"):
        _model(config, encoder_blocks=(1, 1, 1))
    with pytest.raises(ValueError, match=r"config\.modulation must be one of .*'bogus'"):
        _model(config, modulation="bogus")
