"""
Speed, memory and compute of the Diffusion Mamba models against DiT, across resolutions.

    python -m tools.bench --models dim,dit --size L --res 256,512,1024,1536,2048 --batch 4,4,2,1,1 --mode train
    python -m tools.bench --models DiM-H/2,DiT-XL/2 --mode sample --out sample.json --plot sample.png

--models takes families (dim, bidim, dimsum, lamamba, dit: the config of size --size) or exact
config names (DiT-XL/2) of the registry in models.py. Inputs are SD-VAE latents: 4 channels, a res/8
grid, 1000 classes. Per model and resolution:

  params     parameter count (model built on the meta device)
  GFLOPs     multiply-accumulates of one forward pass of one image (DiT's "GFLOPs" convention), counted with
             torch.utils.flop_counter on the meta device, plus the selective scans (below)
  step ms    train: forward, loss, backward and AdamW step on a batch of B images;
             sample: one sampling step with classifier-free guidance, i.e. one forward of the doubled batch 2B
  ms/img     step time / B (in sample mode: per image and sampling step); img/s = B / step time
  peak GiB   torch.cuda.max_memory_allocated during the steps: weights, gradients, optimiser state, activations
  kept GiB   (JSON kept_gib, train) memory the first step's forward left allocated for its backward

Timing: --warmup untimed steps, then on a GPU the median over 3 rounds of --repeats back-to-back
steps timed with CUDA events (as training and sampling loops run: the CPU queues ahead), on the CPU
the median of --repeats steps (perf_counter); bf16 autocast and TF32 on GPUs, fp32 on the CPU. Out of memory gives an
"OOM" row and the run goes on; a load (batch x pixels) at least as large as one that ran out of
memory is not tried ("OOM*"). JSON and plot are rewritten after every row, so an interrupted run
keeps what it measured.

CPU table (--cpu): the README's CPU benchmark, on Fashion-MNIST-shaped batches (pixels, 1 channel, 10
classes): a train.py training step (the model's diffusion loss, backward, AdamW) of each of CPU_ROWS,
each in a fresh process so that its peak RSS (ru_maxrss: weights, optimiser, activations, and the
~0.3 GiB of torch itself) is its own; --threads torch threads; --rounds rounds over the rows, each
row's time the median over them; JSON in assets/bench_cpu.json.

    python -m tools.bench --cpu

Scan cost: FlopCounterMode sees no matmul inside the selective scan (the CUDA kernel is opaque, the
PyTorch scan is elementwise), so counting runs inside ssm.count_scan_flops(), where each scan
records its shapes and adds b*d*L*(9N + 1) MACs (+ b*d*L when gated by z) instead of running.
"""
import argparse
import gc
import json
import math
import multiprocessing
import os
import resource
import statistics
import sys
import time
from contextlib import nullcontext

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

import ssm
from diffusion import create_diffusion
from models import MODELS, checkpoint_blocks, compile_blocks, compile_choice, cuda_graph

# family -> (config name for a size letter, size aliases)
FAMILIES = {
    "dim": ("DiM-{}/2", {"XL": "H"}), "bidim": ("BiDiM-{}/2", {"H": "XL"}),
    "dimsum": ("DiMSUM-{}/2", {"H": "XL"}), "lamamba": ("LaMamba-{}", {"H": "XL"}),
    "dit": ("DiT-{}/2", {"H": "XL"}),
}
COLUMNS = ["model", "family", "mode", "res", "tokens", "batch", "params_M", "gflops", "scan_gflops",
           "step_ms", "ms_per_image", "images_per_s", "mfu", "peak_mem_gib", "kept_gib", "compiled",
           "setup_s", "status", "device", "torch", "scan", "profile"]
# dense bf16 peak of the GPU for MFU (H100/H200 SXM datasheet); None elsewhere
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}
LATENT_CHANNELS, NUM_CLASSES, VAE_FACTOR = 4, 1000, 8


def resolve(spec, size):
    """A family or a config name -> (config name, family, factory)."""
    family = spec.lower() if spec.lower() in FAMILIES else spec.split("-")[0].lower()
    if family not in FAMILIES:
        raise SystemExit(f"unknown model {spec!r}: use a family ({', '.join(FAMILIES)}) or a "
                         "config name")
    template, aliases = FAMILIES[family]
    name = template.format(aliases.get(size, size)) if spec.lower() == family else spec
    if name not in MODELS:
        raise SystemExit(f"unknown model {name!r}; the registry (models.py) has {', '.join(MODELS)}")
    return name, family, MODELS[name]


#################################################################################
#                                 FLOP counting                                 #
#################################################################################

def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs):
    # torch counts the GPU attention kernels, not this CPU one
    return sdpa_flop_count(query, key, value)


def count_gmacs(model, grid):
    """(total, scan) GMACs of one forward of one image on a grid x grid input, on the model's
    device."""
    device = next(model.parameters()).device
    x = torch.randn(1, getattr(model, "in_channels", LATENT_CHANNELS), grid, grid, device=device)
    t, y = torch.zeros(1, dtype=torch.long,
                       device=device), torch.zeros(1, dtype=torch.long, device=device)
    counter = FlopCounterMode(display=False, custom_mapping={
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops})
    with torch.no_grad(), counter, ssm.count_scan_flops() as scans:
        model(x, t, y)
    return counter.get_total_flops() / 2e9 + scans.macs / 1e9, scans.macs / 1e9


#################################################################################
#                                    Timing                                     #
#################################################################################

def timesteps(model, n, device):
    """DDPM indices for eps models; continuous t in [0, 1] for flow (velocity) models."""
    if getattr(model, "objective", "eps") == "eps":
        return torch.randint(0, 1000, (n,), device=device) + getattr(model, "time_offset", 0)
    return torch.rand(n, device=device)


def median_time(step, warmup, repeats, cuda):
    """Seconds per call after `warmup` untimed ones. On a GPU: the median over 3 rounds of `repeats`
    back-to-back calls timed by CUDA events, as a training loop or sampler runs them (the CPU queues
    the next step's kernels while the GPU works, so launch overhead shows only where the GPU waits
    for it); on a CPU: the median of `repeats` calls."""
    for _ in range(warmup):
        step()
    times = []
    if cuda:
        torch.cuda.synchronize()
        for _ in range(3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(repeats):
                step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / repeats)
        return statistics.median(times)
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# --profile: where a step's time goes, in the categories of the speed issues' tables. Kernel (GPU)
# or operator (CPU) names, first match wins. Inductor's fused pointwise and reduction kernels
# (triton_poi, triton_red, triton_per) count as elementwise, also where they copy; everything
# unmatched too (norms, activations, casts, the optimizer).
PROFILE_CATEGORIES = [
    ("scan backward", ("_scan_bwd_kernel", "selective_scan_bwd", "diffmamba::scan_backward",
                       "diffmamba::scan_cpu_backward")),
    ("scan forward", ("_scan_fwd_kernel", "selective_scan_fwd", "diffmamba::scan")),
    ("depthwise conv", ("_conv_fwd_kernel", "_conv_bwd_kernel", "_dwconv_", "causal_conv1d",
                        "conv_depthwise", "diffmamba::conv", "diffmamba::dwconv", "conv1d",
                        "convolution")),
    ("elementwise", ("triton_poi", "triton_red", "triton_per")),
    ("matrix products", ("triton_tem", "gemm", "xmma", "cutlass", "nvjet", "flash", "fmha",
                         "attention", "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm",
                         "aten::linear", "matmul")),
    ("copies, transposes, gathers", ("copy", "memcpy", "memset", "gather", "scatter", "index",
                                     "cat", "transpose", "permute", "flip", "roll", "clone",
                                     "contiguous", "fill")),
]


def profile_category(name):
    """The PROFILE_CATEGORIES entry a kernel or operator name falls in; "elementwise" otherwise
    (norms, activations, casts, reductions, the optimizer)."""
    low = name.lower()
    return next((cat for cat, keys in PROFILE_CATEGORIES if any(k.lower() in low for k in keys)),
                "elementwise")


def profile_steps(step, steps, cuda, top=15):
    """Busy time per step (ms) and its fractions per category over `steps` profiled steps: GPU
    kernels on a GPU, the operators' own CPU time on a CPU; "top": the `top` largest kernels or
    operators as [name, category, ms per step]."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    busy, kernels = {}, []
    for e in prof.key_averages():
        us = e.self_device_time_total if cuda else e.self_cpu_time_total
        if us > 0 and (not cuda or e.device_type == torch.autograd.DeviceType.CUDA):
            cat = profile_category(e.key)
            busy[cat] = busy.get(cat, 0.0) + us
            kernels.append([e.key[:80], cat, us / 1e3 / steps])
    total = sum(busy.values())
    if not total:
        return None
    kernels.sort(key=lambda k: -k[2])
    return dict(busy_ms=total / 1e3 / steps, top=kernels[:top],
                **{cat: busy.get(cat, 0.0) / total for cat, _ in PROFILE_CATEGORIES})


def run_steps(factory, grid, batch, mode, device, warmup, repeats, row, compile=False,
              grad_checkpoint=False, graphed="off", profile=False):
    """Build the model on `device`, time its train or sample step; fills the row's measured
    columns. compile: None, "model" (torch.compile the whole model) or "blocks" (each block,
    models.compile_blocks); compilation happens in the warm-up steps, and row["setup_s"] says how
    long it took from building the model to the end of the warm-up (compilation, capture, first
    calls);
    grad_checkpoint: recompute every block in the backward (models.checkpoint_blocks); graphed "on"
    or "auto": the step's forward and backward (train) or forward (sample) replayed as one CUDA graph
    (models.cuda_graph), the optimizer step outside it, as train.py --cuda-graph runs them;
    profile: afterwards, `repeats` steps under torch.profiler (profile_steps) fill row["profile"]."""
    cuda = device.type == "cuda"
    setup_start = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        model = factory(input_size=grid, in_channels=LATENT_CHANNELS, num_classes=NUM_CLASSES)
    model.to(device)   # in case a constructor made some tensor on the CPU
    row["compiled"] = compile or "no"

    def capture(fn, *args):
        # auto: a capture that fails warns and leaves the row eager (and says so), as train.py does
        replay = cuda_graph(fn, *args, fallback=graphed == "auto")
        row["compiled"] += " + graph" if replay is not fn else ""
        return replay

    if grad_checkpoint:
        checkpoint_blocks(model)
    if row["gflops"] is None:   # the model did not run on the meta device: count on the real one
        row["params_M"] = sum(p.numel() for p in model.parameters()) / 1e6
        row["gflops"], row["scan_gflops"] = count_gmacs(model, grid)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    if compile:
        # each row compiles as a fresh training run would: without the reset, Dynamo would have
        # seen the earlier rows' shapes under the same forward and compile this row for dynamic sizes
        torch._dynamo.reset()
    net = torch.compile(model) if compile == "model" else model
    if compile == "blocks":
        compile_blocks(model)
    x = torch.randn(batch, LATENT_CHANNELS, grid, grid, device=device)
    t = timesteps(model, batch, device)
    y = torch.randint(0, NUM_CLASSES, (batch,), device=device)

    if cuda:  # before a graph's capture, which allocates the step's tensors once, in its own pool
        torch.cuda.reset_peak_memory_stats(device)
    if mode == "train":
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=cuda)

        def grads(x, t, y):
            opt.zero_grad(set_to_none=True)
            # what the forward keeps for the backward, once, at the first (eager) step: on a GPU the
            # compiled graphs' saved tensors are counted here, where the CPU's tools/memory.py only
            # estimates them (session 21: the two disagreed for checkpointed blocks)
            before = torch.cuda.memory_allocated(device) if cuda and row["kept_gib"] is None else None
            with autocast:
                out = net(x, t, y)
            if before is not None:
                row["kept_gib"] = (torch.cuda.memory_allocated(device) - before) / 2 ** 30
            out.float().square().mean().backward()

        if graphed != "off":
            # one eager step first, so that AdamW's state exists while the capture allocates the
            # activations: the peak then counts what an eager step's does (replays allocate nothing)
            grads(x, t, y)
            opt.step()
            torch.cuda.reset_peak_memory_stats(device)
            grads = capture(grads, x, t, y)

        def step():
            grads(x, t, y)
            opt.step()
    else:
        model.eval()
        # conditional and unconditional halves in one batch
        x, t = torch.cat([x, x]), torch.cat([t, t])
        y = torch.cat([y, torch.full_like(y, getattr(model, "num_classes", NUM_CLASSES))])

        def forward(x, t, y):
            with torch.no_grad(), autocast:
                return net(x, t, y)

        if graphed != "off":
            forward = capture(forward, x, t, y)

        def step():
            forward(x, t, y)

    for _ in range(warmup):  # compilation (and a graph's capture, above) happens before timing
        step()
    if cuda:
        torch.cuda.synchronize(device)
    row["setup_s"] = time.perf_counter() - setup_start
    seconds = median_time(step, 0, repeats, cuda)
    # model FLOPs per image and step: forward 2 x MACs, training ~3 forwards, a guided sampling step 2
    flops = 2e9 * (row["gflops"] or 0) * (3 if mode == "train" else 2)
    peak = next((v for k, v in PEAK_TFLOPS.items() if cuda and k in torch.cuda.get_device_name(device)), None)
    row.update(step_ms=1e3 * seconds, ms_per_image=1e3 * seconds / batch,
               images_per_s=batch / seconds,
               mfu=flops * batch / seconds / (peak * 1e12) if peak and row["gflops"] else None,
               peak_mem_gib=torch.cuda.max_memory_allocated(device) / 2 ** 30 if cuda else None,
               status="ok")
    if profile:
        row["profile"] = profile_steps(step, repeats, cuda)


def measure(name, family, factory, res, batch, args, device, info):
    """One row: count on the meta device, then time on `device`. Errors become the row's status."""
    grid = res // VAE_FACTOR
    row = dict.fromkeys(COLUMNS)
    row.update(model=name, family=family, mode=args.mode, res=res, batch=batch, **info)
    meta = None
    try:
        with torch.device("meta"):
            meta = factory(input_size=grid, in_channels=LATENT_CHANNELS, num_classes=NUM_CLASSES)
        row["params_M"] = sum(p.numel() for p in meta.parameters()) / 1e6
        row["tokens"] = (grid // getattr(meta, "patch_size", 1)) ** 2
        row["gflops"], row["scan_gflops"] = count_gmacs(meta, grid)
    except Exception as e:
        print(f"[bench] {name} @ {res}: no count on the meta device ({type(e).__name__}: {e})",
              file=sys.stderr)
    try:
        choice = args.compile
        if choice == "dit":  # the baseline at its fastest, the others eager
            choice = "model" if family == "dit" else "none"
        elif choice == "auto" and meta is None:  # no model on the meta device to ask: eager
            choice = "none"
        compile = compile_choice(choice, meta, device)  # auto: as train.py compiles
        compile = None if compile == "none" else compile
        run_steps(factory, grid, batch, args.mode, device, args.warmup, args.repeats, row, compile,
                  args.grad_checkpoint, args.cuda_graph, args.profile)
    except torch.OutOfMemoryError:
        row["status"] = "OOM"
    except Exception as e:
        if "out of memory" in str(e):
            row["status"] = "OOM"
        else:
            row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"
            import traceback
            traceback.print_exc()
    gc.collect()   # the failed step's tensors are free once the exception is gone
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


#################################################################################
#                           CPU table (Fashion-MNIST shape)                     #
#################################################################################

# (model, res, batch): DiT-T/2 against DiM-T/2 at the default 32 px, and at the 16 px of the CPU
# quickstart (train.py's preset: DiM-T/2, batch 32)
CPU_ROWS = [("DiT-T/2", 32, 32), ("DiM-T/2", 32, 32), ("DiT-T/2", 16, 32), ("DiM-T/2", 16, 32)]


def cpu_row(name, res, batch, threads, warmup, repeats):
    """One training step of `name` on a Fashion-MNIST-shaped batch, timed on the CPU; run in a
    fresh process (cpu_table), so ru_maxrss is this model's peak."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = MODELS[name](input_size=res, in_channels=1, num_classes=10)
    diffusion = create_diffusion(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = torch.randn(batch, 1, res, res), torch.randint(0, 10, (batch,))

    def step():
        loss = diffusion.training_loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    seconds = median_time(step, warmup, repeats, cuda=False)
    return dict(model=name, res=res, batch=batch, threads=threads,
                params_M=sum(p.numel() for p in model.parameters()) / 1e6,
                step_ms=1e3 * seconds, images_per_s=batch / seconds,
                peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20)


def cpu_table(rows, threads, warmup, repeats, out, rounds=1):
    """cpu_row for each (model, res, batch), each in its own fresh process, in `rounds` rounds that
    interleave the rows, so that a change of the machine's load (a shared CPU's speed drifts by ~1.5x
    within minutes) falls on every row alike; a row's time is the median over the rounds, its peak RSS
    the largest. The JSON is rewritten after every round."""
    runs = [[] for _ in rows]
    ctx = multiprocessing.get_context("spawn")
    for _ in range(rounds):
        for (name, res, batch), run in zip(rows, runs):
            with ctx.Pool(1) as pool:  # a new process per row: ru_maxrss never goes down
                row = pool.apply(cpu_row, (name, res, batch, threads, warmup, repeats))
            run.append(row)
            print(f"[bench] {name} @ {res} px x{batch}, {threads} threads: {row['step_ms']:.0f} ms/step, "
                  f"{row['images_per_s']:.1f} img/s, peak RSS {row['peak_rss_gib']:.2f} GiB",
                  file=sys.stderr)
        results = []
        for run in runs:
            ms = statistics.median(r["step_ms"] for r in run)
            results.append(dict(run[0], step_ms=ms, images_per_s=1e3 * run[0]["batch"] / ms,
                                peak_rss_gib=max(r["peak_rss_gib"] for r in run),
                                step_ms_rounds=[r["step_ms"] for r in run]))
        if out:
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
            with open(out + ".tmp", "w") as f:
                json.dump(results, f, indent=1)
            os.replace(out + ".tmp", out)
    print("| model | res | batch | params (M) | ms/step | images/s | peak RSS (GiB) |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['model']} | {r['res']} | {r['batch']} | {r['params_M']:.2f} | "
              f"{r['step_ms']:,.0f} | {r['images_per_s']:.1f} | {r['peak_rss_gib']:.2f} |")
    return results


#################################################################################
#                                    Reports                                    #
#################################################################################

def fmt(v, digits=1):
    if v is None:
        return "-"
    return f"{v:,.{digits}f}" if isinstance(v, float) else str(v)


def print_table(rows):
    print("| model | res | tokens | batch | params (M) | GFLOPs | step ms | ms/img | img/s | MFU | peak "
          "GiB | compiled | setup s | status |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
        cells = [r["model"], fmt(r["res"]), fmt(r["tokens"]), fmt(r["batch"]), fmt(r["params_M"]),
                 fmt(r["gflops"], 1 if (r["gflops"] or 0) >= 10 else 3), fmt(r["step_ms"]),
                 fmt(r["ms_per_image"], 2), fmt(r["images_per_s"], 2), mfu,
                 fmt(r["peak_mem_gib"], 2), str(r.get("compiled") or "no"), fmt(r.get("setup_s"), 0),
                 r["status"]]
        print("| " + " | ".join(cells) + " |")
    if any(r["status"] == "OOM*" for r in rows):
        print("\nOOM*: not run, a load (batch x pixels) no larger ran out of memory.")
    profiled = [r for r in rows if r.get("profile")]
    if profiled:
        cats = [cat for cat, _ in PROFILE_CATEGORIES]
        print("\nWhere a step's time goes (torch.profiler; GPU kernels, or CPU operators on a CPU):\n")
        print("| model, res, batch | step ms (busy) | " + " | ".join(cats) + " |")
        print("|---" * (len(cats) + 2) + "|")
        for r in profiled:
            prof = r["profile"]
            print(f"| {r['model']}, {r['res']} px, {r['batch']} | {fmt(r['step_ms'])} "
                  f"({fmt(prof['busy_ms'])}) | "
                  + " | ".join(f"{100 * prof[c]:.0f}%" for c in cats) + " |")
        for r in profiled:
            print(f"\nLargest kernels, {r['model']} at {r['res']} px (ms per step, category):")
            for name, cat, ms in r["profile"].get("top", []):
                print(f"  {ms:8.3f}  {cat:<28} {name}")


def scaling_exponent(points):
    """Least-squares slope of log(ms/img) against log(tokens) over the 3 largest token counts."""
    pts = sorted(points)[-3:]
    if len(pts) < 2:
        return None
    lx, ly = [math.log(p[0]) for p in pts], [math.log(p[1]) for p in pts]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def crossover(rows, mamba, dit, key):
    """Smallest resolution from which `mamba` beats `dit` on `key` at every larger resolution (OOM =
    infinite)."""
    def values(model):
        return {r["res"]: (r[key] if r["status"] == "ok" else math.inf) for r in rows
                if r["model"] == model and r["status"] in ("ok", "OOM", "OOM*")}
    a, b = values(mamba), values(dit)
    common = sorted(a.keys() & b.keys())
    if any(v is None for res in common for v in (a[res], b[res])):   # no memory figures on the CPU
        return "-"
    common = [res for res in common if min(a[res], b[res]) < math.inf]
    if not common:
        return "-"
    wins = [a[res] < b[res] for res in common]
    first = len(wins)
    while first > 0 and wins[first - 1]:
        first -= 1
    return str(common[first]) if first < len(wins) else "never"


def print_summary(rows):
    models = list(dict.fromkeys(r["model"] for r in rows if r["status"] == "ok"))
    print("\nTime per image ~ tokens^k, fit on the 3 largest resolutions that ran:")
    for m in models:
        ok = [r for r in rows if r["model"] == m and r["status"] == "ok"]
        k = scaling_exponent([(r["tokens"], r["ms_per_image"]) for r in ok])
        print(f"  {m}: k = {fmt(k, 2)}")
    dits = [m for m in models if any(r["model"] == m and r["family"] == "dit" for r in rows)]
    pairs = [(m, d) for m in models if m not in dits for d in dits]
    if pairs:
        print("Resolution from which the Mamba model stays ahead of DiT (time per image / peak "
              "memory):")
        for m, d in pairs:
            print(f"  {m} vs {d}: time {crossover(rows, m, d, 'ms_per_image')}, "
                  f"memory {crossover(rows, m, d, 'peak_mem_gib')}")


def draw_plot(rows, path, title):
    """Log-log plot of ms per image against resolution, one line per model, drawn with Pillow."""
    from PIL import Image, ImageDraw, ImageFont
    W, H, left, right, top, bottom = 960, 600, 80, 230, 50, 60
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    try:
        font = ImageFont.load_default(size=14)
    except TypeError:   # Pillow < 10.1 has only the bitmap font
        font = ImageFont.load_default()

    def text(xy, s, ax=0.0, ay=0.0):   # ax, ay: which fraction of the text box sits at xy
        x0, y0, x1, y1 = d.textbbox((0, 0), s, font=font)
        d.text((xy[0] - ax * (x1 - x0), xy[1] - ay * (y1 - y0)), s, fill="black", font=font)

    lines = {}
    for r in rows:
        if r["status"] == "ok" and r["ms_per_image"] > 0:
            lines.setdefault(r["model"], []).append((r["res"], r["ms_per_image"]))
    text((W / 2, 15), title, ax=0.5)
    if not lines:
        text((W / 2, H / 2), "no measurements", ax=0.5)
        img.save(path)
        return
    xs = [p[0] for v in lines.values() for p in v]
    ys = [p[1] for v in lines.values() for p in v]
    x0, x1 = math.log10(min(xs)) - 0.05, math.log10(max(xs)) + 0.05
    y0, y1 = math.floor(math.log10(min(ys))), math.ceil(math.log10(max(ys)))
    y1 += y1 == y0
    X = lambda v: left + (math.log10(v) - x0) / (x1 - x0) * (W - left - right)
    Y = lambda v: H - bottom - (math.log10(v) - y0) / (y1 - y0) * (H - top - bottom)
    for e in range(y0, y1 + 1):   # decades labelled, 2..9 as light grid lines
        for m in range(1, 10 if e < y1 else 2):
            yy = Y(m * 10.0 ** e)
            d.line([left, yy, W - right, yy], fill=(200, 200, 200) if m == 1 else (235, 235, 235))
            if m == 1:
                text((left - 6, yy), f"{10.0 ** e:g}", ax=1.0, ay=0.5)
    for res in sorted(set(xs)):
        d.line([X(res), top, X(res), H - bottom], fill=(235, 235, 235))
        text((X(res), H - bottom + 6), str(res), ax=0.5)
    d.rectangle([left, top, W - right, H - bottom], outline="black")
    text(((left + W - right) / 2, H - 25), "resolution (px, log scale)", ax=0.5)
    text((10, top - 25), "ms per image (log)")
    colors = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189),
              (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
    for i, (name, pts) in enumerate(lines.items()):
        c, pts = colors[i % len(colors)], sorted(pts)
        if len(pts) > 1:
            d.line([(X(a), Y(b)) for a, b in pts], fill=c, width=3)
        for a, b in pts:
            d.ellipse([X(a) - 4, Y(b) - 4, X(a) + 4, Y(b) + 4], fill=c)
        ly = top + 15 + 24 * i
        d.line([W - right + 15, ly, W - right + 45, ly], fill=c, width=3)
        text((W - right + 52, ly), name, ay=0.5)
    img.save(path)


def save(rows, args, title):
    if args.out:
        with open(args.out + ".tmp", "w") as f:
            json.dump(rows, f, indent=1)
        os.replace(args.out + ".tmp", args.out)
    if args.plot:
        draw_plot(rows, args.plot, title)


#################################################################################
#                                     Main                                      #
#################################################################################

def environment(device):
    """Device, torch version and the scan that runs there; printed as the header."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        try:
            scan = ssm.scan_backend(torch.empty(1, device=device))
        except Exception as e:
            scan = f"unavailable ({e})"
        if scan == "cuda":
            scan += f" (mamba-ssm {getattr(sys.modules.get('mamba_ssm'), '__version__', '?')})"
    else:
        name, scan = "cpu", "torch"
    return dict(device=name, torch=torch.__version__, scan=scan)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default="dim,bidim,dimsum,lamamba,dit",
                   help="families or config names")
    p.add_argument("--size", default="L", help="size letter for families: T, S, B, L, XL, H")
    p.add_argument("--res", default="256,512,1024,1536,2048",
                   help="image sides in pixels (latent = res/8)")
    p.add_argument("--batch", default="1", help="images per step: one number, or one per --res")
    p.add_argument("--mode", choices=["train", "sample"], default="train")
    p.add_argument("--scan", choices=["cuda", "triton", "torch"], default=None,
                   help="force a selective-scan backend")
    p.add_argument("--compile", choices=["auto", "dit", "none", "model", "blocks"], default="auto",
                   help="torch.compile: auto (as train.py: on a GPU every model its fastest way, "
                        "DiT whole and a model with Mamba layers per block; on a CPU none; "
                        "default); dit (only DiT, whole); none; model (every model whole); blocks "
                        "(every model per block)")
    p.add_argument("--grad-checkpoint", action="store_true",
                   help="activation checkpointing per block (train mode)")
    p.add_argument("--cuda-graph", choices=["auto", "on", "off"], default="auto",
                   help="replay each step as one CUDA graph (models.cuda_graph), as train.py and "
                        "sample.py run them: auto (default) = on a GPU, off on a CPU")
    p.add_argument("--profile", action="store_true",
                   help="also profile --repeats steps of each row: busy time per category (scan, "
                        "conv, matrix products, copies, elementwise)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--budget", type=float, default=0,
                   help="seconds; later configs are skipped (0 = no limit)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--out", default=None, help="default bench.json (--cpu: assets/bench_cpu.json)")
    p.add_argument("--plot", default="bench.png")
    p.add_argument("--cpu", action="store_true",
                   help="the README's CPU table instead (CPU_ROWS, Fashion-MNIST shape, peak RSS)")
    p.add_argument("--rounds", type=int, default=3,
                   help="with --cpu: rounds over the rows, each row's time the median over them")
    p.add_argument("--threads", type=int, default=max(1, len(os.sched_getaffinity(0)) - 1),
                   help="torch threads with --cpu (default: as train.py with its one loader "
                   "worker, one fewer than the cores)")
    args = p.parse_args(argv)
    if args.cpu:
        return cpu_table(CPU_ROWS, args.threads, args.warmup, args.repeats,
                         args.out or os.path.join("assets", "bench_cpu.json"), args.rounds)
    args.out = args.out or "bench.json"
    if args.scan:
        os.environ["DIFFUSION_MAMBA_SCAN"] = args.scan   # ssm reads it at every call
    resolutions = [int(r) for r in args.res.split(",")]
    batches = [int(b) for b in args.batch.split(",")]
    if len(batches) == 1:
        batches *= len(resolutions)
    if len(batches) != len(resolutions) or any(r % VAE_FACTOR for r in resolutions):
        raise SystemExit("--batch needs one value or one per --res; every --res must be a multiple "
                         "of 8")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.cuda_graph == "on" and device.type != "cuda":
        raise SystemExit("--cuda-graph on needs a CUDA GPU; use --cuda-graph off (or auto) here")
    if device.type != "cuda":
        args.cuda_graph = "off"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    info = environment(device)
    precision = "bf16 autocast" if device.type == "cuda" else "fp32"
    title = f"{args.mode} step, {info['device']}, torch {info['torch']}, scan {info['scan']}, {precision}"
    print(f"# bench: {title}\n")

    models = [resolve(s.strip(), args.size.upper()) for s in args.models.split(",") if s.strip()]
    rows = []
    start, oom_load = time.time(), {}
    # resolution outermost: a budget cut keeps every model's small ones
    for res, batch in zip(resolutions, batches):
        for name, family, factory in models:
            if batch * res * res >= oom_load.get(name, math.inf):
                row = dict.fromkeys(COLUMNS)
                row.update(model=name, family=family, mode=args.mode, res=res, batch=batch,
                           status="OOM*", **info)
            elif args.budget and time.time() - start > args.budget:
                row = dict.fromkeys(COLUMNS)
                row.update(model=name, family=family, mode=args.mode, res=res, batch=batch,
                           status="skipped (budget)", **info)
            else:
                row = measure(name, family, factory, res, batch, args, device, info)
                if row["status"] == "OOM":
                    oom_load[name] = min(oom_load.get(name, math.inf), batch * res * res)
            kept = f" (forward keeps {fmt(row['kept_gib'], 2)})" if row.get("kept_gib") else ""
            print(f"[bench] {name} @ {res} x{batch} {args.mode}: {fmt(row['step_ms'])} ms/step, "
                  f"{fmt(row['peak_mem_gib'], 2)} GiB{kept}, {row['status']} "
                  f"({time.time() - start:.0f} s)", file=sys.stderr)
            rows.append(row)
            save(rows, args, title)

    order = {m[0]: i for i, m in enumerate(models)}
    rows.sort(key=lambda r: (order[r["model"]], r["res"] or 0))
    print_table(rows)
    print_summary(rows)
    save(rows, args, title)
    return rows


if __name__ == "__main__":
    main()
