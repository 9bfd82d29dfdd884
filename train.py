"""Train CausalFusion on the latents of extract_latents.py (paper Sec. 3-5, App. C; SPEC.md Sec. 3, 4, 6).

    python train.py                                              # the demo: built-in shapes, tiny model, CPU
    python train.py --demo captions --flip false ...            # the captioned demo (README: its command)
    python train.py --data latents/in256_sd --size L --out runs/L ...               # one GPU
    torchrun --nproc_per_node=8 train.py --data latents/in256_sd --size L ...      # DDP over 8 GPUs

A step: the global batch is cut into micro-batches (ranks x grad_accum). Each draws latents (posterior sample,
random flip), drops labels to the null class, draws a token order, an AR split and timesteps, and takes the
AR-weighted eps-MSE over the static layout [cond | all L clean tokens | all L noisy tokens]. Captioned data
(paper Sec. 6) trains the multimodal model: a caption per example in place of the class tokens, before its
image (text-to-image) or after it (captioning, with a next-token loss), decided per example by the mask.
Randomness: micro-batch m of step s draws from a generator seeded by (seed, s, m), and epoch e's data order
from one seeded by (seed, e). So resuming needs no generator state to continue exactly, and 2 ranks x 1
micro-batch compute the same step as 1 rank x 2 accumulated micro-batches.
"""
import contextlib
import copy
import functools
import json
import math
import os
import sys
import resource
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import mask
import shapes
import tokenizer as text_lib
from config import parse_config
from diffusion import Diffusion
from extract_latents import LatentData
from model import CausalFusion, patchify, unpatchify
from sample import caption_images, encode_images, generate, save_grid, tokens_to_images
from vae import build_vae

# The defaults are the CPU demo's (`python train.py`); the paper's recipes are commands in the README.
config = dict(
    data="",  # extraction dir of extract_latents.py; "" = the demo: build the shapes data set under OUT/data
    out="out/demo",  # run dir: ckpt.pt (latest), ckpt_<step>.pt, train.log, samples_<step>.png
    resume=False,  # continue OUT/ckpt.pt exactly (step, weights, optimizer, EMA, data order)
    seed=0,  # seeds the weights and every random draw of training
    # model (model.py)
    size="T",  # T (tiny), S, B, L, XL or H
    patch_size=2,  # latent pixels per token side (paper: 2 on SD 32x32 latents, 1 on MAR 16x16 latents)
    num_cond_tokens=4,  # class tokens (paper: 4 for ablations, 64 system-level)
    cond_repeat=1,  # the class tokens are num_cond_tokens / cond_repeat unique ones, repeated (App. B)
    learn_pos=False,  # learnable position embedding initialized from sin-cos (paper: system-level)
    qk_norm=True,  # head-wise QK LayerNorm in attention (Table 1: off in the native in-context DiT)
    time_token=False,  # the timestep as a token of its own instead of added to the noisy tokens (Table 1)
    # CausalFusion training choices (paper Sec. 5, App. B)
    gamma=0.9,  # AR-step decay: P(S = k) ~ gamma^(k-1); 0 = in-context DiT, 1 = uniform
    ar_lambda=2.0,  # loss weight of the first AR step, decaying linearly to 1 (Table 3c)
    order="random",  # token order: random, raster or block_raster (Table 3b)
    order_block=2,  # block side (in tokens) of --order block_raster (Table 3b)
    ar_steps_train=0,  # a fixed number of AR steps S_train of L / S_train tokens each (Table 2); 0 = random (gamma)
    split="sample",  # AR split drawn per sample, or per batch (one S and one split per micro-batch, the authors')
    per_step_t=False,  # one diffusion timestep per AR step instead of one per image (App. B, Table 7)
    noisy_copies=1,  # K noisy copies per image at K timesteps sharing its clean tokens (Table 7's K x t rows)
    class_dropout=0.1,  # probability of the null class, for classifier-free guidance
    flip=True,  # random horizontal flips (paper); false for captions that name left and right
    # multimodal model (paper Sec. 6, Table 11): trained when --data holds captions (metadata.jsonl)
    tokenizer="",  # "" = byte-level UTF-8; PATH = LLaMA-3's tokenizer.model (needs `pip install tiktoken`)
    text_len=35,  # text tokens per example, BOS and EOS included (paper: 35); longer captions are cut, counted
    text_first=0.9,  # share of examples with the text first (text-to-image); the rest caption their image
    text_loss_weight=0.01,  # weight of the captioning next-token loss, against the image loss
    transfusion=False,  # the paper's baseline (Table 6a): single-step diffusion, captions see the noisy image
    # optimization (App. C)
    batch_size=16,  # global batch, split over ranks and micro-batches (paper: 2048)
    grad_accum=1,  # micro-batches per rank per step: a big global batch on few GPUs
    max_steps=2200,  # training steps
    lr=2e-3,  # AdamW learning rate after warmup (paper: 1e-4 at batch 2048)
    betas=(0.9, 0.95),  # AdamW betas
    weight_decay=0.0,  # AdamW weight decay
    adam_eps=1e-15,  # AdamW epsilon (the authors' --eps; torch's default is 1e-8)
    warmup_steps=100,  # linear lr warmup, then constant (paper: 40 epochs)
    grad_clip=1.0,  # max global grad norm (0 = no clipping)
    ema_decay=0.995,  # EMA of the weights, warmed up as min(ema_decay, (1 + step) / (10 + step)) (DiT: 0.9999)
    # logging, checkpoints, samples
    log_every=200,  # steps between log lines
    ckpt_every=1000,  # steps between writes of OUT/ckpt.pt (and at the end)
    keep_every=0,  # steps between numbered copies OUT/ckpt_<step>.pt (0 = none)
    sample_every=0,  # steps between sample grids (and at the end; 0 = only at the end)
    grid_classes=10,  # rows of the grid: classes evenly spaced over all classes (text: captions); 0 = no grid
    grid_per_class=10,  # columns of the grid
    sample_steps=100,  # DDPM steps of the grid and evaluation samples (paper: 250)
    cfg_scale=5.0,  # classifier-free guidance scale of those samples (1 = none)
    eval_per_class=10,  # at the end, pixel-space data only: samples per class for the nearest-neighbour class
    # accuracy; the captioned demo: prompts and images per group for its attribute accuracies (0 = skip)
    # the demo data set (--data "")
    demo="classes",  # classes: 10 shapes, one per class; captions: shapes described by text (shapes.py)
    demo_image_size=12,  # pixels per side
    demo_per_class=100,  # training images per class (10 classes)
    demo_images=4000,  # training images of the captioned demo
    # system
    device="",  # "" = cuda if available, else cpu
    dtype="",  # autocast dtype: bf16 or fp32; "" = bf16 on cuda, fp32 on cpu
    compile=False,  # torch.compile the model
    grad_checkpointing=False,  # recompute block activations in the backward pass: less memory, ~30% slower
)


# ------------------------------------------------------------------------------------------ demo evaluation
def nearest_neighbour_accuracy(samples, labels, data):
    """Share of samples (N, C, H, W) (unscaled latents; pixels in [-1, 1] for --vae none) whose nearest
    training latent (L2, either flip) has their class. No network needed; chance is ~1 / num_classes."""
    train = np.concatenate([shard[:, :, 0] for shard in data.shards])  # (N, 2 flips, C, H, W), unscaled
    train = torch.from_numpy(train).float().flatten(2).flatten(0, 1)  # (2N, C*H*W)
    nearest = torch.cdist(samples.float().flatten(1), train).argmin(1) // 2  # index of the training image
    return (data.labels[nearest] == labels).float().mean().item()


def pixel_images(data):
    """The unflipped training images of pixel-space data (--vae none): uint8 (N, H, W, 3)."""
    pixels = np.concatenate([shard[:, 0, 0] for shard in data.shards])  # (N, 3, H, W) in [-1, 1]
    return np.round((pixels.astype(np.float32).clip(-1, 1) + 1) * 127.5).astype(np.uint8).transpose(0, 2, 3, 1)


@torch.no_grad()
def evaluate_caption_demo(ema, cfg, data, tokenizer, vae, device, autocast, log):
    """The captioned demo's figures: the attribute accuracy of text-to-image samples for seen and held-out prompts
    (shapes.py measures them from the pixels), and of the captions of new images of seen and held-out
    combinations, with chance beside them."""
    n, size, seed = cfg["eval_per_class"], data.latent_shape[1], cfg["seed"]
    train_images = pixel_images(data)
    train_attrs = [shapes.parse_caption(c[0]) for c in data.captions]
    summary, chance = {}, shapes.CHANCE
    for group, held_out in (("seen", False), ("held_out", True)):
        attrs = shapes.random_attrs(n, seed + 2, held_out)
        with autocast:
            tokens = sample_latents(ema, cfg, device, seed + 1, texts=[shapes.caption(a) for a in attrs],
                                    tokenizer=tokenizer)
        images = tokens_to_images(tokens, ema, vae, data.scale_factor)
        summary[f"t2i_{group}"] = shapes.t2i_accuracy(images, attrs, train_images, train_attrs)
        log(f"text-to-image, {n} {group.replace('_', '-')} prompts: " + ", ".join(
            f"{k} {v:.2f}" for k, v in summary[f"t2i_{group}"].items()) + " (chance " +
            ", ".join(f"{chance[k]:.2f}" for k in summary[f"t2i_{group}"]) + ")")
    for group, held_out in (("seen", False), ("held_out", True)):  # fresh images of either kind of combination
        attrs = shapes.random_attrs(n, seed + 3, held_out)
        images = shapes.draw_captioned(attrs, size, seed + 3)
        with autocast:
            texts = caption_images(ema, encode_images(images, ema, vae, data.scale_factor), tokenizer)
        summary[f"captions_{group}"] = shapes.caption_accuracy(texts, attrs)
        log(f"captions of {n} new {group.replace('_', '-')} images: " + ", ".join(
            f"{k} {v:.2f}" for k, v in summary[f"captions_{group}"].items()))
        log("  e.g. " + "; ".join(f"{shapes.caption(a)!r} -> {t!r}" for a, t in list(zip(attrs, texts))[:3]))
    return summary


def evaluate_class_demo(ema, cfg, data, device, autocast, log):
    """Nearest-neighbour class accuracy of EMA samples of every class; for the demo, of fresh real images too."""
    summary, (_, h, w) = {}, data.latent_shape
    labels = torch.arange(data.num_classes).repeat_interleave(cfg["eval_per_class"])
    with autocast:
        tokens = sample_latents(ema, cfg, device, cfg["seed"] + 1, labels=labels)
    samples = unpatchify(tokens.float().cpu(), ema.patch_size, h, w) / data.scale_factor  # (N, C, H, W)
    summary["nn_accuracy"] = nearest_neighbour_accuracy(samples, labels, data)
    log(f"step {cfg['max_steps']} | nearest-neighbour class accuracy of {len(labels)} EMA samples: "
        f"{summary['nn_accuracy']:.3f} (chance {1 / data.num_classes:.3f})")
    if not cfg["data"]:  # the demo: the same figure for fresh real images is the ceiling
        real, real_labels = shapes.draw_shapes(cfg["eval_per_class"], h, cfg["seed"] + 1)
        real = torch.from_numpy(real).permute(0, 3, 1, 2).float() / 127.5 - 1  # (N, 3, H, W) in [-1, 1]
        summary["nn_accuracy_real"] = nearest_neighbour_accuracy(real, torch.from_numpy(real_labels), data)
        log(f"step {cfg['max_steps']} | the same for {len(real)} fresh real images: {summary['nn_accuracy_real']:.3f}")
    return summary


# ------------------------------------------------------------------------------------------- training
def seeded(*key):
    """A CPU generator whose seed is a hash of the integers in key."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0]))


@functools.lru_cache(maxsize=1)
def epoch_permutation(n, seed, epoch):
    return torch.randperm(n, generator=seeded(seed, 0, epoch))


def step_indices(step, batch, n, seed):
    """The global batch's sample indices (batch,) at `step`: epochs are seeded permutations, the last partial
    batch of each dropped."""
    epoch, i = divmod(step, n // batch)
    return epoch_permutation(n, seed, epoch)[i * batch:(i + 1) * batch]


def draw_micro_batch(data, model, indices, g, cfg, num_timesteps, tokenizer=None):
    """One micro-batch, in AR order (K = --noisy-copies): a dict of clean tokens (B, L, P), noise (B, K L, P),
    t (B,) or (B, K L), labels y (B,), order (B, L) (the image position of each AR slot) and steps (B, L) (AR step
    ids). With a
    tokenizer (captioned data) also one caption per example, drawn from its captions: text (B, Lt) ids,
    text_len (B,) real tokens, text_after (B,) (True: the image comes first and is captioned), and truncated
    (how many of these captions were cut to Lt tokens)."""
    x, y = data.batch(indices, g, flip=cfg["flip"])  # (B, C, H, W) scaled latents, (B,)
    n, L = len(indices), model.num_tokens
    y = torch.where(torch.rand(n, generator=g) < cfg["class_dropout"], model.null_class, y)
    order = mask.token_order(n, model.grid_size, model.grid_size, cfg["order"], g, cfg["order_block"])
    draws = n if cfg["split"] == "sample" else 1  # per batch: one S and one split for the whole micro-batch
    num_steps = mask.sample_num_steps(draws, L, cfg["gamma"], g)
    steps = mask.sample_step_ids(torch.ones_like(num_steps) if cfg["transfusion"] else num_steps, L, g)
    steps = steps.expand(n, L).contiguous()  # (B, L)
    if cfg["ar_steps_train"]:  # (drawn above all the same: the stream stays that of a random-S run)
        steps = mask.step_ids_from_sizes(mask.equal_split(cfg["ar_steps_train"], L)).expand(n, L).clone()
    K = cfg["noisy_copies"]
    if cfg["per_step_t"]:  # the t of each slot's AR step, per copy
        t = torch.randint(0, num_timesteps, (n, K, L), generator=g).gather(2, steps[:, None].expand(n, K, L))
        t = t.flatten(1)  # (B, K L)
    else:
        t = torch.randint(0, num_timesteps, (n, K), generator=g)
        t = t[:, 0] if K == 1 else t.repeat_interleave(L, 1)  # (B,) or (B, K L)
    tokens = patchify(x, model.patch_size)  # (B, L, P) in image order
    clean = tokens.gather(1, order[..., None].expand_as(tokens))  # (B, L, P) in AR order
    noise = torch.randn(n, K * L, clean.shape[2], generator=g)  # (B, K L, P)
    batch = dict(clean=clean, noise=noise, t=t, y=y, order=order, steps=steps)
    if tokenizer is not None:
        pick = torch.rand(n, generator=g).tolist()
        captions = [data.captions[i][int(u * len(data.captions[i]))] for i, u in zip(indices.tolist(), pick)]
        batch["text"], batch["text_len"], batch["truncated"] = text_lib.tokenize(tokenizer, captions, cfg["text_len"])
        batch["text_after"] = torch.rand(n, generator=g) >= cfg["text_first"]
    return batch


def forward_losses(train_model, model, diffusion, b, cfg):
    """(loss to minimize, image loss, text loss sum, text tokens): the image loss is the AR-weighted eps MSE over
    every example; a text model adds the next-token loss of the texts that follow their image (mean over their
    tokens, times --text-loss-weight), whose sum and token count are returned apart (None without text).

    The layout is [cond or text | clean | noisy], static from step to step; when every example is one AR step
    (--gamma 0 or --ar-steps-train 1 without text, or --transfusion) no noisy token sees a clean one, so the clean
    ones are left out. With --noisy-copies K the noisy segment is K copies of the image, noised at their own t.
    """
    steps, order, text, K = b["steps"], b["order"], b.get("text"), cfg["noisy_copies"]
    single_step = cfg["gamma"] == 0 or cfg["ar_steps_train"] == 1
    keep_clean = not (cfg["transfusion"] or (single_step and text is None))
    Lx = steps.shape[1] if keep_clean else 0
    attn_mask = mask.causal_mask(steps[:, :Lx], steps, model.num_cond_tokens, b.get("text_len"), b.get("text_after"),
                                 cfg["transfusion"], model.time_token, K)  # (B, T, T)
    def copies(a):  # (B, L, ...) -> (B, K L, ...); no copy for K = 1, the hot path
        return a if K == 1 else a.repeat(1, K, *[1] * (a.dim() - 2))
    xt = diffusion.q_sample(copies(b["clean"]), b["t"], b["noise"])  # (B, K L, P)
    out = train_model(b["clean"][:, :Lx], xt, b["t"], b["y"], copies(order), attn_mask, clean_pos=order[:, :Lx],
                      text=text)
    eps, logits = (out, None) if text is None else out
    image_loss = diffusion.eps_loss(eps, b["noise"], copies(mask.ar_weights(steps, cfg["ar_lambda"])))
    if text is None:
        return image_loss, image_loss, None, None
    positions = torch.arange(1, text.shape[1], device=text.device)
    counted = (positions < b["text_len"][:, None]) & b["text_after"][:, None]  # (B, Lt - 1) targets of captions
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), text[:, 1:], reduction="none")  # (B, Lt - 1)
    text_sum, text_count = (nll * counted).sum(), counted.sum()
    return image_loss + cfg["text_loss_weight"] * text_sum / text_count.clamp(min=1), image_loss, text_sum, text_count


@torch.no_grad()
def ema_update(ema, model, decay):
    """ema = decay * ema + (1 - decay) * model, over all parameters in one foreach kernel per dtype/device."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)


def save_checkpoint(ckpt, out, numbered):
    """torch.save to a temporary file, fsync, rename: a kill at any moment leaves the previous file whole."""
    for name in ["ckpt.pt"] + ([f"ckpt_{ckpt['step']:07d}.pt"] if numbered else []):
        path = os.path.join(out, name)
        with open(path + ".tmp", "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
    fd = os.open(out, os.O_RDONLY)  # make the renames durable too
    os.fsync(fd)
    os.close(fd)


def load_checkpoint(path, model_config, data_info, tokenizer):
    """OUT/ckpt.pt, refused with the differences if its model, latent format or tokenizer is not this run's."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    data_keys = ("vae", "scale_factor", "latent_shape", "num_classes")  # what the weights depend on
    for what, theirs, ours, keys in (("data", ckpt["data"], data_info, data_keys),
                                     ("model", ckpt["model_config"], model_config, model_config)):
        diff = {k: (theirs.get(k), ours[k]) for k in keys if theirs.get(k) != ours[k]}
        if diff:
            raise ValueError(f"--resume: {path} was trained with another {what} configuration; (checkpoint, this "
                             f"run): {diff}. Resume with the original options, or use a new --out.")
    if tokenizer is not None:
        theirs, ours = ckpt.get("tokenizer", {}), tokenizer.state()
        if (theirs.get("kind"), theirs.get("sha256")) != (ours["kind"], ours.get("sha256")):
            raise ValueError(f"--resume: {path} was trained with another tokenizer (checkpoint: {theirs.get('kind')} "
                             f"{theirs.get('sha256', '')}, this run: {ours['kind']} {ours.get('sha256', '')}); pass "
                             f"the original --tokenizer")
    return ckpt


@torch.no_grad()
def sample_latents(ema, cfg, device, seed, labels=None, texts=None, tokenizer=None):
    """EMA samples in diffusion mode (1 AR step) of labels (N,), or of texts (N strings) for a text model:
    scaled latent tokens (N, L, P), image order."""
    g = torch.Generator(device).manual_seed(seed)
    n = len(labels) if texts is None else len(texts)
    order = torch.arange(ema.num_tokens, device=device).expand(n, -1)  # (N, L)
    text = lengths = None
    if texts is not None:
        text, lengths, _ = text_lib.tokenize(tokenizer, texts, ema.num_cond_tokens)
        text, lengths, labels = text.to(device), lengths.to(device), None
    return generate(ema, Diffusion(cfg["sample_steps"]), None if labels is None else labels.to(device),
                    [ema.num_tokens], order, g, cfg_scale=cfg["cfg_scale"], text=text, text_lengths=lengths)


def main(argv=None):
    cfg = dict(config)
    parse_config(cfg, argv)
    return launch(cfg, train)


def launch(cfg, run):
    """run(cfg, rank, world, device) on --device (under torchrun: cuda:LOCAL_RANK, in the process group)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(cfg["device"] or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")  # TF32 matmuls
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        return run(cfg, rank, world, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def open_data(cfg, rank):
    """LatentData of --data, or the demo's (built under OUT/data), and the tokenizer if it holds captions."""
    if cfg["demo"] not in ("classes", "captions"):
        raise ValueError(f"--demo must be classes or captions, got {cfg['demo']!r}")
    root, size = os.path.join(cfg["out"], "data"), cfg["demo_image_size"]
    if cfg["data"]:
        data_dir = cfg["data"]
    elif cfg["demo"] == "classes":
        data_dir = shapes.build_demo_data(root, size, cfg["demo_per_class"], cfg["seed"], rank)
    else:
        data_dir = shapes.build_caption_demo_data(root, size, cfg["demo_images"], cfg["seed"], rank)
    data = LatentData(data_dir)
    c, h, w = data.latent_shape
    if h != w or len(data) < cfg["batch_size"]:
        raise ValueError(f"--data {data_dir}: need square latents and at least --batch-size ({cfg['batch_size']}) "
                         f"samples, got latents {data.latent_shape} and {len(data)} samples")
    if cfg["text_len"] < 2:
        raise ValueError(f"--text-len must hold at least BOS and EOS (2), got {cfg['text_len']}")
    tokenizer = text_lib.build_tokenizer(cfg["tokenizer"]) if data.captions is not None else None
    return data_dir, data, tokenizer


def check_options(cfg, world, device):
    """Raise a ValueError naming the option for a combination training cannot run; returns the autocast dtype."""
    dtype = cfg["dtype"] or ("bf16" if device.type == "cuda" else "fp32")
    if dtype not in ("bf16", "fp32") or cfg["batch_size"] % (world * cfg["grad_accum"]):
        raise ValueError(f"need --dtype bf16 or fp32 (got {dtype!r}) and --batch-size ({cfg['batch_size']}) "
                         f"divisible by ranks x --grad-accum ({world} x {cfg['grad_accum']})")
    if cfg["split"] not in ("sample", "batch"):
        raise ValueError(f"--split must be sample or batch, got {cfg['split']!r}")
    if cfg["noisy_copies"] < 1 or (cfg["time_token"] and (cfg["per_step_t"] or cfg["noisy_copies"] > 1)):
        raise ValueError(f"--noisy-copies must be >= 1 (got {cfg['noisy_copies']}), and --time-token (one timestep "
                         f"per image) goes with neither --per-step-t nor --noisy-copies > 1")
    return dtype


def build_model(cfg, data, tokenizer, device):
    """The model for the data (a text model for captions), its EMA copy, trainable parameters and AdamW."""
    c, h, w = data.latent_shape
    if tokenizer is not None and (cfg["noisy_copies"] > 1 or cfg["time_token"]):
        raise ValueError(f"--data {cfg['data'] or 'the captioned demo'} holds captions: --noisy-copies and "
                         f"--time-token (Tables 1 and 7) are ablations of the class-conditional model")
    text_options = {} if tokenizer is None else dict(text_vocab=tokenizer.vocab_size, text_len=cfg["text_len"],
                                                     text_sees_noisy=cfg["transfusion"])
    torch.manual_seed(cfg["seed"])
    model = CausalFusion(cfg["size"], input_size=h, patch_size=cfg["patch_size"], in_channels=c,
                         num_classes=data.num_classes, num_cond_tokens=cfg["num_cond_tokens"],
                         cond_repeat=cfg["cond_repeat"], learn_pos=cfg["learn_pos"], qk_norm=cfg["qk_norm"],
                         time_token=cfg["time_token"], **text_options).to(device)
    model.grad_checkpointing = cfg["grad_checkpointing"]
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg["lr"], betas=cfg["betas"], weight_decay=cfg["weight_decay"],
                                  eps=cfg["adam_eps"], fused=device.type == "cuda")
    return model, ema, params, optimizer


def save_sample_grid(ema, cfg, data, tokenizer, vae, device, autocast, path):
    """EMA samples in a grid: one row per class evenly spaced over the classes, or for a text model one row per
    caption (the first captions of evenly spaced training images), labelled with it."""
    rows, cols = cfg["grid_classes"], cfg["grid_per_class"]
    if tokenizer is None:
        classes = torch.linspace(0, data.num_classes - 1, min(rows, data.num_classes)).round().long()
        prompts, kwargs = None, dict(labels=classes.repeat_interleave(cols))
    else:
        prompts = [data.captions[int(i)][0] for i in torch.linspace(0, len(data) - 1, rows).round().long()]
        kwargs = dict(texts=[p for p in prompts for _ in range(cols)], tokenizer=tokenizer)
    with autocast:
        tokens = sample_latents(ema, cfg, device, cfg["seed"], **kwargs)
    images = tokens_to_images(tokens, ema, vae, data.scale_factor)  # (N, H, W, 3) uint8
    zoom = max(1, 64 // images.shape[1])  # show small images at 64 px or more
    captions = None if prompts is None else [p if j == 0 else "" for p in prompts for j in range(cols)]
    save_grid(images.repeat(zoom, 1).repeat(zoom, 2), path, ncol=cols, captions=captions)


def train(cfg, rank, world, device):
    out, micro = cfg["out"], world * cfg["grad_accum"]
    dtype = check_options(cfg, world, device)
    ckpt_path = os.path.join(out, "ckpt.pt")
    if os.path.exists(ckpt_path) and not cfg["resume"]:
        raise FileExistsError(f"{ckpt_path} exists: pass --resume to continue that run, or choose another --out")
    os.makedirs(out, exist_ok=True)
    log_path = os.path.join(out, "train.log")

    def log(msg):
        if rank == 0:
            print(msg, flush=True)
            with open(log_path, "a") as f:
                f.write(msg + "\n")

    data_dir, data, tokenizer = open_data(cfg, rank)
    data_info = {"vae": data.vae, "vae_ckpt": data.meta.get("vae_ckpt"), "scale_factor": data.scale_factor,
                 "latent_shape": list(data.latent_shape), "image_size": data.meta["image_size"],
                 "num_classes": data.num_classes, "class_names": data.class_names}
    model, ema, params, optimizer = build_model(cfg, data, tokenizer, device)
    step = 0
    if cfg["resume"]:
        ckpt = load_checkpoint(ckpt_path, model.config, data_info, tokenizer)
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"]["torch"])  # training draws are keyed by (seed, step); this is the rest
        step = ckpt["step"]
        was = ckpt["config"]
        changed = {k: (was.get(k), v) for k, v in cfg.items() if k != "resume" and was.get(k) != v}
        log(f"resuming {ckpt_path} at step {step}; options changed since (was, now): {changed}")
    vae = build_vae(data.vae, data_info["vae_ckpt"], device=device) if rank == 0 else None  # fail early
    train_model = torch.compile(model) if cfg["compile"] else model
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")
    diffusion = Diffusion()
    L, micro_size = model.num_tokens, cfg["batch_size"] // micro
    log(f"config: {json.dumps(cfg)}")
    what = (f"{len(data)} images with {sum(map(len, data.captions))} captions ({tokenizer.kind} tokenizer, "
            f"{tokenizer.vocab_size} ids, {cfg['text_len']} text tokens)" if tokenizer else
            f"{len(data)} samples of {data.num_classes} classes")
    log(f"data: {data_dir}: {what}, latents {data.latent_shape} ({data.vae}); model: "
        f"{sum(p.numel() for p in params) / 1e6:.2f}M trainable parameters, {L} tokens; "
        f"{world} rank(s) x {cfg['grad_accum']} micro-batch(es) of {micro_size} on {device} ({dtype})")

    def checkpoint():
        if rank == 0:
            extra = {} if tokenizer is None else {"tokenizer": tokenizer.state()}
            save_checkpoint({"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                             "step": step, "config": cfg, "model_config": model.config, "data": data_info,
                             "rng": {"torch": torch.get_rng_state()}, **extra},
                            out, cfg["keep_every"] and step % cfg["keep_every"] == 0)

    def read_stats():
        """Move the steps' device-side (image loss, text loss sum, text tokens, grad norm) to the host: the loop's
        only device sync, at log and checkpoint steps. Non-finite values stop the run before the checkpoint
        could save them."""
        values = torch.stack(pending)  # (steps, 4): summed micro-batch losses of this rank, grad norm
        if world > 1:
            dist.all_reduce(values)  # the grad norm is the same on every rank: divide it back
        values = (values / torch.tensor([micro, 1, 1, world], device=device)).tolist()
        first = step - len(pending) + 1
        pending.clear()
        for i, (loss_value, text_sum, text_count, norm_value) in enumerate(values):
            if not all(map(math.isfinite, (loss_value, text_sum, norm_value))):
                raise FloatingPointError(f"step {first + i}: non-finite loss {loss_value}, text loss sum {text_sum} or "
                                         f"grad norm {norm_value}; stopped without saving, {ckpt_path} keeps the last "
                                         f"good state")
            losses.append(loss_value)
            text_losses.append((text_sum, text_count))
        return norm_value

    losses, text_losses, pending, timer, t_start, captions_cut, captions_seen = [], [], [], 0.0, time.time(), 0, 0
    pin = device.type == "cuda"  # page-locked host memory: the copies to the GPU run asynchronously
    zero = torch.zeros((), device=device)
    while step < cfg["max_steps"]:
        t0 = time.time()
        lr = cfg["lr"] * min(1.0, (step + 1) / cfg["warmup_steps"]) if cfg["warmup_steps"] else cfg["lr"]
        for group in optimizer.param_groups:
            group["lr"] = lr
        indices = step_indices(step, cfg["batch_size"], len(data), cfg["seed"])
        sums = torch.zeros(3, device=device)  # image loss, text loss sum, text tokens
        for a in range(cfg["grad_accum"]):
            m = rank * cfg["grad_accum"] + a  # this micro-batch's place in the global batch
            batch = draw_micro_batch(data, model, indices[m * micro_size:(m + 1) * micro_size],
                                     seeded(cfg["seed"], 1, step, m), cfg, diffusion.num_timesteps, tokenizer)
            captions_cut += batch.pop("truncated", 0)
            captions_seen += micro_size if tokenizer else 0
            b = {k: (x.pin_memory() if pin else x).to(device, non_blocking=True) for k, x in batch.items()}
            last = a == cfg["grad_accum"] - 1
            with contextlib.nullcontext() if world == 1 or last else train_model.no_sync():  # sync at the last
                with autocast:
                    loss, image_loss, text_sum, text_count = forward_losses(train_model, model, diffusion, b, cfg)
                (loss / cfg["grad_accum"]).backward()
            sums += torch.stack([image_loss.detach(), zero if text_sum is None else text_sum.detach(),
                                 zero if text_count is None else text_count.float()])
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"] or float("inf"))
        pending.append(torch.cat([sums, grad_norm.float()[None]]))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema_update(ema, model, min(cfg["ema_decay"], (1 + step) / (10 + step)))
        step += 1
        log_now = step % cfg["log_every"] == 0 or step == cfg["max_steps"]
        if log_now or step % cfg["ckpt_every"] == 0:
            norm_value = read_stats()
        timer += time.time() - t0
        if log_now:
            n_steps = min(cfg["log_every"], len(losses))
            rate = n_steps / timer
            mem = (torch.cuda.max_memory_allocated() if device.type == "cuda"
                   else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 1e9  # peak RSS on cpu
            text = ""
            if tokenizer is not None:
                text_sum, text_count = map(sum, zip(*text_losses[-n_steps:]))
                text = (f" | text loss {text_sum / max(text_count, 1):.4f} | captions cut {captions_cut}/"
                        f"{captions_seen}")
            log(f"step {step} | {'image loss' if tokenizer else 'loss'} {sum(losses[-n_steps:]) / n_steps:.6f}{text} | "
                f"lr {lr:.1e} | grad norm {norm_value:.3f} | {rate:.2f} steps/s | {rate * cfg['batch_size']:.0f} img/s | "
                f"{rate * cfg['batch_size'] * L:.0f} tok/s | mem {mem:.2f} GB")  # tok: latent tokens
            timer = 0.0
        if step % cfg["ckpt_every"] == 0 or step == cfg["max_steps"]:
            checkpoint()
        if rank == 0 and cfg["grid_classes"] and cfg["grid_per_class"] and (
                (cfg["sample_every"] and step % cfg["sample_every"] == 0) or step == cfg["max_steps"]):
            path = os.path.join(out, f"samples_{step:07d}.png")
            save_sample_grid(ema, cfg, data, tokenizer, vae, device, autocast, path)
            log(f"step {step} | EMA samples: {path}")
    summary = {"step": step, "losses": losses, "seconds": time.time() - t_start}
    if rank == 0 and cfg["eval_per_class"] and data.vae == "none":
        if tokenizer is None:
            summary.update(evaluate_class_demo(ema, cfg, data, device, autocast, log))
        elif not cfg["data"]:
            summary.update(evaluate_caption_demo(ema, cfg, data, tokenizer, vae, device, autocast, log))
    return summary


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError, ImportError) as e:  # bad options, files, data or a missing optional package
        sys.exit(f"train.py: error: {e}")
