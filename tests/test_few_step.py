"""Tests of the few-step distillation (distill/few_step.py; model.py step_size, diffusion.py distill_*): the option
off leaves the paper's model (parameters, initialization, outputs), a zero-initialized student is its teacher, the
teacher's target is a loop of euler steps, the learned steps are the sampler's grid, an exact resume, and sample.py
(S = 1, S = 4, CFG, editing) and the editor with the few-step checkpoint."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import mask
import sample
import train
from checkpoint import load_checkpoint, read_checkpoint
from diffusion import Sampler, distill_target, draw_intervals
from distill import few_step
from inference import make_diffusion, sample_batch
from model import CausalFusion
from test_editor import from_url, ok, run_command, server
from test_train import TINY, _tiny_data

SMALL = dict(hidden_size=32, depth=2, num_heads=2, input_size=8, patch_size=2, in_channels=3, num_classes=10)
DISTILL = ["--batch-size", "4", "--teacher-steps", "2", "--log-every", "1", "--ckpt-every", "2", "--warmup-steps", "2"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """(checkpoint, latents dir) of a 3-step tiny train.py flow run on 8x8 shapes (10 classes, 16 tokens), shared by
    this file's tests."""
    folder = str(tmp_path_factory.mktemp("teacher"))
    data = _tiny_data(os.path.join(folder, "shapes"))
    train.main(TINY + ["--data", data, "--out", os.path.join(folder, "teacher"), "--max-steps", "3",
                       "--grid-classes", "0", "--objective", "flow", "--timestep-sampling", "logit-normal"])
    return os.path.join(folder, "teacher", "ckpt.pt"), os.path.join(folder, "shapes", "latents")


def test_step_size_off_is_the_papers_model():
    # same seed: the option adds only d_embedder.*, registered last, so every other weight draws the same values
    torch.manual_seed(0)
    paper = CausalFusion(**SMALL)
    torch.manual_seed(0)
    few = CausalFusion(**SMALL, step_size=True)
    assert "step_size" not in paper.config and few.config["step_size"] is True
    extra = set(few.state_dict()) - set(paper.state_dict())
    assert extra and all(k.startswith("d_embedder.") for k in extra)
    for k, v in paper.state_dict().items():
        assert torch.equal(v, few.state_dict()[k]), k
    CausalFusion(**paper.config).load_state_dict(paper.state_dict(), strict=True)


def _training_forward(model, d=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, L = 3, model.num_tokens
    steps = mask.sample_step_ids(torch.tensor([1, 2, 4]), L, g)  # (N, L)
    order = mask.token_order(n, model.grid_size, model.grid_size, "random", g)
    clean, noisy = torch.randn(n, L, model.token_dim, generator=g), torch.randn(n, L, model.token_dim, generator=g)
    attn_mask = mask.causal_mask(steps, steps, model.num_prefix_tokens)
    with torch.no_grad():
        return model(clean, noisy, torch.rand(n, generator=g) * 1000, torch.tensor([1, 2, 10]), order, attn_mask, d=d)


def test_zero_initialized_student_is_its_teacher():
    torch.manual_seed(0)
    paper = CausalFusion(**SMALL).eval()
    with torch.no_grad():  # a trained-looking teacher: a fresh one's output layer is zero
        torch.nn.init.normal_(paper.final_layer[1].weight, std=0.3)
    student = few_step.build_student(paper, seed=1).eval()
    d = torch.tensor([1.0, 0.5, 0.25])
    assert torch.equal(_training_forward(paper), _training_forward(student, d))
    # through the KV cache: samples of the teacher's euler are the student's, diffusion and AR mode, with CFG
    for S in (1, 4):
        a = sample_batch(paper, make_diffusion(2, "euler", objective="flow"), torch.tensor([0, 3]), 7, ar_steps=S,
                         cfg_scale=3.0)
        b = sample_batch(student, make_diffusion(2, "euler", objective="flow"), torch.tensor([0, 3]), 7, ar_steps=S,
                         cfg_scale=3.0)
        assert torch.equal(a, b), S
    # a trained step-size embedding changes the output, and needs d
    torch.nn.init.normal_(student.d_embedder.mlp[2].weight)
    assert not torch.allclose(_training_forward(paper), _training_forward(student, d))
    with pytest.raises(ValueError):  # a step-size model does not run without a step size
        _training_forward(student)


def test_distill_target_is_a_loop_of_teacher_euler_steps():
    # per sample, by hand: M euler steps of d / M from t with a scalar time, against the batched per-sample target;
    # and for the linear ODE v = a x t its closed form prod(1 - a h t_j)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, 3, generator=g)
    t, d, M, a = torch.tensor([1.0, 0.75, 0.5, 0.3]), torch.tensor([1.0, 0.25, 0.5, 0.125]), 3, 0.7
    v_fn = lambda x, t: a * x * t.view(-1, 1, 1) + torch.sin(x)
    got = distill_target(v_fn, x, t, d, M)
    for i in range(4):
        xi, ti = x[i:i + 1], float(t[i])
        for _ in range(M):
            xi = xi + (-float(d[i]) / M) * v_fn(xi, torch.tensor([ti]))
            ti -= float(d[i]) / M
        assert torch.allclose(got[i:i + 1], xi, atol=1e-6), i
    linear = distill_target(lambda x, t: a * x * t.view(-1, 1, 1), x, t, d, M)
    h = d / M
    factor = torch.stack([(1 - a * h * (t - j * h)) for j in range(M)]).prod(0)  # (N,)
    assert torch.allclose(linear, x * factor.view(-1, 1, 1), atol=1e-6)


def test_learned_steps_are_the_samplers_grid_and_sample_passes_them():
    t, d = draw_intervals(2000, (1, 2, 4), 128, torch.Generator().manual_seed(0))
    seen = set()
    for k in (1, 2, 4):
        sampler = Sampler(steps=k, objective="flow")
        grid = {(round(float(ti), 6), round(di, 6)) for ti, di in zip(sampler.timesteps, sampler.step_sizes)}
        on = {(round(float(ti), 6), round(float(di), 6)) for ti, di in zip(t, d) if abs(di - 1 / k) < 1e-6}
        assert on == grid, (k, on, grid)  # every step of the grid drawn, nothing else
        seen |= on
    fine = d == 1 / 128
    assert fine.sum() > 300 and len(seen) == 7 and (t[fine] >= 1 / 128).all() and len(set(t[fine].tolist())) > 300
    # the sampler hands the model each step's size, first to last: (t, d) = (1, 0.25), (0.75, 0.25), ...
    calls = []
    Sampler(steps=4, objective="flow").sample(lambda x, t, d: calls.append((t, d)) or 0 * x, torch.zeros(1), None,
                                          step_size=True)
    assert calls == [(1000.0, 0.25), (750.0, 0.25), (500.0, 0.25), (250.0, 0.25)]


def test_distill_resumes_exactly_and_samples(teacher, tmp):
    ckpt, data = teacher
    base = DISTILL + ["--ckpt", ckpt, "--data", data]
    whole, part = os.path.join(tmp, "whole"), os.path.join(tmp, "part")
    few_step.main(base + ["--out", whole, "--max-steps", "4"])
    few_step.main(base + ["--out", part, "--max-steps", "2"])
    few_step.main(base + ["--out", part, "--max-steps", "4", "--resume"])
    a, b = read_checkpoint(os.path.join(whole, "ckpt.pt")), read_checkpoint(os.path.join(part, "ckpt.pt"))
    assert a["step"] == b["step"] == 4
    for key in ("model", "ema"):
        for name, value in a[key].items():
            assert torch.equal(value, b[key][name]), (key, name)
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    assert a["model"]["d_embedder.mlp.2.weight"].abs().sum() > 0  # the step-size embedding was trained
    lines = open(os.path.join(part, "metrics.jsonl")).read().splitlines()
    assert len(lines) == 4, lines
    # the checkpoint says what it is: sample.py needs no option beyond the step count
    model, meta = load_checkpoint(os.path.join(whole, "ckpt.pt"))
    assert model.step_size and meta["objective"] == "flow"
    path = os.path.join(whole, "ckpt.pt")
    for args in (["--steps", "1"], ["--steps", "2", "--ar-steps", "4", "--cfg-scale", "5"],
                 ["--steps", "1", "--ar-steps", "3", "--split", "random", "--order", "raster", "--cfg-scale", "2"],
                 ["--steps", "2", "--edit-class", "2", "--keep", "inner", "--classes", "1", "--ar-steps", "2"]):
        out = os.path.join(tmp, "samples_" + "_".join(args))
        sample.main(["--ckpt", path, "--num-samples", "2", "--out-dir", out] + args)
        assert any(f.endswith(".png") for f in os.listdir(out)), args
    # the editor: its answer at 1 step in AR mode with CFG is the image of the sample.py command it carries
    httpd = server(path)
    answer = ok(httpd, "/api/generate", {"class": 1, "seed": 2, "steps": 1, "cfg_scale": 2.0, "ar_steps": 2})
    out = os.path.join(tmp, "editor")
    run_command(answer["command"], out)
    assert np.array_equal(from_url(answer["image"]), np.asarray(Image.open(os.path.join(out, "000000.png"))))
