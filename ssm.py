"""
Mamba-1 mixer and its selective scan, with pure-PyTorch scans that run anywhere.

References:
  Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces", 2023 (Alg. 2, Sec. 3.5).
  state-spaces/mamba (PyPI mamba-ssm): mamba_ssm/modules/mamba_simple.py (the mixer: its interface,
  initialisation and parameter names, reproduced here so that state dicts load either way) and
  mamba_ssm/ops/selective_scan_interface.py (`selective_scan_fn` and the loop `selective_scan_ref`).

Read in this order: the Mamba mixer; the scans in PyTorch (chunked, and the sequential reference); the backend
dispatch. The Triton kernels live in ssm_triton.py.

Backends (`SCANS`, a dict of name -> function with selective_scan's arguments):
  cuda    mamba-ssm's CUDA kernel (when mamba_ssm imports), for CUDA tensors;
  triton  our Triton kernels (ssm_triton.py), for CUDA tensors;
  cpu     our C kernel (ssm_cpu.py: the recurrence compiled on first use with the machine's C compiler), for CPU
          tensors;
  torch   the chunked pure-PyTorch scan (CPU without a C compiler, or a GPU without either kernel);
  ref     the sequential loop, the test oracle.
Choice: the `backend=` argument, else the environment variable DIFFUSION_MAMBA_SCAN=cuda|triton|torch|ref, else
automatic: on CUDA tensors the first usable kernel of AUTO_GPU (triton, then cuda), on CPU tensors the one of
AUTO_CPU (cpu), else torch. A kernel chosen
automatically is checked once per (kernel, device, dtype) at its first call: forward AND backward on small inputs
against the reference loop. A kernel that fails or disagrees is dropped (with a warning) and the next one is
used. A forced backend is never checked and never replaced.

FLOP counting: inside `with count_scan_flops() as scans:` selective_scan does not run; it records its shapes and
returns zeros, and scans.macs is the multiply-accumulate count of the scans it saw (bench.py, bidim.flops and
lamamba.flops use it; torch's FlopCounterMode cannot see inside the scan).
"""

import contextlib
import functools
import math
import os
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

import ssm_cpu
import ssm_triton
from ssm_triton import selective_scan_triton, triton, triton_interpreted  # noqa: F401 (re-exported)

# nanoGPT's "flash" pattern: use the fused kernel if it is there. mamba-ssm 2.3.2.post1 raises
# ModuleNotFoundError (selective_scan_cuda) at import when its extension was not built; later releases import
# fine and raise RuntimeError at the first call, which the first-call check below catches.
try:
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _cuda_scan_fn
except Exception:
    _cuda_scan_fn = None


# -----------------------------------------------------------------------------
# Mamba mixer (parameter names and init as mamba_ssm/modules/mamba_simple.py)
# -----------------------------------------------------------------------------

def _keep_the_scan(ctx, op, *args, **kwargs):
    # selective checkpointing policy: the scan's outputs are kept, everything else runs again
    keep = op is torch.ops.diffmamba.scan.default
    return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE


def mark_block_recomputed(block):
    """Mark every module of a block that is checkpointed whole (models.checkpoint_blocks): its mixers'
    recompute_around_scan then stands aside and the block's checkpoint recomputes their scans too."""
    for module in block.modules():
        module.block_recomputed = True


def scan_dtype(x):
    """The dtype of what a linear layer makes of x: autocast's where it is on (the scan runs in it)."""
    kind = x.device.type
    on = torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind)  # (not on 'meta')
    return torch.get_autocast_dtype(kind) if on and x.is_floating_point() else x.dtype


def recompute_around_scan(fn, *args):
    """fn(*args), the path of a mixer from its input through in_proj to its scan's output (BiDiM's: on
    through out_proj), keeping for the backward only fn's inputs and the scan's outputs: in_proj, the
    causal conv, x_proj, dt_proj and the casts between them run again in the backward instead of keeping
    their (batch, L, d_inner) outputs. mamba-ssm's fused path recomputes the conv output and delta the
    same way (mamba_inner_fn, checkpoint_lvl=1); recomputing in_proj's output as well (2 d_inner
    channels a token, the largest activation of a DiM block) costs one more matrix product in the
    backward, a few percent of a step.
    Only for the Triton scan, whose op the policy can keep (another backend's scan would run twice), and
    once token_backend has checked it in the scan's dtype: a first-call check inside the region would
    run again in the backward.
    fn is a mixer's method. In a block that --grad-checkpoint recomputes whole (mark_block_recomputed),
    fn runs plainly: the block's checkpoint then recomputes the
    scan as well and keeps only the block's inputs (kept here, the policy would keep the scan's outputs
    inside the block's checkpoint too, and the option would save nothing in a Mamba block)."""
    if not torch.is_grad_enabled() or getattr(fn.__self__, "block_recomputed", False):
        return fn(*args)
    return torch.utils.checkpoint.checkpoint(
        fn, *args, use_reentrant=False,
        context_fn=functools.partial(create_selective_checkpoint_contexts, _keep_the_scan))


def split_linear(x, linear):
    """linear(x).chunk(2, dim=-1), as one product per half: the same numbers forward. What
    changes is the backward: the gradient of x is a sum of two products, which the next
    elementwise kernel adds up as it reads them (compiled), where the chunks' gradients would first
    be concatenated into one (..., out_features) copy. Worth it where those gradients come from
    kernels Inductor cannot write into the concatenation directly: in Mamba.inner, the conv's and
    the scan's (the (B, L, 2 d_inner) gradient of in_proj, the widest activation of a block), and in
    LaMamba's SS2D the depthwise 2-D conv's. Where a chunk's gradient comes from elementwise work
    and nothing needs it contiguous (BiDiM's summed branches), Inductor already writes it in place,
    and one product is better."""
    biases = linear.bias.chunk(2) if linear.bias is not None else (None, None)
    return [F.linear(x, w, b) for w, b in zip(linear.weight.chunk(2, dim=0), biases)]


def init_dt_A_D(dt_proj_weight, d_inner, d_state, dt_rank, dt_min=0.001, dt_max=0.1, dt_init="random",
                dt_scale=1.0, dt_init_floor=1e-4, copies=1):
    """Mamba's initialisation of the selective-scan parameters (mamba_simple.py, Mamba.__init__), for `copies`
    independent scans of d_inner channels (LaMamba's SS2D has 4). Fills dt_proj_weight in place (any shape) and
    returns (dt_bias, A_log, D) as tensors of shape (copies * d_inner,), (copies * d_inner, d_state) and
    (copies * d_inner,) (for copies == 1 the leading dimension is d_inner). Draws the weight, then dt."""
    # dt_proj weight: keep the initial dt spread set by the bias, whatever dt_rank is
    dt_init_std = dt_rank ** -0.5 * dt_scale
    with torch.no_grad():
        if dt_init == "constant":
            nn.init.constant_(dt_proj_weight, dt_init_std)
        elif dt_init == "random":
            nn.init.uniform_(dt_proj_weight, -dt_init_std, dt_init_std)
        else:
            raise NotImplementedError(dt_init)
    # dt_proj bias: softplus(bias) = dt, dt log-uniform in [dt_min, dt_max] so channels span many time scales
    shape = (d_inner,) if copies == 1 else (copies, d_inner)
    dt = torch.exp(torch.rand(shape) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=dt_init_floor)
    dt_bias = dt + torch.log(-torch.expm1(-dt))  # inverse of softplus
    # S4D-real init (Gu et al. 2022, "On the Parameterization and Initialization of Diagonal State Space
    # Models"): A = -(1, 2, ..., N) for every channel, stored as log so A stays negative
    A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(copies * d_inner, 1)  # (copies * d_inner, N)
    return dt_bias, torch.log(A), torch.ones(copies * d_inner)  # D = 1: the skip connection


class Mamba(nn.Module):
    """Mamba-1 mixer: in_proj -> causal depthwise conv -> selective scan gated by z -> out_proj."""

    def __init__(self, d_model, d_state=16, d_conv=4, expand=2, dt_rank="auto", dt_min=0.001, dt_max=0.1,
                 dt_init="random", dt_scale=1.0, dt_init_floor=1e-4, conv_bias=True, bias=False,
                 backend=None):
        super().__init__()
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        self.backend = backend
        d_inner = self.d_inner

        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=bias)
        # padding d_conv-1 on both sides, then keep the first L outputs: each output sees only the past
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1,
                                bias=conv_bias)
        self.x_proj = nn.Linear(d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, d_inner, bias=True)

        dt_bias, A_log, D = init_dt_A_D(self.dt_proj.weight, d_inner, d_state, self.dt_rank, dt_min, dt_max,
                                        dt_init, dt_scale, dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt_bias)
        self.dt_proj.bias._no_reinit = True  # model-level init must not zero this bias
        self.A_log = nn.Parameter(A_log)  # (d_inner, N)
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(D)  # skip connection
        self.D._no_weight_decay = True

        self.out_proj = nn.Linear(d_inner, d_model, bias=bias)

    def forward(self, x, order=None):
        """x: (B, L, d_model) -> (B, L, d_model). order: None (scan the tokens as stored) or an (L,) index
        table: scan step p reads token order[p]; the conv and the scan follow it, the output stays in token
        order. The linear layers work in the (B, L, channels) layout and the conv and scan read it in place
        (the GPU kernels; with the PyTorch scan, forward_steps)."""
        # the backend, in the scan's dtype (in_proj's output under autocast), is checked here at its
        # first call: not inside the recomputed region
        which = None if _flop_counters else token_backend(x, self.d_state, self.backend, scan_dtype)
        if which in ("cpu", "torch"):
            return self.forward_steps(x, order, kernel=which == "cpu")
        if which == "triton":
            return self.out_proj(recompute_around_scan(self.inner, x, order))  # (B, L, d_model)
        return self.out_proj(self.inner(x, order))

    def inner(self, x, order=None):
        """The mixer's input (B, L, d_model) -> the gated scan's output (B, L, d_inner)."""
        x, z = split_linear(x, self.in_proj)  # (B, L, d_inner) each
        x = causal_conv_silu(x, self.conv1d.weight, self.conv1d.bias, order, self.backend)  # (B, L, d_inner)
        dt, B, C = torch.split(self.x_proj(x), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        # dt_proj without its bias: the scan adds it before the softplus, in fp32 (as mamba_ssm's slow path)
        dt = dt @ self.dt_proj.weight.t()  # (B, L, d_inner)
        return mamba_scan(x, dt, -torch.exp(self.A_log.float()), B, C, self.D.float(), z,
                          self.dt_proj.bias.float(), order, self.backend)

    def forward_steps(self, x, order=None, kernel=False):
        """forward on a CPU (the C kernel, or with kernel=False the PyTorch scan): the tokens are
        gathered once, into scan order and the steps-first layout (L, B, d_model) the scan reads, before
        in_proj, where the tensor is narrowest; the projections, the conv and the scan then need no gather
        or transpose of their own (in the token layout they took ~30% of a DiM-T/2 step), and the output
        is put back once."""
        idx = None if order is None else order.to(x.device).long()
        x = x.transpose(0, 1)
        x = x.contiguous() if idx is None else x.index_select(0, idx)  # (L, B, d_model), scan order
        x, z = self.in_proj(x).chunk(2, dim=-1)  # views, (L, B, d_inner)
        x = causal_conv_silu_steps(x, self.conv1d.weight.view(self.d_inner, -1), self.conv1d.bias)
        dt, B, C = torch.split(self.x_proj(x), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        y = scan_steps(x, dt @ self.dt_proj.weight.t(), -torch.exp(self.A_log.float()), B, C, self.D.float(),
                       z, self.dt_proj.bias.float(), kernel=kernel)
        y = self.out_proj(y.to(x.dtype)).transpose(0, 1)  # (B, L, d_model), scan order
        return y.contiguous() if idx is None else y.index_select(1, torch.argsort(idx))


# -----------------------------------------------------------------------------
# Selective scan in PyTorch: chunked (fast enough on a CPU) and sequential (the oracle)
# -----------------------------------------------------------------------------

def _prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus, dtype):
    """Shared preamble: upcast, apply bias/softplus, broadcast B and C to (batch, dim or 1, N, L)."""
    u, delta, A = u.to(dtype), delta.to(dtype), A.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    dim = u.shape[1]

    def per_channel(M):  # (b, N, L) -> (b, 1, N, L); grouped (b, G, N, L) -> (b, dim, N, L)
        M = M.to(dtype)
        if M.dim() == 3:
            return M[:, None]
        G = M.shape[1]
        assert dim % G == 0, f"dim {dim} not divisible into {G} groups"
        return M if G == 1 else M.repeat_interleave(dim // G, dim=1)

    return u, delta, A, per_channel(B), per_channel(C)


def _finish(y, u, D, z, out_dtype):
    if D is not None:
        y = y + D.to(y.dtype)[:, None] * u
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(out_dtype)


# Steps per chunk of ChunkedScan: its four (T, b, dim, N) buffers of T = 8 steps stay nearer the core than
# 16 steps' (a DiM-T/2 layer's scan, batch 32, fwd + bwd: ~15% faster than 16, measured; 4 is no faster)
CHUNK = 8


def _chunk_states(deltas, dus, Bs, At, h0, decays, Hs):
    """The states of one chunk from the state h0 before it, written into the buffers decays
    (= exp(delta A)) and Hs. Lists of one view per step: deltas, dus (= delta u): (b, G, 1, dg);
    Bs: (b, G, N, 1); decays, Hs: (b, G, N, dg); At: (G, N, dg); h0: (b, G, N, dg). Three small ops
    per step on one (b, G, N, dg) state: a step's operands stay in the L2 cache, where a chunk-wide op
    over (T, b, G, N, dg) ran at half the speed (measured, T = 16 steps of 256 KiB)."""
    prev = h0
    for d, x, Bt, dec, h in zip(deltas, dus, Bs, decays, Hs):
        torch.mul(d, At, out=dec).exp_()  # <= 1: no overflow whatever delta is
        torch.mul(prev, dec, out=h).addcmul_(Bt, x)  # h_t = exp(delta_t A) h_{t-1} + B_t du_t
        prev = h


class ChunkedScan(torch.autograd.Function):
    """h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t, y_t = C_t . h_t, delta_t = softplus(dt_t) (or dt_t),
    over chunks of T steps. The forward keeps only the inputs, delta and the state at each chunk border;
    the backward recomputes one chunk's states at a time from its border and runs the gradient's
    recurrence backwards through it. Memory: O(b dim L + T b dim N) instead of autograd's O(b dim L N)
    per op; sequential work: a few small ops per step each way.
    Layout: u, dt (L, b, G, dg) and B, C (L, b, G, N), dim split into G groups that share B and C; the
    states are (b, G, N, dg), N before dg. The sums over N (y, the gradient of delta u) and over dg (the
    gradients of B and C) run once per chunk as batched (1, N) x (N, dg) and (1, dg) x (dg, N) products
    (bmm: ~2x faster than multiply-and-sum or a (N, dg) x (dg, 1) product, measured)."""

    @staticmethod
    def forward(ctx, u, dt, A, B, C, T, softplus):
        L, b, G, dg = u.shape
        N = A.shape[-1]
        delta = F.softplus(dt) if softplus else dt
        At, du = A.transpose(1, 2).contiguous(), delta * u  # (G, N, dg), (L, b, G, dg)
        steps = delta.unsqueeze(-2).unbind(0), du.unsqueeze(-2).unbind(0), B.unsqueeze(-1).unbind(0)
        borders = u.new_zeros((L + T - 1) // T, b, G, N, dg)  # the state before each chunk
        decay, H = (u.new_empty(min(T, L), b, G, N, dg) for _ in range(2))
        decays, Hs = decay.unbind(0), H.unbind(0)
        y = u.new_empty(u.shape)  # contiguous whatever u's strides: written through views
        for c, s in enumerate(range(0, L, T)):
            n = min(T, L - s)
            _chunk_states(*(x[s:s + n] for x in steps), At, borders[c], decays, Hs)
            torch.bmm(C[s:s + n].reshape(-1, 1, N), H[:n].view(-1, N, dg), out=y[s:s + n].view(-1, 1, dg))
            if c + 1 < len(borders):
                borders[c + 1] = H[n - 1]
        # delta, not dt: the backward needs no softplus again, and sigmoid(dt) = -expm1(-delta)
        ctx.save_for_backward(u, delta, A, B, C, borders)
        ctx.T, ctx.softplus = T, softplus
        return y

    @staticmethod
    def backward(ctx, dy):
        u, delta, A, B, C, borders = ctx.saved_tensors
        T, (L, b, G, dg), N = ctx.T, u.shape, A.shape[-1]
        At, du, dy = A.transpose(1, 2).contiguous(), delta * u, dy.contiguous()
        steps = delta.unsqueeze(-2).unbind(0), du.unsqueeze(-2).unbind(0), B.unsqueeze(-1).unbind(0)
        Cs, dys = C.unsqueeze(-1).unbind(0), dy.unsqueeze(-2).unbind(0)  # (b, G, N, 1), (b, G, 1, dg)
        decay, H, dH, P = (u.new_empty(min(T, L), b, G, N, dg) for _ in range(4))
        decays, Hs, dHs, Ps = (x.unbind(0) for x in (decay, H, dH, P))
        d_du, ddelta, dB, dC = (u.new_empty(x.shape) for x in (u, u, B, C))  # contiguous, as y
        dA = u.new_zeros(b, G, N, dg)  # sum_t delta_t P_t, summed over b at the end
        carry = u.new_zeros(b, G, N, dg)  # exp(delta_{t+1} A) dL/dh_{t+1}: what reaches h_t from later
        for c in reversed(range(len(borders))):
            s = c * T
            n = min(T, L - s)
            sl, nbg = slice(s, s + n), n * b * G
            _chunk_states(*(x[sl] for x in steps), At, borders[c], decays, Hs)
            # dL/dh_t = C_t dy_t + exp(delta_{t+1} A) dL/dh_{t+1}, backwards through the chunk; P_t =
            # exp(delta_t A) dL/dh_t h_{t-1}, the gradient of delta_t A, made while its operands are hot
            for i in range(n - 1, -1, -1):
                torch.addcmul(carry, Cs[s + i], dys[s + i], out=dHs[i])
                torch.mul(dHs[i], decays[i], out=carry)
                torch.mul(carry, Hs[i - 1] if i else borders[c], out=Ps[i])
                dA.addcmul_(Ps[i], steps[0][s + i])
            Ht, dHt = H[:n].view(nbg, N, dg), dH[:n].view(nbg, N, dg)
            torch.bmm(dy[sl].reshape(nbg, 1, dg), Ht.transpose(1, 2), out=dC[sl].view(nbg, 1, N))
            torch.bmm(du[sl].reshape(nbg, 1, dg), dHt.transpose(1, 2), out=dB[sl].view(nbg, 1, N))
            torch.bmm(B[sl].reshape(nbg, 1, N), dHt, out=d_du[sl].view(nbg, 1, dg))
            # through the decays: ddelta_t = sum_N A P_t (H is free now)
            torch.sum(torch.mul(P[:n], At, out=H[:n]), dim=-2, out=ddelta[sl])
        ddelta += d_du * u
        if ctx.softplus:  # d softplus(x) / dx = sigmoid(x) = 1 - exp(-softplus(x))
            ddelta *= torch.expm1(-delta).neg_()
        return d_du * delta, ddelta, dA.sum(0).transpose(1, 2), dB, dC, None, None


def recurrence(u, dt, A, B, C, T, softplus, kernel=False, D=None, z=None):
    """(C . h + D u) silu(z) of the recurrence, in ChunkedScan's arguments (steps-first, dim in G groups);
    D (G * dg,) and z (L, b, G * dg) optional. kernel=True runs the C kernel (ssm_cpu.py, D and the gate
    fused into it) on fp32 CPU tensors, with softplus in PyTorch around it; else ChunkedScan."""
    L, b, G, dg = u.shape
    flat = lambda x: x.reshape(L, b, G * dg)
    if kernel and u.dtype == torch.float32 and u.device.type == "cpu":
        delta = F.softplus(dt) if softplus else dt
        dense = lambda x: None if x is None else x.contiguous()
        y, _ = ssm_cpu.scan_op(dense(flat(u)), dense(flat(delta)), dense(A.reshape(G * dg, -1)), dense(B),
                               dense(C), dense(D), None if z is None else dense(flat(z)))
        return y.view(L, b, G, dg)
    y = flat(ChunkedScan.apply(u, dt, A, B, C, T, softplus))
    if D is not None:
        y = torch.addcmul(y, flat(u), D)
    return (y if z is None else y * F.silu(flat(z))).view(L, b, G, dg)


def selective_scan_torch(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                         chunk_size=None, kernel=False):
    """
    The pure-PyTorch scan (CPU, or a GPU without a kernel), fp32 inside (fp64 for fp64 inputs): ChunkedScan for
    the recurrence, autograd for the cheap (b, dim, L) parts around it. kernel=True: the C kernel for the
    recurrence (the 'cpu' backend).

    Why a loop over L and not a parallel form: A differs per (channel, state), so Mamba-2's quadratic chunk form
    would need a (b, dim, T, T, N) decay matrix, and a cumsum-based scan divides by cumulative decays that
    overflow; a parallel scan over chunks (all chunks from a zero state, then the borders) costs several more
    passes over (b, dim, L, N) tensors, which is what limits a CPU. The loop's step is a few ops on a
    (b, dim, N) state that stays in cache; the sums over N and dim run once per chunk of T = CHUNK steps, as
    batched products.
    """
    out_dtype = u.dtype
    dtype = torch.promote_types(u.dtype, torch.float32)
    b, dim, L = u.shape
    T = max(1, min(chunk_size or CHUNK, L))
    with torch.autocast(u.device.type, enabled=False):  # keep the scan in fp32 under bf16 autocast
        u, delta, A = u.to(dtype), delta.to(dtype), A.to(dtype)
        if delta_bias is not None:
            delta = delta + delta_bias.to(dtype)[:, None]
        B, C = (M.to(dtype)[:, None] if M.dim() == 3 else M.to(dtype) for M in (B, C))  # (b, G, N, L)
        G, N = B.shape[1:3]
        assert dim % G == 0, f"dim {dim} not divisible into {G} groups"
        steps_first = lambda M: M.permute(2, 0, 1).reshape(L, b, G, dim // G)  # (b, dim, L) -> (L, b, G, dg)
        y = recurrence(steps_first(u), steps_first(delta), A.view(G, dim // G, N),
                       B.permute(3, 0, 1, 2).contiguous(), C.permute(3, 0, 1, 2).contiguous(), T,
                       delta_softplus, kernel)
        y = y.reshape(L, b, dim).permute(1, 2, 0)  # (b, dim, L)
        return _finish(y, u, D, z, out_dtype)


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Sequential loop over L, the test oracle. Computes in fp32 (fp64 if u is fp64); same arguments as above."""
    out_dtype = u.dtype
    dtype = torch.promote_types(u.dtype, torch.float32)
    u, delta, A, B, C = _prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus, dtype)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])  # (b, dim, N)
    ys = []
    for t in range(u.shape[2]):
        dt = delta[:, :, t, None]  # (b, dim, 1)
        h = torch.exp(dt * A) * h + dt * u[:, :, t, None] * B[..., t]
        ys.append((h * C[..., t]).sum(-1))
    y = torch.stack(ys, dim=-1)  # (b, dim, L)
    return _finish(y, u, D, z, out_dtype)




# -----------------------------------------------------------------------------
# Backend dispatch
# -----------------------------------------------------------------------------

# name -> scan with selective_scan's arguments (u, delta, A, B, C, D, z, delta_bias, delta_softplus); None when
# the kernel is not installed. A new kernel is one entry here (and in AUTO_GPU if it should be tried by default).
SCANS = {
    "cuda": _cuda_scan_fn,
    "triton": selective_scan_triton if triton is not None else None,
    "cpu": functools.partial(selective_scan_torch, kernel=True),
    "torch": selective_scan_torch,
    "ref": selective_scan_ref,
}
AUTO_GPU = ["triton", "cuda"]  # tried in this order on CUDA tensors, each checked at its first call
AUTO_CPU = ["cpu"]  # likewise on CPU tensors
BACKENDS = tuple(SCANS)
_checked, _broken, _warned = set(), set(), set()  # (kernel, device, dtype) that passed; kernels that failed


def _warn_once(msg):
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, stacklevel=3)


def scan_backend(x, backend=None):
    """Which backend selective_scan() would run for tensors like x: a key of SCANS."""
    backend = backend or os.environ.get("DIFFUSION_MAMBA_SCAN") or None
    if backend is not None:
        if backend not in SCANS:
            raise ValueError(f"unknown scan backend {backend!r}, expected one of {BACKENDS}")
        if SCANS[backend] is None:
            raise RuntimeError(f"scan backend {backend!r} requested but it is not installed "
                               f"({'mamba_ssm' if backend == 'cuda' else backend} does not import)")
        return backend
    for kernel in AUTO_GPU if x.is_cuda else AUTO_CPU if x.device.type == "cpu" else []:
        if SCANS.get(kernel) is not None and kernel not in _broken:
            return kernel
    if x.is_cuda:
        _warn_once("no GPU selective-scan kernel (mamba-ssm, triton) is usable; using the pure-PyTorch scan "
                   "(much slower)")
    return "torch"


def check_kernel(kernel, u, A, B):
    """Run SCANS[kernel] forward and backward on small inputs shaped like a call on (u, A, B) (same device,
    dtype, state size and B/C grouping) and compare with the reference loop; raise if it fails or disagrees."""
    G = B.shape[1] if B.dim() == 4 else None
    dim, L, N = 2 * (G or 4), 70, A.shape[1]  # 70 steps: more than one 64-step chunk of the Triton kernel
    g = torch.Generator().manual_seed(0)
    rn = lambda *s: torch.randn(*s, generator=g)
    bc = (1, N, L) if G is None else (1, G, N, L)
    inputs = dict(u=rn(1, dim, L), delta=0.5 * rn(1, dim, L), A=-torch.rand(dim, N, generator=g) - 0.5,
                  B=rn(*bc), C=rn(*bc), D=rn(dim), z=rn(1, dim, L), delta_bias=rn(dim) - 2)
    low = ("u", "delta", "B", "C", "z")  # in the call's dtype; A, D, delta_bias stay fp32 as in the mixer
    inputs = {k: v.to(u.device, u.dtype if k in low else torch.float32) for k, v in inputs.items()}
    dy = rn(1, dim, L).to(u.device, u.dtype)
    results = []
    for fn in (SCANS[kernel], selective_scan_ref):
        leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
        with torch.enable_grad(), torch.autocast(u.device.type, enabled=False):
            y = fn(*leaves.values(), delta_softplus=True)
            grads = torch.autograd.grad(y, list(leaves.values()), dy)
        results.append([y, *grads])
    tol = 1e-3 if u.dtype == torch.float32 else 5e-2
    for name, a, b in zip(["out", *inputs], *results):
        err = ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()
        if not err <= tol:  # also catches NaN
            raise RuntimeError(f"{name} differs from the reference scan by {err:.1e} (relative)")
    if kernel == "triton":
        check_conv_kernel(u)


def checked_backend(u, A, B, backend=None):
    """scan_backend(u, backend), where a GPU kernel chosen automatically has passed check_kernel once per
    (kernel, device, dtype); one that fails is dropped with a warning and the next one is used."""
    forced = backend or os.environ.get("DIFFUSION_MAMBA_SCAN")
    which = scan_backend(u, backend)
    while not forced and which in AUTO_GPU + AUTO_CPU and (which, u.device, u.dtype) not in _checked:
        try:
            # identity saved-tensor hooks: a first call can come inside a torch.utils.checkpoint region
            # (a block that is recomputed, or a compiled block's eager fragment), whose hooks would take
            # the check's own saved tensors as the region's: its recomputation would stop at the first
            # one and the kernel be dropped as failed (seen on LaMamba-L, which then ran the PyTorch scan)
            with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
                check_kernel(which, u, A, B)
            _checked.add((which, u.device, u.dtype))
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # mamba-ssm without its extension, a GPU Triton cannot compile for, no C compiler
            _broken.add(which)
            failed, which = which, scan_backend(u)
            _warn_once(f"the {failed} selective scan failed its first-call check "
                       f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); using {which}")
    return which


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, backend=None):
    """
    Mamba-1 selective scan, same semantics as mamba_ssm's selective_scan_fn (Gu & Dao 2023, Alg. 2):
        dt_t = softplus(delta_t + delta_bias) (if delta_softplus)
        h_t  = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t,   y_t = C_t . h_t + D * u_t,   y *= silu(z)
    u, delta, z: (batch, dim, L); A: (dim, N) real fp32; B, C: (batch, N, L) or grouped (batch, G, N, L)
    (dim split into G equal groups); D, delta_bias: (dim,) fp32. Returns y (batch, dim, L) in u's dtype.
    backend: None = automatic (see the module docstring), or a key of SCANS: 'cuda', 'triton', 'torch', 'ref'.
    """
    if _flop_counters:  # counting, not computing: record the cost and return a stand-in
        b, d, L = u.shape
        for counter in _flop_counters:
            counter.macs += b * d * L * (9 * A.shape[-1] + 1 + (z is not None))
            counter.calls += 1
        return torch.zeros_like(u)
    which = checked_backend(u, A, B, backend)
    return SCANS[which](u, delta, A, B, C, D, z, delta_bias, delta_softplus)


# -----------------------------------------------------------------------------
# Scan and conv in the token layout (what the models call)
# -----------------------------------------------------------------------------

def token_backend(x, d_state, backend=None, dtype_of=None):
    """The backend of a token-layout call on x: checked_backend's choice (the kernels checked at their first
    call, the Triton one together with the conv kernel; under torch.compile the choice of the eager run).
    dtype_of: a function of x giving the dtype the scan will run in, when it is not x's (scan_dtype, for a
    mixer's input under autocast); called only outside torch.compile, whose torch 2.11 cannot trace
    autocast's queries (a graph break in every block, measured: 2x slower DiM-L/2 steps)."""
    which = scan_backend(x, backend)
    if torch.compiler.is_compiling():
        return which
    if dtype_of is not None:
        x = x.new_empty(0, dtype=dtype_of(x))
    if which not in AUTO_GPU + AUTO_CPU or (which, x.device, x.dtype) in _checked:
        return which  # the hot path: checked already, forced, or nothing to check
    return checked_backend(x, torch.empty(1, d_state), torch.empty(1, d_state, 1), backend)


def scan_reference(u, delta, A, B, C, D, z, dt_bias, order, scan=None):
    """mamba_scan through a (batch, dim, L) scan (the loop, mamba-ssm's kernel): each direction gathered into
    scan order, scanned, scattered back.
    u, delta, z: (batch, L, K, dim); B, C: (batch, L, K, N); A: (K, dim, N); D, dt_bias: (K, dim)."""
    scan = scan or selective_scan_torch
    outs = []
    for k in range(u.shape[2]):
        idx = order[k].long() if order is not None else None
        take = lambda x: None if x is None else (x[:, :, k] if idx is None else x[:, idx, k]).transpose(1, 2)
        y = scan(take(u), take(delta), A[k], take(B), take(C), None if D is None else D[k], z=take(z),
                 delta_bias=None if dt_bias is None else dt_bias[k], delta_softplus=True)
        if idx is not None:
            y = y[..., torch.argsort(idx)]
        outs.append(y.transpose(1, 2))
    return torch.stack(outs, 2)


def scan_steps(u, dt, A, B, C, D=None, z=None, dt_bias=None, chunk_size=CHUNK, kernel=False):
    """The selective scan (softplus on dt + dt_bias) in the steps-first layout ChunkedScan reads:
    u, dt, z: (L, batch, dim), B, C: (L, batch, N), any strides; A: (dim, N); D, dt_bias: (dim,).
    Returns y (L, batch, dim) in fp32 (fp64 for fp64 inputs), fp32 under bf16 autocast too. kernel: as
    recurrence's."""
    dtype = torch.promote_types(u.dtype, torch.float32)
    with torch.autocast(u.device.type, enabled=False):
        u, dt = u.to(dtype), dt.to(dtype)
        if dt_bias is not None:
            dt = dt + dt_bias.to(dtype)
        return recurrence(u[:, :, None], dt[:, :, None], A.to(dtype)[None],
                          B.to(dtype).contiguous()[:, :, None], C.to(dtype).contiguous()[:, :, None],
                          chunk_size, True, kernel, None if D is None else D.to(dtype),
                          None if z is None else z.to(dtype)).squeeze(2)


def scan_torch_tokens(u, delta, A, B, C, D, z, dt_bias, order, chunk_size=CHUNK, kernel=False):
    """mamba_scan in PyTorch on a CPU: each direction gathered straight from the token layout into
    the steps-first one, (L, batch, ch), contiguous, with one copy (index_select in scan order),
    scanned (scan_steps), and put back in token order. Arguments as scan_reference's."""
    outs = []
    for k in range(u.shape[2]):
        idx = None if order is None else order[k].long()

        def steps(x):  # (batch, L, K, ch) -> (L, batch, ch), scan order
            x = x[:, :, k].transpose(0, 1)
            return x.contiguous() if idx is None else x.index_select(0, idx)
        y = scan_steps(steps(u), steps(delta), A[k], steps(B), steps(C), None if D is None else D[k],
                       None if z is None else steps(z), None if dt_bias is None else dt_bias[k], chunk_size,
                       kernel)
        if idx is not None:
            y = y.index_select(0, torch.argsort(idx))
        outs.append(y.transpose(0, 1).to(u.dtype))  # (batch, L, dim)
    return torch.stack(outs, 2)


def mamba_scan(u, delta, A, B, C, D=None, z=None, dt_bias=None, order=None, backend=None,
               out_dtype=None, sum_directions=False):
    """The selective scan (softplus on delta + dt_bias) in the token layout the linear layers use.
    u, delta, z: (batch, L, dim), or (batch, L, K, dim) for K directions (u or z may stay 3-D: shared by all);
    B, C: (batch, L, N) or (batch, L, K, N), e.g. views of x_proj's output; A: (dim, N) or (K, dim, N) fp32;
    D, dt_bias: (dim,) or (K, dim) fp32; order: None (scan in storage order), an (L,) or (K, L) integer table
    of the token read at each scan step. Returns (batch, L, dim) or (batch, L, K, dim) in out_dtype (default
    u's dtype). A wider out_dtype means the scan of the inputs converted to it (LaMamba's SS2D scans bf16
    activations in fp32): the Triton kernel computes in fp32 whatever it reads, so it takes the inputs as
    they are, with no converted copies (nor converted gradients) in memory; the other paths convert them.
    sum_directions: return the K scans' sum, (batch, L, dim) (LaMamba's SS2D adds its four): on the
    Triton path the op itself sums when gradients are on, so that a recomputed region
    (recompute_around_scan) keeps the sum, not the K outputs, and the backward reads the sum's gradient
    K times instead of a K-fold copy; without them (sampling) the sum follows the op, where a compiled
    block fuses it into the next kernel.
    On a GPU this is one Triton kernel (ssm_triton.py) with no copy around it; on a CPU each direction is
    gathered into scan order and run by the C kernel (ssm_cpu.py) or ChunkedScan (scan_torch_tokens), both
    recomputing in the backward instead of storing their (.., L, N) intermediates."""
    single = A.dim() == 2
    K = 1 if single else A.shape[0]
    batch, L = u.shape[:2]
    if _flop_counters:
        for counter in _flop_counters:
            counter.macs += batch * L * K * A.shape[-2] * (9 * A.shape[-1] + 1 + (z is not None))
            counter.calls += K
        shape = (batch, L, A.shape[-2]) if single or sum_directions else (batch, L, K, A.shape[-2])
        return u.new_zeros(shape, dtype=out_dtype or u.dtype)

    def four(x):  # (batch, L, ch) -> (batch, L, K, ch) without copying
        if x is None or x.dim() == 4:
            return x
        return x.unsqueeze(2).expand(batch, L, K, x.shape[-1])

    param = lambda x: None if x is None else (x[None] if single else x).float().contiguous()
    if order is not None:
        order = order.to(device=u.device, dtype=torch.int32)
        order = (order[None] if order.dim() == 1 else order).expand(K, L).contiguous()
    u, delta, z, B, C = four(u), four(delta), four(z), four(B), four(C)
    A, D, dt_bias = param(A), param(D), param(dt_bias)
    which = token_backend(u, A.shape[-1], backend)
    if which != "triton" and out_dtype is not None:
        u, delta, z, B, C = (None if x is None else x.to(out_dtype) for x in (u, delta, z, B, C))
    if which == "triton":
        out = ssm_triton.scan(u, delta, z, B, C, A, D, dt_bias, order, out_dtype=out_dtype,
                              sum_directions=sum_directions)
    elif which in ("cpu", "torch"):  # the C kernel or ChunkedScan: no (.., L, N) tensor kept for the backward
        out = scan_torch_tokens(u, delta, A, B, C, D, z, dt_bias, order, kernel=which == "cpu")
    else:  # mamba-ssm's kernel (the whole job: gathers and transposes included), or the loop
        out = scan_reference(u, delta, A, B, C, D, z, dt_bias, order, SCANS[which])
    if sum_directions:  # the Triton op has summed them already
        return out if which == "triton" else out.sum(2)
    # squeeze, not [:, :, 0]: a select's backward would fill a zero tensor and copy the gradient into it
    return out.squeeze(2) if single else out


def conv_reference(x, weight, bias, order):
    """causal_conv_silu in PyTorch: gather into scan order, F.conv1d, scatter back."""
    idx = order.long() if order is not None else None
    xs = (x if idx is None else x[:, idx]).transpose(1, 2)
    y = F.conv1d(xs, weight[:, None], bias, padding=weight.shape[1] - 1, groups=weight.shape[0])
    y = F.silu(y[..., :x.shape[1]])
    if idx is not None:
        y = y[..., torch.argsort(idx)]
    return y.transpose(1, 2)


def causal_conv_silu(x, weight, bias=None, order=None, backend=None):
    """silu(causal depthwise conv of width W) along the scan order: Mamba's conv1d (padding W - 1, output cut
    to L). x: (batch, L, dim), any strides; weight: (dim, 1, W) as nn.Conv1d stores it, or (dim, W);
    order: None or an (L,) table of the token read at each step. Returns (batch, L, dim)."""
    weight = weight.reshape(weight.shape[0], -1)
    if order is not None:
        order = order.to(device=x.device, dtype=torch.int32).contiguous()
    if (not _flop_counters and weight.shape[1] <= ssm_triton.CONV_MAX_WIDTH
            and token_backend(x, 1, backend) == "triton"):
        return ssm_triton.conv(x, weight.contiguous(), bias, order)
    return conv_reference(x, weight, bias, order)


def depthwise_conv2d_reference(x, weight, bias=None):
    """depthwise_conv2d_silu in PyTorch: nn.Conv2d's depthwise conv on the (B, D, H, W) view, SiLU."""
    p = (weight.shape[-1] - 1) // 2
    y = F.conv2d(x.permute(0, 3, 1, 2), weight, bias, padding=p, groups=x.shape[-1])
    return F.silu(y).permute(0, 2, 3, 1)


def depthwise_conv2d_silu(x, weight, bias=None, backend=None):
    """silu(depthwise K x K conv, zero padding (K - 1) // 2) of a channels-last map, as VMamba's SS2D
    applies it before its scans: x (B, H, W, D), any strides; weight (D, 1, K, K) as nn.Conv2d stores it,
    K odd; bias (D,) or None. Returns (B, H, W, D) in x's dtype. One Triton kernel each way on the
    Triton backend (ssm_triton.dwconv_silu: no permute copies, the SiLU inside), else cuDNN's conv."""
    if weight.shape[-1] % 2 != 1 or weight.shape[-2:] != (weight.shape[-1],) * 2:
        raise ValueError(f"depthwise_conv2d_silu takes odd square kernels, got {tuple(weight.shape)}")
    if not _flop_counters and token_backend(x, 1, backend) == "triton":
        return ssm_triton.dwconv_silu(x, weight, bias)
    return depthwise_conv2d_reference(x, weight, bias)


def sum_norm_gate(y, z, weight, bias, eps, backend=None):
    """VMamba's SS2D output after its scans: LayerNorm(weight, bias, eps) of the K directions' sum,
    rounded to z's dtype, times silu(z). y: (B, L, K, D) fp32 scan outputs; z: (B, ..., D) with L
    tokens a sample. Returns z's shape and dtype. Without gradients on the Triton backend one kernel
    (ssm_triton.sum_norm_gate: y read once, no autograd); else the same steps in PyTorch."""
    if not torch.is_grad_enabled() and token_backend(z, 1, backend) == "triton":
        return ssm_triton.sum_norm_gate(y, z, weight, bias, eps)
    normed = F.layer_norm(y.sum(2), (y.shape[-1],), weight, bias, eps)
    return normed.view(z.shape).to(z.dtype) * F.silu(z)


class ConvSiluSteps(torch.autograd.Function):
    """silu(causal depthwise conv) along L in the steps-first layout, as W shifted multiply-adds: x (L, batch,
    dim), any strides; weight (dim, W); bias (dim,) or None. One function instead of autograd's graph of
    pads, slices and accumulations: ~6 fewer passes over (L, batch, dim) per call (measured ~1/3 of the
    conv's time on a DiM-T/2 layer)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        W = weight.shape[1]
        y = x * weight[:, W - 1] if bias is None else torch.addcmul(bias, x, weight[:, W - 1])
        for k in range(W - 1):  # tap k reads the step s = W - 1 - k before; zeros before the start
            s = W - 1 - k
            y[s:].addcmul_(x[:-s], weight[:, k])
        ctx.save_for_backward(x, weight, y)
        ctx.has_bias = bias is not None
        return F.silu(y)

    @staticmethod
    def backward(ctx, dout):
        x, weight, y = ctx.saved_tensors
        W = weight.shape[1]
        g = torch.ops.aten.silu_backward(dout, y)  # d/dy, (L, batch, dim)
        dx, dw = g * weight[:, W - 1], torch.empty_like(weight)
        dw[:, W - 1] = torch.mul(g, x).sum((0, 1))
        for k in range(W - 1):
            s = W - 1 - k
            dx[:-s].addcmul_(g[s:], weight[:, k])
            dw[:, k] = torch.mul(g[s:], x[:-s]).sum((0, 1))
        return dx, dw, g.sum((0, 1)) if ctx.has_bias else None


def causal_conv_silu_steps(x, weight, bias=None):
    """causal_conv_silu in the steps-first layout: x (L, batch, dim), any strides; weight (dim, W).
    No transpose to conv1d's (batch, dim, L). Returns (L, batch, dim)."""
    return ConvSiluSteps.apply(x, weight, bias)


def check_conv_kernel(x):
    """The conv kernels (1-D causal, 2-D depthwise) forward and backward on small inputs against
    conv_reference and depthwise_conv2d_reference (first-call check)."""
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(70, generator=g).to(x.device, torch.int32)
    cases = [(lambda x, w, b: ssm_triton.conv(x, w, b, order),
              lambda x, w, b: conv_reference(x, w, b, order), (1, 70, 8), (8, 3)),
             (ssm_triton.dwconv_silu, depthwise_conv2d_reference, (1, 5, 7, 8), (8, 1, 3, 3))]
    for kernel, reference, x_shape, w_shape in cases:
        inputs = [torch.randn(*x_shape, generator=g), torch.randn(*w_shape, generator=g),
                  torch.randn(8, generator=g)]
        dy = torch.randn(*x_shape, generator=g).to(x.device, x.dtype)
        results = []
        # the kernel gets x in the call's dtype and fp32 weights, as in the mixer; the reference all fp32
        for fn, dtype in ((kernel, x.dtype), (reference, torch.float32)):
            leaves = [t.to(x.device, dtype if i == 0 else torch.float32).requires_grad_() for i, t in
                      enumerate(inputs)]
            with torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
                y = fn(*leaves)
                results.append([y, *torch.autograd.grad(y, leaves, dy.to(dtype))])
        tol = 1e-3 if x.dtype == torch.float32 else 5e-2
        for a, b in zip(*results):
            err = ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()
            if not err <= tol:
                raise RuntimeError(f"the conv kernel differs from the reference by {err:.1e} (relative)")


# -----------------------------------------------------------------------------
# Cost
# -----------------------------------------------------------------------------

_flop_counters = []


class ScanFlops:
    """Multiply-accumulates of the selective scans run inside count_scan_flops(), and how many calls."""
    def __init__(self):
        self.macs, self.calls = 0, 0


@contextlib.contextmanager
def count_scan_flops():
    """Inside this context selective_scan() records its cost instead of running (it returns zeros of u's shape):
    a call on u (b, d, L) with A (d, N) adds b*d*L*(9N + 1) MACs, plus b*d*L when gated by z. This is VMamba's
    count (MzeroMiko/VMamba, classification/models/vmamba.py, flops_selective_scan_ref), the one the
    models' papers report. Use with torch.utils.flop_counter.FlopCounterMode for the rest of the model; both
    work on the meta device."""
    counter = ScanFlops()
    _flop_counters.append(counter)
    try:
        yield counter
    finally:
        _flop_counters.remove(counter)
