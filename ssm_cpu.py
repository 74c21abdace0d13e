"""
The CPU kernel of ssm.py: Mamba's selective-scan recurrence in C, compiled on first use with the machine's C
compiler and loaded with ctypes (no build step, no extra package), with its torch.library op and autograd.
ssm.py is the interface and holds the pure-PyTorch scan this replaces on CPUs; read it first.

Why a kernel: in PyTorch the recurrence is a loop over L steps of a few elementwise ops on the whole
(batch, dim, N) state (ssm.ChunkedScan). Each op is a pass over that state through the caches plus a dispatch,
so on a CPU the scan runs far below what the arithmetic needs: it was ~2/3 of a DiM-T/2 training step. Here
one loop does a step's whole update while the state of a channel, N floats, sits in one vector register.

What it computes (Gu & Dao 2023, Alg. 2, with delta already positive, i.e. after softplus):
    h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t,      out_t = (C_t . h_t + D u_t) silu(z_t)
for every (batch, channel), steps-first: u, delta, z, out (L, batch, dim); B, C (L, batch, G, N), the dim
channels split into G groups that share B and C; A (dim, N); D (dim,). D and z are optional; softplus stays in
PyTorch around it.

Backward: the forward keeps the state entering each chunk of T steps (T ~ sqrt(L)); the chunks are visited
in reverse, each one's states and decays recomputed from its border into a small scratch, and the adjoint
g_t = dL/dh_t = C_t dy_t + a_{t+1} g_{t+1} runs backwards through them. a_t h_{t-1} (for the gradients of
delta and A) is read from the recomputed states, never as h_t - delta_t u_t B_t, which cancels. Work is split
over the batch across torch's threads (ctypes releases the GIL), so dB and dC, summed over channels, need no
atomics.
"""

import ctypes
import functools
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import torch
from torch import Tensor

SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* e^x in float: x = n ln2 + r (Cody-Waite split of ln2), e^r by its Taylor series to r^7 (|r| <= ln2 / 2:
   truncation ~5e-9), times 2^n built in the exponent bits. Written out so that the compiler vectorizes the
   loops that call it (libm's expf would stay scalar). */
static inline float exp_f(float x) {
    x = __builtin_fminf(__builtin_fmaxf(x, -87.0f), 88.0f);
    float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;
    float p = 1.9841270e-4f;
    p = p * r + 1.3888889e-3f; p = p * r + 8.3333333e-3f; p = p * r + 4.1666667e-2f;
    p = p * r + 1.6666667e-1f; p = p * r + 0.5f; p = p * r + 1.0f; p = p * r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* One step of one channel's recurrence, h = exp(dt A) h + x B (x = dt u), in two variants: returning
   C . h (forward), and keeping the decays (the backward's recompute). */
static inline float step_out(float *restrict h, const float *restrict A, const float *restrict B,
                             const float *restrict C, float dt, float x) {
    for (int n = 0; n < NS; n++) h[n] = exp_f(dt * A[n]) * h[n] + x * B[n];
    float acc = 0.0f;
    #pragma omp simd reduction(+:acc)
    for (int n = 0; n < NS; n++) acc += C[n] * h[n];
    return acc;
}

static inline void step_keep(float *restrict h, const float *restrict h_prev, float *restrict a_out,
                             const float *restrict A, const float *restrict B, float dt, float x) {
    for (int n = 0; n < NS; n++) {
        float a = exp_f(dt * A[n]);
        a_out[n] = a;
        h[n] = a * h_prev[n] + x * B[n];
    }
}

/* The group of channel d: a division only when there are groups (an integer division per channel and step
   would cost as much as the step's arithmetic). */
#define GROUP(d) (G == 1 ? 0 : (d) / dg)

/* The SiLU gate of a row of channels and, for the backward, its derivative (vectorized over the row). */
static void gate_row(const float *restrict z, float *restrict gate, float *restrict dgate, int64_t dim) {
    for (int64_t d = 0; d < dim; d++) {
        float s = 1.0f / (1.0f + exp_f(-z[d]));
        gate[d] = z[d] * s;
        if (dgate) dgate[d] = s * (1.0f + z[d] * (1.0f - s));
    }
}

/* out = (scan(u, delta, A, B, C) + D u) silu(z) for batch items [b_lo, b_hi) (D, z may be NULL), and the
   state entering every chunk of T steps, borders (batch, n_chunks, dim, N), for the backward. */
int scan_fwd(const float *u, const float *delta, const float *A, const float *B, const float *C,
             const float *D, const float *z, float *out, float *borders,
             int64_t L, int64_t batch, int64_t dim, int64_t G, int64_t T, int64_t b_lo, int64_t b_hi) {
    const int64_t N = NS;
    int64_t dg = dim / G, S = dim * N, n_chunks = (L + T - 1) / T;
    float *h = malloc(sizeof(float) * S), *gate = malloc(sizeof(float) * dim);
    if (!h || !gate) {
        free(h); free(gate);
        return 1;
    }
    for (int64_t b = b_lo; b < b_hi; b++) {
        memset(h, 0, sizeof(float) * S);
        for (int64_t t = 0; t < L; t++) {
            if (t % T == 0) memcpy(borders + (b * n_chunks + t / T) * S, h, sizeof(float) * S);
            int64_t row = (t * batch + b) * dim, brow = (t * batch + b) * G * N;
            if (z) gate_row(z + row, gate, NULL, dim);
            for (int64_t d = 0; d < dim; d++) {  /* channel d reads group d / dg of B and C */
                float dt = delta[row + d];
                int64_t g = brow + GROUP(d) * N;
                float y = step_out(h + d * N, A + d * N, B + g, C + g, dt, dt * u[row + d]);
                if (D) y += D[d] * u[row + d];
                out[row + d] = z ? y * gate[d] : y;
            }
        }
    }
    free(h); free(gate);
    return 0;
}

/* Gradients for batch items [b_lo, b_hi): du, ddelta, dz (written), dB, dC (added into zeroed buffers:
   summed over the channels of a group), dA and dD (added into this call's own zeroed partials). */
int scan_bwd(const float *u, const float *delta, const float *A, const float *B, const float *C,
             const float *D, const float *z, const float *dout, const float *borders,
             float *du, float *ddelta, float *dA, float *dB, float *dC, float *dD, float *dz,
             int64_t L, int64_t batch, int64_t dim, int64_t G, int64_t T, int64_t b_lo, int64_t b_hi) {
    const int64_t N = NS;
    int64_t dg = dim / G, S = dim * N, n_chunks = (L + T - 1) / T;
    float *hs = malloc(sizeof(float) * S * T);              /* the chunk's states h_t ... */
    float *as = malloc(sizeof(float) * S * T);              /* ... and decays a_t = exp(delta_t A) */
    float *carry = malloc(sizeof(float) * S);               /* a_{t+1} g_{t+1}: what reaches h_t */
    float *gate = malloc(sizeof(float) * dim), *dgate = malloc(sizeof(float) * dim);
    if (!hs || !as || !carry || !gate || !dgate) {
        free(hs); free(as); free(carry); free(gate); free(dgate);
        return 1;
    }
    for (int64_t b = b_lo; b < b_hi; b++) {
        memset(carry, 0, sizeof(float) * S);
        for (int64_t c = n_chunks - 1; c >= 0; c--) {
            const float *border = borders + (b * n_chunks + c) * S;
            int64_t t0 = c * T, nt = L - t0 < T ? L - t0 : T;
            for (int64_t i = 0; i < nt; i++) {  /* recompute the chunk from the state entering it */
                int64_t t = t0 + i, row = (t * batch + b) * dim, brow = (t * batch + b) * G * N;
                const float *h_prev = i ? hs + (i - 1) * S : border;
                for (int64_t d = 0; d < dim; d++) {
                    float dt = delta[row + d];
                    step_keep(hs + i * S + d * N, h_prev + d * N, as + i * S + d * N, A + d * N,
                              B + brow + GROUP(d) * N, dt, dt * u[row + d]);
                }
            }
            for (int64_t i = nt - 1; i >= 0; i--) {  /* the adjoint, right to left */
                int64_t t = t0 + i, row = (t * batch + b) * dim, brow = (t * batch + b) * G * N;
                const float *h_prev = i ? hs + (i - 1) * S : border;
                if (z) gate_row(z + row, gate, dgate, dim);
                for (int64_t d = 0; d < dim; d++) {
                    int64_t g = brow + GROUP(d) * N, dn = d * N, at = i * S + dn;
                    float dt = delta[row + d], ut = u[row + d], x = dt * ut, go = dout[row + d];
                    float gy = z ? go * gate[d] : go;  /* dL/dy, y = C . h + D u before the gate */
                    float gB = 0.0f, wA = 0.0f, y = 0.0f;
                    #pragma omp simd reduction(+:gB, wA, y)
                    for (int n = 0; n < NS; n++) {
                        float gn = carry[dn + n] + C[g + n] * gy;   /* dL/dh_t */
                        float w = gn * as[at + n] * h_prev[dn + n];  /* dL/da_t times a_t */
                        dC[g + n] += gy * hs[at + n];
                        dB[g + n] += gn * x;
                        dA[dn + n] += w * dt;
                        gB += gn * B[g + n];
                        wA += w * A[dn + n];
                        y += C[g + n] * hs[at + n];
                        carry[dn + n] = gn * as[at + n];
                    }
                    du[row + d] = dt * gB + (D ? D[d] * gy : 0.0f);
                    ddelta[row + d] = ut * gB + wA;
                    if (D) {
                        dD[d] += gy * ut;
                        y += D[d] * ut;
                    }
                    if (z) dz[row + d] = go * y * dgate[d];
                }
            }
        }
    }
    free(hs); free(as); free(carry); free(gate); free(dgate);
    return 0;
}
"""

# No -ffast-math: linked into a shared library it can switch the whole process to flush-to-zero. These let the
# compiler vectorize exp_f (min/max without NaN rules, the float/int bit cast), fuse multiply-adds and sum the
# N products of C . h as a tree instead of a chain of N dependent adds.
FLAGS = ["-O3", "-fopenmp-simd", "-fno-math-errno", "-ffinite-math-only", "-fno-signed-zeros",
         "-fno-trapping-math", "-fassociative-math", "-ffp-contract=fast", "-fPIC", "-shared", "-std=c99"]
TRIES = [["-march=native", "-mprefer-vector-width=512"], ["-march=native"], []]


def _cache_dir():
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "diffusion_mamba")


def _cpu_signature():
    """What the machine code depends on besides the source: the CPU's features (-march=native)."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line for line in fh if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return platform.machine() + flags


def compiler():
    """The C compiler to build with: $CC, else cc, gcc or clang on the PATH; None if there is none."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    return shutil.which(cc) if cc else None


@functools.lru_cache(maxsize=None)
def library(N):
    """The kernel for state size N (a compile-time constant: the state loops become N-wide vector code), as
    ctypes functions; compiled once per machine into ~/.cache/diffusion_mamba. Raises RuntimeError with the
    compiler's message if no C compiler is found or it fails."""
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (install gcc, or set CC) for the CPU scan kernel")
    flags = [*FLAGS, f"-DNS={int(N)}"]
    key = hashlib.sha256((SOURCE + repr((flags, TRIES)) + _cpu_signature() + cc).encode()).hexdigest()[:16]
    path = os.path.join(_cache_dir(), f"scan_cpu_n{N}_{key}.so")
    if not os.path.exists(path):
        os.makedirs(_cache_dir(), exist_ok=True)
        with tempfile.TemporaryDirectory(dir=_cache_dir()) as tmp:
            src, out = os.path.join(tmp, "scan_cpu.c"), os.path.join(tmp, "scan_cpu.so")
            with open(src, "w") as fh:
                fh.write(SOURCE)
            for extra in TRIES:
                run = subprocess.run([cc, *flags, *extra, src, "-o", out], capture_output=True, text=True)
                if run.returncode == 0:
                    break
            else:
                raise RuntimeError(f"compiling the CPU scan kernel with {cc} failed:\n{run.stderr[-2000:]}")
            os.replace(out, path)  # atomic: a concurrent process sees the old state or the whole file
    lib = ctypes.CDLL(path)
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.scan_fwd.argtypes = [ptr] * 9 + [i64] * 7
    lib.scan_bwd.argtypes = [ptr] * 16 + [i64] * 7
    lib.scan_fwd.restype = lib.scan_bwd.restype = ctypes.c_int
    return lib


@functools.lru_cache(maxsize=None)
def _pool(workers):
    return ThreadPoolExecutor(workers, thread_name_prefix="scan_cpu")


def _workers(batch):
    """How many slices the batch is split into: one per torch thread."""
    return max(1, min(torch.get_num_threads(), batch))


def _over_batch(fn, batch):
    """Run fn(b_lo, b_hi, slice index) on the _workers(batch) slices of the batch."""
    workers = _workers(batch)
    cuts = [batch * i // workers for i in range(workers + 1)]
    if workers == 1:
        codes = [fn(0, batch, 0)]
    else:
        codes = list(_pool(workers).map(fn, cuts[:-1], cuts[1:], range(workers)))
    if any(codes):
        raise MemoryError("the CPU scan kernel could not allocate its scratch memory")


def _checked(u, delta, A, B, C, D=None, z=None):
    L, batch, dim = u.shape
    G, N = B.shape[2:]
    for name, x, shape in (("u", u, (L, batch, dim)), ("delta", delta, (L, batch, dim)), ("A", A, (dim, N)),
                           ("B", B, (L, batch, G, N)), ("C", C, (L, batch, G, N)), ("D", D, (dim,)),
                           ("z", z, (L, batch, dim))):
        if x is None:
            continue
        if x.dtype != torch.float32 or x.device.type != "cpu" or not x.is_contiguous() or x.shape != shape:
            raise ValueError(f"scan_cpu: {name} must be a contiguous float32 CPU tensor of shape {shape}, "
                             f"got {x.dtype} {x.device} {tuple(x.shape)} contiguous={x.is_contiguous()}")
    if dim % G:
        raise ValueError(f"scan_cpu: dim {dim} not divisible into {G} groups")
    return L, batch, dim, G, N


def chunk_length(L, dim, N):
    """Steps per chunk (the forward keeps the state entering each, the backward recomputes one at a time):
    ~sqrt(L) balances the saved borders (L / T states) against the chunk's scratch (2 T states), capped so
    the scratch stays near 512 KiB (L2)."""
    return max(1, min(round(math.sqrt(L)), (1 << 16) // max(1, dim * N)))


def _ptr(x):
    return None if x is None else x.data_ptr()


@torch.library.custom_op("diffmamba::scan_cpu", mutates_args=())
def scan_op(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
            z: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """out = (y + D u) silu(z) (D, z optional), y of the recurrence; u, delta, z (L, batch, dim), B, C
    (L, batch, G, N), A (dim, N), D (dim,): contiguous float32, delta > 0 (softplus applied). Returns out
    (L, batch, dim) and the states entering each chunk of chunk_length steps (batch, chunks, dim, N)."""
    L, batch, dim, G, N = _checked(u, delta, A, B, C, D, z)
    T = chunk_length(L, dim, N)
    out, borders = torch.empty_like(u), u.new_empty(batch, (L + T - 1) // T, dim, N)
    p = _ptr
    _over_batch(lambda lo, hi, _: library(N).scan_fwd(p(u), p(delta), p(A), p(B), p(C), p(D), p(z), p(out),
                                                      p(borders), L, batch, dim, G, T, lo, hi), batch)
    return out, borders


@scan_op.register_fake
def _(u, delta, A, B, C, D, z):
    L, batch, dim = u.shape
    T = chunk_length(L, dim, A.shape[1])
    return torch.empty_like(u), u.new_empty(batch, (L + T - 1) // T, dim, A.shape[1])


@torch.library.custom_op("diffmamba::scan_cpu_backward", mutates_args=())
def scan_backward_op(dout: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                     D: Optional[Tensor], z: Optional[Tensor], borders: Tensor) -> list[Tensor]:
    """Gradients for u, delta, A, B, C, D, z (empty tensors for a D or z that is None)."""
    L, batch, dim, G, N = _checked(u, delta, A, B, C, D, z)
    dout = dout.contiguous()
    du, ddelta = torch.empty_like(u), torch.empty_like(u)
    dz = torch.empty_like(u) if z is not None else u.new_empty(0)
    dB, dC = torch.zeros_like(B), torch.zeros_like(C)
    slices = _workers(batch)  # dA and dD: one partial per slice of the batch
    dA, dD = A.new_zeros(slices, dim, N), A.new_zeros(slices, dim)
    p = _ptr
    _over_batch(lambda lo, hi, w: library(N).scan_bwd(
        p(u), p(delta), p(A), p(B), p(C), p(D), p(z), p(dout), p(borders), p(du), p(ddelta), p(dA[w]),
        p(dB), p(dC), p(dD[w]), p(dz) if z is not None else None, L, batch, dim, G,
        chunk_length(L, dim, N), lo, hi), batch)
    return [du, ddelta, dA.sum(0), dB, dC, dD.sum(0) if D is not None else u.new_empty(0), dz]


@scan_backward_op.register_fake
def _(dout, u, delta, A, B, C, D, z, borders):
    like = lambda x: u.new_empty(0) if x is None else torch.empty_like(x)
    return [torch.empty_like(u), torch.empty_like(u), torch.empty_like(A), torch.empty_like(B),
            torch.empty_like(C), like(D), like(z)]


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs, output[1])


def _grad(ctx, dout, _dborders):
    u, delta, A, B, C, D, z, borders = ctx.saved_tensors
    g = scan_backward_op(dout, u, delta, A, B, C, D, z, borders)
    return (*g[:5], g[5] if D is not None else None, g[6] if z is not None else None)


scan_op.register_autograd(_grad, setup_context=_setup)
