"""tools/compare.py on tiny models and real Fashion-MNIST: the stages run, an interrupted run
resumes, the table reports what the stages measured, and bad input fails clearly."""
import json
import os

import numpy as np
import pytest

from models import load_newest_checkpoint
from tools import compare

TINY = ["--models", "DiT-T/2,BiDiM-T/2", "--batch-size", "2", "--ckpt-every", "2", "--num-samples",
        "12", "--sample-steps", "2"]


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    out = tmp_path_factory.mktemp("comparison")
    with pytest.MonkeyPatch.context() as mp:
        # the stages' subprocesses: one thread each on a small CI runner
        mp.setenv("OMP_NUM_THREADS", "1")
        compare.main(compare.parse_args([*TINY, "--out", str(out), "--steps", "4", "--stages",
                                         "speed,train,sample"]))
    return out


def test_stages_train_and_sample(done):
    speed = json.load(open(done / "speed.json"))
    assert set(speed) == {"DiT-T/2", "BiDiM-T/2"} and all(v["img_per_s"] > 0
                                                          for v in speed.values())
    for name in ("DiT-T/2", "BiDiM-T/2"):
        run = compare.run_folder(str(done), name)
        assert compare.checkpoint_step(run) == 4
        ckpt, _ = load_newest_checkpoint(run)
        # the shared recipe, not the model's
        assert ckpt["args"]["lr"] == 2e-4 and ckpt["args"]["ema"] == 0.99
        images = np.load(done / "samples" / compare.tag(name) / "samples.npz")["arr_0"]
        assert images.shape == (12, 32, 32, 1) and images.dtype == np.uint8


def test_train_resumes_and_sample_waits_for_training(done):
    args = [*TINY, "--out", str(done), "--steps", "6"]
    # sampled models are skipped; this one must wait
    os.remove(done / "samples" / "DiT-T-2" / "samples.npz")
    with pytest.raises(SystemExit, match="has not finished training"):
        compare.main(compare.parse_args([*args, "--stages", "sample"]))
    before = compare.run_folder(str(done), "DiT-T/2")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        compare.main(compare.parse_args([*args, "--stages", "train"]))
    assert compare.run_folder(str(done), "DiT-T/2") == before  # continued in the same run folder
    assert compare.checkpoint_step(before) == 6
    steps = [json.loads(line)["step"] for line in open(os.path.join(before, "metrics.jsonl"))]
    assert steps == sorted(set(steps))  # no step logged twice


def test_table_reports_the_measurements(done, capsys):
    scores = {"DiT-T/2": {"fid": 123.45, "kid": 0.0321}, "BiDiM-T/2": {"fid": 67.89, "kid": 0.0123},
              "Fashion-MNIST train (10k)": {"fid": 2.5, "kid": 0.0}}
    json.dump(scores, open(done / "fid.json", "w"))
    compare.main(compare.parse_args([*TINY, "--out", str(done), "--steps", "4", "--stages",
                                     "table"]))
    table = open(done / "table.md").read()
    speed = json.load(open(done / "speed.json"))
    gflops, params = compare.count_gflops("BiDiM-T/2")
    row = next(line for line in table.splitlines() if line.startswith("| BiDiM-T/2 "))
    assert f"| {params / 1e6:.1f} | {gflops:.2f} | {speed['BiDiM-T/2']['img_per_s']:.0f} | 67.9 | 12.3 |" in row
    assert "| real images (train) | | | | 2.5 |" in table and table in capsys.readouterr().out


def test_bad_input():
    with pytest.raises(SystemExit):
        compare.parse_args(["--stages", "train,evaluate"])
    with pytest.raises(SystemExit, match="unknown model"):
        compare.parse_args(["--models", "DiT-S/2,DiQ-S/2"])
