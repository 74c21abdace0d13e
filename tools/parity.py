"""
Whole-model parity of the fast path (the GPU kernels) with the reference path (PyTorch scan and conv):
same weights, same inputs, one forward and backward each; the output and every parameter's gradient
compared.

    python -m tools.parity                                     # GPU: the four Mamba families, S size
    python -m tools.parity --models DiM-L/2 --res 256 --batch 2 --dtype fp32
    python -m tools.parity --fast torch --reference ref --device cpu --models DiM-T/2 --res 16

--fast and --reference are keys of ssm.SCANS forced for the whole model (DIFFUSION_MAMBA_SCAN): by
default the Triton kernels (scan and conv) against the chunked PyTorch scan with F.conv1d, which share
nothing but the math. Inputs are SD-VAE-shaped latents (4 channels, res/8 grid, 1000 classes) with
bf16 autocast (--dtype bf16, the training setting) or in fp32.

Errors are relative: output max|a - b| / max|b|; gradients, per parameter ||a - b|| / ||b||, and the
worst parameter is reported. A model passes when both are under the tolerance of its dtype (bf16
rounding of the residual stream and of every matrix product input differs between the paths only
through the scan's and conv's own rounding, so 2e-2; fp32 1e-3). Prints a table, writes JSON, and
exits 1 if a model fails.
"""
import argparse
import json
import os
import sys
from contextlib import nullcontext

import torch

from tools.bench import LATENT_CHANNELS, NUM_CLASSES, VAE_FACTOR, resolve, timesteps

TOLERANCE = {"bf16": 2e-2, "fp32": 1e-3}


def forward_backward(model, x, t, y, backend, autocast):
    """Output and {parameter name: gradient} of one forward and backward with `backend` forced."""
    previous = os.environ.get("DIFFUSION_MAMBA_SCAN")
    os.environ["DIFFUSION_MAMBA_SCAN"] = backend
    try:
        model.zero_grad(set_to_none=True)
        with autocast:
            out = model(x, t, y)
        # a fixed random direction: every output element weighs in the gradients
        direction = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device)
        (out.float() * direction).sum().backward()
        grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters()
                 if p.grad is not None}
        return out.detach().float(), grads
    finally:
        if previous is None:
            os.environ.pop("DIFFUSION_MAMBA_SCAN")
        else:
            os.environ["DIFFUSION_MAMBA_SCAN"] = previous


def compare(name, res, batch, dtype, fast, reference, device):
    """One row: the model's output and gradient errors, fast path against reference path."""
    _, family, factory = resolve(name, "S")
    grid = res // VAE_FACTOR
    torch.manual_seed(0)
    model = factory(input_size=grid, in_channels=LATENT_CHANNELS, num_classes=NUM_CLASSES).to(device)
    # at init the adaLN-Zero gates and zeroed output layers hide the mixers from the output (and the
    # mixers' parameters get no gradient): perturb every weight, as training would
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    x = torch.randn(batch, LATENT_CHANNELS, grid, grid, device=device)
    t = timesteps(model, batch, device)
    y = torch.randint(0, NUM_CLASSES, (batch,), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()
    out_f, grads_f = forward_backward(model, x, t, y, fast, autocast)
    out_r, grads_r = forward_backward(model, x, t, y, reference, autocast)
    if grads_f.keys() != grads_r.keys():
        raise RuntimeError(f"{name}: the two paths give gradients to different parameters")
    out_err = ((out_f - out_r).abs().max() / out_r.abs().max().clamp_min(1e-12)).item()
    grad_errs = {n: ((grads_f[n] - g).norm() / g.norm().clamp_min(1e-12)).item()
                 for n, g in grads_r.items()}
    worst = max(grad_errs, key=lambda n: (grad_errs[n] != grad_errs[n], grad_errs[n]))  # NaN first
    tol = TOLERANCE[dtype]
    ok = out_err <= tol and all(e <= tol for e in grad_errs.values())  # a NaN fails
    return {"model": name, "family": family, "res": res, "batch": batch, "dtype": dtype,
            "fast": fast, "reference": reference, "output_error": out_err,
            "worst_gradient_error": grad_errs[worst], "worst_parameter": worst,
            "parameters": len(grad_errs), "tolerance": tol, "ok": ok}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="dim,bidim,dimsum,lamamba",
                   help="families (config of --size) or config names, comma-separated")
    p.add_argument("--size", default="S")
    p.add_argument("--res", type=int, default=256, help="image side in pixels (latent grid res/8)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--dtype", choices=sorted(TOLERANCE), default="bf16")
    p.add_argument("--fast", default="triton", help="backend of the fast path (ssm.SCANS key)")
    p.add_argument("--reference", default="torch", help="backend of the reference path")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--out", default="parity.json")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.res <= 0 or args.res % VAE_FACTOR or args.batch <= 0:
        raise SystemExit(f"--res {args.res} --batch {args.batch}: use a positive multiple of "
                         f"{VAE_FACTOR} pixels (the VAE's factor) and a positive batch")
    rows = []
    for spec in args.models.split(","):
        name = resolve(spec.strip(), args.size)[0]
        rows.append(compare(name, args.res, args.batch, args.dtype, args.fast, args.reference, device))
        r = rows[-1]
        print(f"{r['model']:>12}  output {r['output_error']:.1e}  gradients {r['worst_gradient_error']:.1e}"
              f" ({r['worst_parameter']})  {'ok' if r['ok'] else 'FAIL'}", flush=True)
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
