"""Tests of diffusion.py's fast samplers (DDIM, DPM-Solver++(2M), its SDE form): step by step against
diffusers' schedulers, convergence order on Gaussian data whose probability-flow ODE has a closed form, the
errors, CFG's interval, determinism. Run with `python test_all.py diffusion` or pytest."""
import math
import warnings

import torch

from diffusion import SAMPLERS, Diffusion

torch.set_num_threads(1)

MU, S = 0.3, 0.5  # the data of the closed-form tests: N(MU, S^2) per coordinate


def gaussian_eps(d):
    """The exact E[eps | x_t] of N(MU, S^2) data: x_t ~ N(sqrt(a) MU, a S^2 + 1 - a)."""
    acp = d.full_alphas_cumprod.tolist()

    def eps_fn(x, t):
        a = acp[t]
        return math.sqrt(1 - a) * (x - math.sqrt(a) * MU) / (a * S * S + 1 - a)
    return eps_fn


def pf_ode(x_start, a_start, a):
    """The probability-flow ODE's solution for that data: it maps the standardized variable identically."""
    return math.sqrt(a) * MU + math.sqrt(a * S * S + 1 - a) / math.sqrt(a_start * S * S + 1 - a_start) * (
        x_start - math.sqrt(a_start) * MU)


def wobbly_eps(d):
    """A deterministic, nonlinear eps_fn of x and t: the Gaussian one plus a wiggle."""
    exact = gaussian_eps(d)
    return lambda x, t: exact(x, t) + 0.1 * torch.sin(3 * x + t / 100)


def run(d, eps_fn, x, seed=None, **kw):
    """Our sample() -> (the states eps_fn saw, one per step, with their t; the output)."""
    seen = []

    def recording(x, t):
        seen.append((x, t))
        return eps_fn(x, t)
    out = d.sample(recording, x, None if seed is None else torch.Generator().manual_seed(seed), **kw)
    return seen, out


def run_diffusers(sched, eps_fn, x, seed=None, **step_kw):
    """The same with a diffusers scheduler (after set_timesteps) -> (states with t, output)."""
    seen, gen = [], None if seed is None else torch.Generator().manual_seed(seed)
    for t in sched.timesteps.tolist():
        seen.append((x, t))
        x = sched.step(eps_fn(x, t), t, x, generator=gen, **step_kw).prev_sample
    return seen, x


def assert_same_run(ours, theirs, tol):
    """Same timesteps, and the states (and outputs) agree within tol relative to the state's size."""
    (seen, out), (seen_ref, out_ref) = ours, theirs
    assert [t for _, t in seen] == [t for _, t in seen_ref]
    for (x, t), (y, _) in zip(seen + [(out, "out")], seen_ref + [(out_ref, "out")]):
        err = (x - y).abs().max().item()
        assert err <= tol * max(1.0, y.abs().max().item()), (t, err)


def schedule_like_ours(sched, d, **set_timesteps):
    """diffusers builds the same linear betas in float32; give it our float64 alphas_cumprod, so the
    comparison checks the solvers and not float32 cumprod rounding. Then its set_timesteps."""
    assert torch.allclose(sched.alphas_cumprod.double(), d.full_alphas_cumprod, rtol=1e-6, atol=0)
    sched.alphas_cumprod = d.full_alphas_cumprod.clone()
    with warnings.catch_warnings():  # numpy 2's about torch's __array__, in diffusers' np.array(tensor)
        warnings.simplefilter("ignore", DeprecationWarning)
        sched.set_timesteps(**set_timesteps)


LINEAR = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)


def test_ddim_matches_diffusers():
    """DDIMScheduler (set_alpha_to_one, trailing spacing: its steps assume t - T // N, so N divides T)
    at eta 0, 0.5 and 1, in float64, its noise drawn from the same generator as ours: states to 1e-10."""
    from diffusers import DDIMScheduler
    x = torch.randn(2, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for n, eta in ((10, None), (25, None), (20, 0.5), (50, 1.0)):
        d = Diffusion(n, sampler="ddim", eta=eta, spacing="trailing")
        sched = DDIMScheduler(**LINEAR, set_alpha_to_one=True, clip_sample=False, timestep_spacing="trailing")
        schedule_like_ours(sched, d, num_inference_steps=n)
        sched.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
        eps_fn = wobbly_eps(d)
        seed = None if eta is None else 7
        assert_same_run(run(d, eps_fn, x, seed), run_diffusers(sched, eps_fn, x, seed, eta=eta or 0.0), 1e-10)


def test_ddim_on_any_spacing_matches_diffusers_first_order_dpm_solver():
    """DDIM (eta 0) is first-order DPM-Solver++ (Lu et al. 2022); diffusers' DPMSolverMultistepScheduler
    takes custom timesteps, so this checks DDIM on every spacing. diffusers steps in float32: 1e-5."""
    from diffusers import DPMSolverMultistepScheduler
    x = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))
    for spacing in ("uniform", "trailing", "logsnr"):
        for n in (1, 7, 30):
            d = Diffusion(n, sampler="ddim", spacing=spacing)
            sched = DPMSolverMultistepScheduler(**LINEAR, algorithm_type="dpmsolver++", solver_order=1)
            schedule_like_ours(sched, d, timesteps=d.timesteps.flip(0).tolist())
            eps_fn = wobbly_eps(d)
            assert_same_run(run(d, eps_fn, x), run_diffusers(sched, eps_fn, x), 1e-5)


def test_dpm_solver_pp_2m_and_sde_match_diffusers():
    """DPMSolverMultistepScheduler(solver_order=2, lower_order_final=True, final_sigmas_type "zero",
    midpoint), "dpmsolver++" and "sde-dpmsolver++", our timesteps passed as its custom timesteps, float32 (its
    step casts to float32). The SDE's noise: diffusers draws randn(shape, float32) from the generator at every
    step, we at every step but the last (whose noise has weight 0), so one seed gives both the same noise.
    States at every step and the output to 1e-5 relative; N from 2 (first order both steps) to 40 (past
    diffusers' lower_order_final switch at 15)."""
    from diffusers import DPMSolverMultistepScheduler
    x = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))
    for sampler, algorithm in (("dpm++", "dpmsolver++"), ("dpm++sde", "sde-dpmsolver++")):
        for spacing in ("uniform", "trailing", "logsnr"):
            for n in (2, 3, 10, 40):
                d = Diffusion(n, sampler=sampler, spacing=spacing)
                sched = DPMSolverMultistepScheduler(**LINEAR, algorithm_type=algorithm, solver_order=2,
                                                    lower_order_final=True)
                schedule_like_ours(sched, d, timesteps=d.timesteps.flip(0).tolist())
                eps_fn, seed = wobbly_eps(d), 3 if sampler == "dpm++sde" else None
                assert_same_run(run(d, eps_fn, x, seed), run_diffusers(sched, eps_fn, x, seed), 1e-5)


def test_trailing_spacing_is_diffusers():
    """Ours is exact; diffusers' np.arange drifts off some .5 ties (N = 48, 96, ...), or adds a t = -1 (N = 61),
    so the comparison takes N where its arange is exact."""
    from diffusers import DPMSolverMultistepScheduler
    sched = DPMSolverMultistepScheduler(**LINEAR, timestep_spacing="trailing")
    for n in (1, 2, 3, 7, 10, 16, 20, 25, 50, 100, 250, 1000):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            sched.set_timesteps(n)
        assert Diffusion(n, sampler="ddim", spacing="trailing").timesteps.flip(0).tolist() == sched.timesteps.tolist()


def test_spacings():
    for n in (1, 2, 5, 18, 40, 250, 999, 1000):
        uniform = Diffusion(n, sampler="ddim", spacing="uniform").timesteps
        assert torch.equal(uniform, Diffusion(n).timesteps)  # DDPM's set
        for spacing in ("uniform", "trailing", "logsnr"):
            ts = Diffusion(n, sampler="ddim", spacing=spacing).timesteps.tolist()
            assert len(ts) == n and ts == sorted(set(ts)) and 0 <= ts[0] and ts[-1] <= 999, (n, spacing, ts)
            assert n == 1 or ts[-1] == 999 and ts[0] == (round(1000 / n) - 1 if spacing == "trailing" else 0)
    # logsnr: the N points uniform in log-SNR, where no two land on one timestep
    d = Diffusion(10, sampler="dpm++", spacing="logsnr")
    lam = (d.alphas_cumprod / (1 - d.alphas_cumprod)).log().flip(0)
    assert d.timesteps[0] == 0 and (lam.diff().std() / lam.diff().mean()).abs() < 0.02
    assert Diffusion(1000, sampler="dpm++", spacing="logsnr").timesteps.tolist() == list(range(1000))
    assert Diffusion(5, sampler="ddim").spacing == "trailing" and Diffusion(5, sampler="dpm++").spacing == "trailing"


def convergence_slope(sampler, spacing, ns=(20, 40, 80, 160)):
    """Fitted slope of log error vs log N for the exact eps of Gaussian data, in float64. DDIM ends at
    alpha_bar = 1: its output against the ODE's solution there. DPM-Solver++'s output is the data prediction
    at its last timestep, off the ODE's solution by that prediction's bias whatever N: its state there (the x
    handed to eps_fn last) against the ODE's solution at that timestep."""
    x = torch.randn(512, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    errors = []
    for n in ns:
        d = Diffusion(n, sampler=sampler, spacing=spacing)
        seen, out = run(d, gaussian_eps(d), x)
        acp = d.full_alphas_cumprod.tolist()
        (x_start, t_start), (x_end, t_end) = seen[0], seen[-1]
        if sampler == "ddim":
            x_end, a_end = out, 1.0
        else:
            a_end = acp[t_end]
            x0 = (x_end - math.sqrt(1 - a_end) * gaussian_eps(d)(x_end, t_end)) / math.sqrt(a_end)
            assert torch.allclose(out, x0)
        errors.append((x_end - pf_ode(x_start, acp[t_start], a_end)).abs().max().item())
    logn, loge = torch.tensor(ns, dtype=torch.float64).log(), -torch.tensor(errors).log()
    slope = ((logn - logn.mean()) * (loge - loge.mean())).sum() / (logn - logn.mean()).square().sum()
    return slope.item(), errors


def test_ddim_converges_at_first_order():
    for spacing in ("uniform", "logsnr"):
        slope, errors = convergence_slope("ddim", spacing)
        assert 0.7 < slope < 1.4, (spacing, slope, errors)


def test_dpm_solver_pp_converges_at_second_order():
    # spacing uniform in log-SNR, the variable DPM-Solver steps in: with uniform t the log-SNR step into t = 0
    # is large at small N (the slope reaches 2 only past N = 40), trailing spacing moves the last timestep
    # with N; both hide the order
    slope, errors = convergence_slope("dpm++", "logsnr")
    assert 1.6 < slope < 2.6, (slope, errors)


def test_stochastic_samplers_sample_the_data():
    """DDIM at eta 1 and DPM-Solver++(2M) SDE with the exact eps of N(MU, S^2): the samples' mean and std (a
    wrong noise scale moves the std; the std's sampling error is 0.0025). Both approach S as N grows, DDIM at
    eta 1 slowly (0.45 at N = 50, 0.49 at 200)."""
    x = torch.randn(20000, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for sampler, eta, n, tol in (("ddim", 1.0, 200, 0.02), ("dpm++sde", None, 50, 0.01)):
        d = Diffusion(n, sampler=sampler, eta=eta, spacing="logsnr")
        out = d.sample(gaussian_eps(d), x, torch.Generator().manual_seed(2))
        assert abs(out.mean() - MU) < 0.01 and abs(out.std() - S) < tol, (sampler, out.mean(), out.std())


def test_ddim_at_eta_one_is_ancestral_with_the_posterior_variance():
    """DDIM's eta = 1 is DDPM's step (same mean) with the "small" variance, the posterior's."""
    for n in (2, 10, 250):
        ddim, ddpm = Diffusion(n, sampler="ddim", eta=1.0, spacing="uniform"), Diffusion(n)
        acp_prev = torch.cat([torch.ones(1, dtype=torch.float64), ddpm.alphas_cumprod[:-1]])
        posterior_variance = ddpm.betas * (1 - acp_prev) / (1 - ddpm.alphas_cumprod)
        ours, theirs = (torch.tensor(d.step_coefs, dtype=torch.float64) for d in (ddim, ddpm))
        assert torch.allclose(ours[:, :2], theirs[:, :2], rtol=1e-9, atol=0), n
        assert torch.allclose(ours[:, 2].square(), posterior_variance, rtol=1e-9, atol=1e-300), n


def test_errors_name_the_options():
    for kwargs, option in ((dict(sampler="euler"), "--sampler"), (dict(sampler="ddpm", eta=0.0), "--eta"),
                           (dict(sampler="dpm++", eta=0.5), "--eta"), (dict(sampler="dpm++sde", eta=0.5), "--eta"),
                           (dict(sampler="ddim", eta=-0.1), "--eta"), (dict(sampler="ddim", eta=1.5), "--eta"),
                           (dict(sample_steps=1, sampler="dpm++"), "--steps"),
                           (dict(sample_steps=1, sampler="dpm++sde"), "--steps"),
                           (dict(sample_steps=0, sampler="ddim"), "--steps"), (dict(sample_steps=0), "--steps"),
                           (dict(sample_steps=1001), "--steps"), (dict(sampler="ddim", spacing="leading"), "--spacing"),
                           (dict(sampler="ddpm", spacing="trailing"), "--spacing")):
        try:
            Diffusion(**{"sample_steps": 10, **kwargs})
        except ValueError as e:
            assert option in str(e), (kwargs, e)
        else:
            raise AssertionError(f"{kwargs} was accepted")
    try:
        Diffusion(10, sampler="euler")
    except ValueError as e:
        assert all(s in str(e) for s in SAMPLERS), e


def test_one_eps_call_per_step():
    x = torch.randn(2, 3)
    for sampler in SAMPLERS:
        for n in (2, 3, 17):
            d = Diffusion(n, sampler=sampler)
            seen, _ = run(d, lambda x, t: 0.5 * x, x, seed=0)
            assert [t for _, t in seen] == d.timesteps.flip(0).tolist(), sampler
            wrapped = []

            def progress(steps):  # as tqdm: wraps the iterable of steps
                wrapped.append(list(steps))
                return wrapped[-1]
            d.sample(lambda x, t: 0.5 * x, x, torch.Generator().manual_seed(0), progress=progress)
            assert len(wrapped) == 1 and len(wrapped[0]) == n


def test_cfg_interval_for_every_sampler():
    """Guidance only at visited t with lo <= t < hi: the doubled-batch run equals a single-batch run whose
    eps_fn guides by hand at exactly those t; an interval holding no visited t gives the conditional run."""
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    cond = lambda x, t: torch.tanh(x) * (1 + t / 1000)
    uncond = lambda x, t: 0.3 * x - t / 2000

    def pair(x, t):
        assert x.shape[0] == 6 and torch.equal(x[:3], x[3:])
        return torch.cat([cond(x[:3], t), uncond(x[3:], t)])
    for sampler in SAMPLERS[1:]:
        d = Diffusion(10, sampler=sampler)
        assert d.timesteps.tolist() == [99, 199, 299, 399, 499, 599, 699, 799, 899, 999]
        for lo, hi in ((300, 700), (0, 1000), (100, 199)):
            by_hand = lambda x, t: uncond(x, t) + 4.0 * (cond(x, t) - uncond(x, t)) if lo <= t < hi else cond(x, t)
            guided = d.sample(pair, x, torch.Generator().manual_seed(1), cfg_scale=4.0, cfg_interval=(lo, hi))
            assert torch.allclose(guided, d.sample(by_hand, x, torch.Generator().manual_seed(1)), atol=1e-6)
        conditional = d.sample(cond, x, torch.Generator().manual_seed(1))
        assert torch.equal(guided, conditional), sampler  # (100, 199) holds none of them
        assert not torch.allclose(d.sample(pair, x, torch.Generator().manual_seed(1), cfg_scale=4.0), conditional)


def test_determinism_and_ddpm_untouched():
    x = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))
    eps_fn = lambda x, t: torch.sin(x) * t / 1000
    for sampler, eta in (("ddpm", None), ("ddim", None), ("ddim", 0.5), ("dpm++", None), ("dpm++sde", None)):
        d = Diffusion(12, sampler=sampler, eta=eta)
        a, b, c = (d.sample(eps_fn, x, torch.Generator().manual_seed(s)) for s in (5, 5, 6))
        assert torch.equal(a, b), sampler
        assert torch.equal(a, c) == (sampler in ("ddim", "dpm++") and not eta), (sampler, eta)
        if torch.equal(a, c):  # the deterministic ones draw no noise at all
            g = torch.Generator().manual_seed(5)
            d.sample(eps_fn, x, g)
            assert torch.equal(g.get_state(), torch.Generator().manual_seed(5).get_state()), sampler
    d, ddpm = Diffusion(50), Diffusion(50, sampler="ddpm")
    assert d.step_coefs == ddpm.step_coefs and torch.equal(d.timesteps, ddpm.timesteps)
    assert torch.equal(d.sample(eps_fn, x, torch.Generator().manual_seed(1)),
                       ddpm.sample(eps_fn, x, torch.Generator().manual_seed(1)))
