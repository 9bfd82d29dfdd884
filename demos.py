"""The demo data sets, drawn on the fly (no download): coloured shapes on a dark background.

    classes  (train.py --demo classes): 10 shapes, one class each (draw_shapes, build_demo_data)
    captions (train.py --demo captions): shape, colour, size and position varied independently and described by
             a caption, "a small red bar in the top left"; some (shape, colour) pairs are held out of training
             to test composition (draw_captioned, build_caption_demo_data). measure / nearest_shape read the
             attributes back from pixels, to score text-to-image samples without a trained classifier.
    combinations (train.py --demo combinations): the same images, one class per (shape, colour, size, position)
             combination: the yardstick of the text path, what a model does when the condition is given whole
             (build_combination_demo_data).
evaluate_class_demo, evaluate_caption_demo and evaluate_combination_demo are train.py's closing figures.

All randomness comes from seeded numpy Generators, so every rank and every run draws the same data.
"""
import itertools
import json
import math
import os
import re

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw
from scipy import ndimage

from inference import caption_images, encode_images, sample_latents, tokens_to_images
from latents import extract
from model import unpatchify

# ------------------------------------------------------------------------------------------ class demo
SHAPES = {  # class: (hue in degrees, draw(d, p, w, colour)); p maps unit coordinates to pixels, w = pixels per unit
    "circle": (0, lambda d, p, w, c: d.ellipse(p((-1, -1), (1, 1)), fill=c)),
    "square": (30, lambda d, p, w, c: d.rectangle(p((-.8, -.8), (.8, .8)), fill=c)),
    "triangle": (55, lambda d, p, w, c: d.polygon(p((0, -1), (.95, .8), (-.95, .8)), fill=c)),
    "diamond": (100, lambda d, p, w, c: d.polygon(p((0, -1), (1, 0), (0, 1), (-1, 0)), fill=c)),
    "plus": (150, lambda d, p, w, c: [d.rectangle(p((-1, -.3), (1, .3)), fill=c),
                                      d.rectangle(p((-.3, -1), (.3, 1)), fill=c)]),
    "ring": (185, lambda d, p, w, c: d.ellipse(p((-1, -1), (1, 1)), outline=c, width=round(.6 * w))),
    "x": (215, lambda d, p, w, c: [d.polygon(p((-1, -.7), (-.7, -1), (1, .7), (.7, 1)), fill=c),
                                   d.polygon(p((-1, .7), (-.7, 1), (1, -.7), (.7, -1)), fill=c)]),
    "bar": (255, lambda d, p, w, c: d.rectangle(p((-1, -.35), (1, .35)), fill=c)),
    "star": (285, lambda d, p, w, c: d.polygon(p(*[((1 - .55 * (i % 2)) * math.sin(i * math.pi / 5),
                                                   -(1 - .55 * (i % 2)) * math.cos(i * math.pi / 5))
                                                  for i in range(10)]), fill=c)),
    "frame": (320, lambda d, p, w, c: d.rectangle(p((-.9, -.9), (.9, .9)), outline=c, width=round(.55 * w))),
}


def draw_shapes(per_class, size, seed):
    """The demo's classes: uint8 images (10 * per_class, size, size, 3) and labels (N,). Class k is shape k in
    hue k; per image vary the position (+-10% around the centre), size, hue/saturation/brightness and the dark
    background. (Centred shapes: with shapes anywhere, the tiny model needs far more than 5 minutes.)"""
    rng, big = np.random.default_rng(seed), size * 4  # drawn 4x larger, then downsampled: anti-aliased edges
    images, labels = [], []
    for k, (hue, draw) in enumerate(SHAPES.values()):
        for _ in range(per_class):
            img = Image.new("RGB", (big, big), tuple(int(v) for v in rng.integers(0, 50, 3)))
            r = rng.uniform(0.28, 0.4) * big
            cx, cy = big / 2 + rng.uniform(-0.1, 0.1, 2) * big
            hsv = ((hue + rng.uniform(-12, 12)) % 360, rng.uniform(60, 100), rng.uniform(75, 100))
            colour = "hsv({:.0f},{:.0f}%,{:.0f}%)".format(*hsv)
            draw(ImageDraw.Draw(img), lambda *pts: [(cx + r * x, cy + r * y) for x, y in pts], r, colour)
            images.append(np.asarray(img.resize((size, size), Image.LANCZOS)))
            labels.append(k)
    return np.stack(images), np.array(labels)


def _write_and_extract(root, size, rank, write):
    """Rank 0 writes the images (write(folder)); then every rank extracts them (pixel space) into root/latents."""
    if rank == 0:
        write(os.path.join(root, "images"))
    if dist.is_initialized():
        dist.barrier()
    extract(os.path.join(root, "images"), os.path.join(root, "latents"), vae="none", image_size=size,
            batch_size=256, num_workers=0, device="cpu", overwrite=True)
    return os.path.join(root, "latents")


def build_demo_data(root, size, per_class, seed, rank):
    """Write the shapes as an ImageFolder under root/images (rank 0) and extract them (pixel space) into
    root/latents; returns that directory."""
    def write(images_dir):
        images, labels = draw_shapes(per_class, size, seed)
        for i, (image, label) in enumerate(zip(images, labels)):
            folder = os.path.join(images_dir, f"{label}_{list(SHAPES)[label]}")
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(image).save(os.path.join(folder, f"{i:05d}.png"))
    return _write_and_extract(root, size, rank, write)


# ------------------------------------------------------------------------------------------ captioned demo
# Shapes whose silhouettes differ at a few pixels: a small shape is ~4 px wide at --demo-image-size 16, where the
# ring and frame of the class demo blur into a disc or a square and diamond/x into circle/plus, and the demo's
# model drew the star as a disc; the bar, a dash, keeps its outline.
SHAPE_NAMES = ("circle", "square", "triangle", "plus", "bar")
COLOURS = {"red": 0, "yellow": 55, "green": 125, "blue": 225}  # hue in degrees: >= 55 apart, jitter is +-8
SHAPE_SIZES = {"small": (0.22, 0.26), "large": (0.40, 0.44)}  # half the bounding-box side, in quadrant sides
SIZE_THRESHOLD = 0.66  # measured bounding-box side (in quadrant sides) above which a shape is large
POSITIONS = {"top left": (0, 0), "top right": (1, 0), "bottom left": (0, 1), "bottom right": (1, 1)}  # quadrant
JITTER = 0.04  # centre offset from the quadrant's centre, in quadrant sides: large shapes keep >= 0.02 margin
HALF_EXTENT = {"square": 0.8, "triangle": 0.95}  # half bounding box of SHAPES' drawing (else 1)
VALUES = {"shape": SHAPE_NAMES, "colour": tuple(COLOURS), "size": tuple(SHAPE_SIZES), "position": tuple(POSITIONS)}
CHANCE = {k: 1 / len(VALUES[k]) for k in ("colour", "position", "size", "shape")}
# (shape i, colour i mod 4) never appears in training, in any size or position: 5 of the 20 pairs, and every
# shape and every colour is still seen with 3 or 4 partners
HELD_OUT = {(s, tuple(COLOURS)[i % len(COLOURS)]) for i, s in enumerate(SHAPE_NAMES)}
COMBINATIONS = [dict(shape=s, colour=c, size=z, position=p) for s, c, z, p in itertools.product(*VALUES.values())]


def is_held_out(attrs):
    return (attrs["shape"], attrs["colour"]) in HELD_OUT


def caption(attrs):
    return "a {size} {colour} {shape} in the {position}".format(**attrs)


def parse_caption(text):
    """Attributes named by a text: each value None unless exactly one of its values appears (as whole words)."""
    words = re.findall(r"[a-z]+", text.lower())
    phrases = set(words) | {" ".join(words[i:i + 2]) for i in range(len(words) - 1)}  # "top left" is two words
    found = {k: [v for v in values if v in phrases] for k, values in VALUES.items()}
    return {k: v[0] if len(v) == 1 else None for k, v in found.items()}


def random_attrs(n, seed, held_out):
    """n attribute dicts drawn uniformly from the training combinations, or from the held-out ones."""
    pool = [a for a in COMBINATIONS if is_held_out(a) == held_out]
    return [dict(pool[i]) for i in np.random.default_rng((seed, 1)).integers(len(pool), size=n)]


def draw_captioned(attrs, size, seed):
    """uint8 images (N, size, size, 3) of the attribute dicts: the shape inside its quadrant, jittered in
    position, size within its range and colour (hue +-8, saturation, brightness), on a random dark background."""
    rng, big = np.random.default_rng((seed, 2)), size * 4  # drawn 4x larger, then downsampled, as draw_shapes
    q, images = big / 2, []
    for a in attrs:
        img = Image.new("RGB", (big, big), tuple(int(v) for v in rng.integers(0, 50, 3)))
        r = rng.uniform(*SHAPE_SIZES[a["size"]]) * q / HALF_EXTENT.get(a["shape"], 1)
        cx, cy = (np.array(POSITIONS[a["position"]]) + 0.5 + rng.uniform(-JITTER, JITTER, 2)) * q
        hsv = ((COLOURS[a["colour"]] + rng.uniform(-8, 8)) % 360, rng.uniform(70, 100), rng.uniform(80, 100))
        colour = "hsv({:.0f},{:.0f}%,{:.0f}%)".format(*hsv)
        SHAPES[a["shape"]][1](ImageDraw.Draw(img), lambda *pts: [(cx + r * x, cy + r * y) for x, y in pts], r, colour)
        images.append(np.asarray(img.resize((size, size), Image.LANCZOS)))
    return np.stack(images)


def class_name(attrs):
    """The class folder of a combination: its caption with underscores, "a_small_red_bar_in_the_top_left"."""
    return caption(attrs).replace(" ", "_")


def build_combination_demo_data(root, size, count, seed, rank):
    """build_caption_demo_data's images as an ImageFolder under root/images, one class folder per combination
    (class_name), extracted (pixel space) into root/latents; returns that directory."""
    def write(folder):
        attrs = random_attrs(count, seed, held_out=False)
        for i, (image, a) in enumerate(zip(draw_captioned(attrs, size, seed), attrs)):
            os.makedirs(os.path.join(folder, class_name(a)), exist_ok=True)
            Image.fromarray(image).save(os.path.join(folder, class_name(a), f"{i:05d}.png"))
    return _write_and_extract(root, size, rank, write)


def build_caption_demo_data(root, size, count, seed, rank):
    """Write `count` captioned training images (held-out pairs never) under root/images with a metadata.jsonl
    (Hugging Face imagefolder: {"file_name": "00000.png", "text": caption} per line) (rank 0), and extract them
    (pixel space, captions kept) into root/latents; returns that directory."""
    def write(folder):
        os.makedirs(folder, exist_ok=True)
        attrs = random_attrs(count, seed, held_out=False)
        with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
            for i, (image, a) in enumerate(zip(draw_captioned(attrs, size, seed), attrs)):
                Image.fromarray(image).save(os.path.join(folder, f"{i:05d}.png"))
                f.write(json.dumps({"file_name": f"{i:05d}.png", "text": caption(a)}) + "\n")
    return _write_and_extract(root, size, rank, write)


# ------------------------------------------------------------------------------------------ measuring
def _foreground(images):
    """Soft foreground (N, H, W) in [0, 1] and the hard mask of each image's largest blob (N, H, W): a pixel's
    largest channel difference to the background colour (the median pixel: shapes cover < 1/8 of an image) is
    >= 150 inside a shape and 0 on the background; 75 is half way. The largest blob ignores specks of noise."""
    x = np.asarray(images).astype(np.float32)
    diff = np.abs(x - np.median(x, axis=(1, 2), keepdims=True)).max(-1)
    masks = np.zeros(diff.shape, bool)
    for mask, d in zip(masks, diff):
        blobs, n = ndimage.label(d > 75)
        if n:
            mask[...] = blobs == 1 + np.bincount(blobs.ravel())[1:].argmax()
    return np.clip(diff / 150, 0, 1), masks


def measure(images):
    """Colour, position and size of the shape in each uint8 image (N, H, W, 3), read from its pixels: a list of
    attribute dicts (shape None: see nearest_shape; every value None where nothing stands out)."""
    _, masks = _foreground(images)
    out = []
    for image, mask in zip(np.asarray(images), masks):
        if not mask.any():
            out.append(dict(shape=None, colour=None, size=None, position=None))
            continue
        h, w = mask.shape
        ys, xs = np.nonzero(mask)
        hsv = np.asarray(Image.fromarray(image).convert("HSV"), np.float32)[ys, xs]  # hue in 0..255
        angle = np.angle(np.sum(hsv[:, 1] * hsv[:, 2] * np.exp(2j * np.pi * hsv[:, 0] / 256)), deg=True)
        colour = min(COLOURS, key=lambda c: abs((angle - COLOURS[c] + 180) % 360 - 180))  # nearest hue, circular
        side = max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) / (h / 2)  # in quadrant sides
        quadrant = (int(xs.mean() + 0.5 >= w / 2), int(ys.mean() + 0.5 >= h / 2))  # pixel centres are at +0.5
        out.append(dict(shape=None, colour=colour, size="large" if side > SIZE_THRESHOLD else "small",
                        position=next(p for p, q in POSITIONS.items() if q == quadrant)))
    return out


def _shape_features(images):
    """Each image's soft foreground inside its largest blob, cut to a half-image window centred on the blob: the
    shape's silhouette at its own size (colour and position do not enter)."""
    soft, masks = _foreground(images)
    n, h, w = soft.shape
    k = h // 2
    out = np.zeros((n, k, k), np.float32)
    for f, s, mask in zip(out, soft, masks):
        if mask.any():
            s = s * ndimage.binary_dilation(mask)  # the blob and its anti-aliased rim
            padded = np.pad(s, k)
            cy, cx = (np.round(ndimage.center_of_mass(s)).astype(int) + k - k // 2)
            f[...] = padded[cy:cy + k, cx:cx + k]
    return out.reshape(n, -1)


def nearest_shape(images, train_images, train_attrs):
    """The shape of each image (N, H, W, 3): that of the training image whose silhouette is nearest (L2);
    None where nothing stands out of the background."""
    a = torch.from_numpy(_shape_features(images))
    b = torch.from_numpy(_shape_features(train_images))
    nearest = torch.cdist(a, b).argmin(1).tolist()
    return [train_attrs[i]["shape"] if found else None for i, found in zip(nearest, a.any(1).tolist())]


def _accuracy(found, attrs):
    """Share of found attribute dicts matching attrs (N dicts) in each attribute, and in all four at once."""
    right = np.array([[f[k] == a[k] for k in CHANCE] for f, a in zip(found, attrs)])  # (N, 4)
    return {**{k: float(v) for k, v in zip(CHANCE, right.mean(0))}, "all": float(right.all(1).mean())}


def t2i_accuracy(images, attrs, train_images, train_attrs):
    """Share of images (N, H, W, 3) whose measured colour, position, size and shape match attrs (N dicts), and
    all four at once."""
    found = measure(images)
    for f, s in zip(found, nearest_shape(images, train_images, train_attrs)):
        f["shape"] = s
    return _accuracy(found, attrs)


def caption_accuracy(texts, attrs):
    """Share of texts (N captions) naming each attribute of attrs (N dicts) right (and no other value of it), and
    all four at once."""
    return _accuracy([parse_caption(t) for t in texts], attrs)


def _figures(accuracy):
    """'colour 1.00, ..., all 0.38 (chance 0.25, ..., 0.006)' for a log line; all's chance is the product."""
    chance = {**CHANCE, "all": math.prod(CHANCE.values())}
    return (", ".join(f"{k} {v:.2f}" for k, v in accuracy.items()) + " (chance " +
            ", ".join(f"{chance[k]:.{3 if k == 'all' else 2}f}" for k in accuracy) + ")")


# ------------------------------------------------------------------------------------------ evaluating the demos
KID_SCALE = 1000  # pixel KIDs are printed x 1000, as KIDs usually are


def nearest_neighbour_accuracy(samples, labels, data):
    """Share of samples (N, C, H, W) (unscaled latents; pixels in [-1, 1] for --vae none) whose nearest
    training latent (L2, either flip) has their class. No network needed; chance is ~1 / num_classes."""
    train = np.concatenate([shard[:, :, 0] for shard in data.shards])  # (N, 2 flips, C, H, W), unscaled
    train = torch.from_numpy(train).float().flatten(2).flatten(0, 1)  # (2N, C*H*W)
    nearest = torch.cdist(samples.float().flatten(1), train).argmin(1) // 2  # index of the training image
    return (data.labels[nearest] == labels).float().mean().item()


def kernel_distance(x, y):
    """KID's distance (Binkowski et al. 2018, "Demystifying MMD GANs"): the unbiased squared MMD between the rows
    of x (N, D) and y (M, D) under the cubic kernel k(a, b) = (a.b / D + 1)^3, here on pixels. 0 in expectation
    for two draws of one distribution; no network needed."""
    x, y = x.double(), y.double()
    n, m, d = len(x), len(y), x.shape[1]
    kxx, kyy, kxy = ((x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3)  # (N, N), (M, M), (N, M)
    return ((kxx.sum() - kxx.trace()) / (n * (n - 1)) + (kyy.sum() - kyy.trace()) / (m * (m - 1))
            - 2 * kxy.mean()).item()


def pixel_images(data):
    """The unflipped training images of pixel-space data (--vae none): uint8 (N, H, W, 3)."""
    pixels = np.concatenate([shard[:, 0, 0] for shard in data.shards])  # (N, 3, H, W) in [-1, 1]
    return np.round((pixels.astype(np.float32).clip(-1, 1) + 1) * 127.5).astype(np.uint8).transpose(0, 2, 3, 1)


@torch.no_grad()
def evaluate_caption_demo(ema, cfg, data, tokenizer, vae, diffusion, autocast, log):
    """train.py's closing figures of the captioned demo (cfg: its config; data: its LatentData; diffusion: the
    sampler of its grids): the attribute
    accuracy of text-to-image samples for seen and held-out prompts (measured from the pixels), and of the
    captions of new images of seen and held-out combinations, with chance beside them."""
    n, size, seed = cfg["eval_per_class"], data.latent_shape[1], cfg["seed"]
    train_images = pixel_images(data)
    train_attrs = [parse_caption(c[0]) for c in data.captions]
    summary = {}
    for group, held_out in (("seen", False), ("held_out", True)):
        attrs = random_attrs(n, seed + 2, held_out)
        with autocast:
            tokens = sample_latents(ema, diffusion, seed + 1, texts=[caption(a) for a in attrs], tokenizer=tokenizer,
                                    cfg_scale=cfg["cfg_scale"])
        images = tokens_to_images(tokens, ema, vae, data.scale_factor)
        summary[f"t2i_{group}"] = t2i_accuracy(images, attrs, train_images, train_attrs)
        log(f"text-to-image, {n} {group.replace('_', '-')} prompts: " + _figures(summary[f"t2i_{group}"]))
    for group, held_out in (("seen", False), ("held_out", True)):  # fresh images of either kind of combination
        attrs = random_attrs(n, seed + 3, held_out)
        images = draw_captioned(attrs, size, seed + 3)
        with autocast:
            texts = caption_images(ema, encode_images(images, ema, vae, data.scale_factor), tokenizer)
        summary[f"captions_{group}"] = caption_accuracy(texts, attrs)
        log(f"captions of {n} new {group.replace('_', '-')} images: " + ", ".join(
            f"{k} {v:.2f}" for k, v in summary[f"captions_{group}"].items()))
        log("  e.g. " + "; ".join(f"{caption(a)!r} -> {t!r}" for a, t in list(zip(attrs, texts))[:3]))
    return summary


@torch.no_grad()
def evaluate_combination_demo(ema, cfg, data, vae, diffusion, autocast, log):
    """train.py's closing figure of --demo combinations: evaluate_caption_demo's text-to-image accuracy for the
    same seen prompts, given as their combination's class (held-out combinations have none)."""
    index = {name: k for k, name in enumerate(data.class_names)}
    # evaluate_caption_demo's seen prompts, less any combination that a small --demo-images never drew
    attrs = [a for a in random_attrs(cfg["eval_per_class"], cfg["seed"] + 2, held_out=False) if class_name(a) in index]
    n, seed = len(attrs), cfg["seed"]
    with autocast:
        tokens = sample_latents(ema, diffusion, seed + 1, labels=torch.tensor([index[class_name(a)] for a in attrs]),
                                cfg_scale=cfg["cfg_scale"])
    images = tokens_to_images(tokens, ema, vae, data.scale_factor)
    train_attrs = [parse_caption(data.class_names[k].replace("_", " ")) for k in data.labels.tolist()]
    accuracy = t2i_accuracy(images, attrs, pixel_images(data), train_attrs)
    log(f"class-to-image, {n} seen combinations: " + _figures(accuracy))
    return {"c2i_seen": accuracy}


def evaluate_class_demo(ema, cfg, data, diffusion, autocast, log):
    """train.py's closing figure of pixel-space class data (cfg: its config; data: its LatentData; diffusion: the
    sampler of its grids): the nearest-neighbour class accuracy of EMA samples of every class; for the demo, of
    fresh real images too, and the pixel KID of the samples to fresh real images."""
    summary, (_, h, w) = {}, data.latent_shape
    labels = torch.arange(data.num_classes).repeat_interleave(cfg["eval_per_class"])
    with autocast:
        tokens = sample_latents(ema, diffusion, cfg["seed"] + 1, labels=labels, cfg_scale=cfg["cfg_scale"])
    samples = unpatchify(tokens.float().cpu(), ema.patch_size, h, w) / data.scale_factor  # (N, C, H, W)
    summary["nn_accuracy"] = nearest_neighbour_accuracy(samples, labels, data)
    log(f"step {cfg['max_steps']} | nearest-neighbour class accuracy of {len(labels)} EMA samples: "
        f"{summary['nn_accuracy']:.3f} (chance {1 / data.num_classes:.3f})")
    if not cfg["data"]:  # the demo: the same figures for fresh real images are the ceiling
        as_latents = lambda images: torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1  # (N, 3, H, W)
        real, real_labels = draw_shapes(cfg["eval_per_class"], h, cfg["seed"] + 1)
        real = as_latents(real)  # pixels in [-1, 1], as --vae none's latents
        summary["nn_accuracy_real"] = nearest_neighbour_accuracy(real, torch.from_numpy(real_labels), data)
        log(f"step {cfg['max_steps']} | the same for {len(real)} fresh real images: {summary['nn_accuracy_real']:.3f}")
        # the distribution distance of the samples to fresh real images, and of other fresh real images (its floor)
        other = as_latents(draw_shapes(cfg["eval_per_class"], h, cfg["seed"] + 4)[0])
        summary["kid"] = KID_SCALE * kernel_distance(samples.clamp(-1, 1).flatten(1), real.flatten(1))
        summary["kid_real"] = KID_SCALE * kernel_distance(other.flatten(1), real.flatten(1))
        log(f"step {cfg['max_steps']} | pixel KID x {KID_SCALE} of the EMA samples to {len(real)} fresh real images: "
            f"{summary['kid']:.2f}; of {len(other)} other fresh real images: {summary['kid_real']:.2f}")
    return summary
