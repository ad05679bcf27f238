"""`lldif convert`: DiffIR and POSTER++ state dicts, written by the re-implementations in `peers`, load into LLDif's
DTNet and DLNet and give the peers' outputs; what is missing or unused is reported; bad files are refused."""

from __future__ import annotations

import pickle

import pytest
import torch
from peers import DiffIRDIRformer, PosterWindowBranch

from lldif.cli import main
from lldif.convert import convert, diffir_to_dtnet, load_diffir, load_poster
from lldif.models.config import lldif_tiny
from lldif.models.lldif import LLDif
from lldif.train import TrainSettings, build_model

PRIOR_DIM = 64  # the tiny preset's; DiffIR's own is 256


def tiny_dirformer() -> DiffIRDIRformer:
    """A DIRformer with the tiny preset's DTNet sizes."""
    dtnet = lldif_tiny().dtnet
    return DiffIRDIRformer(dtnet.dim, dtnet.encoder_blocks, dtnet.heads, refinement_blocks=1,
                           expansion=dtnet.ffn_expansion, prior_dim=PRIOR_DIM)


def save_diffir_s2(path, dirformer: DiffIRDIRformer) -> None:
    """A DiffIR stage-2 checkpoint as BasicSR saves it: DiffIRS2's keys (the DIRformer under `G.`, its CPEN and
    denoiser beside it) under `params_ema`."""
    state = {f"G.{key}": value for key, value in dirformer.state_dict().items()}
    state["condition.E.0.weight"] = torch.randn(64, 48, 3, 3)
    state["denoise.resmlp.0.weight"] = torch.randn(256, 513)
    torch.save({"params_ema": state, "params": {}}, path)


def test_diffir_renames():
    renamed = diffir_to_dtnet({"G.latent.0.norm2.body.bias": torch.zeros(1), "G.latent.0.attn.kernel.0.weight":
                               torch.zeros(1), "G.latent.0.ffn.kernel.0.weight": torch.zeros(1),
                               "denoise.x": torch.zeros(1)})
    assert list(renamed) == ["latent.0.norm2.bias", "latent.0.norm1.kernel.weight", "latent.0.norm2.kernel.weight",
                             "-denoise.x"]


def test_diffir_checkpoint_loads_into_dtnet_and_matches_dirformer(tmp_path):
    torch.manual_seed(0)
    dirformer = tiny_dirformer()
    with torch.no_grad():  # away from the identity init, so a misplaced weight shows
        for parameter in dirformer.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    save_diffir_s2(tmp_path / "diffir.pth", dirformer)
    reports = convert({"diffir": tmp_path / "diffir.pth"}, tmp_path / "model", "tiny")
    model = LLDif.from_pretrained(tmp_path / "model").double()
    assert model.config.dtnet.modulation == "diffir"

    report = reports[0]
    assert report.part == "dtnet" and report.missing and all(key.startswith("tap_convs.") for key in report.missing)
    assert {key.split(".")[0] for key in report.unused} == {"up2_1", "decoder_level1", "refinement", "output",
                                                             "condition", "denoise"}

    maps = {}
    for name in ("latent", "decoder_level3", "decoder_level2"):
        getattr(model.dtnet, name)[-1].register_forward_hook(
            lambda module, args, output, name=name: maps.__setitem__(name, output))
    image, prior = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.randn(2, PRIOR_DIM, dtype=torch.float64)
    with torch.no_grad():
        model.dtnet(image, prior)
        expected = dirformer.double()(image, prior)
    assert set(maps) == {"latent", "decoder_level3", "decoder_level2"}
    for name, value in maps.items():
        torch.testing.assert_close(value, expected[name], rtol=1e-10, atol=1e-10, msg=name)


def test_poster_checkpoint_loads_into_dlnet_and_matches_poster(tmp_path):
    torch.manual_seed(0)
    config = lldif_tiny()
    dlnet_config, side = config.dlnet, config.internal_size
    window_sizes = tuple(side // f for f in (4, 8, 16))
    poster = PosterWindowBranch(dlnet_config.dims, dlnet_config.heads, window_sizes, dlnet_config.resnet_widths)
    torch.save({"state_dict": {f"module.{k}": v for k, v in poster.state_dict().items()}, "epoch": 3},
               tmp_path / "poster.pth")
    model = LLDif(config)
    report = load_poster(model, tmp_path / "poster.pth")
    assert {key.split(".")[0] for key in report.unused} == {"last_face_conv", "embed_q", "VIT"}
    assert {key.split(".")[0] for key in report.missing} == {"ir_back", "face_landback"}

    dlnet = model.dlnet.double().eval()
    features = [torch.randn(2, c, 2 * s, 2 * s, dtype=torch.float64)
                for c, s in zip(dlnet.ir_back.out_channels, window_sizes, strict=True)]
    landmark_maps = [torch.randn(2, d, s, s, dtype=torch.float64)
                     for d, s in zip(dlnet_config.dims, window_sizes, strict=True)]
    dlnet.ir_back.forward = lambda image: features
    dlnet._landmark_maps = lambda image, landmarks: landmark_maps
    with torch.no_grad():
        ours = dlnet(torch.zeros(2, 3, side, side, dtype=torch.float64))
        expected = poster.double()(features, landmark_maps)
    for got, want in zip(ours, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_converted_folder_starts_training(tmp_path):
    torch.manual_seed(0)
    save_diffir_s2(tmp_path / "diffir.pth", tiny_dirformer())
    convert({"diffir": tmp_path / "diffir.pth"}, tmp_path / "model", "tiny")
    loaded = LLDif.from_pretrained(tmp_path / "model").state_dict()
    width = loaded["label_prompt_embeddings"].shape[-1]
    model = build_model(TrainSettings(data="", stage="la-clip", init=str(tmp_path / "model")),
                        prompt_embedder=lambda: lambda prompts: torch.randn(len(prompts), width))
    assert all(torch.equal(value, loaded[key]) for key, value in model.state_dict().items()
               if key.startswith("dtnet."))


def test_command_prints_the_report(tmp_path, capsys):
    save_diffir_s2(tmp_path / "diffir.pth", tiny_dirformer())
    main(["convert", "--config", "tiny", "--diffir", str(tmp_path / "diffir.pth"), "--out", str(tmp_path / "m")])
    out = capsys.readouterr().out
    assert "-> dtnet" in out and "unused: up2_1.* (1)" in out and (tmp_path / "m" / "conversion.json").is_file()


class NotATensor:
    """A pickled object that weights_only loading must refuse."""


def test_refuses_pickles_other_files_and_other_configurations(tmp_path):
    model = LLDif(lldif_tiny())
    torch.save({"params": {"latent.0.attn.temperature": NotATensor()}}, tmp_path / "evil.pth")
    with pytest.raises(pickle.UnpicklingError, match="more than plain weights"):
        load_poster(model, tmp_path / "evil.pth")
    torch.save({"text.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="no weight of dlnet"):
        load_poster(model, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="modulation='diffir'"):
        load_diffir(model, tmp_path / "other.pth")
    base_sized = DiffIRDIRformer(48, (1, 1, 1, 1), (1, 2, 4, 8), refinement_blocks=1, prior_dim=PRIOR_DIM)
    save_diffir_s2(tmp_path / "base.pth", base_sized)
    with pytest.raises(ValueError, match="another dtnet configuration"):
        convert({"diffir": tmp_path / "base.pth"}, tmp_path / "model", "tiny")
    assert not (tmp_path / "model").exists()
    with pytest.raises(ValueError, match="checkpoints"):
        convert({"restormer": tmp_path / "base.pth"}, tmp_path / "model", "tiny")
