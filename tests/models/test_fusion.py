"""The fusion head: per-scale concat, POSTER++ embeddings, ViT, SE gate and classifier (SPEC 3.5, Eq. 10-12)."""

import dataclasses

import pytest
import torch
from torch import nn

from lldif.models.config import lldif_base, lldif_tiny
from lldif.models.fusion import FusionHead

PRESETS = {"base": lldif_base, "tiny": lldif_tiny}


def branch_shapes(config):
    """DTNet tap widths (dec-L2, dec-L3, latent), DLNet widths and the three sides (internal / 4, 8, 16)."""
    d = config.dtnet.dim
    sides = tuple(config.internal_size // f for f in (4, 8, 16))
    return (2 * d, 4 * d, 8 * d), tuple(config.dlnet.dims), sides


def make(preset, concat="channel", batch=2, readout=None):
    """A head of the preset (its own readout unless `readout` is given) and random inputs of both branches."""
    torch.manual_seed(0)
    config = PRESETS[preset]()
    if readout is not None:
        config.fusion.readout = readout
    dt, dl, sides = branch_shapes(config)
    head = FusionHead(dataclasses.replace(config.fusion, concat=concat), dt, dl, config.num_classes, sides)
    f = [torch.randn(batch, c, s, s) for c, s in zip(dt, sides, strict=True)]
    o = [torch.randn(batch, c, s, s) for c, s in zip(dl, sides, strict=True)]
    return config, head, f, o


def feature_width(config, concat):
    """The width of `FusionHead.features`: embed_dim, or embed_dim per token for the "tokens" readout."""
    tokens = 3 * branch_shapes(config)[2][2] ** 2 * (2 if concat == "token" else 1)
    return config.fusion.embed_dim * (tokens if config.fusion.readout == "tokens" else 1)


@pytest.mark.parametrize("preset", ["base", "tiny"])
@pytest.mark.parametrize("concat", ["channel", "token"])
def test_logits_and_features_shapes(preset, concat):
    config, head, f, o = make(preset, concat)
    assert config.fusion.readout == {"base": "cls", "tiny": "tokens"}[preset]
    logits = head(f, o)
    assert logits.shape == (2, config.num_classes)
    feature = head.features(f, o)
    assert feature.shape == (2, feature_width(config, concat))
    torch.testing.assert_close(head.head(feature), logits)
    tokens = 3 * branch_shapes(config)[2][2] ** 2 * (2 if concat == "token" else 1)
    assert head.pos_embed.shape == (1, tokens + 1, config.fusion.embed_dim)


@pytest.mark.parametrize("readout", ["cls", "mean", "tokens"])
@pytest.mark.parametrize("concat", ["channel", "token"])
def test_readouts_shapes_and_classifier_width(readout, concat):
    config, head, f, o = make("tiny", concat, batch=3, readout=readout)
    tokens = head.pos_embed.shape[1] - 1
    width = config.fusion.embed_dim * (tokens if readout == "tokens" else 1)
    assert head.readout == readout and feature_width(config, concat) == width
    assert head.head.in_features == width and head.head.out_features == config.num_classes
    logits, feature = head(f, o), head.features(f, o)
    assert logits.shape == (3, config.num_classes) and feature.shape == (3, width)
    torch.testing.assert_close(head.head(feature), logits)


@pytest.mark.parametrize("readout", ["cls", "mean", "tokens"])
def test_readouts_read_the_normed_tokens_through_the_se_gate(readout):
    _, head, f, o = make("tiny", batch=2, readout=readout)
    seen = {}
    head.norm.register_forward_hook(lambda module, args, out: seen.update(tokens=out))
    feature = head.features(f, o)
    x = seen["tokens"]  # (B, 1 + tokens, embed_dim), the cls token first
    if readout == "cls":
        expected = head.se_block(x[:, 0])
    elif readout == "mean":
        expected = head.se_block(x[:, 1:].mean(dim=1))  # the image tokens, not the cls one
    else:  # every token but the cls one gated on its own, concatenated in token order
        expected = torch.cat([head.se_block(x[:, i]) for i in range(1, x.shape[1])], dim=1)
    torch.testing.assert_close(feature, expected)


def test_base_embeddings_are_posters():
    _, head, _, _ = make("base")
    strides = [[(m.in_channels, m.out_channels, m.kernel_size, m.stride) for m in e] for e in
               (head.embed_q, head.embed_k, head.embed_v)]
    assert strides == [
        [(160, 768, (3, 3), (2, 2)), (768, 768, (3, 3), (2, 2))],
        [(320, 768, (3, 3), (2, 2))],
        [(640, 768, (1, 1), (1, 1))],
    ]
    assert head.pos_embed.shape[1] == 148 and len(head.blocks) == 2


def test_base_parameter_count_matches_spec():
    _, head, _, _ = make("base")
    count = sum(p.numel() for p in head.parameters())
    print(f"fusion embeds + ViT(2) + SE + head: {count / 1e6:.2f} M (spec 24.5 M)")
    assert abs(count - 24.5e6) / 24.5e6 < 0.10


def test_initialisation_follows_poster():
    _, head, _, _ = make("base")
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 2 * 4 + 2 + 1
    for layer in linears:
        assert layer.weight.std().item() == pytest.approx(0.01, rel=0.1)
        assert torch.count_nonzero(layer.bias) == 0
    assert head.pos_embed.std().item() == pytest.approx(0.02, rel=0.1)
    assert all(m.eps == 1e-6 for m in head.modules() if isinstance(m, nn.LayerNorm))


def test_gradients_reach_both_branches_and_every_scale():
    _, head, f, o = make("tiny", "token")
    for x in f + o:
        x.requires_grad_(True)
    head(f, o).sum().backward()
    assert all(x.grad.abs().sum() > 0 for x in f + o)


def test_bad_shapes_raise_naming_the_argument():
    _, head, f, o = make("tiny")
    with pytest.raises(ValueError, match=r"dlnet_features\[1\]"):
        head(f, [o[0], o[1][:, :-1], o[2]])
    with pytest.raises(ValueError, match=r"dtnet_features\[2\]"):
        head([f[0], f[1], f[2][..., :-1]], o)
    with pytest.raises(ValueError, match="dtnet_features must hold 3"):
        head(f[:2], o)
    with pytest.raises(ValueError, match="batch"):
        head(f, [x[:1] for x in o])
    with pytest.raises(ValueError, match="scales"):
        FusionHead(lldif_tiny().fusion, (32, 64, 128), (32, 32, 64), 7, (16, 8, 3))


def test_bad_readout_raises():
    config = lldif_tiny()
    dt, dl, sides = branch_shapes(config)
    with pytest.raises(ValueError, match=r"config\.readout must be one of .*'max'"):
        FusionHead(dataclasses.replace(config.fusion, readout="max"), dt, dl, config.num_classes, sides)
