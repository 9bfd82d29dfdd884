"""Diffusion for CausalFusion (Deng et al. 2024, "Causal Diffusion Transformers for Generative Modeling", Sec. 3):
the objectives, the timesteps training draws, the AR-weighted loss, CFG inside an interval, and the samplers.
Two classes, one per idea:
  Objective(kind)   the path and what training does along it: path (alpha_t, sigma_t), draw_timesteps, q_sample,
                    model_time, target, loss (AR weights, min-SNR), eps_timesteps; train.py builds only this.
  Sampler(objective, name, steps, eta, spacing)   the times it visits, a table of coefficients per step (coefs,
                    whose meaning is its stepping rule's), step, CFG's guide inside its interval, and sample().

Objectives: each is a Gaussian path x_t = alpha_t x0 + sigma_t eps that the training loss and the samplers go along.
  eps   the paper's: the linear VP schedule of T = 1000 timesteps, alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t);
        the model predicts eps.
  flow  flow matching with the linear interpolant (rectified flow, Liu et al. 2022; Lipman et al. 2023; SiT, Ma et
        al. 2024, path Linear, prediction velocity): continuous t in [0, 1], alpha_t = 1 - t, sigma_t = t; the model
        predicts the velocity v = dx_t/dt = eps - x0 and sees the timestep T t (the embedder of eps's 0..T-1, so the
        architecture is unchanged).
The timesteps training draws: uniform (the paper's), or logit-normal t = sigmoid(n), n ~ N(m, s^2) (Esser et al.
2024, SD3, Sec. 3.1), which eps takes to the timestep floor(T t). The loss: the AR-weighted MSE of the prediction,
optionally times min-SNR-gamma weights (Hang et al. 2023; see min_snr_weight).

Samplers of eps:
  ddpm      ancestral, fixed "large" variance (Ho et al. 2020), ADM respacing (Nichol & Dhariwal 2021;
            Dhariwal & Nichol 2021): the paper's;
  ddim      DDIM (Song et al. 2021), deterministic at eta = 0; the last step lands on alpha_bar = 1;
  dpm++     DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095): multistep data prediction, first order at
            the first and the last step, whose output is the data prediction at the last timestep;
  dpm++sde  the same with its SDE form, SDE-DPM-Solver++(2M).
The fast ones step as diffusers' DDIMScheduler (set_alpha_to_one) and DPMSolverMultistepScheduler
(lower_order_final, final_sigmas_type "zero", midpoint); test_diffusion.py compares them step by step.
Samplers of flow, at t = N/N, ..., 1/N, landing on t = 0:
  euler     the Euler step of the ODE dx/dt = v, x_{t'} = x_t + (t' - t) v (diffusers' FlowMatchEulerDiscreteScheduler;
            on this path it is also DDIM and first-order DPM-Solver++);
  dpm++, dpm++sde  eps's DPM-Solver++(2M) and its SDE form, written in (alpha_t, sigma_t), along alpha_t = 1 - t,
            sigma_t = t: second order at one model call per step.

A few-step flow model (distill/few_step.py; shortcut models, Frans et al. 2024) also takes each step's size d in
flow time: Sampler.sample(step_size=True) hands it to the model, and distill_target / distill_loss are its training
target (the teacher's ODE over one step of a k-step euler grid, in small euler steps) and loss.

Timesteps handed to the model are always those of the full T-step schedule (eps: ADM/DiT respacing without timestep
rescaling; flow: T t); every sampler makes one model call per step. The CFG interval is in timesteps of the eps
schedule for both objectives: a flow time counts as the first eps timestep with at most its SNR
(Objective.eps_timesteps).
"""
import math

import torch

OBJECTIVES = ("eps", "flow")
SAMPLERS = ("ddpm", "ddim", "dpm++", "dpm++sde")  # eps's; the first is its default
FLOW_SAMPLERS = ("euler", "dpm++", "dpm++sde")  # flow's; the first is its default (docs/flow.md: measured)
SAMPLERS_OF = {"eps": SAMPLERS, "flow": FLOW_SAMPLERS}
SPACINGS = ("uniform", "trailing", "logsnr")
# the timesteps each fast eps sampler visits by default: trailing scored best of the three on the class demo
# (docs/sampling.md, "Fast samplers"); ddpm always takes ADM's uniform respacing, the paper's. Flow visits t = i / N
# ("uniform").
DEFAULT_SPACING = {"ddim": "trailing", "dpm++": "trailing", "dpm++sde": "trailing"}
TIMESTEP_SAMPLINGS = ("uniform", "logit-normal")
LOSS_WEIGHTINGS = ("none", "min-snr")


class Objective:
    """The training side of a path x_t = alpha_t x0 + sigma_t eps (kind: eps or flow): the timesteps training draws,
    q_sample, what the model sees (model_time), the target and the weighted loss. alphas_cumprod (T,) float64: the
    eps schedule's alpha_bar, which flow reads too (eps_timesteps)."""

    def __init__(self, kind="eps", num_timesteps=1000):
        if kind not in OBJECTIVES:
            raise ValueError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {kind!r}")
        self.kind, self.num_timesteps = kind, num_timesteps
        scale = 1000 / num_timesteps  # keeps the linear schedule's endpoints meaningful for any T
        betas = torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)
        self.alphas_cumprod = torch.cumprod(1 - betas, 0)  # (T,) float64

    def path(self, t, like):
        """(alpha_t, sigma_t) of timesteps t (N,) or per token (N, L), shaped to broadcast against tokens `like`."""
        shape = (*t.shape, *([1] * (like.dim() - t.dim())))  # (N, 1, 1) or (N, L, 1)
        if self.kind == "flow":
            t = t.to(torch.float32).view(shape)
            return 1 - t, t
        if self.alphas_cumprod.device != t.device:  # moved once: a copy per call would sync the GPU
            self.alphas_cumprod = self.alphas_cumprod.to(t.device)
        acp = self.alphas_cumprod[t].to(torch.float32).view(shape)
        return acp.sqrt(), (1 - acp).sqrt()

    def eps_timesteps(self, t):
        """The eps timesteps (long) of flow times t: the first timestep of the T-step schedule whose SNR is at most
        t's, ((1 - t) / t)^2 (the number of timesteps with a higher SNR), T - 1 for the times noisier than all.
        So `--cfg-interval LO HI` (lo <= timestep < hi, as the authors') guides the same region of noise for both
        objectives; (0, 1000) every flow time."""
        log_snr = (self.alphas_cumprod / (1 - self.alphas_cumprod)).log()  # (T,) decreasing
        flow_log_snr = 2 * ((1 - t.double()).log() - t.double().log())  # -inf at t = 1
        return (log_snr.to(t.device) > flow_log_snr[..., None]).sum(-1).clamp(max=self.num_timesteps - 1)

    def q_sample(self, x0, t, noise):
        """x_t = alpha_t x_0 + sigma_t eps; t is (N,) or per token (N, L): eps's timesteps, flow's times."""
        alpha, sigma = self.path(t, x0)
        return alpha * x0 + sigma * noise

    def model_time(self, t):
        """The timesteps the model's embedder sees for training's t: eps's themselves, T t for flow."""
        return t if self.kind == "eps" else self.num_timesteps * t

    def draw_timesteps(self, shape, generator, sampling="uniform", logit_mean=0.0, logit_std=1.0):
        """Training's timesteps, one per element of shape: eps's long in 0..T-1, flow's float t in [0, 1].
        uniform: the paper's; logit-normal: t = sigmoid(n), n ~ N(logit_mean, logit_std^2) (SD3's lognorm), for
        eps the timestep floor(T t)."""
        if sampling not in TIMESTEP_SAMPLINGS:
            raise ValueError(f"--timestep-sampling must be one of {', '.join(TIMESTEP_SAMPLINGS)}, got {sampling!r}")
        if sampling == "uniform":
            if self.kind == "eps":
                return torch.randint(0, self.num_timesteps, shape, generator=generator)
            return torch.rand(shape, generator=generator)
        t = torch.sigmoid(logit_mean + logit_std * torch.randn(shape, generator=generator))
        return t if self.kind == "flow" else (self.num_timesteps * t).long().clamp(max=self.num_timesteps - 1)

    def target(self, x0, noise):
        """What the model predicts: eps = noise, flow's v = noise - x0."""
        return noise if self.kind == "eps" else noise - x0

    def min_snr_weight(self, t, gamma, like):
        """Min-SNR-gamma weights (Hang et al. 2023) of training's t, shaped as path's. They weight the x0 error
        by min(SNR, gamma), SNR = alpha^2 / sigma^2. Our loss is the MSE of the model's prediction, and the x0
        estimate is x0 = p x_t + q pred, so the x0 error is q times the prediction's error, and the weight on our
        MSE is min(SNR, gamma) q^2:
          eps:  x0 = (x_t - sigma eps) / alpha, q^2 = sigma^2 / alpha^2 = 1 / SNR: min(SNR, gamma) / SNR (theirs);
          flow: x0 = x_t - t v, q^2 = t^2, SNR = ((1 - t) / t)^2: min(SNR, gamma) t^2, i.e. min(SNR, gamma) /
                (1 + sqrt(SNR))^2 (0 at t = 0 and t = 1).
        Either way the loss, as a function of the implied x0, is theirs."""
        alpha, sigma = self.path(t, like)
        snr = (alpha / sigma).square()
        q2 = 1 / snr if self.kind == "eps" else sigma.square()
        return snr.clamp(max=gamma) * q2

    def loss(self, pred, x0, noise, t, weights, weighting="none", snr_gamma=5.0):
        """Mean over tokens of weights (N, L) times each token's squared error (mean over its P values) of the
        prediction pred (N, L, P) against its target. weighting "min-snr" multiplies the weights by
        min_snr_weight(t, snr_gamma)."""
        if weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"--loss-weighting must be one of {', '.join(LOSS_WEIGHTINGS)}, got {weighting!r}")
        if weighting == "min-snr":
            weights = weights * self.min_snr_weight(t, snr_gamma, pred)[..., 0]  # (N, L)
        return weighted_mse(pred, self.target(x0, noise), weights)


class Sampler:
    """A sampler of an objective (an Objective or its kind): the N times it visits, ascending in `timesteps` (eps:
    long timesteps of the T-step schedule; flow: float64 t = i / N), what the model and CFG see at each
    (model_timesteps, guide_timesteps), each step's size in those times (step_sizes: what a step-size model sees),
    and `coefs`, one row per step for its stepping rule (step): ddpm, ddim, euler x' = c_x x + c_pred pred + sigma z
    (rows (c_x, c_pred, sigma)); dpm++, dpm++sde multistep (rows (p, q, A, G, c, s), see _dpm_coefs)."""

    def __init__(self, objective="eps", name=None, steps=250, eta=None, spacing=None):
        objective = objective if isinstance(objective, Objective) else Objective(objective)
        kind, T = objective.kind, objective.num_timesteps
        samplers = SAMPLERS_OF[kind]
        name = name or samplers[0]
        if name not in samplers:
            theirs = [o for o in OBJECTIVES if name in SAMPLERS_OF[o]]
            raise ValueError(f"--sampler must be one of {', '.join(samplers)} for {kind} models, got {name!r}"
                             + (f" (a sampler of {theirs[0]} models)" if theirs else ""))
        if not 1 <= steps <= (T if kind == "eps" else math.inf):
            raise ValueError(f"--steps must be in 1..{T}, got {steps}")
        if name.startswith("dpm++") and steps < 2:
            raise ValueError(f"--sampler {name} needs --steps >= 2, got {steps}")
        if eta is not None and (name != "ddim" or not 0 <= eta <= 1):  # above 1, sigma^2 > 1 - alpha_bar_prev
            raise ValueError(f"--eta is for --sampler ddim, in [0, 1]; got --eta {eta} with --sampler {name}")
        spacing = spacing or (DEFAULT_SPACING.get(name, "uniform") if kind == "eps" else "uniform")
        if spacing not in SPACINGS or name == "ddpm" and spacing != "uniform":
            raise ValueError(f"--spacing must be one of {', '.join(SPACINGS)} (ddpm: uniform), got {spacing!r}")
        if kind == "flow" and spacing != "uniform":
            raise ValueError(f"--spacing of a flow model's samplers: uniform (t = i / N), got {spacing!r}")
        self.objective, self.name, self.spacing = objective, name, spacing
        self.eta = 0.0 if eta is None and name == "ddim" else eta
        self.multistep = name.startswith("dpm++")
        if kind == "flow":  # t = N/N, ..., 1/N, landing on t = 0: alpha = 1 - t, sigma = t, x0 = x - t v
            self.timesteps = torch.arange(1, steps + 1, dtype=torch.float64) / steps
            t = self.timesteps.tolist()
            self.model_timesteps = [T * x for x in t]
            self.guide_timesteps = objective.eps_timesteps(self.timesteps).tolist()
            alpha2, sigma2, data = [(1 - x) ** 2 for x in t], [x * x for x in t], [(1.0, -x) for x in t]
        else:  # x0 = (x - sqrt(1 - a) eps) / sqrt(a), a = alpha_bar
            self.timesteps = torch.tensor(self._respace(steps, spacing))
            t = self.timesteps.tolist()
            self.model_timesteps = self.guide_timesteps = t
            acp = objective.alphas_cumprod.cpu()[self.timesteps]
            alpha2 = acp.tolist()
            sigma2, data = [1 - x for x in alpha2], [(1 / math.sqrt(x), -math.sqrt((1 - x) / x)) for x in alpha2]
        self.step_sizes = [t0 - t1 for t0, t1 in zip(t, [0.0] + t[:-1])]  # d = t - t', what a step-size model sees
        if self.multistep:
            self.coefs = self._dpm_coefs(alpha2, sigma2, data, sde=name == "dpm++sde")
        elif name == "euler":  # x' = x + (t' - t) v
            self.coefs = [[1.0, -d, 0.0] for d in self.step_sizes]
        elif name == "ddim":
            self.coefs = self._ddim_coefs(alpha2, self.eta)
        else:
            self.coefs = self._ddpm_coefs(acp)

    def _respace(self, n, spacing):
        """The N distinct full-schedule timesteps an eps sampler visits, ascending.
        uniform: ADM's space_timesteps with one section, both ends kept. Its index accumulates the float stride
          and Python's round() takes .5 to even, so round(i * stride) would differ at some odd N.
        trailing: diffusers' "trailing", round(T i / N) - 1 for i = N..1: starts at T - 1, never visits the
          low-noise end below T / N - 1. Exact (diffusers' np.arange drifts off some .5 ties, e.g. at N = 48).
        logsnr: uniform in log-SNR from t = 0 to T - 1, each point taken to its nearest timestep; where
          several land on one (the low-noise end, at larger N) the later move up, so N stay N distinct."""
        T, acp = self.objective.num_timesteps, self.objective.alphas_cumprod.cpu()
        if spacing == "trailing":
            return [round(T * i / n) - 1 for i in range(1, n + 1)]
        if spacing == "logsnr":
            lam = (acp / (1 - acp)).log()  # 2 lambda, decreasing in t
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
    def _ddpm_coefs(acp):
        """DDPM's ancestral step (ddpm_posterior) as x_{i-1} = c_x x + c_eps eps + sigma z, x0 = (x - sqrt(1 - acp)
        eps) / sqrt(acp) folded in; Python floats, so the hot loop makes no device copies and no .item() calls."""
        _, variance, coef_x0, coef_xt = ddpm_posterior(acp)
        return torch.stack([coef_x0 / acp.sqrt() + coef_xt, -coef_x0 * (1 - acp).sqrt() / acp.sqrt(),
                            variance.sqrt()], 1).tolist()

    @staticmethod
    def _ddim_coefs(acp, eta):
        """DDIM as x_{i-1} = sqrt(a') x0 + sqrt(1 - a' - sigma^2) eps + sigma z with x0 folded in, a' = alpha_bar at
        timesteps[i - 1], 1 after timesteps[0]."""
        coefs = []
        for a, a1 in zip(acp, [1.0] + acp[:-1]):
            sigma = eta * math.sqrt((1 - a1) / (1 - a) * (1 - a / a1))
            c_eps = math.sqrt(max(1 - a1 - sigma ** 2, 0.0)) - math.sqrt(a1 * (1 - a) / a)
            coefs.append([math.sqrt(a1 / a), c_eps, sigma])
        return coefs

    @staticmethod
    def _dpm_coefs(alpha2, sigma2, data, sde):
        """DPM-Solver++(2M) step i, timesteps[i] -> [i - 1] (-> the data for i = 0), on any Gaussian path given by
        alpha^2 and sigma^2 at each timestep: lambda = log(alpha / sigma), h = lambda' - lambda. x0 = p x + q pred
        ((p, q) = data[i]), D = x0 + c (x0 - x0_prev) with c = h / (2 h_prev), x' = A x + G D + s z;  ODE: A =
        sigma'/sigma, G = alpha' (1 - e^-h), s = 0; SDE: A = sigma'/sigma e^-h, G = alpha' (1 - e^-2h), s = sigma'
        sqrt(1 - e^-2h). First order (c = 0) at the first step (no x0_prev) and the last, to lambda' = inf: there h
        = inf gives x' = x0. A flow model's first step starts at alpha = 0, lambda = -inf: h = inf, x' = alpha' x0
        + sigma' (x or, SDE, fresh noise), and the next one is first order too (h_prev = inf)."""
        lam = [0.5 * math.log(a / s) if a > 0 else -math.inf for a, s in zip(alpha2, sigma2)]
        n, coefs = len(alpha2), []
        for i, (a, v) in enumerate(zip(alpha2, sigma2)):
            a1, v1, h = (alpha2[i - 1], sigma2[i - 1], lam[i - 1] - lam[i]) if i else (1.0, 0.0, math.inf)
            c = h / (2 * (lam[i] - lam[i + 1])) if 0 < i < n - 1 else 0.0
            A = math.sqrt(v1 / v) * (math.exp(-h) if sde else 1.0)
            G = -math.sqrt(a1) * math.expm1(-(1 + sde) * h)  # expm1: h is small at large N
            s = math.sqrt(-v1 * math.expm1(-2 * h)) if sde else 0.0
            coefs.append([*data[i], A, G, c, s])
        return coefs

    @staticmethod
    def guide(pred, t, cfg_scale, cfg_interval):
        """Classifier-free guidance of a doubled batch [cond; uncond] -> (N, ...): pred_u + s (pred_c - pred_u)
        inside the interval lo <= t < hi of eps timesteps (as the authors' code), the conditional one outside."""
        pred_c, pred_u = pred.chunk(2)
        lo, hi = cfg_interval
        if cfg_scale == 1 or not lo <= t < hi:
            return pred_c
        return pred_u + cfg_scale * (pred_c - pred_u)

    def step(self, x, pred, i, x0_prev, generator):
        """One step from index i to i - 1 -> (x', its data prediction x0: the multistep rule's, else None); x0_prev:
        the previous step's x0 (None at the first). The last step (i = 0) draws no noise."""
        if self.multistep:
            p, q, A, G, c, sigma = self.coefs[i]
            x0 = p * x + q * pred
            x = A * x + G * (x0 + c * (x0 - x0_prev) if c else x0)
        else:
            (c_x, c_pred, sigma), x0 = self.coefs[i], None
            x = c_x * x + c_pred * pred
        if i == 0 or sigma == 0:  # DDIM at eta = 0, Euler and DPM-Solver++'s ODE draw no noise
            return x, x0
        return x + sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype), x0

    def sample(self, predict, x, generator, cfg_scale=1.0, cfg_interval=(0, 1000), progress=None, step_size=False):
        """Denoise x (N, ...) from pure noise. predict(x, t) -> the model's prediction (eps, or flow's v), with t
        a timestep of the full schedule (flow: T t, a float); with cfg_scale > 1 it receives the doubled batch
        [x; x] (cond half first). cfg_interval: in eps timesteps for both objectives (guide_timesteps).
        step_size (a flow sampler of a step-size model): predict(x, t, d) also gets the step's size d in flow time."""
        if step_size and self.objective.kind != "flow":
            raise ValueError("a step-size model (distill/few_step.py) samples with a flow sampler")
        steps, x0 = reversed(range(len(self.timesteps))), None
        for i in (progress(steps) if progress else steps):
            t = self.model_timesteps[i]
            args = (t, self.step_sizes[i]) if step_size else (t,)
            if cfg_scale > 1:
                pred = self.guide(predict(torch.cat([x, x]), *args), self.guide_timesteps[i], cfg_scale, cfg_interval)
            else:
                pred = predict(x, *args)
            x, x0 = self.step(x, pred.to(x.dtype), i, x0, generator)
        return x


def ddpm_posterior(acp):
    """DDPM's tables (Ho et al. 2020) of the alpha_bar acp (N,) float64 a sampler visits, ADM-respaced: the betas
    whose products give those marginals, the fixed "large" variance, and the posterior mean's coefficients, mean =
    coef_x0 x0 + coef_xt x_t -> (betas, variance, coef_x0, coef_xt), each (N,)."""
    acp_prev = torch.cat([torch.ones(1, dtype=torch.float64), acp[:-1]])
    betas = 1 - acp / acp_prev
    posterior_variance = betas * (1 - acp_prev) / (1 - acp)
    # fixed "large"; one step (N = 1) adds no noise, so its variance is never used
    variance = torch.cat([posterior_variance[1:2], betas[1:]]) if len(acp) > 1 else betas
    coef_x0 = betas * acp_prev.sqrt() / (1 - acp)
    coef_xt = (1 - acp_prev) * (1 - betas).sqrt() / (1 - acp)
    return betas, variance, coef_x0, coef_xt


def weighted_mse(pred, target, weights):
    """Mean over tokens of weights (N, L) times each token's squared error (mean over its P values), (N, L, P)."""
    mse = (pred.float() - target).square().mean(dim=-1)  # (N, L)
    return (mse * weights).mean()


def draw_intervals(n, grids, fine_steps, generator, logit_mean=0.0, logit_std=1.0):
    """The steps a few-step model learns, one per sample: (start time t (N,), step size d (N,)) in flow time. A
    sample draws one of len(grids) + 1 kinds alike: a step of a k-step euler grid (t = i / k, i in 1..k, d = 1 / k;
    the grid the flow sampler visits at k steps) for each k of grids, or a fine step d = 1 / fine_steps at a
    logit-normal t (at least d), which keeps the model's many-step sampling."""
    kind = torch.randint(len(grids) + 1, (n,), generator=generator)
    k = torch.tensor([*grids, fine_steps], dtype=torch.float64)[kind]  # (N,)
    i = (torch.rand(n, generator=generator, dtype=torch.float64) * k).floor() + 1  # 1..k
    fine = torch.sigmoid(logit_mean + logit_std * torch.randn(n, generator=generator, dtype=torch.float64))
    d = 1 / k
    t = torch.where(kind == len(grids), fine.clamp(min=1 / fine_steps), i / k)
    return t.float(), d.float()


def guide_each(pred, scales):
    """Classifier-free guidance of a doubled batch [cond; uncond] (2N, L, P) at a scale per sample, scales (N,):
    pred_u + s (pred_c - pred_u), as guide's inside its interval (the distillation learns every scale it draws)."""
    pred_c, pred_u = pred.chunk(2)
    return pred_u + scales.view(-1, 1, 1) * (pred_c - pred_u)


@torch.no_grad()
def distill_target(v_fn, x, t, d, steps):
    """The teacher's ODE over [t - d, t] from x (N, ...) at times t (N,), in `steps` euler steps of d / steps:
    x at t - d. v_fn(x, t) -> the teacher's velocity at flow times t (N,)."""
    shape = (-1, *[1] * (x.dim() - 1))  # (N, 1, ...)
    h = d / steps
    for j in range(steps):
        x = x - h.view(shape) * v_fn(x, t - j * h)
    return x


def distill_loss(pred, x, x_end, d, weights):
    """The few-step loss: the AR-weighted MSE of the student's velocity pred (N, L, P) against the one whose euler
    step of size d (N,) takes x (at t) to the teacher's x_end (at t - d): (x - x_end) / d."""
    return weighted_mse(pred, (x - x_end) / d.view(-1, 1, 1), weights)
