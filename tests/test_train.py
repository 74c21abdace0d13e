"""End-to-end tests of train.py and sample.py on CPU: learning, exact resume (one process and
torchrun), sampling, the VAE path and the error messages. A tiny DiM on 8x8 Fashion-MNIST keeps the
whole file around two minutes."""
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

import sample
import train
from data import FASHION_MNIST_DIR, DataError
from models import ModelError, build_model, resolve_model_name
from tools import convert_official

MODEL = "DiM-T/2"
OTHER_MODEL = "DiM-S/2"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
pytestmark = pytest.mark.skipif(not os.path.isfile(os.path.join(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz")),
                                reason="needs Fashion-MNIST: apt-get install dataset-fashion-mnist")
# Small and fast: 8x8 images (a 4x4 token grid), no sample grids, a high lr and no warm-up so a few
# hundred steps learn.
FAST = ["--model", MODEL, "--res", "8", "--global-batch-size", "16", "--lr", "1e-3", "--warmup",
        "0", "--log-every", "1", "--sample-every", "0", "--num-workers", "0"]


def run_train(*argv):
    return train.main(train.parse_args([str(a) for a in argv]))


def run_sample(*argv):
    return sample.main(sample.parse_args([str(a) for a in argv]))


def losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]



@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One 200-step run shared by the learning, sampling and error tests."""
    results = tmp_path_factory.mktemp("results")
    return run_train(*FAST, "--steps", 200, "--ckpt-every", 100, "--ema", 0.99, "--results-dir",
                     results)


def test_loss_decreases(trained):
    curve = losses(trained)
    assert len(curve) == 200
    first, last = sum(curve[:20]) / 20, sum(curve[-50:]) / 50
    # Observed: first ~1.0, last ~0.15 (ratio ~0.15); 0.4 leaves a wide margin.
    assert last < 0.4 * first, (first, last)
    assert sorted(os.listdir(os.path.join(trained, "checkpoints"))) == ["0000100.pt", "0000200.pt", "latest.pt"]
    ckpt = torch.load(os.path.join(trained, "checkpoints", "latest.pt"), weights_only=True)
    assert ckpt["step"] == 200 and ckpt["model_name"] == MODEL and ckpt["args"]["ema"] == 0.99
    assert ckpt["args"]["weight_decay"] == build_model(MODEL, num_classes=0).train_defaults["weight_decay"]


def test_resume_is_exact(tmp_path):
    # num_workers 1 also checks that the DataLoader's worker seeding does not touch the training RNG
    fast = [*FAST, "--num-workers", 1]
    full = run_train(*fast, "--steps", 12, "--results-dir", tmp_path / "a")
    # The interrupted run got to step 9 but its last checkpoint is at 6: resuming must also drop
    # steps 7-9 from the log.
    part = run_train(*fast, "--steps", 9, "--ckpt-every", 6, "--results-dir", tmp_path / "b")
    resumed = run_train("--resume", os.path.join(part, "checkpoints", "0000006.pt"), "--steps", 12)
    assert resumed == part
    assert losses(resumed) == losses(full)  # bit-exact on CPU
    # resuming from a run folder uses checkpoints/latest.pt; nothing is left to do
    assert run_train("--resume", part, "--steps", 12) == part and len(losses(part)) == 12


def test_torchrun_two_processes_resume_exact(tmp_path, image_folder, free_port):
    # A tiny image folder (3 classes x 8 images, 3 batches per epoch per process) so the runs cross
    # epoch boundaries.
    image_folder(tmp_path / "data", 8, size=(12, 12), classes=["a", "b", "c"])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=localhost:{free_port}", "train.py",
           "--model", MODEL, "--data", tmp_path / "data", "--res", 8, "--global-batch-size", 8,
           "--lr", "1e-3", "--log-every", 1, "--sample-every", 0, "--num-workers", 0]

    def torchrun(*argv):
        out = subprocess.run([str(a) for a in [*cmd, *argv]], cwd=ROOT, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]

    torchrun("--steps", 8, "--results-dir", tmp_path / "a")
    torchrun("--steps", 4, "--results-dir", tmp_path / "b")
    run_b = os.path.join(tmp_path, "b", "000-DiM-T-2")
    torchrun("--resume", run_b, "--steps", 8)
    full = losses(os.path.join(tmp_path, "a", "000-DiM-T-2"))
    assert len(full) == 8 and losses(run_b) == full
    ckpt = torch.load(os.path.join(run_b, "checkpoints", "latest.pt"), weights_only=True)
    # 8 steps = epochs 0, 1 done + 2 batches of epoch 2
    assert len(ckpt["rng"]) == 2 and ckpt["data"] == (2, 2)


def test_sample_grid_and_images(trained, tmp_path):
    images = run_sample("--ckpt", trained, "--num-samples", 6, "--steps", 3, "--batch-size", 4,
                        "--out", tmp_path / "s")
    assert images.shape == (6, 1, 8, 8)
    files = sorted(os.listdir(tmp_path / "s"))
    assert files == [f"{i:06d}.png" for i in range(6)] + ["grid.png"]
    assert Image.open(tmp_path / "s" / "000000.png").size == (8, 8)
    # Another resolution than trained, other sampler, one class; the same seed gives the same images
    # in any batching.
    for sampler, batch in [("ddim", 2), ("ddim", 3)]:
        images = run_sample("--ckpt", os.path.join(trained, "checkpoints", "0000100.pt"), "--res",
                            12,
                            "--sampler", sampler, "--steps", 3, "--num-samples", 3, "--class-label",
                            4, "--batch-size", batch, "--out", tmp_path / f"r12_{batch}")
        assert images.shape == (3, 1, 12, 12)
    a, b = (Image.open(tmp_path / f"r12_{b}" / "000002.png") for b in (2, 3))
    assert a.size == (12, 12) and a.tobytes() == b.tobytes()


def test_errors(trained, tmp_path, fake_fmnist, image_folder):
    assert resolve_model_name("dim") == resolve_model_name("DiM-S/2") == "DiM-S/2"
    with pytest.raises(ModelError, match="unknown model 'DiM-Q/7'.*DiM-S/2"):
        build_model("DiM-Q/7")
    with pytest.raises(DataError, match="resolution 9 is not divisible by 2"):
        run_train(*FAST, "--res", 9, "--steps", 1, "--results-dir", tmp_path)
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        run_train(*FAST, "--data-dir", tmp_path / "nowhere", "--steps", 1, "--results-dir",
                  tmp_path)
    fake_fmnist(tmp_path / "bad_idx")
    (tmp_path / "bad_idx" / "train-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz is not a readable gzip"):
        run_train(*FAST, "--data-dir", tmp_path / "bad_idx", "--steps", 1, "--results-dir",
                  tmp_path)
    image_folder(tmp_path / "imgs", 15, size=(8, 8))
    (tmp_path / "imgs" / "7_broken.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="cannot read image .*7_broken.png"):
        run_train(*FAST, "--data", tmp_path / "imgs", "--steps", 1, "--results-dir", tmp_path)
    with pytest.raises(ModelError, match=f"holds a {MODEL} model, not {OTHER_MODEL}"):
        run_train("--resume", trained, "--model", OTHER_MODEL)
    with pytest.raises(ModelError, match=f"holds a {MODEL} model, not {OTHER_MODEL}"):
        run_sample("--ckpt", trained, "--model", OTHER_MODEL)
    with pytest.raises(ModelError, match="checkpoint .*missing.pt not found"):
        run_sample("--ckpt", tmp_path / "missing.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ModelError, match="not a checkpoint of this project"):
        run_sample("--ckpt", tmp_path / "other.pt")
    with pytest.raises(DataError, match="resolution 9 is not divisible by 2"):
        run_sample("--ckpt", trained, "--res", 9)
    with pytest.raises(ModelError, match="--class-label 10 is out of range"):
        run_sample("--ckpt", trained, "--class-label", 10)


def test_cli_errors_are_one_line(trained, tmp_path):
    for script, argv, message in [
            ("train.py", ["--model", "nope", "--results-dir", tmp_path],
             "error: unknown model 'nope'"),
            ("sample.py", ["--ckpt", tmp_path / "missing.pt"], "error: checkpoint"),
            ("sample.py", ["--ckpt", trained, "--res", 7],
             "error: resolution 7 is not divisible by 2")]:
        out = subprocess.run([sys.executable, script, *map(str, argv)], cwd=ROOT,
                             capture_output=True, text=True)
        assert out.returncode == 1 and out.stderr.strip().startswith(message), out.stderr
        assert "Traceback" not in out.stderr


def test_vae_latents_train_and_sample(tmp_path, image_folder, tiny_vae):
    tiny_vae.save_pretrained(tmp_path / "vae")  # 4 down blocks: 8x smaller, like Stable Diffusion's
    with pytest.raises(DataError, match="resolution 40 is not divisible by 16"):
        run_train(*FAST, "--vae", tmp_path / "vae", "--res", 40, "--steps", 1, "--results-dir",
                  tmp_path)
    image_folder(tmp_path / "data", 4, size=(40, 36))
    run = run_train(*FAST, "--vae", tmp_path / "vae", "--data", tmp_path / "data", "--res", 32,
                    "--steps", 2, "--global-batch-size", 2, "--sample-every", 2, "--results-dir",
                    tmp_path / "results")
    assert len(losses(run)) == 2 and os.path.isfile(os.path.join(run, "samples", "0000002.png"))
    ckpt = torch.load(os.path.join(run, "checkpoints", "latest.pt"), weights_only=True)
    assert ckpt["model_kwargs"] == {"input_size": 4, "in_channels": 4, "num_classes": 0}
    images = run_sample("--ckpt", run, "--res", 48, "--steps", 2, "--num-samples", 2, "--out",
                        tmp_path / "s")
    assert images.shape == (2, 3, 48, 48)  # decoded by the VAE stored in the checkpoint's args


def test_converted_official_dim_weights_sample(tmp_path, tiny_vae, fidelity):
    """Official weights (here the tiny DiM of the fidelity vectors) enter through
    tools/convert_official.py and then sample like any train.py checkpoint, with the VAE stored at
    conversion."""
    tensors, _ = fidelity("dim_small")
    torch.save({k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")},
               tmp_path / "nnet_ema.pth")
    tiny_vae.save_pretrained(tmp_path / "vae")
    convert_official.main([str(tmp_path / "nnet_ema.pth"), "--vae", str(tmp_path / "vae"), "--out",
                           str(tmp_path / "dim.pt")])
    images = run_sample("--ckpt", tmp_path / "dim.pt", "--steps", 2, "--num-samples", 2, "--out",
                        tmp_path / "s")
    assert images.shape == (2, 3, 128, 128)  # the 16 x 16 latent grid of the weights, decoded 8x


def test_weak_to_strong_init_from(trained, tmp_path, capsys):
    # DiM's recipe in miniature: the 8 px run continued at 16 px starts with a lower loss than a
    # fresh 16 px model.
    at16 = [a if a != "8" else "16" for a in FAST]
    fresh = run_train(*at16, "--steps", 5, "--results-dir", tmp_path / "fresh")
    continued = run_train(*at16, "--steps", 5, "--results-dir", tmp_path / "cont", "--init-from",
                          trained)
    assert "resized ['pos_embed']" in capsys.readouterr().out
    first_fresh, first_cont = sum(losses(fresh)) / 5, sum(losses(continued)) / 5
    assert first_cont < 0.7 * first_fresh, (first_cont, first_fresh)
    with pytest.raises(ModelError, match="holds a DiM-T/2 model, not DiM-S/2"):
        run_train(*[a if a != MODEL else OTHER_MODEL for a in at16], "--steps", 1, "--results-dir",
                  tmp_path / "x", "--init-from", trained)


def test_training_free_upsampling(trained, tmp_path, capsys):
    # 2x the trained size: Upsample Guidance (auto); 20 px: the patch route; both give images of the
    # asked size.
    for res, mode in [(16, "auto"), (20, "patch"), (16, "none")]:
        images = run_sample("--ckpt", trained, "--res", res, "--upsample", mode, "--steps", 4,
                            "--num-samples", 2, "--out", tmp_path / f"{res}{mode}")
        assert images.shape == (2, 1, res, res) and images.dtype == torch.uint8 and images.float().std() > 0
    out = capsys.readouterr().out
    assert "upsample guidance" in out and "upsample patch" in out
    with pytest.raises(ModelError, match="multiple"):
        run_sample("--ckpt", trained, "--res", 20, "--upsample", "guidance", "--out",
                   tmp_path / "bad")


def test_tiled_model_matches_a_local_model():
    # For a per-pixel model, averaging overlapping tiles must give exactly the untiled prediction.
    class PerPixel(torch.nn.Module):
        patch_size, num_classes = 1, 0
        def forward(self, x, t, y=None):
            return x * 2 + t.view(-1, 1, 1, 1)
    x, t = torch.randn(2, 3, 20, 28), torch.tensor([1.0, 2.0])
    tiled = sample.TiledModel(PerPixel(), tile=8, overlap=0.5)
    assert tiled.starts(20) == [0, 4, 8, 12] and tiled.starts(28)[-1] == 20
    assert torch.allclose(tiled(x, t), PerPixel()(x, t))


def test_video_bidim_trains_and_samples_gifs(tmp_path):
    # BiDiM on Moving Fashion-MNIST clips: train a few steps, resume-safe checkpoint, GIF and
    # frame-strip samples.
    run = run_train("--model", "BiDiM-T/2", "--video", "--frames", 4, "--res", 16,
                    "--global-batch-size", 4,
                    "--steps", 3, "--log-every", 1, "--sample-every", 0, "--num-workers", 0,
                    "--results-dir", tmp_path)
    assert len(losses(run)) == 3
    clips = run_sample("--ckpt", run, "--steps", 2, "--num-samples", 2, "--out", tmp_path / "s")
    assert clips.shape == (2, 1, 4, 16, 16)
    files = set(os.listdir(tmp_path / "s"))
    assert {"000000.gif", "000000.png", "grid.gif"} <= files
    assert Image.open(tmp_path / "s" / "000000.gif").n_frames >= 2
    with pytest.raises(ModelError, match="image model"):
        run_train("--model", MODEL, "--video", "--frames", 4, "--res", 16, "--steps", 1,
                  "--results-dir", tmp_path)


@pytest.mark.parametrize("model,objective,sampler,steps", [("DiMSUM-T/2", "flow", "heun", 80),
                                                            ("LaMamba-T", "eps", "ddpm", 30)])
def test_other_families_learn_and_sample(model, objective, sampler, steps, tmp_path, one_thread):
    # DiMSUM trains with flow matching, LaMamba-Diff with the learned-sigma hybrid loss; both learn
    # on real Fashion-MNIST and sample (LaMamba through DDPM with its learned variance). LaMamba-T
    # is slow on a CPU (~1 s a step), hence few steps.
    fast = [a if a != MODEL else model for a in FAST]
    run = run_train(*fast, "--steps", steps, "--results-dir", tmp_path)
    curve = losses(run)
    first, last = sum(curve[:5]) / 5, sum(curve[-10:]) / 10
    assert last < 0.75 * first, (first, last)
    ckpt = torch.load(os.path.join(run, "checkpoints", "latest.pt"), weights_only=True)
    assert ckpt["objective"] == objective
    images = run_sample("--ckpt", run, "--sampler", sampler, "--steps", 5, "--num-samples", 2,
                        "--out", tmp_path / "s")
    assert images.shape == (2, 1, 8, 8) and images.dtype == torch.uint8 and images.float().std() > 0
    if objective == "flow":  # Upsample Guidance through the VP form, with the flow's own sampler
        images = run_sample("--ckpt", run, "--res", 16, "--upsample", "guidance", "--steps", 4,
                            "--num-samples", 2, "--out", tmp_path / "ug")
        assert images.shape == (2, 1, 16, 16) and images.dtype == torch.uint8 and images.float().std() > 0


def test_upsampling_at_3x_in_both_modes(trained, tmp_path):
    for mode in ("guidance", "patch"):
        images = run_sample("--ckpt", trained, "--res", 24, "--upsample", mode, "--steps", 4,
                            "--num-samples", 1, "--out", tmp_path / mode)
        assert images.shape == (1, 1, 24, 24) and images.dtype == torch.uint8 and images.float().std() > 0


def test_tile_weights_sum_to_one():
    # Every pixel's prediction is an average: the tile counts cover the map and the weights 1/count
    # sum to one.
    class Ones(torch.nn.Module):
        patch_size, num_classes = 1, 0
        def forward(self, x, t, y=None):
            return torch.ones_like(x)
    for size, overlap in [(20, 0.5), (24, 0.25), (8, 0.5), (17, 0.75)]:
        out = sample.TiledModel(Ones(), tile=8,
                                overlap=overlap)(torch.zeros(1, 1, size, size), torch.zeros(1))
        assert torch.equal(out, torch.ones_like(out))


def test_divergence_stops_the_run_before_a_broken_checkpoint(tmp_path):
    # An absurd learning rate: the loss goes non-finite within a few steps. The run must stop with
    # one line naming the step, and every checkpoint on disk must hold finite weights.
    argv = [*FAST, "--lr", "1e12", "--steps", 40, "--ckpt-every", 1, "--log-every", 10,
            "--results-dir", tmp_path]
    out = subprocess.run([sys.executable, "train.py", *map(str, argv)], cwd=ROOT, capture_output=True,
                         text=True)
    assert out.returncode == 1, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1].startswith("error: the loss became NaN or infinite at "
                                                          "step"), out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    ckpts = glob.glob(os.path.join(tmp_path, "*", "checkpoints", "0*.pt"))
    for path in ckpts:
        state = torch.load(path, weights_only=True)
        assert all(torch.isfinite(v).all() for v in state["model"].values()), path
        assert all(torch.isfinite(v).all() for v in state["ema"].values()), path


def test_run_folders_never_collide_and_a_torn_metrics_line_is_dropped(tmp_path):
    fast = [*FAST, "--steps", 2, "--results-dir", tmp_path]
    first, second = run_train(*fast), run_train(*fast)
    shutil.rmtree(first)  # the next run must not take the name of the existing 001 run
    third = run_train(*fast)
    assert os.path.basename(second).startswith("001-") and os.path.basename(third).startswith("002-")
    assert len(losses(second)) == 2
    # a kill during the append to metrics.jsonl: --resume drops the torn line instead of crashing
    with open(os.path.join(third, "metrics.jsonl"), "a") as f:
        f.write('{"step": 3, "lo')
    resumed = run_train("--resume", third, "--steps", 4)
    assert resumed == third and [json.loads(line)["step"] for line in open(
        os.path.join(third, "metrics.jsonl"))] == [1, 2, 3, 4]


def test_resume_survives_a_damaged_latest_and_refuses_weights_only_files(tmp_path):
    run = run_train(*FAST, "--steps", 4, "--ckpt-every", 2, "--results-dir", tmp_path)
    folder = os.path.join(run, "checkpoints")
    # latest.pt is a hard link of 0000004.pt: damaging it damages both. --resume of the folder falls
    # back to the newest readable numbered checkpoint and continues from step 2.
    with open(os.path.join(folder, "latest.pt"), "wb"):
        pass  # zero bytes
    assert run_train("--resume", run, "--steps", 6) == run
    assert [json.loads(line)["step"] for line in open(os.path.join(run, "metrics.jsonl"))] == list(range(1, 7))
    # a zero-byte file and a checkpoint without optimizer state: one clear error each
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(ModelError, match="not a readable PyTorch checkpoint"):
        run_train("--resume", empty)
    state = torch.load(os.path.join(folder, "0000006.pt"), weights_only=True)
    del state["opt"], state["rng"]
    torch.save(state, tmp_path / "weights.pt")
    with pytest.raises(ModelError, match="no opt, rng .*--init-from"):
        run_train("--resume", tmp_path / "weights.pt")
