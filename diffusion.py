"""Diffusion for CausalFusion (Deng et al. 2024, "Causal Diffusion Transformers for Generative Modeling", Sec. 3):
linear schedule, epsilon-prediction training loss with AR weights, CFG inside an interval, and four samplers:
  ddpm      ancestral, fixed "large" variance (Ho et al. 2020), ADM respacing (Nichol & Dhariwal 2021;
            Dhariwal & Nichol 2021): the paper's;
  ddim      DDIM (Song et al. 2021), deterministic at eta = 0; the last step lands on alpha_bar = 1;
  dpm++     DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095): multistep data prediction, first order at
            the first and the last step, whose output is the data prediction at the last timestep;
  dpm++sde  the same with its SDE form, SDE-DPM-Solver++(2M).
The fast ones step as diffusers' DDIMScheduler (set_alpha_to_one) and DPMSolverMultistepScheduler
(lower_order_final, final_sigmas_type "zero", midpoint); test_diffusion.py compares them step by step.

Timesteps handed to the model are always those of the full T-step schedule, also when sampling with fewer
steps (ADM/DiT respacing without timestep rescaling); every sampler makes one eps call per step.
"""
import math

import torch

SAMPLERS = ("ddpm", "ddim", "dpm++", "dpm++sde")
SPACINGS = ("uniform", "trailing", "logsnr")
# the timesteps each fast sampler visits by default: trailing scored best of the three on the class demo (README,
# "Fast sampling"); ddpm always takes ADM's uniform respacing, the paper's
DEFAULT_SPACING = {"ddim": "trailing", "dpm++": "trailing", "dpm++sde": "trailing"}


class Diffusion:
    def __init__(self, sample_steps=250, num_timesteps=1000, sampler="ddpm", eta=None, spacing=None):
        if sampler not in SAMPLERS:
            raise ValueError(f"--sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
        if not 1 <= sample_steps <= num_timesteps:
            raise ValueError(f"--steps must be in 1..{num_timesteps}, got {sample_steps}")
        if sampler.startswith("dpm++") and sample_steps < 2:
            raise ValueError(f"--sampler {sampler} needs --steps >= 2, got {sample_steps}")
        if eta is not None and (sampler != "ddim" or not 0 <= eta <= 1):  # above 1, sigma^2 > 1 - alpha_bar_prev
            raise ValueError(f"--eta is for --sampler ddim, in [0, 1]; got --eta {eta} with --sampler {sampler}")
        spacing = spacing or DEFAULT_SPACING.get(sampler, "uniform")
        if spacing not in SPACINGS or sampler == "ddpm" and spacing != "uniform":
            raise ValueError(f"--spacing must be one of {', '.join(SPACINGS)} (ddpm: uniform), got {spacing!r}")
        self.sampler, self.spacing, self.eta = sampler, spacing, 0.0 if eta is None and sampler == "ddim" else eta
        scale = 1000 / num_timesteps  # keeps the linear schedule's endpoints meaningful for any T
        full_betas = torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)
        self.num_timesteps = num_timesteps
        self.full_alphas_cumprod = torch.cumprod(1 - full_betas, 0)  # (T,) float64

        self.timesteps = torch.tensor(self._respace(sample_steps, spacing))  # ascending, visited last to first
        acp = self.alphas_cumprod = self.full_alphas_cumprod[self.timesteps]
        if sampler == "ddim":  # steps through step(), with its own coefficients
            self.step_coefs = self._ddim_coefs(acp.tolist(), self.eta)
        if sampler.startswith("dpm++"):  # steps through dpm_step()
            self.dpm_coefs = self._dpm_coefs(acp.tolist(), sde=sampler == "dpm++sde")
        if sampler != "ddpm":
            return  # the rest is DDPM's
        acp_prev = torch.cat([torch.ones(1, dtype=torch.float64), acp[:-1]])
        self.betas = 1 - acp / acp_prev  # the betas whose products give the kept marginals
        posterior_variance = self.betas * (1 - acp_prev) / (1 - acp)
        # fixed "large"; one step (N = 1) adds no noise, so its variance is never used
        self.variance = torch.cat([posterior_variance[1:2], self.betas[1:]]) if sample_steps > 1 else self.betas
        self.coef_x0 = self.betas * acp_prev.sqrt() / (1 - acp)  # posterior mean = coef_x0 x0 + coef_xt xt
        self.coef_xt = (1 - acp_prev) * (1 - self.betas).sqrt() / (1 - acp)
        # a step as x_{i-1} = c_x x + c_eps eps + sigma z, x0 = (x - sqrt(1 - acp) eps) / sqrt(acp) folded in;
        # Python floats, so the sampler's hot loop makes no device copies and no per-step .item() calls
        self.step_coefs = torch.stack([self.coef_x0 / acp.sqrt() + self.coef_xt,
                                       -self.coef_x0 * (1 - acp).sqrt() / acp.sqrt(), self.variance.sqrt()], 1).tolist()

    def _respace(self, n, spacing):
        """The N distinct full-schedule timesteps a sampler visits, ascending.
        uniform: ADM's space_timesteps with one section, both ends kept. Its index accumulates the float stride
          and Python's round() takes .5 to even, so round(i * stride) would differ at some odd N.
        trailing: diffusers' "trailing", round(T i / N) - 1 for i = N..1: starts at T - 1, never visits the
          low-noise end below T / N - 1. Exact (diffusers' np.arange drifts off some .5 ties, e.g. at N = 48).
        logsnr: uniform in log-SNR from t = 0 to T - 1, each point taken to its nearest timestep; where
          several land on one (the low-noise end, at larger N) the later move up, so N stay N distinct."""
        T = self.num_timesteps
        if spacing == "trailing":
            return [round(T * i / n) - 1 for i in range(1, n + 1)]
        if spacing == "logsnr":
            lam = (self.full_alphas_cumprod / (1 - self.full_alphas_cumprod)).log()  # 2 lambda, decreasing in t
            kept = (lam - torch.linspace(lam[0], lam[-1], n, dtype=torch.float64)[:, None]).abs().argmin(1).tolist()
            for i in range(1, n):
                kept[i] = max(kept[i], kept[i - 1] + 1)
            return [min(t, T - n + i) for i, t in enumerate(kept)]  # and none past T - 1
        stride, index, kept = (T - 1) / max(n - 1, 1), 0.0, []
        for _ in range(n):
            kept.append(round(index))
            index += stride
        return kept

    @staticmethod
    def _ddim_coefs(acp, eta):
        """DDIM in step()'s form: x_{i-1} = sqrt(a') x0 + sqrt(1 - a' - sigma^2) eps + sigma z with x0 folded in,
        a' = alpha_bar at timesteps[i - 1], 1 after timesteps[0]."""
        coefs = []
        for a, a1 in zip(acp, [1.0] + acp[:-1]):
            sigma = eta * math.sqrt((1 - a1) / (1 - a) * (1 - a / a1))
            c_eps = math.sqrt(max(1 - a1 - sigma ** 2, 0.0)) - math.sqrt(a1 * (1 - a) / a)
            coefs.append([math.sqrt(a1 / a), c_eps, sigma])
        return coefs

    @staticmethod
    def _dpm_coefs(acp, sde):
        """DPM-Solver++(2M) step i, timesteps[i] -> [i - 1] (-> the data for i = 0): alpha = sqrt(a), sigma =
        sqrt(1 - a), lambda = log(alpha / sigma), h = lambda' - lambda. x0 = p x + q eps, D = x0 + c (x0 - x0_prev)
        with c = h / (2 h_prev), x' = A x + G D + s z;  ODE: A = sigma'/sigma, G = alpha' (1 - e^-h), s = 0;
        SDE: A = sigma'/sigma e^-h, G = alpha' (1 - e^-2h), s = sigma' sqrt(1 - e^-2h). First order (c = 0) at
        the first step (no x0_prev) and the last, to lambda' = inf: there h = inf gives x' = x0."""
        lam = [0.5 * math.log(a / (1 - a)) for a in acp]
        n, coefs = len(acp), []
        for i, a in enumerate(acp):
            a1, h = (acp[i - 1], lam[i - 1] - lam[i]) if i else (1.0, math.inf)
            c = h / (2 * (lam[i] - lam[i + 1])) if 0 < i < n - 1 else 0.0
            A = math.sqrt((1 - a1) / (1 - a)) * (math.exp(-h) if sde else 1.0)
            G = -math.sqrt(a1) * math.expm1(-(1 + sde) * h)  # expm1: h is small at large N
            s = math.sqrt(-(1 - a1) * math.expm1(-2 * h)) if sde else 0.0
            coefs.append([1 / math.sqrt(a), -math.sqrt((1 - a) / a), A, G, c, s])
        return coefs

    def _acp(self, t, like):
        """alpha_bar_t for full-schedule timesteps t, shaped to broadcast against tokens `like`."""
        if self.full_alphas_cumprod.device != t.device:  # moved once: a copy per call would sync the GPU
            self.full_alphas_cumprod = self.full_alphas_cumprod.to(t.device)
        acp = self.full_alphas_cumprod[t].to(torch.float32)
        return acp.view(*t.shape, *([1] * (like.dim() - t.dim())))  # (N, 1, 1) or (N, L, 1)

    def q_sample(self, x0, t, noise):
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps; t is (N,) or per token (N, L)."""
        acp = self._acp(t, x0)
        return acp.sqrt() * x0 + (1 - acp).sqrt() * noise

    def training_loss(self, model, x0, t, noise, weights, **model_kwargs):
        """AR-weighted MSE on epsilon over all noisy tokens. x0, noise (N, L, P) in AR order; weights (N, L).
        The clean tokens shown to the model as context are x0 itself."""
        xt = self.q_sample(x0, t, noise)
        return self.eps_loss(model(x0, xt, t, **model_kwargs), noise, weights)

    @staticmethod
    def eps_loss(eps, noise, weights):
        """Mean over tokens of weights (N, L) times each token's squared eps error (mean over its P values)."""
        mse = (eps.float() - noise).square().mean(dim=-1)  # (N, L)
        return (mse * weights).mean()

    @staticmethod
    def guide(eps, t, cfg_scale, cfg_interval):
        """Classifier-free guidance of a doubled batch [cond; uncond] -> (N, ...): eps_u + s (eps_c - eps_u)
        inside the interval lo <= t < hi of the full schedule (as the authors' code), the conditional one outside."""
        eps_c, eps_u = eps.chunk(2)
        lo, hi = cfg_interval
        if cfg_scale == 1 or not lo <= t < hi:
            return eps_c
        return eps_u + cfg_scale * (eps_c - eps_u)

    def step(self, x, eps, i, generator):
        """One ancestral step from respaced index i to i - 1."""
        c_x, c_eps, sigma = self.step_coefs[i]
        mean = c_x * x + c_eps * eps
        if i == 0 or sigma == 0:  # DDIM at eta = 0 draws no noise
            return mean
        return mean + sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)

    def dpm_step(self, x, eps, i, x0_prev, generator):
        """One DPM-Solver++(2M) step (ODE or SDE) from respaced index i to i - 1 -> (x, its data prediction x0)."""
        p, q, A, G, c, s = self.dpm_coefs[i]
        x0 = p * x + q * eps
        x = A * x + G * (x0 + c * (x0 - x0_prev) if c else x0)
        if s:
            x = x + s * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return x, x0

    def sample(self, eps_fn, x, generator, cfg_scale=1.0, cfg_interval=(0, 1000), progress=None):
        """Denoise x (N, ...) from pure noise. eps_fn(x, t) -> eps, with t an int timestep of the full
        schedule; with cfg_scale > 1 it receives the doubled batch [x; x] (cond half first)."""
        steps, x0 = reversed(range(len(self.timesteps))), None
        for i in (progress(steps) if progress else steps):
            t = int(self.timesteps[i])
            if cfg_scale > 1:
                eps = self.guide(eps_fn(torch.cat([x, x]), t), t, cfg_scale, cfg_interval)
            else:
                eps = eps_fn(x, t)
            if self.sampler.startswith("dpm++"):
                x, x0 = self.dpm_step(x, eps.to(x.dtype), i, x0, generator)
            else:  # ddpm, ddim
                x = self.step(x, eps.to(x.dtype), i, generator)
        return x
