"""DLNet and its backbones: shapes and sizes of both presets, fused vs reference, heatmaps, loaders, bad inputs."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
import torch

from lldif.models.backbones import (
    IR50,
    HeatmapLandmarkEncoder,
    LightResNet,
    MobileFaceNet,
    load_ir50_checkpoint,
    load_mobilefacenet_checkpoint,
    render_heatmaps,
)
from lldif.models.config import DLNetConfig, lldif_base, lldif_tiny
from lldif.models.dlnet import DLNet
from lldif_kernels import dispatch


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def tiny_inputs(batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    config = lldif_tiny()
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, 3, config.internal_size, config.internal_size, generator=gen)
    points = torch.rand(batch, config.dlnet.landmark_points, 2, generator=gen) * (config.internal_size - 1)
    return image, points


def test_base_shapes_and_parameter_counts_match_spec_9():
    config = lldif_base()
    torch.manual_seed(0)
    model = DLNet(config.dlnet, config.internal_size).eval()
    assert isinstance(model.ir_back, IR50) and isinstance(model.face_landback, MobileFaceNet)
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 112, 112))
    assert [tuple(o.shape) for o in outs] == [(1, 64, 28, 28), (1, 128, 14, 14), (1, 256, 7, 7)]
    assert model.out_channels == (64, 128, 256) and all(o.isfinite().all() for o in outs)

    image_path = count(model.ir_back) + sum(count(getattr(model, f"conv{i}")) for i in (1, 2, 3))
    attention = sum(count(getattr(model, f"{part}{i}")) for i in (1, 2, 3) for part in ("window", "attn", "ffn"))
    measured = {"IR-50 stages 1-3 + stride-2 convs": (image_path, 18e6),
                "MobileFaceNet (no GDC head)": (count(model.face_landback), 1.0e6),
                "last_face_conv": (count(model.last_face_conv), 1.2e6),
                "DLNet attention + FFNs": (attention, 1.0e6)}
    for name, (got, spec) in measured.items():
        print(f"{name}: {got / 1e6:.3f} M (SPEC 9: {spec / 1e6:.1f} M)")
        assert abs(got - spec) <= 0.1 * spec, name
    assert count(model.last_face_conv) == 512 * 256 * 9 + 256
    # Per scale: LN 2D, kv 2D^2+2D, proj D^2+D, bias table (2ws-1)^2 heads, gammas 2D, LN 2D, MLP 8D^2+5D.
    assert attention == sum(11 * d * d + 14 * d + (2 * w - 1) ** 2 * h
                            for d, w, h in zip((64, 128, 256), (28, 14, 7), (2, 4, 8), strict=True))


def test_tiny_shapes_with_heatmaps_and_light_resnet():
    config = lldif_tiny()
    model = DLNet(config.dlnet, config.internal_size)
    assert isinstance(model.ir_back, LightResNet) and isinstance(model.face_landback, HeatmapLandmarkEncoder)
    assert [tuple(f.shape) for f in model.ir_back(torch.zeros(1, 3, 64, 64))] == [
        (1, 16, 32, 32), (1, 32, 16, 16), (1, 64, 8, 8)]
    outs = model(*tiny_inputs())
    assert [tuple(o.shape) for o in outs] == [(2, 32, 16, 16), (2, 32, 8, 8), (2, 64, 4, 4)]
    assert model.out_channels == (32, 32, 64)


def run_with_grads(backend: str | None, image: torch.Tensor, points: torch.Tensor, config: DLNetConfig):
    torch.manual_seed(1)
    model = DLNet(config, 64, backend=backend).eval()  # eval: no DropPath, so both runs see the same network
    outs = model(image, points)
    loss = sum((o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() for o in outs)
    loss.backward()
    return outs, {name: p.grad for name, p in model.named_parameters()}


def test_fused_backend_matches_reference_forward_and_all_parameter_gradients():
    image, points = tiny_inputs()
    # Layer scale 1 so the attention and MLP branches weigh as much as the shortcut.
    config = dataclasses.replace(lldif_tiny().dlnet, layer_scale=1.0, query_projection=True)
    served = dispatch.select("window_cross_attention", None, [image])
    if served == "reference":
        pytest.skip("no fused backend is available on this machine")
    fused_outs, fused_grads = run_with_grads(None, image, points, config)
    ref_outs, ref_grads = run_with_grads("reference", image, points, config)
    for fused, ref in zip(fused_outs, ref_outs, strict=True):
        torch.testing.assert_close(fused, ref, atol=1e-4, rtol=1e-4)
    assert fused_grads.keys() == ref_grads.keys() and any(k.startswith("q_proj") for k in fused_grads)
    for name, grad in fused_grads.items():
        assert grad is not None and ref_grads[name] is not None, name
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-4, rtol=1e-3, msg=name)


def test_training_step_reaches_trainable_mobilefacenet_and_drop_path():
    config = DLNetConfig(dims=(64, 128, 32), heads=(2, 4, 1), image_backbone="resnet", resnet_widths=(8, 8, 8),
                         drop_path=0.5)
    model = DLNet(config, 32, backend="reference").train()
    assert model.ffn1.drop_path.rate == 0.0 and model.ffn2.drop_path.rate == 0.125
    assert model.ffn3.drop_path.rate == 0.25
    outs = model(torch.randn(4, 3, 32, 32))
    assert [tuple(o.shape) for o in outs] == [(4, 64, 8, 8), (4, 128, 4, 4), (4, 32, 2, 2)]
    sum(o.square().mean() for o in outs).backward()
    assert model.face_landback.conv1.conv.weight.grad.abs().sum() > 0
    assert model.last_face_conv.weight.grad.abs().sum() > 0


def test_heatmaps_peak_at_the_given_points():
    points = torch.tensor([[[5.0, 10.0], [20.0, 3.0], [7.3, 12.6]]])
    maps = render_heatmaps(points, 24, sigma=2.0)
    assert maps.shape == (1, 3, 24, 24)
    for channel, (x, y) in enumerate([(5, 10), (20, 3), (7, 13)]):
        peak = maps[0, channel].argmax().item()
        assert divmod(peak, 24) == (y, x)
    assert maps[0, 0, 10, 5] == 1.0 and maps[0, 1, 3, 20] == 1.0
    assert maps[0, 0, 10, 7].item() == pytest.approx(torch.exp(torch.tensor(-4 / 8)).item())

    encoder = HeatmapLandmarkEncoder(points=3, dims=(8, 16, 32), sigma=2.0)
    outs = encoder(points.expand(2, -1, -1), 32)
    assert [tuple(o.shape) for o in outs] == [(2, 8, 8, 8), (2, 16, 4, 4), (2, 32, 2, 2)]

    sum(o.sum() for o in outs).backward()
    assert all(p.grad is not None for p in encoder.parameters())


def test_ir50_loader_reports_missing_and_unexpected_keys(tmp_path):
    source, target = IR50(), IR50()
    state = {f"module.{k}": v.clone() for k, v in source.state_dict().items()}
    state["module.body2.0.res_layer.1.weight"] += 1.0
    del state["module.body3.13.res_layer.4.bias"]
    state["module.output_layer.3.weight"] = torch.zeros(512, 25088)
    state["module.body1.0.res_layer.0.weight"] = torch.zeros(7)  # wrong shape
    path = tmp_path / "ir50.pth"
    torch.save({"state_dict": state}, path)
    missing, unexpected = load_ir50_checkpoint(target, str(path))
    assert set(missing) == {"body3.13.res_layer.4.bias", "body1.0.res_layer.0.weight"}
    assert set(unexpected) == {"output_layer.3.weight", "body1.0.res_layer.0.weight"}
    torch.testing.assert_close(target.body2[0].res_layer[1].weight, source.body2[0].res_layer[1].weight + 1.0)


def test_mobilefacenet_loader_freezes_and_keeps_batchnorm_in_eval(tmp_path):
    source, target = MobileFaceNet(), MobileFaceNet()
    assert all(p.requires_grad for p in target.parameters())
    state = {f"face_landback.{k}": v for k, v in source.state_dict().items()}
    state["face_landback.output_layer.linear.weight"] = torch.zeros(136, 512)
    path = tmp_path / "mobilefacenet.pth.tar"
    torch.save({"state_dict": state, "epoch": 3}, path)
    missing, unexpected = load_mobilefacenet_checkpoint(target, str(path))
    assert missing == [] and unexpected == ["face_landback.output_layer.linear.weight"]
    torch.testing.assert_close(target.conv_6_sep.conv.weight, source.conv_6_sep.conv.weight)
    target.train()
    assert not any(p.requires_grad for p in target.parameters())
    assert not any(m.training for m in target.modules())


class NotATensor:
    """A pickled object that weights_only loading must refuse."""


@pytest.mark.parametrize("loader, module", [(load_ir50_checkpoint, LightResNet), (load_mobilefacenet_checkpoint,
                                                                                    MobileFaceNet)])
def test_loaders_refuse_pickled_objects(tmp_path, loader, module):
    path = tmp_path / "bad.pth"
    torch.save({"state_dict": {}, "payload": NotATensor()}, path)
    with pytest.raises(pickle.UnpicklingError):
        loader(module(), str(path))


def test_bad_inputs_raise_naming_the_argument():
    config = lldif_tiny()
    model = DLNet(config.dlnet, 64)
    image, points = tiny_inputs()
    with pytest.raises(ValueError, match="landmarks"):
        model(image, None)
    with pytest.raises(ValueError, match="landmarks"):
        model(image, points[:, :5])
    with pytest.raises(ValueError, match="landmarks"):
        model(image, points[:1])
    with pytest.raises(ValueError, match="image"):
        model(image[:, :, :32, :32], points)
    with pytest.raises(ValueError, match="image"):
        model(image[:, :1], points)
    with pytest.raises(ValueError, match="internal_size"):
        DLNet(config.dlnet, 40)
    with pytest.raises(ValueError, match="dims"):
        DLNet(DLNetConfig(dims=(32, 32, 64), heads=(1, 1, 2)), 64)  # MobileFaceNet gives 64 and 128 channels
    with pytest.raises(ValueError, match="landmark_features"):
        DLNet(dataclasses.replace(config.dlnet, landmark_features="dlib"), 64)


def test_scale_output_follows_eq_5_to_9_written_out():
    config = dataclasses.replace(lldif_tiny().dlnet, layer_scale=0.5)
    model = DLNet(config, 64, backend="reference").eval()
    image, points = tiny_inputs()
    with torch.no_grad():
        out3 = model(image, points)[2]
        x = model.conv3(model.ir_back(image)[2]).permute(0, 2, 3, 1).reshape(2, 16, 64)
        q = model.face_landback(points, 64)[2].permute(0, 2, 3, 1).reshape(2, 16, 2, 32).transpose(1, 2)
        x = model.window3.norm(x)
        k, v = model.attn3.qkv(x).reshape(2, 16, 2, 2, 32).permute(2, 0, 3, 1, 4)
        bias = model.attn3.relative_position_bias_table[model.attn3.relative_position_index.view(-1)]
        logits = q @ k.transpose(-1, -2) / 32**0.5 + bias.view(16, 16, 2).permute(2, 0, 1)
        attn = model.attn3.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(2, 16, 64))
        x1 = x + model.ffn3.gamma1 * attn
        x2 = x1 + model.ffn3.gamma2 * model.ffn3.mlp.fc2(torch.nn.functional.gelu(model.ffn3.mlp.fc1(
            torch.nn.functional.layer_norm(x1, (64,), model.ffn3.norm.weight, model.ffn3.norm.bias))))
    torch.testing.assert_close(out3, x2.transpose(1, 2).reshape(2, 64, 4, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_heatmaps_have_no_subnormal_values(dtype):
    """Subnormal floats are ~100x slower on x86: far tails are 0 instead (they made the first conv 15% of a step)."""
    points = torch.rand(4, 68, 2, generator=torch.Generator().manual_seed(0), dtype=dtype) * 64
    maps = render_heatmaps(points, 64, sigma=2.0)
    assert maps[maps != 0].min() >= torch.finfo(dtype).tiny
    grid = torch.arange(64, dtype=dtype)
    gx, gy = (torch.exp(-(grid - points[..., axis, None]) ** 2 / 8) for axis in (0, 1))
    unflushed = gy[..., :, None] * gx[..., None, :]
    assert (maps - unflushed).abs().max() <= 1.01 * torch.finfo(dtype).tiny ** 0.5
