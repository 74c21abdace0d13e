"""The quickstart as a new user meets it (issue 19): the README's main command on a machine without
a GPU, --help showing every default, sample.py without --ckpt, Fashion-MNIST above 32 px without a
materialised resized copy, and progress shown for sampling. Tiny models, a few steps."""
import os
import re
import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader

import sample
import train
from data import FASHION_MNIST_DIR, FashionMNIST
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
