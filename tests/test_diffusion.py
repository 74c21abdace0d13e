"""
Tests for diffusion.py (CPU, a few seconds). The known-answer tests use Gaussian data x0 ~ N(mu, s^2
I), for which the optimal epsilon predictor is closed form: x_t ~ N(a mu, (a^2 s^2 + sigma^2) I) and
E[eps | x_t] = sigma (x_t - a mu) / (a^2 s^2 + sigma^2), with a = sqrt(abar_t), sigma = sqrt(1 - abar_t).
A correct sampler fed this predictor must return samples with mean mu and std s, up to its
discretisation error. The same holds on the GVP flow path (a = sin(pi t / 2), sigma = cos(pi t / 2))
with the optimal velocity E[u | x_t] = a' E[x0 | x_t] + sigma' E[eps | x_t], E[x0 | x_t] = mu + a s^2 (x_t - a mu) / (a^2 s^2 + sigma^2).
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffusion import (SAMPLERS, FlowMatching, GaussianDiffusion, UpsampleGuidance,
                       create_diffusion, ddim_sample, discretized_gaussian_nll, dpmpp_2m_sample,
                       get_betas, gvp_coefs, gvp_velocity_to_x0_eps, normal_kl, respaced_timesteps,
                       threshold_x0)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


MU = torch.tensor([0.5, -1.2, 2.0, 0.8], dtype=torch.float64)
S = 0.7


def gaussian_model(diffusion, mu, s, extra_channels=None):
    """Optimal eps predictor for N(mu, s^2 I) data; mu (D,) or a per-class table (num_classes, D)
    indexed by y."""
    def model(x, t, y):  # x (B, D), t (B,) as the network sees it (index + time_offset)
        abar = diffusion.alphas_cumprod[t - diffusion.time_offset].to(x.dtype)[:, None]  # (B, 1)
        m = (mu if mu.ndim == 1 else mu[y]).to(x.dtype)
        eps = (1 - abar).sqrt() * (x - abar.sqrt() * m) / (abar * s * s + 1 - abar)
        return eps if extra_channels is None else torch.cat([eps, extra_channels.expand_as(eps)],
                                                            dim=1)
    return model


def prior_sample(diffusion, mu, s, z):
    """x_T drawn from the exact marginal N(a_T mu, (a_T^2 s^2 + sigma_T^2) I) at t = N-1 rather than
    N(0, I).

    Isolates the solver error: scaled-linear betas end at abar_T = 0.0047 (a_T = 0.068, no zero
    terminal SNR), so starting from N(0, I) alone shifts the sample mean by about -s a_T mu (-0.1
    for mu = 2). z is standardised per dimension so that deterministic samplers show their
    discretisation error alone, not sampling noise.
    """
    z = (z - z.mean(0)) / z.std(0)
    abar = diffusion.alphas_cumprod[-1].item()
    return (math.sqrt(abar) * mu + math.sqrt(abar * s * s + 1 - abar) * z).to(z.dtype)


# --------------------------------------------------------------------------- schedules

def test_beta_schedules():
    b = get_betas("linear", 1000)
    assert b.dtype == torch.float64 and b.shape == (1000,)
    assert b[0].item() == pytest.approx(1e-4) and b[-1].item() == pytest.approx(0.02)
    b = get_betas("linear", 250)  # DiT scales by 1000 / T
    assert b[0].item() == pytest.approx(4e-4) and b[-1].item() == pytest.approx(0.08)
    b = get_betas("scaled_linear", 1000)
    assert b[0].item() == pytest.approx(0.00085) and b[-1].item() == pytest.approx(0.012)
    assert torch.allclose(b.sqrt().diff(), b.sqrt().diff()[0].expand(999))  # linear in sqrt(beta)
    for name in ("linear", "scaled_linear"):
        abar = GaussianDiffusion(name).alphas_cumprod
        assert (abar.diff() < 0).all() and 0 < abar[-1] < abar[0] < 1
    with pytest.raises(ValueError, match="scaled_linear"):
        get_betas("cosine")


def test_respaced_timesteps():
    assert respaced_timesteps(1000, 1000) == list(range(1000))
    ts = respaced_timesteps(1000, 250)
    assert len(ts) == 250 and ts[0] == 0 and ts[-1] == 999 and all(b > a for a, b in zip(ts, ts[1:]))
    assert ts[:5] == [0, 4, 8, 12, 16]  # stride 999/249 = 4.012, rounded
    assert respaced_timesteps(1000, 1) == [999]
    assert GaussianDiffusion().timesteps(3) == [999, 500, 0]  # noisiest first; 499.5 rounds to even


# --------------------------------------------------------------------------- known answer on
# Gaussian data

@pytest.mark.parametrize("schedule,time_offset", [("linear", 0), ("scaled_linear", 1)])
@pytest.mark.parametrize("sampler,steps,tol_std", [("ddpm", 250, 0.035), ("ddim", 100, 0.03),
                                                   ("dpm++", 25, 0.03)])
def test_gaussian_known_answer(schedule, time_offset, sampler, steps, tol_std):
    d = GaussianDiffusion(schedule, 1000, time_offset)
    g = torch.Generator().manual_seed(0)
    noise = prior_sample(d, MU, S, torch.randn(20000, 4, generator=g))
    x = d.sample(gaussian_model(d, MU, S), noise, sampler=sampler, steps=steps, generator=g)
    assert x.shape == noise.shape and x.dtype == noise.dtype
    assert (x.mean(0).double() - MU).abs().max() < 0.02  # ddpm's own noise: standard error 0.005
    # measured: ddpm 250 -1% .. -2.5%, ddim 100 -2.2%, dpm++ 25 -0.5% (linear) / -2.6%
    # (scaled-linear)
    assert (x.std(0).double() / S - 1).abs().max() < tol_std


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear"])
def test_dpmpp_beats_ddim(schedule):
    d = GaussianDiffusion(schedule)
    noise = prior_sample(d, MU, S, torch.randn(2000, 4, dtype=torch.float64))
    err = lambda sampler, steps: (d.sample(gaussian_model(d, MU, S), noise, sampler=sampler,
                                           steps=steps)
                                  .std(0) / S - 1).abs().max().item()
    # measured ratio 0.05 (linear), 0.36 (scaled-linear)
    assert err("dpm++", 25) < 0.4 * err("ddim", 25)
    assert err("dpm++", 200) < 0.25 * err("dpm++", 25)  # converges; measured 0.14 / 0.08


def test_class_conditional_and_null_label():
    d = GaussianDiffusion("linear")
    # row 3 = null
    mus = torch.tensor([[1.5, -0.5], [-2.0, 0.7], [0.3, 2.5], [0.0, 0.0]], dtype=torch.float64)
    y = torch.arange(9000) % 3
    noise = prior_sample(d, mus[y], S,
                         torch.randn(9000, 2, generator=torch.Generator().manual_seed(1)))
    model = gaussian_model(d, mus, S)
    x = d.sample(model, noise, y=y, sampler="dpm++", steps=25, cfg_scale=1.0, null_label=3)
    for c in range(3):
        assert (x[y == c].mean(0).double() - mus[c]).abs().max() < 0.04  # SE 0.013
    # w = 1 is the conditional prediction: same samples whether or not a null label is supplied
    assert torch.equal(x, d.sample(model, noise, y=y, sampler="dpm++", steps=25))
    assert torch.equal(x, d.sample(model, noise, y=y, sampler="dpm++", steps=25, cfg_scale=1.0,
                                   null_label=3))
    with pytest.raises(ValueError, match="null_label"):
        d.sample(model, noise, y=y, cfg_scale=1.5)


def test_cfg_formula_and_batching():
    d = GaussianDiffusion("linear")
    mus = torch.tensor([[1.5, -0.5], [-2.0, 0.7], [0.3, 2.5]], dtype=torch.float64)
    base = gaussian_model(d, mus, S)
    calls = []

    def model(x, t, y):
        calls.append(x.shape[0])
        return base(x, t, y)

    x, y, t = torch.randn(6, 2), torch.tensor([0, 1, 0, 1, 0, 1]), 400
    t_in = torch.full((6,), t)
    eps_c, eps_u = base(x, t_in, y), base(x, t_in, torch.full_like(y, 2))
    eps, extra = d.predict_eps(model, x, t, y, cfg_scale=2.5, null_label=2)
    assert calls == [12] and extra is None  # cond and uncond in one doubled forward
    assert torch.allclose(eps, eps_u + 2.5 * (eps_c - eps_u), atol=1e-6)
    calls.clear()
    eps, _ = d.predict_eps(model, x, t, y, cfg_scale=1.0, null_label=2)
    assert calls == [6] and torch.equal(eps, eps_c)  # w = 1: one plain conditional forward


def recorded(denoise, inputs):
    """denoise that also appends each input it is called with to `inputs`."""
    def f(x, i):
        inputs.append(x)
        return denoise(x, i)
    return f


# --------------------------------------------------------------------------- solver identities

@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_ddim_equals_dpmpp_first_order(dtype, tol):
    d = GaussianDiffusion("scaled_linear", time_offset=1)
    denoise, abar = d.denoiser(gaussian_model(d, MU, S), d.timesteps(20))
    seen = {"ddim": [], "dpm": []}
    recording = lambda name: recorded(denoise, seen[name])

    noise = torch.randn(64, 4, dtype=dtype, generator=torch.Generator().manual_seed(2))
    a = ddim_sample(recording("ddim"), noise, abar)
    b = dpmpp_2m_sample(recording("dpm"), noise, abar, order=1)
    for xa, xb in zip(seen["ddim"], seen["dpm"]):  # step by step
        assert torch.allclose(xa, xb, rtol=tol, atol=tol)
    assert torch.allclose(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_respaced_ddpm_with_all_steps_is_the_plain_chain(dtype):
    d = GaussianDiffusion("linear", 1000)
    model = gaussian_model(d, MU, S)
    noise = torch.randn(32, 4, dtype=dtype, generator=torch.Generator().manual_seed(3))
    out = d.sample(model, noise, sampler="ddpm", steps=1000,
                   generator=torch.Generator().manual_seed(4))
    # reference: unrespaced DDPM (Ho et al. eq. 7) written from the original betas
    betas, abar = d.betas, d.alphas_cumprod
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    g, x = torch.Generator().manual_seed(4), noise
    for t in reversed(range(1000)):
        eps = model(x, torch.full((32,), t), None)
        x0 = (x - (1 - abar[t]).sqrt() * eps) / abar[t].sqrt()
        x = (abar_prev[t].sqrt() * betas[t] / (1 - abar[t]) * x0
             + (1 - betas[t]).sqrt() * (1 - abar_prev[t]) / (1 - abar[t]) * x)
        if t > 0:
            var = betas[t] * (1 - abar_prev[t]) / (1 - abar[t])
            x = x + var.sqrt() * torch.randn(x.shape, generator=g, dtype=x.dtype)
    # beta' = 1 - abar_t / abar_{t-1} differs from beta_t by float64 rounding only: bit-identical
    # once the coefficients are rounded to float32, within 1e-13 in float64
    if dtype == torch.float32:
        assert torch.equal(out, x)
    else:
        assert torch.allclose(out, x, rtol=0, atol=1e-12)


def test_learned_range_variance():
    d = GaussianDiffusion("linear")
    noise = torch.randn(256, 4, generator=torch.Generator().manual_seed(5))
    run = lambda model: d.sample(model, noise, sampler="ddpm", steps=50,
                                 generator=torch.Generator().manual_seed(6))
    fixed = run(gaussian_model(d, MU, S))
    # v = -1 selects log beta-tilde, i.e. the fixed-small variance; v = +1 selects beta, which is
    # larger
    assert torch.allclose(fixed, run(gaussian_model(d, MU, S, torch.tensor(-1.0))), atol=1e-5)
    assert not torch.allclose(fixed, run(gaussian_model(d, MU, S, torch.tensor(1.0))), atol=1e-3)


# --------------------------------------------------------------------------- training loss

def test_training_loss():
    d = GaussianDiffusion("linear")
    x0 = MU.float() + S * torch.randn(512, 4, generator=torch.Generator().manual_seed(7))
    noise = torch.randn(512, 4, generator=torch.Generator().manual_seed(8))
    t = torch.randint(0, 1000, (512,), generator=torch.Generator().manual_seed(9))
    model = gaussian_model(d, MU, S)
    abar = d.alphas_cumprod[t].float()[:, None]
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    expected = ((model(x_t, t, None) - noise) ** 2).mean()
    assert torch.allclose(d.training_loss(model, x0, None, noise=noise, t=t), expected, atol=1e-6)
    zero = lambda x, t, y: torch.zeros_like(x)
    assert d.training_loss(model, x0, None, noise,
                           t) < 0.8 * d.training_loss(zero, x0, None, noise, t)
    # 2C outputs (eps + variance channels): the eps loss uses the first C channels only, plus L_vb
    wide = gaussian_model(d, MU, S, torch.tensor(0.3))
    vb = d.vb_bpd(x0, x_t, t, model(x_t, t, None), torch.full_like(x0, 0.3)).mean()
    assert vb > 0 and torch.allclose(d.training_loss(wide, x0, None, noise, t), expected + vb,
                                     atol=1e-6)
    # image-shaped batches and a random t from the global RNG
    img = torch.randn(3, 2, 4, 4)
    assert d.training_loss(lambda x, t, y: torch.zeros_like(x), img, None).ndim == 0


# --------------------------------------------------------------------------- plumbing

@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 0.5), ("dpm++", 0.0)])
def test_fixed_seed_is_bit_identical(sampler, eta):
    d = GaussianDiffusion("linear")
    model = gaussian_model(d, MU, S)
    noise = torch.randn(2, 4, 3, 3)  # image-shaped: the samplers only broadcast scalars
    model4d = lambda x, t, y: model(x.flatten(2).transpose(1, 2).reshape(-1, 4),
                                    t.repeat_interleave(9), None) \
        .reshape(2, 9, 4).transpose(1, 2).reshape(x.shape)
    run = lambda seed: d.sample(model4d, noise, sampler=sampler, steps=20, eta=eta,
                                generator=torch.Generator().manual_seed(seed))
    a = run(0)
    assert a.shape == noise.shape and torch.equal(a, run(0))
    if sampler != "dpm++":  # stochastic samplers: the generator drives the noise
        assert not torch.equal(a, run(1))


def test_bad_arguments():
    d = GaussianDiffusion("linear", 100)
    model, noise = gaussian_model(d, MU, S), torch.randn(2, 4)
    with pytest.raises(ValueError, match="ddim"):
        d.sample(model, noise, sampler="euler")
    for steps in (0, 101, 2.5):
        with pytest.raises(ValueError):
            d.sample(model, noise, steps=steps)
    with pytest.raises(ValueError):
        d.sample(model, noise, sampler="ddpm", eta=0.5)


@pytest.mark.parametrize("time_offset", [0, 1])
def test_time_offset(time_offset):
    d = GaussianDiffusion("scaled_linear", 50, time_offset)
    seen = set()

    def model(x, t, y):
        seen.update(t.tolist())
        return torch.zeros_like(x)

    d.sample(model, torch.randn(2, 3), sampler="ddim", steps=50)
    assert seen == set(range(time_offset, 50 + time_offset))
    seen.clear()
    d.training_loss(model, torch.randn(4000, 3), None)
    assert seen <= set(range(time_offset, 50 + time_offset)) and len(seen) == 50


# --------------------------------------------------------------------------- learned variance: L_vb

def test_normal_kl():
    m, lv = torch.randn(100, dtype=torch.float64), torch.randn(100, dtype=torch.float64)
    assert normal_kl(m, lv, m, lv).abs().max() < 1e-15  # identical Gaussians
    m2, lv2 = torch.randn(100, dtype=torch.float64), torch.randn(100, dtype=torch.float64)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(m, (0.5 * lv).exp()),
                                            torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    assert torch.allclose(normal_kl(m, lv, m2, lv2), ref, rtol=1e-12, atol=1e-12)


def test_discretized_gaussian_nll_matches_integral():
    # both end bins and three inner ones
    x = torch.tensor([-1.0, -0.5, 0.0, 0.3, 1.0], dtype=torch.float64)
    mean = x + torch.tensor([0.01, -0.005, 0.0, 0.02, -0.01], dtype=torch.float64)
    std = torch.tensor([0.02, 0.01, 0.05, 0.03, 0.02], dtype=torch.float64)
    for xi, mi, si, nll in zip(x, mean, std, discretized_gaussian_nll(x, mean, std.log())):
        lo = xi - 1 / 255 if xi > -0.999 else mi - 12 * si  # end bins reach -inf / +inf
        hi = xi + 1 / 255 if xi < 0.999 else mi + 12 * si
        z = torch.linspace(lo.item(), hi.item(), 20001, dtype=torch.float64)
        p = torch.trapezoid(torch.exp(-0.5 * ((z - mi) / si) ** 2) / (si * math.sqrt(2 * math.pi)),
                            z)
        # tanh CDF: |error| < 2e-4
        assert math.exp(-nll.item()) == pytest.approx(p.item(), rel=2e-3)


def test_vb_is_minimal_at_the_true_posterior():
    d = GaussianDiffusion("linear")
    g = torch.Generator().manual_seed(10)
    x0 = torch.rand(64, 3, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(64, 3, generator=g, dtype=torch.float64)
    t = torch.randint(1, 1000, (64,), generator=g)
    x_t = d.q_sample(x0, t, noise)
    vb = lambda eps, v: d.vb_bpd(x0, x_t, t, eps, torch.full_like(x0, v))
    # eps = the true noise gives x0_hat = x0, the true posterior mean; v = -1 gives log beta-tilde
    # (clipped), the true posterior variance: KL = 0, and it grows as the variance moves towards
    # beta
    assert vb(noise, -1.0).abs().max() < 1e-10
    vals = torch.stack([vb(noise, v) for v in torch.linspace(-1, 1, 9).tolist()])  # (9, B)
    assert (vals.diff(dim=0) > 0).all()
    assert (vb(noise + 0.1, -1.0) > 1e-6).all()  # a wrong mean costs bits
    # one element by hand: KL of 1-D Gaussians in bits
    i, j = 0, 0
    a, a_prev, b = d.alphas_cumprod[t[i]].item(), d.alphas_cumprod[t[i] - 1].item(), d.betas[t[i]].item()
    post_var = b * (1 - a_prev) / (1 - a)
    eps = noise + 0.1
    x0_hat = (x_t[i, j] - math.sqrt(1 - a) * eps[i, j]) / math.sqrt(a)
    mu_q = (math.sqrt(a_prev) * b * x0[i, j] + math.sqrt(1 - b) * (1 - a_prev)
            * x_t[i, j]) / (1 - a)
    mu_p = (math.sqrt(a_prev) * b * x0_hat + math.sqrt(1 - b) * (1 - a_prev) * x_t[i, j]) / (1 - a)
    var_p = math.exp(0.25 * math.log(b) + 0.75 * math.log(post_var))  # v = -0.5: f = 0.25
    kl = 0.5 * (math.log(var_p / post_var) + post_var / var_p + (mu_q - mu_p) ** 2 / var_p
                - 1) / math.log(2)
    one = d.vb_bpd(x0[:1, :1], x_t[:1, :1], t[:1], eps[:1, :1],
                   torch.full((1, 1), -0.5, dtype=torch.float64))
    assert one.item() == pytest.approx(kl.item(), rel=1e-9)
    # t = 0: the decoder NLL of x0 under N(x0_hat, Sigma_0), Sigma_0 = beta-tilde_1 at v = -1
    # ("clipped")
    t0 = torch.zeros(64, dtype=torch.long)
    x_0 = d.q_sample(x0, t0, noise)
    log_var = math.log(d.betas[1].item()
                       * (1 - d.alphas_cumprod[0].item()) / (1 - d.alphas_cumprod[1].item()))
    nll = discretized_gaussian_nll(x0, x0, torch.full_like(x0, 0.5 * log_var)).mean(1) / math.log(2)
    assert torch.allclose(d.vb_bpd(x0, x_0, t0, noise, torch.full_like(x0, -1.0)), nll, rtol=1e-9)


def test_vb_stop_gradient():
    d = GaussianDiffusion("linear")
    x0, noise = torch.rand(8, 3, 2, 2) * 2 - 1, torch.randn(8, 3, 2, 2)
    t = torch.tensor([0, 1, 5, 100, 400, 700, 998, 999])
    eps = torch.randn(8, 3, 2, 2, requires_grad=True)
    v = torch.zeros(8, 3, 2, 2, requires_grad=True)
    d.training_loss(lambda x, t, y: torch.cat([eps, v], dim=1), x0, None, noise, t).backward()
    # eps gets exactly the MSE gradient (L_vb's mean is stop-gradient), v gets L_vb's gradient only
    assert torch.allclose(eps.grad, 2 * (eps - noise).detach() / eps.numel(), atol=1e-7)
    assert (v.grad.flatten(1).abs().sum(1) > 0).all()


# --------------------------------------------------------------------------- flow matching (GVP)

def flow_model(mu, s):
    """Optimal velocity E[u | x_t] for N(mu, s^2 I) data on the GVP path; mu (D,) or (num_classes, D) indexed by y."""
    def model(x, t, y):  # x (B, D), t (B,) float in [0, 1]
        a, sg = gvp_coefs(t.to(x.dtype)[:, None])
        m = (mu if mu.ndim == 1 else mu[y]).to(x.dtype)
        var = a * a * s * s + sg * sg
        x0, eps = m + a * s * s * (x - a * m) / var, sg * (x - a * m) / var
        return math.pi / 2 * (sg * x0 - a * eps)
    return model


def test_gvp_conversions_round_trip():
    g = torch.Generator().manual_seed(11)
    x0, eps = torch.randn(7, 5, generator=g,
                          dtype=torch.float64), torch.randn(7, 5, generator=g, dtype=torch.float64)
    t = torch.tensor([0.0, 1e-4, 0.2, 0.5, 0.77, 0.999, 1.0], dtype=torch.float64)[:, None]
    a, s = gvp_coefs(t)
    x_t, u = a * x0 + s * eps, math.pi / 2 * (s * x0 - a * eps)
    x0_hat, eps_hat = gvp_velocity_to_x0_eps(x_t, u, t)
    assert torch.allclose(x0_hat, x0, atol=1e-12) and torch.allclose(eps_hat, eps, atol=1e-12)
    # ... consistent with the VP eps parameterisation (abar = a^2) where alpha > 0, and back to the
    # velocity
    assert torch.allclose(((x_t - s * eps_hat) / a)[1:], x0[1:], atol=1e-9)
    assert torch.allclose(math.pi / 2 * (s * x0_hat - a * eps_hat), u, atol=1e-12)
    # float32 with a scalar t
    x0_32, eps_32 = gvp_velocity_to_x0_eps(x_t[3:4].float(), u[3:4].float(), 0.5)
    assert x0_32.dtype == torch.float32 and torch.allclose(x0_32.double(), x0[3:4], atol=1e-5)


def test_flow_training_loss():
    fm = FlowMatching()
    x0, noise = torch.randn(3, 2, generator=torch.Generator().manual_seed(12)), torch.randn(3, 2)
    t = torch.tensor([0.0, 0.3, 1.0])
    seen = []

    def model(x, t_in, y):
        seen.append(t_in)
        return 0.5 * x + 1.0

    total = 0.0
    for b in range(3):
        a, s = math.sin(math.pi / 2 * t[b].item()), math.cos(math.pi / 2 * t[b].item())
        for c in range(2):
            x_t = a * x0[b, c].item() + s * noise[b, c].item()
            u = math.pi / 2 * (s * x0[b, c].item() - a * noise[b, c].item())
            total += (0.5 * x_t + 1.0 - u) ** 2
    assert fm.training_loss(model, x0, None, noise, t).item() == pytest.approx(total / 6, rel=1e-6)
    assert torch.equal(seen[0], t)  # the network sees continuous t, 1 = data
    # random t
    loss = fm.training_loss(lambda x, t, y: torch.zeros_like(x), torch.randn(4, 3, 2, 2), None)
    assert loss.ndim == 0 and loss > 0
    # the optimal velocity beats zero
    x0 = MU.float() + S * torch.randn(4096, 4)
    assert fm.training_loss(flow_model(MU, S), x0,
                            None) < 0.5 * fm.training_loss(lambda x, t, y: 0 * x, x0, None)


@pytest.mark.parametrize("sampler,steps,tol_mean,tol_std", [
    ("heun", 50, 1e-3, 2e-3), ("euler", 100, 0.02, 5e-3), ("dpm++", 25, 1e-5, 0.01),
    ("dpm++", 10, 1e-5, 0.03), ("ddim", 50, 1e-5, 0.03)])
def test_flow_known_answer(sampler, steps, tol_mean, tol_std):
    z = torch.randn(20000, 4, generator=torch.Generator().manual_seed(13))
    # t = 0 is exactly N(0, I): no prior mismatch to isolate, as on the VP grid
    z = (z - z.mean(0)) / z.std(0)
    x = FlowMatching().sample(flow_model(MU, S), z, sampler=sampler, steps=steps)
    assert x.shape == z.shape and x.dtype == z.dtype
    # measured: |mean error| heun 2e-4, euler 0.014, dpm++ / ddim 1e-7 (their first step is exact at
    # t = 0); std error heun +0.01%, euler -0.08%, dpm++ +0.35% (10 steps: -2.0%; -6.0% with
    # lower_order_final), ddim -2.6%
    assert (x.mean(0).double() - MU).abs().max() < tol_mean
    assert (x.std(0).double() / S - 1).abs().max() < tol_std


def test_flow_heun_is_second_order():
    z = torch.randn(512, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(14))
    fm = FlowMatching()
    ref = fm.sample(flow_model(MU, S), z, sampler="heun", steps=400)
    err = lambda k: (fm.sample(flow_model(MU, S), z, sampler="heun",
                               steps=k) - ref).abs().max().item()
    assert 3.5 < err(10) / err(20) < 4.5  # halving h quarters the error


def test_flow_cfg_and_calls():
    mus = torch.tensor([[1.5, -0.5], [-2.0, 0.7], [0.0, 0.0]], dtype=torch.float64)  # row 2 = null
    base, calls = flow_model(mus, S), []

    def model(x, t, y):
        calls.append((x.shape[0], t[0].item()))
        return base(x, t, y)

    fm, x, y = FlowMatching(), torch.randn(6, 2, dtype=torch.float64), torch.tensor([0, 1, 0, 1, 0, 1])
    # one Euler step from t = 0 to 1 is x + u(x, 0): the guided velocity itself
    u_c, u_u = base(x, torch.zeros(6), y), base(x, torch.zeros(6), torch.full_like(y, 2))
    out = fm.sample(model, x, y, sampler="euler", steps=1, cfg_scale=2.5, null_label=2)
    assert calls == [(12, 0.0)] and torch.allclose(out, x + u_u + 2.5 * (u_c - u_u))
    calls.clear()
    # 2 evaluations a step, the last at t = 1; w = 1: no doubling
    fm.sample(model, x, y, sampler="heun", steps=4)
    assert [t for _, t in calls] == [0, 0.25, 0.25, 0.5, 0.5, 0.75, 0.75,
                                     1.0] and {b for b, _ in calls} == {6}
    for sampler in ("dpm++", "ddim"):  # one evaluation a step, never at t = 1
        calls.clear()
        fm.sample(model, x, y, sampler=sampler, steps=4)
        assert [t for _, t in calls] == [0, 0.25, 0.5, 0.75]
    with pytest.raises(ValueError, match="heun"):
        fm.sample(model, x, sampler="ddpm")
    with pytest.raises(ValueError, match="null_label"):
        fm.sample(model, x, y, cfg_scale=2.0)


# --------------------------------------------------------------------------- x0 clipping

def test_threshold_x0_clip_and_dynamic_percentile():
    g = torch.Generator().manual_seed(10)
    x = torch.empty(3, 1, 20, 20, dtype=torch.float64)  # 400 values a sample
    x[0] = torch.rand(1, 20, 20, generator=g, dtype=torch.float64) * 1.8 - 0.9  # inside [-1, 1]
    x[1] = torch.rand(1, 20, 20, generator=g, dtype=torch.float64) * 6 - 3      # overshoots
    x[2] = x[0].clone()
    x[2, 0, 0, :2] = torch.tensor([-5.0, 7.0])  # 2 outliers of 400: above the 99.5% quantile
    assert torch.equal(threshold_x0(x, "clip"), x.clamp(-1, 1))
    assert threshold_x0(x, "none") is x
    out = threshold_x0(x, "dynamic")
    # per sample: one sample's overshoot leaves the others alone
    assert torch.equal(out[0], x[0])
    # sample 1: s = the 99.5% quantile of |x| (numpy's, linear interpolation), clamp to [-s, s], / s
    s = float(np.quantile(x[1].abs().numpy(), 0.995))
    assert s > 2.9 and torch.allclose(out[1], x[1].clamp(-s, s) / s, rtol=0, atol=1e-12)
    # the 2 values above the quantile (positions 398, 399 of 0..399 > 397.005) end at exactly +-1
    assert out[1].abs().max() == 1 and (out[1].abs() == 1).sum() == 2
    # sample 2: its quantile is below 1, so s = 1 and thresholding is plain clipping
    assert torch.equal(out[2], x[2].clamp(-1, 1))
    with pytest.raises(ValueError, match="unknown x0 clipping 'clamp'"):
        threshold_x0(x, "clamp")


def test_x0_clip_one_ddpm_chain_by_hand():
    """Two DDPM steps with clipping, written out: the posterior mean is formed from the clipped x0
    (ADM's clip_denoised), and the last step returns the clipped x0 itself."""
    d = GaussianDiffusion("linear")
    model = lambda x, t, y: 0.5 * x  # any eps; x0_hat = (x - sigma eps) / alpha then overshoots
    noise = torch.randn(16, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    out = d.sample(model, noise, sampler="ddpm", steps=2, x0_clip="clip",
                   generator=torch.Generator().manual_seed(12))
    a_t, a_s = d.alphas_cumprod[999].item(), d.alphas_cumprod[0].item()
    x0 = ((noise - math.sqrt(1 - a_t) * 0.5 * noise) / math.sqrt(a_t)).clamp(-1, 1)
    assert (x0.abs() == 1).float().mean() > 0.5  # clipping matters here
    beta = 1 - a_t / a_s
    mean = (math.sqrt(a_s) * beta / (1 - a_t) * x0
            + math.sqrt(1 - beta) * (1 - a_s) / (1 - a_t) * noise)
    z = torch.randn(noise.shape, generator=torch.Generator().manual_seed(12), dtype=noise.dtype)
    x = mean + math.sqrt(beta * (1 - a_s) / (1 - a_t)) * z
    expected = ((x - math.sqrt(1 - a_s) * 0.5 * x) / math.sqrt(a_s)).clamp(-1, 1)
    assert torch.allclose(out, expected, rtol=0, atol=1e-12)
    unclipped = d.sample(model, noise, sampler="ddpm", steps=2,
                         generator=torch.Generator().manual_seed(12))
    assert unclipped.abs().max() > 2


@pytest.mark.parametrize("mode", ["clip", "dynamic"])
def test_x0_clip_keeps_ddim_equal_to_dpmpp_first_order(mode):
    """DDIM with clipping re-derives eps from the clipped x0 (ADM's ddim_sample); only then is it
    still first-order DPM-Solver++ on the clipped data prediction, step by step."""
    d = GaussianDiffusion("scaled_linear", time_offset=1)
    # MU holds 2.0: outside [-1, 1], so clipping changes the samples
    denoise, abar = d.denoiser(gaussian_model(d, MU, S), d.timesteps(20), x0_clip=mode)
    noise = torch.randn(64, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(13))
    seen = {"ddim": [], "dpm": []}
    recording = lambda name: recorded(denoise, seen[name])

    a = ddim_sample(recording("ddim"), noise, abar)
    b = dpmpp_2m_sample(recording("dpm"), noise, abar, order=1)
    for xa, xb in zip(seen["ddim"], seen["dpm"]):
        assert torch.allclose(xa, xb, rtol=1e-10, atol=1e-10)
    assert torch.allclose(a, b, rtol=1e-10, atol=1e-10)
    # the last step returns the thresholded x0: inside [-1, 1]; unclipped, the data's 2.0 is kept
    assert a.abs().max() <= 1 + 1e-12
    assert d.sample(gaussian_model(d, MU, S), noise, sampler="ddim", steps=20)[:, 2].mean() > 1.5


def test_x0_clip_default_none_and_where_it_applies():
    d, fm = GaussianDiffusion("linear"), FlowMatching()
    noise = torch.randn(32, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(14))
    model = gaussian_model(d, MU, S)
    for sampler in ("ddpm", "dpm++", "ddim"):  # unchanged, bit for bit, unless asked
        run = lambda **kw: d.sample(model, noise, sampler=sampler, steps=10,
                                    generator=torch.Generator().manual_seed(15), **kw)
        assert torch.equal(run(), run(x0_clip="none"))
        assert not torch.equal(run(), run(x0_clip="clip"))
    velocity = flow_model(MU[None], S)
    y = torch.zeros(32, dtype=torch.long)
    for sampler in ("dpm++", "ddim"):
        plain = fm.sample(velocity, noise, y, sampler=sampler, steps=10)
        assert torch.equal(plain, fm.sample(velocity, noise, y, sampler=sampler, steps=10,
                                            x0_clip="none"))
        clipped = fm.sample(velocity, noise, y, sampler=sampler, steps=10, x0_clip="dynamic")
        assert plain.abs().max() > 1.5 and clipped.abs().max() <= 1 + 1e-12
    with pytest.raises(ValueError, match="sampler 'heun' integrates the velocity itself"):
        fm.sample(velocity, noise, y, sampler="heun", x0_clip="clip")
    with pytest.raises(ValueError, match="unknown x0 clipping 'max'"):
        d.sample(model, noise, x0_clip="max")


# --------------------------------------------------------------------------- create_diffusion

def test_create_diffusion():
    class Eps:
        objective, schedule, time_offset = "eps", "scaled_linear", 1

    class Dit:
        objective, schedule = "eps", "linear"

    class Flow:
        objective = "flow"

    d = create_diffusion(Eps)
    assert isinstance(d, GaussianDiffusion) and d.time_offset == 1
    assert torch.equal(d.betas, get_betas("scaled_linear"))
    # an instance works too; overrides go to the constructor
    d = create_diffusion(Dit(), num_steps=250)
    assert d.time_offset == 0 and d.num_steps == 250 and torch.equal(d.betas, get_betas("linear", 250))
    assert isinstance(create_diffusion(Flow), FlowMatching)
    for bad in (type("Bad", (), {"objective": "v"}), object):
        with pytest.raises(ValueError, match="objective"):
            create_diffusion(bad)
    for obj in (GaussianDiffusion(), FlowMatching()):
        assert obj.default_sampler in obj.samplers and set(obj.samplers) <= set(SAMPLERS)
    assert set(GaussianDiffusion.samplers) | set(FlowMatching.samplers) == set(SAMPLERS)


# --------------------------------------------------------------------------- Upsample Guidance

def test_ug_level_hand_computed():
    d = GaussianDiffusion("linear")
    abar = [1.0]
    for i in range(1000):  # abar_t = prod_{i <= t} (1 - beta_i), beta linear 1e-4 .. 0.02
        abar.append(abar[-1] * (1 - (1e-4 + i * (0.02 - 1e-4) / 999)))
    abar = abar[1:]
    for t, m in [(800, 2), (999, 3), (700, 2)]:
        target = m * m * abar[t] / (1 - abar[t])
        tau = min(range(1000), key=lambda n: abs(abar[n] / (1 - abar[n]) - target))
        P, tau_d = d.ug_level(t, m)
        assert P == pytest.approx(abar[t] + (1 - abar[t]) / m ** 2, rel=1e-12) and tau_d == tau
    # pinned: 4 SNR(800) = 4 x 0.00151 = 0.00604; SNR(709) = 0.00608
    assert d.ug_level(800, 2)[1] == 709
    P, _ = d.ug_level(999, 2)
    assert P == pytest.approx(0.25 + 0.75 * abar[999], rel=1e-9)


def test_ug_theta_zero_and_active_steps():
    d = GaussianDiffusion("linear")
    lo_calls = []

    def model(x, t, y):  # eps of i.i.d. Gaussian data; records the low-resolution calls
        if x.shape[-1] == 4:
            lo_calls.append((x.shape[0], t[0].item()))
        return gaussian_model(d, MU[:1], S)(x.reshape(-1, 1), t.repeat_interleave(x[0].numel()),
                                            None).reshape(x.shape)

    y, noise = torch.tensor([0, 1]), torch.randn(2, 3, 8, 8,
                                                 generator=torch.Generator().manual_seed(15))
    for sampler in ("ddpm", "ddim", "dpm++"):
        run = lambda ug: d.sample(model, noise, y, sampler=sampler, steps=50, cfg_scale=2.0,
                                  null_label=5,
                                  generator=torch.Generator().manual_seed(16), upsample_guidance=ug)
        assert torch.equal(run(None), run(UpsampleGuidance(m=2, theta=0.0)))
        assert not lo_calls
        out = run(UpsampleGuidance(m=2))
        assert out.shape == noise.shape and not torch.equal(out, run(None))
        # active in the noisiest 30%: respaced steps with t / 999 >= 0.7, i.e. 15 of 50, each with a
        # CFG batch
        active = [t for t in d.timesteps(50) if t >= 699.3]
        assert len(active) == 15 and len(lo_calls) == 15
        assert lo_calls == [(4, d.ug_level(t, 2)[1]) for t in active]
        lo_calls.clear()
    with pytest.raises(ValueError, match="divisible"):
        d.sample(model, torch.randn(1, 3, 6, 6), upsample_guidance=UpsampleGuidance(m=4))


def test_ug_leaves_a_scale_consistent_model_unchanged():
    """Data constant on 2x2 blocks, with N(mu, s^2) i.i.d. blocks, and each resolution's optimal eps
    predictor: average pooling a high-resolution sample gives exactly a low-resolution one, so
    eps_lo / m = avgpool(eps_hi) and the guidance term vanishes, provided tau hits SNR m^2 SNR(t)
    exactly. A schedule whose log-SNR falls by log 4 / 10 a step makes tau = t - 10 exact."""
    N, m, mu, s = 100, 2, 0.4, 0.8
    d = GaussianDiffusion("linear", N)
    d.alphas_cumprod = torch.sigmoid(8 - torch.arange(N, dtype=torch.float64)
                                     * math.log(m * m) / 10)
    assert d.ug_level(80, m)[1] == 70

    # optimal eps for data constant on k x k blocks: k = 2 at 8x8, 1 at 4x4
    def model(x, t, y, iid=False):
        k = 1 if x.shape[-1] == 4 or iid else m
        a = d.alphas_cumprod[t].to(x.dtype).view(-1, 1, 1, 1)
        b = F.interpolate(F.avg_pool2d(x, k), scale_factor=k, mode="nearest")  # block means
        return (x - b) / (1 - a).sqrt() + (1 - a).sqrt() * (b - a.sqrt()
                                                            * mu) / (k * k * a * s * s + 1 - a)

    noise = torch.randn(16, 2, 8, 8, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(17))
    for sampler in ("ddpm", "ddim", "dpm++"):
        run = lambda f, ug: d.sample(f, noise, sampler=sampler, steps=25, upsample_guidance=ug,
                                     generator=torch.Generator().manual_seed(18))
        plain = run(model, None)
        assert torch.allclose(run(model, UpsampleGuidance(m=m)), plain, rtol=0, atol=1e-10)
        # control: the i.i.d. predictor at 8x8 is not consistent with the 4x4 one, and UG moves its
        # samples
        iid = lambda x, t, y: model(x, t, y, iid=x.shape[-1] == 8)
        assert not torch.allclose(run(iid, UpsampleGuidance(m=m)), run(iid, None), atol=1e-3)


def test_ug_term_matches_direct_computation_on_a_tiny_model():
    # Inside the window the guided eps equals eps_hi + up_m(eps_lo / m - avgpool_m(eps_hi)) computed
    # by hand with a real (tiny) DiM; outside it the guidance term is exactly zero.
    import dim
    torch.manual_seed(0)
    model = dim.DiM_T_2(input_size=8, in_channels=1, num_classes=0).eval()
    d = GaussianDiffusion("scaled_linear", time_offset=1)
    x = torch.randn(2, 1, 16, 16)
    ts = d.timesteps(10)
    plain, _ = d.denoiser(model, ts)
    guided, abar = d.denoiser(model, ts, upsample_guidance=UpsampleGuidance(m=2))
    with torch.no_grad():
        for i, t in enumerate(ts):
            _, eps_plain, _ = plain(x, i)
            _, eps_guided, _ = guided(x, i)
            if t / 999 < 0.7:
                assert torch.equal(eps_guided, eps_plain)
                continue
            P, tau = d.ug_level(t, 2)
            eps_lo = model(F.avg_pool2d(x, 2) / math.sqrt(P), torch.full((2,), tau + 1), None)
            expected = eps_plain + F.interpolate(eps_lo / 2 - F.avg_pool2d(eps_plain, 2),
                                                 scale_factor=2, mode="nearest")
            assert torch.allclose(eps_guided, expected, atol=1e-6)
            assert not torch.allclose(eps_guided, eps_plain, atol=1e-4)


def test_flow_ug_level_closed_form():
    # tau has exactly m^2 times the SNR of t on the GVP path (SNR = tan^2(pi t / 2)); P rescales the
    # pooled input.
    f = FlowMatching()
    for t, m in [(0.1, 2), (0.25, 3), (0.3, 2), (0.6, 4)]:
        P, tau = f.ug_level(t, m)
        snr = lambda u: math.tan(math.pi / 2 * u) ** 2
        assert snr(tau) == pytest.approx(m * m * snr(t), rel=1e-9) and t < tau < 1
        a = math.sin(math.pi / 2 * t) ** 2
        assert P == pytest.approx(a + (1 - a) / m ** 2, rel=1e-12)


def block_flow_model(m, mu, s, iid_at=None):
    """Optimal GVP velocity for images made of k x k blocks with i.i.d. N(mu, s^2) values: k = m at
    8x8 (the 'high resolution'), 1 at 4x4; iid_at=8 makes the 8x8 predictor pixel-i.i.d. (k = 1)
    instead."""
    def model(x, t, y):
        k = 1 if x.shape[-1] == 4 or x.shape[-1] == iid_at else m
        a, s_ = (v.to(x.dtype).view(-1, 1, 1, 1) for v in (torch.sin(math.pi / 2 * t),
                                                           torch.cos(math.pi / 2 * t)))
        # block means: a B + s_ noise / k
        b = F.interpolate(F.avg_pool2d(x, k), scale_factor=k, mode="nearest")
        # E[B | block mean]
        x0 = mu + a * s * s * (b - a * mu) / (a * a * s * s + s_ * s_ / (k * k))
        eps = (x - a * x0) / s_
        return (math.pi / 2) * (s_ * x0 - a * eps)
    return model


def test_flow_ug_leaves_a_scale_consistent_model_unchanged():
    # The flow version of the test above, through the VP form: with the exact (closed-form) tau, the
    # optimal 4x4 prediction at tau is the pooled 8x8 one, so Upsample Guidance changes nothing; it
    # does move the samples of a predictor that is not consistent across scales.
    f, m = FlowMatching(), 2
    noise = torch.randn(16, 2, 8, 8, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(19))
    for sampler in ("dpm++", "ddim"):
        run = lambda model, ug: f.sample(model, noise, sampler=sampler, steps=25,
                                         upsample_guidance=ug)
        consistent = block_flow_model(m, 0.4, 0.8)
        plain = run(consistent, None)
        assert torch.allclose(run(consistent, UpsampleGuidance(m=m)), plain, rtol=0, atol=1e-10)
        iid = block_flow_model(m, 0.4, 0.8, iid_at=8)
        assert not torch.allclose(run(iid, UpsampleGuidance(m=m)), run(iid, None), atol=1e-3)


def test_flow_ug_theta_zero_and_active_steps():
    f = FlowMatching()
    calls = []

    def model(x, t, y):
        calls.append((x.shape[-1], x.shape[0], t[0].item()))
        return block_flow_model(2, 0.4, 0.8, iid_at=8)(x, t, y)

    noise = torch.randn(2, 1, 8, 8, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(20))
    y = torch.tensor([0, 1])
    for sampler in ("dpm++", "heun"):
        run = lambda ug: f.sample(model, noise, y, sampler=sampler, steps=20, cfg_scale=2.0,
                                  null_label=5, upsample_guidance=ug)
        assert torch.equal(run(None), run(UpsampleGuidance(m=2, theta=0.0)))
        calls.clear()
        run(UpsampleGuidance(m=2, eta=0.3))
        lo = [t for side, batch, t in calls if side == 4]
        hi = [t for side, batch, t in calls if side == 8]
        assert all(batch == 4 for _, batch, _ in calls)  # CFG doubles the batch at both resolutions
        # one low-resolution call per high-resolution call at 0 < t <= 0.3, each at tau(t)
        assert lo == [pytest.approx(f.ug_level(t, 2)[1], abs=1e-6) for t in hi if 0 < t <= 0.3]
        # t = 0.05 .. 0.25 (0.3 rounds up); heun: both ends
        assert len(lo) == (5 if sampler == "dpm++" else 10)
        calls.clear()
    with pytest.raises(ValueError, match="divisible"):
        f.sample(model, torch.randn(1, 1, 6, 6), sampler="ddim", steps=4,
                 upsample_guidance=UpsampleGuidance(m=4))


def test_flow_ug_term_matches_direct_computation_on_a_tiny_model():
    # One Euler step from t = 0.2 (init + strength) exposes the guided velocity; by hand: eps from
    # the velocity at both resolutions (the GVP conversion), eps + up(eps_lo / m - avgpool(eps)),
    # back to a velocity with x_t fixed.
    import dimsum
    torch.manual_seed(0)
    model = dimsum.DiMSUM_T_2(input_size=8, in_channels=1, num_classes=0).eval()
    f, t = FlowMatching(), 0.2
    init, noise = torch.randn(2, 1, 16, 16), torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        out = f.sample(model, noise, sampler="euler", steps=1, init=init, strength=1 - t,
                       upsample_guidance=UpsampleGuidance(m=2))
        a, s = math.sin(math.pi / 2 * t), math.cos(math.pi / 2 * t)
        x = a * init + s * noise
        u_guided = (out - x) / (1 - t)
        u = model(x, torch.full((2,), t), None)
        P, tau = f.ug_level(t, 2)
        x_lo = F.avg_pool2d(x, 2) / math.sqrt(P)
        u_lo = model(x_lo, torch.full((2,), tau), None)
        a_lo, s_lo = math.sin(math.pi / 2 * tau), math.cos(math.pi / 2 * tau)
        eps = s * x - (2 / math.pi) * a * u
        eps_lo = s_lo * x_lo - (2 / math.pi) * a_lo * u_lo
        eps_g = eps + F.interpolate(eps_lo / 2 - F.avg_pool2d(eps, 2), scale_factor=2,
                                    mode="nearest")
        expected = (math.pi / 2) * (s * x - eps_g) / a
        assert torch.allclose(u_guided, expected, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(u_guided, u, atol=1e-2)
