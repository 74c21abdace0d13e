"""
CPU tests for ssm_cpu.py, the selective scan's recurrence in C: numerics against the float64 sequential loop
(output and every gradient), through selective_scan's interface and the models' token layout; the custom op's
registration (opcheck); threads; and the fall back to the PyTorch scan when no C compiler works.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F

import ssm
import ssm_cpu
from ssm import mamba_scan, scan_reference, selective_scan_ref
from test_ssm import check_against_ref, make_inputs, rel_err

pytestmark = pytest.mark.skipif(not ssm_cpu.compiler(), reason="no C compiler on this machine")


@pytest.mark.parametrize("b, dim, L, N, G", [
    (2, 8, 37, 16, None),   # the models' state size, a length that no chunk length divides
    (3, 12, 70, 5, 3),      # B and C in groups, N not a power of two
    (1, 4, 1, 1, None),     # one step, LaMamba's released state size 1
    (2, 6, 260, 16, 2),     # many recomputed chunks
])
@pytest.mark.parametrize("softplus", [True, False])
def test_matches_the_float64_loop(b, dim, L, N, G, softplus):
    inputs = make_inputs(b, dim, L, N, G=G, with_bias=softplus)
    if not softplus:
        inputs["delta"] = F.softplus(inputs["delta"])  # the scan needs delta > 0 without its softplus
    check_against_ref(inputs, softplus, tol=1e-5, kernel=True)


def test_large_steps_stay_exact():
    """dt up to ~20 with A down to -16: decays underflow to 0, which the exponential must survive."""
    check_against_ref(make_inputs(2, 8, 50, 16, big_delta=True), True, tol=1e-5, kernel=True)


def test_token_layout_and_orders_match_the_loop():
    """mamba_scan as the models call it (four directions, scan orders, D, gate, bias) on the 'cpu' backend
    against the reference loop in float64."""
    g = torch.Generator().manual_seed(1)
    batch, L, K, dim, N = 2, 30, 4, 6, 16
    rn = lambda *s: torch.randn(*s, generator=g)
    inputs = dict(u=rn(batch, L, dim), delta=0.5 * rn(batch, L, K, dim),
                  A=-torch.rand(K, dim, N, generator=g) - 0.5, B=rn(batch, L, K, N), C=rn(batch, L, K, N),
                  D=rn(K, dim), z=rn(batch, L, K, dim), dt_bias=rn(K, dim) - 1)
    order = torch.stack([torch.randperm(L, generator=g) for _ in range(K)])
    dy = rn(batch, L, K, dim)

    def reference(u, **kw):  # u shared by the K directions, as the models pass it
        return scan_reference(u[:, :, None].expand(batch, L, K, dim), **kw, order=order,
                              scan=selective_scan_ref)
    results = []
    for dtype, fn in ((torch.float32, lambda **kw: mamba_scan(**kw, order=order, backend="cpu")),
                      (torch.float64, reference)):
        leaves = {k: v.to(dtype).requires_grad_() for k, v in inputs.items()}
        y = fn(**leaves)
        results.append([y, *torch.autograd.grad(y, list(leaves.values()), dy.to(dtype))])
    for name, a, b in zip(["out", *inputs], *results):
        assert rel_err(a, b) < 1e-5, (name, rel_err(a, b))


def test_threads_split_the_batch_without_changing_results():
    inputs = make_inputs(5, 8, 40, 16)
    runs = []
    for threads in (1, 3):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            y = ssm.selective_scan(**inputs, delta_softplus=True, backend="cpu")
        finally:
            torch.set_num_threads(before)
        runs.append(y)
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("fused", [True, False])
def test_op_registration(fused):
    """Fake implementation, autograd and schema of the custom ops agree with the kernel (torch.library),
    with and without the fused D skip and gate."""
    g = torch.Generator().manual_seed(0)
    L, b, dim, G, N = 9, 2, 6, 2, 16
    rn = lambda *s: torch.randn(*s, generator=g)
    args = [rn(L, b, dim), F.softplus(rn(L, b, dim)), -torch.rand(dim, N, generator=g), rn(L, b, G, N),
            rn(L, b, G, N), rn(dim) if fused else None, rn(L, b, dim) if fused else None]
    torch.library.opcheck(ssm_cpu.scan_op, [a.requires_grad_() if a is not None else None for a in args])


def test_bad_input_is_refused_with_its_name():
    x = torch.zeros(4, 2, 8)
    B = torch.zeros(4, 2, 1, 16)
    with pytest.raises(ValueError, match="delta must be a contiguous float32"):
        ssm_cpu.scan_op(x, x.double(), torch.zeros(8, 16), B, B, None, None)
    with pytest.raises(ValueError, match="z must be a contiguous float32 CPU tensor of shape"):
        ssm_cpu.scan_op(x, x, torch.zeros(8, 16), B, B, None, x[:, :, :4])


def test_without_a_compiler_the_pytorch_scan_is_used(monkeypatch):
    """The automatic choice checks the kernel at its first call; a compiler that is missing (or fails)
    makes it fall back to ChunkedScan with one warning naming the cause, and the results are right."""
    monkeypatch.delenv("DIFFUSION_MAMBA_SCAN", raising=False)
    for name in ("_checked", "_broken", "_warned"):
        monkeypatch.setattr(ssm, name, set())
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setattr(ssm_cpu, "library", ssm_cpu.library.__wrapped__)  # no cached build
    inputs = make_inputs(1, 4, 20, 16)
    with pytest.warns(UserWarning, match="cpu selective scan failed .*no C compiler"):
        y = ssm.selective_scan(**inputs, delta_softplus=True)
    assert ssm.scan_backend(inputs["u"]) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        y2 = ssm.selective_scan(**inputs, delta_softplus=True)
    y_ref = selective_scan_ref(**{k: v.double() if v is not None else None for k, v in inputs.items()},
                               delta_softplus=True)
    assert torch.equal(y, y2) and rel_err(y, y_ref) < 1e-5
