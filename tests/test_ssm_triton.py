"""The GPU scan and conv kernels (ssm_triton.py) checked on the CPU in Triton's interpreter, against float64
references: the sequential scan loop and F.conv1d, in every scan order and fused option, forward and all
gradients. TRITON_INTERPRET=1 must be set before triton is imported, so the cases run in one subprocess."""
import copy
import json
import os

import pytest
import torch
import torch.nn.functional as F

TOL = 1e-5  # float32 kernels against float64 references: max error relative to the largest value

# (name, batch, L, K, dim, N, share_u, with_z, with_D, with_bias, order, segments)
SCAN_CASES = [
    ("plain", 2, 19, 1, 6, 3, False, True, True, True, None, 1),
    ("reversed, no z", 1, 21, 1, 5, 4, False, False, True, True, "reverse", 1),
    ("two orders, shared u", 2, 17, 2, 6, 3, True, True, True, True, "random", 1),
    ("no D, no bias", 1, 13, 1, 4, 2, False, True, False, False, "random", 1),
    ("three segments", 2, 37, 2, 5, 3, True, True, True, True, "random", 3),
]
CONV_CASES = [("width 3, order", 3, True, "random"), ("width 4, no bias", 4, False, None),
              ("width 2, reversed", 2, True, "reverse")]
DEFAULTS = {}  # the kernels' shipped tile sizes, which the cases shrink (_worker)


def _err(a, ref):
    return ((a.double() - ref).abs().max() / ref.abs().max()).item()


def _order(kind, K, L, g):
    if kind is None:
        return None
    if kind == "reverse":
        return torch.arange(L - 1, -1, -1)[None].expand(K, L)
    return torch.stack([torch.randperm(L, generator=g) for _ in range(K)])


def _scan_case(batch, L, K, dim, N, share_u, with_z, with_D, with_bias, kind, segments):
    import ssm_triton as kern
    from ssm import selective_scan_ref
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    u0 = r(batch, L, 1 if share_u else K, dim).requires_grad_(True)
    wide = r(batch, L, K, 2 * dim).requires_grad_(True)  # delta is a strided view of a wider tensor
    z = r(batch, L, K, dim).requires_grad_(True) if with_z else None
    xdbl = r(batch, L, K, 2 * N + 2).requires_grad_(True)  # B, C as views of x_proj's output
    A = (-torch.exp(0.5 * r(K, dim, N))).requires_grad_(True)
    D = r(K, dim).requires_grad_(True) if with_D else None
    bias = (0.3 * r(K, dim)).requires_grad_(True) if with_bias else None
    order = _order(kind, K, L, g)
    u, delta = u0.expand(batch, L, K, dim), wide[..., :dim]
    B, C = xdbl[..., 2:2 + N], xdbl[..., 2 + N:]
    # reference: each direction gathered into scan order, the float64 loop, scattered back
    outs = []
    for k in range(K):
        idx = order[k] if order is not None else torch.arange(L)
        take = lambda x: None if x is None else x[:, idx, k].transpose(1, 2)
        y = selective_scan_ref(take(u), take(delta), A[k], take(B), take(C), None if D is None else D[k],
                               z=take(z), delta_bias=None if bias is None else bias[k], delta_softplus=True)
        back = torch.empty_like(y)
        back[..., idx] = y
        outs.append(back.transpose(1, 2))
    ref = torch.stack(outs, 2)
    dout = r(*ref.shape)
    leaves = [x for x in (u0, wide, z, xdbl, A, D, bias) if x is not None]
    ref_grads = torch.autograd.grad(ref, leaves, dout)
    # kernels in float32
    f = lambda x: None if x is None else x.detach().float()
    uu, dd, xd = f(u0).expand(batch, L, K, dim), f(wide)[..., :dim], f(xdbl)
    Bf, Cf = xd[..., 2:2 + N], xd[..., 2 + N:]
    o32 = None if order is None else order.int().contiguous()
    kern.CHUNK = 8  # several chunks and tiles at a small L; the backward with its own channel blocks
    kern.TRITON_CONFIG["fwd"][4], kern.TRITON_CONFIG["bwd"][4] = dict(BD=4, T=4, num_warps=1), dict(BD=8, T=2, num_warps=1)
    kern.SEGMENTS, kern.MIN_SEGMENT_CHUNKS = segments, 1
    out, states, chunk = kern.scan_fwd(uu, dd, f(z), Bf, Cf, f(A), f(D), f(bias), o32)
    du, ddl, dz, dB, dC, dA, dD, db = kern.scan_bwd(f(dout), uu, dd, f(z), Bf, Cf, f(A), f(D), f(bias), o32,
                                                    states, chunk)
    errs = {"out": _err(out, ref), "du": _err(du.sum(2, keepdim=True) if share_u else du, ref_grads[0]),
            "ddelta": _err(ddl, ref_grads[1][..., :dim])}
    i = 2
    if with_z:
        errs["dz"], i = _err(dz, ref_grads[2]), 3
    errs["dB"], errs["dC"] = _err(dB, ref_grads[i][..., 2:2 + N]), _err(dC, ref_grads[i][..., 2 + N:])
    errs["dA"] = _err(dA, ref_grads[i + 1])
    if with_D:
        errs["dD"], i = _err(dD, ref_grads[i + 2]), i + 1
    if with_bias:
        errs["dbias"] = _err(db, ref_grads[i + 2])
    return errs


def _conv_reference(x, w, b, order):
    idx = order if order is not None else torch.arange(x.shape[1])
    y = F.silu(F.conv1d(x[:, idx].transpose(1, 2), w[:, None], b, padding=w.shape[1] - 1,
                        groups=w.shape[0])[..., :x.shape[1]])
    back = torch.empty_like(y)
    back[..., idx] = y
    return back.transpose(1, 2)


def _conv_case(W, with_bias, kind):
    import ssm_triton as kern
    g = torch.Generator().manual_seed(1)
    batch, L, dim = 2, 23, 37
    xz = torch.randn(batch, L, 2 * dim, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(dim, W, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(dim, generator=g, dtype=torch.float64, requires_grad=True) if with_bias else None
    order = _order(kind, 1, L, g)
    order = None if order is None else order[0]
    ref = _conv_reference(xz[..., :dim], w, b, order)
    dout = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    leaves = [xz, w] + ([b] if with_bias else [])
    ref_grads = torch.autograd.grad(ref, leaves, dout)
    f = lambda t: None if t is None else t.detach().float()
    x32 = f(xz)[..., :dim]
    o32 = None if order is None else order.int().contiguous()
    for cfg in kern.CONV_CONFIG.values():  # short stretches: several programs per axis, halos, masked edges
        cfg.update(S=4, BD=16)
    out = kern.conv_fwd(x32, f(w).contiguous(), f(b), o32)
    dx, dw, db = kern.conv_bwd(f(dout), x32, f(w).contiguous(), f(b), o32)
    errs = {"out": _err(out, ref), "dx": _err(dx, ref_grads[0][..., :dim]), "dw": _err(dw, ref_grads[1])}
    if with_bias:
        errs["dbias"] = _err(db, ref_grads[2])
    return errs


def _ops_case():
    """The torch.library ops (schema, fake implementations, autograd) through torch.library.opcheck, and
    selective_scan's (batch, dim, L) interface with grouped B, C on the same kernel against the loop."""
    import ssm_triton as kern
    from ssm import selective_scan_ref
    g = torch.Generator().manual_seed(2)
    batch, L, K, dim, N = 1, 11, 2, 4, 2
    r = lambda *s: torch.randn(*s, generator=g)
    args = (r(batch, L, 1, dim).expand(batch, L, K, dim), r(batch, L, K, dim), r(batch, L, K, dim),
            r(batch, L, K, N), r(batch, L, K, N), -torch.rand(K, dim, N, generator=g) - 0.5, r(K, dim), r(K, dim),
            torch.stack([torch.randperm(L, generator=g) for _ in range(K)]).int(), True)
    torch.library.opcheck(kern.scan_op, args)
    # the backward op with a state size below its power of two (N 3, NP 4): dB, dC as dense as its fake
    # says (Inductor asserts the strides)
    a3 = (*args[:3], r(batch, L, K, 3), r(batch, L, K, 3), -torch.rand(K, dim, 3, generator=g) - 0.5, *args[6:])
    out, states = kern.scan_op(*a3)
    torch.library.opcheck(kern.scan_backward_op, (r(*out.shape), *a3[:-1], states, True))
    torch.library.opcheck(kern.conv_op, (r(batch, L, dim), r(dim, 3), r(dim), torch.randperm(L, generator=g).int()))
    # grouped (batch, G, N, L) B and C: G directions with the identity order
    x = [r(2, 3 * dim, L).double().requires_grad_(True) for _ in range(3)]
    bc = [r(2, 3, N, L).double().requires_grad_(True) for _ in range(2)]
    A, D, bias = -torch.rand(3 * dim, N, generator=g).double() - 0.5, r(3 * dim).double(), r(3 * dim).double()
    ref = selective_scan_ref(x[0], x[1], A, bc[0], bc[1], D, z=x[2], delta_bias=bias, delta_softplus=True)
    dout = r(*ref.shape).double()
    ref_grads = torch.autograd.grad(ref, x + bc, dout)
    leaves = [t.detach().float().requires_grad_(True) for t in x + bc]
    out = kern.selective_scan_triton(leaves[0], leaves[1], A.float(), leaves[3], leaves[4], D.float(), z=leaves[2],
                                     delta_bias=bias.float(), delta_softplus=True)
    grads = torch.autograd.grad(out, leaves, dout.float())
    errs = {"opcheck": 0.0, "grouped out": _err(out, ref)}
    # torch.compile traces a block through both ops as single nodes: fullgraph (no graph break),
    # forward and backward equal to eager
    import ssm

    def block(x, z, w, dt, bc, A, D, bias, order):
        u = ssm.causal_conv_silu(x, w, None, order, backend="triton")
        return ssm.mamba_scan(u, dt, A, bc[..., :N], bc[..., N:], D, z, bias, order, backend="triton")

    bargs = [r(1, L, dim), r(1, L, dim), r(dim, 3), r(1, L, dim), r(1, L, 2 * N),
             -torch.rand(dim, N, generator=g) - 0.5, r(dim), r(dim)]
    order = torch.randperm(L, generator=g)
    results = []
    for fn in (block, torch.compile(block, backend="aot_eager", fullgraph=True)):
        leaves = [a.clone().requires_grad_(True) for a in bargs]
        y = fn(*leaves, order)
        results.append([y, *torch.autograd.grad(y.square().sum(), leaves)])
    errs["compiled"] = max(_err(a, b.double()) for a, b in zip(results[1], results[0]))
    # the first-call check that gates the kernels on a GPU passes in both precisions train.py and
    # sample.py run (fp32, bf16 autocast), with the shipped tile sizes. A state size of 3 (padded to
    # 4, one masked lane) rather than 16: the interpreter runs tl.associative_scan one element at a
    # time, so its cost grows with the state size.
    kern.CHUNK, kern.SEGMENTS, kern.MIN_SEGMENT_CHUNKS = DEFAULTS["chunk"]
    for table, shipped in (kern.TRITON_CONFIG, DEFAULTS["scan"]), (kern.CONV_CONFIG, DEFAULTS["conv"]):
        for which in table:
            table[which] = copy.deepcopy(shipped[which])
    for dtype in (torch.float32, torch.bfloat16):
        ssm.check_kernel("triton", torch.zeros(1, 4, 2, dtype=dtype), torch.zeros(1, 3), torch.zeros(1, 3, 1))
    errs.update({f"grouped d{i}": _err(a, b) for i, (a, b) in enumerate(zip(grads, ref_grads))})
    return errs


def _mixer_case():
    # ssm.Mamba on the Triton path keeps only its input and the scan's outputs for the backward
    # (recompute_around_scan): its output and every parameter's gradient equal those of the same path
    # kept whole and of the float64 loop, eager and compiled, and the outputs of in_proj and of the conv
    # are freed after the forward instead of kept
    import weakref

    import ssm
    import ssm_triton as kern
    torch.manual_seed(0)
    mixer = ssm.Mamba(4, d_state=3, d_conv=3, backend="triton")
    ref = copy.deepcopy(mixer).double()
    ref.backend = "ref"
    x = torch.randn(2, 11, 4)
    order = torch.randperm(11)

    def kept_whole(m, x):
        return m.out_proj(m.inner(x, order))

    conv, freed = ssm.causal_conv_silu, []
    split, projected = ssm.split_linear, []

    def spy(*args, **kwargs):  # records whether each conv output outlives the forward
        out = conv(*args, **kwargs)
        freed.append(weakref.ref(out))
        return out

    def spy_split(*args, **kwargs):  # likewise in_proj's outputs (x and z)
        outs = split(*args, **kwargs)
        projected.append([weakref.ref(o) for o in outs])
        return outs

    results, errs = {}, {}
    def block_checkpointed(m, x):  # inside a checkpoint around it
        return torch.utils.checkpoint.checkpoint(m, x, order, use_reentrant=False)

    def block_recomputed(m, x):  # as train.py --grad-checkpoint runs it (models.checkpoint_blocks)
        ssm.mark_block_recomputed(m)
        return block_checkpointed(m, x)

    for name, fn in [("recomputed", lambda m, x: m(x, order)), ("kept whole", kept_whole),
                     ("compiled", torch.compile(lambda m, x: m(x, order), backend="aot_eager",
                                                fullgraph=True)),
                     ("nested", block_checkpointed), ("block recomputed", block_recomputed)]:
        m = copy.deepcopy(mixer)
        # (the spies are side effects: graph breaks, so not under fullgraph compilation)
        ssm.causal_conv_silu = spy if name != "compiled" else conv
        ssm.split_linear = spy_split if name != "compiled" else split
        try:
            y = fn(m, x)
        finally:
            ssm.causal_conv_silu, ssm.split_linear = conv, split
        if name != "compiled":
            errs[name + " conv output freed"] = float(freed[-1]() is None)
            errs[name + " in_proj output freed"] = float(all(r() is None for r in projected[-1]))
        calls = {"scan_fwd": 0, "conv_fwd": 0}  # kernel launches in the backward
        launchers = {k: getattr(kern, k) for k in calls}

        def counted(k):
            def launch(*args, **kwargs):
                calls[k] += 1
                return launchers[k](*args, **kwargs)
            return launch
        for k in calls:
            setattr(kern, k, counted(k))
        try:
            y.square().sum().backward()
        finally:
            for k, launch in launchers.items():
                setattr(kern, k, launch)
        errs.update({f"{name} {k} in backward": float(v) for k, v in calls.items()})
        results[name] = [y] + [p.grad for p in m.parameters()]
    y = kept_whole(ref, x.double())
    y.square().sum().backward()
    expect = [y] + [p.grad for p in ref.parameters()]
    for name, got in results.items():
        errs[name] = max(_err(a, b) for a, b in zip(got, expect))
    return errs


def _out_dtype_case():
    """mamba_scan with bf16 inputs and out_dtype=fp32 (LaMamba's SS2D under autocast) on the kernel: the
    output equals the scan of fp32 copies of the same inputs bit for bit, and each gradient is that
    scan's gradient rounded to bf16 (the kernel reads the bf16 values, scans in fp32 either way)."""
    import ssm
    g = torch.Generator().manual_seed(3)
    batch, L, K, dim, N = 1, 11, 2, 4, 2
    r = lambda *s: torch.randn(*s, generator=g).to(torch.bfloat16)
    inputs = [r(batch, L, K, dim), r(batch, L, K, dim), r(batch, L, K, N), r(batch, L, K, N)]
    A = -torch.rand(K, dim, N, generator=g) - 0.5
    D, bias = torch.randn(K, dim, generator=g), torch.randn(K, dim, generator=g)
    order = torch.stack([torch.randperm(L, generator=g) for _ in range(K)])
    dout = torch.randn(batch, L, K, dim, generator=g)
    runs = []
    for wide in (False, True):
        leaves = [(t.float() if wide else t).requires_grad_(True) for t in inputs]
        u, delta, B, C = leaves
        out = ssm.mamba_scan(u, delta, A, B, C, D, dt_bias=bias, order=order, backend="triton",
                             out_dtype=torch.float32)
        runs.append((out, torch.autograd.grad(out, leaves, dout)))
    (out16, g16), (out32, g32) = runs
    errs = {"out dtype": float(out16.dtype != torch.float32), "out": (out16 - out32).abs().max().item()}
    errs.update({f"grad {i} dtype": float(a.dtype != torch.bfloat16) for i, a in enumerate(g16)})
    # in units of bf16's rounding step at each value: within one (the kernel's conversion on store may
    # round differently from torch's .to(), e.g. in the interpreter)
    ulp = lambda b: torch.finfo(torch.bfloat16).eps * b.abs().clamp_min(1e-30)
    errs.update({f"grad {i}": ((a.float() - b).abs() / ulp(b)).max().item()
                 for i, (a, b) in enumerate(zip(g16, g32))})
    return errs


def _sum_directions_case():
    """mamba_scan(..., sum_directions=True) (LaMamba's SS2D): the op's own sum over the K directions, and
    the backward reading its gradient through a broadcast view, equal the sum taken outside bit for bit,
    output and every gradient, and so does sampling's path (no grad: the sum after the op); the op
    passes opcheck with the sum."""
    import ssm
    import ssm_triton as kern
    g = torch.Generator().manual_seed(4)
    batch, L, K, dim, N = 1, 7, 2, 2, 2
    r = lambda *s: torch.randn(*s, generator=g)
    inputs = [r(batch, L, dim), r(batch, L, K, dim), r(batch, L, K, N), r(batch, L, K, N)]
    A = -torch.rand(K, dim, N, generator=g) - 0.5
    D, bias = r(K, dim), r(K, dim)
    order = torch.stack([torch.randperm(L, generator=g) for _ in range(K)])
    dout = r(batch, L, dim)
    runs = []
    for inside in (True, False):
        leaves = [t.clone().requires_grad_(True) for t in inputs]
        u, delta, B, C = leaves
        out = ssm.mamba_scan(u, delta, A, B, C, D, dt_bias=bias, order=order, backend="triton",
                             sum_directions=inside)
        out = out if inside else out.sum(2)
        runs.append([out, *torch.autograd.grad(out, leaves, dout)])
    errs = {f"{i}": (a - b).abs().max().item() for i, (a, b) in enumerate(zip(*runs))}
    errs["shape"] = float(runs[0][0].shape != (batch, L, dim))
    with torch.no_grad():  # sampling's path, which sums outside the op
        u, delta, B, C = inputs
        out = ssm.mamba_scan(u, delta, A, B, C, D, dt_bias=bias, order=order, backend="triton",
                             sum_directions=True)
    errs["no grad"] = (out - runs[1][0]).abs().max().item() + float(out.shape != (batch, L, dim))
    four = lambda t: t[:, :, None].expand(batch, L, K, t.shape[-1])
    torch.library.opcheck(kern.scan_op, (four(inputs[0]), inputs[1], None, *inputs[2:], A, D, bias, order.int(),
                                         True, None, True))
    errs["opcheck"] = 0.0
    return errs


def _branches_case():
    # BiDiM's two branches and LaMamba's four snake scans on the Triton path, with recompute_around_scan
    # (each keeps its scan's output only), and inside a block that --grad-checkpoint recomputes whole
    # (recompute_around_scan stands aside): output and every gradient equal to the float64 loop's. Their
    # out_proj runs inside the region: its input (BiDiM: the branches' sum; LaMamba: the gated, normalised
    # sum of the four scans) is freed after the forward.
    import weakref

    import bidim
    import lamamba
    import ssm
    torch.manual_seed(0)
    errs = {}
    for name, make, x in [("bidim", lambda: bidim.BiMamba(4, d_state=3, d_conv=3), torch.randn(2, 7, 4)),
                          ("lamamba", lambda: lamamba.SS2D(4, d_state=3), torch.randn(2, 3, 3, 4))]:
        mixer = make()
        ref = copy.deepcopy(mixer).double()
        whole = copy.deepcopy(mixer)  # in a block that --grad-checkpoint recomputes whole
        ssm.mark_block_recomputed(whole)
        runs = []
        for backend, m, inp in (("triton", mixer, x), ("ref", ref, x.double()), ("whole", whole, x)):
            os.environ["DIFFUSION_MAMBA_SCAN"] = "ref" if backend == "ref" else "triton"
            summed = []
            hook = m.out_proj.register_forward_hook(
                lambda mod, inp, out: summed.append(weakref.ref(inp[0])))
            try:
                if backend == "whole":
                    y = torch.utils.checkpoint.checkpoint(m, inp, use_reentrant=False)
                else:
                    y = m(inp)
                    errs[f"{name} {backend} out_proj input freed"] = float(summed[0]() is None)
                y.square().sum().backward()
            finally:
                del os.environ["DIFFUSION_MAMBA_SCAN"]
                hook.remove()
            runs.append([y] + [p.grad for p in m.parameters()])
        errs[name] = max(_err(a, b) for a, b in zip(*runs[:2]))
        errs[name + " block recomputed"] = max(_err(a, b) for a, b in zip(runs[2], runs[1]))
    return errs


def _dwconv_case():
    # ssm_triton.dwconv_silu (LaMamba's depthwise conv + SiLU on the channels-last map) forward and
    # backward against nn.Conv2d's in float64: kernel widths 3 and 5, with and without a bias, maps
    # that no tile divides, x a strided view (in_proj's half), in fp32 and bf16; and through opcheck
    import ssm
    import ssm_triton as kern
    g = torch.Generator().manual_seed(5)
    errs = {}
    for B, H, W, D, K, bias, dtype in [(2, 5, 11, 37, 3, True, torch.float32),
                                       (1, 9, 6, 70, 5, False, torch.float32),
                                       (2, 7, 9, 16, 3, False, torch.bfloat16)]:
        x = torch.randn(B, H, W, 2 * D, generator=g)[..., :D].to(dtype)
        w, b = 0.3 * torch.randn(D, 1, K, K, generator=g), torch.randn(D, generator=g) if bias else None
        dy = torch.randn(B, H, W, D, generator=g).to(dtype)
        leaves = [t.clone().requires_grad_() for t in (x, w, b) if t is not None]
        out = kern.dwconv_silu(*leaves)
        grads = torch.autograd.grad(out, leaves, dy)
        ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
        ref = ssm.depthwise_conv2d_reference(*ref_leaves)
        ref_grads = torch.autograd.grad(ref, ref_leaves, dy.double())
        case = f"{H}x{W}x{D} k{K} {dtype}"
        errs[f"{case} dtypes"] = float(out.dtype != dtype
                                       or [t.dtype for t in grads] != [t.dtype for t in leaves])
        errs[case] = _err(out, ref)
        for name, a, r in zip(("dx", "dw", "db"), grads, ref_grads):
            errs[f"{case} {name}"] = _err(a, r)
        torch.library.opcheck(kern.dwconv_op, (x, w, b))
        torch.library.opcheck(kern.dwconv_backward_op, (dy, x, w, b))
    return errs


def _sum_norm_gate_case():
    # ssm_triton.sum_norm_gate (LaMamba's sampling path: the four directions' sum, out_norm, the gate in
    # one kernel) against the same three steps in float64, in the two dtypes sampling runs in, through
    # opcheck, and in LaMamba's SS2D without gradients against its unfused mix on the same kernels
    import torch.nn.functional as F

    import lamamba
    import ssm_triton as kern
    g = torch.Generator().manual_seed(4)
    errs = {}
    for dtype in (torch.float32, torch.bfloat16):
        y, z = torch.randn(2, 6, 4, 37, generator=g), torch.randn(2, 2, 3, 37, generator=g).to(dtype)
        w, b = torch.randn(37, generator=g), torch.randn(37, generator=g)
        out = kern.sum_norm_gate(y, z, w, b, 1e-5)
        normed = F.layer_norm(y.double().sum(2), (37,), w.double(), b.double(), 1e-5).view(z.shape)
        ref = normed.to(dtype).double() * F.silu(z.double())
        errs[f"{dtype} dtype"] = float(out.dtype != dtype or out.shape != z.shape)
        errs[str(dtype)] = _err(out, ref)
        torch.library.opcheck(kern.sum_norm_gate, (y, z, w, b, 1e-5))
    mixer = lamamba.SS2D(4, d_state=3)
    x = torch.randn(2, 3, 4, 4, generator=g)
    os.environ["DIFFUSION_MAMBA_SCAN"] = "triton"
    try:
        with torch.no_grad():
            paths = lamamba.snake_table(3, 4, x.device)
            fused, unfused = mixer(x, paths), mixer.mix(x, paths)
    finally:
        del os.environ["DIFFUSION_MAMBA_SCAN"]
    errs["ss2d sampling"] = _err(fused, unfused.double())
    return errs


def _worker():
    import ssm_triton as kern
    DEFAULTS.update(chunk=(kern.CHUNK, kern.SEGMENTS, kern.MIN_SEGMENT_CHUNKS),
                    scan=copy.deepcopy(kern.TRITON_CONFIG), conv=copy.deepcopy(kern.CONV_CONFIG))
    results = {}
    for name, *case in SCAN_CASES:
        results["scan: " + name] = _scan_case(*case)
    for name, *case in CONV_CASES:
        results["conv: " + name] = _conv_case(*case)
    results["ops"] = _ops_case()
    results["out_dtype"] = _out_dtype_case()
    results["sum_directions"] = _sum_directions_case()
    results["mixer"] = _mixer_case()
    results["branches"] = _branches_case()
    results["sum_norm_gate"] = _sum_norm_gate_case()
    results["dwconv"] = _dwconv_case()
    print(json.dumps(results))


@pytest.fixture(scope="module")
def interpreted(interpreter_results):
    pytest.importorskip("triton")
    return interpreter_results("test_ssm_triton")  # conftest.py: started with the session


@pytest.mark.parametrize("name", [c[0] for c in SCAN_CASES])
def test_scan_kernel_matches_float64_reference(interpreted, name):
    errs = interpreted["scan: " + name]
    assert max(errs.values()) < TOL, errs


@pytest.mark.parametrize("name", [c[0] for c in CONV_CASES])
def test_conv_kernel_matches_float64_reference(interpreted, name):
    errs = interpreted["conv: " + name]
    assert max(errs.values()) < TOL, errs


def test_bf16_inputs_scanned_to_fp32_equal_fp32_copies(interpreted):
    errs = interpreted["out_dtype"]
    grads = [v for k, v in errs.items() if k.startswith("grad ") and "dtype" not in k]
    assert len(errs) == 10 and errs["out"] == 0.0 and max(grads) <= 1.0, errs
    assert max(v for k, v in errs.items() if "dtype" in k) == 0.0, errs


def test_scan_summed_over_directions_in_the_op_equals_the_sum_outside(interpreted):
    errs = interpreted["sum_directions"]
    assert len(errs) == 8 and max(errs.values()) == 0.0, errs


def test_ops_pass_opcheck_and_grouped_interface_matches(interpreted):
    errs = interpreted["ops"]
    assert errs["opcheck"] == 0.0 and len(errs) == 8 and max(errs.values()) < TOL, errs


def test_mixer_recomputes_in_proj_the_conv_and_delta_and_matches(interpreted):
    errs = interpreted["mixer"]
    assert errs["recomputed conv output freed"] == 1.0 and errs["kept whole conv output freed"] == 0.0, errs
    assert errs["recomputed in_proj output freed"] == 1.0, errs
    assert errs["kept whole in_proj output freed"] == 0.0, errs
    # the backward runs the conv again but not the scan, eager and compiled
    for name in ("recomputed", "compiled"):
        assert errs[f"{name} scan_fwd in backward"] == 0 and errs[f"{name} conv_fwd in backward"] == 1, errs
    assert errs["kept whole scan_fwd in backward"] == errs["kept whole conv_fwd in backward"] == 0, errs
    # in a block that --grad-checkpoint recomputes whole, the scan runs again too (its outputs not kept)
    assert errs["block recomputed scan_fwd in backward"] == 1, errs
    assert errs["block recomputed conv_fwd in backward"] == 1, errs
    assert max(errs[k] for k in ("recomputed", "kept whole", "compiled", "nested",
                                 "block recomputed")) < TOL, errs


def test_bidim_and_lamamba_mixers_with_recomputation_match(interpreted):
    errs = dict(interpreted["branches"])
    # out_proj's input is made again in the backward on the Triton path, kept on the loop's
    for name in ("bidim", "lamamba"):
        assert errs.pop(f"{name} triton out_proj input freed") == 1.0, errs
        assert errs.pop(f"{name} ref out_proj input freed") == 0.0, errs
    assert max(errs.values()) < TOL, errs


def test_depthwise_conv2d_kernel_matches_float64_reference(interpreted):
    errs = interpreted["dwconv"]
    assert not any(v for k, v in errs.items() if k.endswith("dtypes")), errs
    assert max(v for k, v in errs.items() if "float32" in k) < TOL, errs
    # bf16: the output and dx are rounded once from fp32 (8 significant bits: within 2^-7 of the value
    # even truncated); dw and db are fp32 sums
    assert max(v for k, v in errs.items() if "bfloat16" in k) < 2 ** -7, errs


def test_lamamba_sampling_output_kernel_matches(interpreted):
    errs = interpreted["sum_norm_gate"]
    assert errs["torch.float32 dtype"] == errs["torch.bfloat16 dtype"] == 0.0, errs
    assert errs["torch.float32"] < TOL and errs["ss2d sampling"] < TOL, errs
    # two roundings to bf16 (out_norm's output, the product), each of which may land one ulp (2^-7 of
    # the value at most) away from the float64 reference's
    assert errs["torch.bfloat16"] < 2 ** -6, errs


def test_forward_runs_unsegmented_where_the_gpu_has_enough_programs():
    # ssm_triton._fwd_launch: the widest channel block that makes 3 programs per multiprocessor, else
    # segments. On a 132-multiprocessor H100 or H200 (docs/speed_history.md, sessions 21-22): DiM-L/2's
    # training batch of 2 at 1024 px (2048 channels) takes 8 channels x 16 steps a program, its guided
    # sampling batch (4) 16 x 16, DiM-S/2's Fashion-MNIST batch (128 x 768 channels) 32 x 4; one 2048 px
    # image keeps segments.
    pytest.importorskip("triton")
    import ssm_triton as kern

    def tile(scans, dim):  # (channels, steps) of the unsegmented forward, or None for segments
        c = kern._unsegmented(scans, dim, 132)
        return None if c is None else (c["BD"], c["T"])

    tiles = {(scans, dim): tile(scans, dim)
             for scans, dim in ((2, 2048), (4, 2048), (128, 768), (1, 2048), (8, 2048))}
    assert tiles == {(2, 2048): (8, 16), (4, 2048): (16, 16), (128, 768): (32, 4), (1, 2048): None,
                     (8, 2048): (32, 4)}
