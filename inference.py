"""The generation engine: CausalFusion samples, zero-shot edits and captions through the KV cache (paper Sec. 3, 6,
App. D), and the conversions between images and tokens. sample.py, editor/app.py, train.py (grids, evaluation),
bench.py and the demos use it.

Every AR step denoises its tokens through all sampler steps against a KV cache that holds the class tokens (or
the prompt) and the clean tokens of the finished steps, entered once each; CFG runs [cond; null class] (or
[prompt; no text]) as one doubled batch. Captioning enters the clean image into the cache once, then decodes
the text token by token.
Randomness: sample_batch draws the order, the split and the noise from one seed; sample_images seeds global
batch b by (seed, b) alone and lets rank r take batches r, r + world, ..., so the samples do not depend on the
number of processes.
"""
import os

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

import mask
import tokenization
from checkpoint import load_checkpoint
from diffusion import SAMPLERS_OF, Sampler
from images import to_8bit
from model import patchify, unpatchify
from runtime import autocast
from vae import SCALE_FACTORS, build_vae

ORDERS = ("random", "raster", "block_raster")  # as train.py --order (mask.token_order)
# steps per AR step when --steps is 0, per objective: the paper's DDPM protocol, and the fast samplers' recommended
# counts (docs/sampling.md, "Fast samplers"; flow: docs/flow.md)
DEFAULT_STEPS = {"eps": {"ddpm": 250, "ddim": 50, "dpm++": 20, "dpm++sde": 20},
                 "flow": {"euler": 50, "dpm++": 20, "dpm++sde": 20}}


SEED_STRIDE = 1_000_003  # a prime above any batch count: no two (seed, batch) pairs share a noise seed


def sample_seed(seed, batch):
    """The noise seed of batch `batch` of a sampling run seeded by `seed` (sample.py's batches and edits, the
    editor's answers, which equal sample.py's)."""
    return seed * SEED_STRIDE + batch


def make_diffusion(steps=0, sampler="", eta=0.0, spacing="", objective="eps"):
    """The Sampler of the command-line options (sample.py --steps --sampler --eta --spacing; train.py's
    --grid-steps with the same others) for a model of the objective (its checkpoint's): sampler "" = the
    objective's default (eps: ddpm, flow: euler), steps 0 = the sampler's default (DEFAULT_STEPS), eta only for
    ddim (0: deterministic), spacing "" = the sampler's default timesteps."""
    if steps < 0:
        raise ValueError(f"--steps must be >= 1, or 0 for the sampler's default ({DEFAULT_STEPS.get(objective)}); got "
                         f"{steps}")
    sampler = sampler or SAMPLERS_OF.get(objective, ("",))[0]  # Sampler names a wrong objective or sampler
    return Sampler(objective, name=sampler, steps=steps or DEFAULT_STEPS.get(objective, {}).get(sampler, 1),
                   eta=eta if sampler == "ddim" or eta else None, spacing=spacing or None)


def load_model(cfg, device):
    """(model on device, data meta, VAE, scale factor, tokenizer or None) of the options ckpt, ema, vae, vae_ckpt
    and tokenizer of cfg (sample.py's, editor/app.py's): a train.py or authors' checkpoint with its VAE."""
    model, meta = load_checkpoint(cfg["ckpt"], cfg["ema"], cfg["vae"])
    model.to(device)
    tokenizer = None
    if model.text_vocab:
        tokenizer = tokenization.from_state(meta["tokenizer"])
        if cfg["tokenizer"]:
            tokenization.check_same(meta["tokenizer"], cfg["tokenizer"])
    vae_kind = cfg["vae"] or meta["vae"]
    same_vae = vae_kind == meta["vae"]  # then the checkpoint's VAE weights and scale are the defaults
    vae = build_vae(vae_kind, cfg["vae_ckpt"] or (meta.get("vae_ckpt") if same_vae else None), device=device)
    scale = meta["scale_factor"] if same_vae else SCALE_FACTORS[vae_kind]
    return model, meta, vae, scale, tokenizer


# ------------------------------------------------------------------------------------------ one batch
@torch.no_grad()
def generate(model, diffusion, labels, step_sizes, order, generator, cfg_scale=1.0, cfg_interval=(0, 1000),
             context=None, context_pos=None, progress=None, text=None, text_lengths=None):
    """Generate the image tokens of labels (N,) in len(step_sizes) AR steps; returns (N, L, P) in image order.

    order (N, L - K) lists the image positions to generate, in AR order; step s denoises the next
    step_sizes[s] of them with all of the sampler's steps, seeing the prefix (class tokens or text) and the clean
    tokens of the steps before it through the KV cache, then enters its clean result into the cache. context
    (N, K, P) at image positions context_pos (N, K) are given clean tokens (zero-shot editing), entered into the
    cache before step 1.
    A text model takes texts (N, Lt) of text_lengths (N,) real tokens in place of labels (None).
    With cfg_scale > 1 the cache holds a doubled batch [cond; null class, or no text] and guidance runs in one
    forward. A few-step model (model.step_size) also sees each sampler step's size."""
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

        def predict(x, t, d=None):  # d: a step-size model's step (Sampler.sample)
            full = lambda v: torch.full((x.shape[0],), v, device=device)
            return model.denoise(cache, x, full(t), pos2, None if d is None else full(d))
        x = torch.randn(n, size, model.token_dim, generator=generator, device=device)
        x = diffusion.sample(predict, x, generator, cfg_scale, cfg_interval, progress, step_size=model.step_size)
        if s < len(step_sizes) - 1:
            model.extend(cache, double(x), pos2)
        out.scatter_(1, pos[..., None].expand_as(x), x.float())
        start += size
    return out


def ar_plan(n, free, ar_steps, split, order, generator, grid=None, order_block=2):
    """AR order (N, M) over the M positions `free` to generate, and the S step sizes (one split per batch).
    random: a permutation per sample; raster and block_raster: mask.token_order's over the grid x grid image,
    with the positions that are not free left out."""
    m = len(free)
    sizes = mask.equal_split(ar_steps, m) if split == "equal" else mask.random_split(ar_steps, m, generator)
    if order == "random":
        return free[torch.rand(n, m, generator=generator).argsort(1)], sizes
    full = mask.token_order(1, grid, grid, order, generator, order_block)[0]  # (L,) draws nothing
    return full[torch.isin(full, free)].expand(n, m), sizes


def sample_batch(model, diffusion, labels, batch_seed, ar_steps=1, split="equal", order="random", order_block=2,
                 cfg_scale=1.0, cfg_interval=(0, 1000), dtype="fp32", context=None, context_pos=None, text=None,
                 text_lengths=None, progress=None):
    """Tokens (N, L, P) in image order for labels (N,), or for texts (N, Lt) of text_lengths (N,) tokens (labels
    None); all randomness comes from batch_seed. context (N, K, P) at positions context_pos (N, K): clean tokens
    to keep (editing); the others are generated. progress: wraps each AR step's sampler steps (generate)."""
    device = model.x_proj.weight.device
    labels, text = (labels.to(device), None) if text is None else (None, text.to(device))
    g = torch.Generator().manual_seed(batch_seed)  # orders and splits, on the CPU
    free = torch.arange(model.num_tokens)
    if context_pos is not None:  # the same kept positions for the whole batch
        free = free[~torch.isin(free, context_pos[0].cpu())]
    order_pos, sizes = ar_plan(len(labels if text is None else text), free, ar_steps, split, order, g,
                               grid=model.grid_size, order_block=order_block)
    noise = torch.Generator(device).manual_seed(int(torch.randint(2 ** 62, (1,), generator=g)))  # a fresh stream
    with autocast(dtype, device):
        return generate(model, diffusion, labels, sizes, order_pos.to(device), noise, cfg_scale, cfg_interval, context,
                        context_pos, progress, text=text,
                        text_lengths=None if text is None else text_lengths.to(device))


def check_sampling_options(model, ar_steps=1, split="equal", order="random", order_block=2, cfg_scale=1.0,
                           cfg_interval=(0, 1000), classes=None, num_tokens=None):
    """Raise a ValueError naming the option for a value sampling cannot use."""
    num_tokens = num_tokens or model.num_tokens
    if cfg_scale < 1:
        raise ValueError(f"--cfg-scale must be >= 1 (1 = no guidance), got {cfg_scale}")
    if len(cfg_interval) != 2 or not 0 <= cfg_interval[0] <= cfg_interval[1] <= 1000:
        raise ValueError(f"--cfg-interval must be LO HI with 0 <= LO <= HI <= 1000, got {tuple(cfg_interval)}")
    if not 1 <= ar_steps <= num_tokens:
        raise ValueError(f"--ar-steps must be in 1..{num_tokens} (the tokens to generate), got {ar_steps}")
    if split not in ("equal", "random") or order not in ORDERS:
        raise ValueError(f"--split must be equal or random, --order one of {', '.join(ORDERS)}; got {split!r}, "
                         f"{order!r}")
    if order == "block_raster" and (order_block < 1 or model.grid_size % order_block):
        raise ValueError(f"--order-block must divide the {model.grid_size}x{model.grid_size} token grid, got "
                         f"{order_block}")
    bad = [c for c in classes or [] if not 0 <= c < model.num_classes]
    if bad:
        raise ValueError(f"--classes {bad}: out of range for a model of {model.num_classes} classes")


# ------------------------------------------------------------------------------------------ many images
def class_labels(num_samples, classes, num_classes, seed):
    """Label of every sample index: --classes cycled, or uniformly random from the seed."""
    if classes:
        return torch.tensor(classes)[torch.arange(num_samples) % len(classes)]
    return torch.randint(num_classes, (num_samples,), generator=torch.Generator().manual_seed(seed))


def sample_images(model, vae, scale_factor, num_samples, classes=None, ar_steps=1, split="equal", order="random",
                  order_block=2, diffusion=None, cfg_scale=1.0, cfg_interval=(0, 1000), seed=0, batch_size=16,
                  dtype="fp32", rank=0, world_size=1, prompts=None, tokenizer=None):
    """This rank's share of the num_samples images: (uint8 (n, H, W, 3), labels (n,) or for a text model their
    prompts (n,) (--prompts cycled), sample indices (n,)). Rank r takes global batches r, r + world_size, ...;
    batch b holds samples b*batch_size... and is seeded by (seed, b) alone."""
    check_sampling_options(model, ar_steps, split, order, order_block, cfg_scale, cfg_interval, classes)
    if prompts is not None:
        labels = np.array([prompts[i % len(prompts)] for i in range(num_samples)])
        text, lengths, cut = tokenization.tokenize(tokenizer, list(labels), model.num_prefix_tokens)
        if cut and rank == 0:
            print(f"{cut} of {num_samples} prompts were longer than the model's {model.num_prefix_tokens} text tokens "
                  f"and were cut")
    else:
        labels = class_labels(num_samples, classes, model.num_classes, seed).numpy()
    diffusion = diffusion or Sampler()  # default: the paper's 250 DDPM steps
    images, index = [], []
    for b in tqdm(range(rank, -(-num_samples // batch_size), world_size), disable=rank > 0, desc="batches"):
        idx = torch.arange(b * batch_size, min(num_samples, (b + 1) * batch_size))
        cond = dict(labels=torch.from_numpy(labels[idx.numpy()])) if prompts is None else dict(
            labels=None, text=text[idx], text_lengths=lengths[idx])
        batch_seed = sample_seed(seed, b)
        tokens = sample_batch(model, diffusion, batch_seed=batch_seed, ar_steps=ar_steps, split=split, order=order,
                              order_block=order_block,
                              cfg_scale=cfg_scale, cfg_interval=cfg_interval, dtype=dtype, **cond)
        if not torch.isfinite(tokens).all():  # a NaN would decode to a plausible-looking image and skew the FID
            raise FloatingPointError(f"batch {b} (samples {idx[0]}..{idx[-1]}, batch seed {batch_seed} of --seed "
                                     f"{seed}): non-finite latents; nothing was written (try --dtype fp32)")
        images.append(tokens_to_images(tokens, model, vae, scale_factor))
        index.append(idx)
    if not images:  # a rank with no batch
        return np.zeros((0, 1, 1, 3), np.uint8), labels[:0], np.zeros(0, np.int64)
    index = torch.cat(index).numpy()
    return np.concatenate(images), labels[index], index


@torch.no_grad()
def sample_latents(model, diffusion, seed, labels=None, texts=None, tokenizer=None, cfg_scale=1.0):
    """Samples in diffusion mode (1 AR step, raster order) of labels (N,), or of texts (N strings) for a text
    model, with the sampler `diffusion` and noise from a generator on the model's device seeded by seed: scaled
    latent tokens (N, L, P), image order (train.py's grids, the demos' evaluations)."""
    device = model.x_proj.weight.device
    g = torch.Generator(device).manual_seed(seed)
    n = len(labels) if texts is None else len(texts)
    order = torch.arange(model.num_tokens, device=device).expand(n, -1)  # (N, L)
    text = lengths = None
    if texts is not None:
        text, lengths, _ = tokenization.tokenize(tokenizer, texts, model.num_prefix_tokens)
        text, lengths, labels = text.to(device), lengths.to(device), None
    return generate(model, diffusion, None if labels is None else labels.to(device), [model.num_tokens], order, g,
                    cfg_scale=cfg_scale, text=text, text_lengths=lengths)


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


# ------------------------------------------------------------------------------------------ zero-shot editing
def region_masks(grid):
    """{name: (grid, grid) bool token mask} of the named regions (sample.py --keep): outer, the ring of grid // 4
    tokens (at least 1) along the border; inner, the centre inside it; the halves top, bottom, left, right. The
    paper regenerates the centre, the top or the bottom half (Fig. 2b) and the outer region (App. D, Fig. 7)."""
    r = torch.arange(grid)
    rows, cols = r[:, None].expand(grid, grid), r[None, :].expand(grid, grid)
    ring = torch.minimum(torch.minimum(rows, cols), grid - 1 - torch.maximum(rows, cols))  # distance to the border
    width, half = max(1, grid // 4), grid // 2
    return dict(outer=ring < width, inner=ring >= width, top=rows < half, bottom=rows >= half, left=cols < half,
                right=cols >= half)


def snap_mask(image, grid):
    """A mask image (PIL, any mode) -> (grid, grid) bool: True for the tokens whose pixels average white (>= 128
    after converting to grayscale; 16-bit: of its high byte)."""
    gray = to_8bit(image).convert("L").resize((grid, grid), Image.BOX)  # average over each token's pixels
    return torch.from_numpy(np.asarray(gray) >= 128)


def keep_mask(keep, grid):
    """(grid, grid) bool token mask of the region kept as context: a named region or a PNG (white = keep)."""
    regions = region_masks(grid)
    if keep in regions:
        kept = regions[keep]
    elif os.path.isfile(keep):
        kept = snap_mask(Image.open(keep), grid)
    else:
        raise ValueError(f"--keep {keep!r}: expected one of {', '.join(regions)} or an existing mask PNG")
    if kept.all() or not kept.any():
        raise ValueError(f"--keep {keep}: keeps {int(kept.sum())} of {grid * grid} tokens; keep some, not all")
    return kept


def edit_tokens(model, originals, keep, classes, seed, diffusion, dtype="fp32", prompts=None, tokenizer=None,
                progress=None, **options):
    """Regenerate the tokens outside `keep` (grid, grid) of each original (R, L, P) once per class (a text model:
    once per prompt, classes None), conditioned on the kept tokens. Returns (R, B, L, P), B classes or prompts;
    the kept tokens are the originals' exactly. Row r draws from sample_seed(seed, 1 + r) (sample.py --edit)."""
    kept = keep.flatten().nonzero()[:, 0].to(originals.device)  # (K,) image positions
    check_sampling_options(model, classes=classes, num_tokens=model.num_tokens - len(kept), **options)
    if prompts:
        text, lengths, _ = tokenization.tokenize(tokenizer, prompts, model.num_prefix_tokens)
        cond, n = dict(labels=None, text=text, text_lengths=lengths), len(prompts)
    else:
        cond, n = dict(labels=torch.tensor(classes)), len(classes)
    rows = []
    for r, tokens in enumerate(originals):
        context = tokens[kept].expand(n, -1, -1)  # (B, K, P)
        # row r's seed index 1 + r: index 0 generated the originals (--edit-class)
        rows.append(sample_batch(model, diffusion, batch_seed=sample_seed(seed, 1 + r), dtype=dtype, context=context,
                                 context_pos=kept.expand(n, -1), progress=progress, **cond, **options))
    return torch.stack(rows)


# ------------------------------------------------------------------------------------------ captioning
@torch.no_grad()
def caption_images(model, tokens, tokenizer, temperature=0.0, top_k=0, generator=None):
    """Captions (N strings) of images given as clean tokens (N, L, P) in image order: the image enters the KV cache
    once (as one AR step: every token sees every other), then the text is decoded token by token from BOS until
    EOS or the model's text length; greedy with temperature 0, else sampled (from the top_k most likely ids if
    top_k > 0) with the generator."""
    n, L = tokens.shape[:2]
    device, Lt = tokens.device, model.num_prefix_tokens
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
    return tokenization.detokenize(tokenizer, rows)


# ------------------------------------------------------------------------------------------ images <-> tokens
@torch.no_grad()
def tokens_to_images(tokens, model, vae, scale_factor):
    """Generated tokens (N, L, P) in image order -> uint8 images (N, H, W, 3) through the VAE decoder."""
    size = model.input_size
    latents = unpatchify(tokens.float(), model.patch_size, size, size)  # (N, C, h, w), scaled
    pixels = vae.decode(latents / scale_factor)  # (N, 3, H, W) in [-1, 1]
    return ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def encode_images(images, model, vae, scale_factor):
    """uint8 images (N, H, W, 3) -> tokens (N, L, P) of the scaled VAE posterior mean."""
    x = torch.tensor(images).permute(0, 3, 1, 2).float().div(127.5).sub(1).to(model.x_proj.weight.device)
    mean, _ = vae.encode_moments(x)  # (N, C, h, w), unscaled
    if mean.shape[1:] != (model.in_channels, model.input_size, model.input_size):
        raise ValueError(f"the VAE gives latents {tuple(mean.shape[1:])} for these images, the model takes "
                         f"{(model.in_channels, model.input_size, model.input_size)}")
    return patchify(mean * scale_factor, model.patch_size)
