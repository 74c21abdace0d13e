"""tools/convert_official.py: official state dicts of DiM, DiMSUM, LaMamba-Diff (the fidelity
vectors, laid out with official key names) and DiT become train.py checkpoints that reproduce the
official outputs; bad files fail with one line."""
import argparse
import sys
import types

import pytest
import torch

import dit
from models import load_model, write_safetensors
from tools import convert_official

# name -> (registry config it must be recognised as, tolerance of the fidelity test in
# tests/test_<model>.py)
VECTORS = {"dim_small": ("DiM-T/2", 5e-5), "dimsum_small": ("DiMSUM-T/2", 1.5e-5),
           "lamamba_small": ("LaMamba-T", 2e-6)}


@pytest.mark.parametrize("name", list(VECTORS))
def test_fidelity_weights_convert_to_a_checkpoint_that_reproduces_the_official_output(
        name, fidelity, relative_error, tmp_path, capsys, one_thread):
    tensors, meta = fidelity(name)
    official = {k: v for k, v in tensors.items() if k.startswith("model.")}
    torch.save({k.removeprefix("model."): v for k, v in official.items()},
               tmp_path / "official.pth")
    out = tmp_path / "converted.pt"
    convert_official.main([str(tmp_path / "official.pth"), "--out", str(out)])
    printed = capsys.readouterr().out
    config, tolerance = VECTORS[name]
    assert f"-> {config} (" in printed and "classes" in printed, printed
    assert "tensors mapped" in printed, printed
    model, ckpt = load_model(str(out))
    assert ckpt["model_name"] == config and ckpt["step"] == 0
    assert ckpt["model_kwargs"]["num_classes"] == 10
    assert ckpt["model_kwargs"]["input_size"] == tensors["input.x"].shape[-1]
    with torch.no_grad():
        y = model.eval()(tensors["input.x"], tensors["input.t"], tensors["input.y"])
    assert relative_error(y, tensors["output"]) < tolerance


def official(name, tensors):
    return {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}


def run(fidelity_tensors, model):
    with torch.no_grad():
        return model.eval()(fidelity_tensors["input.x"], fidelity_tensors["input.t"],
                            fidelity_tensors["input.y"])


def test_dimsum_release_layout_records_its_vae_data_and_classes(fidelity, relative_error,
                                                                 tmp_path, capsys, one_thread):
    """DiMSUM's released .pt files hold {epoch, ema, args: argparse.Namespace}."""
    tensors, _ = fidelity("dimsum_small")
    args = argparse.Namespace(model="DiM-L/2", dataset="latent_imagenet_256", image_size=128,
                              num_classes=10, vae="mse", label_dropout=0.15, lr=1e-4)
    torch.save({"epoch": 511, "ema": official("dimsum", tensors), "args": args},
               tmp_path / "imnet256_510ep.pt")
    ckpt = convert_official.main([str(tmp_path / "imnet256_510ep.pt"), "--out",
                                  str(tmp_path / "c.pt")])
    printed = capsys.readouterr().out
    assert "VAE stabilityai/sd-vae-ft-mse (recorded in the checkpoint)" in printed, printed
    assert "recorded run: model DiM-L/2, dataset latent_imagenet_256" in printed
    assert ckpt["args"]["vae"] == "stabilityai/sd-vae-ft-mse" and ckpt["args"]["res"] == 128
    assert ckpt["args"]["data"] == "latent_imagenet_256" and ckpt["args"]["official_epoch"] == 511
    model, ckpt = load_model(str(tmp_path / "c.pt"))
    assert ckpt["model_kwargs"]["num_classes"] == 10
    assert relative_error(run(tensors, model), tensors["output"]) < VECTORS["dimsum_small"][1]


def test_hub_release_converts_from_its_id(fidelity, relative_error, tmp_path, monkeypatch,
                                          one_thread):
    """haopt/dimsum-L2-imagenet256: model.safetensors (official keys) + the mixin's config.json."""
    tensors, _ = fidelity("dimsum_small")
    (tmp_path / "snapshot").mkdir()
    write_safetensors(tmp_path / "snapshot" / "model.safetensors", official("dimsum", tensors))
    (tmp_path / "snapshot" / "config.json").write_text('{"img_resolution": 16}')
    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(
        snapshot_download=lambda repo_id, **kw: str(tmp_path / "snapshot")))
    convert_official.main(["hf://haopt/dimsum-L2-imagenet256", "--out", str(tmp_path / "c.pt")])
    model, ckpt = load_model(str(tmp_path / "c.pt"))
    assert ckpt["args"]["vae"] == convert_official.DEFAULT_VAE and ckpt["args"]["res"] == 128
    assert relative_error(run(tensors, model), tensors["output"]) < VECTORS["dimsum_small"][1]


@pytest.mark.parametrize("grid", [4, 8])  # as DiT-XL-2-256x256.pt and -512x512.pt, scaled down
def test_dit_release_256_and_512(grid, tmp_path, capsys):
    torch.manual_seed(0)
    ours = dit.DiT_T_2(input_size=2 * grid, num_classes=10).eval()
    torch.nn.init.normal_(ours.final_layer.linear.weight)  # a non-zero output
    torch.nn.init.normal_(ours.blocks[0].adaLN_modulation[-1].weight, std=0.02)
    # the released files: the EMA state dict, with DiT's fixed sin-cos table stored in it
    released = {**ours.state_dict(), "pos_embed": dit.get_2d_sincos_pos_embed(64, grid, grid)[None]}
    torch.save(released, tmp_path / "DiT.pt")
    ckpt = convert_official.main([str(tmp_path / "DiT.pt"), "--out", str(tmp_path / "c.pt")])
    assert f"VAE {convert_official.DEFAULT_VAE} (4-channel latents" in capsys.readouterr().out
    assert ckpt["model_name"] == "DiT-T/2" and ckpt["args"]["res"] == 16 * grid
    assert ckpt["model_kwargs"]["learn_sigma"]
    assert ckpt["args"]["vae"] == convert_official.DEFAULT_VAE
    model, _ = load_model(str(tmp_path / "c.pt"))
    x = torch.randn(2, 4, 2 * grid, 2 * grid)
    t, y = torch.tensor([3, 700]), torch.tensor([1, 10])
    assert torch.equal(model.eval()(x, t, y), ours(x, t, y))
    with pytest.raises(SystemExit, match="no DiT config .* DiT-S/2"):
        convert_official.main([str(tmp_path / "DiT.pt"), "--out", str(tmp_path / "c.pt"),
                               "--model", "DiT-S/2"])
    ckpt = convert_official.main([str(tmp_path / "DiT.pt"), "--out", str(tmp_path / "c.pt"),
                                  "--vae", "none"])
    assert ckpt["args"]["vae"] is None and ckpt["args"]["res"] == 2 * grid
    with pytest.raises(SystemExit, match="--pad-layout is for DiM weights only"):
        convert_official.main([str(tmp_path / "DiT.pt"), "--out", str(tmp_path / "c.pt"),
                               "--pad-layout", "cycled"])


def test_dim_high_resolution_fine_tune(fidelity, tmp_path, capsys, one_thread):
    """DiM's 512 fine-tune: the same keys, a positional table for a 32 x 32 token grid."""
    tensors, _ = fidelity("dim_small")
    sd = official("dim", tensors)
    table = sd["additional_embed"]  # (1, 2 + 8 * 8, D)
    sd["additional_embed"] = torch.cat([table[:, :2], table[:, 2:].repeat(1, 16, 1)], dim=1)
    torch.save(sd, tmp_path / "nnet_ema.pth")
    ckpt = convert_official.main([str(tmp_path / "nnet_ema.pth"), "--out", str(tmp_path / "c.pt")])
    assert "pad layout cycled (as the official 512 fine-tune trained ('rho_pad')" in \
        capsys.readouterr().out
    assert ckpt["model_kwargs"]["input_size"] == 64 and ckpt["args"]["res"] == 512
    # the layout travels in the checkpoint's kwargs and comes back with the model
    assert ckpt["model_kwargs"]["pad_layout"] == "cycled"
    model, _ = load_model(str(tmp_path / "c.pt"))
    assert model.pad_layout == "cycled"
    assert torch.equal(model.pos_embed, sd["additional_embed"])
    with torch.no_grad():
        out = model.eval()(torch.randn(1, 4, 64, 64), torch.tensor([500]), torch.tensor([3]))
    assert out.shape == (1, 4, 64, 64) and out.isfinite().all()
    # the flag overrides; the default layout stays out of the kwargs
    ckpt = convert_official.main([str(tmp_path / "nnet_ema.pth"), "--out", str(tmp_path / "c.pt"),
                                  "--pad-layout", "lateral"])
    assert "pad layout lateral (--pad-layout)" in capsys.readouterr().out
    assert "pad_layout" not in ckpt["model_kwargs"]


def test_dim_256_keeps_the_lateral_layout(fidelity, tmp_path, capsys, one_thread):
    tensors, _ = fidelity("dim_small")
    torch.save(official("dim", tensors), tmp_path / "nnet_ema.pth")
    # --res moves the grid, not the layout the weights were trained with
    ckpt = convert_official.main([str(tmp_path / "nnet_ema.pth"), "--out", str(tmp_path / "c.pt"),
                                  "--res", "512"])
    assert "pad layout lateral (as the official 256 configs trained" in capsys.readouterr().out
    assert "pad_layout" not in ckpt["model_kwargs"]


class Trap:
    """Records being unpickled: a refused file must never get that far."""
    opened = False

    def __setstate__(self, state):
        Trap.opened = True


def test_bad_files_fail_with_one_line(tmp_path):
    torch.save({"a.weight": torch.zeros(2)}, tmp_path / "other.pt")
    torch.save(dit.DiT_T_2(input_size=8).state_dict(), tmp_path / "full.pt")
    (tmp_path / "truncated.pt").write_bytes((tmp_path / "full.pt").read_bytes()[:3000])
    (tmp_path / "text.pt").write_text("not a checkpoint")
    write_safetensors(tmp_path / "full.safetensors", dit.DiT_T_2(input_size=8).state_dict())
    (tmp_path / "truncated.safetensors").write_bytes(
        (tmp_path / "full.safetensors").read_bytes()[:-5000])
    # a released-looking file that also pickles an object of some class: refused unopened
    torch.save({"epoch": 1, "ema": {"a": torch.zeros(1)}, "args": Trap()}, tmp_path / "trap.pt")
    for path, message in [("missing.pt", "not found"), ("other.pt", "no key of an official"),
                          ("truncated.pt", "truncated or corrupt"),
                          ("text.pt", "truncated or corrupt"),
                          ("truncated.safetensors", "damaged or truncated"),
                          ("trap.pt", "holds Python objects such as")]:
        with pytest.raises(SystemExit) as e:
            convert_official.main([str(tmp_path / path), "--out", str(tmp_path / "c.pt")])
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert not Trap.opened
