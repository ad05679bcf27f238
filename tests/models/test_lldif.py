"""The whole model: both presets, fused vs reference on every gradient, stages, repeatability, files, errors."""

from __future__ import annotations

import copy

import pytest
import torch

from lldif import LLDif, lldif_base, lldif_tiny
from lldif.data.face_layout import five_from_68, mean_shape
from lldif.models.config import LLDifConfig


def tiny_model(**prior_changes) -> LLDif:
    config = lldif_tiny()
    for name, value in prior_changes.items():
        setattr(config.prior, name, value)
    torch.manual_seed(0)
    model = LLDif(config)
    model.set_label_prompts(torch.randn(7, 384))
    return model


def tiny_batch(size: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(size, 3, 64, 64, generator=generator),
            "label": torch.arange(size) % 7,
            "landmarks": torch.rand(size, 68, 2, generator=generator) * 64,
            "caption_embedding": torch.randn(size, 384, generator=generator)}


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_base_preset_inference_at_batch_one_and_its_size():
    torch.manual_seed(0)
    model = LLDif(lldif_base()).eval()
    inference = count(model) - count(model.la_clip) - count(model.pnet_s1)
    print(f"base inference parameters {inference / 1e6:.1f} M (SPEC 9: ~81 M)")
    assert abs(inference - 81e6) / 81e6 < 0.10
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 224, 224), generator=torch.Generator().manual_seed(0))
    assert logits.shape == (1, 7) and torch.isfinite(logits).all()


def test_tiny_paths_and_shapes():
    model, batch = tiny_model(), tiny_batch()
    logits = model(batch["image"], batch["landmarks"], generator=torch.Generator().manual_seed(0))
    assert logits.shape == (4, 7)
    probabilities = model.predict(batch["image"], batch["landmarks"], generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(4))
    model.freeze_for_stage(1)
    stage1 = model.stage1_loss(batch)
    model.freeze_for_stage(2)
    stage2 = model.stage2_loss(batch, torch.Generator().manual_seed(0))
    assert stage1.prior == 0 and stage2.prior > 0
    torch.testing.assert_close(stage2.total, stage2.classification + stage2.prior)
    model.freeze_for_stage(0)
    assert torch.isfinite(model.la_clip_loss(batch))


def trainable(model: LLDif) -> set[str]:
    return {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}


def test_freeze_for_stage_follows_the_spec():
    model = tiny_model()
    model.freeze_for_stage(0)
    assert trainable(model) == {"la_clip"}
    model.freeze_for_stage(1)
    assert trainable(model) == {"pnet_s1", "dtnet", "dlnet", "head"}
    model.freeze_for_stage(2)
    assert trainable(model) == {"pnet_s2", "diffusion", "dtnet", "dlnet", "head"}
    model.train()
    assert not model.la_clip.training and not model.pnet_s1.training and model.dtnet.training
    with pytest.raises(ValueError, match="stage must be one of"):
        model.freeze_for_stage(3)


def gradients(model: LLDif, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("stage", [1, 2])
def test_fused_and_reference_backends_agree_on_logits_and_every_gradient(stage):
    fused, batch = tiny_model(), tiny_batch()
    reference = copy.deepcopy(fused)
    reference.set_backend("reference")
    outputs = {}
    for name, model in (("fused", fused), ("reference", reference)):
        model.freeze_for_stage(stage)
        model.eval()  # no dropout / drop path, so both see the same network
        if stage == 1:
            loss = model.stage1_loss(batch)
        else:
            loss = model.stage2_loss(batch, torch.Generator().manual_seed(3))
        logits = model(batch["image"], batch["landmarks"], generator=torch.Generator().manual_seed(0))
        outputs[name] = (logits.detach(), gradients(model, loss.total))
    torch.testing.assert_close(outputs["fused"][0], outputs["reference"][0], rtol=1e-4, atol=1e-5)
    fused_grads, reference_grads = outputs["fused"][1], outputs["reference"][1]
    assert fused_grads.keys() == reference_grads.keys() and len(fused_grads) > 50
    for name, grad in fused_grads.items():
        scale = reference_grads[name].abs().max().clamp(min=1e-6)
        torch.testing.assert_close(grad / scale, reference_grads[name] / scale, rtol=0, atol=2e-4, msg=name)


def test_seeded_inference_repeats_and_seeds_differ():
    model, batch = tiny_model().eval(), tiny_batch()
    def run(seed):
        return model(batch["image"], batch["landmarks"], generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


@pytest.mark.parametrize("stage", [1, 2])
def test_tiny_model_overfits_a_fixed_batch_of_16(stage):
    model, batch = tiny_model(), tiny_batch(16, seed=stage)
    model.freeze_for_stage(stage)
    model.train()
    optimiser = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    losses = []
    for step in range(60):
        loss = model.stage1_loss(batch) if stage == 1 else model.stage2_loss(batch, torch.Generator().manual_seed(step))
        optimiser.zero_grad()
        loss.total.backward()
        optimiser.step()
        losses.append(loss.total.item())
    print(f"stage {stage}: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] <= 0.1 * losses[0]


def test_save_and_load_give_bitwise_equal_logits(tmp_path):
    model, batch = tiny_model().eval(), tiny_batch()
    model.save_pretrained(tmp_path / "run")
    loaded = LLDif.from_pretrained(tmp_path / "run").eval()
    assert loaded.config == model.config
    def logits(m):
        return m(batch["image"], batch["landmarks"], generator=torch.Generator().manual_seed(0))
    assert torch.equal(logits(model), logits(loaded))
    assert torch.equal(loaded.label_prompt_embeddings, model.label_prompt_embeddings)
    with pytest.raises(FileNotFoundError, match="not a saved model folder"):
        LLDif.from_pretrained(tmp_path)


def test_external_pth_reports_missing_and_unexpected_keys(tmp_path):
    model = tiny_model()
    state = {f"module.{k}": v for k, v in model.state_dict().items() if not k.startswith("head.")}
    state["module.extra.weight"] = torch.zeros(1)
    torch.save({"state_dict": state}, tmp_path / "weights.pth")
    missing, unexpected = tiny_model().load_pth(tmp_path / "weights.pth")
    assert missing and all(k.startswith("head.") for k in missing) and unexpected == ["extra.weight"]


def test_compiled_inference_matches_eager():
    model, batch = tiny_model().eval(), tiny_batch()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.manual_seed(0)
        expected = model(batch["image"], batch["landmarks"])
        torch.manual_seed(0)
        actual = compiled(batch["image"], batch["landmarks"])
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("images", "landmarks", "message"), [
    (torch.randn(2, 3, 32, 32), None, r"images must be \(B, 3, 64, 64\)"),
    (torch.randn(2, 1, 64, 64), None, r"images must be \(B, 3, 64, 64\)"),
    (torch.randn(2, 3, 64, 64), torch.rand(3, 68, 2), r"landmarks must be \(B, P, 2\)"),
    (torch.randn(2, 3, 64, 64), torch.rand(2, 68), r"landmarks must be \(B, P, 2\)"),
])
def test_bad_inputs_name_the_argument(images, landmarks, message):
    with pytest.raises(ValueError, match=message):
        tiny_model()(images, landmarks)


def test_heatmap_landmarks_default_to_the_mean_face_and_68_points_serve_a_5_point_model():
    model = tiny_model().eval()
    images = torch.randn(2, 3, 64, 64)
    mean_face = torch.from_numpy(mean_shape(64, 64)).expand(2, -1, -1)
    with torch.no_grad():
        torch.testing.assert_close(model(images, generator=torch.Generator().manual_seed(1)),
                                   model(images, mean_face, generator=torch.Generator().manual_seed(1)))
    config = lldif_tiny()
    config.dlnet.landmark_points = 5
    five_point = LLDif(config).eval()
    with torch.no_grad():
        torch.testing.assert_close(five_point(images, mean_face, generator=torch.Generator().manual_seed(1)),
                                   five_point(images, five_from_68(mean_face),
                                              generator=torch.Generator().manual_seed(1)))


def test_config_round_trip_and_errors():
    config = lldif_tiny()
    assert LLDifConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown field"):
        LLDifConfig.from_dict({"dtnet": {"width": 3}})
    with pytest.raises(ValueError, match="internal_size must be divisible by 16"):
        LLDifConfig(internal_size=100)
