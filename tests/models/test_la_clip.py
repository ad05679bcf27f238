"""LA-CLIP: embeddings, the zero-initialised controls, the loss, and loading an open_clip image tower."""

from __future__ import annotations

import pickle

import pytest
import torch

from lldif.models.config import lldif_base, lldif_tiny
from lldif.models.la_clip import LAClip, load_open_clip_visual, symmetric_contrastive_loss


def tiny_model(**changes) -> LAClip:
    config = lldif_tiny().la_clip
    for name, value in changes.items():
        setattr(config, name, value)
    torch.manual_seed(0)
    return LAClip(config)


def test_embeddings_are_unit_vectors_and_controls_start_at_zero():
    model = tiny_model()
    images = torch.randn(3, 3, 64, 64)
    image_embedding, label_embedding = model.encode(images)
    assert image_embedding.shape == label_embedding.shape == (3, 64)
    torch.testing.assert_close(image_embedding.norm(dim=-1), torch.ones(3))
    plain = model.visual.tokens(images)
    for block in model.visual.transformer.resblocks:
        plain = block(plain)
    torch.testing.assert_close(image_embedding, torch.nn.functional.normalize(model.visual.pool(plain), dim=-1))


def test_base_parameter_count_matches_clip_vit_b32():
    model = LAClip(lldif_base().la_clip)
    tower = sum(p.numel() for p in model.visual.parameters())
    print(f"LA-CLIP image tower {tower / 1e6:.1f} M (CLIP ViT-B/32 visual: 87.8 M)")
    assert abs(tower - 87.8e6) / 87.8e6 < 0.02


@pytest.mark.parametrize("label_loss", ["cross_entropy", "contrastive"])
def test_loss_falls_on_a_fixed_batch(label_loss):
    model = tiny_model(label_loss=label_loss)
    torch.manual_seed(1)
    images, captions = torch.randn(8, 3, 64, 64), torch.randn(8, 384)
    labels, prompts = torch.arange(8) % 7, torch.randn(7, 384)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    first = None
    for _ in range(30):
        loss = model.loss(images, captions, labels, prompts)
        first = loss.item() if first is None else first
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert loss.item() < 0.5 * first
    assert any(control.weight.abs().sum() > 0 for control in model.controls)


def test_contrastive_loss_is_low_for_matching_pairs():
    a = torch.nn.functional.normalize(torch.randn(6, 16), dim=-1)
    matched = symmetric_contrastive_loss(a, a, torch.tensor(50.0))
    shuffled = symmetric_contrastive_loss(a, a.roll(1, 0), torch.tensor(50.0))
    assert float(matched) < 0.01 < float(shuffled)


def test_open_clip_checkpoint_loads_into_tower_and_controller(tmp_path):
    source = tiny_model()
    state = {f"visual.{k}": v for k, v in source.visual.state_dict().items()}
    state["logit_scale"] = torch.tensor(4.6)
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "clip.pt")
    torch.manual_seed(5)
    model = LAClip(lldif_tiny().la_clip)
    missing, unexpected = load_open_clip_visual(model, tmp_path / "clip.pt")
    assert missing == [] and unexpected == []
    for name, value in source.visual.state_dict().items():
        assert torch.equal(model.visual.state_dict()[name], value)
        assert torch.equal(model.controller.state_dict()[name], value)
    assert not any(p.requires_grad for p in model.visual.parameters())
    assert all(p.requires_grad for p in model.controller.parameters())


def test_open_clip_loader_refuses_pickles_and_other_files(tmp_path):
    with open(tmp_path / "evil.pt", "wb") as file:
        pickle.dump({"visual.x": object()}, file, protocol=2)
    with pytest.raises(pickle.UnpicklingError):
        load_open_clip_visual(tiny_model(), tmp_path / "evil.pt")
    torch.save({"text.weight": torch.zeros(1)}, tmp_path / "text.pt")
    with pytest.raises(ValueError, match="no visual"):
        load_open_clip_visual(tiny_model(), tmp_path / "text.pt")


def test_bad_inputs_name_the_argument():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"images must be \(B, 3, 64, 64\)"):
        model.encode(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"text_embeddings must be \(N, 384\)"):
        model.embed_text(torch.randn(2, 512))
    with pytest.raises(ValueError, match=r"labels must be \(2,\)"):
        model.loss(torch.randn(2, 3, 64, 64), torch.randn(2, 384), torch.zeros(3, dtype=torch.long),
                   torch.randn(7, 384))
