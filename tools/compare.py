"""
A small, reproducible version of the papers' comparison: each model family at about DiT-S's size,
trained on class-conditional Fashion-MNIST 32x32 with one recipe for the same number of images,
10,000 samples with one sampler, FID (and KID) against the Fashion-MNIST test set.

    python -m tools.compare --data-dir /usr/share/datasets/fashion-mnist   # speed, train, sample, fid, table
    python -m tools.compare --stages table                                 # only reprint the table

Every stage skips what is already done, so an interrupted run continues where it stopped (trainings
resume from their last checkpoint). The five trainings, and then the five samplers, run as
concurrent processes on one GPU: these models are too small to fill a large GPU on their own. The
`speed` stage times each model alone, before the others start. Results land in --out: runs/
(train.py folders), samples/ (sample.py .npz and grid.png per model), speed.json, fid.json, and the
markdown table in table.md.
"""
import argparse
import json
import os
import subprocess
import sys

import torch

from diffusion import create_diffusion
from models import LATEST, ModelError, build_model, load_newest_checkpoint, resolve_model_name
from tools.bench import count_gmacs, median_time

# the repository: train.py, sample.py
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODELS = ["DiT-S/2", "DiM-S/2", "BiDiM-S/2", "DiMSUM-S/2", "LaMamba-S"]
# One recipe for all, so that only the architecture differs. A short run needs a short warm-up and
# EMA horizon (DiM's 5000-step warm-up and the 0.9999 EMA of all papers would leave the weights near
# their initialisation); betas and eps stay each model's own (train_defaults).
RECIPE = ["--lr", "2e-4", "--warmup", "50", "--ema", "0.99", "--grad-clip", "1.0", "--weight-decay",
          "0", "--label-dropout", "0.1"]
STAGES = ["speed", "train", "sample", "fid", "table"]  # in the order they run


def tag(name):
    return name.replace("/", "-")


def run_folder(out, name):
    """train.py's run folder for `name` under out/runs, or None before the first checkpoint."""
    root = os.path.join(out, "runs", tag(name))
    runs = sorted(d for d in os.listdir(root)) if os.path.isdir(root) else []
    runs = [os.path.join(root, d) for d in runs
            if os.path.isfile(os.path.join(root, d, "checkpoints", LATEST))]
    return runs[-1] if runs else None


def checkpoint_step(run):
    return load_newest_checkpoint(run)[0]["step"]


def run_all(commands, logs):
    """Start every command at once, wait for all; each writes to its log. Raises if any failed."""
    procs = []
    for cmd, log in zip(commands, logs):
        os.makedirs(os.path.dirname(log), exist_ok=True)
        print("$", " ".join(cmd), f"> {log}", flush=True)
        procs.append((subprocess.Popen(cmd, stdout=open(log, "a"), stderr=subprocess.STDOUT), log))
    failed = [log for p, log in procs if p.wait() != 0]
    if failed:
        raise SystemExit(f"failed: see {', '.join(failed)}")


@torch.no_grad()
def count_gflops(name):
    """Forward GMACs of one 32x32 image (DiT's 'GFLOPs'), the scan included (bench.count_gmacs)."""
    model = build_model(name, input_size=32, in_channels=1, num_classes=10)
    return count_gmacs(model, 32)[0], sum(p.numel() for p in model.parameters())


def stage_speed(args):
    """Training images/s of each model alone: batch as trained, bf16 autocast, random data, median
    of 3 timings of 3 steps."""
    path = os.path.join(args.out, "speed.json")
    speed = json.load(open(path)) if os.path.exists(path) else {}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    for name in args.models:
        if name in speed:
            continue
        torch.manual_seed(0)
        model = build_model(name, input_size=32, in_channels=1, num_classes=10).to(device)
        diffusion = create_diffusion(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x = torch.randn(args.batch_size, 1, 32, 32, device=device)
        y = torch.randint(0, 10, (args.batch_size,), device=device)

        def steps(n=3):
            for _ in range(n):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                    loss = diffusion.training_loss(model, x, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

        # the warm-up call compiles the Triton kernels and warms the allocator
        seconds = median_time(steps, warmup=1, repeats=3, cuda=cuda) / 3
        speed[name] = {"img_per_s": args.batch_size / seconds,
                       "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None,
                       "device": torch.cuda.get_device_name() if cuda else "CPU"}
        print(f"{name}: {speed[name]['img_per_s']:.0f} img/s on {speed[name]['device']}",
              flush=True)
        del model, opt, diffusion
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        json.dump(speed, open(path, "w"), indent=1)


def stage_train(args):
    commands, logs = [], []
    for name in args.models:
        run = run_folder(args.out, name)
        if run and checkpoint_step(run) >= args.steps:
            continue
        common = ["--steps", str(args.steps), "--ckpt-every", str(args.ckpt_every),
                  "--sample-every", "0", "--log-every", "50", "--num-workers",
                  "2"] + (["--data-dir", args.data_dir] if args.data_dir else [])
        if run:
            cmd = [os.path.join(ROOT, "train.py"), "--resume", run, *common]
        else:
            cmd = [os.path.join(ROOT, "train.py"), "--model", name, "--res", "32",
                   "--global-batch-size", str(args.batch_size), *RECIPE,
                   "--results-dir", os.path.join(args.out, "runs", tag(name)), *common]
        commands.append([sys.executable, *cmd])
        logs.append(os.path.join(args.out, "logs", f"train_{tag(name)}.log"))
    run_all(commands, logs)


def stage_sample(args):
    commands, logs = [], []
    for name in args.models:
        out = os.path.join(args.out, "samples", tag(name))
        if os.path.exists(os.path.join(out, "samples.npz")):
            continue
        run = run_folder(args.out, name)
        if run is None or checkpoint_step(run) < args.steps:
            raise SystemExit(f"{name} has not finished training ({args.steps} steps): run the "
                             "train stage first")
        commands.append([sys.executable, os.path.join(ROOT, "sample.py"), "--ckpt", run,
                         "--num-samples", str(args.num_samples),
                         "--sampler", args.sampler, "--steps", str(args.sample_steps), "--cfg",
                         str(args.cfg), "--format", "npz", "--batch-size", "1000", "--out", out])
        logs.append(os.path.join(args.out, "logs", f"sample_{tag(name)}.log"))
    run_all(commands, logs)


def stage_fid(args):
    import fid
    path = os.path.join(args.out, "fid.json")
    scores = json.load(open(path)) if os.path.exists(path) else {}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    network = fid.load_inception(fid.find_weights(args.weights), device)

    def stats(images, desc):
        batches = (images[i:i + 500] for i in range(0, len(images), 500))
        return fid.statistics(fid.compute_features(network, batches, device, len(images), desc),
                              keep_features=True)

    ref = stats(fid.load_dataset("fashion-mnist-test", args.data_dir), "test set")
    # The floor: 10k training images against the test set, i.e. the score of a perfect model at this
    # sample size.
    sources = {"Fashion-MNIST train (10k)": fid.load_dataset("fashion-mnist-train", args.data_dir)[:args.num_samples]}
    for name in args.models:
        npz = os.path.join(args.out, "samples", tag(name), "samples.npz")
        if name not in scores and os.path.exists(npz):
            sources[name] = fid.open_source(npz)[1]
    for name, images in sources.items():
        s = stats(images, name)
        k, k_std = fid.kid(s["features"], ref["features"])
        scores[name] = {"fid": fid.frechet_distance(s["mu"], s["sigma"], ref["mu"], ref["sigma"]),
                        "kid": k, "kid_std": k_std, "n": len(images)}
        print(f"{name}: FID {scores[name]['fid']:.2f}, KID {k:.4f} +- {k_std:.4f}", flush=True)
        json.dump(scores, open(path, "w"), indent=1)


def stage_table(args):
    speed = json.load(open(os.path.join(args.out, "speed.json")))
    scores = json.load(open(os.path.join(args.out, "fid.json")))
    lines = ["| model | params (M) | GFLOPs (32 px) | train img/s | FID 10k | KID x 1e3 |",
             "|---|---|---|---|---|---|"]
    for name in args.models:
        gflops, params = count_gflops(name)
        s, f = speed.get(name, {}), scores.get(name, {})
        lines.append(f"| {name} | {params / 1e6:.1f} | {gflops:.2f} | "
                     f"{s.get('img_per_s', float('nan')):.0f} | "
                     f"{f.get('fid', float('nan')):.1f} | {1e3 * f.get('kid', float('nan')):.1f} |")
    floor = scores.get("Fashion-MNIST train (10k)")
    if floor:
        lines.append(f"| real images (train) | | | | {floor['fid']:.1f} | {1e3 * floor['kid']:.1f} "
                     "|")
    device = next(iter(speed.values()), {}).get("device", "?")
    lines.append(f"\n{args.steps} steps x {args.batch_size} images; {args.num_samples} samples, {args.sampler} "
                 f"{args.sample_steps} steps, cfg {args.cfg}; speed on one {device}, bf16, batch "
                 f"{args.batch_size}.")
    table = "\n".join(lines)
    open(os.path.join(args.out, "table.md"), "w").write(table + "\n")
    print(table)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", default=",".join(STAGES),
                        help=f"comma-separated, from {', '.join(STAGES)}")
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                        help="comma-separated configs")
    parser.add_argument("--out", default="comparison")
    parser.add_argument("--data-dir", default=None, help="where Fashion-MNIST's .gz files are")
    parser.add_argument("--steps", type=int, default=600, help="training steps of every model")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--ckpt-every", type=int, default=100)
    parser.add_argument("--num-samples", type=int, default=10_000)
    parser.add_argument("--sampler", default="dpm++")
    parser.add_argument("--sample-steps", type=int, default=10)
    parser.add_argument("--cfg", type=float, default=1.0)
    parser.add_argument("--weights", default=None,
                        help="the FID Inception TorchScript file (see fid.py)")
    args = parser.parse_args(argv)
    args.models = args.models.split(",")
    try:
        for name in args.models:
            resolve_model_name(name)
    except ModelError as e:
        raise SystemExit(f"error: --models: {e}")
    unknown = set(args.stages.split(",")) - set(STAGES)
    if unknown:
        parser.error(f"unknown stage(s) {', '.join(sorted(unknown))}; choose from "
                     f"{', '.join(STAGES)}")
    return args


def main(args):
    os.makedirs(args.out, exist_ok=True)
    run = {"speed": stage_speed, "train": stage_train, "sample": stage_sample, "fid": stage_fid,
           "table": stage_table}
    for stage in STAGES:
        if stage in args.stages.split(","):
            print(f"== {stage}", flush=True)
            run[stage](args)


if __name__ == "__main__":
    main(parse_args())
