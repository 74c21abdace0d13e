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

Errors are relative: output max|a - b| / max|b|; gradients, per parameter ||a - b|| / ||b||.
In fp32 the fast path must match the reference path within 1e-3 everywhere. In bf16 the two paths
round differently (our kernels accumulate the conv and scan in fp32, cuDNN's bf16 conv does not), so
both are measured against the reference path in fp32, the truth, and the fast path passes when its
error is at most 1.25x the reference path's own bf16 error (+1e-3) for the output and for all the
gradients together (one norm over every parameter), and at most 4x for each single parameter. One
parameter's bf16 error is a noisy number: two scans that are both exact in fp32 (the loop and the
chunked PyTorch scan, `--fast ref --reference torch`, DiM-S/2 on a CPU) differ by 1.7x on one (A_log
of one block), while a scan 2% off already fails both rules (DiM-T/2: all gradients 1.4x, one
parameter 5.2x).
Both passes start from the same RNG state, so stochastic depth (DiMSUM) drops the same blocks.
Prints a table, writes JSON, and exits 1 if a model fails.
"""
import argparse
import json
import os
import sys
from contextlib import nullcontext

import torch

from tools.bench import LATENT_CHANNELS, NUM_CLASSES, VAE_FACTOR, resolve, timesteps

TOLERANCE = {"bf16": 1.25, "fp32": 1e-3}  # bf16: a ratio to the reference path's error
PER_PARAMETER_BF16 = 4.0  # bf16: the same ratio for each parameter alone (noisier, module docstring)
SLACK = 1e-3


def forward_backward(model, x, t, y, backend, autocast):
    """Output and {parameter name: gradient} of one forward and backward with `backend` forced."""
    previous = os.environ.get("DIFFUSION_MAMBA_SCAN")
    os.environ["DIFFUSION_MAMBA_SCAN"] = backend
    try:
        torch.manual_seed(2)  # the same dropped blocks / labels in every pass
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
    out_err = lambda a, b: ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
    grad_err = lambda ga, gb: {n: ((ga[n] - g).norm() / g.norm().clamp_min(1e-12)).item()
                               for n, g in gb.items()}
    row = {"model": name, "family": family, "res": res, "batch": batch, "dtype": dtype, "fast": fast,
           "reference": reference, "output_error": out_err(out_f, out_r),
           "parameters": len(grads_r), "tolerance": TOLERANCE[dtype]}
    errs = grad_err(grads_f, grads_r)
    if dtype == "fp32":
        ok = row["output_error"] <= TOLERANCE["fp32"] and all(e <= TOLERANCE["fp32"] for e in errs.values())
    else:  # both bf16 paths against the fp32 reference path
        out_t, grads_t = forward_backward(model, x, t, y, reference, nullcontext())
        fast_t, ref_t = grad_err(grads_f, grads_t), grad_err(grads_r, grads_t)
        ratio = lambda e_fast, e_ref: e_fast / (e_ref + SLACK)
        ratios = {n: ratio(fast_t[n], ref_t[n]) for n in fast_t}
        flat = lambda g: torch.cat([g[n].flatten() for n in sorted(grads_t)])
        all_err = lambda g: ((flat(g) - flat(grads_t)).norm() / flat(grads_t).norm()).item()
        row.update(output_vs_fp32=out_err(out_f, out_t), reference_output_vs_fp32=out_err(out_r, out_t),
                   all_gradients_vs_fp32=all_err(grads_f), reference_all_gradients_vs_fp32=all_err(grads_r))
        row["output_ratio"] = ratio(row["output_vs_fp32"], row["reference_output_vs_fp32"])
        row["all_gradients_ratio"] = ratio(row["all_gradients_vs_fp32"],
                                           row["reference_all_gradients_vs_fp32"])
        errs = ratios
        ok = (row["output_ratio"] <= TOLERANCE["bf16"] and row["all_gradients_ratio"] <= TOLERANCE["bf16"]
              and all(r <= PER_PARAMETER_BF16 for r in ratios.values()))
    worst = max(errs, key=lambda n: (errs[n] != errs[n], errs[n]))  # NaN first; NaN also fails `ok`
    row.update(worst_parameter=worst, worst_gradient_error=grad_err(grads_f, grads_r)[worst], ok=ok)
    if dtype == "bf16":
        row.update(worst_ratio=errs[worst], fast_vs_fp32=fast_t[worst], reference_vs_fp32=ref_t[worst])
    return row


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
        line = (f"{r['model']:>12}  fast vs reference: output {r['output_error']:.1e}, gradients "
                f"{r['worst_gradient_error']:.1e} ({r['worst_parameter']})")
        if args.dtype == "bf16":
            line += (f"; against fp32: output {r['output_vs_fp32']:.1e} vs {r['reference_output_vs_fp32']:.1e}"
                     f", all gradients {r['all_gradients_vs_fp32']:.1e} vs "
                     f"{r['reference_all_gradients_vs_fp32']:.1e}, worst parameter {r['fast_vs_fp32']:.1e} vs "
                     f"{r['reference_vs_fp32']:.1e}")
        print(f"{line}  {'ok' if r['ok'] else 'FAIL'}", flush=True)
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
