"""Tests of train.py and train_step.py: DDP = one process, exact resume, non-finite loss, the demo learns, refused
checkpoints.

Tiny runs on 8x8-pixel shapes (16 tokens), each in its own temporary directory; the DDP test launches
`torchrun --nproc_per_node=2` (gloo, CPU) in a subprocess.
"""
import json
import os
import re
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

import demos
import tokenization
import mask
import runtime
import train
import train_monitor
import train_step
from train_step import StepOptions
from diffusion import Objective
from latents import LatentData, extract
from model import CausalFusion, patchify

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout
TINY = [os.path.join(ROOT, "tests", "recipe_tiny.py")]  # the tests' recipe: the tiny model, batch 8, a log line a step


def _tiny_data(root, size=8, per_class=4):
    """The demo's shapes at `size` pixels, extracted in pixel space; returns the extraction directory."""
    images, labels = demos.draw_shapes(per_class, size, seed=0)
    for i, (image, label) in enumerate(zip(images, labels)):
        os.makedirs(os.path.join(root, "images", str(label)), exist_ok=True)
        Image.fromarray(image).save(os.path.join(root, "images", str(label), f"{i}.png"))
    extract(os.path.join(root, "images"), os.path.join(root, "latents"), vae="none", image_size=size, num_workers=0)
    return os.path.join(root, "latents")


def _draw(data, model, indices, cfg, tokenizer=None):
    """train_step.draw_micro_batch of micro-batch 0 of step 0 (seed 0) with the step options and objective of a
    train.py config."""
    return train_step.draw_micro_batch(data, model, indices, runtime.seeded(0, 1, 0, 0),
                                       options=StepOptions.from_config(cfg),
                                       objective=Objective(cfg["objective"]), tokenizer=tokenizer)


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _same_state(a, b, atol=0.0):
    """Equal nested state dicts (exactly, or within atol)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_state(a[k], b[k], atol) for k in a)
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b) if atol == 0 else torch.allclose(a, b, rtol=0, atol=atol)
    return a == b


def test_micro_batch_draws(tmp):
    data = LatentData(_tiny_data(tmp))
    model = CausalFusion("T", input_size=8, patch_size=2, in_channels=3, num_classes=10)
    cfg = dict(train.config, per_step_t=True, class_dropout=0.5)
    idx = runtime.step_indices(0, 16, len(data), seed=0)
    b = _draw(data, model, idx, cfg)
    clean, noise, t, y, order, steps = (b[k] for k in ("clean", "noise", "t", "y", "order", "steps"))
    assert clean.shape == noise.shape == (16, 16, 12) and t.shape == steps.shape == order.shape == (16, 16)
    # clean tokens: the latents drawn by LatentData.batch with the same stream, in each sample's AR order
    x, labels = data.batch(idx, runtime.seeded(0, 1, 0, 0))
    tokens = patchify(x, 2)
    assert torch.equal(clean, tokens.gather(1, order[..., None].expand_as(tokens)))
    # per-step t: one timestep per AR step (all slots of a step agree; a new step draws again)
    same_step = steps[:, 1:] == steps[:, :-1]
    assert (t[:, 1:] == t[:, :-1])[same_step].all() and (t[:, 1:] != t[:, :-1])[~same_step].float().mean() > 0.9
    assert ((y == model.null_class) | (y == labels)).all() and 0 < (y == model.null_class).sum() < 16
    # the data order: each epoch visits every sample once (the last partial batch dropped)
    epoch = torch.cat([runtime.step_indices(s, 8, len(data), seed=0) for s in range(len(data) // 8)])
    assert torch.equal(epoch.sort().values, torch.arange(len(data)))


def test_ddp_two_processes_match_one_process(tmp):
    # the 2 ranks draw micro-batches 0 and 1 of the global batch; one process with 2 accumulated micro-batches
    # draws the same ones, so the rank-averaged loss and the weights agree to float rounding
    args = TINY + ["--data", _tiny_data(tmp), "--max-steps", "3"]
    one = train.main(args + ["--out", os.path.join(tmp, "one"), "--device-batch-size", "4"])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                          "train.py", *args, "--out", os.path.join(tmp, "two")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    with open(os.path.join(tmp, "two", "train.log")) as f:
        two_losses = [float(v) for v in re.findall(r"\| loss ([0-9.e+-]+)", f.read())]
    assert len(two_losses) == 3 and np.allclose(two_losses, one["losses"], rtol=0, atol=1e-6), \
        (two_losses, one["losses"])
    a, b = _load(os.path.join(tmp, "one", "ckpt.pt")), _load(os.path.join(tmp, "two", "ckpt.pt"))
    assert a["step"] == b["step"] == 3
    # 1e-5: the sums run in another order. k_norm.bias is left out: its gradient is zero in exact arithmetic (a
    # key offset does not change softmax), and Adam with the authors' eps 1e-15 turns the rounding noise left in
    # its place into full lr-size steps of random sign, different in every summation order
    same = lambda sd: {k: v for k, v in sd.items() if not k.endswith("k_norm.bias")}
    assert _same_state(same(a["model"]), same(b["model"]), atol=1e-5), \
        [k for k in same(a["model"]) if not torch.allclose(a["model"][k], b["model"][k], rtol=0, atol=1e-5)]
    assert _same_state(same(a["ema"]), same(b["ema"]), atol=1e-5)


def test_resume_after_kill_while_saving_reproduces_straight_run(tmp, monkeypatch):
    args = TINY + ["--data", _tiny_data(tmp), "--ckpt-every", "2"]
    straight = train.main(args + ["--max-steps", "6", "--out", os.path.join(tmp, "a")])
    # the second run dies in the middle of writing its step-4 checkpoint
    out, real_save, saves = os.path.join(tmp, "b"), torch.save, []

    def dying_save(obj, f):
        saves.append(obj["step"])
        if obj["step"] == 4:
            f.write(b"half a checkpoint")
            raise KeyboardInterrupt("killed")
        real_save(obj, f)

    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):  # the run dies
        m.setattr(torch, "save", dying_save)
        train.main(args + ["--max-steps", "6", "--out", out])
    assert saves == [2, 4] and _load(os.path.join(out, "ckpt.pt"))["step"] == 2  # the old one, whole
    resumed = train.main(args + ["--max-steps", "6", "--out", out, "--resume"])
    a, b = _load(os.path.join(tmp, "a", "ckpt.pt")), _load(os.path.join(out, "ckpt.pt"))
    assert b["step"] == 6 and resumed["losses"] == straight["losses"][2:]
    for key in ("model", "ema", "optimizer"):
        assert _same_state(a[key], b[key]), key


def test_non_finite_loss_stops_and_keeps_the_checkpoint(tmp, monkeypatch):
    out, real_losses, calls = os.path.join(tmp, "run"), train.forward_losses, []

    def loss_nan_at_step_3(*a, **kw):
        calls.append(1)
        losses = real_losses(*a, **kw)
        return tuple(x * float("nan") if len(calls) == 3 and x is not None else x for x in losses)

    monkeypatch.setattr(train, "forward_losses", loss_nan_at_step_3)
    with pytest.raises(FloatingPointError) as excinfo:  # a NaN loss stops training
        # read back at step 4 (a checkpoint step, not a log step): named as step 3, and nothing saved
        train.main(TINY + ["--data", _tiny_data(tmp), "--ckpt-every", "2", "--log-every", "10", "--max-steps",
                           "5", "--out", out])
    assert "step 3" in str(excinfo.value) and "non-finite" in str(excinfo.value), excinfo.value
    ckpt = _load(os.path.join(out, "ckpt.pt"))
    assert ckpt["step"] == 2 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_training_steps_read_nothing_back_from_the_device(tmp):
    # the step loop may read device values (an implicit GPU sync) only at log and checkpoint steps. Count the
    # host reads (item, tolist, bool, float, int) made by the project's own code outside the data draw, which
    # works on host tensors by design: 8 steps must make exactly as many as 4 steps (the end's logging and grid)
    names = ("item", "tolist", "__bool__", "__float__", "__int__")
    real = {name: getattr(torch.Tensor, name) for name in names}
    ours = {os.path.join(ROOT, f) for f in ("train.py", "model.py", "diffusion.py", "mask.py", "sample.py")}
    reads, in_data = [], [False]

    def counting(name):
        def read(self, *a, **kw):
            frame = sys._getframe(1)
            if frame.f_code.co_filename in ours and not in_data[0]:
                reads.append(f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno} {name}")
            return real[name](self, *a, **kw)
        return read

    real_draw = train_step.draw_micro_batch

    def draw(*a, **kw):
        in_data[0] = True
        try:
            return real_draw(*a, **kw)
        finally:
            in_data[0] = False

    args = TINY + ["--data", _tiny_data(tmp), "--log-every", "100", "--ckpt-every", "100"]
    counts = {}
    try:
        train_step.draw_micro_batch = draw
        for name in names:
            setattr(torch.Tensor, name, counting(name))
        for steps in (4, 8):
            reads.clear()
            train.main(args + ["--max-steps", str(steps), "--out", os.path.join(tmp, str(steps))])
            counts[steps] = sorted(reads)
    finally:
        train_step.draw_micro_batch = real_draw
        for name in names:
            setattr(torch.Tensor, name, real[name])
    assert counts[4] and counts[8] == counts[4], Counter(counts[8]) - Counter(counts[4])  # the reads per step


def test_demo_loss_falls_and_writes_outputs(tmp):
    # the demo's pipeline (shapes -> ImageFolder -> pixel-space extraction -> training), at 8 px
    summary = train.main(["--out", tmp, "--demo-image-size", "8", "--patch-size", "2", "--demo-per-class", "16",
                          "--batch-size", "32", "--max-steps", "80", "--warmup-steps", "10", "--ema-decay", "0.99",
                          "--log-every", "20", "--grid-every", "0", "--grid-per-class", "2", "--grid-steps",
                          "10", "--eval-per-class", "2"])
    losses = summary["losses"]
    assert np.mean(losses[-10:]) < 0.4 * np.mean(losses[:3]), (losses[:3], losses[-10:])
    ckpt = _load(os.path.join(tmp, "ckpt.pt"))
    assert ckpt["step"] == 80 and ckpt["data"]["latent_shape"] == [3, 8, 8] and ckpt["data"]["vae"] == "none"
    assert ckpt["model_config"]["input_size"] == 8 and ckpt["data"]["num_classes"] == 10
    assert os.path.exists(os.path.join(tmp, "samples_0000080.png")) and 0 <= summary["nn_accuracy"] <= 1
    assert summary["nn_accuracy_real"] >= 0.9  # fresh real images: their nearest training image is same-class
    assert summary["kid"] > summary["kid_real"]  # 80 steps: far from the real images, which are near each other


def test_caption_demo_and_its_yardstick_run_end_to_end(tmp):
    # --demo captions (with a learned BPE) and --demo combinations, its class-conditional yardstick on the same
    # images: their closing figures, each attribute and all four at once
    common = TINY + ["--demo-image-size", "16", "--demo-images", "64", "--max-steps", "3", "--flip", "false",
                          "--eval-per-class", "4"]
    text = train.main(common + ["--demo", "captions", "--learn-tokenizer", "400", "--text-len", "10",
                                "--out", os.path.join(tmp, "t")])
    yardstick = train.main(common + ["--demo", "combinations", "--out", os.path.join(tmp, "c")])
    keys = {"colour", "position", "size", "shape", "all"}
    for figures in (text["t2i_seen"], text["t2i_held_out"], text["captions_seen"], yardstick["c2i_seen"]):
        assert set(figures) == keys and all(0 <= v <= 1 for v in figures.values()), figures
        assert figures["all"] <= min(figures[k] for k in keys - {"all"})
    ckpt = _load(os.path.join(tmp, "c", "ckpt.pt"))
    assert ckpt["data"]["num_classes"] == len(set(ckpt["data"]["class_names"])) > 10 and "tokenizer" not in ckpt
    log = open(os.path.join(tmp, "c", "train.log")).read()
    assert re.search(r"class-to-image, [1-4] seen combinations: colour", log), log
    assert _load(os.path.join(tmp, "t", "ckpt.pt"))["tokenizer"]["kind"] == "bpe"
    with pytest.raises(ValueError, match="combinations"):  # --demo combination
        train.main(common + ["--demo", "combination", "--out", os.path.join(tmp, "x")])


def test_default_step_is_the_papers_formula(tmp):
    # the default options draw what the step drew before --objective existed, in the same order from the same
    # stream (latents, label dropout, order, split, randint timesteps, noise), and the loss is bit for bit the
    # paper's AR-weighted eps MSE at x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
    data = LatentData(_tiny_data(tmp))
    model = CausalFusion("T", input_size=8, patch_size=2, in_channels=3, num_classes=10).eval()
    torch.nn.init.normal_(model.final_layer[1].weight, std=0.02)
    idx = torch.arange(8)
    b = _draw(data, model, idx, train.config)
    g = runtime.seeded(0, 1, 0, 0)
    x, _ = data.batch(idx, g, flip=True)
    torch.rand(8, generator=g)  # the label dropout
    order = mask.token_order(8, 4, 4, "random", g, 2)
    steps = mask.sample_step_ids(mask.sample_num_steps(8, 16, 0.9, g), 16, g)
    t = torch.randint(0, 1000, (8, 1), generator=g)[:, 0]
    noise = torch.randn(8, 16, 12, generator=g)
    assert torch.equal(b["order"], order) and torch.equal(b["steps"], steps) and torch.equal(b["t"], t)
    assert torch.equal(b["noise"], noise)
    with torch.no_grad():
        loss = train_step.forward_losses(model, model, Objective(), b, StepOptions.defaults())[0]
        acp = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)[t].float()[:, None, None]
        xt = acp.sqrt() * b["clean"] + (1 - acp).sqrt() * noise
        attn = mask.causal_mask(steps, steps, model.num_prefix_tokens)
        eps = model(b["clean"], xt, t, b["y"], order, attn, clean_pos=order)
    paper = ((eps - noise).square().mean(-1) * mask.ar_weights(steps, 2.0)).mean()
    assert torch.equal(loss, paper), (loss, paper)
    assert StepOptions.defaults() == StepOptions.from_config(train.config)  # read from train.py's source


def test_flow_run_trains_resumes_and_refuses_another_objective(tmp):
    # --objective flow with logit-normal timesteps and min-SNR weights: flow's draws (float t in [0, 1]), a loss
    # that falls on the demo's shapes, the objective in the checkpoint, an exact resume; another objective on
    # --resume, and options that do not apply, are errors naming them
    flow = ["--objective", "flow", "--timestep-sampling", "logit-normal", "--loss-weighting", "min-snr"]
    args = TINY + ["--data", _tiny_data(tmp), "--ckpt-every", "2"] + flow
    straight = train.main(args + ["--max-steps", "4", "--out", os.path.join(tmp, "a")])
    out = os.path.join(tmp, "b")
    train.main(args + ["--max-steps", "2", "--out", out])
    resumed = train.main(args + ["--max-steps", "4", "--out", out, "--resume"])
    assert resumed["losses"] == straight["losses"][2:]
    a, b = _load(os.path.join(tmp, "a", "ckpt.pt")), _load(os.path.join(out, "ckpt.pt"))
    assert a["config"]["objective"] == "flow" and _same_state(a["model"], b["model"])
    assert os.path.exists(os.path.join(out, "samples_0000004.png"))  # the grid: euler, the flow default
    b = _draw(LatentData(os.path.join(tmp, "latents")), CausalFusion("T", input_size=8, num_classes=10),
              torch.arange(8), dict(train.config, objective="flow", timestep_sampling="logit-normal"))
    assert b["t"].dtype == torch.float32 and 0 < b["t"].min() and b["t"].max() < 1
    for extra, words in ((["--objective", "eps"], ("--objective flow", "--objective eps")),
                         (["--objective", "x0"], ("--objective", "x0")),
                         (["--timestep-sampling", "lognorm"], ("--timestep-sampling", "logit-normal")),
                         (["--loss-weighting", "snr"], ("--loss-weighting", "min-snr")),
                         (["--loss-weighting", "none", "--snr-gamma", "3"], ("--snr-gamma", "min-snr")),
                         (["--timestep-sampling", "uniform", "--logit-std", "2"], ("--logit-std", "logit-normal")),
                         (["--grid-sampler", "ddpm"], ("--sampler", "ddpm", "flow"))):
        with pytest.raises(ValueError) as excinfo:
            train.main(args + ["--max-steps", "6", "--out", out, "--resume"] + extra)
        assert all(w in str(excinfo.value) for w in words), (extra, excinfo.value)
    assert _load(os.path.join(out, "ckpt.pt"))["step"] == 4


def test_checkpoint_of_other_size_or_latent_shape_is_refused(tmp):
    out = os.path.join(tmp, "run")
    train.main(TINY + ["--data", _tiny_data(tmp), "--max-steps", "1", "--out", out])
    with pytest.raises(ValueError) as excinfo:  # another size
        train.main(TINY + ["--data", os.path.join(tmp, "latents"), "--size", "S", "--out", out, "--resume"])
    assert "model configuration" in str(excinfo.value) and "'hidden_size': (128, 384)" in str(excinfo.value), \
        excinfo.value
    other = _tiny_data(os.path.join(tmp, "other"), size=12)
    with pytest.raises(ValueError) as excinfo:  # another latent shape
        train.main(TINY + ["--data", other, "--out", out, "--resume"])
    assert "data configuration" in str(excinfo.value), excinfo.value
    assert "'latent_shape': ([3, 8, 8], [3, 12, 12])" in str(excinfo.value), excinfo.value
    with pytest.raises(FileExistsError, match="--resume"):  # an existing run is not overwritten
        train.main(TINY + ["--data", other, "--out", out])


# ------------------------------------------------------------------------------------------ captioned data
def _captioned_data(root, size=8, per_class=2):
    """The demo's shapes with captions ("a circle", or two captions for odd images) in a metadata.jsonl folder,
    extracted in pixel space; returns the extraction directory."""
    images, labels = demos.draw_shapes(per_class, size, seed=0)
    folder = os.path.join(root, "images")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
        for i, (image, label) in enumerate(zip(images, labels)):
            name = list(demos.SHAPES)[label]
            Image.fromarray(image).save(os.path.join(folder, f"{i}.png"))
            text = [f"a {name}", f"one {name} only"] if i % 2 else f"a {name}"
            f.write(json.dumps({"file_name": f"{i}.png", "text": text}) + "\n")
    extract(folder, os.path.join(root, "latents"), vae="none", image_size=size, num_workers=0)
    return os.path.join(root, "latents")


def test_captioned_micro_batch_draws(tmp):
    data = LatentData(_captioned_data(tmp, per_class=4))
    tok = tokenization.ByteTokenizer()
    model = CausalFusion("T", input_size=8, patch_size=2, in_channels=3, num_classes=0,
                               text_vocab=tok.vocab_size, text_len=12)
    cfg = dict(train.config, text_len=12, flip=False)
    idx = torch.arange(40)
    b = _draw(data, model, idx, cfg, tok)
    assert b["text"].shape == (40, 12) and b["text_len"].shape == b["text_after"].shape == (40,)
    drawn = []
    for i in range(40):  # each example's text is one of its image's captions, cut to 12 tokens with BOS, EOS
        ids = b["text"][i, :b["text_len"][i]].tolist()
        assert ids[0] == tok.bos and ids[-1] == tok.eos and b["text"][i, b["text_len"][i]:].eq(tok.eos).all()
        drawn += [c for c in data.captions[i] if c.encode()[:10] == bytes(ids[1:-1])]
        assert len(drawn) == i + 1, (i, ids, data.captions[i])
    assert b["truncated"] == sum(len(c) > 10 for c in drawn) > 0
    assert {c.split()[0] for c in drawn[1::2]} == {"a", "one"}  # odd images have two captions: both drawn
    assert 0 < b["text_after"].sum() < 12  # 10% caption the image
    # no flips: the clean tokens are the stored images, unflipped
    stored = torch.from_numpy(np.concatenate([s[:, 0, 0] for s in data.shards])).float()  # (N, 3, 8, 8)
    tokens = patchify(stored[idx], 2)
    assert torch.equal(b["clean"], tokens.gather(1, b["order"][..., None].expand_as(tokens)))


def test_captioned_run_resumes_bit_identical_and_logs_both_losses(tmp):
    args = TINY + ["--data", _captioned_data(tmp), "--ckpt-every", "2", "--text-len", "8", "--text-first", "0.5",
                   "--flip", "false", "--max-steps", "4", "--grid-classes", "2", "--grid-per-class", "2"]
    straight = train.main(args + ["--out", os.path.join(tmp, "a")])
    train.main(args[:-6] + ["--max-steps", "2", "--out", os.path.join(tmp, "b")])
    resumed = train.main(args + ["--out", os.path.join(tmp, "b"), "--resume"])
    a, b = _load(os.path.join(tmp, "a", "ckpt.pt")), _load(os.path.join(tmp, "b", "ckpt.pt"))
    assert b["step"] == 4 and resumed["losses"] == straight["losses"][2:]
    for key in ("model", "ema", "optimizer"):
        assert _same_state(a[key], b[key]), key
    assert a["tokenizer"] == {"kind": "bytes"} and a["model_config"]["text_len"] == 8
    log = open(os.path.join(tmp, "a", "train.log")).read()
    assert re.search(r"step 4 \| image loss [0-9.]+ \| text loss [0-9.]+ \| captions cut \d+/32", log), log
    assert int(re.search(r"captions cut (\d+)/", log).group(1)) > 0  # "a triangle" is 10 bytes: cut
    assert os.path.exists(os.path.join(tmp, "a", "samples_0000004.png"))
    # Transfusion: one diffusion step per example, no clean tokens; a checkpoint of another tokenizer is refused
    summary = train.main(args[:-6] + ["--max-steps", "2", "--transfusion", "--out", os.path.join(tmp, "c")])
    assert len(summary["losses"]) == 2 and _load(os.path.join(tmp, "c", "ckpt.pt"))["model_config"]["text_sees_noisy"]
    # a BPE learned from the captions: in the checkpoint, learned again alike on resume, required there
    learned = ["--learn-tokenizer", "400", "--out", os.path.join(tmp, "d")]
    train.main(args[:-6] + ["--max-steps", "2"] + learned)
    state = _load(os.path.join(tmp, "d", "ckpt.pt"))["tokenizer"]
    tok = tokenization.from_state(state)
    assert state["kind"] == "bpe" and _load(os.path.join(tmp, "d", "ckpt.pt"))["model_config"]["text_vocab"] == \
        tok.vocab_size < 400 and len(tok.encode("one triangle only")) == 3  # a token per word
    assert train.main(args + learned + ["--resume"])["step"] == 4
    with pytest.raises(ValueError) as excinfo:  # a run of the byte tokenizer resumes no checkpoint of a learned one
        train.main(args + ["--out", os.path.join(tmp, "d"), "--resume"])
    assert "--learn-tokenizer" in str(excinfo.value) and "bpe" in str(excinfo.value), str(excinfo.value)


def test_single_step_runs_leave_out_the_clean_tokens(tmp):
    # with S = 1 for every sample (--gamma 0) no noisy token sees a clean one: the step leaves them out and its
    # loss is the static layout's
    data = LatentData(_tiny_data(tmp))
    model = CausalFusion("T", input_size=8, patch_size=2, in_channels=3, num_classes=10).eval()
    torch.nn.init.normal_(model.final_layer[1].weight, std=0.02)
    cfg = dict(train.config, gamma=0.0)
    b = _draw(data, model, torch.arange(16), cfg)
    seen = []
    forward = model.forward
    model.forward = lambda clean, *a, **kw: seen.append(clean.shape[1]) or forward(clean, *a, **kw)
    with torch.no_grad():
        loss = train_step.forward_losses(model, model, Objective(), b, StepOptions.from_config(cfg))[0]
        xt = Objective().q_sample(b["clean"], b["t"], b["noise"])
        attn = mask.causal_mask(b["steps"], b["steps"], model.num_prefix_tokens)
        eps = forward(b["clean"], xt, b["t"], b["y"], b["order"], attn)
    assert seen == [0] and b["steps"].eq(0).all()
    static = Objective().loss(eps, b["clean"], b["noise"], b["t"], mask.ar_weights(b["steps"], cfg["ar_lambda"]))
    assert torch.allclose(loss, static, rtol=1e-5), (loss, static)


def test_fixed_ar_steps_train_and_block_size(tmp):
    # Table 2's S_train: every sample split into S_train steps of L / S_train tokens, whose static-layout mask is
    # Algorithm 1's on the authors' layout; Table 3b's block size reaches the block-raster order
    data = LatentData(_tiny_data(tmp))
    model = CausalFusion("T", input_size=8, patch_size=2, in_channels=3, num_classes=10)
    cfg = dict(train.config, ar_steps_train=4, order="block_raster", order_block=4)
    b = _draw(data, model, torch.arange(8), cfg)
    assert torch.equal(b["steps"], torch.arange(4).repeat_interleave(4).expand(8, 16))
    assert torch.equal(b["order"][0], torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]))
    cfg["order_block"] = 2  # 2x2 blocks of the 4x4 grid, in raster order
    b2 = _draw(data, model, torch.arange(8), cfg)
    assert b2["order"][0, :8].tolist() == [0, 1, 4, 5, 2, 3, 6, 7]
    steps = b["steps"][:1]
    authors = mask.causal_mask(steps[:, :12], steps, model.num_prefix_tokens)[0]  # steps 1..S-1 clean
    from test_core import algorithm1_mask
    assert torch.equal(authors, algorithm1_mask([0, 4, 8, 12, 16], model.num_prefix_tokens))
    # the default (random S) stream is untouched by the option's existence
    plain = _draw(data, model, torch.arange(8), dict(cfg, ar_steps_train=0, order_block=4))
    assert not plain["steps"].eq(b["steps"]).all() and torch.equal(plain["noise"], b["noise"])


def test_noisy_copies_and_per_batch_split(tmp):
    # Table 7's "K x t per AR step": K noisy copies at their own timesteps share the clean tokens and do not see
    # each other, so the loss is the mean of the K one-copy losses
    data = LatentData(_tiny_data(tmp))
    model = CausalFusion("T", input_size=8, patch_size=2, in_channels=3, num_classes=10).eval()
    torch.nn.init.normal_(model.final_layer[1].weight, std=0.02)
    L, K = 16, 3
    for per_step_t in (False, True):
        cfg = dict(train.config, noisy_copies=K, per_step_t=per_step_t)
        b = _draw(data, model, torch.arange(8), cfg)
        assert b["noise"].shape == (8, K * L, 12) and b["t"].shape == (8, K * L)
        t = b["t"].view(8, K, L)
        if per_step_t:  # one t per AR step of each copy
            for i in range(8):
                for j in range(K):
                    assert all(t[i, j, b["steps"][i] == v].unique().numel() == 1 for v in b["steps"][i].unique())
            assert sum(t[i, 0].unique().numel() for i in range(8)) > 8  # several steps, several t
        else:
            assert (t == t[:, :, :1]).all() and (t[:, 0] != t[:, 1]).any()
        with torch.no_grad():
            loss = train_step.forward_losses(model, model, Objective(), b, StepOptions.from_config(cfg))[0]
            parts = [train_step.forward_losses(model, model, Objective(),
                                               dict(b, noise=b["noise"][:, j * L:(j + 1) * L], t=t[:, j]),
                                               StepOptions.from_config(dict(cfg, noisy_copies=1)))[0]
                     for j in range(K)]
        assert torch.allclose(loss, torch.stack(parts).mean(), rtol=1e-5), (loss, parts)
    # the authors' split: one S and one split per micro-batch (the default draws one per sample)
    per_batch = _draw(data, model, torch.arange(8), dict(train.config, split_per="batch"))["steps"]
    per_sample = _draw(data, model, torch.arange(8), train.config)["steps"]
    assert (per_batch == per_batch[:1]).all() and per_batch.max() > 0
    assert not (per_sample == per_sample[:1]).all()


def test_table1_ablations_train_and_sample(tmp):
    # a time-token model without QK norm trains through train.py, resumes with its options, and samples in AR mode
    args = TINY + ["--data", _tiny_data(tmp), "--out", os.path.join(tmp, "run"), "--time-token", "--qk-norm",
                   "false", "--split-per", "batch"]
    train.main(args + ["--max-steps", "3"])
    ckpt = torch.load(os.path.join(tmp, "run", "ckpt.pt"), map_location="cpu", weights_only=True)
    assert ckpt["model_config"]["time_token"] and not ckpt["model_config"]["qk_norm"]
    assert not [k for k in ckpt["model"] if "q_norm" in k]
    train.main(args + ["--max-steps", "4", "--resume"])
    out = os.path.join(tmp, "s.npz")
    subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--ckpt", os.path.join(tmp, "run", "ckpt.pt"),
                    "--num-samples", "2", "--steps", "3", "--ar-steps", "4", "--out", out,
                    "--out-dir", os.path.join(tmp, "samples")], check=True, capture_output=True, timeout=300)
    assert np.load(out)["arr_0"].shape == (2, 8, 8, 3)
    for bad, word in ((["--time-token", "--per-step-t"], "--time-token"), (["--noisy-copies", "0"], "--noisy-copies"),
                      (["--split-per", "image"], "--split-per")):
        with pytest.raises(ValueError, match=re.escape(word)):
            train.main(TINY + ["--data", os.path.join(tmp, "latents"), "--out", os.path.join(tmp, "bad"),
                               "--max-steps", "1"] + bad)


# ------------------------------------------------------------------------------------------ metrics, loggers, FID
def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _die_at_step(step):
    """A forward_losses that raises KeyboardInterrupt at the forward of `step` (1-based; one micro-batch)."""
    real, calls = train_step.forward_losses, []  # the real one, even while train's is replaced

    def dying(*a, **kw):
        calls.append(1)
        if len(calls) == step:
            raise KeyboardInterrupt("killed")
        return real(*a, **kw)
    return dying


def test_metrics_jsonl_and_tensorboard_after_kill_and_resume(tmp, monkeypatch):
    # the run is killed in step 6 after logging step 5, past its step-4 checkpoint: resumed, metrics.jsonl and
    # TensorBoard hold every step once, with the uninterrupted run's values
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    args = TINY + ["--data", _tiny_data(tmp), "--ckpt-every", "2", "--max-steps", "6", "--tensorboard"]
    train.main(args + ["--out", os.path.join(tmp, "a")])
    out = os.path.join(tmp, "b")
    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):  # the run dies
        m.setattr(train, "forward_losses", _die_at_step(6))
        train.main(args + ["--out", out])
    assert [r["step"] for r in _metrics(out)] == [1, 2, 3, 4, 5]
    assert _load(os.path.join(out, "ckpt.pt"))["step"] == 4
    train.main(args + ["--out", out, "--resume"])
    a, b = _metrics(os.path.join(tmp, "a")), _metrics(out)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6], b
    keys = ("loss", "lr", "grad_norm")
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]
    assert set(b[0]) == {"step", "loss", "lr", "grad_norm", "steps_per_s", "img_per_s", "tok_per_s", "mem_gb"}
    # TensorBoard: two event files (the killed run's, the resumed run's); read back, the killed run's step 5 is
    # purged, and every scalar is metrics.jsonl's at the same step (float32 in the event file)
    assert len(os.listdir(os.path.join(out, "tensorboard"))) == 2
    events = EventAccumulator(os.path.join(out, "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == sorted(f"train/{k}" for k in b[0] if k != "step")
    for key in b[0]:
        if key != "step":
            got = [(e.step, e.value) for e in events.Scalars(f"train/{key}")]
            assert [s for s, _ in got] == [1, 2, 3, 4, 5, 6], (key, got)
            assert np.allclose([v for _, v in got], [r[key] for r in b], rtol=1e-6, atol=0), key
    assert Image.open(os.path.join(out, "curves.png")).size[0] > 0


def test_wandb_offline_run_and_resume_continue_one_run(tmp, monkeypatch):
    import time
    args = TINY + ["--data", _tiny_data(tmp), "--out", os.path.join(tmp, "run"), "--wandb", "--wandb-run", "tiny"]
    for k, v in dict(WANDB_MODE="offline", WANDB_DIR=os.path.join(tmp, "wb"), WANDB_SILENT="true",
                     WANDB_CONSOLE="off").items():
        monkeypatch.setenv(k, v)
    os.makedirs(os.path.join(tmp, "wb"))
    with monkeypatch.context() as m, pytest.raises(ImportError, match="pip install wandb"):
        m.setitem(sys.modules, "wandb", None)  # not installed: an ImportError naming the package
        train.main(args + ["--max-steps", "1"])
    start = time.time()
    train.main(args + ["--max-steps", "2"])
    first = time.time() - start
    train.main(args + ["--max-steps", "3", "--resume"])
    run_id = _load(os.path.join(tmp, "run", "ckpt.pt"))["wandb_id"]
    runs = sorted(d for d in os.listdir(os.path.join(tmp, "wb", "wandb")) if d.startswith("offline-run-"))
    # resumed: the same id (W&B names a second directory of the same second and id "...-<id>-1")
    assert len(runs) == 2 and all(re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{run_id}(-\d+)?", d) for d in runs), \
        (runs, run_id)
    for d in runs:
        files = os.listdir(os.path.join(tmp, "wb", "wandb", d))
        assert f"run-{run_id}.wandb" in files and "files" in files, files
        with open(os.path.join(tmp, "wb", "wandb", d, f"run-{run_id}.wandb"), "rb") as f:
            data = f.read()
        assert b"train/loss" in data and b"train/grad_norm" in data and b"tiny" in data
    print(f"wandb: a 2-step run took {first:.1f} s")  # pytest -s shows it


def _ref_images(path, n=4, size=8, seed=7):
    """An ADM-style reference .npz: arr_0 uint8 (n, size, size, 3) random images."""
    np.savez(path, arr_0=np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8))
    return path


def test_fid_during_training_equals_fid_py_on_the_same_samples(inception_weights, tmp):
    # one evaluation (step 2 = the end) of 4 EMA samples against a reference of 4 images, with Inception weights in
    # the real layout (random values): logged, written to metrics.jsonl, and equal to fid.py's command on the same
    # samples regenerated through inference.py (balanced classes, seed --seed, the eval sampler)
    import inference
    from checkpoint import load_checkpoint
    from vae import build_vae
    out, ref = os.path.join(tmp, "run"), _ref_images(os.path.join(tmp, "ref.npz"))
    args = TINY + ["--data", _tiny_data(tmp), "--max-steps", "2", "--out", out, "--eval-every", "2",
                   "--eval-ref", ref, "--eval-samples", "4", "--eval-batch-size", "3", "--eval-steps", "3",
                   "--fid-weights", inception_weights]
    summary = train.main(args)
    log = open(os.path.join(out, "train.log")).read()
    m = re.search(r"step 2 \| FID-4 ([0-9.]+) \| 4 EMA samples, dpm\+\+sde 3 steps, CFG 5 \| [0-9.]+ s \(the first "
                  r"evaluation: [0-9.]+ s per 1,000 samples\)", log)
    assert m, log
    evals = [r for r in _metrics(out) if "fid" in r]
    assert len(evals) == 1 and evals[0]["step"] == 2 and evals[0]["fid"] == summary["fids"][0] > 0
    assert abs(float(m.group(1)) - evals[0]["fid"]) < 1e-4 and evals[0]["sampler"] == "dpm++sde"
    model, meta = load_checkpoint(os.path.join(out, "ckpt.pt"))  # the EMA of step 2
    images, labels, _ = inference.sample_images(model, build_vae("none"), meta["scale_factor"], 4,
                                             classes=list(range(10)), diffusion=inference.make_diffusion(3, "dpm++sde"),
                                             cfg_scale=5.0, seed=0, batch_size=3)
    assert labels.tolist() == [0, 1, 2, 3]
    np.savez(os.path.join(tmp, "samples.npz"), arr_0=images)
    run = subprocess.run([sys.executable, "fid.py", ref, os.path.join(tmp, "samples.npz"), "--metrics", "fid",
                          "--weights", inception_weights, "--device", "cpu", "--batch-size", "3"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    expected = float(re.search(r"FID: ([0-9.e+-]+)", run.stdout).group(1))
    # equal up to the float32 rounding of the features, which 4 samples' near-singular covariance magnifies
    # (measured: 9e-8 relative in one run, under 1e-9 in another)
    assert np.isclose(evals[0]["fid"], expected, rtol=1e-6, atol=0), (evals[0]["fid"], expected)


def test_fid_schedule_resume_and_bad_reference(inception_weights, tmp, monkeypatch):
    # every --eval-every steps and at the end, before the checkpoint: a run killed in an evaluation and resumed
    # neither repeats nor skips one;
    # a bad --eval-ref fails before step 1, naming the file (evaluate_fid replaced: the schedule is the point)
    stats = os.path.join(tmp, "stats.npz")  # a fid.py --save-stats file
    rng = np.random.default_rng(0)
    np.savez(stats, mu=rng.standard_normal(2048), sigma=np.eye(2048), mu_s=np.zeros(2023), sigma_s=np.eye(2023))
    out, calls = os.path.join(tmp, "run"), []
    base = TINY + ["--data", _tiny_data(tmp), "--eval-every", "2", "--ckpt-every", "2", "--max-steps", "5",
                   "--fid-weights", inception_weights]
    args = base + ["--out", out, "--eval-ref", stats]

    def fake_fid(*a, **kw):
        calls.append(1)
        if len(calls) == 2:  # killed in the evaluation of step 4, after its log line, before its checkpoint
            raise KeyboardInterrupt("killed")
        return 10.0 + len(calls)
    monkeypatch.setattr(train, "evaluate_fid", fake_fid)
    np.savez(os.path.join(tmp, "ref.npz"), labels=np.zeros(3))  # neither statistics nor images
    for bad, words in ((os.path.join(tmp, "none.npz"), ["none.npz", "no such file"]),
                       (os.path.join(tmp, "ref.npz"), ["ref.npz", "arr_0"])):
        with monkeypatch.context() as m, pytest.raises(ValueError) as excinfo:
            m.setattr(train, "forward_losses", _die_at_step(1))  # step 1 must not start
            train.main(base + ["--eval-ref", bad, "--out", os.path.join(tmp, "bad")])
        assert all(w in str(excinfo.value) for w in words), excinfo.value
    with pytest.raises(KeyboardInterrupt):  # the run dies
        train.main(args)
    assert _load(os.path.join(out, "ckpt.pt"))["step"] == 2
    train.main(args + ["--resume"])
    evals = [(r["step"], r["fid"]) for r in _metrics(out) if "fid" in r]
    assert evals == [(2, 11.0), (4, 13.0), (5, 14.0)], evals
    assert [r["step"] for r in _metrics(out) if "loss" in r] == [1, 2, 3, 4, 5]


def test_fid_samples_under_torchrun_equal_one_process(inception_weights, tmp):
    # with --lr 0 the weights stay the seed's, so 2 ranks and 1 process hold the same EMA exactly: the samples rank
    # 0 gathers for FID (the ranks share the batches) must then equal one process's bit for bit, and so must the
    # FID, a function of them on rank 0. fid.compute_stats and frechet_distance are replaced (the samples are the
    # point, and a 2048-dim sqrtm costs a minute on CI's CPUs)
    stats = os.path.join(tmp, "stats.npz")
    np.savez(stats, mu=np.zeros(2048), sigma=np.eye(2048))
    args = TINY + ["--data", _tiny_data(tmp), "--max-steps", "1", "--lr", "0", "--eval-every", "1", "--eval-ref",
                   stats, "--eval-samples", "6", "--eval-batch-size", "2", "--eval-steps", "2",
                   "--fid-weights", inception_weights, "--grid-classes", "0"]
    driver = os.path.join(tmp, "driver.py")
    with open(driver, "w") as f:
        f.write(f"""import sys
import numpy as np
sys.path.insert(0, {ROOT!r})
import train
import train_monitor
def keep(samples, *a, **kw):
    np.save(sys.argv[1], samples)
    return dict(mu=np.zeros(2048), sigma=np.eye(2048))
train_monitor.fid.compute_stats = keep
train_monitor.fid.frechet_distance = lambda *a: float(np.load(sys.argv[1]).astype(np.float64).var())
train.main(sys.argv[2:])
""")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    torchrun = ["-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
    for name, launcher in (("one", []), ("two", torchrun)):
        run = subprocess.run([sys.executable, *launcher, driver, os.path.join(tmp, f"{name}.npy"), *args, "--out",
                              os.path.join(tmp, name)], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=300)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    one, two = np.load(os.path.join(tmp, "one.npy")), np.load(os.path.join(tmp, "two.npy"))
    assert one.shape == (6, 8, 8, 3) and np.array_equal(one, two)
    fids = [[r["fid"] for r in _metrics(os.path.join(tmp, n)) if "fid" in r] for n in ("one", "two")]
    assert fids[0] == fids[1] and len(fids[0]) == 1, fids


def test_two_nodes_match_one_process(tmp):
    # two "nodes" of one process each (two torchrun launches on this machine's loopback, static rendezvous at
    # --master-addr/--master-port, gloo) compute the step of one process accumulating 2 micro-batches
    import socket
    args = TINY + ["--data", _tiny_data(tmp), "--max-steps", "2"]
    one = train.main(args + ["--out", os.path.join(tmp, "one"), "--device-batch-size", "4"])
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={r}",
                               "--nproc-per-node=1", "--master-addr=127.0.0.1", f"--master-port={port}",
                               "train.py", *args, "--out", os.path.join(tmp, "two")],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in (0, 1)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), "\n".join(o[-3000:] for o in outputs)
    with open(os.path.join(tmp, "two", "train.log")) as f:
        log = f.read()
    assert "2 rank(s) x 1 micro-batch(es)" in log
    two_losses = [float(v) for v in re.findall(r"\| loss ([0-9.e+-]+)", log)]
    assert len(two_losses) == 2 and np.allclose(two_losses, one["losses"], rtol=0, atol=1e-6), \
        (two_losses, one["losses"])


def test_init_from_starts_a_new_run_from_the_weights(tmp):
    # --init-from: step 0, the checkpoint's EMA weights in model and EMA alike (lr 0 keeps them), a new optimizer;
    # a run with another class count keeps the shared rows (checkpoint.init_from's own test covers the mapping)
    data = _tiny_data(tmp)
    train.main(TINY + ["--data", data, "--max-steps", "3", "--out", os.path.join(tmp, "a")])
    source = _load(os.path.join(tmp, "a", "ckpt.pt"))
    summary = train.main(TINY + ["--data", data, "--max-steps", "1", "--lr", "0", "--out", os.path.join(tmp, "b"),
                                 "--init-from", os.path.join(tmp, "a", "ckpt.pt")])
    new = _load(os.path.join(tmp, "b", "ckpt.pt"))
    assert summary["step"] == 1 and new["step"] == 1
    assert _same_state(new["model"], source["ema"], atol=0) and _same_state(new["ema"], source["ema"], atol=0)
    assert not torch.equal(source["ema"]["x_proj.weight"], source["model"]["x_proj.weight"])  # EMA, not raw
    log = open(os.path.join(tmp, "b", "train.log")).read()
    assert f"initialized from {os.path.join(tmp, 'a', 'ckpt.pt')} (ema weights)" in log
    with pytest.raises(ValueError) as excinfo:  # weights that do not fit are refused
        train.main(TINY + ["--data", data, "--out", os.path.join(tmp, "c"), "--init-from",
                           os.path.join(tmp, "a", "ckpt.pt"), "--patch-size", "4"])
    assert "x_proj.weight" in str(excinfo.value) and "--init-from" in str(excinfo.value), excinfo.value
