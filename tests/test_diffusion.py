"""Tests of diffusion.py's fast samplers (DDIM, DPM-Solver++(2M), its SDE form): step by step against
diffusers' schedulers, convergence order on Gaussian data whose probability-flow ODE has a closed form, the
errors, CFG's interval, determinism. Run with `python test_all.py diffusion` or pytest."""
import math
import re
import warnings

import pytest
import torch

from diffusion import SAMPLERS, Objective, Sampler, ddpm_posterior

torch.set_num_threads(1)

MU, S = 0.3, 0.5  # the data of the closed-form tests: N(MU, S^2) per coordinate


def gaussian_eps(d):
    """The exact E[eps | x_t] of N(MU, S^2) data: x_t ~ N(sqrt(a) MU, a S^2 + 1 - a)."""
    acp = d.objective.alphas_cumprod.tolist()

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
    assert torch.allclose(sched.alphas_cumprod.double(), d.objective.alphas_cumprod, rtol=1e-6, atol=0)
    sched.alphas_cumprod = d.objective.alphas_cumprod.clone()
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
        d = Sampler(steps=n, name="ddim", eta=eta, spacing="trailing")
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
            d = Sampler(steps=n, name="ddim", spacing=spacing)
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
                d = Sampler(steps=n, name=sampler, spacing=spacing)
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
        assert Sampler(steps=n, name="ddim", spacing="trailing").timesteps.flip(0).tolist() == sched.timesteps.tolist()


def test_spacings():
    for n in (1, 2, 5, 18, 40, 250, 999, 1000):
        uniform = Sampler(steps=n, name="ddim", spacing="uniform").timesteps
        assert torch.equal(uniform, Sampler(steps=n).timesteps)  # DDPM's set
        for spacing in ("uniform", "trailing", "logsnr"):
            ts = Sampler(steps=n, name="ddim", spacing=spacing).timesteps.tolist()
            assert len(ts) == n and ts == sorted(set(ts)) and 0 <= ts[0] and ts[-1] <= 999, (n, spacing, ts)
            assert n == 1 or ts[-1] == 999 and ts[0] == (round(1000 / n) - 1 if spacing == "trailing" else 0)
    # logsnr: the N points uniform in log-SNR, where no two land on one timestep
    d = Sampler(steps=10, name="dpm++", spacing="logsnr")
    acp = d.objective.alphas_cumprod[d.timesteps]
    lam = (acp / (1 - acp)).log().flip(0)
    assert d.timesteps[0] == 0 and (lam.diff().std() / lam.diff().mean()).abs() < 0.02
    assert Sampler(steps=1000, name="dpm++", spacing="logsnr").timesteps.tolist() == list(range(1000))
    assert Sampler(steps=5, name="ddim").spacing == "trailing" and Sampler(steps=5, name="dpm++").spacing == "trailing"


def convergence_slope(sampler, spacing, ns=(20, 40, 80, 160)):
    """Fitted slope of log error vs log N for the exact eps of Gaussian data, in float64. DDIM ends at
    alpha_bar = 1: its output against the ODE's solution there. DPM-Solver++'s output is the data prediction
    at its last timestep, off the ODE's solution by that prediction's bias whatever N: its state there (the x
    handed to eps_fn last) against the ODE's solution at that timestep."""
    x = torch.randn(512, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    errors = []
    for n in ns:
        d = Sampler(steps=n, name=sampler, spacing=spacing)
        seen, out = run(d, gaussian_eps(d), x)
        acp = d.objective.alphas_cumprod.tolist()
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
        d = Sampler(steps=n, name=sampler, eta=eta, spacing="logsnr")
        out = d.sample(gaussian_eps(d), x, torch.Generator().manual_seed(2))
        assert abs(out.mean() - MU) < 0.01 and abs(out.std() - S) < tol, (sampler, out.mean(), out.std())


def test_ddim_at_eta_one_is_ancestral_with_the_posterior_variance():
    """DDIM's eta = 1 is DDPM's step (same mean) with the "small" variance, the posterior's."""
    for n in (2, 10, 250):
        ddim, ddpm = Sampler(steps=n, name="ddim", eta=1.0, spacing="uniform"), Sampler(steps=n)
        acp = ddpm.objective.alphas_cumprod[ddpm.timesteps]
        acp_prev = torch.cat([torch.ones(1, dtype=torch.float64), acp[:-1]])
        posterior_variance = ddpm_posterior(acp)[0] * (1 - acp_prev) / (1 - acp)
        ours, theirs = (torch.tensor(d.coefs, dtype=torch.float64) for d in (ddim, ddpm))
        assert torch.allclose(ours[:, :2], theirs[:, :2], rtol=1e-9, atol=0), n
        assert torch.allclose(ours[:, 2].square(), posterior_variance, rtol=1e-9, atol=1e-300), n


def test_errors_name_the_options():
    for kwargs, option in ((dict(name="euler"), "--sampler"), (dict(name="ddpm", eta=0.0), "--eta"),
                           (dict(name="dpm++", eta=0.5), "--eta"), (dict(name="dpm++sde", eta=0.5), "--eta"),
                           (dict(name="ddim", eta=-0.1), "--eta"), (dict(name="ddim", eta=1.5), "--eta"),
                           (dict(steps=1, name="dpm++"), "--steps"),
                           (dict(steps=1, name="dpm++sde"), "--steps"),
                           (dict(steps=0, name="ddim"), "--steps"), (dict(steps=0), "--steps"),
                           (dict(steps=1001), "--steps"), (dict(name="ddim", spacing="leading"), "--spacing"),
                           (dict(name="ddpm", spacing="trailing"), "--spacing")):
        with pytest.raises(ValueError, match=re.escape(option)):
            Sampler(**{"steps": 10, **kwargs})
    with pytest.raises(ValueError) as excinfo:
        Sampler(steps=10, name="euler")
    assert all(s in str(excinfo.value) for s in SAMPLERS), excinfo.value


def test_one_eps_call_per_step():
    x = torch.randn(2, 3)
    for sampler in SAMPLERS:
        for n in (2, 3, 17):
            d = Sampler(steps=n, name=sampler)
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
        d = Sampler(steps=10, name=sampler)
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
        d = Sampler(steps=12, name=sampler, eta=eta)
        a, b, c = (d.sample(eps_fn, x, torch.Generator().manual_seed(s)) for s in (5, 5, 6))
        assert torch.equal(a, b), sampler
        assert torch.equal(a, c) == (sampler in ("ddim", "dpm++") and not eta), (sampler, eta)
        if torch.equal(a, c):  # the deterministic ones draw no noise at all
            g = torch.Generator().manual_seed(5)
            d.sample(eps_fn, x, g)
            assert torch.equal(g.get_state(), torch.Generator().manual_seed(5).get_state()), sampler
    d, ddpm = Sampler(steps=50), Sampler(steps=50, name="ddpm")
    assert d.coefs == ddpm.coefs and torch.equal(d.timesteps, ddpm.timesteps)
    assert torch.equal(d.sample(eps_fn, x, torch.Generator().manual_seed(1)),
                       ddpm.sample(eps_fn, x, torch.Generator().manual_seed(1)))


# ------------------------------------------------------------------------------------------ flow matching
def gaussian_velocity(x, t):
    """The exact E[eps - x0 | x_t] of N(MU, S^2) data on the flow path x_t = (1 - t) x0 + t eps (t in (0, 1]):
    x_t ~ N((1 - t) MU, V), V = (1 - t)^2 S^2 + t^2, Cov(x_t, x0) = (1 - t) S^2, Cov(x_t, eps) = t."""
    var = (1 - t) ** 2 * S * S + t * t
    return (t - (1 - t) * S * S) / var * (x - (1 - t) * MU) - MU


def flow_ode(x_start, t_start, t):
    """The flow ODE's solution for that data: it maps the standardized variable identically."""
    std = lambda u: math.sqrt((1 - u) ** 2 * S * S + u * u)
    return (1 - t) * MU + std(t) / std(t_start) * (x_start - (1 - t_start) * MU)


def test_flow_gaussian_velocity_and_ode_solution():
    """The two closed forms the flow samplers are tested against: the velocity is the least-squares regression of
    eps - x0 on x_t (drawn from the path), and the ODE's solution moves along it (dx/dt = v, by finite
    differences)."""
    g = torch.Generator().manual_seed(0)
    x0 = MU + S * torch.randn(400000, dtype=torch.float64, generator=g)
    eps = torch.randn(400000, dtype=torch.float64, generator=g)
    for t in (0.1, 0.5, 0.9):
        xt = (1 - t) * x0 + t * eps
        design = torch.stack([xt, torch.ones_like(xt)], 1)
        slope, intercept = torch.linalg.lstsq(design, (eps - x0)[:, None]).solution[:, 0].tolist()
        exact_slope = gaussian_velocity(1.0, t) - gaussian_velocity(0.0, t)
        assert abs(slope - exact_slope) < 0.01 and abs(intercept - gaussian_velocity(0.0, t)) < 0.01, t
        x = torch.linspace(-2, 2, 9, dtype=torch.float64)
        dt = 1e-6
        dxdt = (flow_ode(x, 1.0, t + dt) - flow_ode(x, 1.0, t - dt)) / (2 * dt)
        assert torch.allclose(dxdt, gaussian_velocity(flow_ode(x, 1.0, t), t), atol=1e-6), t


def wobbly_velocity(x, t):
    """A deterministic, nonlinear velocity of x and the model's timestep t = 1000 s."""
    return gaussian_velocity(x, t / 1000) + 0.1 * torch.sin(3 * x + t / 100)


def run_flow_diffusers(sched, v_fn, x, sigmas, seed=None):
    """A diffusers flow scheduler given our times as its sigmas (ending on 0) -> (states with the model's t, out)."""
    seen, gen = [], None if seed is None else torch.Generator().manual_seed(seed)
    for t in sched.timesteps.tolist():
        sigma = float(sigmas[len(seen)])
        seen.append((x, 1000 * sigma))
        x = sched.step(v_fn(x, 1000 * sigma), t, x, generator=gen).prev_sample
    return seen, x


def assert_same_flow_run(ours, theirs, tol):
    (seen, out), (seen_ref, out_ref) = ours, theirs
    assert len(seen) == len(seen_ref)
    for (x, t), (y, t_ref) in zip(seen, seen_ref):
        assert abs(t - t_ref) < 1e-3, (t, t_ref)
    for x, y in zip([x for x, _ in seen] + [out], [y for y, _ in seen_ref] + [out_ref]):
        err = (x - y).abs().max().item()
        assert err <= tol * max(1.0, y.abs().max().item()), err


def test_flow_euler_matches_diffusers():
    """FlowMatchEulerDiscreteScheduler (shift 1) given our times t = N/N .. 1/N as its sigmas: the same timesteps
    handed to the model (1000 t) and the same states at every step and at the end (float32: 1e-5)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    x = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))
    for n in (1, 2, 7, 30):
        d = Sampler(steps=n, objective="flow")
        assert d.name == "euler" and d.timesteps.tolist() == [i / n for i in range(1, n + 1)]
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
        sigmas = d.timesteps.flip(0).tolist()
        sched.set_timesteps(sigmas=sigmas)
        assert torch.allclose(sched.timesteps, torch.tensor(d.model_timesteps[::-1], dtype=torch.float32))
        assert_same_flow_run(run(d, wobbly_velocity, x), run_flow_diffusers(sched, wobbly_velocity, x, sigmas), 1e-5)


def test_flow_dpm_solver_pp_matches_diffusers():
    """DPM-Solver++(2M) and its SDE form along alpha = 1 - t, sigma = t: diffusers' DPMSolverMultistepScheduler with
    use_flow_sigmas and prediction_type "flow_prediction", its sigmas replaced by ours (1 .. 1/N, then 0); the first
    step from alpha = 0 (log-SNR -inf) is exact first order on both sides. The SDE's noise: one seed, as for eps."""
    from diffusers import DPMSolverMultistepScheduler
    x = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))
    for sampler, algorithm in (("dpm++", "dpmsolver++"), ("dpm++sde", "sde-dpmsolver++")):
        for n in (2, 3, 10, 40):
            d = Sampler(steps=n, name=sampler, objective="flow")
            sched = DPMSolverMultistepScheduler(num_train_timesteps=1000, algorithm_type=algorithm, solver_order=2,
                                                lower_order_final=True, use_flow_sigmas=True,
                                                prediction_type="flow_prediction")
            sched.set_timesteps(n)
            sigmas = d.timesteps.flip(0).tolist()
            sched.sigmas = torch.tensor(sigmas + [0.0], dtype=torch.float32)
            sched.timesteps = torch.tensor([round(1000 * s) for s in sigmas])
            seed = 3 if sampler == "dpm++sde" else None
            assert_same_flow_run(run(d, wobbly_velocity, x, seed), run_flow_diffusers(sched, wobbly_velocity, x, sigmas,
                                                                                       seed), 1e-5)


def flow_convergence_slope(sampler, ns=(20, 40, 80, 160)):
    """Fitted slope of log error vs log N of the output against the ODE's solution at t = 0, exact velocity of
    Gaussian data, float64."""
    x = torch.randn(512, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    errors = []
    for n in ns:
        d = Sampler(steps=n, name=sampler, objective="flow")
        seen, out = run(d, lambda x, t: gaussian_velocity(x, t / 1000), x)
        assert seen[0][1] == 1000.0 and torch.equal(seen[0][0], x)
        errors.append((out - flow_ode(x, 1.0, 0.0)).abs().max().item())
    logn, loge = torch.tensor(ns, dtype=torch.float64).log(), -torch.tensor(errors).log()
    slope = ((logn - logn.mean()) * (loge - loge.mean())).sum() / (logn - logn.mean()).square().sum()
    return slope.item(), errors


def test_flow_euler_first_order_dpm_solver_second_order():
    # DPM-Solver++ steps in log-SNR, and t = i / N puts long log-SNR steps at both ends (into t = 0, and out of
    # t = 1, where it is -inf): its order shows from N = 80 on (1.51 over N = 20..160, 1.78 over 80..640)
    slope, errors = flow_convergence_slope("euler")
    assert 0.8 < slope < 1.3, (slope, errors)
    slope, errors = flow_convergence_slope("dpm++", ns=(80, 160, 320, 640))
    assert 1.7 < slope < 2.5, (slope, errors)


def test_flow_sde_samples_the_data():
    """SDE-DPM-Solver++(2M) along the flow path with the exact velocity: the samples' mean and std (sampling error
    of the std 0.0025)."""
    x = torch.randn(20000, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    d = Sampler(steps=50, name="dpm++sde", objective="flow")
    out = d.sample(lambda x, t: gaussian_velocity(x, t / 1000), x, torch.Generator().manual_seed(2))
    assert abs(out.mean() - MU) < 0.01 and abs(out.std() - S) < 0.01, (out.mean(), out.std())


def test_flow_loss_and_min_snr_weights_brute_force():
    """q_sample, the loss and its min-SNR weights of both objectives against a loop over tokens written from the
    formulas (eps: x_t = sqrt(a) x0 + sqrt(1 - a) eps, target eps, weight min(SNR, 5) / SNR with SNR = a / (1 - a);
    flow: x_t = (1 - t) x0 + t eps, target eps - x0, weight min(SNR, 5) t^2 with SNR = ((1 - t) / t)^2), t per
    example and per token; and the derivation: the weighted loss is min(SNR, 5) times the squared error of the x0
    the prediction implies."""
    g = torch.Generator().manual_seed(0)
    n, L, P = 3, 4, 5
    x0, noise, pred = (torch.randn(n, L, P, generator=g) for _ in range(3))
    weights = torch.rand(n, L, generator=g) + 0.5
    acp = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0).tolist()
    for objective in ("eps", "flow"):
        d = Objective(objective)
        for shape in ((n,), (n, L)):
            t = torch.randint(0, 1000, shape, generator=g) if objective == "eps" else torch.rand(shape, generator=g)
            t[0] = 999 if objective == "eps" else 1.0  # the noisiest end too
            xt, expected, x0_form = d.q_sample(x0, t, noise), [0.0, 0.0], 0.0
            for i in range(n):
                for j in range(L):
                    u = float(t[i] if t.dim() == 1 else t[i, j])
                    if objective == "eps":
                        a = acp[int(u)]
                        x = math.sqrt(a) * x0[i, j] + math.sqrt(1 - a) * noise[i, j]
                        target, snr = noise[i, j], a / (1 - a)
                        w, x0_hat = min(snr, 5) / snr, (x - math.sqrt(1 - a) * pred[i, j]) / math.sqrt(a)
                    else:
                        x = (1 - u) * x0[i, j] + u * noise[i, j]
                        target, snr = noise[i, j] - x0[i, j], ((1 - u) / u) ** 2
                        w, x0_hat = min(snr, 5) * u * u, x - u * pred[i, j]
                    assert torch.allclose(xt[i, j], x.float(), atol=1e-6)
                    mse = (pred[i, j] - target).square().mean().item()
                    expected[0] += weights[i, j].item() * mse / (n * L)
                    expected[1] += weights[i, j].item() * w * mse / (n * L)
                    x0_form += weights[i, j].item() * min(snr, 5) * (x0_hat - x0[i, j]).square().mean().item() / (n * L)
            plain = d.loss(pred, x0, noise, t, weights)
            weighted = d.loss(pred, x0, noise, t, weights, "min-snr", 5.0)
            assert math.isclose(plain.item(), expected[0], rel_tol=1e-5), (objective, shape)
            assert math.isclose(weighted.item(), expected[1], rel_tol=1e-4), (objective, shape, weighted, expected)
            assert math.isclose(weighted.item(), x0_form, rel_tol=1e-3), (objective, shape, weighted, x0_form)


def test_timestep_draws():
    """uniform eps draws are the paper's randint (the same stream); logit-normal draws follow their distribution:
    flow's logit(t) ~ N(m, s^2) (Kolmogorov-Smirnov), eps's floor(1000 t) per bin of 100 timesteps (chi-square),
    fixed seeds."""
    from scipy import stats
    eps, flow = Objective(), Objective("flow")
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    assert torch.equal(eps.draw_timesteps((6, 2), g1), torch.randint(0, 1000, (6, 2), generator=g2))
    u = flow.draw_timesteps((20000,), torch.Generator().manual_seed(5))
    assert u.dtype == torch.float32 and 0 <= u.min() and u.max() < 1
    assert stats.kstest(u.numpy(), "uniform").pvalue > 0.01
    for m, s in ((0.0, 1.0), (0.5, 0.7)):
        t = flow.draw_timesteps((20000,), torch.Generator().manual_seed(6), "logit-normal", m, s).double()
        assert stats.kstest(torch.logit(t).numpy(), "norm", args=(m, s)).pvalue > 0.01, (m, s)
        assert stats.kstest(torch.logit(t).numpy(), "norm", args=(m + 0.05, s)).pvalue < 0.01  # it can fail
        k = eps.draw_timesteps((20000,), torch.Generator().manual_seed(7), "logit-normal", m, s)
        assert k.dtype == torch.long and 0 <= k.min() and k.max() <= 999
        edges = torch.linspace(0, 1, 11, dtype=torch.float64)
        cdf = stats.norm.cdf((torch.logit(edges).numpy() - m) / s)
        observed = torch.bincount(k // 100, minlength=10).numpy()
        assert stats.chisquare(observed, 20000 * (cdf[1:] - cdf[:-1])).pvalue > 0.01, (m, s, observed)
    with pytest.raises(ValueError) as excinfo:  # an unknown timestep sampling
        flow.draw_timesteps((2,), torch.Generator(), "lognorm")
    assert "--timestep-sampling" in str(excinfo.value) and "logit-normal" in str(excinfo.value), excinfo.value


def test_flow_cfg_interval_is_the_same_noise():
    """A flow time's eps timestep is the first of the 1000-step schedule with at most its SNR (brute force), and
    guidance runs exactly at the visited times whose eps timestep is in [lo, hi)."""
    d = Sampler(steps=16, name="dpm++", objective="flow")
    acp = d.objective.alphas_cumprod.tolist()
    for t, k in zip(d.timesteps.tolist(), d.guide_timesteps):
        snr = ((1 - t) / t) ** 2
        first = next((i for i in range(1000) if acp[i] / (1 - acp[i]) <= snr), 999)
        assert k == first, (t, k, first)
    assert d.guide_timesteps[-1] == 999 and len(set(d.guide_timesteps)) == 16
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    cond = lambda x, t: torch.tanh(x) * (1 + t / 1000)
    uncond = lambda x, t: 0.3 * x - t / 2000

    def pair(x, t):
        return torch.cat([cond(x[:3], t), uncond(x[3:], t)])
    eps_step = dict(zip(d.model_timesteps, d.guide_timesteps))
    for lo, hi in ((300, 700), (0, 1000), (0, 10)):
        by_hand = lambda x, t: uncond(x, t) + 3.0 * (cond(x, t) - uncond(x, t)) if lo <= eps_step[t] < hi else cond(x, t)
        guided = d.sample(pair, x, None, cfg_scale=3.0, cfg_interval=(lo, hi))
        assert torch.allclose(guided, d.sample(by_hand, x, None), atol=1e-6), (lo, hi)
    assert torch.equal(guided, d.sample(cond, x, None))  # (0, 10) holds none of them


def test_flow_errors_name_both():
    for kwargs, words in ((dict(objective="x0"), ("--objective", "eps", "flow")),
                          (dict(objective="flow", name="ddpm"), ("--sampler", "ddpm", "flow", "eps", "euler")),
                          (dict(objective="eps", name="euler"), ("--sampler", "euler", "flow", "eps", "ddpm")),
                          (dict(objective="flow", name="ddim"), ("--sampler", "ddim", "flow")),
                          (dict(objective="flow", spacing="trailing"), ("--spacing", "flow", "uniform")),
                          (dict(objective="flow", name="euler", eta=0.5), ("--eta", "euler"))):
        with pytest.raises(ValueError) as excinfo:
            Sampler(steps=10, **kwargs)
        assert all(w in str(excinfo.value) for w in words), (kwargs, excinfo.value)
    with pytest.raises(ValueError) as excinfo:  # an unknown loss weighting
        Objective("flow").loss(torch.zeros(1, 1, 1), torch.zeros(1, 1, 1), torch.zeros(1, 1, 1),
                               torch.zeros(1), torch.ones(1, 1), "snr")
    assert "--loss-weighting" in str(excinfo.value) and "min-snr" in str(excinfo.value), excinfo.value
