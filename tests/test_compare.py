"""tools/compare.py on a tiny DiT and real Fashion-MNIST: every stage runs and records what it
measured, a second call redoes nothing and continues where the first stopped, a fresh machine
(results kept, checkpoints gone) starts a family over only when work is left, the budget stops a
call, the GPU-seconds and the plots are right, and bad input fails clearly. train.py and sample.py
run in this process with the command lines compare.py builds (a new Python process per call costs
seconds on a small runner); one test runs the real subprocess path. A fixed random network stands in
for Inception, and 32 test images for the test set. About 30 s on 2 CPU cores."""
import json
import os
import shutil
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import fid
import sample
import train
from tools import compare

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py
SUBPROCESS = compare.run_command  # the real one, before the stand-in replaces it

TINY = ["--models", "DiT-T/2", "--batch-size", "4", "--epochs", "0.0004", "--eval-at", "0.0002",
        "--num-samples", "8", "--sweep-samples", "8", "--sample-steps", "2", "--sweep-samplers",
        "ddim,dpm++", "--sweep-clips", "none,dynamic", "--cfg-scales", "1,2", "--num-workers", "0"]


class Features(torch.nn.Module):
    """Stands in for Inception: a fixed random projection of 8x8-pooled images to 16 features (the
    Frechet distance of 2048 takes seconds on a small CPU), >= 0 like pool3's."""
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.proj = torch.nn.Parameter(torch.randn(3 * 64, 16, generator=g) * 0.1)

    def forward(self, x):
        return (torch.nn.functional.adaptive_avg_pool2d(x, 8).flatten(1) @ self.proj).relu()


def in_process(calls):
    """compare.run_command's stand-in: runs train.py / sample.py's main on the command line
    compare.py built (recorded in `calls`)."""
    def run(cmd, log, deadline):
        assert cmd[0] == sys.executable
        calls.append(cmd[1:])
        module = {"train.py": train, "sample.py": sample}[os.path.basename(cmd[1])]
        module.main(module.parse_args(cmd[2:]))
        return True
    return run


@pytest.fixture(scope="module")
def stand_ins():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fid, "find_weights", lambda path=None: "stand-in")
        mp.setattr(fid, "FEATURE_DIM", 16)
        mp.setattr(fid, "load_inception", lambda path, device: Features())
        load = fid.load_dataset
        mp.setattr(fid, "load_dataset", lambda name, data_dir=None: load(name, data_dir)[:32])
        calls = []
        mp.setattr(compare, "run_command", in_process(calls))
        yield calls


@pytest.fixture(scope="module")
def done(stand_ins, tmp_path_factory):
    out = tmp_path_factory.mktemp("comparison")
    compare.main(compare.parse_args([*TINY, "--out", str(out)]))
    return out


def results(out):
    return json.load(open(out / "report" / "results.json"))


def test_every_stage_runs_and_is_recorded(done):
    record = results(done)["models"]["DiT-T/2"]
    evals = list(record["evals"].values())
    # the curve: dpm++ with the pixel-space default clipping, no guidance, at steps 3 and 6
    # (0.0002 and 0.0004 epochs of 60,000 images at batch 4)
    curve = sorted(e["step"] for e in evals
                   if (e["sampler"], e["x0_clip"], e["cfg"]) == ("dpm++", "clip", 1))
    assert curve == [3, 6]
    # the sweep at the last checkpoint: every sampler x clipping asked for, unguided
    sweep = {(e["sampler"], e["x0_clip"]) for e in evals if e["step"] == 6 and e["cfg"] == 1}
    assert {("ddim", "none"), ("ddim", "dynamic"), ("dpm++", "none"),
            ("dpm++", "dynamic")} <= sweep
    # guidance at the best checkpoint of the curve with the best sampler and clipping of the sweep
    g = record["guidance"]
    best_curve = min((e for e in evals if (e["sampler"], e["x0_clip"], e["cfg"])
                      == ("dpm++", "clip", 1)), key=lambda e: e["fid"])
    best_sweep = min((e for e in evals if e["step"] == 6 and e["cfg"] == 1),
                     key=lambda e: e["fid"])
    assert g == {"step": best_curve["step"], "sampler": best_sweep["sampler"],
                 "x0_clip": best_sweep["x0_clip"], "n": 8}
    assert {e["cfg"] for e in evals if all(e[k] == v for k, v in g.items())} == {1, 2}
    for e in evals:
        assert e["n"] == 8 and np.isfinite(e["fid"]) and e["fid"] > 0 and e["gpu_s"] > 0
        assert e["images"] == 4 * e["step"]
    # training GPU-seconds grow along the curve; the run kept only its evaluation checkpoints
    by_step = {e["step"]: e["gpu_s"] for e in evals}
    assert by_step[6] > by_step[3]
    run = compare.run_folder(str(done), "DiT-T/2")
    assert compare.checkpoint_steps(run) == [3, 6]
    assert [c["from"] for c in record["chunks"]] == [0, 3]
    ckpt = torch.load(compare.checkpoint_path(run, 6), weights_only=True)
    assert ckpt["args"]["lr"] == 2e-4 and ckpt["args"]["ema"] == 0.995  # the shared recipe


def test_report_shows_the_measurements(done):
    record = results(done)["models"]["DiT-T/2"]
    table = open(done / "report" / "table.md").read()
    row = next(line for line in table.splitlines() if line.startswith("| DiT-T/2 | "))
    at = {e["step"]: e for e in record["evals"].values()
          if (e["sampler"], e["x0_clip"], e["cfg"]) == ("dpm++", "clip", 1)}
    assert f"| {at[3]['fid']:.1f} | {at[6]['fid']:.1f} | {1e3 * at[6]['kid']:.1f} |" in row
    assert "FID @ 0.0002 ep | FID @ 0.0004 ep" in table
    for e in record["evals"].values():  # every sweep row
        if e["step"] == 6 and e["cfg"] == 1:
            assert (f"| DiT-T/2 | 0.0004 | {e['sampler']} | {e['x0_clip']} | 1 | {e['fid']:.1f} |"
                    in table)
    for name in ("fid_vs_images.png", "fid_vs_gpu_seconds.png"):
        assert Image.open(done / "report" / name).size == (900, 600)
    best = min(record["evals"].values(), key=lambda e: e["fid"])
    assert (open(done / "report" / "grid_DiT-T-2.png", "rb").read()
            == open(best["grid"], "rb").read())


def test_a_second_call_continues(done, stand_ins):
    before = results(done)["models"]["DiT-T/2"]
    stand_ins.clear()
    compare.main(compare.parse_args([*TINY, "--out", str(done)]))
    assert stand_ins == []  # everything was done: nothing runs again
    # three more steps: training resumes the run from 6, the new last point gets its sweeps
    compare.main(compare.parse_args([*TINY, "--out", str(done), "--epochs", "0.0006"]))
    trains = [c for c in stand_ins if c[0].endswith("train.py")]
    assert len(trains) == 1 and "--resume" in trains[0] and trains[0][trains[0].index("--steps")
                                                                       + 1] == "9"
    after = results(done)["models"]["DiT-T/2"]
    assert all(after["evals"][k] == v for k, v in before["evals"].items() if k in after["evals"])
    assert {e["step"] for e in after["evals"].values()} >= {3, 6, 9}
    run = compare.run_folder(str(done), "DiT-T/2")
    steps = [json.loads(line)["step"] for line in open(os.path.join(run, "metrics.jsonl"))]
    assert steps == sorted(set(steps)) and steps[-1] == 9


def test_a_fresh_machine_trains_again_only_for_work_left(done, stand_ins, tmp_path, monkeypatch):
    out = tmp_path / "fresh"
    shutil.copytree(done / "report", out / "report")  # what a session carries: no runs/
    stand_ins.clear()
    compare.main(compare.parse_args([*TINY, "--out", str(out)]))
    # all done: nothing runs, every measurement is kept
    assert stand_ins == []
    evals = results(done)["models"]["DiT-T/2"]["evals"]
    assert results(out)["models"]["DiT-T/2"]["evals"] == evals
    table = open(out / "report" / "table.md").read()
    assert table.count("| DiT-T/2 | 0.0004 |") >= 5  # the sweep's rows, from results.json alone

    def stop(cmd, log, deadline):
        stand_ins.append(cmd[1:])
        raise compare.OutOfBudget("stopped by the test")
    monkeypatch.setattr(compare, "run_command", stop)
    compare.main(compare.parse_args([*TINY, "--out", str(out), "--cfg-scales", "1,2,3"]))
    # a guidance scale more needs a checkpoint that is gone: a new run from scratch, in chunks
    # that end at evaluation points (their checkpoints are kept); the measurements stay
    cmd = stand_ins[0]
    assert "--model" in cmd and "--resume" not in cmd and cmd[cmd.index("--steps") + 1] == "3"
    record = results(out)["models"]["DiT-T/2"]
    assert record["evals"] == evals and record["retrained"] == 1
    assert record["chunks"] == []  # the gone run's chunks; the new run has none yet


def test_gpu_seconds_by_hand():
    metrics = [{"step": 50, "img_per_s": 10.0}, {"step": 100, "img_per_s": 100.0},
               {"step": 120, "img_per_s": 5.0}, {"step": 150, "img_per_s": 100.0}]
    # chunks started at 0 and 100: those intervals took 50 and 40 s with the start-up; the steady
    # ones 5 and 3 s, 0.1 s a step, at which the first ones are counted
    seconds, startup = compare.gpu_seconds(metrics, [0, 100], batch_size=10, gpus=2)
    assert seconds == pytest.approx({50: 10.0, 100: 20.0, 120: 24.0, 150: 30.0})
    assert startup == pytest.approx(2 * ((50 - 5) + (40 - 2)))
    assert compare.seconds_per_step(metrics, [0, 100], 10) == pytest.approx(0.1)


def test_chunks_fit_the_budget():
    # 60 s left, 20 s of them start-up, 0.1 s a step: 400 steps
    assert compare.chunk_end(100, 1000, 60, 0.1, 20) == 500
    assert compare.chunk_end(100, 300, 60, 0.1, 20) == 300
    assert compare.chunk_end(100, 1000, None, 0.1, 20) == 1000  # no budget
    assert compare.chunk_end(100, 1000, 60, None, 20) == 1000  # no measurement yet
    assert compare.chunk_end(100, 1000, 10, 0.1, 20) <= 100  # not even the start-up fits


def test_the_deadline_kills_a_command_and_stops_the_call(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(compare, "run_command", SUBPROCESS)
    start = time.time()
    assert not compare.run_command(["sleep", "30"], str(tmp_path / "log"), time.time() + 0.5)
    assert time.time() - start < 10
    # budget 0: the first training chunk is killed at once; the call ends cleanly, with a report
    compare.main(compare.parse_args([*TINY, "--out", str(tmp_path), "--budget-minutes", "0",
                                     "--stages", "curve,report"]))
    assert "budget spent (DiT-T/2: training stopped at the deadline, at step 0)" in \
        capsys.readouterr().out
    assert compare.run_folder(str(tmp_path), "DiT-T/2") is None
    assert os.path.exists(tmp_path / "report" / "table.md")


def test_safety_checkpoints_are_pruned(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    for step in (3, 500, 1000, 1200):
        (tmp_path / "checkpoints" / f"{step:07d}.pt").write_bytes(b"")
    compare.prune_checkpoints(str(tmp_path), keep=[3, 9375])
    # the evaluation point and the newest (a resume's) stay
    assert compare.checkpoint_steps(str(tmp_path)) == [3, 1200]


def test_sweep_settings_apply_where_they_can():
    args = compare.parse_args(["--sweep-samplers", "ddpm,ddim,dpm++,heun"])
    clips = ["none", "clip", "dynamic"]
    assert compare.sweep_settings(args, "DiMSUM-T/2") == [
        *[("ddim", c) for c in clips], *[("dpm++", c) for c in clips], ("heun", "none")]
    assert compare.sweep_settings(args, "DiT-T/2") == [(s, c) for s in ("ddpm", "ddim", "dpm++")
                                                       for c in clips]


def test_plot_and_ticks(tmp_path):
    assert compare.log_ticks(30, 1200) == [50, 100, 200, 500, 1000]
    path = tmp_path / "plot.png"
    compare.plot({"A": [(1e4, 200.0), (1e5, 50.0), (1e6, 10.0)], "B": [(3e4, 100.0)]},
                 "images seen", "FID", "title", path)
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape == (600, 900, 3)
    # log axes over [10^3.85, 10^6.15] x [10^0.85, 10^2.45] (0.15 decades of margin) in the frame
    # x 80..870, y 530..50: A's (1e5, 50) at the centre in x, B's (3e4, 100) by hand
    assert tuple(img[275, 475]) == compare.COLORS[0] and tuple(img[185, 295]) == compare.COLORS[1]
    for color in compare.COLORS[:2]:  # and each has its legend entry, top right
        assert (img[50:120, 700:760] == color).all(-1).sum() > 20


def test_bad_input(capsys):
    for argv, message in [(["--stages", "train,evaluate"], "choose from curve"),
                          (["--models", "DiT-S/2,DiQ-S/2"], "unknown model"),
                          (["--eval-at", "5,30"], "--eval-at must be in"),
                          (["--sampler", "heun"], "invalid choice"),
                          (["--sweep-samplers", "ddpm,plms"], "choose from ddpm"),
                          (["--budget-minutes", "-1"], "--budget-minutes must be >= 0")]:
        with pytest.raises(SystemExit):
            compare.parse_args(argv)
        assert message in capsys.readouterr().err
