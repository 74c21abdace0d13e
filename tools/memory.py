"""
Training memory of the models at any resolution, counted on a CPU: what one training step keeps for its
backward, per token, as a GPU runs the step.

    python -m tools.memory --models dim,bidim,dimsum,lamamba,dit --size L --res 2048

The step is run as on a GPU: the Triton scan and conv ops (their kernels replaced by stand-ins that
return zeros of the right shapes: only shapes matter here), bf16 autocast, each model compiled as
tools/bench.py compiles it (Mamba models per block, DiT whole; LaMamba not at all, as measured) with the
partitioner Inductor uses (torch.compile's "aot_eager_decomp_partition" backend: the same choice of what
to keep and what to recompute, without generating code). A saved-tensor hook counts every distinct
storage the step keeps, parameters excluded. Two small grids give the bytes per token (the difference),
which scale to the target resolution's tokens; weights, gradients and AdamW's two moments add 16 bytes a
parameter (4 a frozen one) of the model built for that resolution. What this misses: tensors that live
only during the backward (gradients of activations, recomputed regions, workspaces), and the CPU's
autocast lists, which differ from CUDA's in a few ops. Checked against torch.cuda.max_memory_allocated
on an H200 at 2048 px (README, Speed, session 14): 1-8% above the measured peak for DiT-L/2, DiM-L/2,
BiDiM-L/2 and DiMSUM-L/2; 27% below it for LaMamba-L, whose peak comes from the backward's temporaries
at full latent resolution.
"""
import argparse
import contextlib
import json
import os

import torch

import ssm_triton
from models import MODELS, compile_blocks, fastest_compile
from tools.bench import LATENT_CHANNELS, NUM_CLASSES, VAE_FACTOR, resolve, timesteps

# fp32 weight, its gradient and AdamW's two moments; a frozen parameter only its weight
BYTES_PER_PARAMETER, BYTES_PER_FROZEN_PARAMETER = 16, 4


@contextlib.contextmanager
def stand_in_kernels():
    """The scan and conv kernels replaced by zeros of their outputs' shapes, and the Triton backend
    forced (unchecked): the ops, their autograd and what they save are the GPU's."""
    def scan_fwd(u, delta, z, B, C, A, D, dt_bias, order, softplus=True, out_dtype=None):
        out, states = ssm_triton._scan_fake(u, delta, z, B, C, A, D, dt_bias, order, softplus, out_dtype)
        return out.zero_(), states.zero_(), ssm_triton.CHUNK

    def scan_bwd(dout, u, delta, z, B, C, A, D, dt_bias, order, states, chunk, softplus=True):
        batch, L, K, dim = u.shape
        NP = states.shape[-1]
        zeros = lambda shape, like=None: torch.zeros(shape, dtype=like.dtype if like is not None
                                                     else torch.float32)
        return (zeros(u.shape, u), zeros(u.shape, delta), None if z is None else zeros(u.shape, z),
                zeros((batch, L, K, NP)), zeros((batch, L, K, NP)), zeros((K, dim, NP)),
                None if D is None else zeros(D.shape), None if dt_bias is None else zeros(dt_bias.shape))

    def conv_bwd(dout, x, weight, bias, order):
        return (torch.zeros_like(x, memory_format=torch.contiguous_format), torch.zeros(weight.shape),
                None if bias is None else torch.zeros(bias.shape))

    saved = {k: getattr(ssm_triton, k) for k in ("scan_fwd", "scan_bwd", "conv_fwd", "conv_bwd")}
    forced = os.environ.get("DIFFUSION_MAMBA_SCAN")
    ssm_triton.scan_fwd, ssm_triton.scan_bwd, ssm_triton.conv_bwd = scan_fwd, scan_bwd, conv_bwd
    ssm_triton.conv_fwd = lambda x, w, b, o: torch.zeros_like(x, memory_format=torch.contiguous_format)
    os.environ["DIFFUSION_MAMBA_SCAN"] = "triton"
    try:
        yield
    finally:
        for k, fn in saved.items():
            setattr(ssm_triton, k, fn)
        if forced is None:
            del os.environ["DIFFUSION_MAMBA_SCAN"]
        else:
            os.environ["DIFFUSION_MAMBA_SCAN"] = forced


def kept_bytes(name, grid, compile_mode):
    """Bytes that one training step of model `name` (batch 1, a grid x grid latent) keeps for its
    backward, parameters excluded; compile_mode: "blocks", "model" or "none"."""
    torch.manual_seed(0)
    model = MODELS[name](input_size=grid, in_channels=LATENT_CHANNELS, num_classes=NUM_CLASSES)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    net = model
    if compile_mode == "blocks":
        compile_blocks(model, backend="aot_eager_decomp_partition")
    elif compile_mode == "model":
        net = torch.compile(model, backend="aot_eager_decomp_partition")
    kept = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    x = torch.randn(1, LATENT_CHANNELS, grid, grid)
    t, y = timesteps(model, 1, "cpu"), torch.randint(0, NUM_CLASSES, (1,))
    with stand_in_kernels(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            net(x, t, y)
    torch._dynamo.reset()  # the next model's blocks compile afresh
    return sum(kept.values())


def estimate(name, res, grids=(32, 64)):
    """Kept bytes per latent pixel from two grids, scaled to res (pixels, a res / 8 latent), plus the
    parameters of the model built for res (position tables grow with the grid): 16 bytes each, 4 for
    a frozen one. Returns a dict (GiB)."""
    with torch.device("meta"):
        model = MODELS[name](input_size=res // VAE_FACTOR, in_channels=LATENT_CHANNELS,
                             num_classes=NUM_CLASSES)
    mode = "none" if name.startswith("LaMamba") else fastest_compile(model)  # LaMamba: as measured
    params = sum(p.numel() for p in model.parameters())
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    small, large = (kept_bytes(name, g, mode) for g in grids)
    per_pixel = (large - small) / (grids[1] ** 2 - grids[0] ** 2)
    activations = per_pixel * (res // VAE_FACTOR) ** 2 / 2 ** 30
    weights = (BYTES_PER_PARAMETER * (params - frozen) + BYTES_PER_FROZEN_PARAMETER * frozen) / 2 ** 30
    return dict(model=name, res=res, compiled=mode, grids=list(grids),
                kept_bytes_per_latent_pixel=per_pixel, activations_gib=activations,
                params_M=params / 1e6, weights_and_adamw_gib=weights, estimate_gib=activations + weights)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="dim,bidim,dimsum,lamamba,dit",
                   help="families (of size --size) or exact config names")
    p.add_argument("--size", default="L")
    p.add_argument("--res", type=int, default=2048, help="pixels (the latent is res / 8)")
    p.add_argument("--grids", default="32,64", help="the two latent grids counted")
    p.add_argument("--out", default=None, help="write the rows as JSON")
    args = p.parse_args(argv)
    grids = tuple(int(g) for g in args.grids.split(","))
    rows = []
    print("| model | compiled | kept per latent pixel (KiB) | activations (GiB) | weights + AdamW (GiB) "
          f"| estimated peak at {args.res} px, batch 1 (GiB) |")
    print("|---|---|---|---|---|---|")
    for spec in args.models.split(","):
        name = resolve(spec, args.size)[0]
        row = estimate(name, args.res, grids)
        rows.append(row)
        print(f"| {name} | {row['compiled']} | {row['kept_bytes_per_latent_pixel'] / 1024:.1f} "
              f"| {row['activations_gib']:.2f} | {row['weights_and_adamw_gib']:.2f} "
              f"| {row['estimate_gib']:.2f} |", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
