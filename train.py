"""Train CausalFusion on the latents of extract_latents.py (paper Sec. 3-5, App. C; SPEC.md Sec. 3, 4, 6).

    python train.py                                              # the demo: built-in shapes, tiny model, CPU
    python train.py --data latents/in256_sd --size L --out runs/L ...               # one GPU
    torchrun --nproc_per_node=8 train.py --data latents/in256_sd --size L ...      # DDP over 8 GPUs

A step: the global batch is cut into micro-batches (ranks x grad_accum). Each draws latents (posterior sample,
random flip), drops labels to the null class, draws a token order, an AR split and timesteps, and takes the
AR-weighted eps-MSE over the static layout [cond | all L clean tokens | all L noisy tokens].
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
from PIL import Image, ImageDraw

import mask
from config import parse_config
from diffusion import Diffusion
from extract_latents import LatentData, extract
from model import CausalFusion, patchify, unpatchify
from sample import generate, save_grid, tokens_to_images
from vae import build_vae

# The defaults are the CPU demo's (`python train.py`); the paper's recipes are commands in the README.
config = dict(
    data="",  # extraction dir of extract_latents.py; "" = the demo: build the shapes data set under OUT/data
    out="out/demo",  # run dir: ckpt.pt (latest), ckpt_<step>.pt, train.log, samples_<step>.png
    resume=False,  # continue OUT/ckpt.pt exactly (step, weights, optimizer, EMA, data order)
    seed=0,  # seeds the weights and every random draw of training
    # model (model.py)
    size="T",  # T (tiny), S, B, L, XL or H
    patch_size=4,  # latent pixels per token side (paper: 2 on SD 32x32 latents, 1 on MAR 16x16 latents)
    num_cond_tokens=4,  # class tokens (paper: 4 for ablations, 64 system-level)
    cond_repeat=1,  # the class tokens are num_cond_tokens / cond_repeat unique ones, repeated (App. B)
    learn_pos=False,  # learnable position embedding initialized from sin-cos (paper: system-level)
    # CausalFusion training choices (paper Sec. 5, App. B)
    gamma=0.9,  # AR-step decay: P(S = k) ~ gamma^(k-1); 0 = in-context DiT, 1 = uniform
    ar_lambda=2.0,  # loss weight of the first AR step, decaying linearly to 1 (Table 3c)
    order="random",  # token order: random, raster or block_raster (Table 3b)
    per_step_t=False,  # one diffusion timestep per AR step instead of one per image (App. B, Table 7)
    class_dropout=0.1,  # probability of the null class, for classifier-free guidance
    # optimization (App. C)
    batch_size=16,  # global batch, split over ranks and micro-batches (paper: 2048)
    grad_accum=1,  # micro-batches per rank per step: a big global batch on few GPUs
    max_steps=4000,  # training steps
    lr=2e-3,  # AdamW learning rate after warmup (paper: 1e-4 at batch 2048)
    betas=(0.9, 0.95),  # AdamW betas
    weight_decay=0.0,  # AdamW weight decay
    warmup_steps=100,  # linear lr warmup, then constant (paper: 40 epochs)
    grad_clip=1.0,  # max global grad norm (0 = no clipping)
    ema_decay=0.999,  # EMA of the weights, warmed up as min(ema_decay, (1 + step) / (10 + step)) (DiT: 0.9999)
    # logging, checkpoints, samples
    log_every=200,  # steps between log lines
    ckpt_every=1000,  # steps between writes of OUT/ckpt.pt (and at the end)
    keep_every=0,  # steps between numbered copies OUT/ckpt_<step>.pt (0 = none)
    sample_every=2000,  # steps between sample grids (and at the end; 0 = only at the end)
    grid_classes=10,  # rows of the grid: classes evenly spaced over all classes
    grid_per_class=10,  # columns of the grid
    sample_steps=100,  # DDPM steps of the grid and evaluation samples (paper: 250)
    cfg_scale=3.0,  # classifier-free guidance scale of those samples (1 = none)
    eval_per_class=10,  # at the end, pixel-space data only: samples per class for the nearest-neighbour class
    # accuracy (0 = skip)
    # the demo data set (--data "")
    demo_image_size=16,  # pixels per side
    demo_per_class=100,  # training images per class (10 classes)
    # system
    device="",  # "" = cuda if available, else cpu
    dtype="",  # autocast dtype: bf16 or fp32; "" = bf16 on cuda, fp32 on cpu
    compile=False,  # torch.compile the model
    grad_checkpointing=False,  # recompute block activations in the backward pass: less memory, ~30% slower
)


# ------------------------------------------------------------------------------------------ demo data
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


def build_demo_data(root, size, per_class, seed, rank):
    """Write the shapes as an ImageFolder under root/images (rank 0) and extract them (pixel space) into
    root/latents; returns that directory."""
    if rank == 0:
        images, labels = draw_shapes(per_class, size, seed)
        for i, (image, label) in enumerate(zip(images, labels)):
            folder = os.path.join(root, "images", f"{label}_{list(SHAPES)[label]}")
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(image).save(os.path.join(folder, f"{i:05d}.png"))
    if dist.is_initialized():
        dist.barrier()
    extract(os.path.join(root, "images"), os.path.join(root, "latents"), vae="none", image_size=size,
            batch_size=256, num_workers=0, device="cpu", overwrite=True)
    return os.path.join(root, "latents")


def nearest_neighbour_accuracy(samples, labels, data):
    """Share of samples (N, C, H, W) (unscaled latents; pixels in [-1, 1] for --vae none) whose nearest
    training latent (L2, either flip) has their class. No network needed; chance is ~1 / num_classes."""
    train = np.concatenate([shard[:, :, 0] for shard in data.shards])  # (N, 2 flips, C, H, W), unscaled
    train = torch.from_numpy(train).float().flatten(2).flatten(0, 1)  # (2N, C*H*W)
    nearest = torch.cdist(samples.float().flatten(1), train).argmin(1) // 2  # index of the training image
    return (data.labels[nearest] == labels).float().mean().item()


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


def draw_micro_batch(data, model, indices, g, cfg, num_timesteps):
    """One micro-batch, in AR order: clean tokens (B, L, P), noise (B, L, P), t (B,) or (B, L), labels (B,),
    order (B, L) (the image position of each AR slot) and step ids (B, L)."""
    x, y = data.batch(indices, g)  # (B, C, H, W) scaled latents, (B,)
    n, L = len(indices), model.num_tokens
    y = torch.where(torch.rand(n, generator=g) < cfg["class_dropout"], model.null_class, y)
    order = mask.token_order(n, model.grid_size, model.grid_size, cfg["order"], g)
    steps = mask.sample_step_ids(mask.sample_num_steps(n, L, cfg["gamma"], g), L, g)
    if cfg["per_step_t"]:
        t = torch.randint(0, num_timesteps, (n, L), generator=g).gather(1, steps)  # t of each slot's AR step
    else:
        t = torch.randint(0, num_timesteps, (n,), generator=g)
    tokens = patchify(x, model.patch_size)  # (B, L, P) in image order
    clean = tokens.gather(1, order[..., None].expand_as(tokens))  # (B, L, P) in AR order
    return clean, torch.randn(clean.shape, generator=g), t, y, order, steps


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


def load_checkpoint(path, model_config, data_info):
    """OUT/ckpt.pt, refused with the differences if its model or latent format is not this run's."""
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
    return ckpt


@torch.no_grad()
def sample_latents(ema, labels, cfg, device, seed):
    """EMA samples of labels (N,) in diffusion mode (1 AR step): scaled latent tokens (N, L, P), image order."""
    g = torch.Generator(device).manual_seed(seed)
    order = torch.arange(ema.num_tokens, device=device).expand(len(labels), -1)  # (N, L)
    return generate(ema, Diffusion(cfg["sample_steps"]), labels.to(device), [ema.num_tokens], order, g,
                    cfg_scale=cfg["cfg_scale"])


def main(argv=None):
    cfg = dict(config)
    parse_config(cfg, argv)
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
        return train(cfg, rank, world, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def train(cfg, rank, world, device):
    out, micro = cfg["out"], world * cfg["grad_accum"]
    dtype = cfg["dtype"] or ("bf16" if device.type == "cuda" else "fp32")
    if dtype not in ("bf16", "fp32") or cfg["batch_size"] % micro:
        raise ValueError(f"need --dtype bf16 or fp32 (got {dtype!r}) and --batch-size ({cfg['batch_size']}) "
                         f"divisible by ranks x --grad-accum ({world} x {cfg['grad_accum']})")
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

    data_dir = cfg["data"] or build_demo_data(os.path.join(out, "data"), cfg["demo_image_size"],
                                              cfg["demo_per_class"], cfg["seed"], rank)
    data = LatentData(data_dir)
    c, h, w = data.latent_shape
    if h != w or len(data) < cfg["batch_size"]:
        raise ValueError(f"--data {data_dir}: need square latents and at least --batch-size ({cfg['batch_size']}) "
                         f"samples, got latents {data.latent_shape} and {len(data)} samples")
    data_info = {"vae": data.vae, "vae_ckpt": data.meta.get("vae_ckpt"), "scale_factor": data.scale_factor,
                 "latent_shape": list(data.latent_shape), "image_size": data.meta["image_size"],
                 "num_classes": data.num_classes, "class_names": data.class_names}

    torch.manual_seed(cfg["seed"])
    model = CausalFusion(cfg["size"], input_size=h, patch_size=cfg["patch_size"], in_channels=c,
                         num_classes=data.num_classes, num_cond_tokens=cfg["num_cond_tokens"],
                         cond_repeat=cfg["cond_repeat"], learn_pos=cfg["learn_pos"]).to(device)
    model.grad_checkpointing = cfg["grad_checkpointing"]
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg["lr"], betas=cfg["betas"], weight_decay=cfg["weight_decay"],
                                  fused=device.type == "cuda")
    step = 0
    if cfg["resume"]:
        ckpt = load_checkpoint(ckpt_path, model.config, data_info)
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
    log(f"data: {data_dir}: {len(data)} samples of {data.num_classes} classes, latents {data.latent_shape} "
        f"({data.vae}); model: {sum(p.numel() for p in params) / 1e6:.2f}M trainable parameters, {L} tokens; "
        f"{world} rank(s) x {cfg['grad_accum']} micro-batch(es) of {micro_size} on {device} ({dtype})")

    def checkpoint():
        if rank == 0:
            save_checkpoint({"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                             "step": step, "config": cfg, "model_config": model.config, "data": data_info,
                             "rng": {"torch": torch.get_rng_state()}},
                            out, cfg["keep_every"] and step % cfg["keep_every"] == 0)

    def sample_grid():
        classes = torch.linspace(0, data.num_classes - 1, min(cfg["grid_classes"], data.num_classes)).round().long()
        labels = classes.repeat_interleave(cfg["grid_per_class"])  # one row per class
        with autocast:
            tokens = sample_latents(ema, labels, cfg, device, cfg["seed"])
        images = tokens_to_images(tokens, ema, vae, data.scale_factor)  # (N, H, W, 3) uint8
        zoom = max(1, 64 // images.shape[1])  # show small images at 64 px or more
        path = os.path.join(out, f"samples_{step:07d}.png")
        save_grid(images.repeat(zoom, 1).repeat(zoom, 2), path, ncol=cfg["grid_per_class"])
        log(f"step {step} | EMA samples: {path}")

    def read_stats():
        """Move the steps' device-side (loss, grad norm) to the host: the loop's only device sync, at log and
        checkpoint steps. Non-finite values stop the run before the checkpoint could save them."""
        values = torch.stack(pending)  # (steps, 2): summed micro-batch loss of this rank, grad norm
        if world > 1:
            dist.all_reduce(values)  # the grad norm is the same on every rank: divide it back
        values = (values / torch.tensor([micro, world], device=device)).tolist()
        first = step - len(pending) + 1
        pending.clear()
        for i, (loss_value, norm_value) in enumerate(values):
            if not math.isfinite(loss_value) or not math.isfinite(norm_value):
                raise FloatingPointError(f"step {first + i}: non-finite loss {loss_value} or grad norm {norm_value}; "
                                         f"stopped without saving, {ckpt_path} keeps the last good state")
            losses.append(loss_value)
        return norm_value

    losses, pending, timer, t_start = [], [], 0.0, time.time()
    pin = device.type == "cuda"  # page-locked host memory: the copies to the GPU run asynchronously
    while step < cfg["max_steps"]:
        t0 = time.time()
        lr = cfg["lr"] * min(1.0, (step + 1) / cfg["warmup_steps"]) if cfg["warmup_steps"] else cfg["lr"]
        for group in optimizer.param_groups:
            group["lr"] = lr
        indices = step_indices(step, cfg["batch_size"], len(data), cfg["seed"])
        loss_sum = torch.zeros((), device=device)
        for a in range(cfg["grad_accum"]):
            m = rank * cfg["grad_accum"] + a  # this micro-batch's place in the global batch
            batch = draw_micro_batch(data, model, indices[m * micro_size:(m + 1) * micro_size],
                                     seeded(cfg["seed"], 1, step, m), cfg, diffusion.num_timesteps)
            clean, noise, t, y, order, steps = ((x.pin_memory() if pin else x).to(device, non_blocking=True)
                                                for x in batch)
            last = a == cfg["grad_accum"] - 1
            weights = mask.ar_weights(steps, cfg["ar_lambda"])  # (B, L)
            attn_mask = mask.causal_mask(steps, steps, model.num_cond_tokens)  # (B, T, T), static layout
            with contextlib.nullcontext() if world == 1 or last else train_model.no_sync():  # sync at the last
                with autocast:
                    loss = diffusion.training_loss(train_model, clean, t, noise, weights, y=y, pos=order,
                                                   attn_mask=attn_mask)
                (loss / cfg["grad_accum"]).backward()
            loss_sum += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"] or float("inf"))
        pending.append(torch.stack([loss_sum, grad_norm.float()]))
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
            log(f"step {step} | loss {sum(losses[-n_steps:]) / n_steps:.6f} | lr {lr:.1e} | grad norm "
                f"{norm_value:.3f} | {rate:.2f} steps/s | {rate * cfg['batch_size']:.0f} img/s | "
                f"{rate * cfg['batch_size'] * L:.0f} tok/s | mem {mem:.2f} GB")  # tok: latent tokens
            timer = 0.0
        if step % cfg["ckpt_every"] == 0 or step == cfg["max_steps"]:
            checkpoint()
        if rank == 0 and ((cfg["sample_every"] and step % cfg["sample_every"] == 0) or step == cfg["max_steps"]):
            sample_grid()
    summary = {"step": step, "losses": losses, "seconds": time.time() - t_start}
    if rank == 0 and cfg["eval_per_class"] and data.vae == "none":
        labels = torch.arange(data.num_classes).repeat_interleave(cfg["eval_per_class"])
        with autocast:
            tokens = sample_latents(ema, labels, cfg, device, cfg["seed"] + 1)
        samples = unpatchify(tokens.float().cpu(), model.patch_size, h, w) / data.scale_factor  # (N, C, H, W)
        summary["nn_accuracy"] = nearest_neighbour_accuracy(samples, labels, data)
        log(f"step {step} | nearest-neighbour class accuracy of {len(labels)} EMA samples: "
            f"{summary['nn_accuracy']:.3f} (chance {1 / data.num_classes:.3f})")
        if not cfg["data"]:  # the demo: the same figure for fresh real images is the ceiling
            real, real_labels = draw_shapes(cfg["eval_per_class"], h, cfg["seed"] + 1)
            real = torch.from_numpy(real).permute(0, 3, 1, 2).float() / 127.5 - 1  # (N, 3, H, W) in [-1, 1]
            summary["nn_accuracy_real"] = nearest_neighbour_accuracy(real, torch.from_numpy(real_labels), data)
            log(f"step {step} | the same for {len(real)} fresh real images: {summary['nn_accuracy_real']:.3f}")
    return summary


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:  # bad options, files or data: the message names them
        sys.exit(f"train.py: error: {e}")
