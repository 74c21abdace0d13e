"""
Train a Diffusion Mamba image generator (DiM first) on Fashion-MNIST, a folder of images, or VAE
latents.

    python train.py --model dim             # a quickstart: sized for the machine, ends in --minutes
    python train.py --model dim --steps 20000                          # one process (GPU if there is one)
    torchrun --nproc_per_node=8 train.py --model DiM-L/2 --data /data/imagenet/train --res 256 \
        --vae stabilityai/sd-vae-ft-ema --global-batch-size 1024
    python train.py --resume results/000-DiM-S-2 --steps 40000         # continue exactly where it stopped

The training recipe (optimiser settings, warm-up, EMA, label dropout) defaults to the model's
`train_defaults`, and the noise schedule and time offset come from the model class, so one script
trains every model family.
"""
import argparse
import errno
import fcntl
import itertools
import json
import math
import os
import random
import re
import socket
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager, nullcontext
from copy import deepcopy

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from data import (FASHION_MNIST_DIR, DataError, build_dataset, build_video_dataset,
                  check_resolution, load_vae, save_frame_strip, save_gif, save_grid, vae_decode,
                  vae_encode, vae_factor)
from diffusion import create_diffusion
from dim import DiM
from models import (LATEST, ModelError, build_model, check_finite_weights, checkpoint_blocks,
                    checkpoint_folder, compile_blocks, compile_choice, cuda_graph,
                    init_from_checkpoint, load_newest_checkpoint, resolve_model_name, takes_clips)


class DivergedError(RuntimeError):
    """The loss became non-finite: training stops before any checkpoint holds the broken weights."""


class FlagError(ValueError):
    """A command-line value that cannot work; the message names the flag and what it must be."""


class RunError(RuntimeError):
    """The run cannot go on where it is: its folder is in use by another run, full or read-only,
    or its torchrun launcher is gone. The message says what to do."""


RESULTS_DIR = "results"  # where new run folders go, and where sample.py looks for the newest
HYPERPARAMETERS = ("lr", "weight_decay", "warmup", "grad_clip", "label_dropout", "ema")
# Flags that only steer the run; on --resume, the ones given on the command line replace the stored
# ones. All other settings come from the checkpoint, so the continued run trains exactly as the
# first one did.
# num_workers: the machine's, not the checkpoint's (see train); at most one fewer than the cores
# this process may use, so the loader workers leave the main process a core (PyTorch warns beyond
# that).
RUN_CONTROL = dict(steps=None, ckpt_every=10_000, sample_every=5_000, log_every=100,
                   keep_last=0, num_workers=min(4, len(os.sched_getaffinity(0)) - 1),
                   compile="auto", grad_checkpoint=False, cuda_graph="auto", data_dir=None)
# The quickstart: a new run without --steps trains for --minutes and ends, sized for the machine.
# On a GPU the family's default config; on a CPU its tiny config at 16 px, batch 32 (DiM-T/2 trains
# at ~20 images/s on 2 cores, 3x slower at 32 px: too few steps in 30 minutes to learn garments).
QUICKSTART = {"cuda": dict(minutes=10),
              "cpu": dict(minutes=30, res=16, global_batch_size=32, lr=1e-3,
                          models={"dim": "DiM-T/2", "bidim": "BiDiM-T/2", "dimsum": "DiMSUM-T/2",
                                  "lamamba": "LaMamba-T", "dit": "DiT-T/2"})}
PLANNED = ("steps", "ckpt_every", "sample_every", "log_every")  # a quickstart's, from its timing
GRIDS_PER_RUN = 6  # a quickstart's grids: one every 1/6 of its time, and at steps 0 and end


#################################################################################
#                             Training Helper Functions                         #
#################################################################################

@torch.no_grad()
def update_ema(ema, model, decay):
    # one multi-tensor kernel for all weights, not one launch per weight (the model's are fp32)
    torch._foreach_lerp_(list(ema.parameters()), [p.float() for p in model.parameters()], 1 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def setup_distributed():
    """nanoGPT's rule: DDP only when torchrun set RANK, so the same script also runs as one plain
    process."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return rank, world, device


def get_rng_state():
    """Every RNG this process draws from; a resumed run restores them so it continues the same
    random streams."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "python": random.getstate(), "numpy": (kind, keys.tolist(), pos, has_gauss, gauss)}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start part-way through an epoch, so a resumed run gets exactly
    the batches the uninterrupted run would have got, without loading the skipped ones."""
    start = 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self):
        return self.num_samples - self.start


def plan_run(args, fitted, recipe, seconds_left, step_s, grid_s):
    """Size a quickstart to the seconds left of its --minutes: as many steps of step_s as fit, with a
    5% margin, beside its sample grids (one every 1/GRIDS_PER_RUN of the steps and one at the end,
    each taking grid_s as the step-0 grid did). A checkpoint at every grid, so a stopped run resumes;
    warm-up and EMA fitted to the steps."""
    grids = GRIDS_PER_RUN if args.sample_every != 0 else 0
    args.steps = max(1, int(0.95 * (seconds_left - grids * grid_s) / step_s))
    space_grids(args, [k for k in ("sample_every", "ckpt_every") if getattr(args, k) is None])
    if args.log_every is None:
        args.log_every = max(1, min(100, args.steps // 100))
    fit_to_length(args, fitted, recipe)


def space_grids(args, fitted):
    """A quickstart's grids and checkpoints, those in `fitted`: one every 1/GRIDS_PER_RUN of its steps,
    spaced again whenever its steps are planned again (the first plan, timed on a step that may hold
    compilation, can be far off)."""
    for k in ("sample_every", "ckpt_every"):
        if k in fitted:
            setattr(args, k, math.ceil(args.steps / GRIDS_PER_RUN))


def fit_to_length(args, fitted, recipe):
    """Warm-up and EMA that suit the run's length, for those in `fitted` (not given on the command
    line): the recipe's value, but a warm-up of at most 5% of the steps and an EMA horizon
    (1 / (1 - decay) steps) of at most a tenth of them, so a short run trains at its full learning
    rate for most of its steps and its EMA weights are not still the initial ones. (DiM's 5000
    warm-up steps and 0.9999 decay are exactly these fractions of a 100k-step run.)"""
    if "warmup" in fitted:
        args.warmup = min(recipe["warmup"], args.steps // 20)
    if "ema" in fitted:
        args.ema = min(recipe["ema"], max(0.0, 1 - 10 / args.steps))


def seconds_per_step(model, diffusion, shape, num_classes, device, autocast):
    """Median time of a training step (forward, backward, AdamW) of a copy of the model on a random
    batch of the run's shape, after one untimed step. The run's weights, optimizer and random
    streams are untouched."""
    net, times = deepcopy(model).train(), []
    opt = torch.optim.AdamW(net.parameters(), fused=device.type == "cuda")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        x = torch.randn(shape, device=device)
        y = torch.randint(0, num_classes, shape[:1], device=device) if num_classes else None
        for _ in range(4):
            t0 = time.perf_counter()
            with autocast:
                loss = diffusion.training_loss(net, x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


#################################################################################
#                      Flags, run folders, locks and writes                     #
#################################################################################

def positive(v):
    return v >= 1


def at_least_zero(v):
    return v >= 0


def finite_at_least_zero(v):
    return math.isfinite(v) and v >= 0


# flag: (test, what the value must be); None (the model's default) always passes
FLAG_RULES = {
    "res": (positive, "a positive number of pixels"),
    "steps": (positive, ">= 1"),
    "minutes": (lambda v: math.isfinite(v) and v > 0, "a finite number of minutes > 0"),
    "lr": (lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    "weight_decay": (finite_at_least_zero, "a finite number >= 0"),
    "warmup": (at_least_zero, ">= 0"),
    "grad_clip": (finite_at_least_zero, "a finite number >= 0 (0 = off)"),
    "label_dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),  # NaN fails every comparison
    "ema": (lambda v: 0 <= v <= 1, "an EMA decay per step in [0, 1]"),
    "ckpt_every": (at_least_zero, ">= 0 (0 = only at the end)"),
    "sample_every": (at_least_zero, ">= 0 (0 = never)"),
    "log_every": (positive, ">= 1"),
    "keep_last": (at_least_zero, ">= 0 (0 = keep all)"),
    "num_workers": (at_least_zero, ">= 0"),
}


def check_flags(args, world):
    """Refuse values that cannot work before any data or model is built, one line each."""
    rules = {**FLAG_RULES, "global_batch_size": (lambda v: v >= 1 and v % world == 0,
                                                 f"a positive multiple of the number of "
                                                 f"processes ({world})")}
    if args.video:
        rules["frames"] = (positive, ">= 1")
    for name, (ok, what) in rules.items():
        value = getattr(args, name)
        if value is not None and not ok(value):
            raise FlagError(f"--{name.replace('_', '-')} {value} cannot work: it must be {what}")


def cannot_write(folder, e, flag):
    """A RunError naming the folder a write failed in and why, in words, with the fix. (torch's
    own message for a failed torch.save gives no hint of either.)"""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        why, fix = "its disk is full", "free space there"
    elif e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        why, fix = "it is read-only", "make it writable"
    else:
        why, fix = "the write failed", "check the folder and its disk"
    return RunError(f"cannot write to {folder}: {why} ({e.strerror or e}); {fix} or pass another "
                    f"{flag}")


@contextmanager
def writing_to(folder, flag="--results-dir"):
    """Turn a failed write (full disk, read-only folder...) into one line naming the folder; flag:
    the option that chooses another folder."""
    try:
        yield
    except OSError as e:
        raise cannot_write(folder, e, flag) from None


def check_writable(folder, flag="--results-dir"):
    """Fail now, not after building the data and the model or sampling, when nothing could be
    written to folder."""
    with writing_to(folder, flag):
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder) as f:
            f.write(b"probe")
            f.flush()
            os.fsync(f.fileno())


def write_atomically(path, write):
    """write(file) into a temporary file, synced, then renamed over path: a crash leaves the old
    file or the new one, never half of one."""
    try:
        with open(path + ".tmp", "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        if os.path.exists(path + ".tmp"):  # no half-written file left to fill the disk
            os.remove(path + ".tmp")
        raise
    os.replace(path + ".tmp", path)


def lock_run_dir(run_dir):
    """Hold run_dir/lock while this process trains there, so a second --resume of the run (a
    relaunch while the first still lives) stops instead of writing into the same files. An flock:
    the kernel drops it when its process dies, however it dies, so a killed run never blocks the
    next --resume. The file names the holder, for the message. Returns the release function."""
    path = os.path.join(run_dir, "lock")
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise RunError(f"{run_dir} is in use: {holder} is training it; stop that process first (or "
                       "let it finish) rather than resume the run twice") from None
    except OSError as e:  # a file system without locks (some network mounts)
        print(f"warning: cannot lock {path} ({e.strerror}); make sure no other process trains in "
              f"{run_dir}")
    f.seek(0)
    previous = f.read().strip()
    if previous:  # a clean exit empties the file: this holder was killed or crashed
        print(f"note: took over {path} from {previous}, which is no longer running")
    f.truncate(0)
    f.write(f"process {os.getpid()} on {socket.gethostname()}\n")
    f.flush()

    def release():
        f.truncate(0)
        f.close()
    return release


def save_checkpoint(state, ckpt_dir, world, master, keep_last):
    """Collective: every rank's RNG states go into the checkpoint, rank 0 writes it, then all ranks
    wait. Written to a temporary file, synced and renamed, so a crash never leaves a half-written
    checkpoint; then checkpoints/latest (a one-line file, replaced the same way) names it, and
    older checkpoints beyond the keep_last newest are deleted (0: keep all)."""
    rng = [None] * world
    if world > 1:
        dist.all_gather_object(rng, get_rng_state())
    else:
        rng[0] = get_rng_state()
    if master:
        name = f"{state['step']:07d}.pt"
        with writing_to(ckpt_dir):
            write_atomically(os.path.join(ckpt_dir, name),
                             lambda f: torch.save({**state, "rng": rng}, f))
            write_atomically(os.path.join(ckpt_dir, LATEST),
                             lambda f: f.write(f"{name}\n".encode()))
            if keep_last:
                # only older steps: checkpoints past this one (a run resumed from an earlier
                # checkpoint) are another branch of the run, not this one's to delete
                older = sorted(n for n in os.listdir(ckpt_dir)
                               if re.fullmatch(r"\d{7}\.pt", n) and n < name)
                for old in older[:max(0, len(older) - (keep_last - 1))]:
                    os.remove(os.path.join(ckpt_dir, old))
        tqdm.write(f"saved checkpoint {os.path.join(ckpt_dir, name)}")
    if world > 1:
        dist.barrier()


def new_run_dir(results_dir, model_name, world, master):
    """DiT's results/<index>-<model> folder; rank 0 picks the index and tells the others."""
    name = [None]
    if master:
        with writing_to(results_dir):
            os.makedirs(results_dir, exist_ok=True)
            # the next index after every existing one, created atomically: a deleted older run or
            # a second run starting at the same time never makes two runs share a folder
            taken = [int(d.split("-")[0]) for d in os.listdir(results_dir)
                     if d.split("-")[0].isdigit()]
            index = max(taken, default=-1) + 1
            while True:
                path = os.path.join(results_dir, f"{index:03d}-{model_name.replace('/', '-')}")
                try:
                    os.makedirs(path)
                    break
                except FileExistsError:
                    index += 1
        name[0] = path
    if world > 1:
        dist.broadcast_object_list(name)
    return name[0]


def resumed_run_dir(path):
    """The run folder a --resume of `path` continues in: the folder itself, or the run folder of a
    checkpoint inside its checkpoints/; None for a checkpoint elsewhere (a new run folder then)."""
    folder = checkpoint_folder(path) or os.path.dirname(os.path.abspath(path))
    if os.path.basename(os.path.normpath(folder)) == "checkpoints":
        return os.path.dirname(os.path.abspath(folder))
    return None


def batches(loader, sampler, epoch, batch_in_epoch):
    """Endless (epoch, batches done in it, x, y); each epoch reshuffled, the first one entered at
    batch_in_epoch."""
    while True:
        sampler.set_epoch(epoch)
        sampler.start = batch_in_epoch * loader.batch_size
        for x, y in loader:
            batch_in_epoch += 1
            yield epoch, batch_in_epoch, x, y
        epoch, batch_in_epoch = epoch + 1, 0


class NetworkCalls:
    """Stands in for the model in diffusion.sample and counts its evaluations, advancing `bar` if
    given (the samplers know nothing of progress). dry=True returns zeros instead of running the
    model, so one sample's sampling costs next to nothing and gives the exact count, which depends
    on the sampler, the steps, Upsample Guidance's window and the tiles: a progress bar's total."""

    def __init__(self, model, bar=None, dry=False):
        self.model, self.bar, self.dry, self.calls = model, bar, dry, 0

    def __call__(self, x, t, y=None):
        out = torch.zeros_like(x) if self.dry else self.model(x, t, y)
        self.calls += 1
        if self.bar is not None:
            self.bar.update(1)
        return out

    def __getattr__(self, name):  # patch_size, num_classes, ...: the model's
        return getattr(self.model, name)


# Guidance of the progress grids: 4, the scale DiT's sample.py shows its samples at (its FID is
# measured at 1.5, sample.py's default here)
GRID_CFG = 4.0


@torch.no_grad()
def save_samples(ema, diffusion, vae, shape, num_classes, path, device, seed, autocast):
    """A grid from the EMA model: one column per class (first 10), few DPM-Solver++ steps, fixed
    noise, guidance scale GRID_CFG."""
    # own generator: sampling must not move the training RNG
    g = torch.Generator(device).manual_seed(seed)
    k = min(num_classes, 10)
    # clips: one row, each is a whole sequence of frames; images: 4 per class (on a CPU ~18 s, the
    # time of ~35 steps of the quickstart: 2 per class undersold what its model draws)
    rows = 1 if len(shape) == 4 else 4
    y = torch.arange(k, device=device).repeat(rows) if k else None
    noise = torch.randn(rows * k if k else 4 * rows, *shape, device=device, generator=g)

    def run(net, noise, y, generator):
        return diffusion.sample(net, noise, y, sampler=diffusion.default_sampler, steps=25,
                                cfg_scale=GRID_CFG if k else 1.0, null_label=num_classes,
                                generator=generator)
    dry = NetworkCalls(ema, dry=True)
    run(dry, noise[:1], y if y is None else y[:1], torch.Generator(device))
    # minutes on a CPU: a bar below the training one, cleared when done
    with tqdm(total=dry.calls, desc=f"sample grid {os.path.basename(path)}", unit="forward",
              leave=False, dynamic_ncols=True) as bar, autocast:
        x = run(NetworkCalls(ema, bar), noise, y, g)
    if vae is not None:
        x = vae_decode(vae, x.float())
    if x.ndim == 5:  # clips: an animated GIF (a grid of clips) and a frame strip
        save_gif(x.float(), path.replace(".png", ".gif"), nrow=k or None)
        save_frame_strip(x.float()[:8], path)
    else:
        save_grid(x, path, nrow=k or None)


#################################################################################
#                                  Training Loop                                #
#################################################################################

def write_args(run_dir, args):
    with writing_to(run_dir), open(os.path.join(run_dir, "args.json"), "w") as f:
        json.dump(vars(args), f, indent=2)


def prepare_run_dir(run_dir, args, metrics_path, step):
    """Folders, args.json for humans, and metrics.jsonl cut back to the resumed step."""
    os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
    os.makedirs(os.path.join(run_dir, "samples"), exist_ok=True)
    write_args(run_dir, args)
    if not os.path.exists(metrics_path):
        return
    with open(metrics_path) as f:
        lines = [line for line in f if line.strip()]
    # a kill during an append leaves a torn last line: drop it (the steps after the checkpoint
    # are dropped anyway)
    try:
        json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        print(f"note: dropped a torn last line of {metrics_path}")
        lines = lines[:-1]
    # drop lines a crashed run logged after its last checkpoint
    lines = [line for line in lines if json.loads(line)["step"] <= step]
    with open(metrics_path, "w") as f:
        f.writelines(lines)


def check_health(bad_step, launcher, world, lr):
    """Collective (a sync, so not every step): stop every rank together if any rank's loss went
    non-finite or lost its torchrun launcher. Nothing has been written since the last check, so
    the last checkpoint stays good."""
    # the launcher is each worker's parent: when it dies (SIGKILL gives it no chance to stop
    # the workers), the workers are re-parented, and nothing would ever stop them
    orphaned = launcher is not None and os.getppid() != launcher
    flags = torch.stack([bad_step, torch.tensor(int(orphaned), device=bad_step.device)])
    if world > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    bad, orphaned = flags.tolist()
    if orphaned:
        raise RunError("the torchrun launcher of this run is gone, so these workers stop here (the "
                       "last checkpoint is intact); relaunch torchrun with --resume")
    if bad >= 0:
        raise DivergedError(f"the loss, gradients or weights became NaN or infinite at step {bad}; "
                            "training stopped before writing a checkpoint with broken weights (the "
                            f"last one is intact). Lower --lr (now {lr:g}) or raise --warmup, then "
                            "--resume")


def main(args):
    rank, world, device = setup_distributed()
    with ExitStack() as cleanup:  # releases the run folder's lock however training ends
        run_dir = train(args, rank, world, device, cleanup)
    if world > 1:
        dist.destroy_process_group()
    return run_dir


def train(args, rank, world, device, cleanup):
    t_start, master = time.time(), rank == 0
    # torchrun sets TORCHELASTIC_RUN_ID; its launcher is then this worker's parent
    launcher = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None
    # TF32 on Ampere+: ~free speed, no visible effect on training
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    check_flags(args, world)  # as given (on --resume, checked again once merged with the stored)
    if args.minutes is not None and (args.steps is not None or args.resume):
        raise FlagError("--minutes sizes a new run that has no --steps; give one of them (a --resume "
                        "continues to its stored --steps, or to a new --steps)")
    ckpt, run_dir = None, None
    if args.resume:
        # A resume continues in the checkpoint's own run folder, locked against a second
        # --resume of it; a checkpoint outside a run folder starts a new one under --results-dir.
        run_dir = resumed_run_dir(args.resume)
        if run_dir and master:
            check_writable(run_dir)
            with writing_to(run_dir):
                cleanup.callback(lock_run_dir(run_dir))
        ckpt, ckpt_path = load_newest_checkpoint(args.resume)
        missing = {"opt", "rng", "step", "data"} - ckpt.keys()
        if missing:
            raise ModelError(f"cannot resume from {ckpt_path}: it has no {', '.join(sorted(missing))} "
                             "(weights only); start a new run from it with --init-from instead")
        if args.model and resolve_model_name(args.model) != ckpt["model_name"]:
            raise ModelError(f"cannot resume: {ckpt_path} holds a {ckpt['model_name']} model, "
                             f"not {resolve_model_name(args.model)}")
        check_finite_weights(ckpt, ckpt_path)
        given = {k: v for k, v in vars(args).items() if k in RUN_CONTROL and v is not None}
        # where the run writes comes from this command line, never from a path stored in the
        # checkpoint (perhaps on another machine), and nor does its loader's worker count
        stored = {k: v for k, v in ckpt["args"].items() if k not in ("results_dir", "num_workers")}
        args = argparse.Namespace(**{**stored, **given, "resume": args.resume,
                                     "results_dir": args.results_dir})
    # A new run without --steps is a quickstart: it trains for --minutes and ends, and a family
    # (not a config) gets the machine's preset; steps, grids and checkpoints are planned once a
    # training step has been timed.
    planned = args.steps is None
    if planned:
        preset = QUICKSTART["cuda" if device.type == "cuda" else "cpu"]
        args.minutes = args.minutes or preset["minutes"]
        family = (args.model or "dim").lower()
        if family in preset.get("models", {}):
            args.model = preset["models"][family]
            args.res = args.res or (None if args.vae else preset["res"])
            args.global_batch_size = args.global_batch_size or preset["global_batch_size"]
            args.lr = args.lr or preset["lr"]
    # (getattr: checkpoints of older versions lack the newer flags)
    for k, default in {**RUN_CONTROL, "results_dir": RESULTS_DIR, "global_batch_size": 128,
                       "frames": 16, "minutes": None}.items():
        if getattr(args, k, None) is None and not (planned and k in PLANNED):
            setattr(args, k, default)
    args.model = resolve_model_name(args.model or "dim")
    check_flags(args, world)
    if args.cuda_graph == "on" and (device.type != "cuda" or world > 1):
        raise FlagError("--cuda-graph on needs a single CUDA GPU process (a graph cannot hold "
                        "DistributedDataParallel's gradient exchange); use --cuda-graph off")
    args.res = args.res or (256 if args.vae else 32)
    if device.type == "cpu":
        # at most one thread per core this process may use, less one per loader worker: on a core
        # shared by two threads every OpenMP barrier waits for a descheduled one, and the scan's
        # thousands of small ops per step ran ~8x slower (DiM-T/2 on 2 busy cores: 22 s a step
        # on 2 threads, 2.7 s on 1). Fewer threads asked for (OMP_NUM_THREADS) are kept.
        free = max(1, len(os.sched_getaffinity(0)) // world - args.num_workers)
        torch.set_num_threads(min(torch.get_num_threads(), free))
    local_batch = args.global_batch_size // world
    if master and run_dir is None:
        check_writable(args.results_dir)
    if args.video and not takes_clips(args.model):
        raise ModelError(f"{args.model} is an image model; --video needs one that takes clips "
                         "(BiDiM)")

    # A VAE turns 3-channel images into latent images vae_factor times smaller.
    vae = load_vae(args.vae, device) if args.vae else None
    factor = vae_factor(vae) if vae else 1
    with torch.device("meta"):  # no memory, no init: only the config's patch size is read
        check_resolution(args.res, build_model(args.model, input_size=8).patch_size, factor)
    # Data, then the model sized for it. Clips (C, T, H, W): Moving Fashion-MNIST or a folder of
    # videos; the model takes num_frames.
    if args.video:
        data_name = "moving-fashion-mnist" if args.data == "fashion-mnist" else args.data
        dataset, num_classes, channels = build_video_dataset(data_name, args.res, args.frames, args.data_dir)
    else:
        dataset, num_classes, channels = build_dataset(args.data, args.res, args.data_dir,
                                                       3 if vae else args.channels)
    model_kwargs = dict(input_size=args.res // factor,
                        in_channels=vae.config.latent_channels if vae else channels,
                        num_classes=num_classes,
                        **({"num_frames": args.frames} if args.video else {}))
    torch.manual_seed(args.seed)  # same initial weights on every rank and for every world size
    model = build_model(args.model, **model_kwargs).to(device)
    # None means "the model's own recipe"; the checkpoint stores the resolved values
    # (a quickstart also fits the spacing of its grids and checkpoints, if not given: space_grids)
    fitted = [k for k in ("warmup", "ema", "sample_every", "ckpt_every") if getattr(args, k) is None]
    for k in HYPERPARAMETERS:
        if getattr(args, k) is None:
            setattr(args, k, model.train_defaults[k])
    if not planned:
        fit_to_length(args, fitted, model.train_defaults)
    # weak-to-strong: start from weights trained at a lower resolution
    if args.init_from and ckpt is None:
        copied, resized, skipped = init_from_checkpoint(model, args.init_from, args.model)
        if master:
            print(f"--init-from {args.init_from}: copied {len(copied)} tensors, resized "
                  f"{resized or 'none'} to the "
                  f"{args.res}px grid, could not load {skipped or 'none'}; fresh optimizer and EMA")
    ema = deepcopy(model).float().requires_grad_(False).eval()
    # the model's objective: eps (+ learned sigma) or flow matching
    diffusion = create_diffusion(model)
    # fused on a GPU: one kernel for every weight's update instead of several multi-tensor passes
    # (the update tools/bench.py times)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                            betas=model.train_defaults["betas"], eps=model.train_defaults["eps"],
                            fused=device.type == "cuda")

    step, epoch, batch_in_epoch = 0, 0, 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        step, (epoch, batch_in_epoch) = ckpt["step"], ckpt["data"]
    if ckpt is not None and len(ckpt["rng"]) == world:
        set_rng_state(ckpt["rng"][rank])
    else:
        if ckpt is not None and master:
            print(f"warning: checkpoint was written by {len(ckpt['rng'])} processes, this run has "
                  f"{world}: "
                  "training continues but cannot reproduce the original run exactly")
        # DiT's per-rank seed (+ step, so a resumed run draws fresh noise)
        seed = args.seed * world + rank + step
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)

    raw_model = model
    if args.grad_checkpoint:
        checkpoint_blocks(model)
    compile_mode = compile_choice(args.compile, model, device)  # auto: README, Speed
    if compile_mode == "blocks":  # each block compiled in place (models.compile_blocks)
        compile_blocks(model)
    elif compile_mode not in ("none", False, None):  # "model" (older runs stored True)
        model = torch.compile(model)
    if world > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    autocast = torch.autocast(device.type,
                              dtype=torch.bfloat16) if precision == "bf16" else nullcontext()

    sampler = ResumableSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    if len(sampler) < local_batch:
        raise DataError(f"the dataset ({len(dataset)} images) is smaller than one batch per "
                        f"process ({local_batch})")
    # A private generator: DataLoader draws a worker seed from it each epoch instead of from the
    # global RNG.
    loader = DataLoader(dataset, batch_size=local_batch, sampler=sampler,
                        num_workers=args.num_workers,
                        pin_memory=device.type == "cuda", drop_last=True,
                        generator=torch.Generator())

    # Run folder (rank 0 names it, everyone learns the name), metrics log, args for humans.
    if run_dir is None:
        run_dir = new_run_dir(args.results_dir, args.model, world, master)
        if master:
            with writing_to(run_dir):
                cleanup.callback(lock_run_dir(run_dir))
    ckpt_dir, metrics_path = os.path.join(run_dir, "checkpoints"), os.path.join(run_dir, "metrics.jsonl")
    if master:
        with writing_to(run_dir):
            prepare_run_dir(run_dir, args, metrics_path, step)
        if getattr(dataset, "short_videos", None):
            short = dataset.short_videos
            print(f"note: skipped {len(short)} videos shorter than --frames {args.frames}: "
                  f"{', '.join(short[:3])}{' ...' if len(short) > 3 else ''}")
        n_params = sum(p.numel() for p in raw_model.parameters())
        print(f"{args.model}: {n_params / 1e6:.2f}M parameters; {len(dataset)} images, "
              f"{num_classes} classes; "
              f"{world} process(es) on {device.type}, {precision}; run folder {run_dir}")

    def compute_grads(x, y):
        """Loss, backward and clipping: the part of a step that --cuda-graph replays as one graph."""
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = diffusion.training_loss(model, x, y)
        loss.backward()
        finite = torch.isfinite(loss.detach())
        if args.grad_clip > 0:  # the gradient norm comes free with clipping
            finite &= torch.isfinite(torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                                    args.grad_clip))
        return loss.detach(), finite

    # auto: on a single GPU (README, Speed); the optimizer step and EMA run outside the graph, so the
    # learning rate may change per step
    graphed = args.cuda_graph == "on" or (args.cuda_graph == "auto" and device.type == "cuda"
                                          and world == 1)
    run_step = compute_grads
    model.train()
    data = batches(loader, sampler, epoch, batch_in_epoch)
    running_loss, log_steps, t0 = torch.zeros((), device=device), 0, time.time()
    # the first step whose loss was not finite (-1: none), kept on the device: no sync per step
    bad_step = torch.full((), -1, dtype=torch.long, device=device)
    # as a context manager the bar ends its line before an error message is printed
    frames = (args.frames,) if args.video else ()
    shape = (raw_model.in_channels, *frames, args.res // factor, args.res // factor)

    def sample_grid():
        with writing_to(os.path.join(run_dir, "samples")):
            save_samples(ema, diffusion, vae, shape, num_classes,
                         os.path.join(run_dir, "samples", f"{step:07d}.png"), device, args.seed,
                         autocast)

    # a grid of the untrained model first: the sampling path is checked, and its time seen, before
    # the first real grid thousands of steps later
    t_grid = time.time()
    if master and args.sample_every != 0 and step == 0:
        sample_grid()
    if planned:
        end = t_start + 60 * args.minutes
        step_s = seconds_per_step(raw_model, diffusion, (local_batch, *shape), num_classes, device,
                                  autocast)
        timed = torch.tensor([time.time() - t_grid, step_s, time.time() - end], device=device)
        if world > 1:  # every rank plans the same run: the slowest times, the least time left
            dist.all_reduce(timed, op=dist.ReduceOp.MAX)
        grid_s, step_s, overdue = timed.tolist()
        plan_run(args, fitted, raw_model.train_defaults, -overdue, step_s, grid_s)
        t_plan, plan_step, paced = time.time(), step, False
        if master:
            write_args(run_dir, args)
            print(f"quickstart: {args.minutes:g} minutes on {device.type}: {args.steps} steps "
                  f"({step_s:.2f} s each, timed), a grid every {args.sample_every} steps "
                  f"({grid_s:.0f} s each), warm-up {args.warmup}, EMA {args.ema:.4g}, lr "
                  f"{args.lr:g} (planned again from the pace at every log step); "
                  "--steps N trains exactly N steps instead")
    # tqdm's ETA from the average rate of the whole run (smoothing=0): grids and checkpoints
    # included, it does not jump after each of them
    with tqdm(total=args.steps, initial=step, disable=not master, dynamic_ncols=True,
              smoothing=0) as pbar:
        while step < args.steps:
            epoch, batch_in_epoch, x, y = next(data)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            flip = torch.rand(x.shape[0], device=device) < 0.5
            # horizontal flip, images or clips
            x = torch.where(flip.view(-1, *[1] * (x.ndim - 1)), x.flip(-1), x)
            if vae is not None:
                x = vae_encode(vae, x)
            # label dropout trains the unconditional model that classifier-free guidance needs
            if num_classes:
                y = torch.where(torch.rand(y.shape, device=device) < args.label_dropout,
                                num_classes, y)
            else:
                y = None
            if graphed and run_step is compute_grads:  # captured at the first step (auto: or
                # eager, with a warning, where the capture fails)
                run_step = cuda_graph(compute_grads, x, y, fallback=args.cuda_graph == "auto")
                graphed = run_step is not compute_grads
            loss, finite = run_step(x, y)
            # warm-up, constant
            lr = args.lr * min(1.0, (step + 1) / args.warmup) if args.warmup > 0 else args.lr
            for group in opt.param_groups:
                group["lr"] = lr
            opt.step()
            update_ema(ema, raw_model, args.ema)
            step += 1
            running_loss += loss.float()
            bad_step = torch.where((bad_step < 0) & ~finite, step, bad_step)
            log_steps += 1
            pbar.update(1)
            # the machine's load changes: at every log step a quickstart plans its remaining steps
            # again from its pace since the plan (grids and checkpoints included), so that its ETA
            # stays true and it ends in time, with its EMA horizon (not its warm-up: that would
            # lower the lr again). Every rank plans from the slowest pace and least time left.
            if planned and step % args.log_every == 0 and step < args.steps:
                if not paced:  # the first interval held compilation (~20 s on a GPU) and the
                    # loader's start, one-off costs already in the time left: pace from here on
                    t_plan, plan_step, paced = time.time(), step, True
                pace = (time.time() - t_plan) / (step - plan_step) if step > plan_step else step_s
                timing = torch.tensor([pace, time.time() - end + grid_s], device=device)
                if world > 1:
                    dist.all_reduce(timing, op=dist.ReduceOp.MAX)
                pace, overdue = timing.tolist()
                args.steps = pbar.total = step + max(0, int(-0.97 * overdue / pace))
                fit_to_length(args, [k for k in fitted if k == "ema"], raw_model.train_defaults)
                space_grids(args, fitted)
                if master:
                    write_args(run_dir, args)
                if master and step == args.steps:
                    tqdm.write(f"--minutes {args.minutes:g} is nearly up: ending at step {step}")

            writes = ((args.ckpt_every > 0 and step % args.ckpt_every == 0) or step == args.steps
                      or (args.sample_every > 0 and step % args.sample_every == 0))
            if writes:  # a non-finite gradient can break the weights under a finite loss
                finite = torch.stack([p.isfinite().all() for p in raw_model.parameters()]).all()
                bad_step = torch.where((bad_step < 0) & ~finite, step, bad_step)
            if writes or step % args.log_every == 0:
                check_health(bad_step, launcher, world, args.lr)
            if step % args.log_every == 0 or step == args.steps:
                if world > 1:
                    dist.all_reduce(running_loss)
                avg_loss = running_loss.item() / (log_steps * world)
                img_s = log_steps * args.global_batch_size / (time.time() - t0)
                if master:
                    pbar.set_postfix(loss=f"{avg_loss:.4f}", img_s=f"{img_s:.0f}")
                    with writing_to(run_dir), open(metrics_path, "a") as f:
                        f.write(json.dumps({"step": step, "loss": avg_loss, "lr": lr,
                                            "img_per_s": img_s}) + "\n")
                running_loss.zero_()
                log_steps, t0 = 0, time.time()

            t_pause = time.time()
            if (args.ckpt_every > 0 and step % args.ckpt_every == 0) or step == args.steps:
                state = {"model": raw_model.state_dict(), "ema": ema.state_dict(),
                         "opt": opt.state_dict(),
                         "args": vars(args), "model_name": args.model, "model_kwargs": model_kwargs,
                         "objective": diffusion.objective,
                         "step": step, "data": (epoch, batch_in_epoch)}
                save_checkpoint(state, ckpt_dir, world, master, args.keep_last)
            if master and args.sample_every > 0 and (step % args.sample_every == 0
                                                     or step == args.steps):
                sample_grid()
            # images/s counts training time, not checkpoints and sample grids
            t0 += time.time() - t_pause
    return run_dir


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and '(default: X)' after every option whose default is a
    value ('off' for a switch). Options whose default is None are resolved later (from the model,
    the checkpoint or the machine) and say their default in their help text."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or "default" in text or action.dest == "help":
            return text
        default = "off" if action.default is False else "%(default)s"
        return f"{text} (default: {default})".strip()


def parse_args(argv=None):
    rc = RUN_CONTROL
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--model", default=None,
                        help="a config (DiM-S/2) or a family (dim); default dim")
    parser.add_argument("--data", default="fashion-mnist",
                        help="'fashion-mnist' or a folder of images "
                        "(class subfolders become labels; no subfolders = unconditional)")
    parser.add_argument("--data-dir", default=None,
                        help=f"where Fashion-MNIST's .gz files are (default {FASHION_MNIST_DIR})")
    parser.add_argument("--res", type=int, default=None,
                        help="image side in pixels (default 32, 256 with --vae, 16 for a CPU "
                        "quickstart)")
    parser.add_argument("--channels", type=int, choices=[1, 3], default=1,
                        help="Fashion-MNIST as grey or RGB")
    parser.add_argument("--video", action="store_true",
                        help="train on clips (BiDiM); --data fashion-mnist then "
                        "means Moving Fashion-MNIST, else a folder of videos (frame folders or "
                        "GIFs)")
    parser.add_argument("--frames", type=int, default=None,
                        help="frames per clip with --video (default 16)")
    parser.add_argument("--vae", default=None,
                        help="train on the latents of this diffusers AutoencoderKL "
                        "(a local folder or a hub id such as stabilityai/sd-vae-ft-ema); "
                        "default none: pixels")
    parser.add_argument("--global-batch-size", type=int, default=None,
                        help="default 128 (a CPU quickstart: 32)")
    parser.add_argument("--steps", type=int, default=None,
                        help="total optimisation steps; default none: a quickstart that trains for "
                        "--minutes")
    cpu, gpu = QUICKSTART["cpu"], QUICKSTART["cuda"]
    parser.add_argument("--minutes", type=float, default=None,
                        help="a new run without --steps trains this long, then writes its last "
                        "checkpoint and grid: steps, grids (every 1/6 of the run), checkpoints, "
                        "warm-up and EMA are planned from a timed step. A family (--model dim) "
                        f"gets the machine's preset: on a GPU the family's config for {gpu['minutes']}"
                        f" minutes, on a CPU its tiny config (DiM-T/2) at {cpu['res']} px, batch "
                        f"{cpu['global_batch_size']}, lr {cpu['lr']:g} for {cpu['minutes']} minutes "
                        "(default: those minutes)")
    recipe = "default: the model's train_defaults (DiM: {})"
    dim = DiM.train_defaults
    parser.add_argument("--lr", type=float, default=None, help=recipe.format(dim["lr"]))
    parser.add_argument("--weight-decay", type=float, default=None,
                        help=recipe.format(dim["weight_decay"]))
    parser.add_argument("--warmup", type=int, default=None,
                        help="linear warm-up steps, then constant lr; "
                        + recipe.format(dim["warmup"]) + ", at most 5%% of the steps")
    parser.add_argument("--grad-clip", type=float, default=None,
                        help="max gradient norm (0 = off); " + recipe.format(dim["grad_clip"]))
    parser.add_argument("--label-dropout", type=float, default=None,
                        help="probability of the null label; "
                        + recipe.format(dim["label_dropout"]))
    parser.add_argument("--ema", type=float, default=None,
                        help="EMA decay per step; " + recipe.format(dim["ema"])
                        + ", at most 1 - 10 / steps (a horizon of a tenth of the run)")
    parser.add_argument("--results-dir", default=None,
                        help="where new run folders go (default results); a --resume of a run "
                        "folder continues in it")
    parser.add_argument("--ckpt-every", type=int, default=None,
                        help=f"default {rc['ckpt_every']} (a quickstart: at every grid); 0 = "
                        "only at the end")
    parser.add_argument("--sample-every", type=int, default=None,
                        help=f"default {rc['sample_every']} (a quickstart: 1/6 of its steps); "
                        "a grid also at step 0 and at the end; 0 = never")
    parser.add_argument("--log-every", type=int, default=None,
                        help=f"default {rc['log_every']} (a quickstart: 1%% of its steps, at most "
                        "100)")
    parser.add_argument("--keep-last", type=int, default=None,
                        help="keep only the newest K numbered checkpoints (default 0 = keep all; "
                        "2 or more leaves one to fall back on if the newest is damaged)")
    parser.add_argument("--seed", type=int, default=0,
                        help="initial weights, data order and noise (each process adds its rank)")
    parser.add_argument("--init-from", default=None,
                        help="start from this checkpoint's EMA weights, trained at "
                        "another resolution (weak-to-strong fine-tuning); positional embeddings "
                        "are resized; default none")
    parser.add_argument("--resume", default=None,
                        help="a checkpoint or a run folder; continues it exactly "
                        "(settings come from the checkpoint; only run-control flags such as "
                        "--steps apply); default none")
    parser.add_argument("--num-workers", type=int, default=None,
                        help=f"data loader processes (default {rc['num_workers']} here: at most 4, "
                        "and one fewer than this machine's cores)")
    parser.add_argument("--compile", nargs="?", const="model",
                        choices=["auto", "none", "model", "blocks"], default=None,
                        help="torch.compile: the whole model (bare --compile), each block, or none; "
                             "default auto: on a GPU the Mamba models per block (as fast as whole on "
                             "an H200, ~20 s of compiling instead of ~110) and DiT whole (its fastest), "
                             "on a CPU none")
    parser.add_argument("--grad-checkpoint", action="store_true", default=None,
                        help="recompute each block's activations in the backward (less memory, about "
                             "one more forward of time); for the large configs at high resolution; "
                             "default off")
    parser.add_argument("--cuda-graph", choices=["auto", "on", "off"], default=None,
                        help="replay each step's forward, backward and clipping as one CUDA graph "
                             "(no Python launch overhead); default auto: on with one GPU process, "
                             "off on a CPU and under torchrun with several processes")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                        help="auto: bf16 autocast on GPU, fp32 on CPU")
    return parser.parse_args(argv)


if __name__ == "__main__":
    try:
        main(parse_args())
    except (DataError, ModelError, DivergedError, FlagError, RunError) as e:
        # One clear line instead of a traceback. An error raised in a DataLoader worker arrives
        # wrapped in the worker's traceback text; its last line is the original message.
        message = str(e).strip().splitlines()[-1].removeprefix(f"{type(e).__module__}.{type(e).__name__}: ")
        sys.exit(f"error: {message}")
