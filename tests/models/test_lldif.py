"""The whole model: both presets, fused vs reference on every gradient, stages, repeatability, files, errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from lldif import LLDif, lldif_base, lldif_tiny
from lldif.data.face_layout import five_from_68, mean_shape
from lldif.models.config import LLDifConfig
from lldif.models.lldif import StageLosses
from lldif.models.losses import classification_loss
from lldif_kernels.nn import ModulatedLayerNorm


def tiny_model(**prior_changes) -> LLDif:
    config = lldif_tiny()
    for name, value in prior_changes.items():
        setattr(config.prior, name, value)
    torch.manual_seed(0)
    model = LLDif(config)
    model.set_label_prompts(torch.randn(7, 384))
    return model


def modulating(model: LLDif, std: float = 0.05) -> LLDif:
    """Moves DTNet's zero-initialised (AdaLN-Zero) modulation kernels off zero, as training does, so the prior
    reaches the logits."""
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for module in model.dtnet.modules():
            if isinstance(module, ModulatedLayerNorm):
                module.kernel.weight.normal_(0, std, generator=generator)
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
    fused, batch = modulating(tiny_model()), tiny_batch()  # the prior's networks get non-zero gradients
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
    model, batch = modulating(tiny_model()).eval(), tiny_batch()  # at initialisation the prior changes nothing
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


# --- the teacher prior's label: dropout to the null label, centred embeddings ------------------------------------


def label_embeddings_seen(model: LLDif) -> list[torch.Tensor]:
    """Records the label embedding PNET_S1 gets on every call."""
    seen = []
    model.pnet_s1.register_forward_pre_hook(lambda module, args: seen.append(args[1].clone()))
    return seen


def expected_stage1_loss(model: LLDif, batch, drop: torch.Tensor | None) -> torch.Tensor:
    prior = model.teacher_prior(batch["image"], batch["label"], drop)
    logits = model.prior_logits(batch["image"], batch["landmarks"], prior)
    return classification_loss(logits, batch["label"], model.config.loss.label_smoothing)


def stage1_model(**prior_changes) -> LLDif:
    model = modulating(tiny_model(**prior_changes))
    model.freeze_for_stage(1)
    return model.train()


def test_label_dropout_gives_each_sample_the_null_label_with_its_probability():
    model, batch = stage1_model(label_dropout=0.5), tiny_batch(8)
    assert lldif_tiny().prior.label_dropout == 0.5
    torch.manual_seed(11)
    loss = model.stage1_loss(batch)
    torch.manual_seed(11)
    drop = torch.rand(8) < 0.5
    assert drop.any() and not drop.all()
    assert loss.prior == 0 and torch.equal(loss.total, loss.classification)
    torch.testing.assert_close(loss.total, expected_stage1_loss(model, batch, drop), rtol=1e-6, atol=1e-6)
    without = expected_stage1_loss(model, batch, None)
    assert (loss.total - without).abs() > 1e-6


def test_label_dropout_of_one_drops_every_label_and_zero_none():
    batch = tiny_batch(6)
    dropped = stage1_model(label_dropout=1.0)
    seen = label_embeddings_seen(dropped)
    loss = dropped.stage1_loss(batch)
    assert torch.count_nonzero(seen[0]) == 0  # centred: the null label is the zero vector
    torch.testing.assert_close(loss.total, expected_stage1_loss(dropped, batch, torch.ones(6, dtype=torch.bool)),
                               rtol=1e-6, atol=1e-6)
    kept = stage1_model(label_dropout=0.0)
    state = torch.get_rng_state()
    loss = kept.stage1_loss(batch)
    assert torch.equal(torch.get_rng_state(), state)  # no draw at all
    torch.testing.assert_close(loss.total, expected_stage1_loss(kept, batch, None), rtol=1e-6, atol=1e-6)
    # ... and the labels matter: another label gives another prior and another loss
    relabelled = {**batch, "label": (batch["label"] + 1) % 7}
    assert not torch.allclose(kept.teacher_prior(batch["image"], batch["label"]),
                              kept.teacher_prior(batch["image"], relabelled["label"]))
    assert (kept.stage1_loss(relabelled).total - expected_stage1_loss(kept, batch, None)).abs() > 1e-6


def test_no_label_dropout_in_eval_mode():
    model, batch = stage1_model(label_dropout=1.0), tiny_batch(6)
    model.eval()
    seen = label_embeddings_seen(model)
    state = torch.get_rng_state()
    loss = model.stage1_loss(batch)
    assert torch.equal(torch.get_rng_state(), state)
    assert (seen[0].norm(dim=-1) > 0.99).all()  # every sample's own label
    logits = model.teacher_logits(batch["image"], batch["label"], batch["landmarks"])
    torch.testing.assert_close(loss.total, classification_loss(logits, batch["label"]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("label_embedding", ["centered", "raw"])
def test_label_embeddings_and_the_null_label(label_embedding):
    model, batch = tiny_model(label_embedding=label_embedding).eval(), tiny_batch(6)
    assert lldif_tiny().prior.label_embedding == "centered"
    images, labels = batch["image"], batch["label"]
    drop = torch.tensor([True, False, True, False, False, True])
    seen = label_embeddings_seen(model)
    with torch.no_grad():
        prompts = model.la_clip.embed_text(model.label_prompt_embeddings)
        image_embedding, _ = model.la_clip.encode(model._clip_view(images))
        prior = model.teacher_prior(images, labels, drop)
    mean = prompts.mean(0)
    if label_embedding == "centered":
        # what tells the prompts apart, at unit length; the null label (their mean) becomes exactly zero
        assert torch.count_nonzero(seen[0][drop]) == 0
        torch.testing.assert_close(seen[0][~drop], F.normalize(prompts[labels[~drop]] - mean, dim=-1))
        torch.testing.assert_close(seen[0][~drop].norm(dim=-1), torch.ones(3))
        null = torch.zeros(6, prompts.shape[1])
    else:
        torch.testing.assert_close(seen[0][~drop], prompts[labels[~drop]])
        torch.testing.assert_close(seen[0][drop], mean.expand(3, -1))
        null = mean.expand(6, -1)
    with torch.no_grad():
        torch.testing.assert_close(prior[drop], model.pnet_s1(image_embedding, null)[drop])
        # the labels are then invisible in Z
        torch.testing.assert_close(model.teacher_prior(images, labels, torch.ones(6, dtype=torch.bool)),
                                   model.teacher_prior(images, (labels + 3) % 7, torch.ones(6, dtype=torch.bool)))


def test_bad_label_settings_raise():
    with pytest.raises(ValueError, match=r"config\.prior\.label_embedding must be one of .*'onehot'"):
        tiny_model(label_embedding="onehot")
    for dropout in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"config\.prior\.label_dropout must be in \[0, 1\]"):
            tiny_model(label_dropout=dropout)


# --- the paths by parts: prior_logits, inference_prior, stage 2's prior-only warm-up ------------------------------


def test_prior_logits_under_the_teacher_prior_are_the_teacher_logits():
    model, batch = modulating(tiny_model()).eval(), tiny_batch()
    with torch.no_grad():
        prior = model.teacher_prior(batch["image"], batch["label"])
        assert torch.equal(model.prior_logits(batch["image"], batch["landmarks"], prior),
                           model.teacher_logits(batch["image"], batch["label"], batch["landmarks"]))
        assert not torch.allclose(model.prior_logits(batch["image"], batch["landmarks"], prior),
                                  model.prior_logits(batch["image"], batch["landmarks"], torch.zeros_like(prior)))


@pytest.mark.parametrize("steps", [None, 2])
def test_inference_prior_and_prior_logits_are_the_forward_pass(steps):
    model, batch = modulating(tiny_model()).eval(), tiny_batch()
    with torch.no_grad():
        prior = model.inference_prior(batch["image"], generator=torch.Generator().manual_seed(4), steps=steps)
        assert prior.shape == (4, model.config.prior.dim)
        logits = model.prior_logits(batch["image"], batch["landmarks"], prior)
        expected = model(batch["image"], batch["landmarks"], generator=torch.Generator().manual_seed(4), steps=steps)
        assert torch.equal(logits, expected)
        assert not torch.equal(prior, model.inference_prior(batch["image"], generator=torch.Generator().manual_seed(5),
                                                            steps=steps))


def test_stage2_prior_only_skips_the_llformer():
    model, batch = modulating(tiny_model()), tiny_batch()
    model.freeze_for_stage(2)
    model.eval()  # the same network for both calls
    calls = []
    for part in (model.dtnet, model.dlnet, model.head):
        part.register_forward_hook(lambda module, args, out: calls.append(type(module).__name__))
    losses = model.stage2_loss(batch, torch.Generator().manual_seed(3), prior_only=True)
    assert isinstance(losses, StageLosses) and losses.classification is None and not calls
    assert torch.equal(losses.total, losses.prior) and losses.prior > 0
    full = model.stage2_loss(batch, torch.Generator().manual_seed(3))
    assert calls and torch.equal(full.prior, losses.prior)
    model.zero_grad(set_to_none=True)
    losses.total.backward()
    for part in (model.dtnet, model.dlnet, model.head):
        assert all(p.grad is None for p in part.parameters())
    for part in (model.pnet_s2, model.diffusion):
        assert all(p.grad is not None for p in part.parameters())
        assert sum(p.grad.abs().sum() for p in part.parameters()) > 0
