"""
The GPU kernels of ssm.py: Mamba's selective scan and causal conv in the models' own token layout, in Triton,
with their torch.library ops and autograd; and two of VMamba's SS2D (LaMamba): its depthwise 2-D conv + SiLU
on the channels-last map, and its sampling output (the directions' sum, out_norm, the gate). ssm.py is the
interface (and the PyTorch reference); read it first.

What the kernels compute is Mamba-1's scan (Gu & Dao 2023, Alg. 2; state-spaces/mamba,
mamba_ssm/ops/selective_scan_interface.py, selective_scan_ref), for one or several scan directions k:
    dt_t = softplus(delta_t + dt_bias)
    h_t  = exp(dt_t A) h_{t-1} + dt_t B_t u_t,      y_t = C_t . h_t + D u_t,      out_t = y_t silu(z_t)
with t running over scan steps, and the token at step t of direction k stored in memory row order[k, t].

What is different from mamba-ssm's kernel is where the data lives:
  * u, delta, z and out are (batch, L, [K,] D) tensors with any strides: the layout that the linear layers
    read and write. Nothing is transposed or made contiguous around the scan. B and C are read as views of
    x_proj's output, (batch, L, [K,] N).
  * The scan order is an index table read inside the kernel: the model's permutation (DiM's four orders,
    DiMSUM's window scans, LaMamba's snake paths, BiDiM's reversal) costs no gather before the scan and no
    scatter after it. A table rather than closed-form index arithmetic, because one code path then serves
    every order the four papers use; it is L int32 numbers, read once per tile from cache.
  * Several directions over one input run in one launch (LaMamba's four paths, BiDiM's two branches): the
    input may be shared (stride 0 over K), the parameters are per direction.

Kernel design (GPU): one program per (batch, direction, block of BD channels). It walks the scan in tiles of T
steps, keeping h (BD, N) in fp32 registers. Inside a tile the recurrence is a tl.associative_scan over
(a, b) = (exp(dt A), dt B u) pairs laid out (BD, N, T); the T steps of one (channel, state) pair sit in one
thread, so the scan is a short in-thread loop. The state carried in from the previous tile is added into
the first step's b (and the adjoint's carry into the last step's, below), so the scan's b is the state
itself and its other components go unused: the compiler drops them. Every exponent is dt A <= 0, so
nothing overflows.

Memory: the forward saves only the fp32 states at chunk borders (every CHUNK steps), like mamba-ssm. The
backward walks chunks in reverse: a forward pre-pass through the chunk writes the states at its tile borders
to a small per-program scratch, then tiles are visited in reverse, recomputing h_t in the tile and carrying
the adjoint g_t = dL/dh_t backwards,
    g_t = C_t dy_t + a_{t+1} g_{t+1}.
The decay of the *next* step would need a register shift (Triton has none) or a second exponential. Instead
the reverse scan runs over triples (P, Q, a): a segment maps a_in g_in (the decay and adjoint entering from
the right) to its leftmost adjoint, g = Q + P a_in g_in, and composing two segments hands the right one's
last decay to the left one. a_t h_{t-1} (for the gradients of dt and A) comes from the same in-tile scan, which also
carries each step's map to the state before it (h_t - dt_t B_t u_t would lose it to cancellation when the
decay is strong): the backward takes two exponentials per state update (pre-pass and reverse pass), the
forward one.
"""

import contextlib
import functools
import os

import torch

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except Exception:  # no triton: only the PyTorch paths exist
    triton = tl = libdevice = None

LOG2E = 1.4426950408889634


def _jit(fn):
    return triton.jit(fn) if triton is not None else fn


def triton_interpreted():
    return triton is not None and os.environ.get("TRITON_INTERPRET", "0") == "1"


# -----------------------------------------------------------------------------
# Small device helpers
# -----------------------------------------------------------------------------

if triton is not None:
    @triton.jit
    def _pair(a1, b1, a2, b2):
        # (a1, b1) is the earlier step: h -> a2 (a1 h + b1) + b2
        return a1 * a2, a2 * b1 + b2

    @triton.jit
    def _pair_prev(a1, b1, p1, q1, a2, b2, p2, q2):
        # _pair that also carries the map to the state *before* the segment's last step: a single step is
        # (a, b, 1, 0), and composing hands the earlier segment's map to the later one's (p, q)
        return a1 * a2, a2 * b1 + b2, p2 * a1, p2 * b1 + q2

    @triton.jit
    def _handoff(p1, q1, a1, p2, q2, a2):
        # Reverse adjoint scan, run on the flipped tile, so segment 1 lies to the right of segment 2 in the
        # sequence. A segment maps what enters it, a_in g_in, to g at its far end: g = q + p a_in g_in, and a
        # is the decay of that far end, which the next segment needs as its own a_in.
        pa = p2 * a1
        return pa * p1, q2 + pa * q1, a2

    @triton.jit
    def _sigmoid(x, FAST: tl.constexpr):
        """1 / (1 + exp(-x)). FAST (on a GPU): an exponential and an approximate division, two
        special-function instructions and about three others. tl.sigmoid compiles to ~12 (range
        checks for denormal exponentials and for divisors above 2^126, which a sigmoid never needs:
        1 / inf is 0)."""
        if FAST:
            return libdevice.fast_dividef(tl.full(x.shape, 1.0, tl.float32),
                                          1.0 + tl.exp2(x * -1.4426950408889634))
        return tl.sigmoid(x)

    @triton.jit
    def _silu(x, FAST: tl.constexpr):
        """x sigmoid(x); FAST: x / (1 + exp(-x)) as one approximate division, a multiply less than
        x _sigmoid(x) (x / inf is 0 for the large negative x whose exponential overflows)."""
        if FAST:
            return libdevice.fast_dividef(x, 1.0 + tl.exp2(x * -1.4426950408889634))
        return x * tl.sigmoid(x)

    @triton.jit
    def _softplus(x, FAST: tl.constexpr):
        """softplus(x) (x passes through above 20, as torch) and its derivative sigmoid(x)."""
        e = tl.exp2(tl.minimum(x, 20.0) * 1.4426950408889634)
        w = 1.0 + e
        if FAST:
            lw = libdevice.fast_log2f(w) * 0.6931471805599453
            sig = libdevice.fast_dividef(e, w)  # w < 2^29: in the approximate division's range
        else:
            lw = tl.log(w)
            sig = e / w
        # log1p(e) for small e by its series, where 1 + e would lose digits
        es = tl.minimum(e, 0.125)
        s = es * (1.0 + es * (-0.5 + es * (0.33333334 + es * (-0.25 + es * (0.2 + es * (
            -0.16666667 + es * (0.14285715 - 0.125 * es)))))))
        sp = tl.where(x > 20.0, x, tl.where(e < 0.125, s, lw))
        return sp, sig

    @triton.jit
    def _decay(dt, A):
        """exp(dt A) of a (T, NP, BD) tile as exp2: log2 e is folded into dt (T x BD products), not
        kept in a scaled copy of A (NP x BD registers a thread would hold across the whole loop)."""
        return tl.exp2((dt * 1.4426950408889634)[:, None, :] * A[None, :, :])

    @triton.jit
    def _decay_row(dt, A):
        """exp(dt A) for one step, dt (BD,), as _decay computes it: (NP, BD)."""
        return tl.exp2((dt * 1.4426950408889634)[None, :] * A)

    @triton.jit
    def _rows(idx_ptr, pos, mask, HAS_IDX: tl.constexpr):
        """Memory rows of scan steps pos (the order table, or the identity)."""
        if HAS_IDX:
            return tl.load(idx_ptr + pos, mask=mask, other=0).to(tl.int64)
        return pos.to(tl.int64)

    @triton.jit
    def _fetch(rows, pos, L, base, stride, cmask):
        """Issue the load of one tile, (T, BD) or (T, NP) in its own dtype, at memory rows (T,) of scan
        steps pos. The kernels fetch each tile one iteration before they use it (and its row numbers two
        before): with few warps per SM the loop is bound by load latency, and a load whose result is first
        needed an iteration later runs while the previous tile computes."""
        inside = (pos >= 0) & (pos < L)
        return tl.load(base[None, :] + rows[:, None] * stride, mask=inside[:, None] & cmask[None, :],
                       other=0.0)

    @triton.jit
    def _prep(u, dl, Bt, pos, L, bias, dmask, SOFTPLUS: tl.constexpr, FAST: tl.constexpr):
        """A fetched tile in fp32: u, dt = softplus(delta + bias) (0 outside the sequence), d dt / d delta
        and B; with the (T, BD) mask of steps inside the sequence."""
        m2 = (pos < L)[:, None] & dmask[None, :]
        dl = dl.to(tl.float32) + bias[None, :]
        if SOFTPLUS:
            dt, sig = _softplus(dl, FAST)
        else:
            dt, sig = dl, tl.full(dl.shape, 1.0, tl.float32)
        return m2, u.to(tl.float32), tl.where(m2, dt, 0.0), sig, Bt.to(tl.float32)

    @triton.jit
    def _sum_channels(xB, xC):
        """The sums over channels of two (T, NP, BD) tiles, as one (2 T NP,) vector ordered (tile, step,
        state). The permute and reshape make Triton move the tiles through shared memory once (stmatrix,
        then 128-bit loads in the sm_90 SASS), after which a thread holds whole rows of channels and adds
        them in its own registers. Summed where they lie, across the lanes that hold the channels, each
        value takes a shuffle and an add a round (and a lane-dependent select or two, to split the work as
        the reduce-scatter this replaced in session 28 did): 1,104 instructions a tile in the backward's
        reverse loop against 967, 84 shuffles against 20. Timed (H100, session 28): the backward 3% faster
        at DiM-L/2's 1024 px shape (1.20 against 1.24 ms), level at DiM-S/2's (README, Speed)."""
        T: tl.constexpr = xB.shape[0]
        NP: tl.constexpr = xB.shape[1]
        BD: tl.constexpr = xB.shape[2]
        x = tl.reshape(tl.permute(tl.join(xB, xC), (2, 3, 0, 1)), (BD, 2 * T * NP))
        return tl.sum(x, 0)

    @triton.jit
    def _row(x3, t, j):
        """x3[j] of a (T, NP, BD) tile, j a scalar (an in-thread select: T sits in one thread). The other
        rows become -0.0, which x + (-0.0) = x lets the compiler drop: no adds are left."""
        return tl.sum(tl.where(t[:, None, None] == j, x3, -0.0), 0)

    @triton.jit
    def _states(a, bx, h, t):
        """h_t of a tile, (T, NP, BD), from the decays a, the inputs bx = dt B u and the state h entering it.
        h enters as part of the first step's input (a_0 h + bx_0), so the scan's second component is the
        state itself; its first (the products of a) is then unused and compiled away."""
        first = t[:, None, None] == 0
        _, hs = tl.associative_scan((a, tl.where(first, a * h[None, :, :] + bx, bx)), 0, _pair)
        return hs
else:
    _pair = _pair_prev = _handoff = _decay = _decay_row = _softplus = _sigmoid = _silu = None
    _rows = _row = _states = _fetch = _prep = None
    _sum_channels = None


# -----------------------------------------------------------------------------
# Forward kernel
# -----------------------------------------------------------------------------
# Tiles are (T, NP, BD): steps, states, channels. Channels are the fastest axis because they are contiguous in
# memory, so a row of BD channels is one coalesced load; the T steps of a (state, channel) pair end up in
# one thread, where the associative scan is a plain loop.

@_jit
def _scan_fwd_kernel(
        u_ptr, dl_ptr, z_ptr, B_ptr, C_ptr, A_ptr, D_ptr, bias_ptr, idx_ptr, out_ptr, st_ptr,
        L, dim, n_state, n_chunks,
        su_b, su_l, su_k, su_d, sd_b, sd_l, sd_k, sd_d, sz_b, sz_l, sz_k, sz_d,
        so_b, so_l, so_k, so_d, sB_b, sB_l, sB_k, sB_n, sC_b, sC_l, sC_k, sC_n,
        sum_ptr, seg_chunks, n_seg, sum_split,
        HAS_IDX: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
        SOFTPLUS: tl.constexpr, FAST: tl.constexpr, MODE: tl.constexpr,
        BD: tl.constexpr, NP: tl.constexpr, T: tl.constexpr, CHUNK: tl.constexpr):
    # MODE 0: the whole sequence. The sequence can also be cut into n_seg segments of seg_chunks chunks run
    # by separate programs (more parallelism when batch x channels is small): MODE 1 runs each segment from
    # a zero state and writes its end state and its sum of dt (the segment's decay is exp(A sum dt));
    # MODE 2 then starts each segment from the state that the summaries of the segments before it compose.
    # No segment after the last one reads its summary, so MODE 1 runs the first n_seg - 1 segments only.
    pid_d, k, bs = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if MODE == 1:
        b, s = bs // (n_seg - 1), bs % (n_seg - 1)
    else:
        b, s = bs // n_seg, bs % n_seg
    K = tl.num_programs(1)
    d = pid_d * BD + tl.arange(0, BD)
    n = tl.arange(0, NP)
    t = tl.arange(0, T)
    dmask, nmask = d < dim, n < n_state
    kd = k * dim + d  # parameter row of (direction, channel)
    nd_mask = nmask[:, None] & dmask[None, :]
    A = tl.load(A_ptr + kd[None, :] * n_state + n[:, None], mask=nd_mask, other=0.0)  # (NP, BD)
    bias = tl.load(bias_ptr + kd, mask=dmask, other=0.0) if HAS_BIAS else tl.zeros((BD,), tl.float32)
    Dv = tl.load(D_ptr + kd, mask=dmask, other=0.0) if HAS_D else tl.zeros((BD,), tl.float32)
    b64, k64 = b.to(tl.int64), k.to(tl.int64)
    u_base = u_ptr + b64 * su_b + k64 * su_k + d * su_d
    dl_base = dl_ptr + b64 * sd_b + k64 * sd_k + d * sd_d
    z_base = z_ptr + b64 * sz_b + k64 * sz_k + d * sz_d
    o_base = out_ptr + b64 * so_b + k64 * so_k + d * so_d
    B_base = B_ptr + b64 * sB_b + k64 * sB_k + n * sB_n
    C_base = C_ptr + b64 * sC_b + k64 * sC_k + n * sC_n
    idx_base = idx_ptr + k64 * L
    st = st_ptr + ((b64 * K + k) * dim + d)[None, :] * (n_chunks * NP) + n[:, None]  # (NP, BD)
    seg = (b64 * K + k) * n_seg * dim + d  # summaries: end states (.., n_seg, dim, NP), then dt sums
    sum_h = sum_ptr + seg[None, :] * NP + n[:, None]
    sum_dt = sum_ptr + sum_split + seg
    h = tl.zeros((NP, BD), tl.float32)
    if MODE == 2:
        for s2 in range(0, s):
            decay = _decay_row(tl.load(sum_dt + s2 * dim, mask=dmask, other=0.0), A)
            h = decay * h + tl.load(sum_h + s2 * dim * NP, mask=nd_mask, other=0.0)
    dt_sum = tl.zeros((BD,), tl.float32)
    t_lo = s * seg_chunks * CHUNK
    t_hi = tl.minimum(t_lo + seg_chunks * CHUNK, L)
    # software pipeline (see _fetch): tile i computes while tile i + 1 loads and i + 2's rows arrive
    rows_n = _rows(idx_base, t_lo + t, t_lo + t < L, HAS_IDX)
    u_n = _fetch(rows_n, t_lo + t, L, u_base, su_l, dmask)
    dl_n = _fetch(rows_n, t_lo + t, L, dl_base, sd_l, dmask)
    B_n = _fetch(rows_n, t_lo + t, L, B_base, sB_l, nmask)
    C_n = _fetch(rows_n, t_lo + t, L, C_base, sC_l, nmask) if MODE != 1 else B_n
    z_n = _fetch(rows_n, t_lo + t, L, z_base, sz_l, dmask) if HAS_Z and MODE != 1 else u_n
    rows_nn = _rows(idx_base, t_lo + T + t, t_lo + T + t < L, HAS_IDX)
    for t0 in range(t_lo, t_hi, T):
        pos, rows, u_r, dl_r, B_r, C_r, z_r = t0 + t, rows_n, u_n, dl_n, B_n, C_n, z_n
        nxt = pos + T
        u_n = _fetch(rows_nn, nxt, L, u_base, su_l, dmask)
        dl_n = _fetch(rows_nn, nxt, L, dl_base, sd_l, dmask)
        B_n = _fetch(rows_nn, nxt, L, B_base, sB_l, nmask)
        if MODE != 1:
            C_n = _fetch(rows_nn, nxt, L, C_base, sC_l, nmask)
            if HAS_Z:
                z_n = _fetch(rows_nn, nxt, L, z_base, sz_l, dmask)
        rows_n = rows_nn
        rows_nn = _rows(idx_base, nxt + T, nxt + T < L, HAS_IDX)
        if MODE != 1:
            if t0 % CHUNK == 0:
                tl.store(st + (t0 // CHUNK) * NP, h, mask=dmask[None, :])  # the state entering the chunk
        m2, u, dt, _, Bt = _prep(u_r, dl_r, B_r, pos, L, bias, dmask, SOFTPLUS, FAST)
        a = _decay(dt, A)  # (T, NP, BD)
        hs = _states(a, (dt * u)[:, None, :] * Bt[:, :, None], h, t)
        h = _row(hs, t, T - 1)
        if MODE == 1:
            dt_sum += tl.sum(dt, 0)
        else:
            y = tl.sum(hs * C_r.to(tl.float32)[:, :, None], 1)  # (T, BD)
            if HAS_D:
                y += Dv[None, :] * u
            if HAS_Z:
                zz = z_r.to(tl.float32)
                y = y * _silu(zz, FAST)
            tl.store(o_base[None, :] + rows[:, None] * so_l, y.to(out_ptr.dtype.element_ty), mask=m2)
    if MODE == 1:
        tl.store(sum_h + s * dim * NP, h, mask=nd_mask)
        tl.store(sum_dt + s * dim, dt_sum, mask=dmask)


# -----------------------------------------------------------------------------
# Backward kernel
# -----------------------------------------------------------------------------

@_jit
def _scan_bwd_kernel(
        u_ptr, dl_ptr, z_ptr, B_ptr, C_ptr, A_ptr, D_ptr, bias_ptr, idx_ptr, dout_ptr, st_ptr, scr_ptr,
        du_ptr, ddl_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr,
        L, dim, n_state, n_chunks,
        su_b, su_l, su_k, su_d, sd_b, sd_l, sd_k, sd_d, sz_b, sz_l, sz_k, sz_d,
        so_b, so_l, so_k, so_d, sB_b, sB_l, sB_k, sB_n, sC_b, sC_l, sC_k, sC_n,
        sum_ptr, seg_chunks, n_seg, sum_split,
        HAS_IDX: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
        SOFTPLUS: tl.constexpr, FAST: tl.constexpr, MODE: tl.constexpr,
        BD: tl.constexpr, NP: tl.constexpr, T: tl.constexpr, CHUNK: tl.constexpr):
    # Segments as in the forward: MODE 1 runs the adjoint alone through each segment from a zero carry and
    # writes g at its first step, the sum of dt over its other steps (the decay across it) and its first dt;
    # MODE 2 starts each segment from the carry that the summaries of the segments after it compose.
    # The first segment's summary is read by none, so MODE 1 runs segments 1 .. n_seg - 1 only.
    # dout is read with strides so_*; du, ddelta, dz are written as contiguous (batch, L, K, dim) tensors;
    # dB, dC are added into fp32 (batch, L, K, NP) buffers (one atomic per block of BD channels); dA, dD and
    # dbias go to per-batch fp32 partials.
    pid_d, k, bs = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if MODE == 1:
        b, s = bs // (n_seg - 1), bs % (n_seg - 1) + 1
    else:
        b, s = bs // n_seg, bs % n_seg
    K = tl.num_programs(1)
    n_db = tl.num_programs(0)
    d = pid_d * BD + tl.arange(0, BD)
    n = tl.arange(0, NP)
    t = tl.arange(0, T)
    dmask, nmask = d < dim, n < n_state
    nd_mask = nmask[:, None] & dmask[None, :]
    kd = k * dim + d
    A = tl.load(A_ptr + kd[None, :] * n_state + n[:, None], mask=nd_mask, other=0.0)  # (NP, BD)
    bias = tl.load(bias_ptr + kd, mask=dmask, other=0.0) if HAS_BIAS else tl.zeros((BD,), tl.float32)
    Dv = tl.load(D_ptr + kd, mask=dmask, other=0.0) if HAS_D else tl.zeros((BD,), tl.float32)
    b64, k64 = b.to(tl.int64), k.to(tl.int64)
    u_base = u_ptr + b64 * su_b + k64 * su_k + d * su_d
    dl_base = dl_ptr + b64 * sd_b + k64 * sd_k + d * sd_d
    z_base = z_ptr + b64 * sz_b + k64 * sz_k + d * sz_d
    do_base = dout_ptr + b64 * so_b + k64 * so_k + d * so_d
    g_base = b64 * L * K * dim + k64 * dim + d  # contiguous (batch, L, K, dim): row stride K * dim
    gl = K * dim
    B_base = B_ptr + b64 * sB_b + k64 * sB_k + n * sB_n
    C_base = C_ptr + b64 * sC_b + k64 * sC_k + n * sC_n
    bc_base = b64 * L * K * NP + k64 * NP  # (batch, L, K, NP): row stride K * NP
    bl = K * NP
    idx_base = idx_ptr + k64 * L
    st = st_ptr + ((b64 * K + k) * dim + d)[None, :] * (n_chunks * NP) + n[:, None]
    NT: tl.constexpr = CHUNK // T
    scr = scr_ptr + (((b64 * n_seg + s) * K + k) * n_db + pid_d) * (NT * NP * BD) + n[:, None] * BD \
        + tl.arange(0, BD)[None, :]
    seg = (b64 * K + k) * n_seg * dim + d  # summaries: g (.., n_seg, dim, NP), then two dt rows
    sum_g = sum_ptr + seg[None, :] * NP + n[:, None]
    sum_dt = sum_ptr + sum_split + seg
    sum_dt0 = sum_dt + sum_split // NP

    gcar = tl.zeros((NP, BD), tl.float32)  # adjoint g at the step after the current tile
    acar = tl.zeros((NP, BD), tl.float32)  # decay a at that step
    if MODE == 2:
        for j in range(0, n_seg - 1 - s):
            s2 = n_seg - 1 - j
            across = _decay_row(tl.load(sum_dt + s2 * dim, mask=dmask, other=0.0), A)
            gcar = tl.load(sum_g + s2 * dim * NP, mask=nd_mask, other=0.0) + across * (acar * gcar)
            acar = _decay_row(tl.load(sum_dt0 + s2 * dim, mask=dmask, other=0.0), A)
    ag = acar * gcar  # what enters the tile's last step from the right: a_{t+1} g_{t+1}
    dA_acc = tl.zeros((NP, BD), tl.float32)
    dD_acc = tl.zeros((BD,), tl.float32)
    dbias_acc = tl.zeros((BD,), tl.float32)
    dt_sum = tl.zeros((BD,), tl.float32)
    dt_first = tl.zeros((BD,), tl.float32)
    c_lo = s * seg_chunks
    for ci in range(0, tl.minimum(seg_chunks, n_chunks - c_lo)):
        c = tl.minimum(c_lo + seg_chunks, n_chunks) - 1 - ci
        c0 = c * CHUNK
        nt = (tl.minimum(CHUNK, L - c0) + T - 1) // T
        h = tl.load(st + c * NP, mask=dmask[None, :], other=0.0)
        tl.debug_barrier()  # the previous chunk's reverse pass has finished reading the scratch
        # pre-pass: the state entering each tile of the chunk (pipelined as the forward's loop)
        if MODE != 1:
            tl.store(scr, h)
            rows_n = _rows(idx_base, c0 + t, c0 + t < L, HAS_IDX)
            u_n = _fetch(rows_n, c0 + t, L, u_base, su_l, dmask)
            dl_n = _fetch(rows_n, c0 + t, L, dl_base, sd_l, dmask)
            B_n = _fetch(rows_n, c0 + t, L, B_base, sB_l, nmask)
            rows_nn = _rows(idx_base, c0 + T + t, c0 + T + t < L, HAS_IDX)
            for i in range(0, nt - 1):
                pos, u_r, dl_r, B_r = c0 + i * T + t, u_n, dl_n, B_n
                u_n = _fetch(rows_nn, pos + T, L, u_base, su_l, dmask)
                dl_n = _fetch(rows_nn, pos + T, L, dl_base, sd_l, dmask)
                B_n = _fetch(rows_nn, pos + T, L, B_base, sB_l, nmask)
                rows_nn = _rows(idx_base, pos + 2 * T, pos + 2 * T < L, HAS_IDX)
                _, u, dt, _, Bt = _prep(u_r, dl_r, B_r, pos, L, bias, dmask, SOFTPLUS, FAST)
                a = _decay(dt, A)
                h = _row(_states(a, (dt * u)[:, None, :] * Bt[:, :, None], h, t), t, T - 1)
                tl.store(scr + (i + 1) * (NP * BD), h)
        tl.debug_barrier()  # the scratch is read by other threads than those that wrote it

        # the reverse pass, pipelined leftwards: tile i computes while tile i - 1 loads
        pos_n = c0 + (nt - 1) * T + t
        rows_n = _rows(idx_base, pos_n, pos_n < L, HAS_IDX)
        u_n = _fetch(rows_n, pos_n, L, u_base, su_l, dmask)
        dl_n = _fetch(rows_n, pos_n, L, dl_base, sd_l, dmask)
        B_n = _fetch(rows_n, pos_n, L, B_base, sB_l, nmask)
        C_n = _fetch(rows_n, pos_n, L, C_base, sC_l, nmask)
        do_n = _fetch(rows_n, pos_n, L, do_base, so_l, dmask)
        z_n = _fetch(rows_n, pos_n, L, z_base, sz_l, dmask) if HAS_Z else do_n
        rows_nn = _rows(idx_base, pos_n - T, (pos_n >= T) & (pos_n - T < L), HAS_IDX)
        S_n = tl.load(scr + (nt - 1) * (NP * BD)) if MODE != 1 else tl.zeros((NP, BD), tl.float32)
        for kk in range(0, nt):
            i = nt - 1 - kk
            pos = c0 + i * T + t
            rows, u_r, dl_r, B_r, C_r, do_r, z_r = rows_n, u_n, dl_n, B_n, C_n, do_n, z_n
            prv = pos - T
            S = S_n  # the state entering the tile
            if MODE != 1:
                u_n = _fetch(rows_nn, prv, L, u_base, su_l, dmask)
                B_n = _fetch(rows_nn, prv, L, B_base, sB_l, nmask)
                S_n = tl.load(scr + tl.maximum(i - 1, 0) * (NP * BD))
            dl_n = _fetch(rows_nn, prv, L, dl_base, sd_l, dmask)
            C_n = _fetch(rows_nn, prv, L, C_base, sC_l, nmask)
            do_n = _fetch(rows_nn, prv, L, do_base, so_l, dmask)
            if HAS_Z:
                z_n = _fetch(rows_nn, prv, L, z_base, sz_l, dmask)
            rows_n = rows_nn
            rows_nn = _rows(idx_base, prv - T, (prv >= T) & (prv - T < L), HAS_IDX)
            rows = rows[:, None]
            m2, u, dt, sig, Bt = _prep(u_r, dl_r, B_r, pos, L, bias, dmask, SOFTPLUS, FAST)
            Ct = C_r.to(tl.float32)
            dout = do_r.to(tl.float32)
            a = _decay(dt, A)  # (T, NP, BD)
            if MODE != 1:
                dtu = dt * u
                bx = dtu[:, None, :] * Bt[:, :, None]
                # h_t, and h_{t-1} as the map to the state before each step: S enters the first step as
                # in _states and is its state before; elsewhere that map is the identity (1, -0.0), whose
                # products and sums are compiled away, as are the unused products of a
                first = t[:, None, None] == 0
                _, hs, _, hp = tl.associative_scan(
                    (a, tl.where(first, a * S[None, :, :] + bx, bx), tl.full(a.shape, 1.0, tl.float32),
                     tl.where(first, S[None, :, :], -0.0)), 0, _pair_prev)
                ah = a * hp  # a_t h_{t-1}, without cancellation
            if HAS_Z:
                zz = z_r.to(tl.float32)
                sz = _sigmoid(zz, FAST)
                dy = dout * zz * sz
                if MODE != 1:
                    y = tl.sum(hs * Ct[:, :, None], 1)
                    if HAS_D:
                        y += Dv[None, :] * u
                    dz = dout * y * sz * (1.0 + zz * (1.0 - sz))
                    tl.store(dz_ptr + g_base[None, :] + rows * gl, dz.to(dz_ptr.dtype.element_ty), mask=m2)
            else:
                dy = dout
            # adjoint, right to left: triples (P, Q, a) on the flipped tile, then the carry from the right
            # (the carry enters at the tile's last step, so the scan's Q is g itself and its P unused)
            cy = Ct[:, :, None] * dy[:, None, :]
            cy = tl.where(t[:, None, None] == T - 1, cy + ag[None, :, :], cy)
            _, qq, _ = tl.associative_scan((tl.full(a.shape, 1.0, tl.float32), tl.flip(cy, 0), tl.flip(a, 0)),
                                           0, _handoff)
            g = tl.flip(qq, 0)
            gcar = _row(g, t, 0)
            ag = _row(a, t, 0) * gcar  # only the product crosses to the next tile (8 registers, not 16)
            if MODE == 1:
                dt_sum += tl.sum(dt, 0)
                dt_first = tl.sum(tl.where(t[:, None] == 0, dt, -0.0), 0)
            else:
                gB = tl.sum(g * Bt[:, :, None], 1)  # (T, BD)
                w = g * ah  # dL/da_t a_t
                dA_acc += tl.sum(w * dt[:, None, :], 0)
                ddt = u * gB + tl.sum(w * A[None, :, :], 1)
                du = dt * gB
                if HAS_D:
                    du += Dv[None, :] * dy
                    dD_acc += tl.sum(dy * u, 0)
                ddl = tl.where(m2, ddt * sig, 0.0)
                dbias_acc += tl.sum(ddl, 0)
                tl.store(du_ptr + g_base[None, :] + rows * gl, du.to(du_ptr.dtype.element_ty), mask=m2)
                tl.store(ddl_ptr + g_base[None, :] + rows * gl, ddl.to(ddl_ptr.dtype.element_ty), mask=m2)
                # dB_t and dC_t: this block's channels summed, then added into the fp32 buffers
                sums = _sum_channels(g * dtu[:, None, :], hs * dy[:, None, :])  # (tile, step, state)
                # the sums' steps and states, derived here: held across the loop instead, they cost the
                # reverse loop 46 more instructions a tile, 3 of them spills (sm_90 SASS)
                q = tl.arange(0, 2 * T * NP)
                p_of = c0 + i * T + (q // NP) % T
                r_of = _rows(idx_base, p_of, p_of < L, HAS_IDX)
                ofs = bc_base + r_of * bl + q % NP
                tl.atomic_add(tl.where(q >= T * NP, dC_ptr + ofs, dB_ptr + ofs), sums,
                              mask=(p_of < L) & (q % NP < n_state), sem="relaxed")

    if MODE == 1:
        tl.store(sum_g + s * dim * NP, gcar, mask=nd_mask)
        tl.store(sum_dt + s * dim, dt_sum - dt_first, mask=dmask)
        tl.store(sum_dt0 + s * dim, dt_first, mask=dmask)
    else:
        pk = (bs.to(tl.int64) * K + k) * dim + d
        tl.store(dA_ptr + pk[None, :] * NP + n[:, None], dA_acc, mask=nd_mask)
        tl.store(dD_ptr + pk, dD_acc, mask=dmask)
        tl.store(dbias_ptr + pk, dbias_acc, mask=dmask)


# -----------------------------------------------------------------------------
# Launchers
# -----------------------------------------------------------------------------

# channels per program BD, steps per tile T, warps; CHUNK = steps between saved states (the backward's
# recompute span). Chosen per element size of u (2 = bf16/fp16, 4 = fp32). bf16: the fastest of the
# configurations timed at the models' shapes (README, Speed). The backward's 16 x 4 x 1, with its channel
# sums through shared memory (_sum_channels; H100, session 28, ms): 1.20 at DiM-L/2's 1024 px shape against
# 1.24 for 8 x 8 x 1, 1.42 for 8 x 4 x 1, 1.46 for 16 x 2 x 1; at DiM-S/2's (Fashion-MNIST, batch 128)
# 1.33-1.42 against 1.60, 1.80 and 1.58.
# The forward's entry is what it runs with segments (below); 16 x 8 x 1 there was 5% ahead of 32 x 4 x 1
# at DiM-L/2's 2048 px shape (H100, session 21).
TRITON_CONFIG = {"fwd": {2: dict(BD=16, T=8, num_warps=1), 4: dict(BD=16, T=4, num_warps=1)},
          "bwd": {2: dict(BD=16, T=4, num_warps=1), 4: dict(BD=8, T=4, num_warps=1)}}
# The bf16 forward on a GPU runs without segments (the segment summaries cost it a second pass over every
# segment but the last, ~0.7 of the main one) where one of these channel blocks, the widest first, gives
# UNSEGMENTED_PROGRAMS programs per multiprocessor. Session 21 (H100, against the segmented 32 x 4 x 1
# shipped before): DiM-L/2's training shapes at 1024 px 0.34 ms (8 channels, 512 programs) against 0.45,
# its sampling shapes (batch doubled by guidance) 0.56 against 0.75 (1024 px, 16 channels x 8 steps) and
# 1.13 against 1.31 (2048 px, 8 channels); at 2048 px, batch 1 (256 programs of 8 channels) segments stay
# ahead, 0.73 against 1.16 ms. Session 22 (H100): 16 channels take tiles of 16 steps, 0.51 against 0.56
# ms at DiM-L/2's 1024 px sampling shape, though 128 elements a thread spill (200 bytes of stack): the
# longer tile amortises each tile's fixed work (row loads, layout changes, the carried state) as 8 x 16
# does; 4 x 32 and 2 x 32 (more programs, 64 elements) were 0.85-1.4 ms. () turns the choice off.
FWD_UNSEGMENTED = (dict(BD=32, T=4, num_warps=1), dict(BD=16, T=16, num_warps=1),
                   dict(BD=8, T=16, num_warps=1))
UNSEGMENTED_PROGRAMS = 3
CHUNK = 64
# a * b + c as one fused multiply-add, as the configurations above were timed: Triton's default until
# 3.10, which turns it off unless a launch asks for it
FUSE_FMA = dict(enable_fp_fusion=True)


def _cdiv(a, b):
    return (a + b - 1) // b


def _next_power_of_2(n):
    # bit arithmetic, so it also takes torch.compile's symbolic sizes (in the fakes); triton's own
    # helpers of the same names cost ~15 us a call from Python in Triton 3.9, eleven calls per scan
    n -= 1
    for shift in (1, 2, 4, 8, 16, 32):
        n |= n >> shift
    return n + 1


def _config(u, L, which="fwd", base=None):
    cfg = dict(base or TRITON_CONFIG[which][2 if u.element_size() <= 2 else 4], CHUNK=CHUNK)
    cfg["CHUNK"] = max(cfg["T"], min(cfg["CHUNK"], _next_power_of_2(L)))
    return cfg


def _unsegmented(scans, dim, multiprocessors):
    """The widest of FWD_UNSEGMENTED's configurations whose programs over `scans` sequences of `dim`
    channels number UNSEGMENTED_PROGRAMS per multiprocessor, or None (segments, then)."""
    for base in FWD_UNSEGMENTED:
        if scans * _cdiv(dim, base["BD"]) >= UNSEGMENTED_PROGRAMS * multiprocessors:
            return base
    return None


def _fwd_launch(u, batch, K, dim, L):
    """The forward's configuration and its segments (n_seg, chunks a segment): unsegmented with the widest
    channel block of FWD_UNSEGMENTED that fills the GPU enough, else TRITON_CONFIG's with segments."""
    if u.element_size() <= 2 and u.device.type == "cuda" and SEGMENTS is None:
        base = _unsegmented(batch * K, dim, _multiprocessors(_index(u.device)))
        if base is not None:
            cfg = _config(u, L, base=base)
            return cfg, 1, _cdiv(L, cfg["CHUNK"])
    cfg = _config(u, L)
    n_chunks = _cdiv(L, cfg["CHUNK"])
    return (cfg, *_segments(batch, K, _cdiv(dim, cfg["BD"]), n_chunks, u.device))


def _s4(x):
    """Strides (batch, L, K, channel) of a 4-D tensor."""
    return tuple(x.stride())


def _segments(batch, K, n_db, n_chunks, device):
    """How many segments to cut the sequence into: enough programs to fill the GPU (SEGMENT_TARGET per
    multiprocessor), but at least MIN_SEGMENT_CHUNKS chunks per segment. 1 = no split."""
    if SEGMENTS is not None:
        n_seg = SEGMENTS
    elif device.type != "cuda":
        n_seg = 1
    else:
        n_seg = _cdiv(SEGMENT_TARGET * _multiprocessors(_index(device)), batch * K * n_db)
    n_seg = max(1, min(n_seg, n_chunks // MIN_SEGMENT_CHUNKS))
    seg_chunks = _cdiv(n_chunks, n_seg)
    return _cdiv(n_chunks, seg_chunks), seg_chunks


# segment target 64 (programs per multiprocessor): the backward 5-7% faster than with 32 at DiM-L/2's 1024
# px shape and (8, 1536, 4096), the same elsewhere
SEGMENT_TARGET, MIN_SEGMENT_CHUNKS, SEGMENTS = 64, 4, None


def _index(device):
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.lru_cache(maxsize=None)
def _multiprocessors(index):
    return torch.cuda.get_device_properties(index).multi_processor_count  # once per GPU, not per call


def scan_fwd(u, delta, z, B, C, A, D, dt_bias, order, softplus=True, out_dtype=None):
    """u, delta, z: (batch, L, K, dim) views; B, C: (batch, L, K, N) views; A: (K, dim, N) fp32; D, dt_bias:
    (K, dim) fp32 or None; order: (K, L) int32 or None. Returns out (batch, L, K, dim) in out_dtype (default
    u's), the fp32 states at chunk borders and the chunk length. Every input is read in its own dtype and
    the scan runs in fp32 whatever the dtypes."""
    batch, L, K, dim = u.shape
    N = A.shape[-1]
    NP = max(_next_power_of_2(N), 2)
    cfg, n_seg, seg_chunks = _fwd_launch(u, batch, K, dim, L)
    n_chunks = _cdiv(L, cfg["CHUNK"])
    n_db = _cdiv(dim, cfg["BD"])
    out = torch.empty(batch, L, K, dim, device=u.device, dtype=out_dtype or u.dtype)
    states = torch.empty(batch, K, dim, n_chunks, NP, device=u.device, dtype=torch.float32)
    split = batch * K * n_seg * dim * NP
    summary = torch.empty(split + batch * K * n_seg * dim if n_seg > 1 else 1, device=u.device,
                          dtype=torch.float32)
    zz = z if z is not None else u
    args = (u, delta, zz, B, C, A, D if D is not None else A, dt_bias if dt_bias is not None else A,
            order if order is not None else A, out, states,
            L, dim, N, n_chunks, *_s4(u), *_s4(delta), *_s4(zz), *_s4(out), *_s4(B), *_s4(C),
            summary, seg_chunks, n_seg, split)
    flags = dict(HAS_IDX=order is not None, HAS_D=D is not None, HAS_Z=z is not None,
                 HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(softplus), FAST=not triton_interpreted(),
                 BD=cfg["BD"], NP=NP, T=cfg["T"], CHUNK=cfg["CHUNK"], num_warps=cfg["num_warps"],
                 maxnreg=cfg.get("maxnreg"), **FUSE_FMA)
    if n_seg > 1:  # the summaries of every segment but the last (none reads that one)
        _scan_fwd_kernel[(n_db, K, batch * (n_seg - 1))](*args, MODE=1, **flags)
    _scan_fwd_kernel[(n_db, K, batch * n_seg)](*args, MODE=2 if n_seg > 1 else 0, **flags)
    return out, states, cfg["CHUNK"]


def scan_bwd(dout, u, delta, z, B, C, A, D, dt_bias, order, states, chunk, softplus=True):
    """Gradients of scan_fwd. du, ddelta, dz come back as contiguous (batch, L, K, dim) tensors (callers sum
    over K where an input was shared), dB and dC as fp32 (batch, L, K, N), dA (K, dim, N), dD and ddt_bias
    (K, dim)."""
    batch, L, K, dim = u.shape
    N = A.shape[-1]
    NP = states.shape[-1]
    n_chunks = states.shape[3]
    cfg = _config(u, L, "bwd")
    T = min(cfg["T"], chunk)
    n_db = _cdiv(dim, cfg["BD"])
    n_seg, seg_chunks = _segments(batch, K, n_db, n_chunks, u.device)
    dev, f32 = u.device, torch.float32
    shape = (batch, L, K, dim)
    du = torch.empty(shape, device=dev, dtype=u.dtype)
    ddelta = torch.empty(shape, device=dev, dtype=delta.dtype)
    dz = torch.empty(shape, device=dev, dtype=z.dtype) if z is not None else None
    dB = torch.zeros(batch, L, K, NP, device=dev, dtype=f32)
    dC = torch.zeros(batch, L, K, NP, device=dev, dtype=f32)
    dA = torch.empty(batch * n_seg, K, dim, NP, device=dev, dtype=f32)
    dD = torch.empty(batch * n_seg, K, dim, device=dev, dtype=f32)
    dbias = torch.empty(batch * n_seg, K, dim, device=dev, dtype=f32)
    scratch = torch.empty(batch * n_seg * K * n_db * (chunk // T) * cfg["BD"] * NP, device=dev, dtype=f32)
    split = batch * K * n_seg * dim * NP
    summary = torch.empty(split + 2 * batch * K * n_seg * dim if n_seg > 1 else 1, device=dev, dtype=f32)
    zz = z if z is not None else u
    args = (u, delta, zz, B, C, A, D if D is not None else A, dt_bias if dt_bias is not None else A,
            order if order is not None else A, dout, states, scratch,
            du, ddelta, dz if dz is not None else du, dB, dC, dA, dD, dbias,
            L, dim, N, n_chunks, *_s4(u), *_s4(delta), *_s4(zz), *_s4(dout), *_s4(B), *_s4(C),
            summary, seg_chunks, n_seg, split)
    flags = dict(HAS_IDX=order is not None, HAS_D=D is not None, HAS_Z=z is not None,
                 HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(softplus), FAST=not triton_interpreted(),
                 BD=cfg["BD"], NP=NP, T=T, CHUNK=chunk, num_warps=cfg["num_warps"],
                 maxnreg=cfg.get("maxnreg"), **FUSE_FMA)
    if n_seg > 1:  # the summaries of every segment but the first (none reads that one)
        _scan_bwd_kernel[(n_db, K, batch * (n_seg - 1))](*args, MODE=1, **flags)
    _scan_bwd_kernel[(n_db, K, batch * n_seg)](*args, MODE=2 if n_seg > 1 else 0, **flags)
    return (du, ddelta, dz, dB[..., :N], dC[..., :N], dA[..., :N].sum(0),
            dD.sum(0) if D is not None else None, dbias.sum(0) if dt_bias is not None else None)


# -----------------------------------------------------------------------------
# Causal depthwise conv + SiLU along the scan order (Mamba's conv1d, channel-last)
# -----------------------------------------------------------------------------
# out[row(p)] = silu(bias + sum_j w[j] x[row(p - W + 1 + j)]), zero before the first step: nn.Conv1d with
# padding W - 1, cut to L (state-spaces/mamba, mamba_ssm/modules/mamba_simple.py), applied along the scan order.
# It cannot live inside the scan kernel: x_proj reads its output to make the scan's delta, B and C.
#
# Forward: one program = a tile of S consecutive scan steps x BD channels, every row of it loaded at once
# (the steps' rows gathered through the order table), at each of the W shifts (the W - 1 rows of overlap
# come from cache); no loop. Walking one step at a time with the window in registers (causal-conv1d's
# CUDA kernels; this forward until session 24) kept one row's loads in flight at a time: 1.03-1.3x the
# tiles' time at the models' shapes (docs/speed_history.md, session 24).
# Backward: one program = BD channels x S consecutive scan steps, walked right to left one step at a
# time with the last W inputs and the next W - 1 gradients in registers; each row is read once, plus a
# halo of W - 1 rows, and rows are fetched two steps before they are used. It holds four taps, zero-
# padded on the left for W < 4 (mamba-ssm's conv widths are 2-4).


@_jit
def _conv_rows(base, idx_ptr, q, L, stride, dmask, HAS_IDX: tl.constexpr):
    """Rows of scan steps q (S,) as an (S, BD) fp32 tile; zeros for steps outside 0 <= q < L."""
    inside = (q >= 0) & (q < L)
    if HAS_IDX:
        r = tl.load(idx_ptr + tl.minimum(tl.maximum(q, 0), L - 1)).to(tl.int64)
    else:
        r = q.to(tl.int64)
    return tl.load(base + r[:, None] * stride, mask=inside[:, None] & dmask[None, :],
                   other=0.0).to(tl.float32)


@_jit
def _conv_pre(x_base, w_ptr, idx_ptr, bias, q, d, dmask, L, sx_l, HAS_IDX: tl.constexpr,
              W: tl.constexpr):
    """The conv before its SiLU at steps q: bias + sum_j w[j] x[q - W + 1 + j], (S, BD) fp32."""
    pre = tl.zeros((q.shape[0], d.shape[0]), tl.float32) + bias[None, :]
    for j in tl.static_range(W):
        w_j = tl.load(w_ptr + d * W + j, mask=dmask, other=0.0).to(tl.float32)
        pre += w_j[None, :] * _conv_rows(x_base, idx_ptr, q - (W - 1) + j, L, sx_l, dmask, HAS_IDX)
    return pre


@_jit
def _conv_fwd_kernel(x_ptr, w_ptr, b_ptr, idx_ptr, out_ptr, L, dim, sx_b, sx_l, sx_d, so_b, so_l, so_d,
                     HAS_IDX: tl.constexpr, HAS_BIAS: tl.constexpr, W: tl.constexpr, S: tl.constexpr,
                     BD: tl.constexpr, FAST: tl.constexpr):
    pid_l, pid_d, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    d = pid_d * BD + tl.arange(0, BD)
    dmask = d < dim
    q = pid_l * S + tl.arange(0, S)  # the tile's steps
    bias = tl.load(b_ptr + d, mask=dmask, other=0.0).to(tl.float32) if HAS_BIAS else \
        tl.zeros((BD,), tl.float32)
    b64 = b.to(tl.int64)
    pre = _conv_pre(x_ptr + b64 * sx_b + d[None, :] * sx_d, w_ptr, idx_ptr, bias, q, d, dmask, L, sx_l,
                    HAS_IDX, W)
    r = tl.load(idx_ptr + tl.minimum(q, L - 1)).to(tl.int64) if HAS_IDX else q.to(tl.int64)
    tl.store(out_ptr + b64 * so_b + r[:, None] * so_l + d[None, :] * so_d,
             _silu(pre, FAST).to(out_ptr.dtype.element_ty), mask=(q < L)[:, None] & dmask[None, :])


@_jit
def _conv_row(base, idx_ptr, p, L, stride, dmask, HAS_IDX: tl.constexpr):
    """Row p of the scan (BD,) in fp32; zeros outside 0 <= p < L."""
    pv = tl.full(dmask.shape, 0, tl.int32) + p  # a vector: the interpreter rejects scalar & vector masks
    inside = (pv >= 0) & (pv < L)
    if HAS_IDX:
        r = tl.load(idx_ptr + tl.minimum(tl.maximum(p, 0), L - 1)).to(tl.int64)
    else:
        r = tl.zeros((), tl.int64) + p
    return tl.load(base + r * stride, mask=dmask & inside, other=0.0).to(tl.float32)


@_jit
def _conv_tap(w_ptr, d, dmask, j: tl.constexpr, W: tl.constexpr):
    """Tap j of four (oldest first): the weights, zero-padded on the left when W < 4."""
    if j >= 4 - W:
        return tl.load(w_ptr + d * W + (j - (4 - W)), mask=dmask, other=0.0).to(tl.float32)
    return tl.zeros(d.shape, tl.float32)


@_jit
def _conv_add_tap(dw_ptr, d, dmask, v, j: tl.constexpr, W: tl.constexpr):
    if j >= 4 - W:
        tl.atomic_add(dw_ptr + d * W + (j - (4 - W)), v, mask=dmask, sem="relaxed")


@_jit
def _conv_bwd_kernel(x_ptr, w_ptr, b_ptr, idx_ptr, dout_ptr, dx_ptr, dw_ptr, db_ptr, L, dim,
                     sx_b, sx_l, sx_d, so_b, so_l, so_d,
                     HAS_IDX: tl.constexpr, HAS_BIAS: tl.constexpr, W: tl.constexpr, S: tl.constexpr,
                     BD: tl.constexpr, FAST: tl.constexpr):
    # Right to left from W - 1 steps past the program's last one (their gradients g reach its last dx):
    # g_p = dout_p silu'(pre_p), dx_p = sum_s w[W - 1 - s] g_{p+s}, dw_j = sum_p g_p x_{p-W+1+j}. dx is
    # written as a contiguous (batch, L, dim) tensor; dw (dim, W) and dbias (dim,) are fp32 sums, one
    # atomic add per program and tap.
    pid_l, pid_d, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    d = pid_d * BD + tl.arange(0, BD)
    dmask = d < dim
    zero = tl.full(dmask.shape, 0, tl.int32)
    w0, w1 = _conv_tap(w_ptr, d, dmask, 0, W), _conv_tap(w_ptr, d, dmask, 1, W)
    w2, w3 = _conv_tap(w_ptr, d, dmask, 2, W), _conv_tap(w_ptr, d, dmask, 3, W)
    bias = tl.load(b_ptr + d, mask=dmask, other=0.0).to(tl.float32) if HAS_BIAS else \
        tl.zeros((BD,), tl.float32)
    b64 = b.to(tl.int64)
    x_base = x_ptr + b64 * sx_b + d * sx_d
    o_base = dout_ptr + b64 * so_b + d * so_d
    dx_base = dx_ptr + b64 * L * dim + d
    p0 = pid_l * S
    p1 = tl.minimum(p0 + S, L)
    hi = tl.minimum(p1 + 3, L) - 1  # the first step visited
    xa = _conv_row(x_base, idx_ptr, hi, L, sx_l, dmask, HAS_IDX)  # x at p, p - 1, p - 2
    xb = _conv_row(x_base, idx_ptr, hi - 1, L, sx_l, dmask, HAS_IDX)
    xc = _conv_row(x_base, idx_ptr, hi - 2, L, sx_l, dmask, HAS_IDX)
    f1 = _conv_row(x_base, idx_ptr, hi - 3, L, sx_l, dmask, HAS_IDX)  # in flight: x at p - 3, p - 4
    f2 = _conv_row(x_base, idx_ptr, hi - 4, L, sx_l, dmask, HAS_IDX)
    o1 = _conv_row(o_base, idx_ptr, hi, L, so_l, dmask, HAS_IDX)  # in flight: dout at p, p - 1
    o2 = _conv_row(o_base, idx_ptr, hi - 1, L, so_l, dmask, HAS_IDX)
    g1 = tl.zeros((BD,), tl.float32)  # g at p + 1, p + 2, p + 3
    g2 = tl.zeros((BD,), tl.float32)
    g3 = tl.zeros((BD,), tl.float32)
    dw0 = tl.zeros((BD,), tl.float32)
    dw1 = tl.zeros((BD,), tl.float32)
    dw2 = tl.zeros((BD,), tl.float32)
    dw3 = tl.zeros((BD,), tl.float32)
    dbias = tl.zeros((BD,), tl.float32)
    for i in range(0, hi - p0 + 1):
        p = hi - i
        xd = f1
        f1 = f2
        f2 = _conv_row(x_base, idx_ptr, p - 5, L, sx_l, dmask & (zero + p - 5 >= p0 - 3), HAS_IDX)
        go = o1
        o1 = o2
        o2 = _conv_row(o_base, idx_ptr, p - 2, L, so_l, dmask & (zero + p - 2 >= p0), HAS_IDX)
        pre = bias + w0 * xd + w1 * xc + w2 * xb + w3 * xa
        sg = _sigmoid(pre, FAST)
        g = go * sg * (1.0 + pre * (1.0 - sg))  # d silu
        own = (zero + p) < p1  # not a halo step
        dx = w3 * g + w2 * g1 + w1 * g2 + w0 * g3
        r = tl.load(idx_ptr + p).to(tl.int64) if HAS_IDX else tl.zeros((), tl.int64) + p
        tl.store(dx_base + r * dim, dx.to(dx_ptr.dtype.element_ty), mask=dmask & own)
        g_own = tl.where(own, g, 0.0)
        dw0 += g_own * xd
        dw1 += g_own * xc
        dw2 += g_own * xb
        dw3 += g_own * xa
        dbias += g_own
        g3, g2, g1 = g2, g1, g
        xa, xb, xc = xb, xc, xd
    tl.atomic_add(db_ptr + d, dbias, mask=dmask, sem="relaxed")
    _conv_add_tap(dw_ptr, d, dmask, dw0, 0, W)
    _conv_add_tap(dw_ptr, d, dmask, dw1, 1, W)
    _conv_add_tap(dw_ptr, d, dmask, dw2, 2, W)
    _conv_add_tap(dw_ptr, d, dmask, dw3, 3, W)


# Forward: a tile of S steps x BD channels, 16 x 256 with 4 warps, the best of eight tiles at five
# shapes (docs/speed_history.md, session 24). Backward: S steps x BD channels a program, one warp
# (BD / 32 channels a lane); its best alternative was within 1% of 64 x 128 x 1 (session 16).
CONV_CONFIG = {"fwd": dict(S=16, BD=256, num_warps=4), "bwd": dict(S=64, BD=128, num_warps=1)}
CONV_MAX_WIDTH = 4


def conv_fwd(x, weight, bias, order):
    """x: (batch, L, dim) view; weight: (dim, W), W <= 4; bias: (dim,) or None; order: (L,) int32 or None."""
    batch, L, dim = x.shape
    out = torch.empty(batch, L, dim, device=x.device, dtype=x.dtype)
    c = CONV_CONFIG["fwd"]
    grid = (_cdiv(L, c["S"]), _cdiv(dim, c["BD"]), batch)
    _conv_fwd_kernel[grid](x, weight, bias if bias is not None else weight,
                           order if order is not None else weight, out, L, dim, *x.stride(), *out.stride(),
                           HAS_IDX=order is not None, HAS_BIAS=bias is not None, W=weight.shape[1],
                           S=c["S"], BD=c["BD"], FAST=not triton_interpreted(), num_warps=c["num_warps"],
                           **FUSE_FMA)
    return out


def conv_bwd(dout, x, weight, bias, order):
    batch, L, dim = x.shape
    dx = torch.empty(batch, L, dim, device=x.device, dtype=x.dtype)
    dw = torch.zeros(dim, weight.shape[1], device=x.device, dtype=torch.float32)
    db = torch.zeros(dim, device=x.device, dtype=torch.float32)
    c = CONV_CONFIG["bwd"]
    grid = (_cdiv(L, c["S"]), _cdiv(dim, c["BD"]), batch)
    _conv_bwd_kernel[grid](x, weight, bias if bias is not None else weight,
                           order if order is not None else weight, dout, dx, dw, db, L, dim,
                           *x.stride(), *dout.stride(), HAS_IDX=order is not None,
                           HAS_BIAS=bias is not None, W=weight.shape[1], S=c["S"], BD=c["BD"],
                           FAST=not triton_interpreted(), num_warps=c["num_warps"], **FUSE_FMA)
    return dx, dw, db if bias is not None else None


# -----------------------------------------------------------------------------
# Depthwise k x k conv + SiLU on a channels-last map (VMamba's SS2D: LaMamba)
# -----------------------------------------------------------------------------
# out[b, h, w] = silu(bias + sum_{i,j} wt[i, j] x[b, h + i - p, w + j - p]), zero padding p = (k - 1) / 2,
# k odd: nn.Conv2d(D, D, k, padding=p, groups=D) followed by SiLU (MzeroMiko/VMamba,
# classification/models/vmamba.py, SS2D), in the (B, H, W, D) layout the linear layers write, so no
# permute copies. The taps are read as a (k * k, D) table (a program loads BD channels of a tap at once).
# Forward: one program = a tile of TH x TW pixels x BD channels, no loop; each tap is a load of the tile
# shifted (the overlap comes from cache). Backward in two passes: g = dout silu'(pre), pre recomputed,
# written in fp32; then dx = the conv of g with the taps flipped, and, from the same shifted loads of g,
# dwt[i, j] = sum_pixels g[pixel - shift] x[pixel]. The dw sums are added atomically into one of SLOTS
# copies (the program's), summed after: every program adds into the same k * k x D numbers, and adds
# into one address are serialised.


@_jit
def _dw_tile(base, hh, ww, H, W, sh, sw, dmask, di, dj):
    """The (TH * TW, BD) fp32 tile at pixels (hh + di, ww + dj); zeros outside the map."""
    h, w = hh + di, ww + dj
    inside = (h >= 0) & (h < H) & (w >= 0) & (w < W)
    return tl.load(base + h.to(tl.int64)[:, None] * sh + w[:, None] * sw,
                   mask=inside[:, None] & dmask[None, :], other=0.0).to(tl.float32)


@_jit
def _dw_pixels(H, W, TH: tl.constexpr, TW: tl.constexpr):
    """The program's pixels (rows hh, columns ww: (TH * TW,)) and whether each is on the map."""
    n_w = tl.cdiv(W, TW)
    s = tl.arange(0, TH * TW)
    hh = (tl.program_id(0) // n_w) * TH + s // TW
    ww = (tl.program_id(0) % n_w) * TW + s % TW
    return hh, ww, (hh < H) & (ww < W)


@_jit
def _dw_pre(x_ptr, taps_ptr, b_ptr, H, W, D, sx_b, sx_h, sx_w, K: tl.constexpr, HAS_BIAS: tl.constexpr,
            TH: tl.constexpr, TW: tl.constexpr, BD: tl.constexpr):
    """The program's tile (see _dw_pixels; channels d, dmask; batch b64) and the conv before its SiLU
    there, bias + sum of the K x K taps: (TH * TW, BD) fp32."""
    hh, ww, on_map = _dw_pixels(H, W, TH, TW)
    d = tl.program_id(1) * BD + tl.arange(0, BD)
    dmask = d < D
    b64 = tl.program_id(2).to(tl.int64)
    x_base = x_ptr + b64 * sx_b + d[None, :]
    pre = tl.zeros((TH * TW, BD), tl.float32)
    if HAS_BIAS:
        pre += tl.load(b_ptr + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    for t in tl.static_range(K * K):
        w_t = tl.load(taps_ptr + t * D + d, mask=dmask, other=0.0)
        pre += w_t[None, :] * _dw_tile(x_base, hh, ww, H, W, sx_h, sx_w, dmask, t // K - (K - 1) // 2,
                                       t % K - (K - 1) // 2)
    return hh, ww, on_map, d, dmask, b64, pre


@_jit
def _dwconv_fwd_kernel(x_ptr, taps_ptr, b_ptr, out_ptr, H, W, D, sx_b, sx_h, sx_w, K: tl.constexpr,
                       HAS_BIAS: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr, BD: tl.constexpr,
                       FAST: tl.constexpr):
    hh, ww, on_map, d, dmask, b64, pre = _dw_pre(x_ptr, taps_ptr, b_ptr, H, W, D, sx_b, sx_h, sx_w, K,
                                                 HAS_BIAS, TH, TW, BD)
    rows = (b64 * H + hh) * W + ww  # out is a contiguous (B, H, W, D)
    tl.store(out_ptr + rows[:, None] * D + d[None, :], _silu(pre, FAST).to(out_ptr.dtype.element_ty),
             mask=on_map[:, None] & dmask[None, :])


@_jit
def _dwconv_bwd_g_kernel(x_ptr, taps_ptr, b_ptr, dout_ptr, g_ptr, H, W, D, sx_b, sx_h, sx_w,
                         so_b, so_h, so_w, K: tl.constexpr, HAS_BIAS: tl.constexpr, TH: tl.constexpr,
                         TW: tl.constexpr, BD: tl.constexpr, FAST: tl.constexpr):
    # g = dout * silu'(pre), into a contiguous fp32 (B, H, W, D)
    hh, ww, on_map, d, dmask, b64, pre = _dw_pre(x_ptr, taps_ptr, b_ptr, H, W, D, sx_b, sx_h, sx_w, K,
                                                 HAS_BIAS, TH, TW, BD)
    dout = _dw_tile(dout_ptr + b64 * so_b + d[None, :], hh, ww, H, W, so_h, so_w, dmask, 0, 0)
    sg = _sigmoid(pre, FAST)
    rows = (b64 * H + hh) * W + ww
    tl.store(g_ptr + rows[:, None] * D + d[None, :], dout * sg * (1.0 + pre * (1.0 - sg)),
             mask=on_map[:, None] & dmask[None, :])


@_jit
def _dwconv_bwd_dx_kernel(x_ptr, taps_ptr, g_ptr, dx_ptr, dw_ptr, db_ptr, H, W, D, sx_b, sx_h, sx_w,
                          K: tl.constexpr, HAS_BIAS: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr,
                          BD: tl.constexpr, SLOTS: tl.constexpr):
    # dx[pixel] = sum_t wt[t] g[pixel - shift_t]; dwt[t] = sum_pixels g[pixel - shift_t] x[pixel] into
    # dw_ptr's slot (SLOTS, K * K, D), db likewise (SLOTS, D)
    hh, ww, on_map = _dw_pixels(H, W, TH, TW)
    d = tl.program_id(1) * BD + tl.arange(0, BD)
    dmask = d < D
    b64 = tl.program_id(2).to(tl.int64)
    slot = (tl.program_id(0) + tl.program_id(2) * tl.num_programs(0)) % SLOTS
    dw_slot, db_slot = dw_ptr + slot * (K * K) * D, db_ptr + slot * D
    g_base = g_ptr + b64 * H * W * D + d[None, :]
    x = _dw_tile(x_ptr + b64 * sx_b + d[None, :], hh, ww, H, W, sx_h, sx_w, dmask, 0, 0)
    dx = tl.zeros((TH * TW, BD), tl.float32)
    for t in tl.static_range(K * K):
        w_t = tl.load(taps_ptr + t * D + d, mask=dmask, other=0.0)
        g = _dw_tile(g_base, hh, ww, H, W, W * D, D, dmask, (K - 1) // 2 - t // K, (K - 1) // 2 - t % K)
        dx += w_t[None, :] * g
        tl.atomic_add(dw_slot + t * D + d, tl.sum(g * x, 0), mask=dmask, sem="relaxed")
        if HAS_BIAS and t == (K * K) // 2:  # the centre tap's g is g itself
            tl.atomic_add(db_slot + d, tl.sum(g, 0), mask=dmask, sem="relaxed")
    rows = (b64 * H + hh) * W + ww
    tl.store(dx_ptr + rows[:, None] * D + d[None, :], dx.to(dx_ptr.dtype.element_ty),
             mask=on_map[:, None] & dmask[None, :])


# TH x TW pixels x BD channels a program; SLOTS copies of the dw sums. At LaMamba-L's 1024 px stage shapes
# (H100, session 26) the forward takes 0.65-0.83x the time of cuDNN's conv with its SiLU and permutes,
# the fastest or within 5% of it of four tiles; forward + backward 0.88-1.05x at batch 2, 1.29x at
# batch 4 (README, Speed). In LaMamba-L's 1024 px steps: sampling 34.5 ms against 36.7 with cuDNN (35.9
# with nine shifted adds fused by Inductor), training 89.8 against 92.6 (same machine).
DWCONV_CONFIG = dict(TH=4, TW=16, BD=64, num_warps=4, SLOTS=16)


def _dw_launch(x):
    B, H, W, D = x.shape
    c = DWCONV_CONFIG
    grid = (_cdiv(H, c["TH"]) * _cdiv(W, c["TW"]), _cdiv(D, c["BD"]), B)
    return grid, dict(TH=c["TH"], TW=c["TW"], BD=c["BD"], num_warps=c["num_warps"], **FUSE_FMA)


def _dw_taps(weight):
    """nn.Conv2d's depthwise weight (D, 1, K, K) as an fp32 (K * K, D) table."""
    return weight.reshape(weight.shape[0], -1).t().float().contiguous()


def dwconv_fwd(x, weight, bias):
    """x: (B, H, W, D), channels contiguous; weight: (D, 1, K, K), K odd; bias: (D,) or None. Returns
    silu(the depthwise conv, zero padding (K - 1) / 2) as a contiguous (B, H, W, D) in x's dtype."""
    B, H, W, D = x.shape
    out = torch.empty(B, H, W, D, device=x.device, dtype=x.dtype)
    grid, launch = _dw_launch(x)
    _dwconv_fwd_kernel[grid](x, _dw_taps(weight), bias if bias is not None else weight, out, H, W, D,
                             *x.stride()[:3], K=weight.shape[-1], HAS_BIAS=bias is not None,
                             FAST=not triton_interpreted(), **launch)
    return out


def dwconv_bwd(dout, x, weight, bias):
    B, H, W, D = x.shape
    K, slots = weight.shape[-1], DWCONV_CONFIG["SLOTS"]
    taps = _dw_taps(weight)
    g = torch.empty(B, H, W, D, device=x.device, dtype=torch.float32)
    dx = torch.empty(B, H, W, D, device=x.device, dtype=x.dtype)
    dw = torch.zeros(slots, K * K, D, device=x.device, dtype=torch.float32)
    db = torch.zeros(slots, D, device=x.device, dtype=torch.float32)
    grid, launch = _dw_launch(x)
    b = bias if bias is not None else weight
    _dwconv_bwd_g_kernel[grid](x, taps, b, dout, g, H, W, D, *x.stride()[:3], *dout.stride()[:3], K=K,
                               HAS_BIAS=bias is not None, FAST=not triton_interpreted(), **launch)
    _dwconv_bwd_dx_kernel[grid](x, taps, g, dx, dw, db, H, W, D, *x.stride()[:3], K=K,
                                HAS_BIAS=bias is not None, SLOTS=slots, **launch)
    dw = dw.sum(0).t().contiguous().view(weight.shape)  # contiguous, as the op's fake says
    return dx, dw, db.sum(0) if bias is not None else None


# -----------------------------------------------------------------------------
# VMamba's SS2D output in sampling (LaMamba): the K directions' sum, LayerNorm, the SiLU(z) gate
# -----------------------------------------------------------------------------
# out = LN(sum_k y[.., k, :]) rounded to z's dtype, times silu(z): what SS2D.mix computes after its scans,
# one token a program with its row in registers, so the K fp32 outputs are read once. Inductor's kernels
# for the same steps take 1.04-1.14x its time at LaMamba-L's stage shapes, and LaMamba-L's 1024 px sampling
# step 36.1 ms against 35.8 (H100; README, Speed, session 25). Sampling only: no backward.

@_jit
def _sum_norm_gate_kernel(y_ptr, z_ptr, w_ptr, b_ptr, out_ptr, D, sy_r, sy_k, sz_r, so_r, eps,
                          K: tl.constexpr, BD: tl.constexpr, FAST: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BD)
    dmask = d < D
    total = tl.zeros((BD,), tl.float32)
    for k in tl.static_range(K):  # in order, as the adds of the unfused path
        total += tl.load(y_ptr + row * sy_r + k * sy_k + d, mask=dmask, other=0.0).to(tl.float32)
    centred = tl.where(dmask, total - tl.sum(total, 0) / D, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, 0) / D + eps)
    w = tl.load(w_ptr + d, mask=dmask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + d, mask=dmask, other=0.0).to(tl.float32)
    normed = (centred * rstd * w + b).to(out_ptr.dtype.element_ty).to(tl.float32)
    z = tl.load(z_ptr + row * sz_r + d, mask=dmask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * so_r + d, (normed * _silu(z, FAST)).to(out_ptr.dtype.element_ty), mask=dmask)


def sum_norm_gate_fwd(y, z, weight, bias, eps):
    """y: (batch, L, K, D) with contiguous channels; z: (batch, ..., D), L tokens a sample; weight, bias:
    (D,). Returns LN(y.sum(2)) in z's dtype times silu(z), shaped like z."""
    batch, L, K, D = y.shape
    z2 = z.reshape(batch * L, D)
    out = torch.empty(batch * L, D, device=z.device, dtype=z.dtype)
    BD = max(_next_power_of_2(D), 32)
    _sum_norm_gate_kernel[(batch * L,)](y, z2, weight, bias, out, D, y.stride(1), y.stride(2), z2.stride(0),
                                        out.stride(0), eps, K=K, BD=BD, FAST=not triton_interpreted(),
                                        num_warps=max(1, min(8, BD // 256)))
    return out.view(z.shape)


# -----------------------------------------------------------------------------
# torch.library ops, and the autograd functions that call them
# -----------------------------------------------------------------------------
# One op per kernel launch sequence (forward, backward; scan, conv), each with a fake (shape-only)
# implementation, so torch.compile traces a model through each call as one node, and selective
# checkpointing can keep the scan's output by its op (ssm._keep_the_scan). Autograd is a plain
# autograd.Function around the ops (scan, conv: what ssm.py calls), which Dynamo traces too. Not
# torch.library.custom_op with register_autograd, whose Python layers (a generated autograd function
# that redispatches, default filling, a Dynamo guard around the implementation) cost host time at every
# call: with them gone (and _cdiv above), a forward + backward through ssm.mamba_scan takes ~0.83 ms of
# host time instead of 1.23 (kernels stubbed out, a 2-core CPU), a cost every eager step pays (torchrun,
# where CUDA graphs are off) and the order of a layer's GPU time at small shapes.

_lib = torch.library.Library("diffmamba", "FRAGMENT")  # kept: the ops live as long as it does
_lib.define("scan(Tensor u, Tensor delta, Tensor? z, Tensor B, Tensor C, Tensor A, Tensor? D, "
            "Tensor? dt_bias, Tensor? order, bool softplus, ScalarType? out_dtype=None, "
            "bool sum_directions=False) -> (Tensor, Tensor)")
_lib.define("scan_backward(Tensor dout, Tensor u, Tensor delta, Tensor? z, Tensor B, Tensor C, Tensor A, "
            "Tensor? D, Tensor? dt_bias, Tensor? order, Tensor states, bool softplus) -> Tensor[]")
_lib.define("conv_silu(Tensor x, Tensor weight, Tensor? bias, Tensor? order) -> Tensor")
_lib.define("dwconv_silu(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
_lib.define("dwconv_silu_backward(Tensor dout, Tensor x, Tensor weight, Tensor? bias) -> Tensor[]")
_lib.define("sum_norm_gate(Tensor y, Tensor z, Tensor weight, Tensor bias, float eps) -> Tensor")
_lib.define("conv_silu_backward(Tensor dout, Tensor x, Tensor weight, Tensor? bias, Tensor? order) "
            "-> Tensor[]")


def _device(x):
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _scan_impl(u, delta, z, B, C, A, D, dt_bias, order, softplus, out_dtype=None, sum_directions=False):
    """The scan on (batch, L, K, dim) views (see scan_fwd); returns (out, chunk states), out summed over
    the K directions if sum_directions ((batch, L, dim): what the op keeps for a backward is then the
    sum, K times smaller)."""
    with _device(u):
        out, states, _ = scan_fwd(u, delta, z, B, C, A, D, dt_bias, order, softplus, out_dtype)
    return (out.sum(2) if sum_directions else out), states


def _scan_fake(u, delta, z, B, C, A, D, dt_bias, order, softplus, out_dtype=None, sum_directions=False):
    batch, L, K, dim = u.shape
    NP = max(_next_power_of_2(A.shape[-1]), 2)
    n_chunks = _cdiv(L, _config(u, L)["CHUNK"])
    shape = (batch, L, dim) if sum_directions else (batch, L, K, dim)
    return (u.new_empty(shape, dtype=out_dtype or u.dtype),
            u.new_empty(batch, K, dim, n_chunks, NP, dtype=torch.float32))


def _scan_backward_impl(dout, u, delta, z, B, C, A, D, dt_bias, order, states, softplus):
    """Gradients for u, delta, z, B, C, A, D, dt_bias (empty tensors where an input was None)."""
    none = lambda: u.new_empty(0)  # a new one each time: outputs must not alias each other
    with _device(u):
        chunk = _config(u, u.shape[1])["CHUNK"]
        du, ddelta, dz, dB, dC, dA, dD, dbias = scan_bwd(dout, u, delta, z, B, C, A, D, dt_bias, order,
                                                         states, chunk, softplus)
    # dB, dC contiguous as the fake says: cut from (.., NP) buffers they are not when N < NP (Inductor
    # checks the strides)
    return [du, ddelta, none() if dz is None else dz, dB.to(B.dtype).contiguous(),
            dC.to(C.dtype).contiguous(), dA,
            none() if dD is None else dD, none() if dbias is None else dbias]


def _scan_backward_fake(dout, u, delta, z, B, C, A, D, dt_bias, order, states, softplus):
    like = lambda x: u.new_empty(0) if x is None else x.new_empty(x.shape)
    return [u.new_empty(u.shape), delta.new_empty(u.shape), z.new_empty(u.shape) if z is not None else like(z),
            like(B), like(C), like(A), like(D), like(dt_bias)]


def _conv_impl(x, weight, bias, order):
    """silu(causal depthwise conv) along the order (see conv_fwd); returns a contiguous (batch, L, dim)."""
    with _device(x):
        return conv_fwd(x, weight, bias, order)


def _conv_fake(x, weight, bias, order):
    return x.new_empty(x.shape)


def _conv_backward_impl(dout, x, weight, bias, order):
    with _device(x):
        dx, dw, db = conv_bwd(dout, x, weight, bias, order)
    return [dx, dw.to(weight.dtype), x.new_empty(0) if db is None else db.to(bias.dtype)]


def _conv_backward_fake(dout, x, weight, bias, order):
    return [x.new_empty(x.shape), weight.new_empty(weight.shape),
            x.new_empty(0) if bias is None else bias.new_empty(bias.shape)]


def _dwconv_impl(x, weight, bias):
    with _device(x):
        return dwconv_fwd(x, weight, bias)


def _dwconv_fake(x, weight, bias):
    return x.new_empty(x.shape)


def _dwconv_backward_impl(dout, x, weight, bias):
    with _device(x):
        dx, dw, db = dwconv_bwd(dout, x, weight, bias)
    return [dx, dw.to(weight.dtype), x.new_empty(0) if db is None else db.to(bias.dtype)]


def _dwconv_backward_fake(dout, x, weight, bias):
    return [x.new_empty(x.shape), weight.new_empty(weight.shape),
            x.new_empty(0) if bias is None else bias.new_empty(bias.shape)]


def _sum_norm_gate_impl(y, z, weight, bias, eps):
    with _device(y):
        return sum_norm_gate_fwd(y, z, weight, bias, eps)


def _sum_norm_gate_fake(y, z, weight, bias, eps):
    return z.new_empty(z.shape)


for _name, _impl, _fake in (("scan", _scan_impl, _scan_fake),
                            ("scan_backward", _scan_backward_impl, _scan_backward_fake),
                            ("conv_silu", _conv_impl, _conv_fake),
                            ("conv_silu_backward", _conv_backward_impl, _conv_backward_fake),
                            ("dwconv_silu", _dwconv_impl, _dwconv_fake),
                            ("dwconv_silu_backward", _dwconv_backward_impl, _dwconv_backward_fake),
                            ("sum_norm_gate", _sum_norm_gate_impl, _sum_norm_gate_fake)):
    # one implementation for every device: the kernels run on CUDA tensors, or on CPU ones in Triton's
    # interpreter (the tests); autograd only through the functions below
    _lib.impl(_name, _impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"diffmamba::{_name}", _fake, lib=_lib)

scan_op = torch.ops.diffmamba.scan.default
scan_backward_op = torch.ops.diffmamba.scan_backward.default
conv_op = torch.ops.diffmamba.conv_silu.default
conv_backward_op = torch.ops.diffmamba.conv_silu_backward.default
dwconv_op = torch.ops.diffmamba.dwconv_silu.default
dwconv_backward_op = torch.ops.diffmamba.dwconv_silu_backward.default
sum_norm_gate = torch.ops.diffmamba.sum_norm_gate.default  # sampling only: no autograd


def _channels_contiguous(x):
    """x, or a contiguous copy where its last axis (channels) is strided: the kernels' loads of a row of
    channels are coalesced only with unit stride."""
    return x if x.stride(-1) == 1 else x.contiguous()


class _Scan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, z, B, C, A, D, dt_bias, order, softplus, out_dtype, sum_directions):
        out, states = scan_op(u, delta, z, B, C, A, D, dt_bias, order, softplus, out_dtype,
                              sum_directions)
        ctx.softplus, ctx.sum_directions = softplus, sum_directions
        ctx.save_for_backward(u, delta, z, B, C, A, D, dt_bias, order, states)
        return out

    @staticmethod
    def backward(ctx, dout):
        u, delta, z, B, C, A, D, dt_bias, order, states = ctx.saved_tensors
        if ctx.sum_directions:  # every direction gets the sum's gradient: a view, read K times
            dout = dout.unsqueeze(2).expand(u.shape)
        # the kernel reads dout through its strides (a broadcast one too); only the channels must be
        # contiguous
        dout = _channels_contiguous(dout)
        g = scan_backward_op(dout, u, delta, z, B, C, A, D, dt_bias, order, states, ctx.softplus)
        keep = lambda i, x: None if x is None else g[i]
        return (g[0], g[1], keep(2, z), g[3], g[4], g[5], keep(6, D), keep(7, dt_bias), None, None,
                None, None)


class _Conv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, order):
        ctx.save_for_backward(x, weight, bias, order)
        return conv_op(x, weight, bias, order)

    @staticmethod
    def backward(ctx, dout):
        x, weight, bias, order = ctx.saved_tensors
        dx, dw, db = conv_backward_op(dout.contiguous(), x, weight, bias, order)
        return dx, dw, db if bias is not None else None, None


class _DWConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight, bias)
        return dwconv_op(x, weight, bias)

    @staticmethod
    def backward(ctx, dout):
        x, weight, bias = ctx.saved_tensors
        dx, dw, db = dwconv_backward_op(_channels_contiguous(dout), x, weight, bias)
        return dx, dw, db if bias is not None else None


def scan(u, delta, z, B, C, A, D, dt_bias, order, softplus=True, out_dtype=None, sum_directions=False):
    """The scan with autograd: u, delta, z (batch, L, K, dim) views, B, C (batch, L, K, N) views, A (K, dim,
    N), D, dt_bias (K, dim) fp32 or None, order (K, L) int32 or None. Returns out (batch, L, K, dim) in
    out_dtype (default u's), or its sum over K, (batch, L, dim), if sum_directions; the gradients come
    back in their inputs' dtypes."""
    if not torch.is_grad_enabled():  # sampling: the op alone, no autograd function around it
        # and the directions summed outside it: nothing is kept for a backward, and in a compiled block
        # Inductor can fold the sum of four into its reader instead of writing the fp32 sum and reading
        # it again. (LaMamba's sampling path asks for the four apart: ssm_triton.sum_norm_gate reads them.)
        out = scan_op(u, delta, z, B, C, A, D, dt_bias, order, softplus, out_dtype, False)[0]
        return out.sum(2) if sum_directions else out
    return _Scan.apply(u, delta, z, B, C, A, D, dt_bias, order, softplus, out_dtype, sum_directions)


def conv(x, weight, bias, order):
    """silu(causal depthwise conv) along the order, with autograd: x (batch, L, dim), weight (dim, W)."""
    if not torch.is_grad_enabled():
        return conv_op(x, weight, bias, order)
    return _Conv.apply(x, weight, bias, order)


def dwconv_silu(x, weight, bias=None):
    """silu(depthwise K x K conv, zero padding (K - 1) / 2, K odd) of a channels-last map, with autograd:
    x (B, H, W, D), any strides; weight (D, 1, K, K) as nn.Conv2d stores it; bias (D,) or None. Returns a
    contiguous (B, H, W, D) in x's dtype; the weights and sums stay fp32 whatever x's dtype."""
    x, weight = _channels_contiguous(x), weight.contiguous()
    if not torch.is_grad_enabled():
        return dwconv_op(x, weight, bias)
    return _DWConv.apply(x, weight, bias)


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """selective_scan's (batch, dim, L) interface on the same kernel: those tensors are (batch, L, dim) views
    with other strides, which the kernel reads in place. Grouped B, C (batch, G, N, L) become G directions."""
    if triton is None:
        raise RuntimeError("scan backend 'triton' requested but triton is not importable")
    if not u.is_cuda and not triton_interpreted():
        raise RuntimeError("the triton scan needs CUDA tensors, or TRITON_INTERPRET=1 set before importing "
                           "triton")
    if A.is_complex() or B.dim() < 3 or C.dim() < 3:
        raise NotImplementedError("the triton scan supports real A and input-dependent B, C only")
    batch, dim, L = u.shape
    G = B.shape[1] if B.dim() == 4 else 1
    if dim % G:
        raise ValueError(f"dim {dim} not divisible into {G} groups")
    lay = lambda x: None if x is None else x.reshape(batch, G, dim // G, L).permute(0, 3, 1, 2)
    bc = lambda M: (M if M.dim() == 4 else M[:, None]).permute(0, 3, 1, 2)  # (batch, L, G, N)
    par = lambda x: None if x is None else x.float().reshape(G, dim // G, *x.shape[1:]).contiguous()
    out = scan(lay(u), lay(delta), lay(z), bc(B), bc(C), par(A), par(D), par(delta_bias), None,
               bool(delta_softplus))
    return out.permute(0, 2, 3, 1).reshape(batch, dim, L)
