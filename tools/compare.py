"""
The five families compared on class-conditional Fashion-MNIST 32x32 (issue 20): each at about
DiT-S's size, trained with one recipe for --epochs (20), FID-10k and KID against the test set at
several points with the training GPU-seconds up to each, then a sweep over samplers and x0 clipping
at the last checkpoint and a guidance sweep at the best one.

    python -m tools.compare --data-dir /usr/share/datasets/fashion-mnist --budget-minutes 9
    python -m tools.compare --models DiT-S/2 --budget-minutes 9   # one family
    python -m tools.compare --stages report                       # only redraw the table and plots

Resumable: a call does what is not done yet, family by family (train to the next evaluation point,
evaluate it, ..., then the sweeps), and stops cleanly when --budget-minutes is spent: a training
chunk is sized from the run's measured speed to end inside the budget (killed at the deadline if
that estimate was wrong; it resumes from its last checkpoint, written every 2 minutes and at every
evaluation point), and an evaluation starts only if the family's previous ones say it fits. The
next call continues. What a call leaves:

  OUT/report/   results.json (every measurement and the settings: the part to keep), table.md,
                fid_vs_images.png, fid_vs_gpu_seconds.png, grid_<model>.png (its best setting)
  OUT/runs/     train.py run folders (checkpoints at the evaluation points and the newest)
  OUT/samples/  sample.py outputs (samples.npz, grid.png) per evaluation

OUT/report alone is enough to continue on another machine: the measurements are kept, and a family
whose remaining work needs a checkpoint is trained again (same recipe and seed) up to it.

GPU-seconds: the training time train.py measures itself (metrics.jsonl: images/s per log interval,
checkpoint writes excluded), times the number of GPUs. The first interval after each start also
holds process start, data loader start and compilation, one-off costs that a longer run pays once:
it is counted at the run's median speed instead (the excess is reported as startup seconds). Each
model trains alone on the GPU (concurrent runs would share it and blur each other's timing), on its
fastest path: bf16, the Triton scan and train.py's default compilation on a GPU (each Mamba
model's blocks, DiT whole).
"""
import argparse
import glob
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import fid
from diffusion import (CLIPPING_SAMPLERS, SAMPLERS, X0_CLIPS, FlowMatching, GaussianDiffusion,
                       create_diffusion)
from models import LATEST, ModelError, build_model, resolve_model_name
from sample import DEFAULT_X0_CLIP
from tools.bench import count_gmacs
from train import HelpFormatter

# the repository: train.py, sample.py
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODELS = ["DiT-S/2", "DiM-S/2", "BiDiM-S/2", "DiMSUM-S/2", "LaMamba-S"]
TRAIN_IMAGES = 60_000  # Fashion-MNIST's training set: one epoch
# One recipe for all, so that only the architecture differs: the (batch 128 by default, lr
# 2e-4, 100 warm-up steps, EMA 0.995). DiM's 5000 warm-up steps and the papers' 0.9999 EMA are made
# for ImageNet runs 100x longer: EMA 0.9999 would still be 39% initial weights after 20 epochs
# (9,375 steps). Betas and Adam's eps stay each model's own (train_defaults).
RECIPE = ["--lr", "2e-4", "--warmup", "100", "--ema", "0.995", "--grad-clip", "1.0",
          "--weight-decay", "0", "--label-dropout", "0.1"]
STAGES = ["curve", "sweep", "guidance", "report"]  # in the order they run for each family
# samplers every family has, for the curves (DiMSUM's flow has no ddpm)
COMMON_SAMPLERS = [s for s in GaussianDiffusion.samplers if s in FlowMatching.samplers]
LOG_EVERY = 50  # train.py's log interval, the resolution of the GPU-seconds
# start of a train.py process (loading, data, compilation) when the run has no measurement yet
STARTUP_GUESS_S = 90
# seconds of training a deadline kill may lose at most: the safety checkpoints' interval
SAFETY_S = 120


class OutOfBudget(Exception):
    """--budget-minutes is spent: stop here, the next call continues."""


def tag(name):
    return name.replace("/", "-")


#################################################################################
#                          State: results.json, run folders                     #
#################################################################################

def load_results(args):
    path = os.path.join(args.out, "report", "results.json")
    results = json.load(open(path)) if os.path.exists(path) else {"models": {}}
    results["settings"] = settings(args)
    for name in args.models:
        results["models"].setdefault(name, {"chunks": [], "evals": {}})
    return results


def save_results(args, results):
    """Written to a temporary file and renamed: a killed call never leaves half a results.json."""
    path = os.path.join(args.out, "report", "results.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(path + ".tmp", path)


def settings(args):
    return {"recipe": " ".join(RECIPE), "batch_size": args.batch_size, "epochs": args.epochs,
            "eval_epochs": args.eval_at, "sampler": args.sampler, "sample_steps": args.sample_steps,
            "x0_clip": args.x0_clip, "num_samples": args.num_samples,
            "sweep_samples": args.sweep_samples, "gpus": args.gpus,
            "compiled": "train.py default", "reference": "Fashion-MNIST test set (10,000 images)"}


def run_folder(out, name):
    """train.py's run folder for `name` under out/runs, or None before its first checkpoint."""
    root = os.path.join(out, "runs", tag(name))
    runs = sorted(os.listdir(root)) if os.path.isdir(root) else []
    runs = [os.path.join(root, d) for d in runs
            if os.path.isfile(os.path.join(root, d, "checkpoints", LATEST))]
    return runs[-1] if runs else None


def checkpoint_steps(run):
    """Steps of the run's numbered checkpoints, ascending ([] without a run)."""
    paths = glob.glob(os.path.join(run, "checkpoints", "[0-9]*.pt")) if run else []
    return sorted(int(os.path.basename(p)[:-3]) for p in paths)


def checkpoint_path(run, step):
    return os.path.join(run, "checkpoints", f"{step:07d}.pt")


def prune_checkpoints(run, keep):
    """Deletes the safety checkpoints once passed: all but the steps in `keep` (the evaluation
    points) and the newest, which a resume needs. A DiM-S/2 checkpoint is 0.8 GB."""
    steps = checkpoint_steps(run)
    for step in steps[:-1]:
        if step not in keep:
            os.remove(checkpoint_path(run, step))


def eval_steps(args):
    """The optimisation steps of the evaluation points (--eval-at epochs), ascending."""
    per_epoch = TRAIN_IMAGES / args.batch_size
    return sorted({max(1, round(e * per_epoch)) for e in args.eval_at})


#################################################################################
#                                 Time accounting                               #
#################################################################################

def read_metrics(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def intervals(metrics, chunk_starts, batch_size):
    """(step, steps, seconds, first) per logged interval (prev, step]: its steps, the training
    seconds train.py measured for them (steps * batch_size / img_per_s), and whether it is the first
    after a chunk start (train.py logs every LOG_EVERY steps and at a chunk's end, so a chunk starts
    on a logged step)."""
    out, prev = [], 0
    for m in metrics:
        n = m["step"] - prev
        out.append((m["step"], n, n * batch_size / m["img_per_s"],
                    any(prev <= s < m["step"] for s in chunk_starts)))
        prev = m["step"]
    return out


def seconds_per_step(metrics, chunk_starts, batch_size):
    """Median training seconds of one step over the intervals that hold no process start."""
    steady = [sec / n for _, n, sec, first in intervals(metrics, chunk_starts, batch_size)
              if not first and n]
    return statistics.median(steady) if steady else None


def gpu_seconds(metrics, chunk_starts, batch_size, gpus):
    """{step: training GPU-seconds up to it} at every logged step, and the startup seconds left out.

    The first interval after each chunk start also holds the process's one-off costs (start, data
    loader, compilation): it is counted at the run's median seconds per step instead."""
    per_step = seconds_per_step(metrics, chunk_starts, batch_size)
    total, startup, out = 0.0, 0.0, {}
    for step, n, sec, first in intervals(metrics, chunk_starts, batch_size):
        if first and per_step is not None:
            startup += sec - n * per_step
            sec = n * per_step
        total += sec
        out[step] = total * gpus
    return out, startup * gpus


#################################################################################
#                                    Training                                   #
#################################################################################

def run_command(cmd, log, deadline):
    """Runs cmd with its output appended to log; kills it (its whole process group: torchrun's
    workers too) at the deadline. Returns True if it finished in time, raises if it failed."""
    os.makedirs(os.path.dirname(log), exist_ok=True)
    print("$", " ".join(cmd), f"> {log}", flush=True)
    with open(log, "a") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=None if deadline is None else max(deadline - time.time(), 0))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return False
    if rc != 0:
        raise SystemExit(f"failed (exit code {rc}): see {log}")
    return True


def launcher(args):
    """python, or torchrun with one process per GPU."""
    if args.gpus == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={args.gpus}"]


def chunk_end(step, target, seconds_left, per_step, startup_s):
    """The step a training chunk from `step` should stop at: `target`, or as far as the time left
    allows at the run's measured seconds per step after the startup (without a budget or a
    measurement yet: target, and the deadline kills the chunk if it must)."""
    if seconds_left is None or per_step is None:
        return target
    return min(target, step + int((seconds_left - startup_s) / per_step))


def train_to(args, results, name, target, deadline):
    """Trains `name` up to step `target` in chunks (OutOfBudget when the budget ends first)."""
    record = results["models"][name]
    log = os.path.join(args.out, "logs", f"train_{tag(name)}.log")
    while True:
        run = run_folder(args.out, name)
        step = checkpoint_steps(run)[-1] if run else 0
        if step >= target:
            return run
        starts = [c["from"] for c in record["chunks"]]
        per_step = run and seconds_per_step(read_metrics(run), starts, args.batch_size)
        # startup measured on earlier chunks of this run (wall time minus training time)
        startups = [c["startup_s"] for c in record["chunks"] if "startup_s" in c]
        # a chunk ends at the next evaluation point, whose checkpoint the evaluations need
        stop = min([p for p in eval_steps(args) if p > step] + [target])
        end = chunk_end(step, stop, None if deadline is None else deadline - time.time(),
                        per_step, max(startups) if startups else STARTUP_GUESS_S)
        if end <= step:
            raise OutOfBudget(f"{name}: no time left to train on from step {step}")
        # a safety checkpoint every SAFETY_S of training (every epoch until the speed is known),
        # on a logged step (see intervals)
        every = TRAIN_IMAGES / args.batch_size if per_step is None else SAFETY_S / per_step
        every = LOG_EVERY * max(1, math.ceil(every / LOG_EVERY))
        common = ["--steps", str(end), "--ckpt-every", str(every), "--sample-every", "0",
                  "--log-every", str(LOG_EVERY)]
        common += ["--data-dir", args.data_dir] if args.data_dir else []
        common += ["--num-workers", str(args.num_workers)] if args.num_workers is not None else []
        if run:
            cmd = [os.path.join(ROOT, "train.py"), "--resume", run, *common]
        else:
            cmd = [os.path.join(ROOT, "train.py"), "--model", name, "--res", "32",
                   "--global-batch-size", str(args.batch_size), *RECIPE,
                   "--results-dir", os.path.join(args.out, "runs", tag(name)), *common]
        start = time.time()
        finished = run_command([*launcher(args), *cmd], log, deadline)
        run = run_folder(args.out, name)
        reached = checkpoint_steps(run)[-1] if run else 0
        chunk = {"from": step, "to": reached, "wall_s": time.time() - start}
        record["chunks"].append(chunk)
        per_step = run and seconds_per_step(read_metrics(run), starts + [step], args.batch_size)
        if finished and per_step:
            # what the chunk cost beyond its training steps: start, compilation, checkpoint writes
            chunk["startup_s"] = chunk["wall_s"] - (reached - step) * per_step
        if run:
            prune_checkpoints(run, eval_steps(args))
        save_results(args, results)
        if not finished:
            raise OutOfBudget(f"{name}: training stopped at the deadline, at step {reached}")


#################################################################################
#                                   Evaluation                                  #
#################################################################################

class Scorer:
    """FID and KID against the Fashion-MNIST test set; loads Inception and the reference features
    on first use (a call that only trains needs neither)."""

    def __init__(self, args):
        self.args, self.network, self.ref = args, None, None
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def features(self, images, desc):
        if self.network is None:
            self.network = fid.load_inception(fid.find_weights(self.args.weights), self.device)
        batches = (images[i:i + 500] for i in range(0, len(images), 500))
        return fid.compute_features(self.network, batches, self.device, len(images), desc)

    def score(self, images, desc):
        if self.ref is None:
            self.ref = fid.statistics(self.features(fid.load_dataset("fashion-mnist-test",
                                                                     self.args.data_dir),
                                                    "test set"), keep_features=True)
        s = fid.statistics(self.features(images, desc), keep_features=True)
        k, k_std = fid.kid(s["features"], self.ref["features"])
        return {"fid": fid.frechet_distance(s["mu"], s["sigma"], self.ref["mu"], self.ref["sigma"]),
                "kid": k, "kid_std": k_std}


def eval_key(step, sampler, x0_clip, cfg, steps, n):
    return f"step={step} {sampler} x0={x0_clip} cfg={cfg:g} steps={steps} n={n}"


def evaluate(args, results, scorer, name, step, sampler, x0_clip, cfg, n, deadline):
    """FID and KID of n samples of checkpoint `step` with one sampling setting; skipped when
    results.json has it. Returns its record."""
    record = results["models"][name]
    key = eval_key(step, sampler, x0_clip, cfg, args.sample_steps, n)
    if key in record["evals"]:
        return record["evals"][key]
    # on a fresh machine the checkpoint is gone: the run is trained again (see main)
    run = train_to(args, results, name, step, deadline)
    if step not in checkpoint_steps(run):
        raise SystemExit(f"{name}: {run} has trained past step {step} without keeping its "
                         f"checkpoint, which {key} needs; remove the run folder to train it again")
    # network evaluations of this setting, to scale the time of the family's previous evaluations
    cost = n * args.sample_steps * (2 if cfg != 1 else 1) * (2 if sampler == "heun" else 1)
    rates = [e["sample_s"] / e["cost"] for e in record["evals"].values()]
    if deadline is not None and rates and max(rates) * cost > deadline - time.time():
        raise OutOfBudget(f"{name}: no time left for the evaluation {key}")
    out = os.path.join(args.out, "samples", tag(name), key.replace(" ", "_").replace("=", ""))
    cmd = [os.path.join(ROOT, "sample.py"), "--ckpt", checkpoint_path(run, step),
           "--num-samples", str(n), "--sampler", sampler, "--steps", str(args.sample_steps),
           "--cfg", str(cfg), "--x0-clip", x0_clip, "--format", "npz", "--batch-size", "1000",
           "--out", out]
    start = time.time()
    if not run_command([*launcher(args), *cmd], os.path.join(args.out, "logs",
                                                             f"sample_{tag(name)}.log"), deadline):
        raise OutOfBudget(f"{name}: sampling for {key} stopped at the deadline")
    sample_s = time.time() - start
    images = np.load(os.path.join(out, "samples.npz"))["arr_0"]
    entry = {"step": step, "epoch": step * args.batch_size / TRAIN_IMAGES,
             "images": step * args.batch_size, "sampler": sampler, "x0_clip": x0_clip, "cfg": cfg,
             "steps": args.sample_steps, "n": n, **scorer.score(images, f"{name} {key}"),
             "sample_s": sample_s, "cost": cost, "grid": os.path.join(out, "grid.png")}
    print(f"{name} {key}: FID {entry['fid']:.2f}, KID {entry['kid']:.4f} +- {entry['kid_std']:.4f}",
          flush=True)
    record["evals"][key] = entry
    if str(n) not in results.setdefault("floor", {}):
        # the score of a perfect model at this sample size: n training images against the test set
        train = fid.load_dataset("fashion-mnist-train", args.data_dir)[:n]
        results["floor"][str(n)] = scorer.score(train, f"{n} training images")
    save_results(args, results)
    return entry


def sweep_settings(args, name):
    """(sampler, x0 clipping) pairs of the sweep that apply to this model: its objective's
    samplers, and clipping only where the sampler has an x0 prediction."""
    with torch.device("meta"):  # no memory, no init: only the class's objective is read
        model = build_model(name, input_size=32, in_channels=1)
    samplers = create_diffusion(model).samplers
    return [(s, c) for s in args.sweep_samplers if s in samplers
            for c in args.sweep_clips if c == "none" or s in CLIPPING_SAMPLERS]


def main_setting(args):
    return args.sampler, args.x0_clip, 1.0


def curve(record, args):
    """The main setting's evaluations at the evaluation points, by step."""
    sampler, x0_clip, cfg = main_setting(args)
    return sorted((e for e in record["evals"].values() if e["step"] in eval_steps(args)
                   and (e["sampler"], e["x0_clip"], e["cfg"], e["steps"], e["n"])
                   == (sampler, x0_clip, cfg, args.sample_steps, args.num_samples)),
                  key=lambda e: e["step"])


def best(entries):
    return min(entries, key=lambda e: e["fid"]) if entries else None


def run_family(args, results, scorer, name, deadline):
    """The stages of one family: train to each evaluation point and evaluate it, then the sweeps at
    the last checkpoint and the guidance sweep at the best."""
    record, points, stages = results["models"][name], eval_steps(args), args.stages
    sampler, x0_clip, cfg = main_setting(args)
    if "curve" in stages:
        for step in points:
            evaluate(args, results, scorer, name, step, sampler, x0_clip, cfg, args.num_samples,
                     deadline)
    final = points[-1]
    if final not in [e["step"] for e in curve(record, args)]:
        return  # the sweeps start from the curve's last point
    if "sweep" in stages:
        for s, c in sweep_settings(args, name):
            evaluate(args, results, scorer, name, final, s, c, cfg, args.sweep_samples, deadline)
    if "guidance" in stages:
        # the best checkpoint of the curve, with the best sampler and clipping at the last one
        at = best(curve(record, args))
        top = best([e for e in record["evals"].values() if e["step"] == final and e["cfg"] == 1
                    and e["n"] == args.sweep_samples]) or at
        record["guidance"] = {"step": at["step"], "sampler": top["sampler"],
                              "x0_clip": top["x0_clip"], "n": args.sweep_samples}
        for scale in args.cfg_scales:
            evaluate(args, results, scorer, name, at["step"], top["sampler"], top["x0_clip"],
                     scale, args.sweep_samples, deadline)


#################################################################################
#                                 Report and plots                              #
#################################################################################

COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14),
          (23, 190, 207), (140, 86, 75)]


def log_ticks(lo, hi):
    """1-2-5 ticks covering [lo, hi] on a log axis."""
    ticks, k = [], math.floor(math.log10(lo))
    while 10 ** k <= hi * 10:
        ticks += [m * 10 ** k for m in (1, 2, 5) if lo <= m * 10 ** k <= hi]
        k += 1
    return ticks


def tick_label(v):
    return f"{v:,.0f}" if v >= 1 else f"{v:g}"


def plot(series, xlabel, ylabel, title, path, size=(900, 600)):
    """Line plot of {label: [(x, y), ...]} on log-log axes, with 1-2-5 ticks and a legend, as PNG.
    Log axes: images seen and GPU-seconds span two decades, FID falls by one or two."""
    series = {k: [(x, y) for x, y in v if x > 0 and y > 0] for k, v in series.items()}
    series = {k: v for k, v in series.items() if v}
    W, H = size
    img = Image.new("RGB", size, "white")
    draw, font = ImageDraw.Draw(img), ImageFont.load_default(size=14)  # Pillow >= 10.1
    left, right, top, bottom = 80, W - 30, 50, H - 70
    draw.text((W // 2, 20), title, fill="black", font=font, anchor="mm")
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text(((left + right) // 2, H - 25), xlabel, fill="black", font=font, anchor="mm")
    draw.text((10, (top + bottom) // 2), ylabel, fill="black", font=font, anchor="lm")
    if not series:
        draw.text(((left + right) // 2, (top + bottom) // 2), "no measurements yet", fill="black",
                  font=font, anchor="mm")
        img.save(path)
        return
    xs = [x for v in series.values() for x, _ in v]
    ys = [y for v in series.values() for _, y in v]
    # half a decade of margin on each side, so single points are not on the frame
    (x0, x1), (y0, y1) = [(math.log10(min(v)) - 0.15, math.log10(max(v)) + 0.15) for v in (xs, ys)]
    px = lambda x: left + (math.log10(x) - x0) / (x1 - x0) * (right - left)
    py = lambda y: bottom - (math.log10(y) - y0) / (y1 - y0) * (bottom - top)
    for t in log_ticks(10 ** x0, 10 ** x1):
        draw.line([px(t), bottom, px(t), bottom + 5], fill="black")
        draw.line([px(t), top, px(t), bottom], fill=(230, 230, 230))
        draw.text((px(t), bottom + 8), tick_label(t), fill="black", font=font, anchor="mt")
    for t in log_ticks(10 ** y0, 10 ** y1):
        draw.line([left - 5, py(t), left, py(t)], fill="black")
        draw.line([left, py(t), right, py(t)], fill=(230, 230, 230))
        draw.text((left - 8, py(t)), tick_label(t), fill="black", font=font, anchor="rm")
    draw.rectangle([left, top, right, bottom], outline="black")
    for i, (label, points) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        xy = [(px(x), py(y)) for x, y in sorted(points)]
        if len(xy) > 1:
            draw.line(xy, fill=color, width=2)
        for x, y in xy:
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=color)
        # legend, top right
        ly = top + 12 + 18 * i
        draw.line([right - 150, ly, right - 125, ly], fill=color, width=3)
        draw.text((right - 118, ly), label, fill="black", font=font, anchor="lm")
    img.save(path)


def fmt(v, spec=".1f"):
    return "-" if v is None else format(v, spec)


def write_report(args, results):
    report = os.path.join(args.out, "report")
    os.makedirs(report, exist_ok=True)
    points, models = eval_steps(args), args.models
    lines = ["| model | params (M) | GFLOPs (32 px) | train img/s | GPU-s to "
             f"{args.epochs:g} epochs | "
             + " | ".join(f"FID @ {s * args.batch_size / TRAIN_IMAGES:g} ep" for s in points)
             + " | KID x 1e3 (last) | best: sampler, x0, cfg -> FID |",
             "|---" * (7 + len(points)) + "|"]
    by_images, by_seconds = {}, {}
    for name in models:
        record = results["models"][name]
        run = run_folder(args.out, name)
        seconds = {}
        if run:
            starts, metrics = [c["from"] for c in record["chunks"]], read_metrics(run)
            seconds, record["startup_s"] = gpu_seconds(metrics, starts, args.batch_size, args.gpus)
            per_step = seconds_per_step(metrics, starts, args.batch_size)
            record["img_per_s"] = per_step and args.batch_size / per_step
        for e in record["evals"].values():
            e["gpu_s"] = seconds.get(e["step"], e.get("gpu_s"))
        if "params" not in record:
            record["gflops"], record["params"] = count_gflops(name)
        done = {e["step"]: e for e in curve(record, args)}
        by_images[name] = [(e["images"], e["fid"]) for e in done.values()]
        by_seconds[name] = [(e["gpu_s"], e["fid"]) for e in done.values() if e.get("gpu_s")]
        top = best(list(record["evals"].values()))
        last = done.get(points[-1])
        lines.append(f"| {name} | {record['params'] / 1e6:.1f} | {record['gflops']:.2f} | "
                     f"{fmt(record.get('img_per_s'), '.0f')} | "
                     f"{fmt(seconds.get(points[-1]), '.0f')} | "
                     + " | ".join(fmt(done[s]["fid"] if s in done else None) for s in points)
                     + f" | {fmt(last and 1e3 * last['kid'])} | "
                     + (f"{top['sampler']}, {top['x0_clip']}, {top['cfg']:g} (ep "
                        f"{top['epoch']:g}) -> {top['fid']:.1f} |" if top else "- |"))
        if top and os.path.exists(top["grid"]):
            shutil.copy(top["grid"], os.path.join(report, f"grid_{tag(name)}.png"))
    sampler, x0_clip, _ = main_setting(args)
    lines.append(f"\nTraining: {' '.join(RECIPE)}, batch {args.batch_size}, {args.gpus} GPU(s). "
                 f"Curves: {args.num_samples} samples, {sampler} {args.sample_steps} steps, x0 "
                 f"clipping {x0_clip}, no guidance; FID and KID against the 10,000 test images.")
    retrained = [f"{name} ({results['models'][name]['retrained']}x)" for name in models
                 if results["models"][name].get("retrained")]
    if retrained:
        lines.append(f"Trained again on a new machine for later stages (same recipe and seed): "
                     f"{', '.join(retrained)}.")
    floor = results.get("floor", {}).get(str(args.num_samples))
    if floor:
        lines.append(f"Real images ({args.num_samples} of the training set) against the test set: "
                     f"FID {floor['fid']:.1f}, KID x 1e3 {1e3 * floor['kid']:.1f}.")
    sweeps = [("Samplers and x0 clipping at the last checkpoint, no guidance",
               lambda e, g: e["step"] == points[-1] and e["cfg"] == 1
               and e["n"] == args.sweep_samples),
              ("Guidance at each family's best checkpoint, with its best sampler and clipping",
               lambda e, g: g is not None and all(e[k] == g[k] for k in g))]
    for title, pick in sweeps:
        lines += ["", f"{title} ({args.sweep_samples} samples each):", "",
                  "| model | epoch | sampler | x0 clipping | cfg | FID | KID x 1e3 |",
                  "|---|---|---|---|---|---|---|"]
        for name in models:
            record = results["models"][name]
            chosen = [e for e in record["evals"].values() if pick(e, record.get("guidance"))]
            for e in sorted(chosen, key=lambda e: (e["sampler"], e["x0_clip"], e["cfg"])):
                lines.append(f"| {name} | {e['epoch']:g} | {e['sampler']} | {e['x0_clip']} | "
                             f"{e['cfg']:g} | {e['fid']:.1f} | {1e3 * e['kid']:.1f} |")
    table = "\n".join(lines) + "\n"
    open(os.path.join(report, "table.md"), "w").write(table)
    plot(by_images, "images seen", "FID", "FID-10k against images seen (log-log)",
         os.path.join(report, "fid_vs_images.png"))
    plot(by_seconds, f"training GPU-seconds ({args.gpus} GPU(s), fastest path)", "FID",
         "FID-10k against training GPU-seconds (log-log)",
         os.path.join(report, "fid_vs_gpu_seconds.png"))
    save_results(args, results)
    print(table)


@torch.no_grad()
def count_gflops(name):
    """Forward GMACs of one 32x32 image (DiT's 'GFLOPs'), the scan included (bench.count_gmacs), and
    the parameter count."""
    model = build_model(name, input_size=32, in_channels=1, num_classes=10)
    return count_gmacs(model, 32)[0], sum(p.numel() for p in model.parameters())


#################################################################################
#                                      Main                                     #
#################################################################################

def comma_list(kind, choices=None):
    def parse(text):
        items = [kind(v) for v in text.split(",") if v]
        bad = [v for v in items if choices is not None and v not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(choices)}"
                                             if choices else f"{text!r}: an empty list")
        return items
    return parse


def parse_args(argv=None):
    # string defaults go through `type` too (argparse), and --help shows them as typed
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--models", type=comma_list(str), default=",".join(DEFAULT_MODELS),
                        help="comma-separated configs, run in this order")
    parser.add_argument("--stages", type=comma_list(str, STAGES), default=",".join(STAGES),
                        help="comma-separated, from these")
    parser.add_argument("--out", default="comparison", help="where everything goes")
    parser.add_argument("--data-dir", default=None, help="where Fashion-MNIST's .gz files are")
    parser.add_argument("--budget-minutes", type=float, default=None,
                        help="stop starting work that would not end within this many minutes "
                        "(default: no limit)")
    parser.add_argument("--epochs", type=float, default=20, help="training length of every model")
    parser.add_argument("--eval-at", type=comma_list(float), default="1,2,5,10",
                        help="epochs with an FID measurement (the last epoch always has one)")
    parser.add_argument("--batch-size", type=int, default=128, help="global batch size")
    parser.add_argument("--gpus", type=int, default=1,
                        help="processes (GPUs) per training and sampling run, through torchrun")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="train.py's data loader processes (default: train.py's)")
    parser.add_argument("--num-samples", type=int, default=10_000, help="samples per FID of the "
                        "curves")
    parser.add_argument("--sweep-samples", type=int, default=10_000,
                        help="samples per FID of the sweeps (fewer: cheaper, and comparable "
                        "within a sweep only)")
    parser.add_argument("--sampler", choices=COMMON_SAMPLERS, default="dpm++",
                        help="sampler of the FID curves (one that every family has)")
    parser.add_argument("--sample-steps", type=int, default=20, help="steps of every sampler")
    parser.add_argument("--x0-clip", choices=X0_CLIPS, default=DEFAULT_X0_CLIP["pixels"],
                        help="x0 clipping of the FID curves (sample.py's pixel-space default)")
    parser.add_argument("--sweep-samplers", type=comma_list(str, SAMPLERS),
                        default="ddpm,ddim,dpm++,heun",
                        help="samplers of the sweep at the last checkpoint (each where the model's "
                        "objective has it)")
    parser.add_argument("--sweep-clips", type=comma_list(str, X0_CLIPS), default=",".join(X0_CLIPS),
                        help="x0 clipping modes of the sweep (each where the sampler takes it)")
    parser.add_argument("--cfg-scales", type=comma_list(float), default="1,1.5,2,3,4",
                        help="guidance scales at each family's best checkpoint and sampler")
    parser.add_argument("--weights", default=None,
                        help="the FID Inception TorchScript file (see fid.py)")
    args = parser.parse_args(argv)
    try:
        args.models = [resolve_model_name(m) for m in args.models]
    except ModelError as e:
        parser.error(str(e))
    for flag, ok, what in [("--epochs", args.epochs > 0, "> 0"),
                           ("--batch-size", args.batch_size >= 1, ">= 1"),
                           ("--gpus", args.gpus >= 1, ">= 1"),
                           ("--num-samples", args.num_samples >= 2, ">= 2 (a covariance)"),
                           ("--sweep-samples", args.sweep_samples >= 2, ">= 2 (a covariance)"),
                           ("--sample-steps", args.sample_steps >= 1, ">= 1"),
                           ("--budget-minutes", args.budget_minutes is None
                            or args.budget_minutes >= 0, ">= 0"),
                           ("--eval-at", all(0 < e <= args.epochs for e in args.eval_at),
                            f"in (0, --epochs {args.epochs:g}]")]:
        if not ok:
            parser.error(f"{flag} must be {what}")
    args.eval_at = sorted(set(args.eval_at) | {args.epochs})
    return args


def main(args):
    deadline = None if args.budget_minutes is None else time.time() + 60 * args.budget_minutes
    results = load_results(args)
    scorer = Scorer(args)
    try:
        for name in args.models:
            if set(args.stages) == {"report"}:
                break
            record = results["models"][name]
            if run_folder(args.out, name) is None and record["chunks"]:
                # A fresh machine: the checkpoints are gone. The measurements stay, and work left
                # that needs a checkpoint trains the run again (same recipe and seed; on a GPU not
                # bit for bit the same weights, whose scan backward adds atomically).
                record["chunks"], record["retrained"] = [], record.get("retrained", 0) + 1
            print(f"== {name}", flush=True)
            run_family(args, results, scorer, name, deadline)
    except OutOfBudget as e:
        print(f"budget spent ({e}); run the same command again to continue", flush=True)
    finally:
        save_results(args, results)
    if "report" in args.stages:
        write_report(args, results)
    return results


if __name__ == "__main__":
    main(parse_args())
