"""
Speed, memory and accuracy of the selective scan backends of ssm.py (ssm.SCANS): the Triton kernels
(ssm_triton.py), mamba-ssm's CUDA kernel (the optional reference) and the chunked pure-PyTorch scan;
and parity of ssm.Mamba with mamba-ssm's module.

    python -m tools.scan_bench            # GPU: accuracy, the models' shapes, then lengths at (8, 1536)
    python -m tools.scan_bench --sweep    # GPU: also time launch configurations of the Triton kernels
    python -m tools.scan_bench --smoke    # tiny shapes; on a CPU the Triton kernels run interpreted

1. Accuracy: every backend against an fp64 run of the sequential reference (outputs and all
   gradients); the Mamba mixer with each backend against the cuda one (fp32 and bf16 autocast);
   mamba_ssm.modules.mamba_simple.Mamba's state dict loaded strictly into ssm.Mamba.
2. --sweep: launch configurations of the token-layout kernels at the models' shapes (below).
3. The models' shapes (DiM-L/2 at 1024 and 2048 px, DiM-S/2 at 32 px, scan.md's B8 D1536 L4096):
   the whole job as the models run it. Ours: ssm.mamba_scan on the (b, L, dim) views that the linear
   layers produce, in DiM's column order. mamba-ssm: gather into scan order, (b, dim, L) and (b, N, L)
   contiguous copies, its kernel, transpose and scatter back; and its kernel alone. With the fraction
   of the exponential-bound floor (one exp per state update forward, three forward + backward). Then the
   causal conv + SiLU at the same shapes: its kernels' time and bandwidth, and cuDNN's conv1d for scale.
4. Speed and memory of every backend across lengths in selective_scan's (b, dim, L) layout.

Timing: median of CUDA-event timings after warm-up, with the L2 cache flushed before every
repetition. "fwd+bwd" is one forward and torch.autograd.grad for all inputs. "extra GB" is the peak
allocation above what was allocated before the call (inputs), i.e. outputs, saved states, gradients
and workspace. Errors are relative: max|a - b| / max|b| against an fp64 run of the sequential
reference on the same inputs. Prints markdown tables; writes scan_bench.json into $OUT when that
variable is set.
"""

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

p = argparse.ArgumentParser()
p.add_argument("--smoke", action="store_true",
               help="tiny shapes, to check the script itself (runs on a CPU)")
p.add_argument("--sweep", action="store_true",
               help="time launch configurations of the Triton kernels")
p.add_argument("--lengths", default="256,1024,4096,16384")
p.add_argument("--no-torch", action="store_true", help="skip the pure-PyTorch rows")
p.add_argument("--no-accuracy", action="store_true")
p.add_argument("--fwd-config", default=None,
               help="JSON overriding ssm_triton.TRITON_CONFIG['fwd'][2] (and the unsegmented choice)")
p.add_argument("--bwd-config", default=None,
               help="JSON overriding ssm_triton.TRITON_CONFIG['bwd'][2]")
args = p.parse_args()

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (by ssm_triton)
import ssm  # noqa: E402
import ssm_triton  # noqa: E402

dev = "cuda" if torch.cuda.is_available() else "cpu"
if dev == "cpu" and not args.smoke:
    sys.exit("no GPU: run with --smoke")
has_cuda = dev == "cuda" and ssm.SCANS["cuda"] is not None
has_triton = ssm_triton.triton is not None
torch.backends.cuda.matmul.allow_tf32 = False
if args.fwd_config:
    ssm_triton.TRITON_CONFIG["fwd"][2].update(json.loads(args.fwd_config))
    ssm_triton.FWD_UNSEGMENTED = ()  # every forward with this configuration
if args.bwd_config:
    ssm_triton.TRITON_CONFIG["bwd"][2].update(json.loads(args.bwd_config))

results = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
           "torch": torch.__version__,
           "triton": getattr(ssm_triton.triton, "__version__", None), "has_cuda_scan": has_cuda,
           "triton_config": ssm_triton.TRITON_CONFIG}
try:
    import mamba_ssm
    results["mamba_ssm"] = mamba_ssm.__version__
except Exception:
    results["mamba_ssm"] = None
print(f"device {results['device']}, torch {torch.__version__}, triton {results['triton']}, "
      f"mamba-ssm {results['mamba_ssm']} (kernel usable: {has_cuda})")
print(f"triton config: {json.dumps(ssm_triton.TRITON_CONFIG)}")

IMPLS = {name: (lambda name: lambda **kw: ssm.selective_scan(**kw, backend=name))(name)
         for name in ssm.SCANS}
available = [k for k, ok in (("cuda", has_cuda), ("triton", has_triton),
                             ("torch", not args.no_torch)) if ok]


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def scan_inputs(b, dim, L, N, dtype, seed=0, G=None, big_delta=False, with_z=True, with_D=True):
    """Inputs as in a Mamba block: dt bias from Mamba's init, S4D-real A; u/delta/B/C/z in dtype,
    rest fp32."""
    g = torch.Generator(device=dev).manual_seed(seed)
    rn = lambda *s: torch.randn(*s, device=dev, generator=g)
    dt0 = torch.exp(torch.empty(dim, device=dev).uniform_(math.log(1e-3), math.log(0.1),
                                                          generator=g))
    bc = (b, N, L) if G is None else (b, G, N, L)
    delta = 5 + 15 * torch.rand(b, dim, L, device=dev,
                                generator=g) if big_delta else 0.5 * rn(b, dim, L)
    x = dict(u=rn(b, dim, L), delta=delta, A=-torch.arange(1, N + 1, device=dev,
                                                           dtype=torch.float32).repeat(dim, 1),
             B=rn(*bc), C=rn(*bc), D=rn(dim) if with_D else None,
             z=rn(b, dim, L) if with_z else None, delta_bias=dt0 + torch.log(-torch.expm1(-dt0)))
    return {k: (v.to(dtype) if k in ("u", "delta", "B", "C", "z") and v is not None else v) for k,
            v in x.items()}


def leaves_of(inputs, dtype=None, grad=True):
    return {k: (v.detach().to(dtype or v.dtype).clone().requires_grad_(grad) if v is not None
                else None)
            for k, v in inputs.items()}


def fwd_bwd(impl, inputs, dtype=None):
    leaves = leaves_of(inputs, dtype)
    y = IMPLS[impl](**leaves, delta_softplus=True)
    dy = torch.randn(y.shape, device=dev,
                     generator=torch.Generator(device=dev).manual_seed(1)).to(y.dtype)
    names = [k for k, v in leaves.items() if v is not None]
    grads = torch.autograd.grad(y, [leaves[k] for k in names], dy)
    return y.detach(), dict(zip(names, grads))


_flush = torch.empty(256 * 2 ** 20 if dev == "cuda" else 1, dtype=torch.int8, device=dev)


def time_ms(fn, budget_ms=300.0, max_reps=50):
    """Median ms of fn() over repetitions, L2 flushed before each, after warm-up (first call =
    compile)."""
    fn()
    if dev == "cpu":
        t0 = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t0)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    est = 1e3 * (time.perf_counter() - t0)
    reps = int(max(3, min(max_reps, budget_ms / max(est, 1e-3))))
    times = []
    for _ in range(reps):
        _flush.zero_()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def extra_gb(fn):
    """Peak allocation during fn() above what was allocated before it, in GB."""
    if dev == "cpu":
        return float("nan")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out
    return (peak - base) / 1e9


def fmt(x, spec=".3f"):
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


# -----------------------------------------------------------------------------
# 1. accuracy against the fp64 sequential reference
# -----------------------------------------------------------------------------

if not args.no_accuracy:
    base = (1, 8, 45, 4) if args.smoke else (2, 256, 1024, 16)
    b_, d_, L_, N_ = base
    cases = [
        ("fp32, z, D, softplus", dict(dtype=torch.float32)),
        ("fp32, large delta (dt 5-20)", dict(dtype=torch.float32, big_delta=True)),
        (f"fp32, grouped B/C G=4, no z/D, L {L_ - 24}",
         dict(dtype=torch.float32, G=4, with_z=False, with_D=False,
                                                             L=L_ - 24)),
        ("bf16, z, D, softplus", dict(dtype=torch.bfloat16)),
        ("bf16, large delta", dict(dtype=torch.bfloat16, big_delta=True)),
    ]
    impls = [k for k in available if k != "torch"] + (["torch"] if "torch" in available else [])
    print(f"\n## Accuracy vs fp64 sequential reference, (batch, dim, L, N) = {base}; relative max error\n")
    print("| case | impl | out | u | delta | A | B | C | D | z | delta_bias |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    results["accuracy"] = []
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
    for label, c in cases:
        c = dict(c)
        dtype, L = c.pop("dtype"), c.pop("L", L_)
        inputs = scan_inputs(b_, d_, L, N_, dtype, **c)
        y_ref, g_ref = fwd_bwd("ref", inputs, torch.float64)
        for impl in impls:
            try:
                y, g = fwd_bwd(impl, inputs)
            except Exception as e:  # e.g. an implementation that does not support a case
                print(f"| {label} | {impl} | failed: {type(e).__name__}: {str(e)[:80]} |")
                continue
            row = {"case": label, "impl": impl, "out": rel(y, y_ref),
                   **{k: rel(g[k], g_ref[k]) for k in g}}
            results["accuracy"].append(row)
            print(f"| {label} | {impl} | " + " | ".join(fmt(row.get(k),
                                                            ".1e") for k in ["out"] + names) + " |")

    # the Mamba mixer end to end: every other backend against the cuda backend, same weights
    if has_cuda:
        d_model, Bsz, Lm = 512, 4, 1024
        others = [k for k in available if k != "cuda"]
        print(f"\n## Mamba mixer d_model {d_model}, B {Bsz}, L {Lm}: each backend vs the cuda backend (rel. error)\n")
        print("| backend | precision | out | worst param grad (name) |")
        print("|---|---|---|---|")
        results["mixer"] = []
        torch.manual_seed(0)
        m = ssm.Mamba(d_model).to(dev)
        xm = torch.randn(Bsz, Lm, d_model, device=dev)
        for amp in (False, True):
            outs, grads = {}, {}
            for backend in ["cuda", *others]:
                m.backend = backend
                m.zero_grad(set_to_none=True)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                    ym = m(xm)
                ym.float().square().mean().backward()
                outs[backend], grads[backend] = ym.detach(), {k: q.grad.clone() for k, q in m.named_parameters()}
            for backend in others:
                errs = {k: rel(grads[backend][k], grads["cuda"][k]) for k in grads["cuda"]}
                worst = max(errs, key=errs.get)
                row = {"backend": backend, "precision": "bf16 autocast" if amp else "fp32",
                       "out": rel(outs[backend], outs["cuda"]), **errs}
                results["mixer"].append(row)
                print(f"| {backend} | {row['precision']} | {row['out']:.1e} | {errs[worst]:.1e} "
                      f"({worst}) |")

        # mamba_ssm's own module: its state dict loads strictly into ours (slow path: no
        # causal-conv1d)
        from mamba_ssm.modules.mamba_simple import Mamba as RefMamba
        print("\n| mamba_ssm.Mamba -> ssm.Mamba (strict load) | keys in same order | d_conv | "
              + " | ".join(f"ours {b} vs theirs" for b in available) + " |")
        print("|---|---|---|" + "---|" * len(available))
        results["mamba_ssm_module"] = []
        for d_conv in (4, 3):
            torch.manual_seed(1)
            theirs = RefMamba(d_model, d_conv=d_conv, use_fast_path=False).to(dev)
            ours = ssm.Mamba(d_model, d_conv=d_conv).to(dev)
            ours.load_state_dict(theirs.state_dict(), strict=True)
            row = {"d_conv": d_conv,
                   "same_key_order": list(ours.state_dict()) == list(theirs.state_dict())}
            with torch.no_grad():
                y_theirs = theirs(xm)
                for backend in available:
                    ours.backend = backend
                    row[backend] = rel(ours(xm), y_theirs)
            results["mamba_ssm_module"].append(row)
            print(f"| ok | {row['same_key_order']} | {d_conv} | "
                  + " | ".join(f"{row[b]:.1e}" for b in available) + " |")

# -----------------------------------------------------------------------------
# 2. launch-configuration sweep of the Triton kernels (token layout, the models' shapes)
# -----------------------------------------------------------------------------

def token_inputs(b, dim, L, N=16, dtype=torch.bfloat16, seed=0):
    """A Mamba block's scan inputs as the linear layers leave them: x and z halves of in_proj's
    (b, L, 2 dim) output, dt from dt_proj, B and C views of x_proj's output; DiM's column order."""
    g = torch.Generator(device=dev).manual_seed(seed)
    rn = lambda *s: torch.randn(*s, device=dev, generator=g)
    R = math.ceil(dim / 32)
    xz, xdbl = rn(b, L, 2 * dim).to(dtype), rn(b, L, R + 2 * N).to(dtype)
    dt0 = torch.exp(torch.empty(dim, device=dev).uniform_(math.log(1e-3), math.log(0.1), generator=g))
    side = math.isqrt(L)
    order = torch.arange(L, device=dev)
    if side * side == L:
        order = order.view(side, side).t().reshape(-1)
    return dict(u=xz[..., :dim], delta=(0.5 * rn(b, L, dim)).to(dtype), z=xz[..., dim:],
                B=xdbl[..., R:R + N], C=xdbl[..., R + N:],
                A=-torch.arange(1, N + 1, device=dev, dtype=torch.float32).repeat(dim, 1),
                D=rn(dim), dt_bias=dt0 + torch.log(-torch.expm1(-dt0)), order=order)


def ours_job(x, grad):
    """Our path: one kernel reads the token layout in the scan order; returns a callable."""
    leaves = {k: (v.detach().requires_grad_(grad) if v.is_floating_point() else v) for k, v in x.items()}
    kw = dict(D=leaves["D"], z=leaves["z"], dt_bias=leaves["dt_bias"], order=leaves["order"])
    if not grad:
        return lambda: ssm.mamba_scan(leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"],
                                      **kw, backend="triton")
    names = ["u", "delta", "z", "B", "C", "A", "D", "dt_bias"]
    dy = torch.randn_like(x["u"])
    return lambda: torch.autograd.grad(
        ssm.mamba_scan(leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"], **kw,
                       backend="triton"), [leaves[k] for k in names], dy)


def mamba_ssm_job(x, grad, kernel_only=False):
    """mamba-ssm's path as the models used it: gather the tokens into scan order, make (b, dim, L) and
    (b, N, L) contiguous copies, its kernel, transpose back and scatter (kernel_only: inputs already
    contiguous (b, dim, L), the kernel alone)."""
    fn = ssm.SCANS["cuda"]
    order, inverse = x["order"], torch.argsort(x["order"])
    prep = lambda t: t[:, order].transpose(1, 2).contiguous()
    if kernel_only:
        x = {k: (prep(v) if k in ("u", "delta", "z", "B", "C") else v) for k, v in x.items()}
    leaves = {k: (v.detach().requires_grad_(grad) if v.is_floating_point() else v) for k, v in x.items()}

    def job():
        lay = (lambda t: t) if kernel_only else prep
        y = fn(lay(leaves["u"]), lay(leaves["delta"]), leaves["A"], lay(leaves["B"]), lay(leaves["C"]),
               leaves["D"], lay(leaves["z"]), leaves["dt_bias"], True)
        return y if kernel_only else y.transpose(1, 2)[:, inverse]

    if not grad:
        return job
    names = ["u", "delta", "z", "B", "C", "A", "D", "dt_bias"]
    dy = torch.randn_like(job())
    return lambda: torch.autograd.grad(job(), [leaves[k] for k in names], dy)


# the models' shapes (sections 2 and 3): (label, batch, channels, L)
SHAPES = [("DiM-L/2, 1024 px", 2, 2048, 4489), ("DiM-L/2, 2048 px", 1, 2048, 16900),
          ("DiM-S/2, 32 px", 128, 1024, 361), ("scan.md main", 8, 1536, 4096)]
if args.smoke:
    SHAPES = [("smoke", 1, 16, 36)]
# (BD channels, T steps, warps) tried per kernel; then chunk and segment target around the best
# (and a fourth number: a cap on registers per thread, ptxas' maxnreg, trading spills for resident warps)
SWEEP = {"fwd": [(32, 4, 1), (32, 4, 1, 128), (16, 4, 1), (16, 4, 1, 128), (16, 4, 1, 96), (32, 2, 1),
                 (16, 8, 1), (16, 8, 1, 128)],
         "bwd": [(16, 4, 1), (16, 4, 1, 168), (16, 4, 1, 128), (16, 2, 1), (16, 2, 1, 128), (8, 4, 1),
                 (8, 4, 1, 128), (8, 8, 1), (32, 2, 1), (16, 4, 2)]}
# the forward without segments (segment target 1) at each channel block ssm_triton.FWD_UNSEGMENTED picks
# from, and narrower ones. (Not the backward: its dB/dC sums over a block's channels would become
# BD-times more atomics; segments stay ahead there, docs/speed_history.md, session 21.)
SWEEP_UNSEGMENTED = [(32, 4, 1), (16, 16, 1), (16, 8, 1), (8, 16, 1), (8, 8, 1), (4, 16, 1),
                     (4, 32, 1)]


def sweep_one(x, which, cfg, chunk, target):
    """ms of one kernel (scan_fwd or scan_bwd launched directly) under one launch configuration."""
    default = (copy.deepcopy(ssm_triton.TRITON_CONFIG), ssm_triton.CHUNK, ssm_triton.SEGMENT_TARGET,
               ssm_triton.FWD_UNSEGMENTED)
    ssm_triton.TRITON_CONFIG[which][2] = dict(BD=cfg[0], T=cfg[1], num_warps=cfg[2],
                                              maxnreg=cfg[3] if len(cfg) > 3 else None)
    ssm_triton.CHUNK, ssm_triton.SEGMENT_TARGET = chunk, target
    ssm_triton.FWD_UNSEGMENTED = ()  # this configuration, not the forward's own choice
    try:
        u4 = {k: (v.unsqueeze(2) if v.dim() == 3 else v[None]) for k, v in x.items() if k != "order"}
        fargs = (u4["u"], u4["delta"], u4["z"], u4["B"], u4["C"], u4["A"], u4["D"], u4["dt_bias"],
                 x["order"].int()[None].contiguous())
        if which == "fwd":
            return time_ms(lambda: ssm_triton.scan_fwd(*fargs), budget_ms=150)
        _, states, ch = ssm_triton.scan_fwd(*fargs)
        dout = torch.randn_like(u4["u"])
        return time_ms(lambda: ssm_triton.scan_bwd(dout, *fargs, states, ch), budget_ms=150)
    finally:
        ssm_triton.TRITON_CONFIG = default[0]
        ssm_triton.CHUNK, ssm_triton.SEGMENT_TARGET, ssm_triton.FWD_UNSEGMENTED = default[1:]


if args.sweep and has_triton:
    print("\n## Triton launch sweep at the models' shapes, token layout, bf16\n")
    print("| shape (b, dim, L) | kernel | config (BD, T, warps[, maxnreg]) | chunk | segment target | ms |")
    print("|---|---|---|---|---|---|")
    results["sweep"] = []
    for label, b_, d_, L_ in SHAPES:
        x = token_inputs(b_, d_, L_)
        for which, space in SWEEP.items():
            def run(cfg, chunk=ssm_triton.CHUNK, target=ssm_triton.SEGMENT_TARGET):
                row = dict(shape=label, kernel=which, config=list(cfg), chunk=chunk, target=target)
                try:
                    row["ms"] = sweep_one(x, which, cfg, chunk, target)
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {str(e)[:80]}"
                results["sweep"].append(row)
                print(f"| {label} ({b_}, {d_}, {L_}) | {which} | {tuple(cfg)} | {chunk} | {target} | "
                      f"{fmt(row.get('ms'))} {row.get('error', '')}|")
                return row.get("ms", math.inf)

            best = min(space, key=run)
            for chunk, target in ((32, None), (128, None), (None, 16), (None, 32)):
                run(best, chunk or ssm_triton.CHUNK, target or ssm_triton.SEGMENT_TARGET)
            for cfg in SWEEP_UNSEGMENTED if which == "fwd" else []:
                run(cfg, target=1)
        del x

# -----------------------------------------------------------------------------
# 3. the models' shapes: the whole job against mamba-ssm's
# -----------------------------------------------------------------------------

# the exponential-bound floor (one MUFU ex2 per state update forward, at least two backward): 16 ex2 per
# clock per SM at the boost clock (Hopper: 1.98 GHz)
ex2_per_s = 16 * 1.98e9 * (torch.cuda.get_device_properties(0).multi_processor_count if dev == "cuda" else 1)
results["shapes"] = []
if has_triton:
    print(f"\n## The models' shapes: scan of bf16 token-layout inputs in DiM's column order ({results['device']})\n")
    print("ours: one kernel reading the (b, L, dim) views in scan order. mamba-ssm job: gather into scan order, "
          "contiguous (b, dim, L) copies, its kernel, transpose back, scatter (how the models ran it); "
          "kernel: its kernel alone on ready (b, dim, L) inputs. floor: one exp per state update forward, "
          "three forward+backward.\n")
    print("| shape (b, dim, L) | ours fwd / fwd+bwd ms | mamba-ssm job | mamba-ssm kernel | ours / job | "
          "ours / kernel | extra GB ours / job (fwd+bwd) | floor reached fwd / fwd+bwd |")
    print("|---|---|---|---|---|---|---|---|")
    for label, b, d, L in SHAPES:
        x = token_inputs(b, d, L)
        row = dict(shape=label, b=b, dim=d, L=L)
        try:
            row["ours_fwd"] = time_ms(ours_job(x, False))
            row["ours_fb"] = time_ms(ours_job(x, True))
            row["ours_gb"] = extra_gb(ours_job(x, True))
            if has_cuda:
                for key, kernel_only in (("job", False), ("kernel", True)):
                    row[f"{key}_fwd"] = time_ms(mamba_ssm_job(x, False, kernel_only))
                    row[f"{key}_fb"] = time_ms(mamba_ssm_job(x, True, kernel_only))
                row["job_gb"] = extra_gb(mamba_ssm_job(x, True))
        except torch.OutOfMemoryError:
            row["note"] = "out of memory"
        floor = b * d * L * 16 / ex2_per_s * 1e3
        row["floor_fwd"], row["floor_fb"] = floor, 3 * floor
        ratio = lambda a, c: (row[a] / row[c]) if a in row and c in row else None
        results["shapes"].append(row)
        print(f"| {label} ({b}, {d}, {L}) | {fmt(row.get('ours_fwd'))} / {fmt(row.get('ours_fb'))} "
              f"| {fmt(row.get('job_fwd'))} / {fmt(row.get('job_fb'))} "
              f"| {fmt(row.get('kernel_fwd'))} / {fmt(row.get('kernel_fb'))} "
              f"| {fmt(ratio('ours_fwd', 'job_fwd'), '.2f')}x / {fmt(ratio('ours_fb', 'job_fb'), '.2f')}x "
              f"| {fmt(ratio('ours_fwd', 'kernel_fwd'), '.2f')}x / {fmt(ratio('ours_fb', 'kernel_fb'), '.2f')}x "
              f"| {fmt(row.get('ours_gb'), '.2f')} / {fmt(row.get('job_gb'), '.2f')} "
              f"| {fmt(ratio('floor_fwd', 'ours_fwd'), '.0%')} / {fmt(ratio('floor_fb', 'ours_fb'), '.0%')} |")
        torch.cuda.empty_cache() if dev == "cuda" else None

# the causal conv + SiLU at the same shapes (its own kernels, ssm_triton.conv), against cuDNN's
# depthwise conv1d + SiLU on ready (b, dim, L) inputs; GB/s counts the bytes a pass must move at
# least (forward: x in, out; backward: x and dout in, dx out)
results["conv"] = []
if has_triton:
    print(f"\n## The causal conv + SiLU (width 4) at the models' shapes, bf16, DiM's column order "
          f"({results['device']})\n")
    print("| shape (b, dim, L) | ours fwd / fwd+bwd ms | ours GB/s fwd / bwd "
          "| cuDNN conv1d + SiLU fwd / fwd+bwd ms |")
    print("|---|---|---|---|")
    for label, b, d, L in SHAPES:
        x = token_inputs(b, d, L)
        g = torch.Generator(device=dev).manual_seed(1)
        w = (0.3 * torch.randn(d, 4, device=dev, generator=g)).requires_grad_()
        bias = torch.randn(d, device=dev, generator=g).requires_grad_()
        u = x["u"].detach().requires_grad_()
        order = x["order"].int()
        dy = torch.randn_like(x["u"])
        ref_in = x["u"].transpose(1, 2).contiguous().requires_grad_()
        ref_w = w.detach().to(torch.bfloat16)[:, None].requires_grad_()
        ref_b = bias.detach().to(torch.bfloat16).requires_grad_()

        def ref():
            return F.silu(F.conv1d(ref_in, ref_w, ref_b, padding=3, groups=d)[..., :L])

        row = dict(shape=label, b=b, dim=d, L=L)
        row["fwd"] = time_ms(lambda: ssm_triton.conv(u, w, bias, order))
        row["fb"] = time_ms(lambda: torch.autograd.grad(ssm_triton.conv(u, w, bias, order),
                                                        [u, w, bias], dy))
        row["cudnn_fwd"] = time_ms(ref)
        row["cudnn_fb"] = time_ms(lambda: torch.autograd.grad(ref(), [ref_in, ref_w, ref_b],
                                                              dy.transpose(1, 2)))
        unit = b * L * d * 2 / 1e9  # GB of one bf16 (b, L, dim) tensor
        row["gbps_fwd"] = 2 * unit / row["fwd"] * 1e3
        row["gbps_bwd"] = 3 * unit / max(row["fb"] - row["fwd"], 1e-6) * 1e3
        results["conv"].append(row)
        print(f"| {label} ({b}, {d}, {L}) | {fmt(row['fwd'])} / {fmt(row['fb'])} "
              f"| {fmt(row['gbps_fwd'], '.0f')} / {fmt(row['gbps_bwd'], '.0f')} "
              f"| {fmt(row['cudnn_fwd'])} / {fmt(row['cudnn_fb'])} |")
        del x, ref_in
        torch.cuda.empty_cache() if dev == "cuda" else None

# -----------------------------------------------------------------------------
# 4. speed and memory across lengths, (b, dim, L) layout
# -----------------------------------------------------------------------------

lengths = [32] if args.smoke else [int(v) for v in args.lengths.split(",")]
b_, d_, N_ = (1, 16, 4) if args.smoke else (8, 1536, 16)
results["bench"] = []
rows = []
for L in lengths:
    inputs = scan_inputs(b_, d_, L, N_, torch.bfloat16)
    plain = leaves_of(inputs, grad=False)
    dy = torch.randn(b_, d_, L, device=dev).to(torch.bfloat16)
    for impl in available:
        f = IMPLS[impl]
        row = dict(impl=impl, shape=f"B{b_} D{d_} L{L} N{N_}", L=L)
        # pure PyTorch: (B, D, L, N) fp32 intermediates, ~27 GB for fwd+bwd at L 4096 (OOM beyond)
        big = impl == "torch" and b_ * d_ * L * N_ > 8 * 1536 * 4096 * 16
        try:
            with torch.no_grad():
                row["fwd_ms"] = time_ms(lambda: f(**plain, delta_softplus=True))
                row["fwd_gb"] = extra_gb(lambda: f(**plain, delta_softplus=True))
            if not big:
                leaves = leaves_of(inputs)
                names = [k for k, v in leaves.items() if v is not None]

                def step():
                    return torch.autograd.grad(f(**leaves, delta_softplus=True),
                                               [leaves[k] for k in names], dy)

                row["fb_ms"] = time_ms(step)
                row["fb_gb"] = extra_gb(step)
        except torch.OutOfMemoryError:
            row["note"] = "out of memory"
        torch.cuda.empty_cache() if dev == "cuda" else None
        rows.append(row)
        results["bench"].append(row)

print(f"\n## Speed and memory, bf16 u/delta/z/B/C, fp32 A/D/bias, softplus, with z ({results['device']})\n")
print("| impl | shape | fwd ms | fwd+bwd ms | extra GB fwd / fwd+bwd | vs CUDA fwd / fwd+bwd |")
print("|---|---|---|---|---|---|")
for row in rows:
    c = next((r for r in rows if r["impl"] == "cuda" and r["L"] == row["L"]), None)
    ratio = lambda k: (row[k] / c[k]) if c and k in row and k in c else None
    row["ratio_fwd"], row["ratio_fb"] = ratio("fwd_ms"), ratio("fb_ms")
    gb = f"{fmt(row.get('fwd_gb'), '.2f')} / {fmt(row.get('fb_gb'), '.2f')}"
    note = f" ({row['note']})" if "note" in row else ""
    print(f"| {row['impl']} | {row['shape']} | {fmt(row.get('fwd_ms'))} | "
          f"{fmt(row.get('fb_ms'))}{note} | {gb} | "
          f"{fmt(row['ratio_fwd'], '.2f')}x / {fmt(row['ratio_fb'], '.2f')}x |")

if os.environ.get("OUT"):
    with open(os.path.join(os.environ["OUT"], "scan_bench.json"), "w") as fh:
        json.dump(results, fh, indent=1, default=str)
