"""
Sample images from a checkpoint written by train.py (or an official DiM nnet_ema.pth).

    python sample.py --ckpt results/000-DiM-S-2/checkpoints/latest.pt --num-samples 64
    python sample.py --ckpt results/000-DiM-S-2 --res 48 --class-label 3       # another resolution, one class
    python sample.py --ckpt nnet_ema.pth --model DiM-H/2 --res 256 --num-classes 1000 --cfg 1.4 \
        --vae stabilityai/sd-vae-ft-ema

Writes DIR/grid.png and DIR/000000.png, ... The model is rebuilt from the config stored in the checkpoint and
runs with its EMA weights; any resolution divisible by the patch size (x 8 with a VAE) works, because the models
resize their positional embeddings to the grid they are given.
"""
import argparse
import os
import sys

import torch
from tqdm import tqdm

from data import (DataError, check_resolution, load_vae, save_frame_strip, save_gif, save_grid, to_pil, vae_decode,
                  vae_factor)
from diffusion import SAMPLERS, UpsampleGuidance, create_diffusion
from models import ModelError, find_checkpoint, load_model

OFFICIAL_DIM_VAE = "stabilityai/sd-vae-ft-ema"  # the KL-f8 autoencoder U-ViT and DiM trained on


class TiledModel(torch.nn.Module):
    """Runs `model` on overlapping tiles of its trained size and averages the predictions where tiles overlap
    (MultiDiffusion, DemoFusion): every forward stays at the trained size, so memory stays flat and models whose
    structure is tied to the grid work at any output size. Same call as the model: tiled(x, t, y)."""
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
                pred = self.model(x[:, :, i:i + self.tile, j:j + self.tile], t, y).float()   # (N, C', tile, tile)
                if out is None:
                    out = torch.zeros(N, pred.shape[1], H, W, device=x.device)
                out[:, :, i:i + self.tile, j:j + self.tile] += pred
                count[:, :, i:i + self.tile, j:j + self.tile] += 1
        return (out / count).to(x.dtype)


def upsample_plan(args, res, trained_res, diffusion):
    """Which training-free route generates above the trained size: 'guidance' (DiM's Upsample Guidance, for
    epsilon models at an integer ratio), 'patch' (sample at the trained size, upsample, re-noise, tiled denoising)
    or 'none' (plain sampling at the new size, positional embeddings resized)."""
    mode = args.upsample
    if mode == "auto":
        integer_ratio = res % trained_res == 0 and res // trained_res >= 2
        mode = "none" if res <= trained_res else ("guidance" if integer_ratio and diffusion.objective == "eps"
                                                  else "patch")
    if mode == "guidance" and (diffusion.objective != "eps" or res % trained_res or res < 2 * trained_res):
        raise ModelError(f"--upsample guidance needs an epsilon model and --res a multiple (>= 2x) of the trained "
                         f"{trained_res}px; use --upsample patch or none")
    return mode


def main(args):
    torch.backends.cuda.matmul.allow_tf32 = True
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ckpt_path = find_checkpoint(args.ckpt)

    # A train.py checkpoint knows its model, resolution and VAE; an official state dict knows none of them.
    model, ckpt = load_model(ckpt_path, name=args.model, input_size=args.res // 8 if args.res else None,
                             in_channels=4, num_classes=args.num_classes)  # kwargs used for official weights only
    train_args = ckpt["args"] if ckpt else {}
    vae_name = args.vae or train_args.get("vae") or (None if ckpt else OFFICIAL_DIM_VAE)
    res = args.res or train_args["res"]

    vae = load_vae(vae_name, device) if vae_name else None
    factor = vae_factor(vae) if vae else 1
    check_resolution(res, model.patch_size, factor)
    model = model.to(device).eval()
    diffusion = create_diffusion(model)
    sampler = args.sampler or diffusion.default_sampler
    if sampler not in diffusion.samplers:
        raise ModelError(f"--sampler {sampler} does not fit a {diffusion.objective} model; choose one of "
                         f"{', '.join(diffusion.samplers)}")
    trained_res = train_args.get("res") or model.input_size * factor
    upsample = upsample_plan(args, res, trained_res, diffusion)
    num_classes = model.num_classes
    if args.class_label is not None and not 0 <= args.class_label < num_classes:
        raise ModelError(f"--class-label {args.class_label} is out of range: the model has {num_classes} classes")
    cfg = args.cfg if args.cfg is not None else (1.5 if num_classes else 1.0)
    bf16 = device.type == "cuda"
    print(f"{ckpt_path}: {type(model).__name__} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M), "
          f"{args.num_samples} samples at {res}px (trained {trained_res}px, upsample {upsample}), {sampler} "
          f"{args.steps} steps, cfg {cfg}")

    # All initial noise drawn up front, so it does not depend on --batch-size (nor, with ddim/dpm++, do the images).
    g = torch.Generator(device).manual_seed(args.seed)
    frames = args.frames or getattr(model, "num_frames", None)
    if frames and upsample != "none":
        raise ModelError("training-free upsampling is for images; sample clips at --res up to the trained size")
    shape = (model.in_channels, *([frames] if frames else []), res // factor, res // factor)
    noise = torch.randn(args.num_samples, *shape, device=device, generator=g)
    if upsample == "patch":  # the trained-size first pass gets its own noise, also drawn up front
        lo = trained_res // factor
        noise_lo = torch.randn(args.num_samples, shape[0], lo, lo, device=device, generator=g)
    if not num_classes:
        labels = None
    elif args.class_label is not None:
        labels = torch.full((args.num_samples,), args.class_label, device=device)
    else:  # cycle through the classes so a grid shows all of them
        labels = torch.arange(args.num_samples, device=device) % num_classes

    images = []
    for i in tqdm(range(0, args.num_samples, args.batch_size), desc="batches"):
        y = labels[i:i + args.batch_size] if labels is not None else None
        common = dict(sampler=sampler, steps=args.steps, cfg_scale=cfg, null_label=num_classes, generator=g)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            if upsample == "patch":
                # 1. a sample at the trained size; 2. upsampled; 3. re-noised and denoised at the target size by
                # the model applied to overlapping tiles of the trained size
                x_lo = diffusion.sample(model, noise_lo[i:i + args.batch_size], y, **common)
                x_up = torch.nn.functional.interpolate(x_lo.float(), size=shape[1:], mode="bicubic")
                tiled = TiledModel(model, noise_lo.shape[-1], args.tile_overlap)
                x = diffusion.sample(tiled, noise[i:i + args.batch_size], y, init=x_up.to(x_lo.dtype),
                                     strength=args.renoise, **common)
            elif upsample == "guidance":
                ug = UpsampleGuidance(m=res // trained_res, theta=args.ug_scale, eta=args.ug_window)
                x = diffusion.sample(model, noise[i:i + args.batch_size], y, upsample_guidance=ug, **common)
            else:
                x = diffusion.sample(model, noise[i:i + args.batch_size], y, **common)
        if vae is not None:
            x = vae_decode(vae, x.float())
        images.append(x.float().cpu())
    images = torch.cat(images)

    os.makedirs(args.out, exist_ok=True)
    if frames:  # each clip as an animated GIF and a frame strip, plus all clips in one GIF
        for i, clip in enumerate(images):
            save_gif(clip, os.path.join(args.out, f"{i:06d}.gif"))
            save_frame_strip(clip, os.path.join(args.out, f"{i:06d}.png"))
        save_gif(images, os.path.join(args.out, "grid.gif"))
        print(f"wrote {len(images)} clips (GIF and frame strip) and grid.gif to {args.out}")
        return images
    for i, x in enumerate(images):
        to_pil(x).save(os.path.join(args.out, f"{i:06d}.png"))
    cycling = labels is not None and args.class_label is None and num_classes <= 16
    save_grid(images, os.path.join(args.out, "grid.png"), nrow=num_classes if cycling else None)  # a column per class
    print(f"wrote {len(images)} images and grid.png to {args.out}")
    return images


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="a train.py checkpoint or run folder, or official DiM weights "
                        "(nnet_ema.pth)")
    parser.add_argument("--model", default=None, help="check the checkpoint holds this model; required for "
                        "official DiM weights (e.g. DiM-H/2)")
    parser.add_argument("--res", type=int, default=None, help="image side in pixels (default: the trained one)")
    parser.add_argument("--sampler", choices=SAMPLERS, default=None,
                        help="default: the model's (dpm++ for epsilon models, heun for flow matching)")
    parser.add_argument("--steps", type=int, default=50, help="network evaluations (x2 with CFG)")
    parser.add_argument("--cfg", type=float, default=None, help="guidance scale w, 1 = none "
                        "(default 1.5 class-conditional, 1 unconditional)")
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--class-label", type=int, default=None, help="all samples of this class (default: cycle)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="samples")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--vae", default=None, help="decode latents with this VAE (default: the one trained on; "
                        f"{OFFICIAL_DIM_VAE} for official DiM weights)")
    parser.add_argument("--frames", type=int, default=None, help="video models: frames per clip (default: trained)")
    parser.add_argument("--upsample", choices=["auto", "guidance", "patch", "none"], default="auto",
                        help="above the trained size: Upsample Guidance (DiM), patch (tiled re-denoising) or none; "
                        "auto picks guidance for epsilon models at an integer ratio, else patch")
    parser.add_argument("--ug-scale", type=float, default=1.0, help="Upsample Guidance weight theta (DiM: 1)")
    parser.add_argument("--ug-window", type=float, default=0.3, help="guide the noisiest fraction eta of the "
                        "schedule (DiM: 0.3)")
    parser.add_argument("--tile-overlap", type=float, default=0.5, help="patch route: overlap of adjacent tiles")
    parser.add_argument("--renoise", type=float, default=0.6, help="patch route: fraction of the schedule re-run "
                        "on the upsampled sample (1 = from pure noise)")
    parser.add_argument("--num-classes", type=int, default=1000, help="official DiM weights only (ImageNet: 1000)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    try:
        main(parse_args())
    except (DataError, ModelError) as e:
        sys.exit(f"error: {e}")
