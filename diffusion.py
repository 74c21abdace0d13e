"""
Training objectives and samplers for the diffusion models, in one file: discrete-time Gaussian
diffusion (DDPM, epsilon prediction, optional learned variance) and flow matching on the GVP path
(velocity prediction).

Papers: DDPM (Ho et al. 2020), IDDPM (Nichol & Dhariwal 2021, respacing, learned-range variance,
hybrid loss), DDIM (Song et al. 2021), DPM-Solver++ (Lu et al. 2022, arXiv 2211.01095, multistep
2M), classifier-free guidance (Ho & Salimans 2022), SiT (Ma et al. 2024, GVP interpolant) as used by
DiMSUM, Upsample Guidance (Hwang et al. 2024, arXiv 2404.01709) as used by DiM, x0 clipping (ADM,
Dhariwal & Nichol 2021) and dynamic thresholding (Imagen, Saharia et al. 2022, Sec. 2.3) for
pixel-space models. Conventions follow DiT's `diffusion/` (0-based step index t in {0..N-1}); each
formula below cites its paper (section, equation).

Layout:
  schedules       get_betas, respaced_timesteps
  x0 clipping     threshold_x0 (clip, dynamic thresholding), clip_prediction
  samplers        ddpm_sample, ddim_sample, dpmpp_2m_sample: plain functions of a denoiser closure;
                  flow_ode_sample (Euler / Heun) of a velocity closure
  losses          normal_kl, discretized_gaussian_nll (IDDPM's L_vb pieces)
  GaussianDiffusion  q_sample, training_loss (+ vb_bpd), denoiser (network + CFG + Upsample Guidance), sample
  FlowMatching    the same interface for the GVP path; its dpm++ / ddim reuse the samplers above
  create_diffusion   the objective a model class asks for (class attributes objective, schedule, time_offset)

The samplers never see the network. They take `denoise(x, i) -> (x0_hat, eps_hat, var_frac)` and a
float64 grid `abar` of K + 1 cumulative signal fractions (abar[i] = alpha_i^2, sigma_i^2 = 1 -
abar[i]; abar[K] = 1 is clean data), and step grid point i -> i + 1. Any variance-preserving
parameterisation plugs in by supplying another closure: velocity prediction on the GVP flow path
converts u_hat to (x0_hat, eps_hat) (exact on SiT's GVP path) with abar = sin^2(pi t / 2), and
Upsample Guidance (Hwang et al. 2024, Sec. 3) only changes eps_hat inside the closure. So does x0
clipping (clip_prediction): x0_hat is clipped and eps_hat re-derived from it, so every sampler that
works on (x0_hat, eps_hat) gets it.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


# every name some objective accepts (CLI choices)
SAMPLERS = ("ddpm", "ddim", "dpm++", "euler", "heun")
# what happens to x0_hat at every step (clip_prediction); the samplers on (x0_hat, eps_hat) take it
X0_CLIPS = ("none", "clip", "dynamic")
CLIPPING_SAMPLERS = ("ddpm", "ddim", "dpm++")
# Imagen's percentile p of |x0_hat| (Saharia et al. 2022, Sec. 2.3; DPM-Solver's
# dynamic_thresholding_ratio 0.995, Lu et al. 2022, Sec. 5)
DYNAMIC_PERCENTILE = 0.995


#################################################################################
#                                   Schedules                                   #
#################################################################################

def get_betas(schedule: str, num_steps: int = 1000) -> torch.Tensor:
    """Per-step noise variances beta_t, t = 0..N-1, float64 (linear: DDPM Sec. 4; scaled-linear:
    LDM, Stable Diffusion's, which DiM trains with)."""
    if schedule == "linear":
        # DiT / ADM: 1e-4 .. 0.02 for N = 1000; scaling by 1000/N keeps abar_{N-1} about the same
        # for other N.
        scale = 1000 / num_steps
        return torch.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=torch.float64)
    if schedule == "scaled_linear":
        # Stable Diffusion / DiM ImageNet: sqrt(beta) is linear, not beta.
        return torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, num_steps, dtype=torch.float64) ** 2
    raise ValueError(f"unknown beta schedule {schedule!r}; choose 'linear' or 'scaled_linear'")


def respaced_timesteps(num_steps: int, steps: int) -> list[int]:
    """DiT's `space_timesteps(N, "K")`: K indices evenly strided over 0..N-1 with rounding,
    ascending.

    One deviation: K = 1 keeps index N-1 (pure noise) where DiT keeps 0, so a one-step sampler still
    denoises.
    """
    if steps == 1:
        return [num_steps - 1]
    stride = (num_steps - 1) / (steps - 1)
    # Python's round, as DiT; always hits 0 and N-1
    return [round(i * stride) for i in range(steps)]


def threshold_x0(x0, mode, percentile=DYNAMIC_PERCENTILE):
    """x0_hat (B, ...) brought into the data range [-1, 1] of pixel-space models.

    'clip': clamp to [-1, 1], as ADM's p_mean_variance(clip_denoised=True) (Dhariwal & Nichol 2021)
    and DDPM's sampler do. 'dynamic': Imagen's dynamic thresholding (Saharia et al. 2022, Sec. 2.3),
    as DPM-Solver++ proposes for pixel space (Lu et al. 2022, Sec. 5): per sample, s = the
    `percentile` quantile of |x0_hat| (linear interpolation, as torch.quantile), s = max(s, 1), then
    clamp to [-s, s] and divide by s. Where the prediction overshoots, large guidance scales
    especially, this shrinks it back into range instead of saturating every pixel beyond 1.
    'none': unchanged (latents are unbounded).
    """
    if mode == "none":
        return x0
    if mode == "clip":
        return x0.clamp(-1, 1)
    if mode != "dynamic":
        raise ValueError(f"unknown x0 clipping {mode!r}; choose one of {X0_CLIPS}")
    # sorted per sample, then torch.quantile's interpolation by hand: torch.quantile refuses inputs
    # of more than 2^24 elements (a batch of 512 px RGB images). a: (B, n), at least fp32
    a = x0.abs().flatten(1).to(torch.promote_types(x0.dtype, torch.float32)).sort(dim=1).values
    pos = percentile * (a.shape[1] - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, a.shape[1] - 1)
    s = (a[:, lo] + (pos - lo) * (a[:, hi] - a[:, lo])).clamp(min=1)
    s = s.to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))  # (B, 1, ..., 1)
    return torch.minimum(torch.maximum(x0, -s), s) / s


def clip_prediction(x, x0, eps, alpha, sigma, mode):
    """(x0_hat, eps_hat) at x_t = alpha x0 + sigma eps with x0_hat thresholded (threshold_x0) and
    eps_hat re-derived from it, so the pair still explains x_t: ADM's DDIM step does this
    (_predict_eps_from_xstart on the clipped x0), and it keeps DDIM equal to first-order
    DPM-Solver++ with clipping on. The DDPM posterior mean and DPM-Solver++ read x0_hat only.
    sigma > 0 (every grid point but the clean end)."""
    if mode == "none":
        return x0, eps
    x0 = threshold_x0(x0, mode)
    return x0, (x - alpha * x0) / sigma


def ddpm_sample(denoise, x, abar, generator=None):
    """Ancestral sampling from the Gaussian posterior q(x_s | x_t, x0_hat) on a respaced grid (DDPM eqs. 6-7;
    respacing: IDDPM Sec. 4)."""
    K = len(abar) - 1
    for i in range(K):
        x0, _, var_frac = denoise(x, i)
        a_t, a_s = abar[i].item(), abar[i + 1].item()
        # respaced beta' (IDDPM §4): the step t -> s as if it were one DDPM step
        beta = 1 - a_t / a_s
        mean = (math.sqrt(a_s) * beta / (1 - a_t)) * x0 + (math.sqrt(1 - beta)
                                                           * (1 - a_s) / (1 - a_t)) * x
        if i == K - 1:  # last step: posterior variance is 0, return the mean (DiT's nonzero_mask)
            x = mean
            break
        post_var = beta * (1 - a_s) / (1 - a_t)  # beta-tilde
        if var_frac is None:  # fixed small variance
            std = math.sqrt(post_var)
        else:  # learned range (IDDPM eq. 15): interpolate log-variance between beta-tilde and beta
            std = torch.exp(0.5 * (var_frac * math.log(beta) + (1 - var_frac) * math.log(post_var)))
        z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = mean + std * z
    return x


def ddim_sample(denoise, x, abar, eta=0.0, generator=None):
    """DDIM (Song et al. 2021, eq. 12): re-noise x0_hat to the next level with the predicted eps;
    eta = 0 is deterministic."""
    K = len(abar) - 1
    for i in range(K):
        x0, eps, _ = denoise(x, i)
        a_t, a_s = abar[i].item(), abar[i + 1].item()
        # eta * sigma_DDIM, 0 at the last step
        c = eta * math.sqrt((1 - a_s) / (1 - a_t) * (1 - a_t / a_s))
        x = math.sqrt(a_s) * x0 + math.sqrt(max(1 - a_s - c * c, 0.0)) * eps
        if c > 0:
            x = x + c * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x


def dpmpp_2m_sample(denoise, x, abar, order=2, lower_order_final=True):
    """DPM-Solver++ 2M: multistep, data prediction, exponential integrator in lambda =
    log(alpha/sigma) (Lu et al. 2022, Alg. 2).

    First order (= DDIM) where the 2M extrapolation is unavailable or unsafe: the first step (no
    history), the last step to sigma = 0 (lambda = inf; it returns the final x0_hat, as diffusers'
    final_sigmas_type="zero") and, with lower_order_final, the step into the last discrete timestep
    t = 0. On the time-uniform grid that step is a large jump in lambda (linear betas: lambda_0 =
    4.6, several times the previous step), so r = h_prev / h is small and the correction D = m0 +
    (m0 - m1) / (2r) overshoots. Measured on Gaussian data (test_diffusion.py), linear betas, 20
    steps: sample std +18% with a second-order step there, -1.5% without. DPM-Solver's own
    lower_order_final does this only below 10 steps; we always do. order=1 gives DPM-Solver++(1),
    which equals DDIM with eta = 0.
    """
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order!r}")
    K = len(abar) - 1
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    lam = alpha.log() - sigma.log()  # (K+1,), lam[K] = inf
    x0_prev = None
    for i in range(K):
        x0, _, _ = denoise(x, i)
        h = (lam[i + 1] - lam[i]).item()
        if order == 1 or x0_prev is None or i >= K - (2 if lower_order_final else 1):
            d = x0
        # linear extrapolation of the last two data predictions in lambda (the "2M" correction)
        else:
            r = (lam[i] - lam[i - 1]).item() / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
        # x_s = (sigma_s / sigma_t) x_t - alpha_s (e^{-h} - 1) D; at sigma_s = 0 this is exactly D
        x = (sigma[i + 1] / sigma[i]).item() * x - (alpha[i + 1].item() * math.expm1(-h)) * d
        x0_prev = x0
    return x


def flow_ode_sample(velocity, x, ts, order=2):
    """Fixed-step ODE solver for dx/dt = velocity(x, t) over the float64 grid ts (K+1,): Euler
    (order 1) or Heun (order 2, the trapezoidal corrector of EDM Alg. 1; 2 evaluations per step, the
    last one at ts[K])."""
    for i in range(len(ts) - 1):
        t, s = ts[i].item(), ts[i + 1].item()
        u = velocity(x, t)
        if order == 2:  # Heun: average the slopes at both ends of an Euler predictor step
            u = 0.5 * (u + velocity(x + (s - t) * u, s))
        x = x + (s - t) * u
    return x


#################################################################################
#                                    Losses                                     #
#################################################################################

def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per element, in nats; arguments broadcast."""
    return 0.5 * (logvar2 - logvar1 - 1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2
                  * torch.exp(-logvar2))


def discretized_gaussian_nll(x, mean, log_scale):
    """-log P(x) per element, in nats, for data x in [-1, 1] quantised to 256 levels (DDPM §3.3 eq.
    13 decoder).

    P is the Gaussian mass of x's bin of width 2/255; the end bins extend to -inf / +inf. The normal
    CDF is the tanh approximation that DiT / ADM use, so that losses compare with theirs.
    """
    cdf = lambda z: 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z ** 3)))
    inv_std = torch.exp(-log_scale)
    cdf_hi, cdf_lo = cdf(inv_std * (x - mean + 1 / 255)), cdf(inv_std * (x - mean - 1 / 255))
    log_p = torch.where(x < -0.999, cdf_hi.clamp(min=1e-12).log(),
                        torch.where(x > 0.999, (1 - cdf_lo).clamp(min=1e-12).log(),
                                    (cdf_hi - cdf_lo).clamp(min=1e-12).log()))
    return -log_p


def _guided(model, x, t_in, y, cfg_scale, null_label):
    """Network output with classifier-free guidance (Ho & Salimans 2022, eq. 6, whose w is
    U-ViT's s; written here as eps_u + w (eps_c - eps_u)), standard convention: (pred (B, C, ...),
    extra or None).

    pred is the first C channels, guided; extra holds the channels beyond C (learned variance),
    taken unguided from the conditional half as DiT does. All prediction channels are guided (DiT
    guides 3 of 4 for exact reproducibility of its FID; add that as an option when needed). The
    guidance is affine in the prediction, so guiding eps, x0 or the GVP velocity gives the same
    sample (each is affine in the prediction at fixed x_t).
    """
    B, C = x.shape[:2]
    if y is None or cfg_scale == 1:
        out = model(x, t_in, y)  # no guidance: one plain forward, no doubled batch
        return out[:, :C], (out[:, C:] if out.shape[1] > C else None)
    if null_label is None:
        raise ValueError("cfg_scale != 1 needs null_label (the class id the network was trained to "
                         "treat as 'no class')")
    # [cond; uncond] in one forward: one big batch beats two small ones on a GPU
    out = model(torch.cat([x, x]), torch.cat([t_in, t_in]),
                torch.cat([y, torch.full_like(y, null_label)]))
    cond, uncond = out[:B], out[B:]  # (B, C or 2C, ...)
    return uncond[:, :C] + cfg_scale * (cond[:, :C]
                                        - uncond[:, :C]), (cond[:, C:] if out.shape[1] > C
                                                           else None)


def _check_steps(steps, most):
    if not isinstance(steps, int) or not 1 <= steps <= most:
        raise ValueError(f"steps must be an int in [1, {most}], got {steps!r}")


def _check_x0_clip(x0_clip, sampler):
    if x0_clip not in X0_CLIPS:
        raise ValueError(f"unknown x0 clipping {x0_clip!r}; choose one of {X0_CLIPS}")
    if x0_clip != "none" and sampler not in CLIPPING_SAMPLERS:
        raise ValueError(f"x0 clipping acts on the data prediction; sampler {sampler!r} "
                         "integrates the velocity itself: use one of "
                         f"{', '.join(CLIPPING_SAMPLERS)} or x0 clipping 'none'")


#################################################################################
#                               Gaussian diffusion                              #
#################################################################################

@dataclass
class UpsampleGuidance:
    """Upsample Guidance (Hwang et al. 2024, arXiv 2404.01709, Sec. 3) for sampling at m times the
    training resolution: m integer ratio, theta the weight, eta the noisiest fraction of the
    schedule where it is active (the paper's and DiM's 1.0 and 0.3)."""
    m: int
    theta: float = 1.0
    eta: float = 0.3

    def low_res_input(self, x, P):
        """avgpool_m(x_t) / sqrt(P): the unit-variance low-resolution input (P from the objective's
        ug_level)."""
        if x.ndim != 4 or x.shape[2] % self.m or x.shape[3] % self.m:
            raise ValueError("Upsample Guidance needs (B, C, H, W) with H, W divisible by m = "
                             f"{self.m}")
        return F.avg_pool2d(x, self.m) / math.sqrt(P)

    def correction(self, eps, eps_lo):
        """theta up_m(eps_lo / m - avgpool_m(eps)), added to the high-resolution eps; eps_lo / m is
        on the scale of the average-pooled high-resolution noise."""
        m = self.m
        return self.theta * F.interpolate(eps_lo / m - F.avg_pool2d(eps, m), scale_factor=m,
                                          mode="nearest")


class GaussianDiffusion:
    """Discrete-time DDPM, epsilon prediction. Index t in {0..N-1} (0-based, DiT convention); the
    network is called with t + time_offset (DiM/U-ViT networks were trained on n in {1..N}:
    time_offset=1)."""
    objective = "eps"
    samplers = ("ddpm", "ddim", "dpm++")
    default_sampler = "dpm++"  # 25-50 steps; DiT's published numbers use ddpm 250

    def __init__(self, schedule="linear", num_steps=1000, time_offset=0):
        self.num_steps = num_steps
        self.time_offset = time_offset
        # float64 on the CPU; gathered and cast to the data dtype on use (schedule products lose
        # bits in fp32)
        self.betas = get_betas(schedule, num_steps)                       # (N,)
        self.alphas_cumprod = torch.cumprod(1 - self.betas, dim=0)        # (N,) abar_t, decreasing
        self.sqrt_abar = self.alphas_cumprod.sqrt()                       # (N,) alpha_t
        self.sqrt_one_minus_abar = (1 - self.alphas_cumprod).sqrt()       # (N,) sigma_t
        # posterior q(x_{t-1} | x_t, x0) = N(c0 x0 + ct x_t, beta-tilde) (DDPM eqs. 6-7), for L_vb
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        # (N,)
        self.post_c0 = abar_prev.sqrt() * self.betas / (1 - self.alphas_cumprod)
        # (N,)
        self.post_ct = (1 - self.betas).sqrt() * (1 - abar_prev) / (1 - self.alphas_cumprod)
        # (N,), [0] = 0
        post_var = self.betas * (1 - abar_prev) / (1 - self.alphas_cumprod)
        # "clipped": log 0 -> log beta-tilde_1
        self.post_logvar = torch.cat([post_var[1:2], post_var[1:]]).log()
        self.log_betas = self.betas.log()
        self._on_device = {}  # device -> {name: that array there}

    def _extract(self, name, t, x):
        """self.<name>[t] for a batch of indices t (B,), cast to x's dtype and shaped (B, 1, ..., 1)
        to broadcast. The schedule's arrays live on the CPU and are copied to t's device once: a
        copy at every step would be a host-to-device transfer, which a CUDA graph (train.py
        --cuda-graph) cannot hold."""
        there = self._on_device.setdefault(t.device, {})
        if name not in there:
            there[name] = getattr(self, name).to(t.device)
        return there[name][t].to(x.dtype).view(-1, *([1] * (x.ndim - 1)))

    def q_sample(self, x0, t, noise):
        """x_t = alpha_t x0 + sigma_t eps: a draw from q(x_t | x0). x0, noise (B, ...); t (B,) int."""
        return (self._extract("sqrt_abar", t, x0) * x0
                + self._extract("sqrt_one_minus_abar", t, x0) * noise)

    def training_loss(self, model, x0, y, noise=None, t=None):
        """Epsilon MSE (DDPM eq. 14), mean over all dimensions; with 2C outputs (eps, v) plus L_vb
        (vb_bpd), the IDDPM hybrid loss as DiT trains it. x0 (B, C, ...); y (B,) or None.

        IDDPM eq. 16 weights L_vb = sum_t L_t by lambda = 0.001; with t uniform that is N/1000 times
        one L_t, i.e. 1 for N = 1000. DiT's default (loss_type MSE, not RESCALED_MSE) adds one L_t
        unscaled for any N; so do we.
        """
        if t is None:
            t = torch.randint(0, self.num_steps, (x0.shape[0],), device=x0.device)
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = self.q_sample(x0, t, noise)
        # (B, C or 2C, ...); fp32 losses even under bf16 autocast
        out = model(x_t, t + self.time_offset, y).float()
        C = x0.shape[1]
        loss = ((out[:, :C] - noise.float()) ** 2).mean()
        if out.shape[1] == 2 * C:
            # IDDPM §3.1: stop-gradient on the mean, so L_vb trains only the variance and L_simple
            # only eps
            loss = loss + self.vb_bpd(x0.float(), x_t.float(), t, out[:, :C].detach(),
                                      out[:, C:]).mean()
        return loss

    def vb_bpd(self, x0, x_t, t, eps, v):
        """L_t of the variational bound per sample (B,), bits per dimension (IDDPM Sec. 3.1): KL(q(x_{t-1} | x_t, x0) ||
        p(x_{t-1} | x_t)) for t > 0, decoder NLL -log p(x0 | x_1) at t = 0. p has the mean implied by eps and the
        learned-range log-variance f log beta_t + (1 - f) log beta-tilde_t, f = (v + 1) / 2 (IDDPM
        eq. 15)."""
        ex = lambda name: self._extract(name, t, x_t)
        x0_hat = (x_t - ex("sqrt_one_minus_abar") * eps) / ex("sqrt_abar")
        mean = ex("post_c0") * x0_hat + ex("post_ct") * x_t
        frac = (v + 1) / 2
        logvar = frac * ex("log_betas") + (1 - frac) * ex("post_logvar")
        kl = normal_kl(ex("post_c0") * x0 + ex("post_ct") * x_t, ex("post_logvar"), mean, logvar)
        # at t = 0: mean = x0_hat, as c0 = 1, ct = 0
        nll = discretized_gaussian_nll(x0, mean, 0.5 * logvar)
        first = (t == 0).view(-1, *([1] * (x0.ndim - 1)))
        return torch.where(first, nll, kl).flatten(1).mean(1) / math.log(2)

    def predict_eps(self, model, x, t, y=None, cfg_scale=1.0, null_label=None):
        """Network epsilon at step index t (int) with classifier-free guidance (_guided): (eps (B,
        C, ...), extra)."""
        t_in = torch.full((x.shape[0],), t + self.time_offset, device=x.device, dtype=torch.long)
        return _guided(model, x, t_in, y, cfg_scale, null_label)

    def timesteps(self, steps):
        """Sampling grid as step indices, noisiest first: DiT's respaced subsequence, reversed.
        (K,)"""
        _check_steps(steps, self.num_steps)
        return respaced_timesteps(self.num_steps, steps)[::-1]

    def ug_level(self, t, m):
        """Upsample Guidance's low-resolution input (Hwang et al. 2024, Sec. 3) for step index t and
        ratio m: (P, tau).

        Average pooling m x m keeps the signal but divides the noise variance by m^2, so
        avgpool(x_t) / sqrt(P) with P = abar_t + (1 - abar_t) / m^2 has unit variance and SNR m^2
        SNR(t); tau is the step whose SNR is nearest to that (absolute difference in SNR, as DiM's
        get_tau).
        """
        a = self.alphas_cumprod[t].item()
        snr = self.alphas_cumprod / (1 - self.alphas_cumprod)
        return a + (1 - a) / m ** 2, (snr - m * m * a / (1 - a)).abs().argmin().item()

    def denoiser(self, model, timesteps, y=None, cfg_scale=1.0, null_label=None,
                 upsample_guidance=None, x0_clip="none"):
        """Closure denoise(x, i) -> (x0_hat, eps_hat, var_frac) at grid point i, plus the grid abar
        (K+1,) float64.

        var_frac is the learned-range weight f = (v + 1) / 2 of IDDPM when the network outputs 2C
        channels, else None. With upsample_guidance (an UpsampleGuidance), eps_hat on x (B, C, H, W)
        gets Upsample Guidance (Hwang et al. 2024). x0_clip: see clip_prediction.
        """
        # (K+1,)
        abar = torch.cat([self.alphas_cumprod[timesteps], torch.ones(1, dtype=torch.float64)])
        ug = upsample_guidance

        def denoise(x, i):
            t = timesteps[i]
            eps, extra = self.predict_eps(model, x, t, y, cfg_scale, null_label)
            # keep the sample dtype fixed if the network (e.g. under autocast) returns another
            eps = eps.to(x.dtype)
            # w_t = theta 1[t >= (1 - eta) T] with t = index / (N - 1): only the noisiest eta of the
            # schedule, where the global layout forms; later steps refine local detail that the
            # high-resolution pass gets right
            if ug is not None and ug.theta != 0 and t / (self.num_steps - 1) >= 1 - ug.eta:
                P, tau = self.ug_level(t, ug.m)
                # CFG at both resolutions
                eps_lo, _ = self.predict_eps(model, ug.low_res_input(x, P), tau, y, cfg_scale,
                                             null_label)
                eps = eps + ug.correction(eps, eps_lo.to(x.dtype))
            a = abar[i].item()
            x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)  # DDPM eq. 15
            x0, eps = clip_prediction(x, x0, eps, math.sqrt(a), math.sqrt(1 - a), x0_clip)
            var_frac = None if extra is None else (extra + 1) / 2
            return x0, eps, var_frac

        return denoise, abar

    @torch.no_grad()
    def sample(self, model, noise, y=None, sampler="dpm++", steps=50, cfg_scale=1.0,
               null_label=None, eta=0.0, generator=None, upsample_guidance=None, init=None,
               strength=1.0, x0_clip="none") -> torch.Tensor:
        """Draw x0 from pure noise (B, C, ...) with `steps` network evaluations; returns the same
        shape and dtype.

        All samplers share one grid: DiT's respaced timesteps from N-1 down to 0 (evenly strided,
        rounded), then a final clean point (abar = 1). For 'dpm++' this is the discrete analogue of
        DPM-Solver's time_uniform grid from T = 1 to eps = 1/N, evaluated at exact discrete
        alpha/sigma, with denoise-to-zero at the end. `generator` drives all sampler noise (ddpm,
        ddim with eta > 0). `upsample_guidance`: see denoiser; the model must accept both
        resolutions (e.g. a resized positional embedding). With `init` (a clean sample, e.g. an
        upsampled image), only the least noisy `strength` fraction of the schedule is run, starting
        from init re-noised to that level with `noise` (SDEdit; the patch route of training-free
        upsampling). `x0_clip` ('none', 'clip', 'dynamic'): what every step does to x0_hat before
        the sampler uses it (threshold_x0); for pixel-space models, whose data lie in [-1, 1].
        """
        if sampler not in self.samplers:
            raise ValueError(f"unknown sampler {sampler!r} for {self.objective!r}; choose one of "
                             f"{self.samplers}")
        _check_x0_clip(x0_clip, sampler)
        if eta != 0 and sampler != "ddim":
            raise ValueError("eta is a DDIM parameter; use sampler='ddim'")
        timesteps = self.timesteps(steps)
        if init is not None:
            timesteps = [t for t in timesteps if t <= strength
                         * (self.num_steps - 1)] or timesteps[-1:]
            noise = self.q_sample(init, torch.full((init.shape[0],), timesteps[0],
                                                   device=init.device), noise)
        denoise, abar = self.denoiser(model, timesteps, y, cfg_scale, null_label, upsample_guidance,
                                      x0_clip)
        if sampler == "ddpm":
            return ddpm_sample(denoise, noise, abar, generator)
        if sampler == "ddim":
            return ddim_sample(denoise, noise, abar, eta, generator)
        return dpmpp_2m_sample(denoise, noise, abar, order=2)


#################################################################################
#                                 Flow matching                                 #
#################################################################################

def gvp_coefs(t):
    """GVP path x_t = alpha x0 + sigma eps (SiT, Ma et al. 2024, the GVP interpolant;
    willisma/SiT, transport/path.py, GVPCPlan): alpha = sin(pi t / 2), sigma = cos(pi t / 2); t = 0
    noise, 1 data."""
    return torch.sin(math.pi / 2 * t), torch.cos(math.pi / 2 * t)


def gvp_velocity_to_x0_eps(x, u, t):
    """(x0_hat, eps_hat) from the velocity u at x_t (SiT's GVP path): exact, since u = alpha' x0 +
    sigma' eps is a second linear equation beside x_t = alpha x0 + sigma eps, with determinant (pi /
    2)(alpha^2 + sigma^2) = pi / 2 at every t; no division by alpha, so t = 0 (pure noise) is fine.
    t float or broadcastable tensor."""
    a, s = gvp_coefs(torch.as_tensor(t, dtype=torch.float64))
    a, s = a.to(x.dtype), s.to(x.dtype)
    return a * x + (2 / math.pi) * s * u, s * x - (2 / math.pi) * a * u


class FlowMatching:
    """Flow matching on the GVP path with velocity prediction (DiMSUM; SiT `--path-type GVP`). The
    network gets continuous t in [0, 1] (1 = data, SiT convention), as a float tensor (B,)."""
    objective = "flow"
    samplers = ("heun", "euler", "dpm++", "ddim")
    # heun integrates the trained ODE itself, the closest to DiMSUM's dopri5. Per network evaluation
    # it matches dpm++ on Gaussian data (20 evaluations: both 0.3% std error) and converges faster
    # beyond (50: 0.05% vs 0.2%)
    default_sampler = "heun"

    def training_loss(self, model, x0, y, noise=None, t=None):
        """Velocity MSE (SiT, Ma et al. 2024), mean over all dimensions, t ~ U[0, 1]. x0 (B, C,
        ...); y (B,) or None."""
        if t is None:
            t = torch.rand(x0.shape[0], device=x0.device)
        if noise is None:
            noise = torch.randn_like(x0)
        a, s = gvp_coefs(t.to(x0.dtype).view(-1, *([1] * (x0.ndim - 1))))
        target = (math.pi / 2) * (s * x0 - a * noise)  # d/dt of x_t = a x0 + s eps
        out = model(a * x0 + s * noise, t, y)
        return ((out[:, : x0.shape[1]].float() - target.float()) ** 2).mean()

    def ug_level(self, t, m):
        """Upsample Guidance's low-resolution input (Hwang et al. 2024, Sec. 3) at flow time t and
        ratio m: (P, tau), as GaussianDiffusion.ug_level. On the GVP path SNR(t) = tan^2(pi t / 2),
        so the time with SNR m^2 SNR(t) has a closed form, tau = (2 / pi) atan(m tan(pi t / 2)),
        where the discrete schedule searches its nearest step."""
        a = math.sin(math.pi / 2 * t) ** 2
        return a + (1 - a) / m ** 2, (2 / math.pi) * math.atan(m * math.tan(math.pi / 2 * t))

    @torch.no_grad()
    def sample(self, model, noise, y=None, sampler="heun", steps=50, cfg_scale=1.0, null_label=None,
               generator=None, upsample_guidance=None, init=None, strength=1.0,
               x0_clip="none") -> torch.Tensor:
        """Integrate the flow from t = 0 (noise (B, C, ...)) to t = 1 on the uniform grid t_i = i /
        steps. With `init`, start at t = 1 - strength from init mixed with `noise` on the GVP path
        (SDEdit).

        euler / heun solve dx/dt = u(x, t) directly (heun: 2 network evaluations a step, 1 for the
        others). dpm++ / ddim run the VP samplers above on abar(t) = sin^2(pi t / 2) with (x0_hat,
        eps_hat) from u. The grid starts at t = 0 exactly: x0_hat needs no division there
        (gvp_velocity_to_x0_eps), the start noise is the exact marginal (no t_min approximation),
        and the first step, from lambda = -inf, is exact DDIM. Uniform t is DPM-Solver's
        time_uniform and symmetric in lambda = log tan(pi t / 2). Every flow sampler is
        deterministic; `generator` is accepted for GaussianDiffusion's interface.

        `upsample_guidance` works through the VP form: eps_hat from u, guided as in
        GaussianDiffusion.denoiser on the noisiest eta of the flow time (t <= eta), and turned back
        into a velocity, so every sampler uses it. `x0_clip` acts on x0_hat of dpm++ / ddim
        (GaussianDiffusion.sample); euler / heun follow the network's velocity and take 'none' only.
        """
        if sampler not in self.samplers:
            raise ValueError(f"unknown sampler {sampler!r} for {self.objective!r}; choose one of "
                             f"{self.samplers}")
        _check_x0_clip(x0_clip, sampler)
        _check_steps(steps, 10 ** 6)
        t0 = 0.0 if init is None else 1.0 - strength
        ts = torch.linspace(t0, 1, steps + 1, dtype=torch.float64)  # (K+1,)
        if init is not None:
            a, s = gvp_coefs(torch.tensor(t0))
            noise = a.item() * init + s.item() * noise
        # the network's time never in bf16
        t_dtype = torch.promote_types(noise.dtype, torch.float32)

        ug = upsample_guidance

        def velocity(x, t):
            t_in = torch.full((x.shape[0],), t, device=x.device, dtype=t_dtype)
            u = _guided(model, x, t_in, y, cfg_scale, null_label)[0].to(x.dtype)
            # t = 0 is skipped: x_0 is the noise itself, so eps_hat = x exactly and the guidance
            # term is zero there
            if ug is not None and ug.theta != 0 and 0 < t <= ug.eta:
                P, tau = self.ug_level(t, ug.m)
                x_lo = ug.low_res_input(x, P)
                tau_in = torch.full((x.shape[0],), tau, device=x.device, dtype=t_dtype)
                u_lo = _guided(model, x_lo, tau_in, y, cfg_scale, null_label)[0].to(x.dtype)
                eps = gvp_velocity_to_x0_eps(x, u, t)[1]
                delta = ug.correction(eps, gvp_velocity_to_x0_eps(x_lo, u_lo, tau)[1])
                # x_t fixed: u = (pi / 2)(sigma x_t - eps) / alpha (the GVP conversion), so eps +
                # delta is u - (pi / 2) delta / alpha
                u = u - (math.pi / 2 / math.sin(math.pi / 2 * t)) * delta
            return u

        if sampler in ("euler", "heun"):
            return flow_ode_sample(velocity, noise, ts, 1 if sampler == "euler" else 2)

        def denoise(x, i):
            t = ts[i].item()
            x0, eps = gvp_velocity_to_x0_eps(x, velocity(x, t), t)
            a, s = math.sin(math.pi / 2 * t), math.cos(math.pi / 2 * t)
            return (*clip_prediction(x, x0, eps, a, s, x0_clip), None)

        abar = gvp_coefs(ts)[0] ** 2
        abar[-1] = 1.0  # clean data exactly, whatever sin(pi / 2) rounds to
        if sampler == "ddim":
            return ddim_sample(denoise, noise, abar)
        # no lower_order_final: near t = 1 the uniform grid's lambda steps grow gently (r = log 1.5
        # / log 2 = 0.58 for any K), unlike the jump into the last discrete DDPM step that it guards
        # against; 10 steps: std error -2.0% without, -6.0% with
        return dpmpp_2m_sample(denoise, noise, abar, order=2, lower_order_final=False)


def create_diffusion(model, **overrides):
    """The training objective and sampler a model class (or instance) asks for, from its class
    attributes: objective ("eps" or "flow"), and for "eps" schedule ("linear" / "scaled_linear",
    required) and time_offset (default 0). overrides go to the constructor (e.g. num_steps=)."""
    objective = getattr(model, "objective", None)
    if objective == "eps":
        kwargs = dict(schedule=model.schedule, time_offset=getattr(model, "time_offset", 0))
        return GaussianDiffusion(**{**kwargs, **overrides})
    if objective == "flow":
        return FlowMatching(**overrides)
    raise ValueError(f"unknown objective {objective!r} on "
                     f"{getattr(model, '__name__', type(model).__name__)}; "
                     "set the class attribute objective = 'eps' or 'flow'")
