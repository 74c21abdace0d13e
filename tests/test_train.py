"""End-to-end tests of train.py and sample.py on CPU: learning, exact resume (one process and
torchrun), sampling, the VAE path, what survives crashes and damaged files, and the error messages.
A tiny DiM on 8x8 Fashion-MNIST learns and samples; the trainer's mechanics (resume, locks,
checkpoints, errors) run on the much faster DiT-T/2."""
import errno
import fcntl
import glob
import json
import os
import runpy
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from PIL import Image

import sample
import train
from data import FASHION_MNIST_DIR, DataError
from models import LATEST, ModelError, build_model, load_newest_checkpoint, resolve_model_name
from tools import convert_official

MODEL = "DiM-T/2"
OTHER_MODEL = "DiM-S/2"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
pytestmark = [pytest.mark.skipif(not os.path.isfile(os.path.join(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz")),
                                 reason="needs Fashion-MNIST: apt-get install dataset-fashion-mnist"),
              # tiny models on a 2-core runner: one intra-op thread, in this process and in the
              # train.py processes the tests start (conftest.one_thread)
              pytest.mark.usefixtures("one_thread")]
ONE_THREAD = dict(os.environ, OMP_NUM_THREADS="1")
# Small and fast: 8x8 images (a 4x4 token grid), no sample grids, a high lr and no warm-up so a
# hundred steps learn.
FAST = ["--model", MODEL, "--res", "8", "--global-batch-size", "16", "--lr", "1e-3", "--warmup",
        "0", "--log-every", "1", "--sample-every", "0", "--num-workers", "0"]
# the same with DiT-T/2, ~40x faster a step than DiM-T/2 on a CPU: for what is not about the model
QUICK = [a if a != MODEL else "DiT-T/2" for a in FAST]


def run_train(*argv):
    # A resume takes its loader's worker count from the machine, not the checkpoint: 0 here unless
    # a test says otherwise, since starting a worker process costs seconds on a small CI runner.
    if "--resume" in argv and "--num-workers" not in argv:
        argv = (*argv, "--num-workers", 0)
    return train.main(train.parse_args([str(a) for a in argv]))


def run_sample(*argv):
    return sample.main(sample.parse_args([str(a) for a in argv]))


def run_script(script, *argv):
    """`python SCRIPT ARGV` run in this process (no interpreter start-up): the SystemExit its
    __main__ block ends with. Its code is what the interpreter prints to stderr (a string: exit
    status 1)."""
    saved = sys.argv
    sys.argv = [script, *map(str, argv)]
    try:
        with pytest.raises(SystemExit) as e:
            runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    finally:
        sys.argv = saved
    return e.value.code


def losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def logged_steps(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


def newest(run_dir):
    """The checkpoint dict that checkpoints/latest names."""
    with open(os.path.join(run_dir, "checkpoints", LATEST)) as f:
        return torch.load(os.path.join(run_dir, "checkpoints", f.read().strip()), weights_only=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    """One 100-step run shared by the learning, sampling and error tests."""
    results = tmp_path_factory.mktemp("results")
    return run_train(*FAST, "--steps", 100, "--ckpt-every", 50, "--ema", 0.99, "--results-dir",
                     results)


def test_loss_decreases(trained):
    curve = losses(trained)
    assert len(curve) == 100
    first, last = sum(curve[:20]) / 20, sum(curve[-30:]) / 30
    # Observed: first ~0.8, last ~0.19 (ratio ~0.23); 0.4 leaves a wide margin.
    assert last < 0.4 * first, (first, last)
    # numbered checkpoints and the pointer naming the newest
    assert sorted(os.listdir(os.path.join(trained, "checkpoints"))) == ["0000050.pt", "0000100.pt",
                                                                         LATEST]
    assert open(os.path.join(trained, "checkpoints", LATEST)).read() == "0000100.pt\n"
    ckpt = newest(trained)
    assert ckpt["step"] == 100 and ckpt["model_name"] == MODEL and ckpt["args"]["ema"] == 0.99
    assert ckpt["args"]["weight_decay"] == build_model(MODEL, num_classes=0).train_defaults["weight_decay"]


def test_resume_is_exact(tmp_path):
    # num_workers 1 also checks that the DataLoader's worker seeding does not touch the training RNG
    fast = [*QUICK, "--num-workers", 1]
    full = run_train(*fast, "--steps", 12, "--results-dir", tmp_path / "a")
    # The interrupted run got to step 9 but its last checkpoint is at 6: resuming must also drop
    # steps 7-9 from the log.
    part = run_train(*fast, "--steps", 9, "--ckpt-every", 6, "--results-dir", tmp_path / "b")
    resumed = run_train("--resume", os.path.join(part, "checkpoints", "0000006.pt"), "--steps", 12)
    assert resumed == part
    assert losses(resumed) == losses(full)  # bit-exact on CPU
    # resuming from a run folder uses the checkpoint checkpoints/latest names; nothing is left to do
    assert run_train("--resume", part, "--steps", 12) == part and len(losses(part)) == 12


def test_torchrun_two_processes_resume_exact(tmp_path, image_folder, free_port):
    # A tiny image folder (3 classes x 8 images, 3 batches per epoch per process) so the runs cross
    # epoch boundaries.
    image_folder(tmp_path / "data", 8, size=(12, 12), classes=["a", "b", "c"])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=localhost:{free_port}", "train.py",
           "--model", "DiT-T/2", "--data", tmp_path / "data", "--res", 8, "--global-batch-size", 8,
           "--lr", "1e-3", "--log-every", 1, "--sample-every", 0, "--num-workers", 0]

    def torchrun(*argv):
        out = subprocess.run([str(a) for a in [*cmd, *argv]], cwd=ROOT, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]

    torchrun("--steps", 8, "--results-dir", tmp_path / "a")
    torchrun("--steps", 4, "--results-dir", tmp_path / "b")
    run_b = os.path.join(tmp_path, "b", "000-DiT-T-2")
    torchrun("--resume", run_b, "--steps", 8)
    full = losses(os.path.join(tmp_path, "a", "000-DiT-T-2"))
    assert len(full) == 8 and losses(run_b) == full
    ckpt = newest(run_b)
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
        images = run_sample("--ckpt", os.path.join(trained, "checkpoints", "0000050.pt"), "--res",
                            12,
                            "--sampler", sampler, "--steps", 3, "--num-samples", 3, "--class-label",
                            4, "--batch-size", batch, "--out", tmp_path / f"r12_{batch}")
        assert images.shape == (3, 1, 12, 12)
    a, b = (Image.open(tmp_path / f"r12_{b}" / "000002.png") for b in (2, 3))
    assert a.size == (12, 12) and a.tobytes() == b.tobytes()


def test_compiled_sampling_matches_eager(trained, tmp_path, traced_compile):
    # --compile blocks (auto's choice on a GPU) on the trained size and an upsampled one (a second
    # shape); traced as on the GPU, run eagerly (conftest.traced_compile)
    for res in (8, 16):
        images = {mode: run_sample("--ckpt", trained, "--res", res, "--steps", 3, "--num-samples", 2,
                                   "--compile", mode, "--format", "npz", "--out", tmp_path / mode)
                  for mode in ("none", "blocks")}
        assert images["none"].shape == (2, 1, res, res)
        assert (images["blocks"].int() - images["none"].int()).abs().max() <= 1
    assert len(traced_compile) == 2 * len(build_model(MODEL, input_size=8, in_channels=1).blocks)


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


def test_cli_errors_are_one_line(trained, tmp_path, monkeypatch):
    # the scripts' __main__ blocks, in this process; the lock test below runs a real `python
    # train.py` to the same kind of one-line exit
    monkeypatch.chdir(tmp_path)
    for script, argv, message in [
            ("train.py", ["--model", "nope", "--results-dir", tmp_path],
             "error: unknown model 'nope'"),
            ("sample.py", ["--ckpt", tmp_path / "missing.pt"], "error: checkpoint"),
            ("sample.py", ["--ckpt", trained, "--res", 7],
             "error: resolution 7 is not divisible by 2"),
            ("train.py", ["--lr", "nan", "--results-dir", tmp_path], "error: --lr nan cannot work"),
            ("sample.py", ["--ckpt", trained, "--steps", 0], "error: --steps 0 cannot work")]:
        code = run_script(script, *argv)
        assert isinstance(code, str) and code.startswith(message) and "\n" not in code, code


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
    ckpt = newest(run)
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


@pytest.mark.parametrize("model,objective,sampler,steps", [("DiMSUM-T/2", "flow", "heun", 40),
                                                            ("LaMamba-T", "eps", "ddpm", 15)])
def test_other_families_learn_and_sample(model, objective, sampler, steps, tmp_path, one_thread):
    # DiMSUM trains with flow matching, LaMamba-Diff with the learned-sigma hybrid loss; both learn
    # on real Fashion-MNIST and sample (LaMamba through DDPM with its learned variance). They are
    # slow on a CPU (~0.6 and ~2 s a step), hence few steps. Observed last / first: 0.60 (DiMSUM,
    # 40 steps), 0.59 (LaMamba, 15 steps).
    fast = [a if a != MODEL else model for a in FAST]
    run = run_train(*fast, "--steps", steps, "--results-dir", tmp_path)
    curve = losses(run)
    first, last = sum(curve[:5]) / 5, sum(curve[-10:]) / 10
    assert last < 0.75 * first, (first, last)
    ckpt = newest(run)
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


def test_compile_default_is_each_models_fastest():
    # --compile auto on a GPU (README, Speed): every model with a selective scan per block, DiT whole.
    from models import fastest_compile
    for name, mode in [("DiM-T/2", "blocks"), ("BiDiM-T/2", "blocks"), ("DiMSUM-T/2", "blocks"),
                       ("LaMamba-T", "blocks"), ("DiT-T/2", "model")]:
        assert fastest_compile(build_model(name, input_size=8, in_channels=1, num_classes=10)) == mode


def test_divergence_stops_the_run_before_a_broken_checkpoint(tmp_path):
    # An absurd learning rate: the loss goes non-finite within a few steps. The run must stop with
    # one line naming the step, and every checkpoint on disk must hold finite weights.
    code = run_script("train.py", *QUICK, "--lr", "1e12", "--steps", 40, "--ckpt-every", 1,
                      "--log-every", 10, "--results-dir", tmp_path)
    assert isinstance(code, str) and "\n" not in code, code
    assert code.startswith("error: the loss, gradients or weights became NaN or infinite at step"), code
    ckpts = glob.glob(os.path.join(tmp_path, "*", "checkpoints", "0*.pt"))
    for path in ckpts:
        state = torch.load(path, weights_only=True)
        assert all(torch.isfinite(v).all() for v in state["model"].values()), path
        assert all(torch.isfinite(v).all() for v in state["ema"].values()), path


@pytest.mark.parametrize("grad_clip", [0, 1])
def test_a_nan_gradient_under_a_finite_loss_never_reaches_a_checkpoint(grad_clip, tmp_path,
                                                                       monkeypatch):
    # Every gradient of one weight is NaN: the loss of step 1 is finite (computed before the
    # update), the weights after it are not. Caught through the gradient norm when clipping,
    # through the weights themselves before the checkpoint otherwise.
    build = train.build_model

    def poisoned(*args, **kwargs):
        model = build(*args, **kwargs)
        next(model.parameters()).register_hook(lambda g: torch.full_like(g, float("nan")))
        return model
    monkeypatch.setattr(train, "build_model", poisoned)
    with pytest.raises(train.DivergedError, match="NaN or infinite at step 1;"):
        run_train(*QUICK, "--grad-clip", grad_clip, "--steps", 2, "--ckpt-every", 1, "--log-every",
                  5, "--results-dir", tmp_path)
    assert glob.glob(str(tmp_path / "*" / "checkpoints" / "*.pt")) == []


def test_run_folders_never_collide_and_a_torn_metrics_line_is_dropped(tmp_path):
    fast = [*QUICK, "--steps", 2, "--results-dir", tmp_path]
    first, second = run_train(*fast), run_train(*fast)
    shutil.rmtree(first)  # the next run must not take the name of the existing 001 run
    third = run_train(*fast)
    assert os.path.basename(second).startswith("001-") and os.path.basename(third).startswith("002-")
    assert len(losses(second)) == 2
    # a kill during the append to metrics.jsonl: --resume drops the torn line instead of crashing
    with open(os.path.join(third, "metrics.jsonl"), "a") as f:
        f.write('{"step": 3, "lo')
    resumed = run_train("--resume", third, "--steps", 4)
    assert resumed == third and logged_steps(third) == [1, 2, 3, 4]


def test_a_kill_during_a_checkpoint_write_loses_only_the_steps_since_the_last_one(tmp_path):
    # The process SIGKILLs itself halfway through writing its second checkpoint (step 4): the
    # partial file stays a .tmp, latest still names step 2, and --resume reproduces the
    # uninterrupted run's losses bit for bit.
    argv = [*QUICK, "--steps", 6, "--ckpt-every", 2]
    driver = ("import os, signal, sys, torch, train\n"
              "save, calls = torch.save, []\n"
              "def dying_save(obj, f):\n"
              "    calls.append(obj)\n"
              "    if len(calls) == 2:\n"
              "        f.write(b'half a checkpoint')\n"
              "        f.flush()\n"
              "        os.kill(os.getpid(), signal.SIGKILL)\n"
              "    save(obj, f)\n"
              "torch.save = dying_save\n"
              "train.main(train.parse_args(sys.argv[1:]))\n")
    out = subprocess.run([sys.executable, "-c", driver, *map(str, argv), "--results-dir",
                          str(tmp_path / "killed")], cwd=ROOT, capture_output=True, text=True,
                         env=ONE_THREAD)
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
    run, = glob.glob(str(tmp_path / "killed" / "*"))
    folder = os.path.join(run, "checkpoints")
    assert sorted(os.listdir(folder)) == ["0000002.pt", "0000004.pt.tmp", LATEST]
    assert open(os.path.join(folder, LATEST)).read() == "0000002.pt\n"
    assert run_train("--resume", run) == run
    full = run_train(*argv, "--results-dir", tmp_path / "full")
    assert logged_steps(run) == list(range(1, 7)) and losses(run) == losses(full)
    assert sorted(os.listdir(folder)) == ["0000002.pt", "0000004.pt", "0000006.pt", LATEST]


def test_latest_pointer_survives_a_damaged_newest_checkpoint_and_keep_last_prunes(tmp_path, capsys):
    run = run_train(*QUICK, "--steps", 6, "--ckpt-every", 2, "--keep-last", 2, "--results-dir",
                    tmp_path)
    folder = os.path.join(run, "checkpoints")
    assert sorted(os.listdir(folder)) == ["0000004.pt", "0000006.pt", LATEST]
    # Damage the newest checkpoint: the pointer is a file of its own, not a link, so it is intact;
    # --resume of the folder falls back to the newest readable checkpoint, saying so.
    with open(os.path.join(folder, "0000006.pt"), "r+b") as f:
        f.truncate(100)
    assert open(os.path.join(folder, LATEST)).read() == "0000006.pt\n"
    assert run_train("--resume", run, "--steps", 8) == run
    assert f"using {os.path.join(folder, '0000004.pt')}" in capsys.readouterr().out
    assert logged_steps(run) == list(range(1, 9))
    # --keep-last (stored with the run) pruned step 4 once 6 and 8 were rewritten
    assert sorted(os.listdir(folder)) == ["0000006.pt", "0000008.pt", LATEST]
    # a damaged pointer: the newest numbered checkpoint, saying so
    with open(os.path.join(folder, LATEST), "w") as f:
        f.write("\x00\x00")
    assert load_newest_checkpoint(run)[0]["step"] == 8
    assert f"{os.path.join(folder, LATEST)} is missing or damaged" in capsys.readouterr().out


def test_damaged_and_incomplete_checkpoints_get_one_line(tmp_path):
    run = run_train(*QUICK, "--steps", 2, "--results-dir", tmp_path)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(ModelError, match="empty.pt is empty"):
        run_train("--resume", empty)
    state = newest(run)
    for missing in ("opt", "rng"):
        torch.save({k: v for k, v in state.items() if k != missing}, tmp_path / "weights.pt")
        with pytest.raises(ModelError, match=f"has no {missing} .*--init-from"):
            run_train("--resume", tmp_path / "weights.pt")
    # a crafted pickle: refused without running it, and without torch's advice to use
    # weights_only=False
    class Payload:
        def __reduce__(self):
            return os.system, ("touch " + str(tmp_path / "pwned"),)
    torch.save({**state, "ema": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ModelError, match="posix.system") as e:
        run_train("--resume", tmp_path / "evil.pt")
    assert "weights_only" not in str(e.value) and not (tmp_path / "pwned").exists()
    # weights that went non-finite (a diverged run of an older version): refused in one line
    key = next(k for k, v in state["model"].items() if v.is_floating_point())
    state["model"][key] = torch.full_like(state["model"][key], float("inf"))
    torch.save(state, tmp_path / "inf.pt")
    with pytest.raises(ModelError, match=f"NaN or infinite weights \\(model: {key}\\)"):
        run_train("--resume", tmp_path / "inf.pt")


def test_bad_flags_stop_before_data_and_model_are_built(tmp_path):
    # --data-dir points nowhere: had the data been reached, the error would be a DataError
    for argv, message in [(["--global-batch-size", 0], "--global-batch-size 0 cannot work"),
                          (["--res", -8], "--res -8 cannot work"), (["--res", 0], "--res 0"),
                          (["--lr", "nan"], "--lr nan cannot work: it must be a finite number"),
                          (["--lr", -1e-4], "--lr -0.0001"), (["--ema", 1.5], "--ema 1.5"),
                          (["--label-dropout", 1], "--label-dropout 1.0"),
                          (["--keep-last", -1], "--keep-last -1"),
                          (["--video", "--frames", 0], "--frames 0 cannot work"),
                          (["--cuda-graph", "on"], "--cuda-graph on needs a single CUDA GPU")]:
        with pytest.raises(train.FlagError, match=message):
            run_train(*QUICK, "--data-dir", tmp_path / "nowhere", "--steps", 2, "--results-dir",
                      tmp_path / "results", *argv)
    assert not (tmp_path / "results").exists()


def test_full_or_read_only_results_folders_get_one_line(tmp_path, monkeypatch):
    # read-only (simulated: the tests may run as root, who can write anywhere): found up front,
    # before the data (nowhere here) or the model are built
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")
    with monkeypatch.context() as m:
        m.setattr(train.tempfile, "TemporaryFile", read_only)
        with pytest.raises(train.RunError, match="cannot write to .*ro: it is read-only"):
            run_train(*QUICK, "--data-dir", tmp_path / "nowhere", "--steps", 2, "--results-dir",
                      tmp_path / "ro")
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full to simulate a full disk")
    # A full disk mid-run: the next checkpoint's temporary file leads to /dev/full, where every
    # write fails with ENOSPC. One line naming the folder; the last checkpoint stays the latest.
    run = run_train(*QUICK, "--steps", 2, "--results-dir", tmp_path)
    folder = os.path.join(run, "checkpoints")
    os.symlink("/dev/full", os.path.join(folder, "0000004.pt.tmp"))
    with pytest.raises(train.RunError, match=f"cannot write to {folder}: its disk is full"):
        run_train("--resume", run, "--steps", 4)
    assert sorted(os.listdir(folder)) == ["0000002.pt", LATEST] and newest(run)["step"] == 2


def test_a_second_resume_of_a_live_run_stops_and_a_dead_runs_lock_is_taken_over(tmp_path, capsys):
    run = run_train(*QUICK, "--steps", 2, "--results-dir", tmp_path)
    lock = os.path.join(run, "lock")
    assert open(lock).read() == ""  # released at the end
    # This test holds the lock as a live train.py would: a second --resume stops in one line.
    with open(lock, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write(f"process {os.getpid()} on this host\n")
        held.flush()
        out = subprocess.run([sys.executable, "train.py", "--resume", run, "--steps", "4"],
                             cwd=ROOT, capture_output=True, text=True, env=ONE_THREAD)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.stderr.strip() == (f"error: {run} is in use: process {os.getpid()} on this host is "
                                  "training it; stop that process first (or let it finish) rather "
                                  "than resume the run twice")
    assert logged_steps(run) == [1, 2]
    # A killed run leaves its name in the file but not its lock: the next --resume takes it over.
    with open(lock, "w") as f:
        f.write("process 999999999 on this host\n")
    assert run_train("--resume", run, "--steps", 4) == run
    assert f"took over {lock} from process 999999999" in capsys.readouterr().out
    assert logged_steps(run) == [1, 2, 3, 4] and open(lock).read() == ""


def test_workers_stop_when_their_torchrun_launcher_dies(tmp_path, monkeypatch):
    # torchrun marks its workers with TORCHELASTIC_RUN_ID. When the launcher is killed, its
    # workers are re-parented (to init or a subreaper): os.getppid() changes. Simulated here from
    # the moment the step-2 checkpoint exists.
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    launcher = os.getppid()
    step2 = str(tmp_path / "*" / "checkpoints" / "0000002.pt")
    monkeypatch.setattr(os, "getppid", lambda: 1 if glob.glob(step2) else launcher)
    with pytest.raises(train.RunError, match="torchrun launcher of this run is gone"):
        run_train(*QUICK, "--steps", 8, "--ckpt-every", 2, "--log-every", 2, "--results-dir",
                  tmp_path)
    run, = glob.glob(str(tmp_path / "*"))
    # stopped at the next check (step 4), before writing anything more
    assert logged_steps(run) == [2] and newest(run)["step"] == 2
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["0000002.pt", LATEST]


def test_a_resumed_checkpoint_writes_where_the_command_line_says(tmp_path, monkeypatch):
    run = run_train(*QUICK, "--steps", 2, "--results-dir", tmp_path / "a")
    # a checkpoint outside any run folder, whose stored results_dir is another machine's path
    state = newest(run)
    state["args"]["results_dir"] = "/elsewhere/results"
    torch.save(state, tmp_path / "moved.pt")
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    resumed = run_train("--resume", tmp_path / "moved.pt", "--steps", 3)
    assert resumed == os.path.join("results", "000-DiT-T-2") and logged_steps(resumed) == [3]
    assert os.listdir(tmp_path / "a") == [os.path.basename(run)]
