"""
Sample images from a checkpoint written by train.py (official weights: convert them first with
tools/convert_official.py, which writes the same kind of checkpoint).

    python sample.py --ckpt results/000-DiM-S-2/checkpoints/0100000.pt --num-samples 64
    python sample.py --ckpt results/000-DiM-S-2 --res 48 --class-label 3       # another resolution, one class

Many samples for FID, in batches, on one GPU or several (each process generates every world-th
sample):

    python sample.py --ckpt results/000-DiM-S-2 --num-samples 10000 --format npz --no-grid
    torchrun --nproc_per_node=8 sample.py --ckpt results/000-DiM-S-2 --num-samples 50000 --format npz
    python fid.py --samples samples/samples.npz --ref fashion-mnist-test

Writes DIR/grid.png and DIR/000000.png, ... (--format png) or DIR/samples.npz (--format npz: one
uint8 array arr_0 of shape (N, H, W, C), as ADM's and DiT's sample scripts write it). The model is
rebuilt from the config stored in the checkpoint and runs with its EMA weights; any resolution
divisible by the patch size (x 8 with a VAE) works, because the models resize their positional
embeddings to the grid they are given.

Sample i always starts from the same noise (its own generator, seeded from --seed and i) and,
without --class-label, has class i % num_classes, so a set of samples does not depend on
--batch-size or on the number of processes. The default samplers (dpm++, heun) and ddim are
deterministic from there; ddpm also draws noise at every step, per batch, so its samples do depend
on the batching.
"""
import argparse
import glob
import math
import os
import sys

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from data import DataError, check_resolution, load_vae, save_frame_strip, save_gif, save_grid, vae_decode, vae_factor
from diffusion import CLIPPING_SAMPLERS, SAMPLERS, X0_CLIPS, UpsampleGuidance, create_diffusion
from models import (GraphedModel, ModelError, compile_blocks, compile_choice, load_newest_checkpoint,
                    model_from_checkpoint)
from train import (RESULTS_DIR, FlagError, HelpFormatter, NetworkCalls, RunError, check_writable,
                   setup_distributed, writing_to)


class TiledModel(torch.nn.Module):
    """Runs `model` on overlapping tiles of its trained size and averages the predictions where
    tiles overlap (MultiDiffusion, DemoFusion): every forward stays at the trained size, so memory
    stays flat and models whose structure is tied to the grid work at any output size. Same call as
    the model: tiled(x, t, y)."""
    def __init__(self, model, tile, overlap):
        super().__init__()
        self.model, self.tile = model, tile
        self.stride = max(1, round(tile * (1 - overlap)))
        self.patch_size, self.num_classes = model.patch_size, model.num_classes

    def starts(self, size):
        if size <= self.tile:
            return [0]
        return sorted(set(list(range(0, size - self.tile, self.stride)) + [size - self.tile]))

    def forward(self, x, t, y=None):
        N, _, H, W = x.shape
        out, count = None, torch.zeros(1, 1, H, W, device=x.device, dtype=torch.float32)
        for i in self.starts(H):
            for j in self.starts(W):
                # (N, C', tile, tile)
                pred = self.model(x[:, :, i:i + self.tile, j:j + self.tile], t, y).float()
                if out is None:
                    out = torch.zeros(N, pred.shape[1], H, W, device=x.device)
                out[:, :, i:i + self.tile, j:j + self.tile] += pred
                count[:, :, i:i + self.tile, j:j + self.tile] += 1
        return (out / count).to(x.dtype)


def upsample_plan(args, res, trained_res, diffusion):
    """Which training-free route generates above the trained size: 'guidance' (DiM's Upsample
    Guidance, at an integer ratio; flow models through their VP form), 'patch' (sample at the
    trained size, upsample, re-noise, tiled denoising) or 'none' (plain sampling at the new size,
    positional embeddings resized)."""
    mode = args.upsample
    if mode == "auto":
        integer_ratio = res % trained_res == 0 and res // trained_res >= 2
        mode = "none" if res <= trained_res else ("guidance" if integer_ratio else "patch")
    if mode == "guidance" and (res % trained_res or res < 2 * trained_res):
        raise ModelError("--upsample guidance needs --res a multiple (>= 2x) of the trained "
                         f"{trained_res}px; "
                         "use --upsample patch or none")
    return mode


# --x0-clip when not given, per space. Pixel data lie in [-1, 1], and pixel-space samplers clip
# x0_hat there (ADM's clip_denoised=True, Dhariwal & Nichol 2021): the linear schedule's first step
# divides by alpha_T = 0.0064, so a small eps error becomes a 150x error in x0_hat. Latents are
# unbounded.
# PROVISIONAL: 'clip' rather than 'dynamic' until tools/compare.py's sweep (issue 20) has measured
# FID for none / clip / dynamic with each sampler.
DEFAULT_X0_CLIP = {"pixels": "clip", "latents": "none"}


def x0_clip_for(choice, vae_name, sampler):
    """--x0-clip resolved: the given mode, or the space's default (DEFAULT_X0_CLIP); samplers that
    integrate the velocity itself (euler, heun) have no x0_hat to clip and get 'none'."""
    if choice is None and sampler not in CLIPPING_SAMPLERS:
        return "none"
    if choice is None:
        return DEFAULT_X0_CLIP["latents" if vae_name else "pixels"]
    if choice != "none" and vae_name:
        raise FlagError(f"--x0-clip {choice} is for pixel-space models, whose data lie in [-1, 1]; "
                        f"this one samples {vae_name} latents, which are unbounded: drop --x0-clip")
    if choice != "none" and sampler not in CLIPPING_SAMPLERS:
        raise FlagError(f"--x0-clip {choice} acts on the data prediction, which --sampler "
                        f"{sampler} does not use: choose --sampler "
                        f"{' / '.join(CLIPPING_SAMPLERS)} or --x0-clip none")
    return choice


# Sample i of --seed s draws its initial noise from a generator seeded s * NOISE_SEED_STRIDE + i
# (distinct for all i < the stride); ddpm's per-step noise comes from per-batch generators seeded
# above STEP_SEED_OFFSET.
NOISE_SEED_STRIDE = 1_000_003
STEP_SEED_OFFSET = 1 << 62
# grid.png / grid.gif show the first GRID_MAX samples: a preview, not a 50k-image mosaic
GRID_MAX = 256


def sample_noise(index, seed, shapes):
    """Sample `index`'s initial noise, one tensor per shape, from its own CPU generator: the same
    whatever the batch size, the number of processes or the device."""
    g = torch.Generator().manual_seed(seed * NOISE_SEED_STRIDE + index)
    return [torch.randn(shape, generator=g) for shape in shapes]


def to_uint8(x):
    """[-1, 1] floats -> uint8 on the CPU, rounded as data.to_pil rounds, so PNGs keep their exact
    bytes."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def to_float(x):
    """uint8 -> [-1, 1] floats, for data.py's grid and GIF writers (which round back to the same
    bytes)."""
    return x.float() / 127.5 - 1


def gather(images, indices, num_samples, out_dir, rank, world):
    """Collective: every rank's uint8 samples and their indices -> all samples in index order, on
    rank 0 (None elsewhere). Through part files next to the output rather than all_gather_object, so
    only rank 0 ever holds the whole set (and NCCL needs no CPU objects); the processes must share
    out_dir (one node, or a shared disk)."""
    if world == 1:
        return images
    part = os.path.join(out_dir, f"part-{rank:03d}-of-{world:03d}.npz")
    np.savez(part, images=images.numpy(), indices=np.asarray(indices, dtype=np.int64))
    dist.barrier()
    if rank != 0:
        return None
    merged = None
    for r in range(world):
        path = os.path.join(out_dir, f"part-{r:03d}-of-{world:03d}.npz")
        with np.load(path) as f:
            part_images, part_indices = f["images"], f["indices"]
        if len(part_indices):  # a rank gets no samples when there are fewer samples than ranks
            if merged is None:
                merged = np.empty((num_samples, *part_images.shape[1:]), dtype=np.uint8)
            merged[part_indices] = part_images
        os.remove(path)
    return torch.from_numpy(merged)


def newest_run(results_dir=RESULTS_DIR):
    """The run folder under results_dir whose newest checkpoint was written last: the run just
    trained, or still training. A RunError saying what to run when there is none."""
    runs = []
    for run in glob.glob(os.path.join(results_dir, "*", "checkpoints")):
        written = [os.path.getmtime(p) for p in glob.glob(os.path.join(run, "[0-9]*.pt"))]
        if written:
            runs.append((max(written), os.path.dirname(run)))
    if not runs:
        raise RunError(f"no --ckpt given and no run with a checkpoint under {results_dir}/ yet: "
                       "train one first (python train.py --model dim) or pass --ckpt")
    return max(runs)[1]


# flag: (test, what the value must be); None (the checkpoint's or the model's default) passes
FLAG_RULES = {
    "num_samples": (lambda v: v >= 1, ">= 1"),
    "batch_size": (lambda v: v >= 1, ">= 1"),
    "steps": (lambda v: v >= 1, ">= 1"),
    "res": (lambda v: v >= 1, "a positive number of pixels"),
    "frames": (lambda v: v >= 1, ">= 1"),
    "cfg": (math.isfinite, "a finite guidance scale (1 = none)"),
    "ug_scale": (math.isfinite, "a finite number"),
    "tile_overlap": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "renoise": (lambda v: 0 < v <= 1, "in (0, 1]"),
}


def check_flags(args):
    """Refuse values that cannot work before anything is loaded or sampled, one line each."""
    for name, (ok, what) in FLAG_RULES.items():
        value = getattr(args, name)
        if value is not None and not ok(value):
            raise FlagError(f"--{name.replace('_', '-')} {value} cannot work: it must be {what}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise FlagError(f"--out {args.out} is a file; samples go into a folder: pass another --out")


def main(args):
    """Generate args.num_samples samples and write them; returns them as a uint8 tensor (N, C, [T,]
    H, W) (on rank 0 under torchrun; None on the other ranks)."""
    check_flags(args)
    rank, world, device = setup_distributed()
    try:
        return generate(args, rank, world, device)
    finally:
        if world > 1:
            dist.destroy_process_group()


def generate(args, rank, world, device):
    torch.backends.cuda.matmul.allow_tf32 = True
    master = rank == 0
    if args.cuda_graph == "on" and device.type != "cuda":
        raise FlagError("--cuda-graph on needs a CUDA GPU; use --cuda-graph off (or auto) here")
    if master:  # a full or read-only disk shows now, not after all the sampling
        check_writable(args.out, "--out")

    if args.ckpt is None:
        args.ckpt = newest_run()
        if master:
            print(f"sampling from the newest run, {args.ckpt} (pass --ckpt for another)")
    # the checkpoint knows its model, resolution and VAE
    ckpt, ckpt_path = load_newest_checkpoint(args.ckpt)
    model = model_from_checkpoint(ckpt, ckpt_path, name=args.model)
    train_args = ckpt["args"]
    vae_name = args.vae or train_args.get("vae")
    res = args.res if args.res is not None else train_args["res"]

    vae = load_vae(vae_name, device) if vae_name else None
    factor = vae_factor(vae) if vae else 1
    check_resolution(res, model.patch_size, factor)
    model = model.to(device).eval()
    diffusion = create_diffusion(model)
    sampler = args.sampler or diffusion.default_sampler
    if sampler not in diffusion.samplers:
        raise ModelError(f"--sampler {sampler} does not fit a {diffusion.objective} model; choose "
                         "one of "
                         f"{', '.join(diffusion.samplers)}")
    # a discrete-time model has num_steps noise levels: more sampling steps than that cannot be
    if args.steps > getattr(diffusion, "num_steps", args.steps):
        raise FlagError(f"--steps {args.steps} cannot work: the model has {diffusion.num_steps} "
                        f"noise levels, so at most --steps {diffusion.num_steps}")
    x0_clip = x0_clip_for(args.x0_clip, vae_name, sampler)
    trained_res = train_args.get("res") or model.input_size * factor
    upsample = upsample_plan(args, res, trained_res, diffusion)
    num_classes = model.num_classes
    if args.class_label is not None and not 0 <= args.class_label < num_classes:
        raise ModelError(f"--class-label {args.class_label} is out of range: the model has "
                         f"{num_classes} classes")
    if args.frames is not None and not getattr(model, "num_frames", None):
        raise FlagError(f"--frames is for video models; {ckpt_path} holds an image model "
                        f"({ckpt['model_name']}): drop --frames")
    frames = args.frames or getattr(model, "num_frames", None)
    if frames and upsample != "none":
        raise ModelError("training-free upsampling is for images; sample clips at --res up to the "
                         "trained size")
    cfg = args.cfg if args.cfg is not None else (1.5 if num_classes else 1.0)
    bf16 = device.type == "cuda"
    if master:
        print(f"{ckpt_path}: {type(model).__name__} "
              f"({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M), "
              f"{args.num_samples} samples at {res}px (trained {trained_res}px, upsample "
              f"{upsample}), {sampler} "
              f"{args.steps} steps, cfg {cfg}, x0 clipping {x0_clip}"
              + (f", {world} processes" if world > 1 else ""))

    shape = (model.in_channels, *([frames] if frames else []), res // factor, res // factor)
    shapes = [shape]
    # the trained-size first pass gets its own noise, from the same per-sample generator
    if upsample == "patch":
        lo = trained_res // factor
        shapes.append((shape[0], lo, lo))

    # Rank r generates samples r, r + world, ...: every rank gets a similar share, and sample i is
    # the same for any number of processes. Each batch becomes uint8 at once, so 10k+ samples never
    # sit in memory as floats.
    mine = list(range(rank, args.num_samples, world))
    batches = [mine[i:i + args.batch_size] for i in range(0, len(mine), args.batch_size)]

    def labels(idx):
        if not num_classes:
            return None
        # one class, or cycle through the classes so a grid shows all of them
        return torch.tensor([args.class_label if args.class_label is not None else i % num_classes
                             for i in idx], device=device)

    def denoise(net, noises, y, generator):
        """One batch's samples from its noises (noises[1]: the patch route's trained-size noise),
        with net in the model's place."""
        common = dict(sampler=sampler, steps=args.steps, cfg_scale=cfg, null_label=num_classes,
                      generator=generator, x0_clip=x0_clip)
        if upsample == "patch":
            # 1. a sample at the trained size; 2. upsampled; 3. re-noised and denoised at the
            # target size by the model applied to overlapping tiles of the trained size
            x_lo = diffusion.sample(net, noises[1], y, **common)
            x_up = torch.nn.functional.interpolate(x_lo.float(), size=shape[1:], mode="bicubic")
            tiled = TiledModel(net, noises[1].shape[-1], args.tile_overlap)
            return diffusion.sample(tiled, noises[0], y, init=x_up.to(x_lo.dtype),
                                    strength=args.renoise, **common)
        if upsample == "guidance":
            ug = UpsampleGuidance(m=res // trained_res, theta=args.ug_scale, eta=args.ug_window)
            return diffusion.sample(net, noises[0], y, upsample_guidance=ug, **common)
        return diffusion.sample(net, noises[0], y, **common)

    # the exact number of network evaluations a batch takes, from a dry run on one sample
    dry = NetworkCalls(model, dry=True)
    denoise(dry, [torch.zeros(1, *s, device=device) for s in shapes], labels([0]),
            torch.Generator(device))
    if master:
        print(f"work: {len(mine)} samples x {args.steps} {sampler} steps"
              f"{' x 2 (cfg)' if num_classes and cfg != 1 else ''} at {res}px, upsample "
              f"{upsample}: {dry.calls * len(batches)} network evaluations in {len(batches)} "
              f"batch(es) of up to {args.batch_size}" + (" on this process" if world > 1 else ""))
    # auto: as train.py compiles (a Mamba model per block, DiT whole; nothing on a CPU); each new
    # input shape (an upsampling route's second size) is compiled at its first call
    compile_mode = compile_choice(args.compile, model, device)
    if compile_mode == "blocks":
        compile_blocks(model)
    elif compile_mode == "model":
        model = torch.compile(model)
    # auto: on a GPU each network call is a CUDA graph's replay (models.GraphedModel)
    graphed = args.cuda_graph == "on" or (args.cuda_graph == "auto" and device.type == "cuda")
    net = GraphedModel(model) if graphed else model
    images = []
    # a bar over every network evaluation of this process, so its ETA covers all batches
    with tqdm(total=dry.calls * len(batches), unit="forward", disable=not master,
              dynamic_ncols=True) as bar:
        for b, idx in enumerate(batches):
            bar.set_description(f"batch {b + 1}/{len(batches)}")
            noises = [torch.stack(n).to(device) for n in zip(*(sample_noise(i, args.seed, shapes)
                                                               for i in idx))]
            g = torch.Generator(device).manual_seed(STEP_SEED_OFFSET
                                                    + args.seed * NOISE_SEED_STRIDE + idx[0])
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                x = denoise(NetworkCalls(net, bar), noises, labels(idx), g)
            if vae is not None:
                x = vae_decode(vae, x.float())
            if not torch.isfinite(x).all():  # NaN would be written as black images, silently
                raise ModelError(f"sampling gave NaN or infinite values (samples {idx[0]}-"
                                 f"{idx[-1]}); nothing was written. Try another --sampler or a "
                                 f"lower --cfg (now {cfg:g}), or an earlier checkpoint than "
                                 f"{ckpt_path}")
            images.append(to_uint8(x))
    with writing_to(args.out, "--out"):
        images = gather(torch.cat(images) if images else torch.zeros(0, dtype=torch.uint8), mine,
                        args.num_samples, args.out, rank, world)
        if master:
            write_samples(images, args,
                          cycling_classes=num_classes if args.class_label is None else 0)
    return images


def write_samples(images, args, cycling_classes):
    """uint8 samples (N, C, [T,] H, W) -> args.out: PNGs (clips: GIFs and frame strips) or one npz,
    plus a grid."""
    clips = images.ndim == 5
    written = []
    # channels last, as ADM's/DiT's npz and fid.py expect; (N, T, H, W, C) for clips
    if args.format == "npz":
        path = os.path.join(args.out, "samples.npz")
        np.savez(path, arr_0=images.movedim(1, -1).numpy())
        written.append(f"{path} {tuple(images.movedim(1, -1).shape)}")
    elif clips:
        for i, clip in enumerate(images):
            save_gif(to_float(clip), os.path.join(args.out, f"{i:06d}.gif"))
            save_frame_strip(to_float(clip), os.path.join(args.out, f"{i:06d}.png"))
        written.append(f"{len(images)} clips (GIF and frame strip)")
    else:
        for i, x in enumerate(images):
            arr = x.permute(1, 2, 0).numpy()
            Image.fromarray(arr[..., 0] if arr.shape[-1] == 1
                            else arr).save(os.path.join(args.out, f"{i:06d}.png"))
        written.append(f"{len(images)} images")
    if not args.no_grid:
        head = to_float(images[:GRID_MAX])
        if clips:
            save_gif(head, os.path.join(args.out, "grid.gif"))
            written.append("grid.gif")
        else:  # a column per class when cycling through a few classes
            save_grid(head, os.path.join(args.out, "grid.png"),
                      nrow=cycling_classes if 0 < cycling_classes <= 16
                      else None)
            written.append("grid.png")
    print(f"wrote {' and '.join(written)} to {args.out}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--ckpt", default=None,
                        help="a train.py checkpoint or run folder (or official weights "
                        f"converted by tools/convert_official.py); default: the run under "
                        f"{RESULTS_DIR}/ with the newest checkpoint")
    parser.add_argument("--model", default=None,
                        help="check that the checkpoint holds this model (default: no check)")
    parser.add_argument("--res", type=int, default=None,
                        help="image side in pixels (default: the trained one)")
    parser.add_argument("--sampler", choices=SAMPLERS, default=None,
                        help="default: the model's (dpm++ for epsilon models, heun for flow "
                        "matching)")
    parser.add_argument("--steps", type=int, default=50, help="network evaluations (x2 with CFG)")
    parser.add_argument("--x0-clip", choices=X0_CLIPS, default=None,
                        help="what each step does to the predicted clean image: clip it to [-1, 1] "
                        "(ADM), dynamic thresholding (Imagen) or none; ddpm, ddim and dpm++ only "
                        f"(default: {DEFAULT_X0_CLIP['pixels']} for pixel-space models, "
                        "provisional until measured; none for latents and for euler / heun)")
    parser.add_argument("--cfg", type=float, default=None, help="guidance scale w, 1 = none "
                        "(default 1.5 class-conditional, 1 unconditional)")
    parser.add_argument("--num-samples", type=int, default=16, help="images (or clips) to generate")
    parser.add_argument("--class-label", type=int, default=None,
                        help="all samples of this class (default: cycle)")
    parser.add_argument("--seed", type=int, default=0,
                        help="sample i starts from noise seeded by --seed and i")
    parser.add_argument("--out", default="samples", help="folder the samples are written to")
    parser.add_argument("--batch-size", type=int, default=64, help="per process")
    parser.add_argument("--compile", choices=["none", "auto", "blocks", "model"], default="none",
                        help="torch.compile the network: auto = as train.py (on a GPU a Mamba model "
                             "per block, DiT whole; nothing on a CPU), blocks, model, or none "
                             "(default). Compiling takes 15 s to minutes at the first call of each "
                             "shape: worth it for long jobs (FID sets), not for a few images")
    parser.add_argument("--cuda-graph", choices=["auto", "on", "off"], default="auto",
                        help="replay each network call as a CUDA graph (one per batch shape), "
                             "without the model's Python; default auto: on a GPU")
    parser.add_argument("--format", choices=["png", "npz"], default="png",
                        help="png: one file per sample; npz: "
                        "OUT/samples.npz, uint8 arr_0 (N, H, W, C) (clips: (N, T, H, W, C)), for "
                        "fid.py")
    parser.add_argument("--no-grid", action="store_true",
                        help=f"skip grid.png / grid.gif (else of the first "
                        f"{GRID_MAX} samples)")
    parser.add_argument("--vae", default=None,
                        help="decode latents with this VAE (default: the one trained with, if any)")
    parser.add_argument("--frames", type=int, default=None,
                        help="video models: frames per clip (default: trained)")
    parser.add_argument("--upsample", choices=["auto", "guidance", "patch", "none"], default="auto",
                        help="above the trained size: Upsample Guidance (DiM), patch (tiled "
                        "re-denoising) or none; "
                        "auto picks guidance at an integer ratio, else patch")
    parser.add_argument("--ug-scale", type=float, default=1.0,
                        help="Upsample Guidance weight theta (DiM: 1)")
    parser.add_argument("--ug-window", type=float, default=0.3,
                        help="guide the noisiest fraction eta of the "
                        "schedule (DiM: 0.3)")
    parser.add_argument("--tile-overlap", type=float, default=0.5,
                        help="patch route: overlap of adjacent tiles")
    parser.add_argument("--renoise", type=float, default=0.6,
                        help="patch route: fraction of the schedule re-run "
                        "on the upsampled sample (1 = from pure noise)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    try:
        main(parse_args())
    except (DataError, ModelError, FlagError, RunError) as e:
        sys.exit(f"error: {e}")
