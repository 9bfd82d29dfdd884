"""DDPM for CausalFusion (paper Sec. 3; ADM's schedule and respacing): linear schedule, epsilon-prediction training loss
with AR weights, timestep respacing, ancestral sampling with fixed "large" variance, CFG with an interval.

Timesteps handed to the model are always those of the full T-step schedule, also when sampling with fewer
steps (ADM/DiT respacing without timestep rescaling).
"""
import torch


class Diffusion:
    def __init__(self, sample_steps=250, num_timesteps=1000):
        if not 1 <= sample_steps <= num_timesteps:
            raise ValueError(f"sample_steps must be in 1..{num_timesteps}, got {sample_steps}")
        scale = 1000 / num_timesteps  # keeps the linear schedule's endpoints meaningful for any T
        full_betas = torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)
        self.num_timesteps = num_timesteps
        self.full_alphas_cumprod = torch.cumprod(1 - full_betas, 0)  # (T,) float64

        # respacing: ADM's space_timesteps with one section, both ends kept. Its index accumulates the float
        # stride and Python's round() takes .5 to even, so round(i * stride) would differ at some odd N
        stride, index, kept = (num_timesteps - 1) / max(sample_steps - 1, 1), 0.0, []
        for _ in range(sample_steps):
            kept.append(round(index))
            index += stride
        self.timesteps = torch.tensor(kept)
        acp = self.full_alphas_cumprod[self.timesteps]
        acp_prev = torch.cat([torch.ones(1, dtype=torch.float64), acp[:-1]])
        self.alphas_cumprod = acp
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
        if i == 0:
            return mean
        return mean + sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)

    def sample(self, eps_fn, x, generator, cfg_scale=1.0, cfg_interval=(0, 1000), progress=None):
        """Denoise x (N, ...) from pure noise. eps_fn(x, t) -> eps, with t an int timestep of the full
        schedule; with cfg_scale > 1 it receives the doubled batch [x; x] (cond half first)."""
        steps = reversed(range(len(self.timesteps)))
        for i in (progress(steps) if progress else steps):
            t = int(self.timesteps[i])
            if cfg_scale > 1:
                eps = self.guide(eps_fn(torch.cat([x, x]), t), t, cfg_scale, cfg_interval)
            else:
                eps = eps_fn(x, t)
            x = self.step(x, eps.to(x.dtype), i, generator)
        return x
