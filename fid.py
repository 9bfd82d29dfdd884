"""ADM's evaluation suite (guided-diffusion evaluations/evaluator.py) in PyTorch: IS, FID, sFID, precision, recall.

    python fid.py VIRTUAL_imagenet256_labeled.npz samples.npz              # all five metrics, ADM's output format
    python fid.py REF.npz samples/ --metrics fid sfid                      # a folder of PNG/JPG images
    python fid.py samples.npz --save-stats samples_stats.npz              # mu/sigma/mu_s/sigma_s for reuse

An input is an .npz with arr_0 uint8 (N, H, W, 3) images and/or precomputed mu/sigma/mu_s/sigma_s (used as
they are, like ADM does), or a folder of images. The network is the FID Inception (TF Inception-v3 2015-12-05)
in pytorch-fid's port; its weights come from --weights or the torch hub checkpoints directory.
"""
import os
import sys
import warnings
import zipfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from scipy import linalg
from scipy.special import rel_entr, softmax
from tqdm import tqdm

from runtime import ConfigError, parse_config

config = dict(
    metrics=("is", "fid", "sfid", "precision", "recall"),  # which metrics to compute (with two inputs)
    batch_size=64,  # images per Inception forward (ADM: 64); the features do not depend on it
    device="cuda" if torch.cuda.is_available() else "cpu",  # where the network and the distances run
    weights=None,  # path to pt_inception-2015-12-05-6726825d.pth; None: the torch hub checkpoints directory
    save_stats=None,  # write mu/sigma/mu_s/sigma_s of the last input to this .npz
    pr_block=10000,  # rows/cols per distance block in precision/recall (ADM: 10000; ~2 GB per block)
)

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_FILE
METRICS = ("is", "fid", "sfid", "precision", "recall")
STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


class InputError(ValueError):
    """A bad input file or argument; the message names the file and the problem."""


# ------------------------------------------------------------------------------------ the network
def tf1_resize(x, size):
    """Bilinear resize of (N, H, W, C) float32 as TF1's ResizeBilinear (align_corners=False, no half-pixel
    centres, no antialias): output pixel i samples the input at i * in/out, clamped to the last pixel.
    This is the resize inside the Inception graph that ADM feeds; PyTorch's align_corners=False differs."""
    def taps(n_in):
        scale = torch.tensor(n_in, dtype=torch.float32) / size  # float32 arithmetic, as TF
        src = torch.arange(size, dtype=torch.float32, device=x.device) * scale
        lo = src.floor()
        return lo.long(), (lo.long() + 1).clamp(max=n_in - 1), src - lo
    (y0, y1, wy), (x0, x1, wx) = taps(x.shape[1]), taps(x.shape[2])
    wx = wx[:, None]  # (W', 1) broadcasts over channels
    top, bottom = x[:, y0], x[:, y1]  # (N, H', W, C)
    top = top[:, :, x0] + (top[:, :, x1] - top[:, :, x0]) * wx  # TF's lerp order: x first, then y
    bottom = bottom[:, :, x0] + (bottom[:, :, x1] - bottom[:, :, x0]) * wx
    return top + (bottom - top) * wy[:, None, None]


def tf_avg_pool(x):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)  # TF does not count the padding


class BasicConv2d(nn.Module):
    def __init__(self, cin, cout, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class InceptionA(nn.Module):  # Mixed_5b-5d, 35x35
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(tf_avg_pool(x))], 1)


class InceptionB(nn.Module):  # Mixed_6a, 35x35 -> 17x17
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):  # Mixed_6b-6e, 17x17, factorized 7x7
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7d = self.branch7x7dbl_1(x)
        b7d = self.branch7x7dbl_5(self.branch7x7dbl_4(self.branch7x7dbl_3(self.branch7x7dbl_2(b7d))))
        return torch.cat([self.branch1x1(x), b7, b7d, self.branch_pool(tf_avg_pool(x))], 1)


class InceptionD(nn.Module):  # Mixed_7a, 17x17 -> 8x8
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):  # Mixed_7b-7c, 8x8
    def __init__(self, cin, max_pool):
        super().__init__()
        self.max_pool = max_pool  # the FID Inception's Mixed_7c pools with max, not avg (a quirk of the TF graph)
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else tf_avg_pool(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(b3d), self.branch3x3dbl_3b(b3d), self.branch_pool(pool)], 1)


class FIDInception(nn.Module):
    """Inception-v3 2015-12-05 in pytorch-fid's key layout. Input: uint8 or float (N, H, W, 3) in 0..255.
    Output: pool3 (N, 2048), spatial (N, 2023) and logits (N, 1008), the three taps ADM uses."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = InceptionA(192, 32), InceptionA(256, 64), InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b, self.Mixed_6c = InceptionC(768, 128), InceptionC(768, 160)
        self.Mixed_6d, self.Mixed_6e = InceptionC(768, 160), InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b, self.Mixed_7c = InceptionE(1280, max_pool=False), InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)

    def forward(self, images):
        x = tf1_resize(images.float(), 299)
        x = ((x - 128) / 128).permute(0, 3, 1, 2)  # (N, 3, 299, 299) in [-1, 1]
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(F.max_pool2d(x, 3, stride=2))))  # (N, 288, 35, 35)
        x = self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x))))  # (N, 768, 17, 17)
        # sFID: ADM's "mixed_6/conv" is Mixed_6d's 1x1 branch, the first 192 output channels; it keeps 7 of them
        spatial = x[:, :7].permute(0, 2, 3, 1).flatten(1)  # (N, 17, 17, 7) TF's NHWC order -> (N, 2023)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(self.Mixed_6e(x))))  # (N, 2048, 8, 8)
        pool = x.mean((2, 3))  # (N, 2048) pool_3
        logits = pool @ self.fc.weight.T  # ADM's IS takes softmax/logits/MatMul: no bias
        return pool, spatial, logits


def load_inception(weights=None, device="cpu"):
    """The FID Inception with its pretrained weights, in eval mode; a clear error if the file is missing."""
    path = weights or os.path.join(torch.hub.get_dir(), "checkpoints", WEIGHTS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: Inception weights not found. fid.py needs {WEIGHTS_FILE}, published at "
                                f"{WEIGHTS_URL}; download it to {os.path.dirname(path) or '.'} or pass --weights PATH.")
    state = torch.load(path, map_location="cpu", weights_only=True)
    # the published file has no num_batches_tracked; in a plain dict BatchNorm fills in the missing counters
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    model = FIDInception()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise InputError(f"{path}: not the {WEIGHTS_FILE} layout (472 tensors): {e}") from None
    return model.eval().requires_grad_(False).to(device)


# ----------------------------------------------------------------------------------------- inputs
def _check_images(path, shape, dtype):
    if dtype != np.uint8:
        raise InputError(f"{path}: images have dtype {dtype}, expected uint8 in 0..255")
    if len(shape) != 4 or shape[3] != 3:
        raise InputError(f"{path}: images have shape {tuple(shape)}, expected NHWC (N, H, W, 3)")
    if shape[0] < 2:
        raise InputError(f"{path}: {shape[0]} image(s); the statistics need at least 2")


def _npz_keys(path):
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file or folder")
    try:
        with zipfile.ZipFile(path) as z:
            return {name[:-4] for name in z.namelist() if name.endswith(".npy")}
    except zipfile.BadZipFile:
        raise InputError(f"{path}: neither an .npz file nor a folder of images") from None


def _read_header(f, path):
    """(shape, fortran_order, dtype) of the .npy stream f, leaving f at the start of the data."""
    version = np.lib.format.read_magic(f)
    read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in read:
        raise InputError(f"{path}: arr_0 has .npy format version {version}, expected 1.0 or 2.0")
    return read[version](f)


def _npz_batches(path, batch_size):
    """Stream arr_0 batch by batch (50,000 images at 256x256 are 9.8 GB), like ADM's StreamingNpzArrayReader."""
    with zipfile.ZipFile(path) as z, z.open("arr_0.npy") as f:  # ZipExtFile inflates savez_compressed lazily
        shape, fortran, _ = _read_header(f, path)
        if fortran:  # rare (np.save of a Fortran-ordered array): cannot be streamed, load it whole
            arr = np.load(path)["arr_0"]
            yield from (arr[i:i + batch_size] for i in range(0, len(arr), batch_size))
            return
        image_bytes = int(np.prod(shape[1:]))
        for i in range(0, shape[0], batch_size):
            n = min(batch_size, shape[0] - i)
            data = f.read(n * image_bytes)
            if len(data) != n * image_bytes:
                raise InputError(f"{path}: arr_0 is truncated at image {i + len(data) // image_bytes}")
            yield np.frombuffer(bytearray(data), dtype=np.uint8).reshape(n, *shape[1:])  # (n, H, W, 3)


def _open_image(path, decode):
    """An image file's (H, W, 3) uint8 pixels (decode) or its (H, W, 3) shape from the header alone."""
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB")) if decode else (img.height, img.width, 3)
    except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for a file it cannot read
        raise InputError(f"{path}: not a readable image ({e})") from None


def _folder_batches(path, files, shape, batch_size):
    for i in range(0, len(files), batch_size):
        images = []
        for name in files[i:i + batch_size]:
            image = _open_image(os.path.join(path, name), decode=True)  # (H, W, 3) uint8
            if image.shape != shape:
                raise InputError(f"{os.path.join(path, name)}: shape {image.shape}, the first image is {shape}")
            images.append(image)
        yield np.stack(images)


def read_images(source, batch_size):
    """(N, iterator of uint8 (n, H, W, 3) batches) for an .npz's arr_0, a folder of PNG/JPG, or an array."""
    if isinstance(source, np.ndarray):
        _check_images("image array", source.shape, source.dtype)
        return len(source), (source[i:i + batch_size] for i in range(0, len(source), batch_size))
    if os.path.isdir(source):
        files = sorted(f for f in os.listdir(source) if f.lower().endswith((".png", ".jpg", ".jpeg")))
        if not files:
            raise InputError(f"{source}: no .png/.jpg images in this folder")
        shape = _open_image(os.path.join(source, files[0]), decode=True).shape
        for name in files[1:]:  # every header, before any network pass: a bad file fails now, not minutes later
            if _open_image(os.path.join(source, name), decode=False) != shape:
                raise InputError(f"{os.path.join(source, name)}: shape {_open_image(os.path.join(source, name), False)}"
                                 f", the first image is {shape}")
        _check_images(source, (len(files), *shape), np.dtype(np.uint8))
        return len(files), _folder_batches(source, files, shape, batch_size)
    if "arr_0" not in _npz_keys(source):
        raise InputError(f"{source}: no arr_0 images in this file")
    with zipfile.ZipFile(source) as z, z.open("arr_0.npy") as f:
        shape, _, dtype = _read_header(f, source)
    _check_images(source, shape, dtype)
    return shape[0], _npz_batches(source, batch_size)


def read_stats(source):
    """The precomputed mu/sigma/mu_s/sigma_s an .npz holds (ADM uses a reference file's as they are)."""
    if not isinstance(source, str) or os.path.isdir(source):
        return {}
    keys = _npz_keys(source)
    with np.load(source) as f:
        stats = {k: f[k] for k in STAT_KEYS if k in keys}
    for m, s in (("mu", "sigma"), ("mu_s", "sigma_s")):
        if (m in stats) != (s in stats):
            raise InputError(f"{source}: has {m if m in stats else s} without {s if m in stats else m}")
        if m in stats and (stats[m].ndim != 1 or stats[s].shape != (len(stats[m]),) * 2):
            raise InputError(f"{source}: {m} has shape {stats[m].shape} but {s} has shape {stats[s].shape}")
    return stats


# ---------------------------------------------------------------------------------------- metrics
@torch.inference_mode()
def compute_activations(model, source, batch_size=64, device="cpu"):
    """ADM's taps for every image of source (a path or a uint8 array): float32 numpy arrays pool (N, 2048),
    spatial (N, 2023) and logits (N, 1008)."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # TF32 moves FID visibly
    n, batches = read_images(source, batch_size)
    name = source if isinstance(source, str) else "images"
    outs = []
    for batch in tqdm(batches, total=-(-n // batch_size), desc=f"Inception {name}", unit="batch"):
        outs.append([t.float().cpu().numpy() for t in model(torch.from_numpy(batch).to(device))])
    return {key: np.concatenate(out) for key, out in zip(("pool", "spatial", "logits"), zip(*outs))}


def stats_from_activations(acts):
    """float64 mean and covariance (np.cov, as ADM) of the pool3 and the spatial features."""
    return dict(mu=acts["pool"].mean(0, dtype=np.float64), sigma=np.cov(acts["pool"], rowvar=False),
                mu_s=acts["spatial"].mean(0, dtype=np.float64), sigma_s=np.cov(acts["spatial"], rowvar=False))


def compute_stats(source, model=None, batch_size=64, device="cpu"):
    """mu/sigma/mu_s/sigma_s of source (a path or a uint8 array); a file's precomputed ones as they are."""
    stats = read_stats(source)
    if len(stats) < len(STAT_KEYS):
        acts = compute_activations(model or load_inception(device=device), source, batch_size, device)
        stats = {**stats_from_activations(acts), **stats}
    return stats


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """|mu1 - mu2|^2 + tr(s1 + s2 - 2 sqrtm(s1 s2)), ADM's FIDStatistics.frechet_distance."""
    mu1, mu2, sigma1, sigma2 = np.atleast_1d(mu1), np.atleast_1d(mu2), np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different dimensions: {mu1.shape} {sigma1.shape}, {mu2.shape} {sigma2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)  # no disp=: removed from SciPy, and the default returns just the root
    if not np.isfinite(covmean).all():  # product might be almost singular
        warnings.warn(f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):  # numerical error might give a slight imaginary component
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(logits, split_size=5000):
    """ADM's IS: exp(E KL(p(y|x) || p(y))) per split of 5000 samples (the last split may be shorter), averaged."""
    probs = softmax(logits.astype(np.float64), axis=1)  # (N, 1008)
    scores = []
    for i in range(0, len(probs), split_size):
        part = probs[i:i + split_size]
        scores.append(np.exp(rel_entr(part, part.mean(0, keepdims=True)).sum(1).mean()))  # rel_entr: 0 log 0 = 0
    return float(np.mean(scores))


def _sq_distances(u, v):
    """ADM's DistanceBlock: squared distances (U, V) computed in float16 on the GPU, and again in float32 only if
    the float16 block is not finite. The float16 rounding moves precision/recall at the 1e-3 level, so it is
    replayed step by step: every TF op's output is rounded to float16, while sums and matmuls accumulate in
    float32 as TF's GPU kernels do for float16."""
    h = lambda t: t.half().float()  # round to float16, keep computing in float32
    u16, v16 = h(u), h(v)
    nu, nv = h(h(u16 * u16).sum(1)), h(h(v16 * v16).sum(1))
    d = h(h(nu[:, None] - h(2 * h(u16 @ v16.T))) + nv[None]).clamp_min(0)  # (U, V)
    if torch.isfinite(d).all():
        return d
    return ((u * u).sum(1)[:, None] - 2 * u @ v.T + (v * v).sum(1)[None]).clamp_min(0)


def manifold_radii(feats, k=3, block=10000):
    """Squared distance of each point to its k-th nearest neighbour (ADM: the (k+1)-th smallest distance, the
    point itself included), keeping a running top-(k+1) per row so only one (block, block) tile is in memory."""
    radii = []
    for rows in feats.split(block):
        best = torch.empty(len(rows), 0, device=feats.device)
        for cols in feats.split(block):
            best = torch.cat([best, _sq_distances(rows, cols)], 1).topk(k + 1, dim=1, largest=False).values
        radii.append(best[:, k])
    return torch.cat(radii)


@torch.inference_mode()
def precision_recall(ref, samples, k=3, block=10000, device="cpu"):
    """ADM's ManifoldEstimator.evaluate_pr on pool3 features (N, 2048): precision = fraction of samples inside
    some reference k-NN ball, recall = fraction of reference points inside some sample k-NN ball."""
    torch.backends.cuda.matmul.allow_tf32 = False
    ref, samples = (torch.as_tensor(x, dtype=torch.float32, device=device) for x in (ref, samples))
    if min(len(ref), len(samples)) <= k:
        raise ValueError(f"precision/recall needs more than k={k} points per set, got {len(ref)} and {len(samples)}")
    ref_radii, sample_radii = manifold_radii(ref, k, block), manifold_radii(samples, k, block)
    ref_in = torch.zeros(len(ref), dtype=torch.bool, device=device)
    sample_in = torch.zeros(len(samples), dtype=torch.bool, device=device)
    for i in range(0, len(ref), block):
        for j in range(0, len(samples), block):
            d = _sq_distances(ref[i:i + block], samples[j:j + block])  # (R, S)
            ref_in[i:i + block] |= (d <= sample_radii[None, j:j + block]).any(1)
            sample_in[j:j + block] |= (d <= ref_radii[i:i + block, None]).any(0)
    return sample_in.double().mean().item(), ref_in.double().mean().item()


# ------------------------------------------------------------------------------------------- main
def main(argv=None):
    c = dict(config)
    paths = parse_config(c, argv, positional="REF SAMPLES (or INPUT with --save-stats)")
    if set(c["metrics"]) - set(METRICS):
        raise InputError(f"--metrics: unknown {sorted(set(c['metrics']) - set(METRICS))}, choose from {METRICS}")
    if not (len(paths) == 2 or (len(paths) == 1 and c["save_stats"])):
        raise InputError("usage: python fid.py REF SAMPLES [--metrics ...] or python fid.py INPUT --save-stats OUT.npz")
    ref, sample = paths if len(paths) == 2 else (None, paths[0])
    want = [m for m in METRICS if m in c["metrics"]] if ref else []
    pr = "precision" in want or "recall" in want
    stats, todo = {}, []  # check every input before the slow part
    for path in dict.fromkeys(p for p in (ref, sample) if p):  # each file once, even as both inputs
        stats[path] = read_stats(path)
        keys = []  # the statistics this input must provide
        if "fid" in want or (path == sample and c["save_stats"]):
            keys += ["mu", "sigma"]
        if "sfid" in want or (path == sample and c["save_stats"]):
            keys += ["mu_s", "sigma_s"]
        needs = [k for k in keys if k not in stats[path]]  # what the images are needed for
        needs += ["precision/recall"] if pr else []
        needs += ["IS"] if path == sample and "is" in want else []
        if needs:
            if not os.path.isdir(path) and "arr_0" not in _npz_keys(path):
                raise InputError(f"{path}: no arr_0 images in this file, needed for {', '.join(needs)}")
            n, _ = read_images(path, 1)
            if pr and n <= 3:
                raise InputError(f"{path}: precision/recall needs at least 4 images (k=3 neighbours)")
            todo.append(path)
    for path in stats:  # how sample.py made it
        if not os.path.isdir(path) and "provenance" in _npz_keys(path):
            with np.load(path) as npz:
                print(f"{path}: made by {npz['provenance']}")
    model = load_inception(c["weights"], c["device"]) if todo else None
    acts = {path: compute_activations(model, path, c["batch_size"], c["device"]) for path in todo}
    for path in todo:
        stats[path] = {**stats_from_activations(acts[path]), **stats[path]}
    if "is" in want:
        print("Inception Score:", inception_score(acts[sample]["logits"]))
    for metric, m, s, label in (("fid", "mu", "sigma", "FID"), ("sfid", "mu_s", "sigma_s", "sFID")):
        if metric in want:
            a, b = stats[sample], stats[ref]
            if a[m].shape != b[m].shape:
                raise InputError(f"{sample} and {ref}: {m} has {a[m].shape[0]} vs {b[m].shape[0]} dimensions")
            print(f"{label}:", frechet_distance(a[m], a[s], b[m], b[s]))  # ADM: samples first
    if pr:
        precision, recall = precision_recall(acts[ref]["pool"], acts[sample]["pool"], 3, c["pr_block"], c["device"])
        if "precision" in want:
            print("Precision:", precision)
        if "recall" in want:
            print("Recall:", recall)
    if c["save_stats"]:
        np.savez(c["save_stats"], **{k: stats[sample][k] for k in STAT_KEYS})
        print(f"wrote mu/sigma/mu_s/sigma_s of {sample} to {c['save_stats']}", file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except (InputError, ConfigError, FileNotFoundError) as e:
        sys.exit(f"fid.py: error: {e}")
