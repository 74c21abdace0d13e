"""
GPU parity and speed check of ssm.py against mamba-ssm's CUDA selective scan.

    python ssm_parity.py            # on a GPU machine with mamba-ssm installed
    python ssm_parity.py --smoke    # tiny shapes, runs anywhere (CUDA parts skipped when unavailable)

Prints markdown tables; writes ssm_parity.json into $OUT when that variable is set.
Errors are relative: max|a - b| / max|b|, against an fp64 run of the sequential reference (raw scan), or against
the CUDA backend (mixer).
"""

import argparse
import json
import math
import os
import statistics

import torch

import ssm

p = argparse.ArgumentParser()
p.add_argument("--smoke", action="store_true", help="tiny shapes, for checking the script itself")
args = p.parse_args()

dev = "cuda" if torch.cuda.is_available() else "cpu"
has_cuda_scan = dev == "cuda" and ssm._cuda_scan_fn is not None
backends = ["cuda", "torch"] if has_cuda_scan else ["torch"]
torch.backends.cuda.matmul.allow_tf32 = False  # fp32 comparisons should be fp32
torch.backends.cudnn.allow_tf32 = False
results = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "torch": torch.__version__,
           "has_cuda_scan": has_cuda_scan, "auto_backend_on_device": ssm.scan_backend(torch.zeros(1, device=dev))}
print(f"device {results['device']}, torch {torch.__version__}, mamba-ssm kernel: {has_cuda_scan}, "
      f"auto backend: {results['auto_backend_on_device']}")


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def scan_inputs(b, dim, L, N, dtype, seed=0):
    """Realistic scan inputs: dt bias as Mamba's init, S4D-real A, u/delta/B/C/z in `dtype`, rest fp32."""
    g = torch.Generator(device=dev).manual_seed(seed)
    rn = lambda *s: torch.randn(*s, device=dev, generator=g)
    dt0 = torch.exp(torch.empty(dim, device=dev).uniform_(math.log(1e-3), math.log(0.1), generator=g))
    x = dict(u=rn(b, dim, L).to(dtype), delta=(0.5 * rn(b, dim, L)).to(dtype),
             A=-torch.arange(1, N + 1, device=dev, dtype=torch.float32).repeat(dim, 1),
             B=rn(b, N, L).to(dtype), C=rn(b, N, L).to(dtype), D=rn(dim), z=rn(b, dim, L).to(dtype),
             delta_bias=dt0 + torch.log(-torch.expm1(-dt0)))
    return x


def fwd_bwd(backend, inputs, dtype=None):
    leaves = {k: v.detach().to(dtype or v.dtype).clone().requires_grad_() for k, v in inputs.items()}
    y = ssm.selective_scan(**leaves, delta_softplus=True, backend=backend)
    dy = torch.randn(y.shape, device=dev, generator=torch.Generator(device=dev).manual_seed(1)).to(y.dtype)
    y.backward(dy)
    return y.detach(), {k: v.grad for k, v in leaves.items()}


def bench(fn, warmup=3, reps=10):
    """Median milliseconds of fn() on the GPU, and peak memory (GB) above what was allocated before."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times), (torch.cuda.max_memory_allocated() - base) / 1e9


# -----------------------------------------------------------------------------
# 1. raw selective scan: cuda / torch vs the fp64 reference loop
# -----------------------------------------------------------------------------

shape = (1, 16, 64, 4) if args.smoke else (2, 256, 1024, 16)
print(f"\n## 1. selective_scan vs fp64 sequential reference, (b, dim, L, N) = {shape}, with z, D, softplus\n")
print("| inputs | backend | out | u | delta | A | B | C | D | z | delta_bias |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
results["scan_parity"] = []
for dtype in (torch.float32, torch.bfloat16):
    inputs = scan_inputs(*shape, dtype)
    y_ref, g_ref = fwd_bwd("ref", inputs, torch.float64)  # fp64 oracle on the same (rounded) inputs
    for backend in backends + ["ref"]:
        y, g = fwd_bwd(backend, inputs)
        row = {"dtype": str(dtype), "backend": backend, "out": rel(y, y_ref), **{k: rel(g[k], g_ref[k]) for k in g}}
        results["scan_parity"].append(row)
        name = "ref (fp32 loop)" if backend == "ref" else backend
        print(f"| {str(dtype)[6:]} | {name} | " + " | ".join(f"{row[k]:.1e}" for k in ["out"] + list(g)) + " |")

# -----------------------------------------------------------------------------
# 2. Mamba mixer: cuda backend vs torch backend, same weights; and mamba_ssm's own Mamba
# -----------------------------------------------------------------------------

d_model, Bsz, L = (32, 2, 64) if args.smoke else (512, 4, 1024)
print(f"\n## 2. Mamba mixer d_model {d_model}, B {Bsz}, L {L}: torch backend vs cuda backend (rel. error)\n")
results["mixer_parity"] = []
if has_cuda_scan:
    print("| precision | out | worst param grad (name) |")
    print("|---|---|---|")
    torch.manual_seed(0)
    m = ssm.Mamba(d_model).to(dev)
    x = torch.randn(Bsz, L, d_model, device=dev)
    for amp in (False, True):
        outs, grads = {}, {}
        for backend in ("cuda", "torch"):
            m.backend = backend
            m.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                y = m(x)
            y.float().square().mean().backward()
            outs[backend], grads[backend] = y.detach(), {k: p.grad.clone() for k, p in m.named_parameters()}
        errs = {k: rel(grads["torch"][k], grads["cuda"][k]) for k in grads["cuda"]}
        worst = max(errs, key=errs.get)
        row = {"precision": "bf16 autocast" if amp else "fp32", "out": rel(outs["torch"], outs["cuda"]), **errs}
        results["mixer_parity"].append(row)
        print(f"| {row['precision']} | {row['out']:.1e} | {errs[worst]:.1e} ({worst}) |")

    # mamba_ssm's module: load its state dict into ours (strict) and compare outputs (slow path: no causal-conv1d)
    from mamba_ssm.modules.mamba_simple import Mamba as RefMamba
    print("\n| mamba_ssm.Mamba -> ssm.Mamba (strict load) | keys in same order | d_conv | ours cuda vs theirs | ours torch vs theirs |")
    print("|---|---|---|---|---|")
    results["mamba_ssm_module"] = []
    for d_conv in (4, 3):
        torch.manual_seed(1)
        theirs = RefMamba(d_model, d_conv=d_conv, use_fast_path=False).to(dev)
        ours = ssm.Mamba(d_model, d_conv=d_conv).to(dev)
        ours.load_state_dict(theirs.state_dict(), strict=True)
        with torch.no_grad():
            y_theirs = theirs(x)
            ours.backend = "cuda"
            y_cuda = ours(x)
            ours.backend = "torch"
            y_torch = ours(x)
        same_order = list(ours.state_dict()) == list(theirs.state_dict())
        row = {"d_conv": d_conv, "same_key_order": same_order, "cuda": rel(y_cuda, y_theirs),
               "torch": rel(y_torch, y_theirs)}
        results["mamba_ssm_module"].append(row)
        print(f"| ok | {same_order} | {d_conv} | {row['cuda']:.1e} | {row['torch']:.1e} |")
else:
    print("(skipped: no CUDA kernel)")

# -----------------------------------------------------------------------------
# 3. timing: raw scan (bf16 u/delta/B/C/z, with z and softplus) and the mixer under bf16 autocast
# -----------------------------------------------------------------------------

results["timing"] = []
if dev == "cuda":
    print("\n## 3. timing (median ms over 10 after 3 warm-up; peak GB above inputs)\n")
    print("| what | shape | backend | fwd ms | fwd+bwd ms | peak GB fwd+bwd | torch / cuda fwd, fwd+bwd |")
    print("|---|---|---|---|---|---|---|")
    scan_shapes = [(1, 64, 256, 16)] if args.smoke else [(8, 1536, 1024, 16), (8, 1536, 4096, 16)]
    cases = [("scan", s) for s in scan_shapes] + [("mixer", (8, 768, 1024) if not args.smoke else (2, 32, 64))]
    for what, s in cases:
        base = {}
        for backend in backends:
            torch.cuda.empty_cache()
            try:
                if what == "scan":
                    leaves = {k: v.requires_grad_() for k, v in scan_inputs(*s, torch.bfloat16).items()}
                    dy = torch.randn(s[:3], device=dev, dtype=torch.bfloat16)
                    f = lambda: ssm.selective_scan(**leaves, delta_softplus=True, backend=backend)
                else:
                    m = ssm.Mamba(s[1], backend=backend).to(dev)
                    xx = torch.randn(s[0], s[2], s[1], device=dev)
                    dy = torch.randn(s[0], s[2], s[1], device=dev, dtype=torch.bfloat16)

                    def f():
                        with torch.autocast("cuda", dtype=torch.bfloat16):
                            return m(xx)

                with torch.no_grad():
                    t_f, _ = bench(f)
                t_fb, mem = bench(lambda: f().backward(dy))
            except torch.OutOfMemoryError:
                t_f = t_fb = mem = float("nan")
            base.setdefault("f", t_f), base.setdefault("fb", t_fb)
            row = {"what": what, "shape": s, "backend": backend, "fwd_ms": t_f, "fwd_bwd_ms": t_fb, "peak_gb": mem}
            results["timing"].append(row)
            ratio = f"{t_f / base['f']:.1f}x, {t_fb / base['fb']:.1f}x"
            label = "B,d_inner,L,N" if what == "scan" else "B,d_model,L"
            print(f"| {what} | {label}={s} | {backend} | {t_f:.3f} | {t_fb:.3f} | {mem:.2f} | {ratio} |")
            del f

if os.environ.get("OUT"):
    with open(os.path.join(os.environ["OUT"], "ssm_parity.json"), "w") as fh:
        json.dump(results, fh, indent=1, default=str)
