"""
CPU tests for ssm.py: the chunked pure-PyTorch scan and the Triton kernels (in Triton's interpreter) against the
sequential reference, backend selection, and the Mamba mixer.
"""

import json
import math
import types
import warnings

import pytest
import torch
import torch.nn.functional as F

import ssm
import ssm_triton
from ssm import Mamba, scan_backend, selective_scan, selective_scan_ref, selective_scan_torch

NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def make_inputs(b, dim, L, N, G=None, with_D=True, with_z=True, with_bias=True, big_delta=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g)
    bc_shape = (b, N, L) if G is None else (b, G, N, L)
    if big_delta:  # dt up to ~20 with A down to -16: the case where cumsum/divide scans overflow
        delta = 5 + 15 * torch.rand(b, dim, L, generator=g)
    else:
        delta = 0.5 * rn(b, dim, L)
    A = -torch.exp(math.log(16) * torch.rand(dim, N, generator=g))  # in [-16, -1]
    return dict(u=rn(b, dim, L), delta=delta, A=A, B=rn(*bc_shape), C=rn(*bc_shape),
                D=rn(dim) if with_D else None, z=rn(b, dim, L) if with_z else None,
                delta_bias=0.5 * rn(dim) if with_bias else None)


def run_with_grads(fn, inputs, dtype, **kw):
    """Call fn on copies of inputs cast to dtype; return output and the gradient of every tensor input."""
    leaves = {k: (v.detach().to(dtype).clone().requires_grad_() if v is not None else None) for k, v in inputs.items()}
    y = fn(**leaves, **kw)
    g = torch.Generator().manual_seed(123)
    y.backward(torch.randn(y.shape, generator=g).to(y.dtype))
    return y.detach(), {k: v.grad for k, v in leaves.items() if v is not None}


def check_against_ref(inputs, softplus, tol=1e-5, **kw):
    y, grads = run_with_grads(selective_scan_torch, inputs, torch.float32, delta_softplus=softplus, **kw)
    y_ref, grads_ref = run_with_grads(selective_scan_ref, inputs, torch.float64, delta_softplus=softplus)
    assert y.dtype == torch.float32 and y.shape == y_ref.shape
    assert torch.isfinite(y).all()
    assert rel_err(y, y_ref) < tol, ("out", rel_err(y, y_ref))
    assert grads.keys() == grads_ref.keys()
    for k in grads:
        assert torch.isfinite(grads[k]).all(), k
        assert rel_err(grads[k], grads_ref[k]) < tol, (k, rel_err(grads[k], grads_ref[k]))


# -----------------------------------------------------------------------------
# selective scan: chunked torch path vs sequential reference
# -----------------------------------------------------------------------------

@pytest.mark.parametrize("b,dim,L,N,G,chunk", [
    (2, 8, 37, 4, None, None),   # L not a multiple of the chunk
    (2, 6, 1, 4, None, None),    # single token
    (1, 6, 5, 3, None, 16),      # shorter than one chunk
    (2, 8, 300, 16, None, None), # long sequence
    (2, 8, 50, 4, None, 1),      # chunk of one step: all work in the border loop
    (2, 8, 37, 4, 2, None),      # grouped B/C
    (2, 8, 37, 4, 1, 7),         # grouped with G = 1
])
def test_scan_matches_reference(b, dim, L, N, G, chunk):
    check_against_ref(make_inputs(b, dim, L, N, G), softplus=True, chunk_size=chunk)


@pytest.mark.parametrize("with_D,with_z,with_bias,softplus", [
    (False, False, False, False),
    (True, False, False, True),
    (False, True, True, False),
    (True, True, False, True),
])
def test_scan_optional_arguments(with_D, with_z, with_bias, softplus):
    inputs = make_inputs(2, 8, 45, 4, with_D=with_D, with_z=with_z, with_bias=with_bias)
    if not softplus:
        inputs["delta"] = inputs["delta"].abs()  # dt must be positive without the softplus
    check_against_ref(inputs, softplus=softplus)


@pytest.mark.parametrize("softplus,chunk", [(False, None), (True, None), (False, 64)])
def test_scan_large_delta_is_finite_and_exact(softplus, chunk):
    # |dt * A| up to 320 per step; a scan that divides by exp(cumsum) overflows here after one step
    check_against_ref(make_inputs(2, 8, 130, 16, big_delta=True), softplus=softplus, chunk_size=chunk)


def test_scan_keeps_no_per_state_tensor_for_the_backward():
    # autograd keeps what the backward needs; the (batch, dim, L, N) states must not be among it, only
    # (batch, dim, L)-sized tensors and one (batch, dim, N) state per chunk border
    b, dim, L, N, T = 2, 32, 200, 16, 20
    saved = []
    keep = lambda t: saved.append(t.numel()) or t
    leaves = {k: v.requires_grad_() for k, v in make_inputs(b, dim, L, N).items()}
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        y = selective_scan_torch(**leaves, delta_softplus=True, chunk_size=T)
    assert max(saved) < b * dim * L * 2  # the largest: one (b, dim, L) input, never x N
    assert sum(saved) < 20 * b * dim * L  # the inputs, a few intermediates and L / T border states
    y.sum().backward()  # and the backward still runs from what was kept
    assert all(torch.isfinite(v.grad).all() for v in leaves.values())


@pytest.mark.parametrize("directions,shared", [(1, False), (3, True)])
def test_token_layout_scan_matches_reference(directions, shared):
    # mamba_scan's PyTorch path (scan_torch_tokens) against the loop, in float64: scan orders,
    # several directions, u and z shared by all directions (3-D), every gradient
    b, L, K, dim, N = 2, 29, directions, 6, 4
    g = torch.Generator().manual_seed(1)
    rn = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    ud = (b, L, dim) if shared else (b, L, K, dim)
    inputs = dict(u=rn(*ud), delta=0.5 * rn(b, L, K, dim), A=-torch.rand(K, dim, N, generator=g,
                  dtype=torch.float64) - 0.5, B=rn(b, L, K, N), C=rn(b, L, K, N), D=rn(K, dim),
                  z=rn(*ud), dt_bias=rn(K, dim) - 1)
    order = torch.stack([torch.randperm(L, generator=g) for _ in range(K)])
    dy, results = rn(b, L, K, dim), []
    for backend in ("torch", "ref"):
        leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
        y = ssm.mamba_scan(**leaves, order=order, backend=backend)
        y.backward(dy)
        results.append((y.detach(), {k: v.grad for k, v in leaves.items()}))
    (y, grads), (y_ref, grads_ref) = results
    assert y.shape == (b, L, K, dim) and rel_err(y, y_ref) < 1e-10
    for k in grads:
        assert rel_err(grads[k], grads_ref[k]) < 1e-10, k


def test_scan_bf16_returns_input_dtype():
    inputs = make_inputs(2, 8, 40, 4)
    half = {k: (v.bfloat16() if k in ("u", "delta", "B", "C", "z") else v) for k, v in inputs.items()}
    y = selective_scan(**half, delta_softplus=True, backend="torch")
    y_ref = selective_scan_ref(**{k: v.double() if v is not None else None for k, v in half.items()},
                               delta_softplus=True)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, y_ref) < 1e-2  # bf16 output rounding only: the scan itself runs in fp32


def test_dispatch_matches_direct_call():
    inputs = make_inputs(2, 8, 33, 4)
    y1 = selective_scan(**inputs, delta_softplus=True, backend="torch")
    y2 = selective_scan(**inputs, delta_softplus=True, backend="ref")
    assert rel_err(y1, y2) < 1e-5


# -----------------------------------------------------------------------------
# backend selection
# -----------------------------------------------------------------------------

def test_backend_env_var(monkeypatch):
    x = torch.zeros(1, 2, 3)
    monkeypatch.delenv("DIFFUSION_MAMBA_SCAN", raising=False)
    assert scan_backend(x) == "cpu"  # CPU tensors: the C kernel (ssm_cpu.py)
    monkeypatch.setenv("DIFFUSION_MAMBA_SCAN", "torch")
    assert scan_backend(x) == "torch"
    monkeypatch.setenv("DIFFUSION_MAMBA_SCAN", "ref")
    assert scan_backend(x) == "ref"
    assert scan_backend(x, backend="torch") == "torch"  # the argument wins over the environment
    monkeypatch.setenv("DIFFUSION_MAMBA_SCAN", "bogus")
    with pytest.raises(ValueError):
        scan_backend(x)


def test_mixer_asks_no_dtype_under_compile(monkeypatch):
    """The mixer asks for the scan's dtype (scan_dtype: autocast's queries) only in eager calls: torch
    2.11's dynamo cannot trace those queries, and a graph break in every block made DiM-L/2 2x slower."""
    monkeypatch.delenv("DIFFUSION_MAMBA_SCAN", raising=False)
    asked = []

    def recording_scan_dtype(x):
        asked.append(x.dtype)
        return x.dtype

    monkeypatch.setattr(ssm, "scan_dtype", recording_scan_dtype)
    torch.manual_seed(0)
    mixer = Mamba(8, d_state=4)
    x = torch.randn(2, 6, 8)
    expected = mixer(x)
    assert asked == [torch.float32]  # eager: asked
    torch._dynamo.reset()
    out = torch.compile(mixer, backend="eager", fullgraph=True)(x)
    assert asked == [torch.float32]  # traced without asking
    torch.testing.assert_close(out, expected)


def test_backend_forced_cuda(monkeypatch):
    x = torch.zeros(1, 2, 3)
    monkeypatch.setenv("DIFFUSION_MAMBA_SCAN", "cuda")
    monkeypatch.setitem(ssm.SCANS, "cuda", None)
    with pytest.raises(RuntimeError, match="not installed"):
        scan_backend(x)  # forcing the kernel without mamba-ssm is an error, not a silent fallback
    calls = []
    monkeypatch.setitem(ssm.SCANS, "cuda", lambda *args: calls.append(args) or args[0])
    assert scan_backend(x) == "cuda"
    inputs = make_inputs(1, 2, 3, 2)
    selective_scan(**inputs)
    assert len(calls) == 1  # a forced backend is not checked first


@pytest.fixture
def fresh_dispatch(monkeypatch):
    """Automatic choice with clean first-call caches; scan_backend picks 'cuda' first, then the next usable."""
    monkeypatch.delenv("DIFFUSION_MAMBA_SCAN", raising=False)
    for name in ("_checked", "_broken", "_warned"):
        monkeypatch.setattr(ssm, name, set())
    # CPU tensors never pick a GPU kernel; pretend they are on the GPU for the choice only
    monkeypatch.setattr(ssm, "scan_backend", lambda x, backend=None: "torch" if "cuda" in ssm._broken else "cuda")


def test_auto_kernel_is_checked_once_forward_and_backward(monkeypatch, fresh_dispatch):
    calls, grads = [], []

    def kernel(*args, **kwargs):
        calls.append(args[0].shape)
        y = ssm.selective_scan_torch(*args, **kwargs)
        if y.requires_grad:
            y.register_hook(lambda g: grads.append(g.shape) or g)
        return y

    monkeypatch.setitem(ssm.SCANS, "cuda", kernel)
    inputs = make_inputs(1, 4, 5, 2)
    y = selective_scan(**inputs, delta_softplus=True)
    assert torch.equal(y, ssm.selective_scan_torch(**inputs, delta_softplus=True))
    assert len(calls) == 2 and len(grads) == 1  # the check (forward and backward), then the call itself
    selective_scan(**inputs, delta_softplus=True)
    assert len(calls) == 3 and ssm._checked == {("cuda", torch.device("cpu"), torch.float32)}


@pytest.mark.parametrize("failure", ["forward", "backward", "wrong"])
def test_auto_kernel_falls_back_when_its_first_call_check_fails(monkeypatch, fresh_dispatch, failure):
    # A kernel picked automatically whose forward or backward fails, or whose result is wrong, is marked
    # broken; the next choice runs instead (with one warning), and the result is that backend's.
    class Broken(torch.autograd.Function):
        @staticmethod
        def forward(ctx, u):
            if failure == "forward":
                raise RuntimeError("selective_scan_cuda is not installed")
            return u * (2.0 if failure == "wrong" else 1.0)

        @staticmethod
        def backward(ctx, g):
            if failure == "backward":
                raise RuntimeError("no kernel image is available for execution on the device")
            return g * 2.0

    monkeypatch.setitem(ssm.SCANS, "cuda", lambda u, *args: Broken.apply(ssm.selective_scan_torch(u, *args)))
    inputs = make_inputs(1, 2, 5, 2)
    with pytest.warns(UserWarning, match="cuda selective scan failed its first-call check .*using torch"):
        y = selective_scan(**inputs)
    assert torch.equal(y, ssm.selective_scan_torch(**inputs)) and ssm._broken == {"cuda"} and not ssm._checked


def test_count_scan_flops_counts_instead_of_running():
    inputs = make_inputs(2, 8, 33, 4)
    with ssm.count_scan_flops() as scans:
        y = selective_scan(**inputs)
        selective_scan(**dict(inputs, z=None))
    assert scans.calls == 2 and scans.macs == 2 * 8 * 33 * (9 * 4 + 1) * 2 + 2 * 8 * 33
    assert torch.count_nonzero(y) == 0
    assert torch.count_nonzero(selective_scan(**inputs)) > 0  # outside the context the scan runs again


# -----------------------------------------------------------------------------
# Triton backend: the kernels run in Triton's CPU interpreter. TRITON_INTERPRET=1 must be set before triton is
# imported, so all cases run in one subprocess (_triton_worker, started by conftest.py) and the tests below
# check its results.
# -----------------------------------------------------------------------------

# name: (b, dim, L, N), make_inputs options, softplus, fp32 launch config overrides (fwd, bwd)
TRITON_CASES = {
    "default": ((2, 8, 37, 4), {}, True, {}, {}),  # L not a multiple of the tile; border states recomputed
    "grouped": ((2, 8, 37, 4), dict(G=2), True, {}, {}),  # channel block shrinks to the 4 channels of a group
    "grouped_g1_ragged": ((1, 12, 21, 3), dict(G=1), True, {}, {}),  # N not a power of 2, dim not a block multiple
    "no_options": ((2, 8, 29, 4), dict(with_D=False, with_z=False, with_bias=False), False, {}, {}),
    "D_softplus": ((1, 8, 29, 4), dict(with_z=False, with_bias=False), True, {}, {}),
    "z_bias_no_softplus": ((1, 8, 29, 4), dict(with_D=False), False, {}, {}),
    "large_delta": ((1, 8, 40, 8), dict(big_delta=True), True, {}, {}),
    "large_delta_no_softplus": ((1, 8, 40, 8), dict(big_delta=True), False, {}, {}),
    "many_chunks": ((1, 8, 75, 4), {}, True, dict(CHUNK=16), {}),  # 5 saved chunks, the last one partial
    "tile_per_chunk": ((1, 8, 30, 4), {}, True, dict(CHUNK=4), {}),  # one tile per chunk
    "single_step": ((2, 6, 1, 4), {}, True, {}, {}),
    "bwd_own_blocks": ((2, 8, 37, 4), dict(G=2), True, {}, dict(BD=2, T=2)),  # backward tiles its own way
    # the shipped bf16 launch configurations (tiles, channel blocks), checked here on fp32 inputs
    "bf16_launch_configs": ((1, 36, 70, 4), {}, True, dict(ssm_triton.TRITON_CONFIG["fwd"][2]),
                            dict(ssm_triton.TRITON_CONFIG["bwd"][2])),
    # the bf16 forward's unsegmented channel blocks (ssm_triton._fwd_launch), each of them
    "unsegmented_widest": ((1, 36, 70, 4), {}, True, dict(ssm_triton.FWD_UNSEGMENTED[0]), {}),
    "unsegmented_middle": ((1, 36, 70, 4), {}, True, dict(ssm_triton.FWD_UNSEGMENTED[1]), {}),
    "unsegmented_narrowest": ((1, 36, 70, 4), {}, True, dict(ssm_triton.FWD_UNSEGMENTED[-1]), {}),
}


def _triton_worker():
    """Run in a subprocess with TRITON_INTERPRET=1; prints one JSON line: errors per case, or why to skip."""
    if ssm_triton.triton is None or not ssm_triton.triton_interpreted():
        print(json.dumps({"__skip__": "triton is not importable"}))
        return
    try:  # some triton/numpy pairs cannot interpret loops with run-time bounds (triton 3.6 with numpy >= 2.4)
        selective_scan(**make_inputs(1, 2, 3, 2), delta_softplus=True, backend="triton")
    except Exception as e:
        print(json.dumps({"__skip__": f"Triton's interpreter fails here: {type(e).__name__}: {e}"[:300]}))
        return
    defaults = {k: dict(v[4]) for k, v in ssm_triton.TRITON_CONFIG.items()}
    chunk = ssm_triton.CHUNK
    out = {}
    for name, (shape, opts, softplus, fwd_cfg, bwd_cfg) in TRITON_CASES.items():
        fwd_cfg = dict(fwd_cfg)
        ssm_triton.CHUNK = fwd_cfg.pop("CHUNK", chunk)
        ssm_triton.TRITON_CONFIG["fwd"][4] = dict(defaults["fwd"], **fwd_cfg)
        ssm_triton.TRITON_CONFIG["bwd"][4] = dict(defaults["bwd"], **bwd_cfg)
        inputs = make_inputs(*shape, **opts)
        if not softplus:  # dt = delta + bias must be positive without the softplus
            inputs["delta"] = inputs["delta"].abs()
            if inputs["delta_bias"] is not None:
                inputs["delta_bias"] = inputs["delta_bias"].abs()
        y, grads = run_with_grads(ssm.selective_scan_triton, inputs, torch.float32, delta_softplus=softplus)
        y_ref, grads_ref = run_with_grads(selective_scan_ref, inputs, torch.float64, delta_softplus=softplus)
        errs = {"out": rel_err(y, y_ref) if torch.isfinite(y).all() else math.inf}
        errs.update({k: rel_err(g, grads_ref[k]) if torch.isfinite(g).all() else math.inf for k, g in grads.items()})
        errs["missing"] = sorted(set(grads_ref) ^ set(grads))
        errs["dtype_shape_ok"] = y.dtype == torch.float32 and y.shape == y_ref.shape
        out[name] = errs
        ssm_triton.TRITON_CONFIG["fwd"][4], ssm_triton.TRITON_CONFIG["bwd"][4] = defaults["fwd"], defaults["bwd"]
        ssm_triton.CHUNK = chunk

    # bf16 inputs: bf16 output, error of bf16 rounding only (the scan runs in fp32)
    inputs = make_inputs(1, 8, 24, 4)
    half = {k: (v.bfloat16() if k in ("u", "delta", "B", "C", "z") else v) for k, v in inputs.items()}
    y = selective_scan(**half, delta_softplus=True, backend="triton")
    y_ref = selective_scan_ref(**{k: v.double() for k, v in half.items()}, delta_softplus=True)
    out["bf16"] = {"dtype_ok": y.dtype == torch.bfloat16, "out": rel_err(y, y_ref)}

    # the Mamba mixer on the triton backend against the reference loop, parameters' gradients included
    torch.manual_seed(0)
    m = Mamba(16, d_state=4, d_conv=3)
    x = torch.randn(2, 19, 16)
    res = {}
    for backend in ("triton", "ref"):
        m.backend = backend
        m.zero_grad()
        y = m(x)
        y.square().mean().backward()
        res[backend] = (y.detach(), {k: p.grad.clone() for k, p in m.named_parameters()})
    out["mamba_mixer"] = {"out": rel_err(res["triton"][0], res["ref"][0]),
                          **{k: rel_err(g, res["ref"][1][k]) for k, g in res["triton"][1].items()}}
    print(json.dumps(out))


@pytest.fixture(scope="module")
def triton_results(interpreter_results):
    if ssm_triton.triton is None:
        pytest.skip("triton is not importable")
    res = interpreter_results("test_ssm")  # conftest.py: started with the session, beside the other
    if "__skip__" in res:
        pytest.skip(res["__skip__"])
    return res


@pytest.mark.parametrize("name", list(TRITON_CASES))
def test_triton_scan_matches_reference(triton_results, name):
    errs = dict(triton_results[name])
    assert errs.pop("missing") == [] and errs.pop("dtype_shape_ok")
    # fp32 kernels against the fp64 loop: outputs and every gradient (measured ~1e-7)
    assert max(errs.values()) < 1e-5, errs


def test_triton_scan_bf16(triton_results):
    assert triton_results["bf16"]["dtype_ok"]
    assert triton_results["bf16"]["out"] < 1e-2  # bf16 output rounding only


def test_triton_mamba_mixer_matches_reference(triton_results):
    errs = triton_results["mamba_mixer"]
    assert errs["out"] < 1e-5 and max(errs.values()) < 1e-4, errs


def test_first_call_check_inside_a_recomputed_region(monkeypatch):
    # a kernel's first call can come inside torch.utils.checkpoint (a recomputed block): the check's own
    # forward and backward must not be taken for the region's saved tensors, or the recomputation stops
    # early, the check "fails" and the slow PyTorch scan runs from then on (seen on the GPU, LaMamba-L)
    monkeypatch.setitem(ssm.SCANS, "cpu", selective_scan_ref)  # a correct kernel: the check must pass
    monkeypatch.setattr(ssm, "_checked", set())
    monkeypatch.setattr(ssm, "_broken", set())
    monkeypatch.delenv("DIFFUSION_MAMBA_SCAN", raising=False)
    A, B = torch.empty(1, 4), torch.empty(1, 4, 1)

    def region(x):
        ssm._checked.clear()  # first calls: in the forward and again in the recomputation
        assert ssm.checked_backend(x, A, B) == "cpu"
        return (x * x).sum()

    x = torch.randn(3, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed check warns
        torch.utils.checkpoint.checkpoint(region, x, use_reentrant=False).backward()
    assert ssm._broken == set() and torch.equal(x.grad, 2 * x.detach())


def test_backend_triton_selection(monkeypatch):
    monkeypatch.delenv("DIFFUSION_MAMBA_SCAN", raising=False)
    gpu = types.SimpleNamespace(is_cuda=True)  # scan_backend only looks at .is_cuda
    monkeypatch.setitem(ssm.SCANS, "cuda", lambda *a: None)
    monkeypatch.setitem(ssm.SCANS, "triton", lambda *a: None)
    assert scan_backend(gpu) == "triton"  # our kernel first
    monkeypatch.setitem(ssm.SCANS, "triton", None)
    assert scan_backend(gpu) == "cuda"  # then mamba-ssm, the optional reference
    monkeypatch.setitem(ssm.SCANS, "cuda", None)
    monkeypatch.setitem(ssm.SCANS, "triton", lambda *a: None)
    assert scan_backend(torch.zeros(1)) == "cpu"  # never a GPU kernel on CPU tensors unless forced
    assert scan_backend(torch.zeros(1), backend="triton") == "triton"
    monkeypatch.setenv("DIFFUSION_MAMBA_SCAN", "triton")
    assert scan_backend(torch.zeros(1)) == "triton"
    monkeypatch.delenv("DIFFUSION_MAMBA_SCAN")
    monkeypatch.setitem(ssm.SCANS, "triton", None)
    with pytest.warns(UserWarning, match="pure-PyTorch"):
        ssm._warned.clear()
        assert scan_backend(gpu) == "torch"  # neither: the pure-PyTorch scan, with a warning
    with pytest.raises(RuntimeError):
        scan_backend(gpu, backend="triton")  # forcing triton without triton is an error


@pytest.mark.skipif(ssm_triton.triton is None or ssm_triton.triton_interpreted(), reason="needs triton without its interpreter")
def test_triton_on_cpu_tensors_needs_interpreter():
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        selective_scan(**make_inputs(1, 2, 3, 2), backend="triton")


# -----------------------------------------------------------------------------
# Mamba mixer
# -----------------------------------------------------------------------------

def test_mamba_state_dict_matches_mamba_ssm():
    d_model, N, d_conv = 64, 16, 4
    m = Mamba(d_model, d_state=N, d_conv=d_conv)
    d_inner, R = 128, 4  # expand 2, dt_rank ceil(64 / 16)
    # key order of mamba_ssm.modules.mamba_simple.Mamba: own parameters first, then submodules
    expected = {
        "A_log": (d_inner, N), "D": (d_inner,),
        "in_proj.weight": (2 * d_inner, d_model),
        "conv1d.weight": (d_inner, 1, d_conv), "conv1d.bias": (d_inner,),
        "x_proj.weight": (R + 2 * N, d_inner),
        "dt_proj.weight": (d_inner, R), "dt_proj.bias": (d_inner,),
        "out_proj.weight": (d_model, d_inner),
    }
    sd = m.state_dict()
    assert list(sd) == list(expected)
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    assert all(v.dtype == torch.float32 for v in sd.values())


def test_mamba_init():
    dt_min, dt_max = 0.001, 0.1
    m = Mamba(48, d_state=8, dt_min=dt_min, dt_max=dt_max)
    assert m.dt_rank == 3
    assert torch.allclose(m.A_log, torch.log(torch.arange(1, 9.0)).expand(96, 8))
    assert torch.equal(m.D.data, torch.ones(96))
    dt = F.softplus(m.dt_proj.bias.detach())
    assert dt.min() >= dt_min * (1 - 1e-4) and dt.max() <= dt_max * (1 + 1e-4)
    bound = m.dt_rank ** -0.5
    assert m.dt_proj.weight.abs().max() <= bound
    assert m.dt_proj.bias._no_reinit and m.A_log._no_weight_decay and m.D._no_weight_decay
    assert m.in_proj.bias is None and m.out_proj.bias is None
    m2 = Mamba(48, dt_init="constant", bias=True, conv_bias=False)
    assert torch.allclose(m2.dt_proj.weight, torch.full_like(m2.dt_proj.weight, bound))
    assert m2.in_proj.bias is not None and m2.conv1d.bias is None


@pytest.mark.parametrize("d_conv", [3, 4])
def test_mamba_forward_matches_reference_scan(d_conv):
    torch.manual_seed(0)
    m = Mamba(32, d_state=8, d_conv=d_conv)
    x = torch.randn(2, 45, 32)
    m.backend = "torch"
    y = m(x)
    y.square().mean().backward()
    grads = {k: p.grad.clone() for k, p in m.named_parameters()}
    m.zero_grad()
    m.backend = "ref"
    y_ref = m(x)
    y_ref.square().mean().backward()
    assert y.shape == x.shape
    assert rel_err(y, y_ref) < 1e-5
    for k, p in m.named_parameters():
        assert rel_err(grads[k], p.grad) < 1e-4, k


@pytest.mark.parametrize("d_conv", [3, 4])
def test_mamba_steps_first_path_matches_token_path(d_conv):
    # the CPU mixer (forward_steps: one gather into scan order, steps-first conv and scan) against the
    # token-layout path with the loop (conv_reference, scan_reference), float64: a scan order, the output
    # and the gradients of the input and of every parameter
    torch.manual_seed(0)
    m = Mamba(8, d_state=4, d_conv=d_conv).double()
    x, order = torch.randn(2, 23, 8, dtype=torch.float64), torch.randperm(23)
    results = []
    for backend in ("torch", "ref"):
        m.backend, xl = backend, x.clone().requires_grad_()
        m.zero_grad()
        y = m(xl, order=order)
        y.backward(torch.cos(torch.arange(y.numel(), dtype=y.dtype)).view_as(y))
        results.append([y.detach(), xl.grad] + [p.grad.clone() for p in m.parameters()])
    for name, a, b in zip(["out", "x"] + [k for k, _ in m.named_parameters()], *results):
        assert rel_err(a, b) < 1e-10, name


@pytest.mark.parametrize("L,W,bias", [(9, 4, False), (2, 4, True), (5, 1, True)])
def test_steps_first_conv_matches_reference(L, W, bias):
    # ConvSiluSteps against conv_reference (F.conv1d), float64: no bias, fewer steps than taps, one tap
    g = torch.Generator().manual_seed(2)
    rn = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
    x, w, b = rn(2, L, 3), rn(3, W), rn(3) if bias else None
    dy, results = rn(2, L, 3), []
    for conv in (lambda x, w, b: ssm.causal_conv_silu_steps(x.transpose(0, 1), w, b).transpose(0, 1),
                 lambda x, w, b: ssm.conv_reference(x, w, b, None)):
        leaves = [t.clone().requires_grad_() for t in (x, w, b) if t is not None]
        y = conv(*leaves, *([] if bias else [None]))
        results.append([y, *torch.autograd.grad(y, leaves, dy)])
    for a, b_ in zip(*results):
        assert rel_err(a, b_) < 1e-12


@pytest.mark.parametrize("d_conv", [3, 4])
def test_mamba_is_causal(d_conv):
    torch.manual_seed(0)
    m = Mamba(16, d_state=4, d_conv=d_conv, backend="torch")
    x = torch.randn(2, 20, 16)
    k = 11
    x2 = x.clone()
    x2[:, k] += 1.0
    y, y2 = m(x), m(x2)
    assert torch.equal(y[:, :k], y2[:, :k])
    assert not torch.allclose(y[:, k], y2[:, k])


def test_mamba_bf16_autocast():
    torch.manual_seed(0)
    m = Mamba(32, d_state=8, d_conv=3, backend="torch")
    x = torch.randn(2, 24, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    y.float().sum().backward()
    assert torch.isfinite(y.float()).all()
    assert rel_err(y, m(x)) < 5e-2
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())
