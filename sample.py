"""Sampling from CausalFusion (paper Sec. 3, 6, App. D; SPEC.md Sec. 5): diffusion mode, AR mode, zero-shot editing,
text-to-image and captioning.

    python sample.py --ckpt RUN/ckpt.pt --num-samples 64 --ar-steps 4 --cfg-scale 1.5 --seed 0
    python sample.py --ckpt RUN/ckpt.pt --num-samples 50000 --cfg-scale 1.5 --out samples.npz   # FID (fid.py)
    torchrun --nproc_per_node 8 sample.py ...same options...                       # same npz, 8x faster
    python sample.py --ckpt RUN/ckpt.pt --edit photo.png --keep outer --classes 3 7  # zero-shot editing
    python sample.py --ckpt RUN/ckpt.pt --prompts "a red circle" "a small blue star" --num-samples 8  # text model
    python sample.py --ckpt RUN/ckpt.pt --caption photos/ --out captions.jsonl                    # captioning

Every AR step denoises its tokens through all DDPM steps against a KV cache that holds the class tokens (or
the prompt) and the clean tokens of the finished steps, entered once each; CFG runs [cond; null class] (or
[prompt; no text]) as one doubled batch. Captioning enters the clean image into the cache once, then decodes
the text token by token.
Randomness comes from one generator per global batch, seeded by (seed, batch index), and ranks take whole
batches, so the samples do not depend on the number of processes.
"""
import argparse
import json
import math
import os
import sys
import textwrap
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

import mask
import tokenizer as text_lib
from config import parse_config
from diffusion import Diffusion
from extract_latents import IMAGE_EXTENSIONS, center_crop
from model import CausalFusion, patchify, unpatchify
from vae import SCALE_FACTORS, VAE_CONFIGS, build_vae

config = dict(
    ckpt="",  # a checkpoint of train.py, or of the authors' code (keys model/ema/args)
    ema=True,  # sample with the EMA weights (false: the raw "model" weights)
    vae=None,  # sd, mar or none; default: the checkpoint's (the authors' checkpoints: mar)
    vae_ckpt=None,  # VAE weights (vae.py); "random" = random weights, for speed measurements
    num_samples=16,  # images to generate (editing: rows of edits)
    batch_size=16,  # images per global batch; with the seed it fixes the samples
    classes=[],  # class indices or names, cycled over the samples; empty or "random": uniformly random (DiT,
    # ADM); "balanced": every class in turn (50,000 samples: 50 per class, as MAR)
    ar_steps=1,  # AR steps S: 1 = diffusion mode, L = token by token
    split="equal",  # AR step sizes: equal, or random (a uniformly random composition of L)
    order="random",  # order of the tokens over the AR steps: random (per sample) or raster
    steps=250,  # DDPM sampling steps (evenly respaced from 1000)
    cfg_scale=1.0,  # classifier-free guidance scale s >= 1 (1 = no guidance)
    cfg_interval=(0.0, 1000.0),  # guide only for lo <= t < hi of the 1000-step schedule (as the authors)
    seed=0,  # global seed
    out="",  # .npz for fid.py: arr_0 uint8 (N, H, W, 3) and labels (N,) or prompts (N,); no per-image PNGs then
    out_dir="out/samples",  # PNGs: one per image (without --out), grid.png, edit_*.png
    dtype="",  # bf16 (autocast) or fp32; "" = bf16 on cuda, fp32 on cpu
    device="",  # default: cuda if available (torchrun: cuda:LOCAL_RANK), else cpu
    edit="",  # image to edit: a PNG/JPG, or an .npz of samples (its arr_0[--edit-index])
    edit_index=0,  # which image of an --edit .npz
    edit_class=-1,  # >= 0 and no --edit: first generate the originals with this class (paper Fig. 2b)
    keep="outer",  # region kept as context: outer, inner, top, bottom, left, right, or MASK.png (white = keep)
    # text models (paper Sec. 6)
    prompts=[],  # text-to-image: prompts, cycled over the samples
    prompts_file="",  # text-to-image: a UTF-8 file of prompts, one per line, after --prompts
    caption="",  # captioning instead: an image, a folder of images, or an .npz (arr_0); --out takes a .jsonl
    temperature=0.0,  # captioning: 0 = greedy decoding, else sampling at this temperature
    top_k=0,  # captioning: sample among the k most likely tokens (0 = all)
    tokenizer="",  # the tokenizer file training used: checked against the copy in the checkpoint (optional)
)


# ------------------------------------------------------------------------------------------ checkpoints
def _authors_config(sd, vae):
    """Model config and data meta of an authors' checkpoint, inferred from its tensor shapes."""
    hidden, token_dim = sd["x_proj.weight"].shape
    vae_config = VAE_CONFIGS.get(vae, dict(z_channels=3, ch_mult=(1,)))  # "none": 3 channels, no downsampling
    channels, down = vae_config["z_channels"], 2 ** (len(vae_config["ch_mult"]) - 1)
    patch = math.isqrt(token_dim // channels)
    grid = math.isqrt(sd["pos_embed"].shape[1])
    rows, width = sd["y_embedder.embedding_table.weight"].shape
    num_cond = sd["cond_pos_embed"].shape[1]
    model_config = dict(hidden_size=hidden, depth=len({k.split(".")[1] for k in sd if k.startswith("blocks.")}),
                        num_heads=hidden // sd["blocks.0.attn.q_norm.weight"].numel(), input_size=grid * patch,
                        patch_size=patch, in_channels=channels, num_classes=rows - 1, num_cond_tokens=num_cond,
                        cond_repeat=num_cond // (width // hidden), learn_pos=True,
                        mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / hidden)
    meta = dict(vae=vae, scale_factor=SCALE_FACTORS[vae], latent_shape=[channels, grid * patch, grid * patch],
                image_size=grid * patch * down, num_classes=rows - 1, class_names=None)
    return model_config, meta


def load_checkpoint(path, use_ema=True, vae=None):
    """A train.py or authors' checkpoint -> (CausalFusion in eval mode on the CPU, data meta dict)."""
    with torch.serialization.safe_globals([argparse.Namespace]):  # the authors pickle their args
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    key = "ema" if use_ema else "model"
    if key not in ckpt:
        raise ValueError(f"{path}: no {key!r} weights (keys: {list(ckpt)[:8]}); see --ema")
    sd = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in ckpt[key].items()}  # DDP/compile
    if "model_config" in ckpt:
        model_config, meta = ckpt["model_config"], dict(ckpt["data"], tokenizer=ckpt.get("tokenizer"))
    elif "args" in ckpt:
        model_config, meta = _authors_config(sd, vae or "mar")
    else:
        raise ValueError(f"{path}: neither a train.py checkpoint (model_config) nor the authors' (args)")
    model = CausalFusion(**model_config)
    expected = model.state_dict()
    problems = ([f"missing {k} {tuple(v.shape)}" for k, v in expected.items() if k not in sd]
                + [f"unexpected {k} {tuple(v.shape)}" for k, v in sd.items() if k not in expected]
                + [f"{k}: checkpoint {tuple(sd[k].shape)}, config {tuple(v.shape)}"
                   for k, v in expected.items() if k in sd and sd[k].shape != v.shape])
    if problems:
        more = f"\n  ... {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ValueError(f"{path}: the {key} weights do not match the model config {model_config}:\n  "
                         + "\n  ".join(problems[:20]) + more)
    model.load_state_dict(sd)
    return model.eval(), meta


# ------------------------------------------------------------------------------------------ sampling
def check_options(model, ar_steps=1, split="equal", order="random", cfg_scale=1.0, cfg_interval=(0, 1000),
                  classes=None, num_tokens=None):
    """Raise a ValueError naming the option for a value sampling cannot use."""
    num_tokens = num_tokens or model.num_tokens
    if cfg_scale < 1:
        raise ValueError(f"--cfg-scale must be >= 1 (1 = no guidance), got {cfg_scale}")
    if len(cfg_interval) != 2 or not 0 <= cfg_interval[0] <= cfg_interval[1] <= 1000:
        raise ValueError(f"--cfg-interval must be LO HI with 0 <= LO <= HI <= 1000, got {tuple(cfg_interval)}")
    if not 1 <= ar_steps <= num_tokens:
        raise ValueError(f"--ar-steps must be in 1..{num_tokens} (the tokens to generate), got {ar_steps}")
    if split not in ("equal", "random") or order not in ("random", "raster"):
        raise ValueError(f"--split must be equal or random, --order random or raster; got {split!r}, {order!r}")
    bad = [c for c in classes or [] if not 0 <= c < model.num_classes]
    if bad:
        raise ValueError(f"--classes {bad}: out of range for a model of {model.num_classes} classes")


def parse_classes(words, num_classes, class_names=None):
    """--classes words (indices or class names) -> list of ints, or None for random classes; "balanced" -> every
    class, cycled over the samples."""
    if not words or list(words) == ["random"]:
        return None
    if list(words) == ["balanced"]:
        return list(range(num_classes))
    names = {name: i for i, name in enumerate(class_names or [])}
    try:
        return [names[w] if w in names else int(w) for w in map(str, words)]
    except ValueError:
        raise ValueError(f"--classes {list(words)}: expected indices in 0..{num_classes - 1} or class names "
                         f"{(class_names or [])[:5]}...") from None


def ar_plan(n, free, ar_steps, split, order, generator):
    """AR order (N, M) over the M positions `free` to generate, and the S step sizes (one split per batch)."""
    m = len(free)
    sizes = mask.equal_split(ar_steps, m) if split == "equal" else mask.random_split(ar_steps, m, generator)
    perm = torch.rand(n, m, generator=generator).argsort(1) if order == "random" else torch.arange(m).expand(n, m)
    return free[perm], sizes


def sample_batch(model, diffusion, labels, batch_seed, ar_steps=1, split="equal", order="random", cfg_scale=1.0,
                 cfg_interval=(0, 1000), dtype="fp32", context=None, context_pos=None, text=None, text_lengths=None):
    """Tokens (N, L, P) in image order for labels (N,), or for texts (N, Lt) of text_lengths (N,) tokens (labels
    None); all randomness comes from batch_seed. context (N, K, P) at positions context_pos (N, K): clean tokens
    to keep (editing); the others are generated."""
    device = model.x_proj.weight.device
    labels, text = (labels.to(device), None) if text is None else (None, text.to(device))
    g = torch.Generator().manual_seed(batch_seed)  # orders and splits, on the CPU
    free = torch.arange(model.num_tokens)
    if context_pos is not None:  # the same kept positions for the whole batch
        free = free[~torch.isin(free, context_pos[0].cpu())]
    order_pos, sizes = ar_plan(len(labels if text is None else text), free, ar_steps, split, order, g)
    noise = torch.Generator(device).manual_seed(int(torch.randint(2 ** 62, (1,), generator=g)))  # a fresh stream
    with torch.autocast(device.type, torch.bfloat16) if dtype == "bf16" else nullcontext():
        return generate(model, diffusion, labels, sizes, order_pos.to(device), noise, cfg_scale, cfg_interval, context,
                        context_pos, text=text, text_lengths=None if text is None else text_lengths.to(device))


def class_labels(num_samples, classes, num_classes, seed):
    """Label of every sample index: --classes cycled, or uniformly random from the seed."""
    if classes:
        return torch.tensor(classes)[torch.arange(num_samples) % len(classes)]
    return torch.randint(num_classes, (num_samples,), generator=torch.Generator().manual_seed(seed))


def sample_images(model, vae, scale_factor, num_samples, classes=None, ar_steps=1, split="equal", order="random",
                  steps=250, cfg_scale=1.0, cfg_interval=(0, 1000), seed=0, batch_size=16, dtype="fp32", rank=0,
                  world_size=1, prompts=None, tokenizer=None):
    """This rank's share of the num_samples images: (uint8 (n, H, W, 3), labels (n,) or for a text model their
    prompts (n,) (--prompts cycled), sample indices (n,)). Rank r takes global batches r, r + world_size, ...;
    batch b holds samples b*batch_size... and is seeded by (seed, b) alone."""
    check_options(model, ar_steps, split, order, cfg_scale, cfg_interval, classes)
    if prompts is not None:
        labels = np.array([prompts[i % len(prompts)] for i in range(num_samples)])
        text, lengths, cut = text_lib.tokenize(tokenizer, list(labels), model.num_cond_tokens)
        if cut and rank == 0:
            print(f"{cut} of {num_samples} prompts were longer than the model's {model.num_cond_tokens} text tokens "
                  f"and were cut")
    else:
        labels = class_labels(num_samples, classes, model.num_classes, seed).numpy()
    diffusion = Diffusion(steps)
    images, index = [], []
    for b in tqdm(range(rank, -(-num_samples // batch_size), world_size), disable=rank > 0, desc="batches"):
        idx = torch.arange(b * batch_size, min(num_samples, (b + 1) * batch_size))
        cond = dict(labels=torch.from_numpy(labels[idx.numpy()])) if prompts is None else dict(
            labels=None, text=text[idx], text_lengths=lengths[idx])
        tokens = sample_batch(model, diffusion, batch_seed=seed * 1_000_003 + b, ar_steps=ar_steps, split=split,
                              order=order, cfg_scale=cfg_scale, cfg_interval=cfg_interval, dtype=dtype, **cond)
        images.append(tokens_to_images(tokens, model, vae, scale_factor))
        index.append(idx)
    if not images:  # a rank with no batch
        return np.zeros((0, 1, 1, 3), np.uint8), labels[:0], np.zeros(0, np.int64)
    index = torch.cat(index).numpy()
    return np.concatenate(images), labels[index], index


@torch.no_grad()
def caption_images(model, tokens, tokenizer, temperature=0.0, top_k=0, generator=None):
    """Captions (N strings) of images given as clean tokens (N, L, P) in image order: the image enters the KV cache
    once (as one AR step: every token sees every other), then the text is decoded token by token from BOS until
    EOS or the model's text length; greedy with temperature 0, else sampled (from the top_k most likely ids if
    top_k > 0) with the generator."""
    n, L = tokens.shape[:2]
    device, Lt = tokens.device, model.num_cond_tokens
    autocast = torch.is_autocast_enabled(device.type)
    cache = model.new_cache(n, L + Lt, dtype=torch.get_autocast_dtype(device.type) if autocast else None)
    # a Transfusion model was trained to read noisy images: it reads the clean one at t = 0
    t = torch.zeros(n, dtype=torch.long, device=device) if model.text_sees_noisy else None
    model.extend(cache, tokens, torch.arange(L, device=device).expand(n, L), t)
    ids = torch.full((n, 1), tokenizer.bos, dtype=torch.long, device=device)
    out, done = [], torch.zeros(n, dtype=torch.bool, device=device)
    for i in range(Lt - 1):  # text position i predicts position i + 1
        logits = model.next_token_logits(cache, ids, i)[:, -1].float()  # (N, V)
        if temperature > 0:
            logits = logits / temperature
            if top_k > 0:
                kth = logits.topk(min(top_k, logits.shape[1]), dim=1).values[:, -1:]  # (N, 1)
                logits = logits.masked_fill(logits < kth, float("-inf"))
            ids = torch.multinomial(logits.softmax(1), 1, generator=generator)  # (N, 1)
        else:
            ids = logits.argmax(1, keepdim=True)
        ids = ids.masked_fill(done[:, None], tokenizer.eos)
        out.append(ids)
        done |= ids[:, 0] == tokenizer.eos
        if done.all():
            break
    rows = torch.cat(out, 1).tolist()
    return [tokenizer.decode(row[:row.index(tokenizer.eos)] if tokenizer.eos in row else row) for row in rows]


@torch.no_grad()
def generate(model, diffusion, labels, step_sizes, order, generator, cfg_scale=1.0, cfg_interval=(0, 1000),
             context=None, context_pos=None, progress=None, text=None, text_lengths=None):
    """Generate the image tokens of labels (N,) in len(step_sizes) AR steps; returns (N, L, P) in image order.

    order (N, L - K) lists the image positions to generate, in AR order; step s denoises the next
    step_sizes[s] of them with all DDPM steps, seeing the cond tokens and the clean tokens of the steps before
    it through the KV cache, then enters its clean result into the cache. context (N, K, P) at image positions
    context_pos (N, K) are given clean tokens (zero-shot editing), entered into the cache before step 1.
    A text model takes texts (N, Lt) of text_lengths (N,) real tokens in place of labels (None).
    With cfg_scale > 1 the cache holds a doubled batch [cond; null class, or no text] and guidance runs in one
    forward."""
    n, device = order.shape[0], order.device
    guided = cfg_scale > 1
    double = (lambda a: torch.cat([a, a])) if guided else (lambda a: a)
    autocast = torch.is_autocast_enabled(device.type)  # keep the cache in the autocast dtype: half the memory
    cache = model.new_cache(2 * n if guided else n, dtype=torch.get_autocast_dtype(device.type) if autocast else None)
    if text is not None:  # the unconditional half sees no text: as in training, where the image comes first
        model.prefill_text(cache, double(text), torch.cat([text_lengths, 0 * text_lengths]) if guided else text_lengths)
    else:
        model.prefill(cache, torch.cat([labels, torch.full_like(labels, model.null_class)]) if guided else labels)
    out = torch.zeros(n, model.num_tokens, model.token_dim, device=device)  # (N, L, P) image order
    if context is not None:
        model.extend(cache, double(context), double(context_pos))
        out.scatter_(1, context_pos[..., None].expand_as(context), context.float())
    start = 0
    for s, size in enumerate(step_sizes):
        pos = order[:, start:start + size]  # (N, k)
        pos2 = double(pos)
        eps_fn = lambda x, t: model.denoise(cache, x, torch.full((x.shape[0],), t, device=device), pos2)
        x = torch.randn(n, size, model.token_dim, generator=generator, device=device)
        x = diffusion.sample(eps_fn, x, generator, cfg_scale, cfg_interval, progress)
        if s < len(step_sizes) - 1:
            model.extend(cache, double(x), pos2)
        out.scatter_(1, pos[..., None].expand_as(x), x.float())
        start += size
    return out


@torch.no_grad()
def tokens_to_images(tokens, model, vae, scale_factor):
    """Generated tokens (N, L, P) in image order -> uint8 images (N, H, W, 3) through the VAE decoder."""
    size = model.input_size
    latents = unpatchify(tokens.float(), model.patch_size, size, size)  # (N, C, h, w), scaled
    pixels = vae.decode(latents / scale_factor)  # (N, 3, H, W) in [-1, 1]
    return ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images, path, ncol, pad=2, captions=None):
    """uint8 images (N, H, W, 3) -> one PNG, ncol per row, white padding; with captions (N strings), each
    image is shown at least 128 px wide with its caption under it (wrapped, at most 3 lines)."""
    if captions is not None:
        zoom = max(1, -(-128 // images.shape[2]))
        images = images.repeat(zoom, 1).repeat(zoom, 2)
    n, h, w, _ = images.shape
    font = ImageFont.load_default()
    line = font.getbbox("Ag")[3] + 2
    lines = [textwrap.wrap(c, max(1, int(w / font.getlength("x")) - 1))[:3] for c in captions] if captions else []
    text_h = line * max(map(len, lines), default=0)
    nrow, cell = -(-n // ncol), h + text_h + pad
    grid = Image.new("RGB", (ncol * (w + pad) + pad, nrow * cell + pad), "white")
    draw = ImageDraw.Draw(grid)
    for i, image in enumerate(images):
        r, c = divmod(i, ncol)
        x, y = pad + c * (w + pad), pad + r * cell
        grid.paste(Image.fromarray(image), (x, y))
        for j, text in enumerate(lines[i] if lines else []):
            draw.text((x, y + h + j * line), text, fill="black", font=font)
    grid.save(path)


# ------------------------------------------------------------------------------------------ editing
def keep_mask(keep, grid):
    """(grid, grid) bool token mask of the region kept as context: a named region or a PNG (white = keep)."""
    r = torch.arange(grid)
    rows, cols = r[:, None].expand(grid, grid), r[None, :].expand(grid, grid)
    ring = torch.minimum(torch.minimum(rows, cols), grid - 1 - torch.maximum(rows, cols))  # distance to the border
    width, half = max(1, grid // 4), grid // 2
    regions = dict(outer=ring < width, inner=ring >= width, top=rows < half, bottom=rows >= half, left=cols < half,
                   right=cols >= half)
    if keep in regions:
        kept = regions[keep]
    elif os.path.isfile(keep):
        gray = Image.open(keep).convert("L").resize((grid, grid), Image.BOX)  # average over each token's pixels
        kept = torch.from_numpy(np.asarray(gray) >= 128)
    else:
        raise ValueError(f"--keep {keep!r}: expected one of {', '.join(regions)} or an existing mask PNG")
    if kept.all() or not kept.any():
        raise ValueError(f"--keep {keep}: keeps {int(kept.sum())} of {grid * grid} tokens; keep some, not all")
    return kept


@torch.no_grad()
def encode_images(images, model, vae, scale_factor):
    """uint8 images (N, H, W, 3) -> tokens (N, L, P) of the scaled VAE posterior mean."""
    x = torch.tensor(images).permute(0, 3, 1, 2).float().div(127.5).sub(1).to(model.x_proj.weight.device)
    mean, _ = vae.encode_moments(x)  # (N, C, h, w), unscaled
    if mean.shape[1:] != (model.in_channels, model.input_size, model.input_size):
        raise ValueError(f"the VAE gives latents {tuple(mean.shape[1:])} for these images, the model takes "
                         f"{(model.in_channels, model.input_size, model.input_size)}")
    return patchify(mean * scale_factor, model.patch_size)


def edit_tokens(model, originals, keep, classes, seed, steps=250, dtype="fp32", **options):
    """Regenerate the tokens outside `keep` (grid, grid) of each original (R, L, P) once per class, conditioned on
    the kept tokens. Returns (R, len(classes), L, P); the kept tokens are the originals' exactly."""
    kept = keep.flatten().nonzero()[:, 0].to(originals.device)  # (K,) image positions
    check_options(model, classes=classes, num_tokens=model.num_tokens - len(kept), **options)
    diffusion, labels = Diffusion(steps), torch.tensor(classes)
    rows = []
    for r, tokens in enumerate(originals):
        context = tokens[kept].expand(len(classes), -1, -1)  # (B, K, P)
        # row r's seed index 1 + r: index 0 generated the originals (--edit-class)
        rows.append(sample_batch(model, diffusion, labels, seed * 1_000_003 + 1 + r, dtype=dtype, context=context,
                                 context_pos=kept.expand(len(classes), -1), **options))
    return torch.stack(rows)


def edit_figure(originals, edits, keep, path):
    """One PNG, one row per original (R, H, W, 3): [original | kept region, the rest grey | its B edits
    (R * B, H, W, 3)] (the layout of the paper's Fig. 2b and 7)."""
    r, h = originals.shape[:2]
    f = h // keep.shape[0]  # pixels per token side
    pixel_keep = keep.repeat_interleave(f, 0).repeat_interleave(f, 1).numpy()[None, :, :, None]  # (1, H, W, 1)
    shown = np.where(pixel_keep, originals, 128).astype(np.uint8)
    rows = np.concatenate([originals[:, None], shown[:, None], edits.reshape(r, -1, *edits.shape[1:])], 1)
    save_grid(rows.reshape(-1, *rows.shape[2:]), path, ncol=rows.shape[1])  # rows: (R, 2 + B, H, W, 3)


def load_image(path, index, size):
    """The image to edit: a PNG/JPG, or arr_0[index] of an .npz, centre-cropped to size -> (1, size, size, 3)."""
    if path.endswith(".npz"):
        images = np.load(path)["arr_0"]
        if not 0 <= index < len(images):
            raise ValueError(f"--edit-index {index}: {path} holds {len(images)} images")
        image = Image.fromarray(images[index])
    else:
        image = Image.open(path).convert("RGB")
    return np.asarray(center_crop(image, size))[None]


def run_edit(cfg, model, meta, vae, scale, classes, dtype, options):
    """--edit / --edit-class: originals, their edits, and the figure; returns its path."""
    keep, rows = keep_mask(cfg["keep"], model.grid_size), cfg["num_samples"]
    if cfg["edit"]:
        image = load_image(cfg["edit"], cfg["edit_index"], meta["image_size"])
        originals = encode_images(image, model, vae, scale).expand(rows, -1, -1)  # one image, R rows of edits
    else:  # what a plain run with --classes edit_class --batch-size R gives (batch 0)
        check_options(model, classes=[cfg["edit_class"]], **options)
        originals = sample_batch(model, Diffusion(cfg["steps"]), torch.full((rows,), cfg["edit_class"]),
                                 cfg["seed"] * 1_000_003, dtype=dtype, **options)
    edits = edit_tokens(model, originals, keep, classes, cfg["seed"], cfg["steps"], dtype, **options)
    path = os.path.join(cfg["out_dir"], f"edit_{os.path.basename(cfg['keep']).removesuffix('.png')}.png")
    edit_figure(tokens_to_images(originals, model, vae, scale), tokens_to_images(edits.flatten(0, 1), model, vae,
                scale), keep, path)
    return path


# ------------------------------------------------------------------------------------------ main
def setup(device):
    """(rank, world size, device); under torchrun, one process per GPU (or gloo on CPUs)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        return dist.get_rank(), world, device
    return 0, 1, device


# ------------------------------------------------------------------------------------------ captioning
def caption_sources(src, size):
    """--caption SRC -> (sources, uint8 images (N, size, size, 3)): an image (its file name), a folder (every image
    under it, sorted, by relative path) or an .npz (arr_0; the integer indices); centre-cropped to size."""
    if src.endswith(".npz"):
        images = np.load(src)["arr_0"]
        return list(range(len(images))), np.stack([np.asarray(center_crop(Image.fromarray(x), size)) for x in images])
    if os.path.isdir(src):
        names = sorted(os.path.relpath(os.path.join(d, f), src) for d, _, files in os.walk(src) for f in files
                       if f.lower().endswith(IMAGE_EXTENSIONS))
        if not names:
            raise ValueError(f"--caption {src}: no images in this folder ({', '.join(IMAGE_EXTENSIONS)})")
        paths = [os.path.join(src, name) for name in names]
    elif os.path.isfile(src):
        names, paths = [os.path.basename(src)], [src]
    else:
        raise FileNotFoundError(f"--caption {src}: no such image, folder or .npz")
    images = []
    for path in paths:
        try:
            with Image.open(path) as img:
                images.append(np.asarray(center_crop(img.convert("RGB"), size)))
        except OSError as e:
            raise ValueError(f"--caption: cannot read {path}: {e}") from None
    return names, np.stack(images)


def run_captions(cfg, model, meta, vae, scale, tokenizer, dtype):
    """--caption: one caption per image, written to --out (.jsonl) or printed; the first 64 images with their
    captions in OUT_DIR/captions.png."""
    sources, images = caption_sources(cfg["caption"], meta["image_size"])
    device = model.x_proj.weight.device
    g = torch.Generator(device).manual_seed(cfg["seed"])
    texts = []
    for i in tqdm(range(0, len(images), cfg["batch_size"]), desc="captions"):
        with torch.autocast(device.type, torch.bfloat16) if dtype == "bf16" else nullcontext():
            tokens = encode_images(images[i:i + cfg["batch_size"]], model, vae, scale)
            texts += caption_images(model, tokens, tokenizer, cfg["temperature"], cfg["top_k"], g)
    lines = [json.dumps({"source": s, "text": t}, ensure_ascii=False) for s, t in zip(sources, texts)]
    save_grid(images[:64], os.path.join(cfg["out_dir"], "captions.png"), ncol=8, captions=texts[:64])
    if cfg["out"]:
        with open(cfg["out"], "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))
        print(f"wrote {cfg['out']}: {len(lines)} captions")
    else:
        for s, t in zip(sources, texts):
            print(f"{s}: {t}")


def read_prompts(cfg):
    """--prompts, then the lines of --prompts-file (blank lines skipped)."""
    prompts = [str(p) for p in cfg["prompts"]]
    if cfg["prompts_file"]:
        if not os.path.isfile(cfg["prompts_file"]):
            raise FileNotFoundError(f"--prompts-file {cfg['prompts_file']}: no such file")
        with open(cfg["prompts_file"], encoding="utf-8") as f:
            prompts += [line.strip() for line in f if line.strip()]
    return prompts


def gather(images, labels, index, rank, world, tmp_dir):
    """Rank 0 gets every rank's samples in sample-index order (through per-rank files: no GPU memory)."""
    if world == 1:
        return images, labels
    np.savez(os.path.join(tmp_dir, f".rank{rank}.npz"), images=images, labels=labels, index=index)
    dist.barrier()
    if rank > 0:
        return None, None
    parts = [dict(np.load(os.path.join(tmp_dir, f".rank{r}.npz"))) for r in range(world)]
    parts = [p for p in parts if len(p["index"])]
    for r in range(world):
        os.remove(os.path.join(tmp_dir, f".rank{r}.npz"))
    order = np.argsort(np.concatenate([p["index"] for p in parts]))
    return (np.concatenate([p["images"] for p in parts])[order], np.concatenate([p["labels"] for p in parts])[order])


def main(argv=None):
    cfg = dict(config)
    parse_config(cfg, argv)
    if not cfg["ckpt"]:
        raise ValueError("--ckpt is required: a checkpoint of train.py or of the authors' code")
    if cfg["dtype"] not in ("", "bf16", "fp32"):
        raise ValueError(f"--dtype must be bf16 or fp32, got {cfg['dtype']!r}")
    suffix, what = (".jsonl", "a .jsonl file (captions)") if cfg["caption"] else (".npz", "an .npz file (for fid.py)")
    if cfg["out"] and not cfg["out"].endswith(suffix):  # np.savez would quietly append .npz
        raise ValueError(f"--out must name {what}, got {cfg['out']!r}")
    rank, world, device = setup(cfg["device"])
    dtype = cfg["dtype"] or ("bf16" if device.type == "cuda" else "fp32")
    model, meta = load_checkpoint(cfg["ckpt"], cfg["ema"], cfg["vae"])
    model.to(device)
    prompts, tokenizer = read_prompts(cfg), None
    if model.text_vocab:
        tokenizer = text_lib.from_state(meta["tokenizer"])
        if cfg["tokenizer"]:
            text_lib.check_same(meta["tokenizer"], cfg["tokenizer"])
        if not prompts and not cfg["caption"]:
            raise ValueError(f"{cfg['ckpt']} is a text model: give --prompts / --prompts-file, or --caption SRC")
    elif prompts or cfg["caption"]:
        raise ValueError(f"{cfg['ckpt']} is a class-conditional model: --prompts, --prompts-file and --caption need a "
                         f"model trained on captions")
    vae_kind = cfg["vae"] or meta["vae"]
    same_vae = vae_kind == meta["vae"]  # then the checkpoint's VAE weights and scale are the defaults
    vae = build_vae(vae_kind, cfg["vae_ckpt"] or (meta.get("vae_ckpt") if same_vae else None), device=device)
    scale = meta["scale_factor"] if same_vae else SCALE_FACTORS[vae_kind]
    classes = parse_classes(cfg["classes"], model.num_classes, meta.get("class_names"))
    options = {k: cfg[k] for k in ("ar_steps", "split", "order", "cfg_scale", "cfg_interval")}
    os.makedirs(cfg["out_dir"], exist_ok=True)
    start = time.time()

    if cfg["caption"]:
        if rank == 0:
            run_captions(cfg, model, meta, vae, scale, tokenizer, dtype)
    elif cfg["edit"] or cfg["edit_class"] >= 0:
        if not classes:
            raise ValueError("editing needs --classes: the new class(es) of the regenerated region")
        if rank == 0:
            path = run_edit(cfg, model, meta, vae, scale, classes, dtype, options)
            print(f"wrote {path} ({time.time() - start:.1f} s)")
    else:
        images, labels, index = sample_images(model, vae, scale, cfg["num_samples"], classes, steps=cfg["steps"],
                                              seed=cfg["seed"], batch_size=cfg["batch_size"], dtype=dtype,
                                              rank=rank, world_size=world, prompts=prompts or None,
                                              tokenizer=tokenizer, **options)
        images, labels = gather(images, labels, index, rank, world, cfg["out_dir"])
        if rank == 0:
            print(f"sampled {len(images)} images in {time.time() - start:.2f} s")
            if cfg["out"]:
                np.savez(cfg["out"], arr_0=images, **{"prompts" if prompts else "labels": labels})
                print(f"wrote {cfg['out']}: arr_0 {images.shape} {images.dtype}")
            else:
                for i, image in enumerate(images):
                    Image.fromarray(image).save(os.path.join(cfg["out_dir"], f"{i:06d}.png"))
            save_grid(images[:64], os.path.join(cfg["out_dir"], "grid.png"), ncol=8,
                      captions=list(labels[:64]) if prompts else None)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, ImportError) as e:  # bad options or files, a missing optional package
        sys.exit(f"sample.py: error: {e}")
