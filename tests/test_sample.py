"""sample.py's refusals, on a checkpoint written here (an untrained DiT-T/2, no training): bad
flags before anything is loaded, checks that need the checkpoint before any sampling, weights or
samples that are not finite, and output folders that cannot be written. Learning and sampling
end to end are in test_train.py."""
import os

import pytest
import torch

import sample
from models import ModelError, build_model
from train import FlagError, RunError

KWARGS = {"input_size": 8, "in_channels": 1, "num_classes": 10}


@pytest.fixture
def checkpoint(tmp_path):
    """write(ema=None) -> the path of a train.py-style checkpoint of a DiT-T/2 on 8x8 grey images
    (ema: replacement EMA weights)."""
    def write(ema=None, name="ckpt.pt"):
        torch.manual_seed(0)
        weights = build_model("DiT-T/2", **KWARGS).state_dict()
        path = tmp_path / name
        torch.save({"model": weights, "ema": ema or weights, "args": {"res": 8, "vae": None},
                    "model_name": "DiT-T/2", "model_kwargs": KWARGS, "step": 1}, path)
        return path
    return write


def run_sample(*argv):
    return sample.main(sample.parse_args([str(a) for a in argv]))


def pngs(folder):
    return sorted(f for f in os.listdir(folder) if f.endswith(".png")) if folder.exists() else []


def test_bad_flags_stop_before_the_checkpoint_is_read(tmp_path):
    # the checkpoint does not exist: reading it would raise a ModelError instead
    missing = tmp_path / "missing.pt"
    (tmp_path / "a_file").write_text("not a folder")
    for argv, message in [(["--steps", 0], "--steps 0 cannot work: it must be >= 1"),
                          (["--steps", -3], "--steps -3"), (["--res", -8], "--res -8"),
                          (["--res", 0], "--res 0"), (["--frames", 0], "--frames 0"),
                          (["--cfg", "nan"], "--cfg nan cannot work: it must be a finite"),
                          (["--num-samples", 0], "--num-samples 0"),
                          (["--renoise", 0], "--renoise 0.0"),
                          (["--cuda-graph", "on"], "--cuda-graph on needs a CUDA GPU"),
                          (["--out", tmp_path / "a_file"], "a_file is a file; samples go into a "
                                                           "folder")]:
        with pytest.raises(FlagError, match=message):
            run_sample("--ckpt", missing, "--out", tmp_path / "out", *argv)
    assert not (tmp_path / "out").exists()


def test_checks_that_need_the_model_come_before_sampling(checkpoint, tmp_path, monkeypatch):
    path = checkpoint()
    # no sampling may start: any call of the model fails the test
    monkeypatch.setattr(sample, "sample_noise", lambda *a: pytest.fail("sampling started"))
    with pytest.raises(FlagError, match="--steps 5000 cannot work: the model has 1000 noise"):
        run_sample("--ckpt", path, "--steps", 5000, "--out", tmp_path / "s")
    with pytest.raises(FlagError, match="--frames is for video models; .* holds an image model"):
        run_sample("--ckpt", path, "--frames", 4, "--out", tmp_path / "s")


def test_non_finite_weights_and_samples_are_refused(checkpoint, tmp_path):
    good = build_model("DiT-T/2", **KWARGS).state_dict()
    inf = {k: torch.full_like(v, float("inf")) if v.is_floating_point() else v
           for k, v in good.items()}
    with pytest.raises(ModelError, match="NaN or infinite weights \\(ema: "):
        run_sample("--ckpt", checkpoint(ema=inf, name="inf.pt"), "--out", tmp_path / "s")
    # finite weights whose activations overflow: the samples are NaN, and no image is written
    huge = {k: torch.full_like(v, 1e30) if v.is_floating_point() else v for k, v in good.items()}
    with pytest.raises(ModelError, match="sampling gave NaN or infinite values .* nothing was "
                                         "written"):
        run_sample("--ckpt", checkpoint(ema=huge, name="huge.pt"), "--steps", 2, "--out",
                   tmp_path / "s")
    assert pngs(tmp_path / "s") == []


def test_a_full_output_disk_is_named_in_one_line(checkpoint, tmp_path):
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full to simulate a full disk")
    # the first image file leads to /dev/full, where every write fails with ENOSPC
    (tmp_path / "s").mkdir()
    os.symlink("/dev/full", tmp_path / "s" / "000000.png")
    with pytest.raises(RunError, match=f"cannot write to {tmp_path / 's'}: its disk is full"):
        run_sample("--ckpt", checkpoint(), "--steps", 2, "--num-samples", 2, "--out",
                   tmp_path / "s")


def test_x0_clip_default_per_space_and_refusals():
    # pixel space: the provisional default wherever the sampler has an x0_hat; latents: none
    for sampler in ("ddpm", "ddim", "dpm++"):
        assert sample.x0_clip_for(None, None, sampler) == sample.DEFAULT_X0_CLIP["pixels"]
        assert sample.x0_clip_for(None, "stabilityai/sd-vae-ft-ema", sampler) == "none"
        assert sample.x0_clip_for("dynamic", None, sampler) == "dynamic"
    assert sample.DEFAULT_X0_CLIP == {"pixels": "clip", "latents": "none"}
    assert sample.x0_clip_for(None, None, "heun") == "none"
    assert sample.x0_clip_for("none", "some-vae", "heun") == "none"
    with pytest.raises(FlagError, match="--x0-clip clip acts on the data prediction, which "
                                        "--sampler heun does not use"):
        sample.x0_clip_for("clip", None, "heun")
    with pytest.raises(FlagError, match="--x0-clip dynamic is for pixel-space models.* some-vae "
                                        "latents"):
        sample.x0_clip_for("dynamic", "some-vae", "dpm++")


def test_x0_clip_reaches_the_sampler(checkpoint, tmp_path):
    """The untrained DiT-T/2 predicts eps = 0 (zero-initialised output layer), so x0_hat = x_t /
    alpha_t: without clipping nearly every pixel saturates; dynamic thresholding rescales x0_hat
    into [-1, 1] by its 99.5% quantile, and most pixels stay inside (0, 255)."""
    path = checkpoint()
    saturated = {}
    for mode in ("none", "dynamic"):
        images = run_sample("--ckpt", path, "--sampler", "ddim", "--steps", 2, "--num-samples", 4,
                            "--x0-clip", mode, "--format", "npz", "--out", tmp_path / mode)
        saturated[mode] = ((images == 0) | (images == 255)).float().mean().item()
    assert saturated["none"] > 0.95 and saturated["dynamic"] < 0.2
