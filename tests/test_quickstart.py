"""The quickstart as a new user meets it (issue 19): the README's main command on a machine without
a GPU, --help showing every default, sample.py without --ckpt, Fashion-MNIST above 32 px without a
materialised resized copy, and progress shown for sampling. Tiny models, a few steps."""
import argparse
import json
import math
import os
import re
import subprocess
import sys
import time

import pytest
import torch
from torch.utils.data import DataLoader

import models
import sample
import train
from data import FASHION_MNIST_DIR, FashionMNIST
from tools import bench
from train import RunError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
pytestmark = pytest.mark.usefixtures("one_thread")  # many tiny ops: steady on a shared 2-core CPU


def readme_quickstart():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    return text[text.index("## Quickstart"):text.index("## Training")]


def test_readme_command_fits_a_machine_without_gpus():
    quickstart = readme_quickstart()
    assert "--nproc_per_node=gpu" not in quickstart  # torchrun raises without CUDA
    assert "download.pytorch.org/whl/cpu" in quickstart  # the CPU torch, not PyPI's CUDA build
    # the process count the command computes: one per GPU, one on a machine without any
    count = re.search(r'--nproc_per_node=\$\(python -c "([^"]+)"\)', quickstart).group(1)
    out = subprocess.run([sys.executable, "-c", count], capture_output=True, text=True, check=True)
    assert int(out.stdout) >= 1
    # pip keeps an installed torch: a lower bound, never a pin or a CUDA index
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        torch_line = next(line.strip() for line in f if line.startswith("torch"))
    assert re.fullmatch(r"torch(>=[\d.]+)?", torch_line)


@pytest.mark.parametrize("script", [train, sample])
def test_help_shows_every_default(script, capsys):
    with pytest.raises(SystemExit):
        script.parse_args(["--help"])
    options = capsys.readouterr().out.split("\noptions:\n")[1]
    # one entry per option: its first line starts with two spaces and a dash
    entries = re.split(r"\n(?=  -)", options.strip("\n"))
    assert len(entries) > 10
    for entry in entries:
        if not entry.lstrip().startswith("-h,"):
            assert "default" in " ".join(entry.split()), entry


def test_default_num_workers_leaves_the_main_process_a_core():
    assert 0 <= train.RUN_CONTROL["num_workers"] <= max(0, len(os.sched_getaffinity(0)) - 1)


needs_data = pytest.mark.skipif(not os.path.isfile(os.path.join(FASHION_MNIST_DIR,
                                                                "train-images-idx3-ubyte.gz")),
                                reason="needs Fashion-MNIST: apt-get install dataset-fashion-mnist")


@needs_data
def test_train_grids_at_start_and_sample_from_the_newest_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # results/ of this test only
    with pytest.raises(RunError, match="no run with a checkpoint under results/ yet: train one"):
        sample.main(sample.parse_args([]))
    argv = ["--model", "DiT-T/2", "--res", "8", "--global-batch-size", "4", "--steps", "1",
            "--log-every", "1", "--num-workers", "0", "--sample-every"]
    older = train.main(train.parse_args(argv + ["0"]))
    newer = train.main(train.parse_args(argv + ["1"]))
    # a grid of the untrained model before the first step, then every --sample-every steps
    assert sorted(os.listdir(os.path.join(newer, "samples"))) == ["0000000.png", "0000001.png"]
    assert "sample grid 0000001.png" in capsys.readouterr().err  # the grid's progress bar
    os.utime(os.path.join(older, "checkpoints", "0000001.pt"))  # now the newest checkpoint
    images = sample.main(sample.parse_args(["--res", "16", "--steps", "3", "--num-samples", "3",
                                            "--out", "up"]))
    out, err = capsys.readouterr()
    assert f"sampling from the newest run, {older}" in out
    # the estimate: 3 dpm++ steps and Upsample Guidance's low-resolution forwards in its window
    assert re.search(r"work: 3 samples x 3 dpm\+\+ steps x 2 \(cfg\) at 16px, upsample guidance: "
                     r"\d+ network evaluations in 1 batch", out)
    assert "forward" in err and images.shape == (3, 1, 16, 16)


@needs_data
def test_fashion_mnist_above_32px_is_resized_per_batch():
    dataset = FashionMNIST(res=64)
    assert dataset.images.shape[-2:] == (32, 32)  # no 64 px copy of the 60k images
    loader = DataLoader(dataset, batch_size=4)
    x, y = next(iter(loader))
    assert x.shape == (4, 1, 64, 64) and y.tolist() == dataset.labels[:4].tolist()
    assert torch.equal(x[2], dataset[2][0])  # the same image read alone
    assert FashionMNIST(res=16).images.shape[-2:] == (16, 16)  # smaller: resized once


# -----------------------------------------------------------------------------------------------
# A run sized by time: --minutes, the machine's preset, recipe fitted to the run's length
# -----------------------------------------------------------------------------------------------

def test_minutes_conflicts_and_bad_values_are_one_line_errors(tmp_path):
    for argv, message in [(["--steps", "5", "--minutes", "1"], "give one of them"),
                          (["--resume", str(tmp_path), "--minutes", "1"], "give one of them"),
                          (["--minutes", "0"], "--minutes 0.0 cannot work"),
                          (["--minutes", "nan"], "--minutes nan cannot work")]:
        with pytest.raises(train.FlagError, match=re.escape(message)):
            train.main(train.parse_args(argv + ["--results-dir", str(tmp_path)]))
    assert not os.listdir(tmp_path)  # refused before any run folder


def test_warmup_and_ema_fit_the_run_length():
    args = lambda steps: argparse.Namespace(steps=steps, warmup=5000, ema=0.9999)
    recipe = dict(warmup=5000, ema=0.9999)
    short, paper, given = args(1000), args(100_000), args(1000)
    train.fit_to_length(short, ["warmup", "ema"], recipe)
    train.fit_to_length(paper, ["warmup", "ema"], recipe)
    train.fit_to_length(given, [], recipe)  # both given on the command line: kept
    assert (short.warmup, short.ema) == (50, pytest.approx(0.99))
    assert (paper.warmup, paper.ema) == (5000, 0.9999)  # DiM's recipe is these fractions at 100k
    assert (given.warmup, given.ema) == (5000, 0.9999)
    tiny = args(3)
    train.fit_to_length(tiny, ["warmup", "ema"], recipe)
    assert (tiny.warmup, tiny.ema) == (0, 0.0)


def test_plan_fills_the_minutes_beside_the_grids():
    args = argparse.Namespace(steps=None, sample_every=None, ckpt_every=None, log_every=None,
                              warmup=5000, ema=0.9999)
    train.plan_run(args, ["warmup", "ema"], dict(warmup=5000, ema=0.9999), seconds_left=112,
                   step_s=0.25, grid_s=2)
    # 95% of the 112 s less 6 grids of 2 s, at 0.25 s a step
    assert args.steps == 380 and args.sample_every == args.ckpt_every == 64
    assert args.log_every == 3 and args.warmup == 19 and args.ema == pytest.approx(1 - 10 / 380)
    kept = argparse.Namespace(steps=None, sample_every=0, ckpt_every=7, log_every=3, warmup=5,
                              ema=0.5)
    train.plan_run(kept, [], {}, seconds_left=100, step_s=0.1, grid_s=0)
    assert (kept.steps, kept.sample_every, kept.ckpt_every, kept.log_every) == (950, 0, 7, 3)


def test_a_run_without_steps_ends_in_its_minutes(tmp_path, monkeypatch, capsys, fake_fmnist):
    # the timed step says 0.1 ms, far faster than the real one: the run plans too many steps and
    # must stop at its deadline, still writing its last checkpoint and grid
    monkeypatch.setattr(train, "seconds_per_step", lambda *a: 1e-4)
    # grids as empty files: sampling has its own tests, and a busy machine makes real ones slow
    monkeypatch.setattr(train, "save_samples", lambda *a: open(a[5], "wb").close())
    fake_fmnist(tmp_path / "data")
    t0 = time.time()
    run = train.main(train.parse_args(["--model", "DiT-T/2", "--res", "8", "--minutes", "0.1",
                                       "--global-batch-size", "4", "--num-workers", "0",
                                       "--data-dir", str(tmp_path / "data"),
                                       "--results-dir", str(tmp_path / "results")]))
    out = capsys.readouterr().out
    assert time.time() - t0 < 60  # 6 s planned; generous for a busy machine
    args = json.load(open(os.path.join(run, "args.json")))
    planned = int(re.search(r"quickstart: 0.1 minutes on cpu: (\d+) steps", out).group(1))
    assert 0 < args["steps"] < planned and args["model"] == "DiT-T/2"  # a config: no preset
    assert (args["res"], args["global_batch_size"], args["lr"]) == (8, 4, 1e-4)  # DiT's own lr
    ckpt = torch.load(os.path.join(run, "checkpoints", f"{args['steps']:07d}.pt"),
                      weights_only=False)
    assert ckpt["step"] == args["steps"] and ckpt["args"]["steps"] == args["steps"]
    grids = sorted(os.listdir(os.path.join(run, "samples")))
    assert grids[0] == "0000000.png" and grids[-1] == f"{args['steps']:07d}.png"  # start and end


@pytest.mark.skipif(torch.cuda.is_available(), reason="the preset of a machine without a GPU")
def test_a_family_without_steps_gets_the_cpu_preset(tmp_path, monkeypatch, fake_fmnist):
    monkeypatch.setattr(train, "seconds_per_step", lambda *a: 1e3)  # plans a single step
    fake_fmnist(tmp_path / "data", n=40)
    run = train.main(train.parse_args(["--model", "dim", "--minutes", "0.5", "--sample-every", "0",
                                       "--num-workers", "0", "--data-dir", str(tmp_path / "data"),
                                       "--results-dir", str(tmp_path / "results")]))
    args = json.load(open(os.path.join(run, "args.json")))
    preset = train.QUICKSTART["cpu"]
    assert args["model"] == preset["models"]["dim"] == "DiM-T/2" and args["steps"] == 1
    assert (args["res"], args["global_batch_size"], args["lr"], args["minutes"]) == (
        preset["res"], preset["global_batch_size"], preset["lr"], 0.5)
    assert args["warmup"] == 0 and args["ema"] == 0  # fitted to one step


def test_a_run_planned_on_a_slow_timing_plans_again_from_its_pace(tmp_path, monkeypatch, capsys,
                                                                   fake_fmnist):
    # the timed step says 0.3 s (a machine busy at that moment): the plan is a few steps, and the
    # run, much faster in fact, extends itself at its first planned grid to fill its minutes
    monkeypatch.setattr(train, "seconds_per_step", lambda *a: 0.3)
    monkeypatch.setattr(train, "save_samples", lambda *a: open(a[5], "wb").close())
    fake_fmnist(tmp_path / "data")
    run = train.main(train.parse_args(["--model", "DiT-T/2", "--res", "8", "--minutes", "0.1",
                                       "--global-batch-size", "4", "--num-workers", "0",
                                       "--data-dir", str(tmp_path / "data"),
                                       "--results-dir", str(tmp_path / "results")]))
    planned = int(re.search(r"on cpu: (\d+) steps", capsys.readouterr().out).group(1))
    args = json.load(open(os.path.join(run, "args.json")))
    steps = args["steps"]
    assert planned < 20 and steps > 2 * planned
    assert args["ema"] >= 1 - 10 / steps - 1e-9  # the EMA horizon follows the new plan
    assert os.path.isfile(os.path.join(run, "checkpoints", f"{steps:07d}.pt"))
    # and so do the grids: one every sixth of the run, not every sixth of the first plan's steps
    assert args["sample_every"] == args["ckpt_every"] == math.ceil(steps / train.GRIDS_PER_RUN)
    assert len(os.listdir(os.path.join(run, "samples"))) <= 2 * train.GRIDS_PER_RUN


def test_a_run_without_steps_under_torchrun(tmp_path, fake_fmnist, free_port):
    # the ranks plan, re-plan and stop together (one step apart, a collective would hang); 18 s, so
    # that a loaded 2-core machine still has time for more than one step after the start
    fake_fmnist(tmp_path / "data", n=16)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={free_port}", os.path.join(ROOT, "train.py"), "--model",
                          "DiT-T/2", "--res", "8", "--global-batch-size", "4", "--minutes", "0.3",
                          "--sample-every", "0", "--num-workers", "0", "--data-dir",
                          str(tmp_path / "data"), "--results-dir", str(tmp_path / "results")],
                         capture_output=True, text=True, timeout=120, env={**os.environ,
                                                                            "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    run = os.path.join(tmp_path, "results", os.listdir(tmp_path / "results")[0])
    steps = json.load(open(os.path.join(run, "args.json")))["steps"]
    assert steps > 1 and os.path.isfile(os.path.join(run, "checkpoints", f"{steps:07d}.pt"))


def test_cpu_training_leaves_a_core_per_loader_worker(tmp_path, fake_fmnist):
    cores = len(os.sched_getaffinity(0))
    fake_fmnist(tmp_path / "data")
    argv = ["--model", "DiT-T/2", "--res", "8", "--global-batch-size", "4", "--steps", "1",
            "--sample-every", "0", "--data-dir", str(tmp_path / "data")]
    try:
        torch.set_num_threads(cores)
        train.main(train.parse_args(argv + ["--num-workers", "1", "--results-dir",
                                            str(tmp_path / "a")]))
        assert torch.get_num_threads() == max(1, cores - 1)
        torch.set_num_threads(1)  # fewer threads asked for are kept
        train.main(train.parse_args(argv + ["--num-workers", "0", "--results-dir",
                                            str(tmp_path / "b")]))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(1)  # the module's setting (one_thread)


def test_bench_cpu_table_row(tmp_path, capsys):
    out = tmp_path / "assets" / "bench_cpu.json"
    rows = bench.cpu_table([("DiM-T/2", 8, 2)], threads=1, warmup=0, repeats=1, out=str(out))
    assert json.loads(out.read_text()) == rows and len(rows) == 1
    row = rows[0]
    assert row["step_ms"] > 0 and row["images_per_s"] == pytest.approx(2e3 / row["step_ms"])
    assert 0.05 < row["peak_rss_gib"] < 2  # torch itself (~0.3 GiB) and a tiny model's step
    assert row["params_M"] == pytest.approx(sum(
        p.numel() for p in models.build_model("DiM-T/2", input_size=8, in_channels=1,
                                              num_classes=10).parameters()) / 1e6)
    assert "| DiM-T/2 | 8 | 2 |" in capsys.readouterr().out
