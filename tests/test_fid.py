"""Tests of fid.py (ADM's evaluation suite). No pretrained weights on CI: the network runs on random weights in
the real pt_inception-2015-12-05 key layout, written out below independently of fid.py's modules."""
import contextlib
import functools
import io
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import fid

STATS = ("mu", "sigma", "mu_s", "sigma_s")


# ------------------------------------------------------------------------------------------ helpers
def _conv_layout():
    """(name, cin, cout, kh, kw) of the 94 BasicConv2d of pytorch-fid's FID Inception (torchvision's names)."""
    convs = [("Conv2d_1a_3x3", 3, 32, 3, 3), ("Conv2d_2a_3x3", 32, 32, 3, 3), ("Conv2d_2b_3x3", 32, 64, 3, 3),
             ("Conv2d_3b_1x1", 64, 80, 1, 1), ("Conv2d_4a_3x3", 80, 192, 3, 3)]
    for name, cin, pool in (("Mixed_5b", 192, 32), ("Mixed_5c", 256, 64), ("Mixed_5d", 288, 64)):
        convs += [(f"{name}.{b}", i, o, kh, kw) for b, i, o, kh, kw in (
            ("branch1x1", cin, 64, 1, 1), ("branch5x5_1", cin, 48, 1, 1), ("branch5x5_2", 48, 64, 5, 5),
            ("branch3x3dbl_1", cin, 64, 1, 1), ("branch3x3dbl_2", 64, 96, 3, 3), ("branch3x3dbl_3", 96, 96, 3, 3),
            ("branch_pool", cin, pool, 1, 1))]
    convs += [("Mixed_6a.branch3x3", 288, 384, 3, 3), ("Mixed_6a.branch3x3dbl_1", 288, 64, 1, 1),
              ("Mixed_6a.branch3x3dbl_2", 64, 96, 3, 3), ("Mixed_6a.branch3x3dbl_3", 96, 96, 3, 3)]
    for name, c in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
        convs += [(f"{name}.{b}", i, o, kh, kw) for b, i, o, kh, kw in (
            ("branch1x1", 768, 192, 1, 1), ("branch7x7_1", 768, c, 1, 1), ("branch7x7_2", c, c, 1, 7),
            ("branch7x7_3", c, 192, 7, 1), ("branch7x7dbl_1", 768, c, 1, 1), ("branch7x7dbl_2", c, c, 7, 1),
            ("branch7x7dbl_3", c, c, 1, 7), ("branch7x7dbl_4", c, c, 7, 1), ("branch7x7dbl_5", c, 192, 1, 7),
            ("branch_pool", 768, 192, 1, 1))]
    convs += [("Mixed_7a.branch3x3_1", 768, 192, 1, 1), ("Mixed_7a.branch3x3_2", 192, 320, 3, 3),
              ("Mixed_7a.branch7x7x3_1", 768, 192, 1, 1), ("Mixed_7a.branch7x7x3_2", 192, 192, 1, 7),
              ("Mixed_7a.branch7x7x3_3", 192, 192, 7, 1), ("Mixed_7a.branch7x7x3_4", 192, 192, 3, 3)]
    for name, cin in (("Mixed_7b", 1280), ("Mixed_7c", 2048)):
        convs += [(f"{name}.{b}", i, o, kh, kw) for b, i, o, kh, kw in (
            ("branch1x1", cin, 320, 1, 1), ("branch3x3_1", cin, 384, 1, 1), ("branch3x3_2a", 384, 384, 1, 3),
            ("branch3x3_2b", 384, 384, 3, 1), ("branch3x3dbl_1", cin, 448, 1, 1), ("branch3x3dbl_2", 448, 384, 3, 3),
            ("branch3x3dbl_3a", 384, 384, 1, 3), ("branch3x3dbl_3b", 384, 384, 3, 1), ("branch_pool", cin, 192, 1, 1))]
    return convs


@functools.lru_cache(maxsize=None)
def _random_weights(seed=0):
    """A random state dict in the published file's layout; He-scaled so activations stay O(1) through ReLUs."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, cin, cout, kh, kw in _conv_layout():
        sd[f"{name}.conv.weight"] = torch.randn(cout, cin, kh, kw, generator=g) * math.sqrt(2 / (cin * kh * kw))
        sd[f"{name}.bn.weight"] = 1 + 0.1 * torch.randn(cout, generator=g)
        sd[f"{name}.bn.bias"] = 0.1 * torch.randn(cout, generator=g)
        sd[f"{name}.bn.running_mean"] = 0.1 * torch.randn(cout, generator=g)
        sd[f"{name}.bn.running_var"] = 1 + 0.1 * torch.rand(cout, generator=g)
    sd["fc.weight"] = torch.randn(1008, 2048, generator=g) * 0.05
    sd["fc.bias"] = torch.randn(1008, generator=g)
    return sd


@pytest.fixture(scope="module")
def inception(inception_weights):
    """The network with the random weights of conftest.py's inception_weights (_random_weights), one per module."""
    return fid.load_inception(inception_weights)


def _images(n, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _raises(exc, fn, *words):
    """fn() raises exc, and its message holds every word."""
    with pytest.raises(exc) as excinfo:
        fn()
    assert all(w in str(excinfo.value) for w in words), (str(excinfo.value), words)


# ---------------------------------------------------------------------------------- Frechet distance
def test_frechet_closed_forms():
    rng = np.random.default_rng(0)
    d = 16
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    # identity covariances: only the means count
    assert math.isclose(fid.frechet_distance(mu1, np.eye(d), mu2, np.eye(d)), np.sum((mu1 - mu2) ** 2), rel_tol=1e-9)
    # commuting covariances Q diag(a) Q^T, Q diag(b) Q^T: sum (sqrt a - sqrt b)^2
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert math.isclose(fid.frechet_distance(mu1, s1, mu2, s2), expected, rel_tol=1e-7)
    # a zero covariance: |dmu|^2 + tr(sigma1)
    assert math.isclose(fid.frechet_distance(mu1, s1, mu2, 0 * s2), np.sum((mu1 - mu2) ** 2) + a.sum(), rel_tol=1e-7)
    # identical statistics of real-looking, rank-deficient features (fewer samples than dims): ~0
    x = rng.normal(size=(40, 64)) ** 2
    mu, sigma = x.mean(0), np.cov(x, rowvar=False)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-5
    # a covariance with a negative eigenvalue gives a clearly imaginary root: ADM's error
    _raises(ValueError, lambda: fid.frechet_distance(mu1, -np.eye(d), mu2, np.eye(d)), "Imaginary")
    _raises(ValueError, lambda: fid.frechet_distance(mu1, np.eye(d), mu2[:8], np.eye(8)), "dimensions")


# ------------------------------------------------------------------------------------------- resize
def test_fid_tf1_resize_hand_computed_ramp():
    # ramp 10*x + 100*y, 4x4 -> 6x6: TF1 legacy samples the input at i * 4/6 (clamped to the last pixel)
    ramp = (10 * torch.arange(4.0)[None, :] + 100 * torch.arange(4.0)[:, None])[None, :, :, None]  # (1, 4, 4, 1)
    up = torch.tensor([0, 2 / 3, 4 / 3, 2, 8 / 3, 3])  # source coordinates by hand; 10/3 clamps to 3
    got = fid.tf1_resize(ramp, 6)[0, :, :, 0]
    assert torch.allclose(got, 10 * up[None, :] + 100 * up[:, None], atol=1e-4), got
    # downsampling 6 -> 4 samples at 0, 1.5, 3, 4.5 without antialiasing
    ramp6 = (10 * torch.arange(6.0))[None, None, :, None].expand(1, 2, 6, 3).contiguous()
    assert torch.allclose(fid.tf1_resize(ramp6, 4)[0, :, :, 1], torch.tensor([[0, 15, 30, 45.0]] * 4), atol=1e-4)
    # not PyTorch's align_corners=False (half-pixel centres), which gives 0, 5, 11.7, ... on the x axis
    torch_up = F.interpolate(ramp.permute(0, 3, 1, 2), size=(6, 6), mode="bilinear", align_corners=False)[0, 0]
    assert (torch_up - got).abs().max() > 1
    # same size: the identity
    x = torch.rand(2, 6, 6, 3) * 255
    assert torch.equal(fid.tf1_resize(x, 6), x)


# -------------------------------------------------------------------------------- Inception score
def test_inception_score_closed_forms():
    logits = np.random.default_rng(0).normal(size=(1, 1008)).repeat(10, 0)
    assert abs(fid.inception_score(logits) - 1) < 1e-9  # identical rows: p(y|x) = p(y)
    k = 8
    onehot = 100 * np.eye(1008)[np.arange(4 * k) % k]  # K balanced confident classes: IS = K
    assert abs(fid.inception_score(onehot) - k) < 1e-6
    # ADM's splits: each split's score, averaged (4 rows of 2 classes, then 4 rows of 4 classes)
    split = 100 * np.eye(1008)[[0, 1, 0, 1, 0, 1, 2, 3]]
    assert abs(fid.inception_score(split, split_size=4) - 3) < 1e-6


# ----------------------------------------------------------------------------- precision / recall
def _brute_force_pr(ref, samples, k=3):
    dist = lambda a, b: ((a[:, None].astype(np.float64) - b[None]) ** 2).sum(-1)
    ref_radii, sample_radii = np.sort(dist(ref, ref), 1)[:, k], np.sort(dist(samples, samples), 1)[:, k]
    d = dist(ref, samples)
    return (d <= ref_radii[:, None]).any(0).mean(), (d <= sample_radii[None]).any(1).mean(), ref_radii


def test_precision_recall_identical_and_far_sets():
    x = np.random.default_rng(0).normal(size=(100, 64)).astype(np.float32)
    assert fid.precision_recall(x, x) == (1.0, 1.0)
    assert fid.precision_recall(x, x + 10) == (0.0, 0.0)


def test_precision_recall_matches_brute_force():
    # small integer features: every float16 step of ADM's distance is exact, so float64 must agree exactly
    # (ties included); scaled by 64 the float16 block overflows and ADM's float32 fallback is taken, exact too
    rng = np.random.default_rng(1)
    for scale in (1, 64):
        ref, samples = rng.integers(0, 4, (40, 8)), rng.integers(0, 4, (30, 8))
        ref[30:, 0] += 6  # a cluster of reference points without samples (recall < 1)
        samples[22:, 1] -= 6  # and of samples without reference points (precision < 1)
        ref, samples = (scale * ref).astype(np.float32), (scale * samples).astype(np.float32)
        precision, recall, ref_radii = _brute_force_pr(ref, samples)
        assert 0 < precision < 1 and 0 < recall < 1, (precision, recall)
        d = fid._sq_distances(torch.from_numpy(ref), torch.from_numpy(samples))
        assert (d.max() > 65504) == (scale == 64)  # the fallback really ran
        for block in (7, 16, 10000):
            assert fid.precision_recall(ref, samples, block=block) == (precision, recall), (scale, block)
            assert np.array_equal(fid.manifold_radii(torch.from_numpy(ref), block=block).numpy(), ref_radii)


def test_precision_recall_block_size_and_float16_rounding():
    rng = np.random.default_rng(2)
    ref, samples = rng.normal(size=(53, 32)).astype(np.float32), rng.normal(0.3, 1, (37, 32)).astype(np.float32)
    results = {fid.precision_recall(ref, samples, block=b) for b in (9, 16, 10000)}
    assert len(results) == 1, results
    d = fid._sq_distances(torch.from_numpy(ref), torch.from_numpy(samples))  # ADM computes them in float16
    assert torch.equal(d.half().float(), d)
    exact = torch.cdist(torch.from_numpy(ref).double(), torch.from_numpy(samples).double()) ** 2
    assert torch.allclose(d.double(), exact, rtol=2e-3, atol=0.1)


# ------------------------------------------------------------------------------------ the network
def test_fid_inception_weights_load_strictly(inception, tmp):
    sd = _random_weights()
    tracked = dict(sd, **{f"{n}.bn.num_batches_tracked": torch.tensor(0) for n, *_ in _conv_layout()})
    assert len(sd) == 472 and len(tracked) == 566 and set(fid.FIDInception().state_dict()) == set(tracked)
    model = inception  # the published file has no num_batches_tracked
    assert not model.training and torch.equal(model.Mixed_6d.branch7x7_2.conv.weight,
                                              sd["Mixed_6d.branch7x7_2.conv.weight"])
    path = os.path.join(tmp, "tracked.pth")  # a re-saved model.state_dict() has them
    torch.save(tracked, path)
    assert torch.equal(fid.load_inception(path).fc.weight, sd["fc.weight"])
    torch.save({"fc.weight": sd["fc.weight"]}, os.path.join(tmp, "bad.pth"))
    _raises(fid.InputError, lambda: fid.load_inception(os.path.join(tmp, "bad.pth")), "bad.pth", "Missing")
    _raises(FileNotFoundError, lambda: fid.load_inception(os.path.join(tmp, "none.pth")),
            "none.pth", fid.WEIGHTS_FILE, fid.WEIGHTS_URL)
    old = torch.hub.get_dir()
    torch.hub.set_dir(tmp)
    try:  # default location: the torch hub checkpoints directory
        _raises(FileNotFoundError, fid.load_inception, os.path.join(tmp, "checkpoints", fid.WEIGHTS_FILE))
    finally:
        torch.hub.set_dir(old)


def test_fid_inception_layer_shapes_and_spatial_order(inception):
    model, shapes, taps = inception, {}, {}
    names = ("Conv2d_1a_3x3", "Conv2d_2b_3x3", "Conv2d_4a_3x3", "Mixed_5b", "Mixed_5d", "Mixed_6a", "Mixed_6e",
             "Mixed_7a", "Mixed_7b", "Mixed_7c")
    hooks = [getattr(model, n).register_forward_hook(lambda m, i, o, n=n: shapes.update({n: tuple(o.shape)}))
             for n in names]
    hooks.append(model.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: taps.update(b1x1=o)))
    hooks.append(model.Mixed_7c.register_forward_hook(lambda m, i, o: taps.update(last=o)))
    try:
        with torch.no_grad():
            pool, spatial, logits = model(torch.from_numpy(_images(2, 299)))
    finally:
        for h in hooks:
            h.remove()
    assert shapes == {"Conv2d_1a_3x3": (2, 32, 149, 149), "Conv2d_2b_3x3": (2, 64, 147, 147),
                      "Conv2d_4a_3x3": (2, 192, 71, 71), "Mixed_5b": (2, 256, 35, 35), "Mixed_5d": (2, 288, 35, 35),
                      "Mixed_6a": (2, 768, 17, 17), "Mixed_6e": (2, 768, 17, 17), "Mixed_7a": (2, 1280, 8, 8),
                      "Mixed_7b": (2, 2048, 8, 8), "Mixed_7c": (2, 2048, 8, 8)}, shapes
    assert pool.shape == (2, 2048) and spatial.shape == (2, 2023) and logits.shape == (2, 1008)
    # sFID: the first 7 channels of Mixed_6d's 1x1 branch, flattened in TF's (H, W, C) order
    b1x1 = taps["b1x1"]  # (N, 192, 17, 17)
    assert torch.equal(spatial, b1x1[:, :7].permute(0, 2, 3, 1).reshape(2, 2023))
    assert torch.equal(spatial[1, 7 * (17 * 3 + 5) + 2], b1x1[1, 2, 3, 5])  # row 3, column 5, channel 2
    assert torch.allclose(pool, taps["last"].mean((2, 3)))
    assert torch.allclose(logits, pool @ model.fc.weight.T, atol=1e-4)  # ADM's logits have no bias
    assert 0.05 < pool.mean() < 50 and pool.std() > 0  # random weights still give non-degenerate features


def test_fid_features_batch_size_invariant(inception):
    images = _images(3, 48, seed=3)
    a = fid.compute_activations(inception, images, batch_size=1)
    b = fid.compute_activations(inception, images, batch_size=3)
    for key, shape in (("pool", (3, 2048)), ("spatial", (3, 2023)), ("logits", (3, 1008))):
        assert a[key].shape == shape and a[key].dtype == np.float32
        assert np.allclose(a[key], b[key], rtol=1e-4, atol=1e-5 * np.abs(b[key]).max()), key
    stats = fid.compute_stats(images, inception, batch_size=3)  # the helper other scripts call
    assert all(np.array_equal(stats[k], v) for k, v in fid.stats_from_activations(b).items())


# ------------------------------------------------------------------------------------------- inputs
def test_fid_reads_npz_streaming_and_folders(tmp):
    images = _images(5, 12, seed=4)[:, :, :9]  # (5, 12, 9, 3)
    for save in (np.savez, np.savez_compressed):
        path = os.path.join(tmp, f"{save.__name__}.npz")
        save(path, images, mu=np.zeros(3))
        n, batches = fid.read_images(path, 2)
        batches = list(batches)
        assert n == 5 and [len(b) for b in batches] == [2, 2, 1]
        assert np.array_equal(np.concatenate(batches), images) and batches[0].flags.writeable
    folder = os.path.join(tmp, "pngs")
    os.mkdir(folder)
    for i, image in enumerate(images):
        Image.fromarray(image).save(os.path.join(folder, f"{i:05d}.png"))
    n, batches = fid.read_images(folder, 3)
    assert n == 5 and np.array_equal(np.concatenate(list(batches)), images)
    # bad inputs: the error names the file and the problem
    for arr, words in ((images.astype(np.float32), ("dtype float32", "uint8")),
                       (images.transpose(0, 3, 1, 2).copy(), ("(5, 3, 12, 9)", "NHWC")),
                       (images[:1], ("at least 2",))):
        path = os.path.join(tmp, "bad.npz")
        np.savez(path, arr)
        _raises(fid.InputError, lambda: fid.read_images(path, 2), "bad.npz", *words)
    np.savez(os.path.join(tmp, "stats.npz"), mu=np.zeros(4), sigma=np.eye(3))
    _raises(fid.InputError, lambda: fid.read_stats(os.path.join(tmp, "stats.npz")), "stats.npz", "sigma")
    _raises(fid.InputError, lambda: fid.read_images(os.path.join(tmp, "stats.npz"), 2), "stats.npz", "arr_0")
    # a folder with a file that is not an image, or of another size: named before any image is decoded
    open(os.path.join(folder, "00003.png"), "wb").write(b"not a png")
    _raises(fid.InputError, lambda: fid.read_images(folder, 2), "00003.png", "not a readable image")
    Image.fromarray(images[0, :8]).save(os.path.join(folder, "00003.png"))
    _raises(fid.InputError, lambda: fid.read_images(folder, 2), "00003.png", "(8, 9, 3)", "(12, 9, 3)")
    # a truncated .npz (its zip directory lost) and a file that is no .npz at all
    truncated = os.path.join(tmp, "truncated.npz")
    open(truncated, "wb").write(open(os.path.join(tmp, "savez.npz"), "rb").read()[:300])
    _raises(fid.InputError, lambda: fid.read_images(truncated, 2), "truncated.npz", "neither an .npz")


def test_fid_main_end_to_end(inception_weights, tmp, monkeypatch):
    # the 2048-d matrix square roots take minutes on a small CPU: record the statistics main passes instead
    calls = []
    monkeypatch.setattr(fid, "frechet_distance", lambda *stats: calls.append(stats) or float(len(calls)))
    ref, samples, stats = (os.path.join(tmp, n) for n in ("ref.npz", "samples.npz", "stats.npz"))
    np.savez(ref, _images(4, 32, seed=5))
    np.savez_compressed(samples, _images(4, 40, seed=6))

    def run(*args, weights=inception_weights):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            fid.main([*args, "--weights", weights, "--batch-size", "4", "--device", "cpu"])
        return dict(line.split(": ") for line in out.getvalue().splitlines())

    full = run(ref, samples, "--save-stats", stats)
    assert list(full) == ["Inception Score", "FID", "sFID", "Precision", "Recall"], full
    assert float(full["Inception Score"]) >= 1 and 0 <= float(full["Precision"]) <= 1
    (mu, sigma, mu_r, sigma_r), (mu_s, sigma_s, *_) = calls  # ADM's order: samples first
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048) and mu_s.shape == (2023,)
    assert mu.dtype == sigma.dtype == np.float64 and not np.array_equal(mu, mu_r)
    with np.load(stats) as f:  # --save-stats: the last input's statistics
        assert sorted(f.files) == ["mu", "mu_s", "sigma", "sigma_s"]
        assert all(np.array_equal(f[k], v) for k, v in zip(STATS, (mu, sigma, mu_s, sigma_s)))
    # a statistics file is used as it is: no images and no network needed (the weights path does not exist)
    assert list(run(stats, stats, "--metrics", "fid", "sfid", weights="missing.pth")) == ["FID", "sFID"]
    assert all(np.array_equal(a, b) for a, b in zip(calls[2], (mu, sigma, mu, sigma)))
    assert all(np.array_equal(a, b) for a, b in zip(calls[3], (mu_s, sigma_s, mu_s, sigma_s)))
    # a reference holding both images and mu/sigma: its mu/sigma are used as they are (ADM)
    both = os.path.join(tmp, "both.npz")
    np.savez(both, _images(4, 32, seed=5), mu=mu_r + 1, sigma=sigma_r)
    assert list(run(both, stats, "--metrics", "fid", weights="missing.pth")) == ["FID"]
    assert all(np.array_equal(a, b) for a, b in zip(calls[4], (mu, sigma, mu_r + 1, sigma_r)))
    _raises(fid.InputError, lambda: run(stats, samples, "--metrics", "precision"), "stats.npz", "arr_0")
    small = os.path.join(tmp, "small.npz")
    np.savez(small, mu=np.zeros(64), sigma=np.eye(64))
    _raises(fid.InputError, lambda: run(small, stats, "--metrics", "fid"), "small.npz", "stats.npz", "64")
    _raises(fid.InputError, lambda: run(ref, samples, "--metrics", "fid", "kid"), "kid")
    _raises(FileNotFoundError, lambda: run(ref, samples, "--metrics", "is", weights="missing.pth"), fid.WEIGHTS_URL)
