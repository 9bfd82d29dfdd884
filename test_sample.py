"""Tests of sample.py: determinism, AR mode against a sampler without the KV cache, an overfit tiny model's AR
samples, zero-shot editing, both checkpoint layouts, the FID npz and torchrun. Run by test_all.py."""
import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
from PIL import Image

import mask
import sample
from diffusion import Diffusion
from model import CausalFusion, patchify
from test_all import _authors_state_dict
from vae import build_vae

HERE = os.path.dirname(os.path.abspath(__file__))
TMP = tempfile.TemporaryDirectory()  # checkpoints shared by the tests of one run


def templates():
    """The overfit model's 4 classes: 8x8 RGB images in [-1, 1], (4, 3, 8, 8)."""
    t = -torch.ones(4, 3, 8, 8)
    t[0, 0] = 0.8  # red
    t[1, 2] = 0.8  # blue
    t[2, :, :4] = 1.0  # white top half
    t[3, 1, :, :4] = 0.8  # green left half
    return t


def save_ckpt(model, path):
    """A checkpoint in train.py's layout (pixel space: --vae none)."""
    sd = model.state_dict()
    data = dict(vae="none", scale_factor=1.0, latent_shape=[3, 8, 8], image_size=8, num_classes=4,
                class_names=["red", "blue", "top", "left"])
    torch.save(dict(model=sd, ema=sd, step=0, config={}, model_config=model.config, data=data), path)
    return path


def random_model():
    """Untrained tiny model (random head, so outputs are not trivially zero) and its checkpoint."""
    torch.manual_seed(0)
    model = CausalFusion(size="T", input_size=8, patch_size=2, in_channels=3, num_classes=4, num_cond_tokens=4)
    torch.nn.init.normal_(model.final_layer[1].weight, std=0.02)
    path = os.path.join(TMP.name, "random.pt")
    return model.eval(), path if os.path.exists(path) else save_ckpt(model, path)


def overfit_model():
    """A tiny model trained (~10 s) to generate the 4 templates; cached for the run."""
    path = os.path.join(TMP.name, "overfit.pt")
    if not os.path.exists(path):
        torch.manual_seed(0)
        model = CausalFusion(hidden_size=64, depth=2, num_heads=4, input_size=8, patch_size=2, in_channels=3,
                             num_classes=4, num_cond_tokens=4)
        diffusion, g, n, L = Diffusion(), torch.Generator().manual_seed(0), 16, 16
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95))
        for _ in range(300):  # train.py's step: random order, split, timestep; label dropout for CFG
            y = torch.randint(4, (n,), generator=g)
            order = mask.token_order(n, 4, 4, "random", g)
            steps = mask.sample_step_ids(mask.sample_num_steps(n, L, 0.9, g), L, g)
            t, noise = torch.randint(0, 1000, (n,), generator=g), torch.randn(n, L, 12, generator=g)
            x0 = patchify(templates()[y], 2).gather(1, order[..., None].expand(n, L, 12))  # AR order
            y = torch.where(torch.rand(n, generator=g) < 0.1, model.null_class, y)
            loss = diffusion.training_loss(model, x0, t, noise, mask.ar_weights(steps, 2.0), y=y, pos=order,
                                           attn_mask=mask.causal_mask(steps, steps, 4))
            opt.zero_grad()
            loss.backward()
            opt.step()
        save_ckpt(model, path)
    return sample.load_checkpoint(path)[0], path


def nearest_template(images):
    """uint8 images (N, 8, 8, 3) -> index of the nearest template (N,)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    return ((x[:, None] - templates()[None]) ** 2).flatten(2).mean(2).argmin(1).numpy()


def reference_tokens(model, labels, batch_seed, steps, ar_steps=1, split="equal", order="random", cfg_scale=1.0,
                     cfg_interval=(0, 1000)):
    """sample_batch without the KV cache: every eps is a full model.forward over [cond | clean tokens of the
    finished AR steps | noisy tokens of this step] under the generalized causal mask; same random draws."""
    n, L, P = len(labels), model.num_tokens, model.token_dim
    g = torch.Generator().manual_seed(batch_seed)
    pos, sizes = sample.ar_plan(n, torch.arange(L), ar_steps, split, order, g)
    noise = torch.Generator().manual_seed(int(torch.randint(2 ** 62, (1,), generator=g)))
    ids = mask.step_ids_from_sizes(sizes).expand(n, L)
    y = torch.cat([labels, torch.full_like(labels, model.null_class)]) if cfg_scale > 1 else labels
    rep = lambda a, b: a.repeat(b // n, *[1] * (a.dim() - 1))  # (N, ...) -> (b, ...), cond half first
    diffusion, clean, start = Diffusion(steps), torch.zeros(n, 0, P), 0
    out = torch.zeros(n, L, P)
    with torch.no_grad():
        for size in sizes:
            sl = slice(start, start + size)
            attn = mask.causal_mask(ids[:, :start], ids[:, sl], model.num_cond_tokens)
            eps_fn = lambda x, t: model(rep(clean, len(x)), x, torch.full((len(x),), t), y, rep(pos[:, sl], len(x)),
                                        rep(attn, len(x)), clean_pos=rep(pos[:, :start], len(x)))
            x = diffusion.sample(eps_fn, torch.randn(n, size, P, generator=noise), noise, cfg_scale, cfg_interval)
            clean = torch.cat([clean, x], 1)
            out.scatter_(1, pos[:, sl, None].expand_as(x), x)
            start += size
    return out


def assert_close(got, ref):
    """float32 agreement of two samplers (the untrained model's tokens reach hundreds: a relative bound)."""
    err = (got - ref).abs().max().item()
    assert err < 1e-5 * max(1.0, ref.abs().max().item()), err


def run_cli(*args, torchrun=False):
    """python sample.py ARGS (or torchrun with 2 CPU processes) in a subprocess; returns its stdout."""
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"] if torchrun else []
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, *launcher, os.path.join(HERE, "sample.py"), *map(str, args)],
                          cwd=HERE, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


# ------------------------------------------------------------------------------------------------ tests
def test_same_seed_same_samples():
    model, _ = random_model()
    vae, kw = build_vae("none"), dict(ar_steps=3, split="random", steps=10, batch_size=3)
    a = sample.sample_images(model, vae, 1.0, 7, seed=5, **kw)
    b = sample.sample_images(model, vae, 1.0, 7, seed=5, **kw)
    c = sample.sample_images(model, vae, 1.0, 7, seed=6, **kw)
    assert a[0].shape == (7, 8, 8, 3) and a[0].dtype == np.uint8
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[1], c[1])  # images and random classes
    # two ranks' shares, put in index order, are the one-process samples
    shares = [sample.sample_images(model, vae, 1.0, 7, seed=5, rank=r, world_size=2, **kw) for r in (0, 1)]
    order = np.argsort(np.concatenate([s[2] for s in shares]))
    assert np.array_equal(np.concatenate([s[0] for s in shares])[order], a[0])


def test_ar_mode_one_step_is_diffusion_mode():
    model, _ = random_model()
    labels, diffusion = torch.tensor([0, 3, 1]), Diffusion(20)
    got = sample.sample_batch(model, diffusion, labels, 11, ar_steps=1, cfg_scale=2.0, cfg_interval=(0, 600))
    # the same draws through generate() with one AR step of all L tokens: bit-identical
    g = torch.Generator().manual_seed(11)
    order, sizes = sample.ar_plan(3, torch.arange(16), 1, "equal", "random", g)
    noise = torch.Generator().manual_seed(int(torch.randint(2 ** 62, (1,), generator=g)))
    direct = sample.generate(model, diffusion, labels, [16], order, noise, 2.0, (0, 600))
    assert sizes == [16] and torch.equal(got, direct)
    # and DiT-style diffusion sampling without a cache: all L noisy tokens in every forward
    assert_close(got, reference_tokens(model, labels, 11, 20, cfg_scale=2.0, cfg_interval=(0, 600)))


def test_ar_mode_matches_full_recompute():
    # the KV cache (class tokens once, each step's clean tokens once) gives what recomputing everything gives:
    # token by token (S = L), and a random split in raster order with CFG
    model, _ = random_model()
    labels = torch.tensor([2, 0])
    for kw in (dict(ar_steps=16), dict(ar_steps=3, split="random", order="raster", cfg_scale=3.0)):
        got = sample.sample_batch(model, Diffusion(8), labels, 4, **kw)
        assert_close(got, reference_tokens(model, labels, 4, 8, **kw))


def test_overfit_model_ar_modes_are_class_consistent():
    model, _ = overfit_model()
    vae = build_vae("none")
    for S in (1, 2, 4, 8):
        images, labels, _ = sample.sample_images(model, vae, 1.0, 8, [0, 1, 2, 3], ar_steps=S, steps=30, seed=S)
        assert images.shape == (8, 8, 8, 3) and images.dtype == np.uint8
        assert labels.tolist() == [0, 1, 2, 3] * 2
        assert (nearest_template(images) == labels).mean() >= 0.75, (S, nearest_template(images), labels)


def test_edit_keeps_tokens_bit_identical():
    model, path = overfit_model()
    originals = sample.sample_batch(model, Diffusion(20), torch.tensor([0, 2]), 1)
    mask_png = os.path.join(TMP.name, "mask.png")
    Image.fromarray(np.kron(np.eye(4, dtype=np.uint8) * 255, np.ones((2, 2), np.uint8))).save(mask_png)  # diagonal
    for keep, kw in (("outer", {}), ("top", dict(ar_steps=4)), (mask_png, dict(ar_steps=12, cfg_scale=2.0))):
        kept = sample.keep_mask(keep, model.grid_size)
        edits = sample.edit_tokens(model, originals, kept, [1, 3], seed=0, steps=20, **kw)  # (2, 2, L, P)
        assert edits.shape == (2, 2, 16, 12)
        k = kept.flatten()
        assert torch.equal(edits[:, :, k], originals[:, None, k].expand(-1, 2, -1, -1)), keep
        assert (edits[:, :, ~k] != originals[:, None, ~k]).any(-1).all(), keep  # the rest is regenerated
    assert sample.keep_mask("outer", 4).sum() == 12 and sample.keep_mask("inner", 16).sum() == 64
    assert sample.keep_mask(mask_png, 4).equal(torch.eye(4, dtype=torch.bool))

    # the command line on a stored image (vae none: the pixels of the kept region come back exactly)
    images = sample.tokens_to_images(originals, model, build_vae("none"), 1.0)
    np.savez(os.path.join(TMP.name, "orig.npz"), arr_0=images)
    out_dir = os.path.join(TMP.name, "edit")
    sample.main(["--ckpt", path, "--edit", os.path.join(TMP.name, "orig.npz"), "--edit-index", "1", "--keep", "top",
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


def test_authors_checkpoint_samples():
    g = torch.Generator().manual_seed(0)
    sd = _authors_state_dict(depth=2, hidden=64, heads=4, patch=1, channels=16, grid=4, num_cond=4, num_classes=10,
                             g=g)
    path = os.path.join(TMP.name, "authors.pt")
    args = argparse.Namespace(model="CausalFusion-XL", image_size=64, num_classes=10, global_seed=0)
    torch.save({"model": sd, "ema": sd, "opt": {}, "train_steps": 1, "args": args}, path)
    model, meta = sample.load_checkpoint(path)
    assert model.config == dict(hidden_size=64, depth=2, num_heads=4, input_size=4, patch_size=1, in_channels=16,
                                num_classes=10, num_cond_tokens=4, cond_repeat=1, learn_pos=True, mlp_ratio=4.0)
    assert meta["vae"] == "mar" and meta["image_size"] == 64 and meta["scale_factor"] == 0.2325
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())
    out = os.path.join(TMP.name, "authors.npz")
    sample.main(["--ckpt", path, "--vae-ckpt", "random", "--num-samples", "2", "--steps", "5", "--ar-steps", "2",
                 "--cfg-scale", "1.5", "--out", out, "--out-dir", os.path.join(TMP.name, "authors")])
    assert np.load(out)["arr_0"].shape == (2, 64, 64, 3)
    # the released XL configuration, inferred from tensor shapes alone (meta device: no memory)
    with torch.device("meta"):
        xl = CausalFusion(depth=32, hidden_size=1280, num_heads=20, input_size=16, patch_size=1, in_channels=16,
                          num_classes=1000, num_cond_tokens=64, learn_pos=True)
    config, meta = sample._authors_config(xl.state_dict(), "mar")
    assert config == xl.config and meta["image_size"] == 256 and meta["latent_shape"] == [16, 16, 16]


def test_clear_errors():
    model, path = random_model()
    base = ["--ckpt", path, "--steps", "2", "--num-samples", "1", "--out-dir", os.path.join(TMP.name, "errors")]
    for args, words in ((["--cfg-scale", "0.5"], "--cfg-scale"), (["--cfg-interval", "0", "1200"], "--cfg-interval"),
                        (["--ar-steps", "17"], "1..16"), (["--classes", "4"], "--classes [4]"),
                        (["--classes", "purple"], "class names"), (["--edit-class", "0"], "--classes"),
                        (["--edit-class", "0", "--classes", "1", "--keep", "middle"], "--keep 'middle'"),
                        (["--out", "samples.png"], "--out must name an .npz")):
        try:
            sample.main(base + args)
            raise AssertionError(f"no error for {args}")
        except ValueError as e:
            assert words in str(e), (args, str(e))
    # a checkpoint whose tensors do not fit its config: the file, the key and both shapes
    bad = os.path.join(TMP.name, "bad.pt")
    ckpt = torch.load(path, weights_only=True)
    ckpt["model_config"]["num_classes"] = 7
    torch.save(ckpt, bad)
    try:
        sample.load_checkpoint(bad)
        raise AssertionError("no error for a mismatched checkpoint")
    except ValueError as e:
        assert bad in str(e) and "y_embedder.embedding_table.weight: checkpoint (5, 512), config (8, 512)" in str(e)


def test_npz_and_torchrun_match():
    # the command-line contract; ADM's npz; 2 processes (gloo) give the 1-process file exactly
    _, path = random_model()
    args = ["--ckpt", path, "--num-samples", "5", "--batch-size", "2", "--ar-steps", "4", "--steps", "4",
            "--cfg-scale", "1.5", "--seed", "3"]
    one, two = os.path.join(TMP.name, "one.npz"), os.path.join(TMP.name, "two.npz")
    run_cli(*args, "--out", one, "--out-dir", os.path.join(TMP.name, "one"))
    run_cli(*args, "--out", two, "--out-dir", os.path.join(TMP.name, "two"), torchrun=True)
    a, b = np.load(one), np.load(two)
    assert a["arr_0"].shape == (5, 8, 8, 3) and a["arr_0"].dtype == np.uint8 and a["labels"].shape == (5,)
    assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["labels"], b["labels"])
    assert sorted(os.listdir(os.path.join(TMP.name, "two"))) == ["grid.png"]  # no rank files left behind
