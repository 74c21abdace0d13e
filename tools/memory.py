"""
Training memory of the models at any resolution, counted on a CPU: what one training step keeps for its
backward, per token, as a GPU runs the step.

    python -m tools.memory --models dim,bidim,dimsum,lamamba,dit --size L --res 2048
    python -m tools.memory --models dim --compile auto --grad-checkpoint   # as train.py would run it

The step is run as on a GPU: the Triton scan and conv ops (their kernels replaced by stand-ins that
return zeros of the right shapes: only shapes matter here), attention as the GPU's fused kernels keep it
(q, k, v, output, an fp32 log-sum-exp per query; never the probabilities a CPU's attention keeps, nor
CPU autocast's fp32 copies of its inputs), bf16 autocast, each model compiled as tools/bench.py compiles
it (Mamba models per block, DiT whole; LaMamba not at all, as measured) with the partitioner Inductor
uses (torch.compile's "aot_eager_decomp_partition" backend: the same choice of what to keep and what to
recompute, without generating code). A compiled step's kept tensors are its graphs' saved tensors,
counted by a saved-tensor hook; an eager step's are every storage still alive after the forward
(LiveStorages), which includes what a recomputed region holds outside autograd's saved tensors (the
scan outputs that ssm.recompute_around_scan's policy keeps). With --grad-checkpoint the blocks' eager
checkpoints hold their inputs outside any graph (models.compile_blocks compiles inside them), so such
steps are counted eagerly. Parameters are excluded. Two small grids
give the bytes per token (the difference), which scale to the target resolution's tokens; weights,
gradients and AdamW's two moments add 16 bytes a parameter (4 a frozen one) of the model built for that
resolution. What this misses: tensors that live only during the backward (gradients of activations,
recomputed regions, workspaces), and the CPU's autocast lists, which differ from CUDA's in a few ops.
Checked against torch.cuda.max_memory_allocated on an H200 at 2048 px (docs/speed_history.md, session
15): 3-8% above the measured peak for DiM-L/2 and BiDiM-L/2 and 7% below it for LaMamba-L (eager), but 21-25%
below it for DiT-L/2 and DiMSUM-L/2 (compiled, attention over all tokens): their GPU steps keep ~12 bytes
a channel and token per attention layer more than counted here, for a cause not found on a CPU.
"""
import argparse
import contextlib
import json
import os
import weakref

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import ssm_triton
from models import MODELS, checkpoint_blocks, compile_blocks, fastest_compile
from tools.bench import LATENT_CHANNELS, NUM_CLASSES, VAE_FACTOR, resolve, timesteps

# fp32 weight, its gradient and AdamW's two moments; a frozen parameter only its weight
BYTES_PER_PARAMETER, BYTES_PER_FROZEN_PARAMETER = 16, 4


class _FusedAttention(torch.autograd.Function):
    """Attention as a GPU's fused kernels run it (flash, or memory-efficient with a bias): the
    backward keeps q, k, v, the output, an fp32 log-sum-exp per query and the bias, never the
    (queries, keys) probabilities that a CPU's attention keeps; outputs are zeros."""
    @staticmethod
    def forward(ctx, q, k, v, bias):
        out = torch.zeros_like(q)
        ctx.save_for_backward(q, k, v, bias, out, q.new_zeros(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, bias = ctx.saved_tensors[:4]
        learned = bias is not None and ctx.needs_input_grad[3]
        return (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v),
                torch.zeros_like(bias) if learned else None)


def _attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None):
    if dropout_p or is_causal:
        raise NotImplementedError("the models' attention has no dropout or causal mask")
    return _FusedAttention.apply(q, k, v, attn_mask)


# the launchers of ssm_triton's training kernels, which stand_in_kernels replaces
STOOD_IN = ("scan_fwd", "scan_bwd", "conv_fwd", "conv_bwd", "dwconv_fwd", "dwconv_bwd")


@contextlib.contextmanager
def stand_in_kernels():
    """The scan and conv kernels (LaMamba's 2-D depthwise conv too) replaced by zeros of their outputs'
    shapes, and the Triton backend forced (unchecked): the ops, their autograd and what they save are
    the GPU's. Attention likewise (F.scaled_dot_product_attention): what the GPU's fused kernels keep."""
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

    def conv_bwd(dout, x, weight, bias, order=None):  # the 2-D depthwise conv's (LaMamba) too
        return (torch.zeros_like(x, memory_format=torch.contiguous_format), torch.zeros(weight.shape),
                None if bias is None else torch.zeros(bias.shape))

    def conv_fwd(x, weight, bias, order=None):
        return torch.zeros_like(x, memory_format=torch.contiguous_format)

    saved = {k: getattr(ssm_triton, k) for k in STOOD_IN}
    sdpa = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _attention
    forced = os.environ.get("DIFFUSION_MAMBA_SCAN")
    for k, fn in zip(STOOD_IN, (scan_fwd, scan_bwd, conv_fwd, conv_bwd, conv_fwd, conv_bwd)):
        setattr(ssm_triton, k, fn)
    os.environ["DIFFUSION_MAMBA_SCAN"] = "triton"
    try:
        yield
    finally:
        for k, fn in saved.items():
            setattr(ssm_triton, k, fn)
        F.scaled_dot_product_attention = sdpa
        if forced is None:
            del os.environ["DIFFUSION_MAMBA_SCAN"]
        else:
            os.environ["DIFFUSION_MAMBA_SCAN"] = forced


class LiveStorages(TorchDispatchMode):
    """Every storage that an op run under this mode creates, counted while it lives (a finalizer
    takes it off when the last tensor on it goes). What is alive after a forward is what the step
    keeps for its backward by any route: autograd's saved tensors, and also what a recomputed region
    (torch.utils.checkpoint, ssm.recompute_around_scan's selective policy) holds outside the saved
    tensors, which a saved-tensor hook does not see."""
    def __init__(self):
        super().__init__()
        self.live = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata  # the storage's address, unique while it lives
                if key not in self.live:
                    self.live[key] = storage.nbytes()
                    weakref.finalize(storage, self.live.pop, key, None)
        return out

    def nbytes(self):
        return sum(self.live.values())


def kept_bytes(name, grid, compile_mode, grad_checkpoint=False):
    """Bytes that one training step of model `name` (batch 1, a grid x grid latent) keeps for its
    backward, parameters excluded; compile_mode: "blocks", "model" or "none"; grad_checkpoint: each
    block recomputed in the backward (train.py --grad-checkpoint)."""
    torch.manual_seed(0)
    model = MODELS[name](input_size=grid, in_channels=LATENT_CHANNELS, num_classes=NUM_CLASSES)
    if grad_checkpoint:
        checkpoint_blocks(model)
    x = torch.randn(1, LATENT_CHANNELS, grid, grid)
    t, y = timesteps(model, 1, "cpu"), torch.randint(0, NUM_CLASSES, (1,))
    if compile_mode == "none" or (compile_mode == "blocks" and grad_checkpoint):
        # eager: what is still alive after the forward (the parameters were made before the mode).
        # Compiled blocks under --grad-checkpoint keep what eager ones do: the checkpoint stays eager
        # around each compiled block (models.compile_blocks), and its inputs are held by the
        # checkpoint, not saved by a graph
        with stand_in_kernels(), LiveStorages() as live:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x, t, y)
            return live.nbytes() - out.untyped_storage().nbytes()
    # compiled: the graphs' saved tensors (Dynamo does not trace under a dispatch mode); a compiled
    # graph keeps what the partitioner chose, recomputed regions included, as saved tensors
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

    with stand_in_kernels(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            net(x, t, y)
    torch._dynamo.reset()  # the next model's blocks compile afresh
    return sum(kept.values())


def estimate(name, res, grids=(32, 64), as_measured=True, grad_checkpoint=False):
    """Kept bytes per latent pixel from two grids, scaled to res (pixels, a res / 8 latent), plus the
    parameters of the model built for res (position tables grow with the grid): 16 bytes each, 4 for
    a frozen one. as_measured: LaMamba eager, as the GPU rows ran it; else every model as train.py
    compiles it on a GPU. grad_checkpoint: as train.py --grad-checkpoint runs it. Returns a dict (GiB)."""
    with torch.device("meta"):
        model = MODELS[name](input_size=res // VAE_FACTOR, in_channels=LATENT_CHANNELS,
                             num_classes=NUM_CLASSES)
    mode = "none" if as_measured and name.startswith("LaMamba") else fastest_compile(model)
    params = sum(p.numel() for p in model.parameters())
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    small, large = (kept_bytes(name, g, mode, grad_checkpoint) for g in grids)
    per_pixel = (large - small) / (grids[1] ** 2 - grids[0] ** 2)
    activations = per_pixel * (res // VAE_FACTOR) ** 2 / 2 ** 30
    weights = (BYTES_PER_PARAMETER * (params - frozen) + BYTES_PER_FROZEN_PARAMETER * frozen) / 2 ** 30
    return dict(model=name, res=res, compiled=mode, grad_checkpoint=grad_checkpoint, grids=list(grids),
                kept_bytes_per_latent_pixel=per_pixel, activations_gib=activations,
                params_M=params / 1e6, weights_and_adamw_gib=weights, estimate_gib=activations + weights)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="dim,bidim,dimsum,lamamba,dit",
                   help="families (of size --size) or exact config names")
    p.add_argument("--size", default="L")
    p.add_argument("--res", type=int, default=2048, help="pixels (the latent is res / 8)")
    p.add_argument("--grids", default="32,64", help="the two latent grids counted")
    p.add_argument("--compile", choices=["as-measured", "auto"], default="as-measured",
                   help="as-measured: as the GPU rows ran (LaMamba eager: its per-block compilation "
                        "outlasted the device calls); auto: every model as train.py compiles it")
    p.add_argument("--grad-checkpoint", action="store_true",
                   help="count the step as train.py --grad-checkpoint runs it (each block recomputed)")
    p.add_argument("--out", default=None, help="write the rows as JSON")
    args = p.parse_args(argv)
    grids = tuple(int(g) for g in args.grids.split(","))
    rows = []
    print("| model | compiled | kept per latent pixel (KiB) | activations (GiB) | weights + AdamW (GiB) "
          f"| estimated peak at {args.res} px, batch 1 (GiB) |")
    print("|---|---|---|---|---|---|")
    for spec in args.models.split(","):
        name = resolve(spec, args.size)[0]
        row = estimate(name, args.res, grids, as_measured=args.compile == "as-measured",
                       grad_checkpoint=args.grad_checkpoint)
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
