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

from data import DataError, check_resolution, load_vae, save_grid, to_pil, vae_decode, vae_factor
from diffusion import SAMPLERS, GaussianDiffusion
from models import ModelError, find_checkpoint, load_model

OFFICIAL_DIM_VAE = "stabilityai/sd-vae-ft-ema"  # the KL-f8 autoencoder U-ViT and DiM trained on


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
    diffusion = GaussianDiffusion(schedule=model.schedule, time_offset=model.time_offset)
    num_classes = model.num_classes
    if args.class_label is not None and not 0 <= args.class_label < num_classes:
        raise ModelError(f"--class-label {args.class_label} is out of range: the model has {num_classes} classes")
    cfg = args.cfg if args.cfg is not None else (1.5 if num_classes else 1.0)
    bf16 = device.type == "cuda"
    print(f"{ckpt_path}: {type(model).__name__} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M), "
          f"{args.num_samples} samples at {res}px, {args.sampler} {args.steps} steps, cfg {cfg}")

    # All initial noise drawn up front, so it does not depend on --batch-size (nor, with ddim/dpm++, do the images).
    g = torch.Generator(device).manual_seed(args.seed)
    shape = (model.in_channels, res // factor, res // factor)
    noise = torch.randn(args.num_samples, *shape, device=device, generator=g)
    if not num_classes:
        labels = None
    elif args.class_label is not None:
        labels = torch.full((args.num_samples,), args.class_label, device=device)
    else:  # cycle through the classes so a grid shows all of them
        labels = torch.arange(args.num_samples, device=device) % num_classes

    images = []
    for i in tqdm(range(0, args.num_samples, args.batch_size), desc="batches"):
        y = labels[i:i + args.batch_size] if labels is not None else None
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            x = diffusion.sample(model, noise[i:i + args.batch_size], y, sampler=args.sampler, steps=args.steps,
                                 cfg_scale=cfg, null_label=num_classes, generator=g)
        # (--upsample, Upsample Guidance for resolutions far above the trained one, will wrap this call.)
        if vae is not None:
            x = vae_decode(vae, x.float())
        images.append(x.float().cpu())
    images = torch.cat(images)

    os.makedirs(args.out, exist_ok=True)
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
    parser.add_argument("--sampler", choices=SAMPLERS, default="dpm++")
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
    parser.add_argument("--num-classes", type=int, default=1000, help="official DiM weights only (ImageNet: 1000)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    try:
        main(parse_args())
    except (DataError, ModelError) as e:
        sys.exit(f"error: {e}")
