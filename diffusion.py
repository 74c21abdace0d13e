"""
Discrete-time Gaussian diffusion (DDPM, epsilon prediction) and its samplers, in one file.

Papers: DDPM (Ho et al. 2020), IDDPM (Nichol & Dhariwal 2021, respacing and learned-range variance), DDIM (Song et
al. 2021), DPM-Solver++ (Lu et al. 2022, arXiv 2211.01095, multistep 2M), classifier-free guidance (Ho & Salimans
2022). Conventions follow DiT's `diffusion/` (0-based step index t in {0..N-1}); the formulas are those of
reference/sampling.md, cited below as §n.

Layout:
  schedules       get_betas, respaced_timesteps, cfg_from_uvit
  samplers        ddpm_sample, ddim_sample, dpmpp_2m_sample: plain functions of a denoiser closure
  GaussianDiffusion  q_sample, training_loss, denoiser (network + CFG -> closure), sample

The samplers never see the network. They take `denoise(x, i) -> (x0_hat, eps_hat, var_frac)` and a float64 grid
`abar` of K + 1 cumulative signal fractions (abar[i] = alpha_i^2, sigma_i^2 = 1 - abar[i]; abar[K] = 1 is clean
data), and step grid point i -> i + 1. Any variance-preserving parameterisation plugs in by supplying another
closure: velocity prediction on the GVP flow path converts u_hat to (x0_hat, eps_hat) (§3) with
abar = sin^2(pi t / 2), and Upsample Guidance (§6) only changes eps_hat inside the closure.
"""
import math

import torch


SAMPLERS = ("ddpm", "ddim", "dpm++")


#################################################################################
#                                   Schedules                                   #
#################################################################################

def get_betas(schedule: str, num_steps: int = 1000) -> torch.Tensor:
    """Per-step noise variances beta_t, t = 0..N-1, float64 (§2)."""
    if schedule == "linear":
        # DiT / ADM: 1e-4 .. 0.02 for N = 1000; scaling by 1000/N keeps abar_{N-1} about the same for other N.
        scale = 1000 / num_steps
        return torch.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=torch.float64)
    if schedule == "scaled_linear":
        # Stable Diffusion / DiM ImageNet: sqrt(beta) is linear, not beta.
        return torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, num_steps, dtype=torch.float64) ** 2
    raise ValueError(f"unknown beta schedule {schedule!r}; choose 'linear' or 'scaled_linear'")


def respaced_timesteps(num_steps: int, steps: int) -> list[int]:
    """DiT's `space_timesteps(N, "K")`: K indices evenly strided over 0..N-1 with rounding, ascending.

    One deviation: K = 1 keeps index N-1 (pure noise) where DiT keeps 0, so a one-step sampler still denoises.
    """
    if steps == 1:
        return [num_steps - 1]
    stride = (num_steps - 1) / (steps - 1)
    return [round(i * stride) for i in range(steps)]  # Python's round, as DiT; always hits 0 and N-1


def cfg_from_uvit(s: float) -> float:
    """U-ViT / DiM guidance eps_c + s (eps_c - eps_u) equals the standard eps_u + w (eps_c - eps_u) at w = 1 + s (§5)."""
    return 1.0 + s


#################################################################################
#                                   Samplers                                    #
#################################################################################
# Each sampler runs K steps on the grid abar[0..K] (abar[0] noisiest, abar[K] = 1 clean), one network evaluation
# per step, and returns x at grid point K, i.e. the last x0 estimate. Coefficients are Python floats computed in
# float64, so multiplying keeps x's dtype and device.

def _steps(K, progress):
    if not progress:
        return range(K)
    from tqdm.auto import tqdm
    return tqdm(range(K))


def ddpm_sample(denoise, x, abar, generator=None, progress=False):
    """Ancestral sampling from the Gaussian posterior q(x_s | x_t, x0_hat) on a respaced grid (§4.1)."""
    K = len(abar) - 1
    for i in _steps(K, progress):
        x0, _, var_frac = denoise(x, i)
        a_t, a_s = abar[i].item(), abar[i + 1].item()
        beta = 1 - a_t / a_s  # respaced beta' (IDDPM §4): the step t -> s as if it were one DDPM step
        mean = (math.sqrt(a_s) * beta / (1 - a_t)) * x0 + (math.sqrt(1 - beta) * (1 - a_s) / (1 - a_t)) * x
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


def ddim_sample(denoise, x, abar, eta=0.0, generator=None, progress=False):
    """DDIM (§4.2): re-noise x0_hat to the next level with the predicted eps; eta = 0 is deterministic."""
    K = len(abar) - 1
    for i in _steps(K, progress):
        x0, eps, _ = denoise(x, i)
        a_t, a_s = abar[i].item(), abar[i + 1].item()
        c = eta * math.sqrt((1 - a_s) / (1 - a_t) * (1 - a_t / a_s))  # eta * sigma_DDIM, 0 at the last step
        x = math.sqrt(a_s) * x0 + math.sqrt(max(1 - a_s - c * c, 0.0)) * eps
        if c > 0:
            x = x + c * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x


def dpmpp_2m_sample(denoise, x, abar, order=2, lower_order_final=True, progress=False):
    """DPM-Solver++ 2M: multistep, data prediction, exponential integrator in lambda = log(alpha/sigma) (§4.3).

    First order (= DDIM) where the 2M extrapolation is unavailable or unsafe: the first step (no history), the
    last step to sigma = 0 (lambda = inf; it returns the final x0_hat, as diffusers' final_sigmas_type="zero")
    and, with lower_order_final, the step into the last discrete timestep t = 0. On the time-uniform grid that
    step is a large jump in lambda (linear betas: lambda_0 = 4.6, several times the previous step), so
    r = h_prev / h is small and the correction D = m0 + (m0 - m1) / (2r) overshoots. Measured on Gaussian data
    (test_diffusion.py), linear betas, 20 steps: sample std +18% with a second-order step there, -1.5% without.
    DPM-Solver's own lower_order_final does this only below 10 steps; we always do. order=1 gives
    DPM-Solver++(1), which equals DDIM with eta = 0.
    """
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order!r}")
    K = len(abar) - 1
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    lam = alpha.log() - sigma.log()  # (K+1,), lam[K] = inf
    x0_prev = None
    for i in _steps(K, progress):
        x0, _, _ = denoise(x, i)
        h = (lam[i + 1] - lam[i]).item()
        if order == 1 or x0_prev is None or i >= K - (2 if lower_order_final else 1):
            d = x0
        else:  # linear extrapolation of the last two data predictions in lambda (the "2M" correction)
            r = (lam[i] - lam[i - 1]).item() / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
        # x_s = (sigma_s / sigma_t) x_t - alpha_s (e^{-h} - 1) D; at sigma_s = 0 this is exactly D
        x = (sigma[i + 1] / sigma[i]).item() * x - (alpha[i + 1].item() * math.expm1(-h)) * d
        x0_prev = x0
    return x


#################################################################################
#                               Gaussian diffusion                              #
#################################################################################

class GaussianDiffusion:
    """Discrete-time DDPM, epsilon prediction. Index t in {0..N-1} (0-based, DiT convention); the network is
    called with t + time_offset (DiM/U-ViT networks were trained on n in {1..N}: time_offset=1)."""

    def __init__(self, schedule="linear", num_steps=1000, time_offset=0):
        self.num_steps = num_steps
        self.time_offset = time_offset
        # float64 on the CPU; gathered and cast to the data dtype on use (schedule products lose bits in fp32)
        self.betas = get_betas(schedule, num_steps)                       # (N,)
        self.alphas_cumprod = torch.cumprod(1 - self.betas, dim=0)        # (N,) abar_t, decreasing
        self.sqrt_abar = self.alphas_cumprod.sqrt()                       # (N,) alpha_t
        self.sqrt_one_minus_abar = (1 - self.alphas_cumprod).sqrt()       # (N,) sigma_t

    def _extract(self, arr, t, x):
        """arr[t] for a batch of indices t (B,), cast to x's dtype and shaped (B, 1, ..., 1) to broadcast."""
        return arr.to(t.device)[t].to(x.dtype).view(-1, *([1] * (x.ndim - 1)))

    def q_sample(self, x0, t, noise):
        """x_t = alpha_t x0 + sigma_t eps: a draw from q(x_t | x0). x0, noise (B, ...); t (B,) int."""
        return self._extract(self.sqrt_abar, t, x0) * x0 + self._extract(self.sqrt_one_minus_abar, t, x0) * noise

    def training_loss(self, model, x0, y, noise=None, t=None):
        """Simple-loss epsilon MSE (DDPM eq. 14), mean over all dimensions. x0 (B, C, ...); y (B,) or None."""
        if t is None:
            t = torch.randint(0, self.num_steps, (x0.shape[0],), device=x0.device)
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = self.q_sample(x0, t, noise)
        out = model(x_t, t + self.time_offset, y)  # (B, C, ...) or (B, 2C, ...) with learned variance
        eps = out[:, : x0.shape[1]]
        # TODO(learned sigma): with 2C outputs add L_vb on the variance channels with a stop-gradient on eps (§3).
        return ((eps.float() - noise.float()) ** 2).mean()  # fp32 reduction even under bf16 autocast

    def predict_eps(self, model, x, t, y=None, cfg_scale=1.0, null_label=None):
        """Network epsilon at step index t (int) with classifier-free guidance (§5), standard convention.

        Returns (eps (B, C, ...), extra) where extra holds the network's channels beyond C (learned-variance
        output, taken unguided from the conditional half as DiT does) or None. All eps channels are guided (DiT
        guides 3 of 4 for exact reproducibility of its FID; add that as an option when needed).
        """
        B, C = x.shape[:2]
        t_in = torch.full((B,), t + self.time_offset, device=x.device, dtype=torch.long)
        if y is None or cfg_scale == 1:
            out = model(x, t_in, y)  # no guidance: one plain forward, no doubled batch
            return out[:, :C], (out[:, C:] if out.shape[1] > C else None)
        if null_label is None:
            raise ValueError("cfg_scale != 1 needs null_label (the class id the network was trained to treat as 'no class')")
        # [cond; uncond] in one forward: one big batch beats two small ones on a GPU
        y_in = torch.cat([y, torch.full_like(y, null_label)])
        out = model(torch.cat([x, x]), torch.cat([t_in, t_in]), y_in)  # (2B, C or 2C, ...)
        cond, uncond = out[:B], out[B:]
        eps = uncond[:, :C] + cfg_scale * (cond[:, :C] - uncond[:, :C])
        return eps, (cond[:, C:] if out.shape[1] > C else None)

    def timesteps(self, steps):
        """Sampling grid as step indices, noisiest first: DiT's respaced subsequence, reversed. (K,)"""
        if not isinstance(steps, int) or not 1 <= steps <= self.num_steps:
            raise ValueError(f"steps must be an int in [1, {self.num_steps}], got {steps!r}")
        return respaced_timesteps(self.num_steps, steps)[::-1]

    def denoiser(self, model, timesteps, y=None, cfg_scale=1.0, null_label=None):
        """Closure denoise(x, i) -> (x0_hat, eps_hat, var_frac) at grid point i, plus the grid abar (K+1,) float64.

        var_frac is the learned-range weight f = (v + 1) / 2 of IDDPM when the network outputs 2C channels, else None.
        """
        abar = torch.cat([self.alphas_cumprod[timesteps], torch.ones(1, dtype=torch.float64)])  # (K+1,)

        def denoise(x, i):
            eps, extra = self.predict_eps(model, x, timesteps[i], y, cfg_scale, null_label)
            eps = eps.to(x.dtype)  # keep the sample dtype fixed if the network (e.g. under autocast) returns another
            a = abar[i].item()
            x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)  # §3; no clipping (latents are unbounded)
            var_frac = None if extra is None else (extra + 1) / 2
            return x0, eps, var_frac

        return denoise, abar

    @torch.no_grad()
    def sample(self, model, noise, y=None, sampler="dpm++", steps=50, cfg_scale=1.0, null_label=None,
               eta=0.0, generator=None, progress=False) -> torch.Tensor:
        """Draw x0 from pure noise (B, C, ...) with `steps` network evaluations; returns the same shape and dtype.

        All samplers share one grid: DiT's respaced timesteps from N-1 down to 0 (evenly strided, rounded), then
        a final clean point (abar = 1). For 'dpm++' this is the discrete analogue of DPM-Solver's time_uniform
        grid from T = 1 to eps = 1/N, evaluated at exact discrete alpha/sigma, with denoise-to-zero at the end.
        `generator` drives all sampler noise (ddpm, ddim with eta > 0).
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
        if eta != 0 and sampler != "ddim":
            raise ValueError("eta is a DDIM parameter; use sampler='ddim'")
        denoise, abar = self.denoiser(model, self.timesteps(steps), y, cfg_scale, null_label)
        if sampler == "ddpm":
            return ddpm_sample(denoise, noise, abar, generator, progress)
        if sampler == "ddim":
            return ddim_sample(denoise, noise, abar, eta, generator, progress)
        return dpmpp_2m_sample(denoise, noise, abar, order=2, progress=progress)
