"""Tests of sample.py: determinism, AR mode against a sampler without the KV cache, an overfit tiny model's AR
samples, zero-shot editing, both checkpoint layouts, the FID npz and torchrun; for text models, text-to-image
against a sampler without the cache, an overfit text model's images and captions, and the command line.
Run by test_all.py."""
import argparse
import copy
import hashlib
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint
import inference
import mask
import sample
import tokenization
from diffusion import Objective, Sampler
from model import CausalFusion, patchify
from test_core import _authors_state_dict
from vae import build_vae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout


def templates():
    """The overfit model's 4 classes: 8x8 RGB images in [-1, 1], (4, 3, 8, 8)."""
    t = -torch.ones(4, 3, 8, 8)
    t[0, 0] = 0.8  # red
    t[1, 2] = 0.8  # blue
    t[2, :, :4] = 1.0  # white top half
    t[3, 1, :, :4] = 0.8  # green left half
    return t


def save_ckpt(model, path, config=None):
    """A checkpoint in train.py's layout (pixel space: --vae none); config: train.py's options (none: eps)."""
    sd = model.state_dict()
    data = dict(vae="none", scale_factor=1.0, latent_shape=[3, 8, 8], image_size=8, num_classes=4,
                class_names=["red", "blue", "top", "left"])
    torch.save(dict(model=sd, ema=sd, step=0, config=config or {}, model_config=model.config, data=data), path)
    return path


def random_model(folder):
    """Untrained tiny model (random head, so outputs are not trivially zero) and its checkpoint in folder (conftest's
    `shared`: saved once a run)."""
    torch.manual_seed(0)
    model = CausalFusion(size="T", input_size=8, patch_size=2, in_channels=3, num_classes=4, num_cond_tokens=4)
    torch.nn.init.normal_(model.final_layer[1].weight, std=0.02)
    path = os.path.join(folder, "random.pt")
    return model.eval(), path if os.path.exists(path) else save_ckpt(model, path)


def overfit_model(folder):
    """A tiny model trained (~10 s) to generate the 4 templates; its checkpoint cached in folder (conftest's `shared`:
    trained once a run)."""
    path = os.path.join(folder, "overfit.pt")
    if not os.path.exists(path):
        torch.manual_seed(0)
        model = CausalFusion(hidden_size=64, depth=2, num_heads=4, input_size=8, patch_size=2, in_channels=3,
                             num_classes=4, num_cond_tokens=4)
        objective, g, n, L = Objective(), torch.Generator().manual_seed(0), 16, 16
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95))
        for _ in range(300):  # train.py's step: random order, split, timestep; label dropout for CFG
            y = torch.randint(4, (n,), generator=g)
            order = mask.token_order(n, 4, 4, "random", g)
            steps = mask.sample_step_ids(mask.sample_num_steps(n, L, 0.9, g), L, g)
            t, noise = torch.randint(0, 1000, (n,), generator=g), torch.randn(n, L, 12, generator=g)
            x0 = patchify(templates()[y], 2).gather(1, order[..., None].expand(n, L, 12))  # AR order
            y = torch.where(torch.rand(n, generator=g) < 0.1, model.null_class, y)
            pred = model(x0, objective.q_sample(x0, t, noise), objective.model_time(t), y=y, pos=order,
                         attn_mask=mask.causal_mask(steps, steps, 4))
            loss = objective.loss(pred, x0, noise, t, mask.ar_weights(steps, 2.0))
            opt.zero_grad()
            loss.backward()
            opt.step()
        save_ckpt(model, path)
    return checkpoint.load_checkpoint(path)[0], path


def nearest_template(images):
    """uint8 images (N, 8, 8, 3) -> index of the nearest template (N,)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    return ((x[:, None] - templates()[None]) ** 2).flatten(2).mean(2).argmin(1).numpy()


def reference_tokens(model, labels, batch_seed, diffusion, ar_steps=1, split="equal", order="random", cfg_scale=1.0,
                     cfg_interval=(0, 1000), text=None, text_lengths=None):
    """sample_batch without the KV cache: every eps is a full model.forward over [cond | clean tokens of the
    finished AR steps | noisy tokens of this step] under the generalized causal mask; same random draws.
    A text model's CFG branch is the image-first layout (the image sees no text)."""
    n, L, P = len(labels if text is None else text), model.num_tokens, model.token_dim
    g = torch.Generator().manual_seed(batch_seed)
    pos, sizes = inference.ar_plan(n, torch.arange(L), ar_steps, split, order, g, grid=model.grid_size)
    noise = torch.Generator().manual_seed(int(torch.randint(2 ** 62, (1,), generator=g)))
    ids = mask.step_ids_from_sizes(sizes).expand(n, L)
    y = torch.cat([labels, torch.full_like(labels, model.null_class)]) if cfg_scale > 1 and text is None else labels
    rep = lambda a, b: a.repeat(b // n, *[1] * (a.dim() - 1))  # (N, ...) -> (b, ...), cond half first
    after = torch.arange(2 * n) >= n  # the unconditional half puts its image first
    clean, start = torch.zeros(n, 0, P), 0
    out = torch.zeros(n, L, P)
    with torch.no_grad():
        for size in sizes:
            sl = slice(start, start + size)
            if text is None:
                attn = mask.causal_mask(ids[:, :start], ids[:, sl], model.num_prefix_tokens)
                eps_fn = lambda x, t: model(rep(clean, len(x)), x, torch.full((len(x),), t), y, rep(pos[:, sl], len(x)),
                                            rep(attn, len(x)), clean_pos=rep(pos[:, :start], len(x)))
            else:
                def eps_fn(x, t, start=start, sl=sl):
                    b = len(x)
                    attn = mask.causal_mask(rep(ids[:, :start], b), rep(ids[:, sl], b), model.num_prefix_tokens,
                                            rep(text_lengths, b), after[:b])
                    return model(rep(clean, b), x, torch.full((b,), t), None, rep(pos[:, sl], b), attn,
                                 clean_pos=rep(pos[:, :start], b), text=rep(text, b))[0]
            x = diffusion.sample(eps_fn, torch.randn(n, size, P, generator=noise), noise, cfg_scale, cfg_interval)
            clean = torch.cat([clean, x], 1)
            out.scatter_(1, pos[:, sl, None].expand_as(x), x)
            start += size
    return out


def assert_close(got, ref):
    """float32 agreement of two samplers (the untrained model's tokens reach hundreds: a relative bound)."""
    err = (got - ref).abs().max().item()
    assert err < 1e-5 * max(1.0, ref.abs().max().item()), err


def run_cli(*args, cwd, torchrun=False):
    """python sample.py ARGS (or torchrun with 2 CPU processes) in a subprocess in the folder cwd (out/ goes there);
    returns its stdout."""
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"] if torchrun else []
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, *launcher, os.path.join(ROOT, "sample.py"), *map(str, args)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


# ------------------------------------------------------------------------------------------------ tests
def test_same_seed_same_samples(shared):
    model, _ = random_model(shared)
    vae, kw = build_vae("none"), dict(ar_steps=3, split="random", diffusion=Sampler(steps=10), batch_size=3)
    a = inference.sample_images(model, vae, 1.0, 7, seed=5, **kw)
    b = inference.sample_images(model, vae, 1.0, 7, seed=5, **kw)
    c = inference.sample_images(model, vae, 1.0, 7, seed=6, **kw)
    assert a[0].shape == (7, 8, 8, 3) and a[0].dtype == np.uint8
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[1], c[1])  # images and random classes
    # two ranks' shares, put in index order, are the one-process samples
    shares = [inference.sample_images(model, vae, 1.0, 7, seed=5, rank=r, world_size=2, **kw) for r in (0, 1)]
    order = np.argsort(np.concatenate([s[2] for s in shares]))
    assert np.array_equal(np.concatenate([s[0] for s in shares])[order], a[0])


def test_ar_mode_one_step_is_diffusion_mode(shared):
    model, _ = random_model(shared)
    labels, diffusion = torch.tensor([0, 3, 1]), Sampler(steps=20)
    got = inference.sample_batch(model, diffusion, labels, 11, ar_steps=1, cfg_scale=2.0, cfg_interval=(0, 600))
    # the same draws through generate() with one AR step of all L tokens: bit-identical
    g = torch.Generator().manual_seed(11)
    order, sizes = inference.ar_plan(3, torch.arange(16), 1, "equal", "random", g)
    noise = torch.Generator().manual_seed(int(torch.randint(2 ** 62, (1,), generator=g)))
    direct = inference.generate(model, diffusion, labels, [16], order, noise, 2.0, (0, 600))
    assert sizes == [16] and torch.equal(got, direct)
    # and DiT-style diffusion sampling without a cache: all L noisy tokens in every forward
    assert_close(got, reference_tokens(model, labels, 11, Sampler(steps=20), cfg_scale=2.0, cfg_interval=(0, 600)))


def test_ar_mode_matches_full_recompute(shared):
    # the KV cache (class tokens once, each step's clean tokens once) gives what recomputing everything gives:
    # token by token (S = L), and a random split in raster order with CFG
    model, _ = random_model(shared)
    labels = torch.tensor([2, 0])
    for kw in (dict(ar_steps=16), dict(ar_steps=3, split="random", order="raster", cfg_scale=3.0)):
        got = inference.sample_batch(model, Sampler(steps=8), labels, 4, **kw)
        assert_close(got, reference_tokens(model, labels, 4, Sampler(steps=8), **kw))


def test_fast_samplers_ar_mode_match_full_recompute(shared):
    # each fast sampler runs its whole solver per AR step through the KV cache: equal to the no-cache loop, with CFG
    # and an interval (in timesteps of the 1000-step schedule) that leaves some of the visited steps unguided
    model, _ = random_model(shared)
    labels = torch.tensor([1, 3])
    for sampler, eta in (("ddim", 0.0), ("ddim", 0.7), ("dpm++", None), ("dpm++sde", None)):
        diffusion = Sampler(steps=6, name=sampler, eta=eta)
        kw = dict(ar_steps=4, split="random", cfg_scale=2.5, cfg_interval=(150, 700))
        got = inference.sample_batch(model, diffusion, labels, 9, **kw)
        assert_close(got, reference_tokens(model, labels, 9, diffusion, **kw))


def test_flow_ar_mode_matches_full_recompute_and_edits_keep_tokens(shared):
    # a flow model's samplers through the KV cache, AR mode with CFG and an interval (eps timesteps, mapped to flow
    # times by SNR), equal the no-cache loop; editing keeps the kept tokens bit for bit
    model, _ = random_model(shared)
    labels = torch.tensor([1, 3])
    for sampler in ("euler", "dpm++", "dpm++sde"):
        diffusion = Sampler(steps=6, name=sampler, objective="flow")
        assert 150 <= diffusion.guide_timesteps[2] < 700 and not 150 <= diffusion.guide_timesteps[0] < 700
        for kw in (dict(ar_steps=4, split="random", cfg_scale=2.5, cfg_interval=(150, 700)),
                   dict(ar_steps=16, cfg_scale=1.5)):
            got = inference.sample_batch(model, diffusion, labels, 9, **kw)
            assert_close(got, reference_tokens(model, labels, 9, diffusion, **kw))
    originals = inference.sample_batch(model, Sampler(steps=5, objective="flow"), torch.tensor([0, 2]), 1)
    kept = sample.keep_mask("outer", 4)
    edits = sample.edit_tokens(model, originals, kept, [1, 3], 0, Sampler(steps=5, objective="flow"), ar_steps=2)
    pos = kept.flatten().nonzero()[:, 0]
    assert torch.equal(edits[:, :, pos], originals[:, None, pos].expand(-1, 2, -1, -1))
    assert not torch.equal(edits[:, :, ~kept.flatten()], originals[:, None, ~kept.flatten()].expand(-1, 2, -1, -1))


def test_flow_checkpoint_samples_with_no_new_option(shared, tmp):
    # sample.py on a flow checkpoint: the checkpoint's objective picks the samplers (euler by default), the .npz
    # says so, and it equals inference's samples; a sampler of the other objective is an error naming both
    model, _ = random_model(shared)
    path = save_ckpt(model, os.path.join(tmp, "flow.pt"), config=dict(objective="flow"))
    assert checkpoint.load_checkpoint(path)[1]["objective"] == "flow"
    out = os.path.join(tmp, "flow.npz")
    run_cli("--ckpt", path, "--num-samples", 3, "--batch-size", 2, "--steps", 3, "--ar-steps", 2, "--cfg-scale", 2,
            "--cfg-interval", 100, 800, "--classes", 1, 2, "--out", out, "--out-dir", os.path.join(tmp, "flow"),
            cwd=tmp)
    made = json.loads(str(np.load(out)["provenance"]))
    assert (made["objective"], made["sampler"], made["steps"], made["spacing"]) == ("flow", "euler", 3, "uniform")
    images, _, _ = inference.sample_images(model, build_vae("none"), 1.0, 3, [1, 2], ar_steps=2,
                                           diffusion=inference.make_diffusion(3, objective="flow"), cfg_scale=2,
                                           cfg_interval=(100, 800), batch_size=2)
    assert np.array_equal(np.load(out)["arr_0"], images)
    assert inference.make_diffusion(objective="flow").timesteps.numel() == inference.DEFAULT_STEPS["flow"]["euler"]
    for args, words in ((["--sampler", "ddpm"], ("--sampler", "ddpm", "flow", "eps")),
                        (["--sampler", "ddim"], ("--sampler", "ddim", "flow")),
                        (["--spacing", "logsnr"], ("--spacing", "flow"))):
        with pytest.raises(ValueError) as excinfo:
            sample.main(["--ckpt", path, "--steps", "2", "--num-samples", "1"] + args)
        assert all(w in str(excinfo.value) for w in words), (args, str(excinfo.value))


def test_overfit_model_ar_modes_are_class_consistent(shared):
    model, _ = overfit_model(shared)
    vae = build_vae("none")
    for S in (1, 2, 4, 8):
        images, labels, _ = inference.sample_images(model, vae, 1.0, 8, [0, 1, 2, 3], ar_steps=S,
                                                 diffusion=Sampler(steps=30), seed=S)
        assert images.shape == (8, 8, 8, 3) and images.dtype == np.uint8
        assert labels.tolist() == [0, 1, 2, 3] * 2
        assert (nearest_template(images) == labels).mean() >= 0.75, (S, nearest_template(images), labels)


def test_edit_keeps_tokens_bit_identical(shared, tmp):
    model, path = overfit_model(shared)
    originals = inference.sample_batch(model, Sampler(steps=20), torch.tensor([0, 2]), 1)
    mask_png = os.path.join(tmp, "mask.png")
    Image.fromarray(np.kron(np.eye(4, dtype=np.uint8) * 255, np.ones((2, 2), np.uint8))).save(mask_png)  # diagonal
    for keep, kw in (("outer", {}), ("top", dict(ar_steps=4)), (mask_png, dict(ar_steps=12, cfg_scale=2.0))):
        kept = sample.keep_mask(keep, model.grid_size)
        edits = sample.edit_tokens(model, originals, kept, [1, 3], 0, Sampler(steps=20), **kw)  # (2, 2, L, P)
        assert edits.shape == (2, 2, 16, 12)
        k = kept.flatten()
        assert torch.equal(edits[:, :, k], originals[:, None, k].expand(-1, 2, -1, -1)), keep
        assert (edits[:, :, ~k] != originals[:, None, ~k]).any(-1).all(), keep  # the rest is regenerated
    assert sample.keep_mask("outer", 4).sum() == 12 and sample.keep_mask("inner", 16).sum() == 64
    assert sample.keep_mask(mask_png, 4).equal(torch.eye(4, dtype=torch.bool))

    # the command line on a stored image (vae none: the pixels of the kept region come back exactly)
    images = inference.tokens_to_images(originals, model, build_vae("none"), 1.0)
    np.savez(os.path.join(tmp, "orig.npz"), arr_0=images)
    out_dir = os.path.join(tmp, "edit")
    sample.main(["--ckpt", path, "--edit", os.path.join(tmp, "orig.npz"), "--edit-index", "1", "--keep", "top",
                 "--classes", "blue", "0", "--num-samples", "2", "--steps", "10", "--out-dir", out_dir])
    fig = np.asarray(Image.open(os.path.join(out_dir, "edit_top.png")))
    assert fig.shape == (2 + 2 * 10, 2 + 4 * 10, 3)  # 2 rows of [original | mask | 2 edits], 8 px + 2 px pad
    cell = lambda r, c: fig[2 + 10 * r:10 + 10 * r, 2 + 10 * c:10 + 10 * c]
    for r in range(2):
        assert np.array_equal(cell(r, 0), images[1])
        for c in (1, 2, 3):
            assert np.array_equal(cell(r, c)[:4], images[1][:4])  # the kept top half
    # originals generated in-process (paper Fig. 2b), AR mode
    sample.main(["--ckpt", path, "--edit-class", "2", "--keep", "inner", "--classes", "1", "--ar-steps", "3",
                 "--num-samples", "1", "--steps", "10", "--out-dir", out_dir])
    assert os.path.exists(os.path.join(out_dir, "edit_inner.png"))


def test_authors_checkpoint_samples(tmp):
    g = torch.Generator().manual_seed(0)
    sd = _authors_state_dict(depth=2, hidden=64, heads=4, patch=1, channels=16, grid=4, num_cond=4, num_classes=10,
                             g=g)
    path = os.path.join(tmp, "authors.pt")
    args = argparse.Namespace(model="CausalFusion-XL", image_size=64, num_classes=10, global_seed=0)
    torch.save({"model": sd, "ema": sd, "opt": {}, "train_steps": 1, "args": args}, path)
    model, meta = checkpoint.load_checkpoint(path)
    assert model.config == dict(hidden_size=64, depth=2, num_heads=4, input_size=4, patch_size=1, in_channels=16,
                                num_classes=10, num_cond_tokens=4, cond_repeat=1, learn_pos=True, mlp_ratio=4.0)
    assert meta["vae"] == "mar" and meta["image_size"] == 64 and meta["scale_factor"] == 0.2325
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())
    out = os.path.join(tmp, "authors.npz")
    sample.main(["--ckpt", path, "--vae-ckpt", "random", "--num-samples", "2", "--steps", "5", "--ar-steps", "2",
                 "--cfg-scale", "1.5", "--out", out, "--out-dir", os.path.join(tmp, "authors")])
    assert np.load(out)["arr_0"].shape == (2, 64, 64, 3)
    # the released XL configuration, inferred from tensor shapes alone (meta device: no memory)
    with torch.device("meta"):
        xl = CausalFusion(depth=32, hidden_size=1280, num_heads=20, input_size=16, patch_size=1, in_channels=16,
                          num_classes=1000, num_cond_tokens=64, learn_pos=True)
    config, meta = checkpoint.authors_config(xl.state_dict(), "mar")
    assert config == xl.config and meta["image_size"] == 256 and meta["latent_shape"] == [16, 16, 16]


def test_init_from_both_checkpoint_formats(shared, tmp):
    # train.py --init-from: another class count keeps the shared rows and the null row, the new classes are fresh;
    # another grid resizes a learned position embedding bicubically and recomputes a fixed sin-cos one
    import torch.nn.functional as F
    from model import sincos_pos_embed
    small, path = random_model(shared)  # train.py's layout: 4 classes, 8x8 pixels (4x4 tokens), fixed sin-cos
    torch.manual_seed(1)
    fresh = CausalFusion(size="T", input_size=12, patch_size=2, in_channels=3, num_classes=6, num_cond_tokens=4)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    notes = checkpoint.init_from(fresh, path)
    got, theirs = fresh.state_dict(), small.state_dict()
    table, old_table = got["y_embedder.embedding_table.weight"], theirs["y_embedder.embedding_table.weight"]
    assert torch.equal(table[:4], old_table[:4]) and torch.equal(table[6], old_table[4])  # shared, null
    assert torch.equal(table[4:6], before["y_embedder.embedding_table.weight"][4:6])  # new classes: fresh
    assert torch.equal(got["pos_embed"], sincos_pos_embed(128, 6)) and torch.equal(got["blocks.1.mlp.fc2.weight"],
                                                                                  theirs["blocks.1.mlp.fc2.weight"])
    assert len(notes) == 2 and any("4 -> 6" in note for note in notes), notes
    # the authors' layout (learned position embedding on a 4x4 grid) into an 8x8 grid
    sd = _authors_state_dict(depth=2, hidden=64, heads=4, patch=1, channels=16, grid=4, num_cond=4, num_classes=10,
                             g=torch.Generator().manual_seed(3))
    authors = os.path.join(tmp, "authors_init.pt")
    torch.save({"model": sd, "ema": sd, "args": argparse.Namespace(model="CausalFusion-XL")}, authors)
    big = CausalFusion(depth=2, hidden_size=64, num_heads=4, input_size=8, patch_size=1, in_channels=16,
                       num_classes=10, num_cond_tokens=4, learn_pos=True)
    checkpoint.init_from(big, authors)
    grid = sd["pos_embed"][0].T.reshape(1, 64, 4, 4)  # (1, D, 4, 4), rows of the 4x4 grid
    expected = F.interpolate(grid, size=(8, 8), mode="bicubic", align_corners=False).reshape(64, 64).T[None]
    assert torch.allclose(big.pos_embed, expected) and torch.equal(big.x_proj.weight, sd["x_proj.weight"])
    # what does not fit is listed, all of it
    for other, words in ((CausalFusion(depth=3, hidden_size=64, num_heads=4, input_size=4, patch_size=1,
                                       in_channels=16, num_classes=10, num_cond_tokens=4), ["missing blocks.2."]),
                         (CausalFusion(depth=2, hidden_size=64, num_heads=4, input_size=4, patch_size=1, in_channels=4,
                                       num_classes=10, num_cond_tokens=8), ["x_proj.weight", "cond_pos_embed"])):
        with pytest.raises(ValueError) as excinfo:  # a model that does not fit is refused
            checkpoint.init_from(other, authors)
        assert authors in str(excinfo.value) and all(w in str(excinfo.value) for w in words), str(excinfo.value)


def test_random_and_balanced_classes():
    assert sample.parse_classes([], 4) is None and sample.parse_classes(["random"], 4) is None
    assert sample.parse_classes(["balanced"], 4) == [0, 1, 2, 3]
    assert sample.parse_classes(["blue", "0"], 4, ["red", "blue", "top", "left"]) == [1, 0]
    balanced = inference.class_labels(4000, sample.parse_classes(["balanced"], 1000), 1000, seed=0)
    assert torch.bincount(balanced, minlength=1000).eq(4).all()  # 4 of every class
    random = inference.class_labels(4000, None, 1000, seed=0)
    assert random.min() >= 0 and random.max() < 1000 and torch.bincount(random, minlength=1000).float().std() > 1


def test_clear_errors(shared, tmp):
    model, path = random_model(shared)
    base = ["--ckpt", path, "--steps", "2", "--num-samples", "1", "--out-dir", os.path.join(tmp, "errors")]
    for args, words in ((["--cfg-scale", "0.5"], "--cfg-scale"), (["--cfg-interval", "0", "1200"], "--cfg-interval"),
                        (["--ar-steps", "17"], "1..16"), (["--classes", "4"], "--classes [4]"),
                        (["--classes", "purple"], "class names"), (["--edit-class", "0"], "--classes"),
                        (["--edit-class", "0", "--classes", "1", "--keep", "middle"], "--keep 'middle'"),
                        (["--out", "samples.png"], "--out must name an .npz"), (["--sampler", "euler"], "--sampler"),
                        (["--eta", "0.5"], "--eta"), (["--sampler", "ddim", "--eta", "2"], "--eta"),
                        (["--sampler", "dpm++", "--steps", "1"], "--steps"), (["--steps", "-1"], "--steps"),
                        (["--sampler", "ddim", "--spacing", "leading"], "--spacing")):
        with pytest.raises(ValueError, match=re.escape(words)):
            sample.main(base + args)
    # a truncated checkpoint and a file that is not one: one line naming the file
    truncated, text = os.path.join(tmp, "truncated.pt"), os.path.join(tmp, "notes.pt")
    open(truncated, "wb").write(open(path, "rb").read()[:5000])
    open(text, "w").write("not a checkpoint")
    for bad in (truncated, text):
        with pytest.raises(ValueError) as excinfo:
            sample.main(["--ckpt", bad, "--num-samples", "1"])
        assert f"{bad}: not a readable checkpoint" in str(excinfo.value) and "\n" not in str(excinfo.value), \
            str(excinfo.value)
    # a checkpoint whose tensors do not fit its config: the file, the key and both shapes
    bad = os.path.join(tmp, "bad.pt")
    ckpt = torch.load(path, weights_only=True)
    ckpt["model_config"]["num_classes"] = 7
    torch.save(ckpt, bad)
    with pytest.raises(ValueError) as excinfo:
        checkpoint.load_checkpoint(bad)
    assert bad in str(excinfo.value)
    assert "y_embedder.embedding_table.weight: checkpoint (5, 512), config (8, 512)" in str(excinfo.value)


def test_npz_and_torchrun_match(shared, tmp):
    # the command-line contract; ADM's npz; 2 processes (gloo) give the 1-process file exactly
    _, path = random_model(shared)
    args = ["--ckpt", path, "--num-samples", "5", "--batch-size", "2", "--ar-steps", "4", "--steps", "4",
            "--cfg-scale", "1.5", "--seed", "3"]
    one, two = os.path.join(tmp, "one.npz"), os.path.join(tmp, "two.npz")
    run_cli(*args, "--out", one, "--out-dir", os.path.join(tmp, "one"), cwd=tmp)
    run_cli(*args, "--out", two, "--out-dir", os.path.join(tmp, "two"), cwd=tmp, torchrun=True)
    a, b = np.load(one), np.load(two)
    assert a["arr_0"].shape == (5, 8, 8, 3) and a["arr_0"].dtype == np.uint8 and a["labels"].shape == (5,)
    assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["labels"], b["labels"])
    assert sorted(os.listdir(os.path.join(tmp, "two"))) == ["grid.png"]  # no rank files left behind
    # the npz says how it was made, and fid.py prints that beside the scores
    made = json.loads(str(a["provenance"]))
    assert made["ckpt_sha256"] == hashlib.sha256(open(path, "rb").read()).hexdigest() and made["ckpt"] == "random.pt"
    assert (made["sampler"], made["steps"], made["cfg_scale"], made["ar_steps"], made["seed"], made["dtype"]) == \
        ("ddpm", 4, 1.5, 4, 3, "fp32") and made["torch"] == torch.__version__
    import contextlib
    import io
    import fid
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        try:
            fid.main([one, two, "--metrics", "fid", "--weights", os.path.join(tmp, "no_weights.pth")])
        except (fid.InputError, FileNotFoundError, OSError, ValueError):
            pass  # no Inception weights here: the provenance lines come first
    assert printed.getvalue().count(f"made by {a['provenance']}") == 2, printed.getvalue()


def test_non_finite_batch_stops_with_its_seed(shared):
    model, _ = random_model(shared)
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.final_layer[1].bias[0] = float("nan")
    with pytest.raises(FloatingPointError, match=re.escape("batch 0 (samples 0..1, batch seed 7000021 of --seed 7)")):
        inference.sample_images(broken, build_vae("none"), 1.0, 5, diffusion=Sampler(steps=3), seed=7, batch_size=2)
    inference.sample_images(model, build_vae("none"), 1.0, 5, diffusion=Sampler(steps=3), seed=7,
                            batch_size=2)  # finite


# ------------------------------------------------------------------------------------------ text models
WORDS = ["red", "blue", "top half", "left half"]  # the captions of the 4 templates


def save_text_ckpt(model, path, tokenizer):
    sd = model.state_dict()
    data = dict(vae="none", scale_factor=1.0, latent_shape=[3, 8, 8], image_size=8, num_classes=0, class_names=[])
    torch.save(dict(model=sd, ema=sd, step=0, config={}, model_config=model.config, data=data,
                    tokenizer=tokenizer.state()), path)
    return path


def text_model(folder, path_name="text.pt", **kw):
    """Untrained tiny text model (byte tokenizer, 12 text tokens, random heads) and its checkpoint folder/path_name."""
    tok = tokenization.ByteTokenizer()
    torch.manual_seed(0)
    model = CausalFusion(size="T", input_size=8, patch_size=2, in_channels=3, num_classes=0, text_vocab=tok.vocab_size,
                         text_len=12, **kw)
    torch.nn.init.normal_(model.final_layer[1].weight, std=0.02)
    return model.eval(), save_text_ckpt(model, os.path.join(folder, path_name), tok), tok


def overfit_text_model(folder):
    """A tiny text model trained (~20 s, train.py's loss) on the 4 templates, captioned by WORDS, half of the
    examples text-first (text-to-image), half image-first (captioning, and the unconditional image loss); its
    checkpoint cached in folder (conftest's `shared`: trained once a run)."""
    path = os.path.join(folder, "overfit_text.pt")
    tok = tokenization.ByteTokenizer()
    if not os.path.exists(path):
        from train_step import StepOptions, forward_losses
        torch.manual_seed(0)
        model = CausalFusion(hidden_size=64, depth=2, num_heads=4, input_size=8, patch_size=2, in_channels=3,
                             num_classes=0, text_vocab=tok.vocab_size, text_len=12)
        objective, g, n, L = Objective(), torch.Generator().manual_seed(0), 16, 16
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95))
        options = StepOptions.defaults(text_loss_weight=0.1)
        for _ in range(400):
            k = torch.randint(4, (n,), generator=g)
            order = mask.token_order(n, 4, 4, "random", g)
            steps = mask.sample_step_ids(mask.sample_num_steps(n, L, 0.9, g), L, g)
            text, lengths, _ = tokenization.tokenize(tok, [WORDS[i] for i in k], 12)
            b = dict(clean=patchify(templates()[k], 2).gather(1, order[..., None].expand(n, L, 12)), y=None,
                     noise=torch.randn(n, L, 12, generator=g), t=torch.randint(0, 1000, (n,), generator=g),
                     order=order, steps=steps, text=text, text_len=lengths, text_after=torch.rand(n, generator=g) < 0.5)
            loss = forward_losses(model, model, objective, b, options)[0]
            opt.zero_grad()
            loss.backward()
            opt.step()
        save_text_ckpt(model, path, tok)
    return checkpoint.load_checkpoint(path)[0], path, tok


def test_text_to_image_matches_full_recompute(tmp):
    # the text in the KV cache (prompts of different lengths; CFG's no-text half) gives what recomputing the
    # whole [text | clean | noisy] sequence under the mask gives, in diffusion and AR mode
    model, _, tok = text_model(tmp)
    text, lengths, _ = tokenization.tokenize(tok, ["a red circle", "x", "a small blue star on top"], 12)
    for kw in (dict(ar_steps=1, cfg_scale=2.0), dict(ar_steps=5, split="random", cfg_scale=1.5), dict(ar_steps=16)):
        got = inference.sample_batch(model, Sampler(steps=6), None, 3, text=text, text_lengths=lengths, **kw)
        assert_close(got, reference_tokens(model, None, 3, Sampler(steps=6), text=text, text_lengths=lengths, **kw))


def test_overfit_text_model_generates_and_captions(shared):
    model, path, tok = overfit_text_model(shared)
    vae = build_vae("none")
    images, prompts, _ = inference.sample_images(model, vae, 1.0, 8, diffusion=Sampler(steps=30), seed=1, prompts=WORDS,
                                              tokenizer=tok, ar_steps=4, cfg_scale=2.0)
    assert list(prompts) == WORDS * 2
    assert (nearest_template(images) == np.arange(8) % 4).mean() >= 0.75, nearest_template(images)
    tokens = patchify(templates(), 2)  # the clean images, (4, 16, 12)
    assert inference.caption_images(model, tokens, tok) == WORDS
    sampled = inference.caption_images(model, tokens, tok, temperature=1.0, top_k=1, generator=torch.Generator())
    assert sampled == WORDS  # top-1 sampling is greedy


def test_text_model_command_line(shared, tmp):
    model, path, tok = overfit_text_model(shared)
    out = os.path.join(tmp, "t2i.npz")
    run_cli("--ckpt", path, "--prompts", "red", "blue", "--num-samples", "3", "--steps", "4", "--ar-steps", "2",
            "--cfg-scale", "2", "--out", out, cwd=tmp)
    saved = np.load(out)
    assert saved["arr_0"].shape == (3, 8, 8, 3) and saved["prompts"].tolist() == ["red", "blue", "red"]
    # captions of an npz (integer sources), of a folder (file names) and of one image
    images = ((templates().permute(0, 2, 3, 1) + 1) * 127.5).round().byte().numpy()
    np.savez(os.path.join(tmp, "four.npz"), arr_0=images)
    folder = os.path.join(tmp, "four")
    os.makedirs(folder, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(os.path.join(folder, f"{i}.png"))
    for src, sources in (("four.npz", [0, 1, 2, 3]), ("four", ["0.png", "1.png", "2.png", "3.png"])):
        jsonl = os.path.join(tmp, f"{src}.jsonl")
        run_cli("--ckpt", path, "--caption", os.path.join(tmp, src), "--out", jsonl, cwd=tmp)
        rows = [json.loads(line) for line in open(jsonl)]
        assert rows == [{"source": s, "text": w} for s, w in zip(sources, WORDS)], rows
    assert "2.png: top half" in run_cli("--ckpt", path, "--caption", os.path.join(folder, "2.png"), cwd=tmp)
    # mismatches are errors that say what to do
    _, class_ckpt = random_model(shared)
    for args, expected in ((["--ckpt", class_ckpt, "--prompts", "red"], "class-conditional"),
                           (["--ckpt", path], "--prompts"),
                           (["--ckpt", path, "--caption", folder, "--out", "x.npz"], ".jsonl")):
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), *args], cwd=tmp,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0 and expected in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
