"""
Mamba-1 selective scan and the Mamba mixer, with a pure-PyTorch fallback.

References:
  Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces", 2023.
  state-spaces/mamba (PyPI mamba-ssm): `selective_scan_fn` and `modules/mamba_simple.py`, whose interface,
  initialisation and parameter names this file reproduces so that state dicts load either way.

The CUDA kernel of mamba-ssm is used when it imports and the tensors live on a GPU; otherwise a chunked
pure-PyTorch scan runs (CPU tests, machines without the extension). Force a path with the environment variable
DIFFUSION_MAMBA_SCAN=torch|cuda or the `backend` argument. `selective_scan_ref` is a plain loop over the
sequence, kept as the test oracle.
"""

import math
import os
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

# nanoGPT's "flash" pattern: use the fused kernel if it is there. mamba-ssm 2.3.2.post1 raises
# ModuleNotFoundError (selective_scan_cuda) at import when its extension was not built; later releases import
# fine and raise RuntimeError at the first call, which selective_scan() below also treats as "missing".
try:
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _cuda_scan_fn
except Exception:
    _cuda_scan_fn = None
_cuda_broken = False  # set when the kernel imported but failed at its first call
_cuda_verified = False  # set after the first successful kernel call
_warned = set()

BACKENDS = ("cuda", "torch", "ref")


def _warn_once(msg):
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, stacklevel=3)


def scan_backend(x, backend=None):
    """Which implementation selective_scan() would run for tensors like x: 'cuda', 'torch' or 'ref'."""
    backend = backend or os.environ.get("DIFFUSION_MAMBA_SCAN") or None
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown scan backend {backend!r}, expected one of {BACKENDS}")
        if backend == "cuda" and _cuda_scan_fn is None:
            raise RuntimeError("scan backend 'cuda' requested but mamba_ssm's selective_scan_fn is not importable")
        return backend
    if x.is_cuda and _cuda_scan_fn is not None and not _cuda_broken:
        return "cuda"
    if x.is_cuda:
        _warn_once("mamba-ssm CUDA selective scan unavailable; using the pure-PyTorch scan (much slower)")
    return "torch"


# -----------------------------------------------------------------------------
# Selective scan
# -----------------------------------------------------------------------------

def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, backend=None):
    """
    Mamba-1 selective scan, same semantics as mamba_ssm's selective_scan_fn:
        dt_t = softplus(delta_t + delta_bias) (if delta_softplus)
        h_t  = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t,   y_t = C_t . h_t + D * u_t,   y *= silu(z)
    u, delta, z: (batch, dim, L); A: (dim, N) real fp32; B, C: (batch, N, L) or grouped (batch, G, N, L)
    (dim split into G equal groups); D, delta_bias: (dim,) fp32. Returns y (batch, dim, L) in u's dtype.
    backend: None = auto, 'cuda' (mamba-ssm kernel), 'torch' (chunked pure PyTorch), 'ref' (sequential loop).
    """
    global _cuda_broken, _cuda_verified
    which = scan_backend(u, backend)
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    if which == "cuda":
        forced = (backend or os.environ.get("DIFFUSION_MAMBA_SCAN")) == "cuda"
        if _cuda_verified or forced:
            return _cuda_scan_fn(*args)
        try:
            y = _cuda_scan_fn(*args)
            _cuda_verified = True
            return y
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as e:  # e.g. "selective_scan_cuda is not installed" in newer mamba-ssm
            _cuda_broken = True
            _warn_once(f"mamba-ssm CUDA selective scan failed at first call ({e}); using the pure-PyTorch scan")
    if which == "ref":
        return selective_scan_ref(*args)
    return selective_scan_torch(*args)


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


def selective_scan_torch(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                         chunk_size=None):
    """
    Chunked pure-PyTorch scan, fp32 inside. Autograd runs through plain ops.

    Why not Mamba-2's quadratic (T x T) chunk form: here A differs per (channel, state), so the in-chunk decay
    matrix would be (batch, dim, chunk, T, T, N), T times the size of all the states; the recurrence itself is
    cheaper. Instead L is cut into nc chunks of T steps and
      1. the recurrence runs from a zero state inside every chunk at once (T steps, all chunks in parallel),
      2. a short loop over the nc chunk borders carries the true state into each chunk,
      3. every in-chunk state gets the carried state times its decay since the chunk start.
    Every exponent is a sum of dt*A <= 0, so nothing overflows whatever dt is (no division by a cumulative decay,
    the classic overflow of cumsum-based scans). T ~ sqrt(L) keeps the Python loop at ~2*sqrt(L) steps.
    """
    out_dtype = u.dtype
    b, dim, L = u.shape
    T = chunk_size or max(1, math.ceil(math.sqrt(L)))
    T = min(T, L)
    nc = math.ceil(L / T)
    pad = nc * T - L
    with torch.autocast(u.device.type, enabled=False):  # keep the scan in fp32 under bf16 autocast
        u, delta, A, B, C = _prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus, torch.float32)
        # padding with dt = 0 and u = 0 gives decay 1 and input 0: the state passes through, outputs are cut off.
        # Chunk position t goes first so that the step-t slices are contiguous and unbind/stack (not indexing,
        # whose backward writes a full-size zero tensor per slice) carry the autograd graph.
        chunked = lambda M: F.pad(M, (0, pad)).unflatten(-1, (nc, T)).movedim(-1, 0)  # (..., L) -> (T, ..., nc)
        dt, du = chunked(delta), chunked(delta * u)  # (T, b, dim, nc)
        Bc, Cc = chunked(B).transpose(-1, -2), chunked(C).transpose(-1, -2)  # (T, b, dim|1, nc, N)
        dA = dt[..., None] * A[:, None, :]  # (T, b, dim, nc, N), <= 0
        x = du[..., None] * Bc  # (T, b, dim, nc, N)

        # 1. in-chunk recurrence from a zero state, all chunks at once
        decay, xs = torch.exp(dA).unbind(0), x.unbind(0)
        hs = [xs[0]]
        for t in range(1, T):
            hs.append(decay[t] * hs[-1] + xs[t])  # (b, dim, nc, N)
        h_local = torch.stack(hs)  # (T, b, dim, nc, N)

        # 2. carry the state across chunk borders; decay_to_t = exp(sum_{k<=t} dA_k) lies in (0, 1]
        decay_to_t = torch.exp(torch.cumsum(dA, dim=0))  # (T, b, dim, nc, N)
        chunk_decay, chunk_last = decay_to_t[-1].unbind(2), h_local[-1].unbind(2)  # nc x (b, dim, N)
        carry = [torch.zeros_like(chunk_last[0])]  # state entering chunk 0
        for c in range(nc - 1):
            carry.append(chunk_decay[c] * carry[-1] + chunk_last[c])
        carry = torch.stack(carry, dim=2)  # (b, dim, nc, N)

        # 3. true states and outputs
        h = h_local + decay_to_t * carry  # (T, b, dim, nc, N)
        y = (h * Cc).sum(-1)  # (T, b, dim, nc)
        y = y.movedim(0, -1).reshape(b, dim, nc * T)[..., :L]  # (b, dim, L)
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
# Mamba mixer (parameter names and init as mamba_ssm.modules.mamba_simple.Mamba)
# -----------------------------------------------------------------------------

class Mamba(nn.Module):
    """Mamba-1 mixer: in_proj -> causal depthwise conv -> selective scan gated by z -> out_proj."""

    def __init__(self, d_model, d_state=16, d_conv=4, expand=2, dt_rank="auto", dt_min=0.001, dt_max=0.1,
                 dt_init="random", dt_scale=1.0, dt_init_floor=1e-4, conv_bias=True, bias=False, backend=None):
        super().__init__()
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        self.backend = backend
        d_inner = self.d_inner

        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=bias)
        # padding d_conv-1 on both sides, then keep the first L outputs: each output sees only the past
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1, bias=conv_bias)
        self.x_proj = nn.Linear(d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, d_inner, bias=True)

        # dt_proj weight: keep the initial dt spread set by the bias, whatever dt_rank is
        dt_init_std = self.dt_rank ** -0.5 * dt_scale
        if dt_init == "constant":
            nn.init.constant_(self.dt_proj.weight, dt_init_std)
        elif dt_init == "random":
            nn.init.uniform_(self.dt_proj.weight, -dt_init_std, dt_init_std)
        else:
            raise NotImplementedError(dt_init)
        # dt_proj bias: softplus(bias) = dt, dt log-uniform in [dt_min, dt_max] so channels span many time scales
        dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        inv_softplus_dt = dt + torch.log(-torch.expm1(-dt))  # inverse of softplus
        with torch.no_grad():
            self.dt_proj.bias.copy_(inv_softplus_dt)
        self.dt_proj.bias._no_reinit = True  # model-level init must not zero this bias

        # S4D-real init: A = -(1, 2, ..., N) for every channel, stored as log so A stays negative
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_inner, 1)  # (d_inner, N)
        self.A_log = nn.Parameter(torch.log(A))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(d_inner))  # skip connection
        self.D._no_weight_decay = True

        self.out_proj = nn.Linear(d_inner, d_model, bias=bias)

    def forward(self, x):
        """x: (B, L, d_model) -> (B, L, d_model)."""
        Bsz, L, _ = x.shape
        xz = self.in_proj(x).transpose(1, 2)  # (B, 2*d_inner, L)
        x, z = xz.chunk(2, dim=1)  # (B, d_inner, L) each
        x = F.silu(self.conv1d(x)[..., :L])  # causal: drop the outputs that looked ahead
        x_dbl = self.x_proj(x.transpose(1, 2))  # (B, L, dt_rank + 2N)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        # dt_proj without its bias: the scan adds it before the softplus, in fp32 (as mamba_ssm's slow path)
        dt = (dt @ self.dt_proj.weight.t()).transpose(1, 2)  # (B, d_inner, L)
        B = B.transpose(1, 2).contiguous()  # (B, N, L)
        C = C.transpose(1, 2).contiguous()  # (B, N, L)
        A = -torch.exp(self.A_log.float())  # (d_inner, N)
        y = selective_scan(x.contiguous(), dt.contiguous(), A, B, C, self.D.float(), z=z.contiguous(),
                           delta_bias=self.dt_proj.bias.float(), delta_softplus=True, backend=self.backend)
        return self.out_proj(y.transpose(1, 2))  # (B, L, d_model)
