"""
Triton selective scan (forward and backward kernels) for GPUs without mamba-ssm's CUDA extension.

Same arguments and numerics as ssm.selective_scan (Gu & Dao 2023, Alg. 2; the memory layout of
state-spaces/mamba, csrc/selective_scan/selective_scan_fwd_kernel.cuh: only chunk-border states are saved).
ssm.py dispatches to `selective_scan_triton`; the kernels also run on the CPU in Triton's interpreter
(TRITON_INTERPRET=1 set before triton is imported), which the tests use.
"""

import contextlib
import os

import torch

#
# One program per (batch, block of BD channels) walks along L in tiles of T steps. The state h (BD, N) stays in
# registers between tiles. Inside a tile the recurrence h_t = a_t h_{t-1} + x_t is a tl.associative_scan over
# (a, x) pairs on a (BD, N, T) block, with combine (a1, b1), (a2, b2) -> (a1 a2, a2 b1 + b2) (the affine map of
# the earlier step applied first). B and C are loaded as (BD, N, T) blocks broadcast over the channels: the
# compiler then keeps the T steps of one (channel, state) pair in one thread, so the scan is a plain in-thread
# loop rather than warp shuffles. All arithmetic is fp32; every exponent is dt * A <= 0 (no division by a
# cumulative decay), so large dt cannot overflow.
#
# Memory, as the CUDA kernel: the forward writes the output and the fp32 states at chunk borders (every CHUNK
# steps); nothing of size (batch, dim, L, N). The backward walks the chunks in reverse. A pre-pass runs forward
# through the chunk from its saved state and writes the states at its tile borders, dt and d dt / d delta into a
# small per-program scratch (L1/L2-resident). Then it walks the tiles in reverse, recomputing h inside the tile
# and carrying the adjoint g_t = dL/dh_t backwards:
#     g_t = C_t dy_t + a_{t+1} g_{t+1}      (a scan over (a_{t+1}, C_t dy_t), run on the flipped tile)
# The two scans need h_{t-1} and a_{t+1}; Triton has no register shift, so they are recomputed from inputs read
# one step earlier / later (four exps per state update in the backward, pre-pass included, against one forward).
# dB and dC sum over the channels of a group: each program reduces over its BD channels and adds its (N, T)
# partial into an fp32 (batch, G, N, L) buffer with atomics (as the CUDA kernel), or writes it to a
# (batch, n_blocks, N, L) buffer that torch sums afterwards (deterministic, more memory).
# Measured on an H100 (scan_bench.py, B8 D1536 L4096 N16 bf16 with z): forward 0.99 ms, forward+backward 6.0 ms,
# against 0.91 / 4.63 ms for mamba-ssm's CUDA kernel; less extra memory than it.

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except Exception:  # ImportError or a broken install: the 'triton' backend is then absent, everything else works
    triton = libdevice = None

    class tl:  # stand-in so that the kernel signatures below still evaluate; the kernels are never called
        constexpr = None


def _jit(fn):
    return triton.jit(fn) if triton is not None else fn


def triton_interpreted():
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1 before triton was imported)."""
    return triton is not None and os.environ.get("TRITON_INTERPRET", "0") == "1"


@_jit
def _combine(a1, b1, a2, b2):
    # (a1, b1) is the earlier step: h -> a2 (a1 h + b1) + b2
    return a1 * a2, a2 * b1 + b2


@_jit
def _softplus_sigmoid(x, FAST: tl.constexpr):
    """softplus(x) as torch (above 20 x passes through) and its derivative sigmoid(x)."""
    e = tl.exp2(tl.minimum(x, 20.0) * 1.4426950408889634)
    w = 1.0 + e
    if FAST:  # MUFU lg2 (abs. error ~1e-7, used only where log(1 + e) > 0.11)
        lw = libdevice.fast_log2f(w) * 0.6931471805599453
    else:
        lw = tl.log(w)
    # log1p(e): where 1 + e would lose digits, its series to e^8 (relative error < 1e-8 for e < 1/8)
    es = tl.minimum(e, 0.125)
    s = es * (1.0 + es * (-0.5 + es * (0.33333334 + es * (-0.25 + es * (0.2 + es * (-0.16666667 + es * (
        0.14285715 - 0.125 * es)))))))
    sp = tl.where(x > 20.0, x, tl.where(e < 0.125, s, lw))
    return sp, e / w


@_jit
def _tile_dt(delta_ptrs, mask, bias, SOFTPLUS: tl.constexpr, FAST: tl.constexpr):
    """dt of a (BD, T) tile (0 where masked) and d dt / d delta."""
    dl = tl.load(delta_ptrs, mask=mask, other=0.0).to(tl.float32) + bias[:, None]
    if SOFTPLUS:
        dt, sig = _softplus_sigmoid(dl, FAST)
    else:
        dt, sig = dl, tl.full(dl.shape, 1.0, tl.float32)
    return tl.where(mask, dt, 0.0), sig


@_jit
def _load_bc(base, d, n, tpos, mask3, L):
    # (BD, N, T) load broadcast over the channels: this is what makes the compiler keep T in one thread
    return tl.load(base + n[None, :, None] * L + tpos[None, None, :] + 0 * d[:, None, None], mask=mask3,
                   other=0.0).to(tl.float32)


@_jit
def _tile_states(h, dt, u, Bt, A2):
    """States h_t (BD, N, T) of one tile from h (BD, N), the state before the tile."""
    a = tl.exp2(dt[:, None, :] * A2[:, :, None])
    aa, xx = tl.associative_scan((a, (dt * u)[:, None, :] * Bt), 2, _combine)
    return aa * h[:, :, None] + xx


@_jit
def _last_column(x3, t, T: tl.constexpr):
    return tl.sum(tl.where(t[None, None, :] == T - 1, x3, 0.0), 2)


@_jit
def _scan_fwd_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, state_ptr,
                     dim, L, n_state, dpg, stride_bb, stride_bg, n_chunks,
                     HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                     FAST: tl.constexpr, BD: tl.constexpr, NP: tl.constexpr, T: tl.constexpr,
                     CHUNK: tl.constexpr):
    pid_d = tl.program_id(0)
    b = tl.program_id(1)
    d = pid_d * BD + tl.arange(0, BD)
    n = tl.arange(0, NP)
    t = tl.arange(0, T)
    dmask, nmask = d < dim, n < n_state
    dn_mask = dmask[:, None] & nmask[None, :]
    A2 = tl.load(A_ptr + d[:, None] * n_state + n[None, :], mask=dn_mask, other=0.0) * 1.4426950408889634
    bias = tl.load(bias_ptr + d, mask=dmask, other=0.0) if HAS_BIAS else tl.zeros((BD,), tl.float32)
    Dv = tl.load(D_ptr + d, mask=dmask, other=0.0) if HAS_D else tl.zeros((BD,), tl.float32)
    rows = (b * dim + d).to(tl.int64) * L  # (BD,) offsets of the channels' rows in u, delta, z, out
    u_rows, delta_rows, z_rows, out_rows = u_ptr + rows, delta_ptr + rows, z_ptr + rows, out_ptr + rows
    grp = (pid_d * BD) // dpg
    B_base = B_ptr + b.to(tl.int64) * stride_bb + grp * stride_bg
    C_base = C_ptr + b.to(tl.int64) * stride_bb + grp * stride_bg
    st_ptrs = state_ptr + ((b * dim + d)[:, None] * n_chunks) * NP + n[None, :]
    h = tl.zeros((BD, NP), tl.float32)
    for c in range(0, n_chunks):
        tl.store(st_ptrs + c * NP, h, mask=dmask[:, None])  # state entering chunk c
        t_end = tl.minimum(c * CHUNK + CHUNK, L)
        for t0 in range(c * CHUNK, t_end, T):
            tpos = t0 + t
            tmask = tpos < L
            m2 = dmask[:, None] & tmask[None, :]
            u = tl.load(u_rows[:, None] + tpos[None, :], mask=m2, other=0.0).to(tl.float32)
            dt, _ = _tile_dt(delta_rows[:, None] + tpos[None, :], m2, bias, SOFTPLUS, FAST)
            m3 = (dmask[:, None, None] & nmask[None, :, None]) & tmask[None, None, :]
            hs = _tile_states(h, dt, u, _load_bc(B_base, d, n, tpos, m3, L), A2)
            y = tl.sum(hs * _load_bc(C_base, d, n, tpos, m3, L), 1)
            h = _last_column(hs, t, T)
            if HAS_D:
                y += Dv[:, None] * u
            if HAS_Z:
                z = tl.load(z_rows[:, None] + tpos[None, :], mask=m2, other=0.0).to(tl.float32)
                y = y * z * tl.sigmoid(z)
            tl.store(out_rows[:, None] + tpos[None, :], y.to(out_ptr.dtype.element_ty), mask=m2)


@_jit
def _scan_bwd_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dout_ptr, state_ptr,
                     scratch_ptr, du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr,
                     dim, L, n_state, dpg, stride_bb, stride_bg, n_chunks, n_dblocks,
                     HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                     ATOMIC: tl.constexpr, FAST: tl.constexpr, BD: tl.constexpr, NP: tl.constexpr,
                     T: tl.constexpr, CHUNK: tl.constexpr):
    pid_d = tl.program_id(0)
    b = tl.program_id(1)
    d = pid_d * BD + tl.arange(0, BD)
    n = tl.arange(0, NP)
    t = tl.arange(0, T)
    dmask, nmask = d < dim, n < n_state
    dn_mask = dmask[:, None] & nmask[None, :]
    A = tl.load(A_ptr + d[:, None] * n_state + n[None, :], mask=dn_mask, other=0.0)
    A2 = A * 1.4426950408889634
    bias = tl.load(bias_ptr + d, mask=dmask, other=0.0) if HAS_BIAS else tl.zeros((BD,), tl.float32)
    Dv = tl.load(D_ptr + d, mask=dmask, other=0.0) if HAS_D else tl.zeros((BD,), tl.float32)
    rows = (b * dim + d).to(tl.int64) * L
    u_rows, delta_rows, z_rows, dout_rows = u_ptr + rows, delta_ptr + rows, z_ptr + rows, dout_ptr + rows
    grp = (pid_d * BD) // dpg
    B_base = B_ptr + b.to(tl.int64) * stride_bb + grp * stride_bg
    C_base = C_ptr + b.to(tl.int64) * stride_bb + grp * stride_bg
    if ATOMIC:  # (batch, G, NP, L) fp32, shared by the blocks of a group
        part = (b * (dim // dpg) + grp).to(tl.int64) * NP * L
    else:  # (batch, n_dblocks, NP, L) fp32, one slice per program
        part = (b * n_dblocks + pid_d).to(tl.int64) * NP * L
    dB_base, dC_base = dB_ptr + part, dC_ptr + part
    st_ptrs = state_ptr + ((b * dim + d)[:, None] * n_chunks) * NP + n[None, :]
    # per-program scratch: the states at the tile borders of a chunk, its dt and d dt / d delta (CHUNK + 1 steps)
    NT: tl.constexpr = CHUNK // T
    SCR: tl.constexpr = NT * BD * NP + 2 * BD * (CHUNK + 1)
    scr = scratch_ptr + (b * n_dblocks + pid_d).to(tl.int64) * SCR
    dd = tl.arange(0, BD)
    h_scr = scr + dd[:, None] * NP + n[None, :]
    dt_scr = scr + NT * BD * NP + dd * (CHUNK + 1)
    sig_scr = dt_scr + BD * (CHUNK + 1)

    gcar = tl.zeros((BD, NP), tl.float32)  # g at the first step of the tile after the current one
    dA_acc = tl.zeros((BD, NP), tl.float32)
    dD_acc = tl.zeros((BD,), tl.float32)
    dbias_acc = tl.zeros((BD,), tl.float32)
    for ci in range(0, n_chunks):
        c = n_chunks - 1 - ci
        c0 = c * CHUNK
        nt = (tl.minimum(CHUNK, L - c0) + T - 1) // T
        h = tl.load(st_ptrs + c * NP, mask=dmask[:, None], other=0.0)
        tl.debug_barrier()  # the previous chunk's reverse pass has read the scratch
        # pre-pass, forward through the chunk: tile border states, dt, d dt / d delta into the scratch
        for i in range(0, nt):
            tpos = c0 + i * T + t
            tmask = tpos < L
            m2 = dmask[:, None] & tmask[None, :]
            dt, sig = _tile_dt(delta_rows[:, None] + tpos[None, :], m2, bias, SOFTPLUS, FAST)
            tl.store(h_scr + i * (BD * NP), h)
            tl.store(dt_scr[:, None] + (i * T + t)[None, :], dt)
            if SOFTPLUS:
                tl.store(sig_scr[:, None] + (i * T + t)[None, :], sig)
            if i < nt - 1:  # the state after the chunk's last tile is not needed
                u = tl.load(u_rows[:, None] + tpos[None, :], mask=m2, other=0.0).to(tl.float32)
                m3 = (dmask[:, None, None] & nmask[None, :, None]) & tmask[None, None, :]
                h = _last_column(_tile_states(h, dt, u, _load_bc(B_base, d, n, tpos, m3, L), A2), t, T)
        # dt of the step after the chunk (first of the next one), for the adjoint's decay a_{t+1}
        pn = c0 + CHUNK
        mn = dmask & (pn + 0 * d < L)
        dln = tl.load(delta_rows + pn, mask=mn, other=0.0).to(tl.float32) + bias
        if SOFTPLUS:
            dln, _ = _softplus_sigmoid(dln, FAST)
        tl.store(dt_scr + CHUNK, tl.where(mn, dln, 0.0))
        tl.debug_barrier()  # the scratch is written by other threads than those that read it

        # reverse pass through the chunk's tiles
        for k in range(0, nt):
            i = nt - 1 - k
            tpos = c0 + i * T + t
            tmask = tpos < L
            m2 = dmask[:, None] & tmask[None, :]
            offs = tpos[None, :]
            lp = (i * T + t)[None, :]  # position inside the chunk
            S = tl.load(h_scr + i * (BD * NP))  # h_{t0 - 1}
            first = (t > 0)[None, :]
            dt = tl.load(dt_scr[:, None] + lp)
            dt_p = tl.load(dt_scr[:, None] + lp - 1, mask=first, other=0.0)  # previous step, inside the tile
            dt_n = tl.load(dt_scr[:, None] + lp + 1, mask=(tpos + 1 < L)[None, :], other=0.0)  # next step
            u = tl.load(u_rows[:, None] + offs, mask=m2, other=0.0).to(tl.float32)
            u_p = tl.load(u_rows[:, None] + offs - 1, mask=m2 & first, other=0.0).to(tl.float32)
            m3 = (dmask[:, None, None] & nmask[None, :, None]) & tmask[None, None, :]
            Bt = _load_bc(B_base, d, n, tpos, m3, L)
            Bp = _load_bc(B_base, d, n, tpos - 1, m3 & (t > 0)[None, None, :], L)
            Ct = _load_bc(C_base, d, n, tpos, m3, L)
            dout = tl.load(dout_rows[:, None] + offs, mask=m2, other=0.0).to(tl.float32)

            # h_{t-1}: scan over (a_{t-1}, x_{t-1}) with (1, 0) at the tile's first step, plus its decay times S
            a_p = tl.exp2(dt_p[:, None, :] * A2[:, :, None])
            pa, px = tl.associative_scan((a_p, (dt_p * u_p)[:, None, :] * Bp), 2, _combine)
            aH = tl.exp2(dt[:, None, :] * A2[:, :, None]) * (px + pa * S[:, :, None])  # a_t h_{t-1}
            dtu = dt * u
            hcur = aH + dtu[:, None, :] * Bt  # h_t
            if HAS_Z:
                y = tl.sum(hcur * Ct, 1)
                if HAS_D:
                    y += Dv[:, None] * u
                z = tl.load(z_rows[:, None] + offs, mask=m2, other=0.0).to(tl.float32)
                sz = tl.sigmoid(z)
                dz = dout * y * sz * (1.0 + z * (1.0 - sz))
                tl.store(dz_ptr + rows[:, None] + offs, dz.to(dz_ptr.dtype.element_ty), mask=m2)
                dy = dout * z * sz
            else:
                dy = dout
            dCp = tl.sum(hcur * dy[:, None, :], 0)  # (NP, T), summed over this block's channels
            # g_t = C_t dy_t + a_{t+1} g_{t+1}: reverse scan over (a_{t+1}, C_t dy_t), plus decay times g_carry
            a_n = tl.exp2(dt_n[:, None, :] * A2[:, :, None])
            # (flip, scan, flip: Triton's reverse scan lowers to shuffles even when the axis is in-thread)
            ga, gx = tl.associative_scan((tl.flip(a_n, 2), tl.flip(Ct * dy[:, None, :], 2)), 2, _combine)
            ga, gx = tl.flip(ga, 2), tl.flip(gx, 2)
            g = gx + ga * gcar[:, :, None]
            gcar = tl.sum(tl.where(t[None, None, :] == 0, g, 0.0), 2)

            gB = tl.sum(g * Bt, 1)  # (BD, T)
            w = g * aH  # dL/da_t * a_t
            wA = tl.sum(w * A[:, :, None], 1)
            dA_acc += tl.sum(w * dt[:, None, :], 2)
            dBp = tl.sum(g * dtu[:, None, :], 0)
            du = dt * gB
            if HAS_D:
                du += Dv[:, None] * dy
                dD_acc += tl.sum(dy * u, 1)
            ddt = u * gB + wA
            if SOFTPLUS:
                ddt = ddt * tl.load(sig_scr[:, None] + lp)
            ddt = tl.where(m2, ddt, 0.0)
            dbias_acc += tl.sum(ddt, 1)
            tl.store(du_ptr + rows[:, None] + offs, du.to(du_ptr.dtype.element_ty), mask=m2)
            tl.store(ddelta_ptr + rows[:, None] + offs, ddt.to(ddelta_ptr.dtype.element_ty), mask=m2)
            pofs = n[:, None] * L + tpos[None, :]
            pmask = nmask[:, None] & tmask[None, :]
            if ATOMIC:
                tl.atomic_add(dB_base + pofs, dBp, mask=pmask, sem="relaxed")
                tl.atomic_add(dC_base + pofs, dCp, mask=pmask, sem="relaxed")
            else:
                tl.store(dB_base + pofs, dBp, mask=pmask)
                tl.store(dC_base + pofs, dCp, mask=pmask)

    out_dn = (b * dim + d)[:, None] * NP + n[None, :]
    tl.store(dA_ptr + out_dn, dA_acc, mask=dn_mask)
    tl.store(dD_ptr + b * dim + d, dD_acc, mask=dmask)
    tl.store(dbias_ptr + b * dim + d, dbias_acc, mask=dmask)


# Launch configuration per input precision (element size of B: 2 = bf16/fp16, 4 = fp32): channels per program BD,
# steps per tile T, warps; the forward's CHUNK (steps between saved states) is also the backward's recompute span.
# T is at most one 16-byte load of B (8 bf16 / 4 fp32 steps) so that a tile's steps stay in one thread.
TRITON_CONFIG = {
    "fwd": {2: dict(BD=8, T=8, CHUNK=64, num_warps=1), 4: dict(BD=8, T=4, CHUNK=64, num_warps=1)},
    "bwd": {2: dict(BD=8, T=8, num_warps=1, ATOMIC=True), 4: dict(BD=8, T=4, num_warps=1, ATOMIC=True)},
}


def _triton_launch_params(which, B, dim, L, chunk=None):
    cfg = dict(TRITON_CONFIG[which][2 if B.element_size() <= 2 else 4])
    G = B.shape[1]
    dpg = dim // G
    if G > 1:  # a program's channels must share one group of B and C
        while dpg % cfg["BD"]:
            cfg["BD"] //= 2
    if which == "fwd":
        cfg["CHUNK"] = max(cfg["T"], min(cfg["CHUNK"], triton.next_power_of_2(L)))
    else:  # the backward recomputes from the forward's chunk states: its tile must divide the chunk
        cfg["T"] = min(cfg["T"], chunk)
        cfg["CHUNK"] = chunk
    return cfg, G, dpg


def _triton_check(u, A, B, C):
    if triton is None:
        raise RuntimeError("scan backend 'triton' requested but triton is not importable")
    if not u.is_cuda and not triton_interpreted():
        raise RuntimeError("the triton scan needs CUDA tensors, or TRITON_INTERPRET=1 set before importing triton")
    if A.is_complex() or B.dim() < 3 or C.dim() < 3:
        raise NotImplementedError("the triton scan supports real A and input-dependent B, C only")
    if B.dim() == 4 and u.shape[1] % B.shape[1]:
        raise ValueError(f"dim {u.shape[1]} not divisible into {B.shape[1]} groups")


def _as_groups(M):
    """(batch, N, L) -> (batch, 1, N, L); grouped (batch, G, N, L) as is; contiguous."""
    return (M.unsqueeze(1) if M.dim() == 3 else M).contiguous()


def _triton_scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    batch, dim, L = u.shape
    N = A.shape[1]
    NP = max(triton.next_power_of_2(N), 2)
    cfg, G, dpg = _triton_launch_params("fwd", B, dim, L)
    BD, T, CHUNK = cfg["BD"], cfg["T"], cfg["CHUNK"]
    n_chunks = triton.cdiv(L, CHUNK)
    out = torch.empty_like(u)
    states = torch.empty(batch, dim, n_chunks, NP, device=u.device, dtype=torch.float32)
    grid = (triton.cdiv(dim, BD), batch)
    _scan_fwd_kernel[grid](
        u, delta, A, B, C, D if D is not None else A, z if z is not None else u,
        delta_bias if delta_bias is not None else A, out, states,
        dim, L, N, dpg, B.stride(0), B.stride(1), n_chunks,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus),
        FAST=not triton_interpreted(), BD=BD, NP=NP, T=T, CHUNK=CHUNK, num_warps=cfg["num_warps"])
    return out, states, CHUNK


def _triton_scan_bwd(dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus, states, fwd_chunk):
    batch, dim, L = u.shape
    N = A.shape[1]
    NP = states.shape[-1]
    cfg, G, dpg = _triton_launch_params("bwd", B, dim, L, fwd_chunk)
    BD, T, CHUNK, ATOMIC = cfg["BD"], cfg["T"], cfg["CHUNK"], cfg["ATOMIC"]
    n_chunks = states.shape[2]
    n_db = triton.cdiv(dim, BD)
    dev, f32 = u.device, torch.float32
    du, ddelta = torch.empty_like(u), torch.empty_like(delta)
    dz = torch.empty_like(z) if z is not None else None
    dA = torch.empty(batch, dim, NP, device=dev, dtype=f32)
    dD = torch.empty(batch, dim, device=dev, dtype=f32)
    dbias = torch.empty(batch, dim, device=dev, dtype=f32)
    if ATOMIC:
        dBp = torch.zeros(batch, G, NP, L, device=dev, dtype=f32)
        dCp = torch.zeros(batch, G, NP, L, device=dev, dtype=f32)
    else:
        dBp = torch.empty(batch, n_db, NP, L, device=dev, dtype=f32)
        dCp = torch.empty(batch, n_db, NP, L, device=dev, dtype=f32)
    scratch = torch.empty(batch * n_db * ((CHUNK // T) * BD * NP + 2 * BD * (CHUNK + 1)), device=dev, dtype=f32)
    grid = (n_db, batch)
    _scan_bwd_kernel[grid](
        u, delta, A, B, C, D if D is not None else A, z if z is not None else u,
        delta_bias if delta_bias is not None else A, dout, states, scratch,
        du, ddelta, dz if dz is not None else du, dA, dBp, dCp, dD, dbias,
        dim, L, N, dpg, B.stride(0), B.stride(1), n_chunks, n_db,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus),
        ATOMIC=ATOMIC, FAST=not triton_interpreted(), BD=BD, NP=NP, T=T, CHUNK=CHUNK, num_warps=cfg["num_warps"])
    if not ATOMIC:  # sum the per-block partials of each group
        dBp = dBp.view(batch, G, n_db // G, NP, L).sum(2)
        dCp = dCp.view(batch, G, n_db // G, NP, L).sum(2)
    dB, dC = dBp[:, :, :N], dCp[:, :, :N]
    dA = dA[:, :, :N].sum(0)
    return du, ddelta, dA, dB, dC, dD.sum(0), dz, dbias.sum(0)


def _on_device(x):
    """Launch on x's GPU (Triton launches on the current device)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


class _TritonSelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        B3, C3 = B.dim() == 3, C.dim() == 3
        u, delta = u.contiguous(), delta.contiguous()
        z = z.contiguous() if z is not None else None
        A = A.float().contiguous()
        Bg, Cg = _as_groups(B), _as_groups(C)
        if Bg.shape != Cg.shape:
            raise NotImplementedError("the triton scan needs B and C of the same shape")
        D = D.float().contiguous() if D is not None else None
        delta_bias = delta_bias.float().contiguous() if delta_bias is not None else None
        with _on_device(u):
            out, states, chunk = _triton_scan_fwd(u, delta, A, Bg, Cg, D, z, delta_bias, delta_softplus)
        ctx.save_for_backward(u, delta, A, Bg, Cg, D, z, delta_bias, states)
        ctx.meta = (delta_softplus, chunk, B3, C3)
        return out

    @staticmethod
    def backward(ctx, dout):
        u, delta, A, Bg, Cg, D, z, delta_bias, states = ctx.saved_tensors
        softplus, chunk, B3, C3 = ctx.meta
        with _on_device(u):
            du, ddelta, dA, dB, dC, dD, dz, dbias = _triton_scan_bwd(
                dout.contiguous(), u, delta, A, Bg, Cg, D, z, delta_bias, softplus, states, chunk)
        dB = (dB[:, 0] if B3 else dB).to(Bg.dtype)
        dC = (dC[:, 0] if C3 else dC).to(Cg.dtype)
        return (du, ddelta, dA, dB, dC, dD if D is not None else None, dz,
                dbias if delta_bias is not None else None, None)


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """The Triton scan (forward and backward kernels); same arguments and numerics as selective_scan."""
    _triton_check(u, A, B, C)
    return _TritonSelectiveScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus)

