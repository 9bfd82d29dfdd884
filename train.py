"""Train CausalFusion on the latents of extract_latents.py (paper Sec. 3-5, App. B-C).

    python train.py                                                     # the demo: built-in shapes, tiny model, CPU
    python train.py configs/demo_captions.py                            # the captioned demo (docs/multimodal.md)
    python train.py configs/in256_L2_ablation.py --data latents/in256_sd                 # a run of the paper, 1 GPU
    torchrun --nproc_per_node=8 train.py configs/in256_XL1.py --data latents/in256_mar    # DDP over 8 GPUs
    torchrun --nproc_per_node=8 train.py configs/in256_XL1.py --data latents/in256_mar --lr 2e-4   # and overrides

The defaults below are the CPU demo's; a run on real data (--data) starts from a recipe of configs/, one per run
of the paper, its values then overridden by any --key value. A step: the global batch (--batch-size) is cut into
micro-batches of --device-batch-size images, ranks x accumulation of them; each one's draws and losses are
train_step.py's (the paper's objective, or --objective flow, over the static layout [prefix | all L clean tokens |
all L noisy tokens]; captioned data trains the multimodal model of paper Sec. 6). Randomness: micro-batch m of step
s draws from a generator seeded by (seed, s, m), and epoch e's data order from one seeded by (seed, e). So resuming
needs no generator state to continue exactly, and 2 ranks x 1 micro-batch compute the same step as 1 rank x 2
accumulated micro-batches.

What a run writes into --out: train.log, metrics.jsonl (one JSON record per log line and per evaluation, the
curves of train_monitor.py, OUT/curves.png at each checkpoint; also to TensorBoard or W&B with --tensorboard, --wandb),
checkpoints and sample grids. --eval-every N measures FID (fid.py) of EMA samples during training.
"""
import contextlib
import functools
import json
import os
import sys
import time

import torch

import demos
import tokenization
from checkpoint import check_resumable, init_from, read_checkpoint, save_checkpoint
from diffusion import Objective
from inference import make_diffusion, sample_latents, tokens_to_images
from images import GRID_PIXELS, save_grid
from latents import LatentData
from model import CausalFusion
from runtime import (SEED_TRAIN_STEP, ConfigError, autocast, autocast_dtype, launch, micro_batches, parse_config,
                     seeded, step_indices)
from train_monitor import (Metrics, RunLog, evaluate_fid, fid_line, fid_record, log_line, log_record, prepare_fid,
                           read_step_stats)
from train_step import StepOptions, build_model, draw_micro_batch, ema_update, forward_losses
from vae import build_vae

# The defaults are the CPU demo's (`python train.py`); the paper's runs are the recipes of configs/.
config = dict(
    data="",  # extraction dir of extract_latents.py; "" = the demo: build the shapes data set under OUT/data
    out="out/demo",  # run dir: ckpt.pt (latest), ckpt_<step>.pt, train.log, samples_<step>.png
    resume=False,  # continue OUT/ckpt.pt exactly (step, weights, optimizer, EMA, data order)
    init_from="",  # a new run (step 0, new optimizer and EMA) from a train.py or authors' checkpoint's weights
    init_weights="ema",  # --init-from: its ema or model weights
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
    split_per="sample",  # AR split drawn per sample, or per batch (one S and one split per micro-batch, the authors')
    per_step_t=False,  # one diffusion timestep per AR step instead of one per image (App. B, Table 7)
    noisy_copies=1,  # K noisy copies per image at K timesteps sharing its clean tokens (Table 7's K x t rows)
    class_dropout=0.1,  # probability of the null class, for classifier-free guidance
    flip=True,  # random horizontal flips (paper); false for captions that name left and right
    # the objective (diffusion.py; docs/flow.md): the paper's is eps, uniform, none
    objective="eps",  # eps: the paper's eps-prediction on the 1000-step linear schedule; flow: flow matching,
      # x_t = (1 - t) x0 + t eps, velocity v = eps - x0 (recorded in the checkpoint: the samplers follow it)
    timestep_sampling="uniform",  # training's timesteps: uniform, or logit-normal (SD3's; eps: floor(1000 t))
    logit_mean=0.0,  # --timestep-sampling logit-normal: t = sigmoid(n), n ~ N(logit_mean, logit_std^2)
    logit_std=1.0,  # its standard deviation
    loss_weighting="none",  # none, or min-snr: the AR loss weights times min-SNR-gamma weights (Hang et al. 2023)
    snr_gamma=5.0,  # --loss-weighting min-snr: its gamma
    # multimodal model (paper Sec. 6, Table 11): trained when --data holds captions (metadata.jsonl)
    tokenizer="",  # "" = byte-level UTF-8; PATH = LLaMA-3's tokenizer.model (needs `pip install tiktoken`)
    learn_tokenizer=0,  # > 0: instead, a byte-level BPE of <= this many ids learned from the captions (needs
      # `pip install tokenizers`)
    text_len=35,  # text tokens per example, BOS and EOS included (paper: 35); longer captions are cut, counted
    text_first=0.9,  # share of examples with the text first (text-to-image); the rest caption their image
    text_loss_weight=0.01,  # weight of the captioning next-token loss, against the image loss
    transfusion=False,  # the paper's baseline (Table 6a): single-step diffusion, captions see the noisy image
    # optimization (App. C)
    batch_size=16,  # global batch, split over ranks and micro-batches (paper: 2048)
    device_batch_size=0,  # images per micro-batch on one GPU; a step accumulates batch_size / (device_batch_size x
      # ranks) of them, the same update (0 = batch_size / ranks, no accumulation)
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
    grid_every=0,  # steps between sample grids (and at the end; 0 = only at the end)
    grid_classes=10,  # rows of the grid: classes evenly spaced over all classes (text: captions); 0 = no grid
    grid_per_class=10,  # columns of the grid
    grid_steps=100,  # sampler steps per AR step of the grids and the demos' scores (0 = the sampler's default)
    grid_sampler="",  # their sampler, as sample.py --sampler ("" = the objective's default: eps ddpm, the paper's;
      # flow euler)
    eta=0.0,  # a ddim sampler's noise (grids and --eval-every), 0 (deterministic) to 1
    spacing="",  # the timesteps the fast samplers visit: uniform, trailing or logsnr ("" = the sampler's default)
    cfg_scale=5.0,  # classifier-free guidance scale of those samples (1 = none)
    eval_per_class=10,  # at the end, pixel-space data only: samples per class for the nearest-neighbour class
      # accuracy; the captioned demo: prompts and images per group for its attribute accuracies (0 = skip)
    # FID during training (fid.py's functions), written to train.log and OUT/metrics.jsonl
    eval_every=0,  # steps between FIDs of EMA samples against --eval-ref (and at the end); 0 = none
    eval_ref="",  # the reference: an ADM .npz (arr_0 images and/or mu/sigma) or a `fid.py --save-stats` file
    eval_samples=10000,  # samples per FID (paper's ablations: FID-10K); classes balanced (index mod classes), text:
      # the first captions of evenly spaced training images, cycled; fixed seed (--seed), CFG --cfg-scale
    eval_batch_size=64,  # images per sampling batch (with the seed it fixes the samples) and per Inception batch
    eval_sampler="dpm++sde",  # the sampler of those samples (--eta and --spacing as the grid's; either objective)
    eval_steps=0,  # its steps per AR step (0 = its default, inference.DEFAULT_STEPS: 20 for dpm++sde)
    fid_weights="",  # the FID Inception weights (fid.py --weights); "" = the torch hub checkpoints directory
    # loggers beside OUT/metrics.jsonl (optional packages); a resumed run continues the same curves
    tensorboard=False,  # also log every metric to OUT/tensorboard (pip install tensorboard)
    wandb=False,  # also log them to Weights & Biases (pip install wandb; WANDB_MODE=offline needs no network)
    wandb_project="nanoCausalFusion",  # its project
    wandb_run="",  # its run name ("" = the name of --out); --resume continues the same run (id in ckpt.pt)
    # the demo data set (--data "")
    demo="classes",  # classes: 10 shapes, one per class; captions: shapes described by text; combinations: the
      # captioned shapes, one class per (shape, colour, size, position): the text path's yardstick (demos.py)
    demo_image_size=12,  # pixels per side
    demo_per_class=100,  # training images per class (10 classes)
    demo_images=4000,  # training images of the captioned demo (and of --demo combinations)
    # system
    device="",  # "" = cuda if available, else cpu
    dtype="",  # autocast dtype: bf16 or fp32; "" = bf16 on cuda, fp32 on cpu
    compile=False,  # torch.compile the model
    grad_checkpointing=False,  # recompute block activations in the backward pass: less memory, ~30% slower
)


def open_train_data(cfg, rank):
    """LatentData of --data, or the demo's (built under OUT/data), and the tokenizer if it holds captions."""
    if cfg["demo"] not in ("classes", "captions", "combinations"):
        raise ValueError(f"--demo must be classes, captions or combinations, got {cfg['demo']!r}")
    root, size = os.path.join(cfg["out"], "data"), cfg["demo_image_size"]
    if cfg["data"]:
        data_dir = cfg["data"]
    elif cfg["demo"] == "classes":
        data_dir = demos.build_demo_data(root, size, cfg["demo_per_class"], cfg["seed"], rank)
    elif cfg["demo"] == "combinations":
        data_dir = demos.build_combination_demo_data(root, size, cfg["demo_images"], cfg["seed"], rank)
    else:
        data_dir = demos.build_caption_demo_data(root, size, cfg["demo_images"], cfg["seed"], rank)
    data = LatentData(data_dir)
    c, h, w = data.latent_shape
    if h != w or len(data) < cfg["batch_size"]:
        raise ValueError(f"--data {data_dir}: need square latents and at least --batch-size ({cfg['batch_size']}) "
                         f"samples, got latents {data.latent_shape} and {len(data)} samples")
    if cfg["text_len"] < 2:
        raise ValueError(f"--text-len must hold at least BOS and EOS (2), got {cfg['text_len']}")
    if data.captions is None:
        return data_dir, data, None
    if cfg["learn_tokenizer"]:  # deterministic: every rank, and a resumed run, learns the same one
        return data_dir, data, tokenization.learn_bpe((c for cs in data.captions for c in cs), cfg["learn_tokenizer"])
    return data_dir, data, tokenization.build_tokenizer(cfg["tokenizer"])


def check_train_options(cfg, world, device):
    """Raise a ValueError naming the option for a combination training cannot run; returns the autocast dtype and
    the step's options."""
    dtype = autocast_dtype(cfg["dtype"], device)
    options = StepOptions.from_config(cfg)  # checks the timestep sampling and the loss weighting
    micro_batches(cfg["batch_size"], cfg["device_batch_size"], world)
    if cfg["split_per"] not in ("sample", "batch"):
        raise ValueError(f"--split-per must be sample or batch, got {cfg['split_per']!r}")
    if cfg["learn_tokenizer"] and cfg["tokenizer"]:
        raise ValueError(f"--learn-tokenizer {cfg['learn_tokenizer']} learns a tokenizer: it goes without --tokenizer")
    if cfg["noisy_copies"] < 1 or (cfg["time_token"] and (cfg["per_step_t"] or cfg["noisy_copies"] > 1)):
        raise ValueError(f"--noisy-copies must be >= 1 (got {cfg['noisy_copies']}), and --time-token (one timestep "
                         f"per image) goes with neither --per-step-t nor --noisy-copies > 1")
    return dtype, options


def save_sample_grid(ema, cfg, data, tokenizer, vae, diffusion, autocast, path):
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
        tokens = sample_latents(ema, diffusion, cfg["seed"], cfg_scale=cfg["cfg_scale"], **kwargs)
    images = tokens_to_images(tokens, ema, vae, data.scale_factor)  # (N, H, W, 3) uint8
    captions = None if prompts is None else [p if j == 0 else "" for p in prompts for j in range(cols)]
    save_grid(images, path, ncol=cols, captions=captions, zoom_to=GRID_PIXELS)


def train(cfg, rank, world, device, recipes=()):
    out = cfg["out"]
    dtype, options = check_train_options(cfg, world, device)
    accum, micro_size = micro_batches(cfg["batch_size"], cfg["device_batch_size"], world)
    micro = world * accum  # micro-batches in a global batch
    objective = Objective(cfg["objective"])  # training's: the 1000-step schedule, or flow's t in [0, 1]
    ckpt_path = os.path.join(out, "ckpt.pt")
    if os.path.exists(ckpt_path) and not cfg["resume"]:
        raise FileExistsError(f"{ckpt_path} exists: pass --resume to continue that run, or choose another --out")
    os.makedirs(out, exist_ok=True)
    log = RunLog(os.path.join(out, "train.log"), rank)
    # FID during training: its sampler, Inception and reference statistics, checked and made before step 1
    fid_eval = prepare_fid(cfg, rank, device) if cfg["eval_every"] else None

    # data, model, optimizer; a resumed run takes all but the data from the checkpoint
    data_dir, data, tokenizer = open_train_data(cfg, rank)
    data_info = {"vae": data.vae, "vae_ckpt": data.meta.get("vae_ckpt"), "scale_factor": data.scale_factor,
                 "latent_shape": list(data.latent_shape), "image_size": data.meta["image_size"],
                 "num_classes": data.num_classes, "class_names": data.class_names}
    if tokenizer is not None and cfg["noisy_copies"] > 1:  # (--time-token: the model refuses text, model.py)
        raise ValueError(f"--data {cfg['data'] or 'the captioned demo'} holds captions: --noisy-copies (Table 7) is "
                         f"an ablation of the class-conditional model")
    model, ema, params, optimizer = build_model(cfg, data.latent_shape, data.num_classes,
                                                tokenizer.vocab_size if tokenizer else 0, device)
    step, wandb_id = 0, None
    if cfg["resume"]:
        if not os.path.exists(ckpt_path):
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
        ckpt = read_checkpoint(ckpt_path)
        check_resumable(ckpt, ckpt_path, model.config, data_info, tokenizer, cfg["objective"])
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"]["torch"])  # training draws are keyed by (seed, step); this is the rest
        step, wandb_id = ckpt["step"], ckpt.get("wandb_id")
        changed = {k: (ckpt["config"].get(k), v) for k, v in cfg.items()
                   if k != "resume" and ckpt["config"].get(k) != v}
        log(f"resuming {ckpt_path} at step {step}; options changed since (was, now): {changed}")
    elif cfg["init_from"]:  # someone's weights: other classes and grids carried over (checkpoint.init_from)
        if cfg["init_weights"] not in ("ema", "model"):
            raise ValueError(f"--init-weights must be ema or model, got {cfg['init_weights']!r}")
        notes = init_from(model, cfg["init_from"], use_ema=cfg["init_weights"] == "ema")
        ema.load_state_dict(model.state_dict())
        log(f"initialized from {cfg['init_from']} ({cfg['init_weights']} weights)" + "".join(f"; {n}" for n in notes))
    # the metrics of the run so far (none past the checkpoint) and its loggers; the VAE: rank 0 draws the grids,
    # every rank samples for FID
    metrics = Metrics(cfg, rank, step, wandb_id)
    vae = build_vae(data.vae, data_info["vae_ckpt"], device=device) if rank == 0 or fid_eval else None  # fail early
    train_model = torch.compile(model) if cfg["compile"] else model
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None)
    amp = autocast(dtype, device)
    grid_sampler = make_diffusion(cfg["grid_steps"], cfg["grid_sampler"], cfg["eta"], cfg["spacing"],
                                  cfg["objective"])
    L = model.num_tokens
    log(f"recipe: {' '.join(recipes) or 'none (the demo)'}; config: {json.dumps(cfg)}")
    what = (f"{len(data)} images with {sum(map(len, data.captions))} captions ({tokenizer.kind} tokenizer, "
            f"{tokenizer.vocab_size} ids, {cfg['text_len']} text tokens)" if tokenizer else
            f"{len(data)} samples of {data.num_classes} classes")
    log(f"data: {data_dir}: {what}, latents {data.latent_shape} ({data.vae}); model: "
        f"{sum(p.numel() for p in params) / 1e6:.2f}M trainable parameters, {L} tokens; "
        f"{world} rank(s) x {accum} micro-batch(es) of {micro_size} on {device} ({dtype})")

    losses, text_losses, pending, timer, t_start, captions = [], [], [], 0.0, time.time(), [0, 0]  # [cut, seen]
    fids = []  # this process's FIDs (rank 0)
    pin = device.type == "cuda"  # page-locked host memory: the copies to the GPU run asynchronously
    zero = torch.zeros((), device=device)
    while step < cfg["max_steps"]:
        t0 = time.time()
        # the learning rate: linear warmup, then constant
        lr = cfg["lr"] * min(1.0, (step + 1) / cfg["warmup_steps"]) if cfg["warmup_steps"] else cfg["lr"]
        for group in optimizer.param_groups:
            group["lr"] = lr
        # forward and backward over this rank's micro-batches, gradients all-reduced at the last one
        indices = step_indices(step, cfg["batch_size"], len(data), cfg["seed"])
        sums = torch.zeros(3, device=device)  # image loss, text loss sum, text tokens
        for a in range(accum):
            m = rank * accum + a  # this micro-batch's place in the global batch
            batch = draw_micro_batch(data, model, indices[m * micro_size:(m + 1) * micro_size],
                                     seeded(cfg["seed"], SEED_TRAIN_STEP, step, m), options=options,
                                     objective=objective, tokenizer=tokenizer)
            captions[0] += batch.pop("truncated", 0)
            captions[1] += micro_size if tokenizer else 0
            b = {k: (x.pin_memory() if pin else x).to(device, non_blocking=True) for k, x in batch.items()}
            last = a == accum - 1
            with contextlib.nullcontext() if world == 1 or last else train_model.no_sync():
                with amp:
                    loss, image_loss, text_sum, text_count = forward_losses(train_model, model, objective, b, options)
                (loss / accum).backward()
            sums += torch.stack([image_loss.detach(), zero if text_sum is None else text_sum.detach(),
                                 zero if text_count is None else text_count.float()])
        # clip, update, EMA; the statistics stay on the device until the next log line
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"] or float("inf"))
        pending.append(torch.cat([sums, grad_norm.float()[None]]))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema_update(ema, model, min(cfg["ema_decay"], (1 + step) / (10 + step)))
        step += 1
        # log: train.log, metrics.jsonl and the loggers
        log_now = step % cfg["log_every"] == 0 or step == cfg["max_steps"]
        save_now = step % cfg["ckpt_every"] == 0 or step == cfg["max_steps"]
        if log_now or save_now:
            new_losses, new_text_losses, norm = read_step_stats(pending, micro, world, step - len(pending) + 1,
                                                                ckpt_path)
            pending.clear()
            losses += new_losses
            text_losses += new_text_losses
        timer += time.time() - t0
        if log_now:
            n_steps = min(cfg["log_every"], len(losses))
            record = log_record(step, losses[-n_steps:], text_losses[-n_steps:], lr, norm, timer, cfg, tokenizer,
                                device, L)
            log(log_line(record, captions))
            metrics(record)
            timer = 0.0
        # FID of EMA samples every --eval-every steps and at the end, before the checkpoint that keeps its record
        if fid_eval and (step % cfg["eval_every"] == 0 or step == cfg["max_steps"]):
            t_eval = time.time()
            value = evaluate_fid(ema, vae, data, tokenizer, *fid_eval, cfg, dtype, rank, world, device)
            if rank == 0:
                record = fid_record(step, value, time.time() - t_eval, fid_eval[0], cfg)
                log(fid_line(record, first=not fids))
                metrics(record)
                fids.append(value)
        # checkpoint, then the curves so far (OUT/curves.png); sample grid
        if save_now and rank == 0:
            state = {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                     "step": step, "config": cfg, "model_config": model.config, "data": data_info,
                     "rng": {"torch": torch.get_rng_state()}}
            if tokenizer is not None:
                state["tokenizer"] = tokenizer.state()
            if metrics.wandb is not None:
                state["wandb_id"] = metrics.wandb.id  # --resume continues this W&B run
            save_checkpoint(state, out, cfg["keep_every"] and step % cfg["keep_every"] == 0)
            metrics.draw(os.path.join(out, "curves.png"))
        if rank == 0 and cfg["grid_classes"] and cfg["grid_per_class"] and (
                (cfg["grid_every"] and step % cfg["grid_every"] == 0) or step == cfg["max_steps"]):
            path = os.path.join(out, f"samples_{step:07d}.png")
            save_sample_grid(ema, cfg, data, tokenizer, vae, grid_sampler, amp, path)
            log(f"step {step} | EMA samples: {path}")

    metrics.close()  # TensorBoard's last events, the end of the W&B run
    # the demos' closing figures (pixel-space data only: no pretrained network needed)
    summary = {"step": step, "losses": losses, "fids": fids, "seconds": time.time() - t_start}
    if rank == 0 and cfg["eval_per_class"] and data.vae == "none":
        if not cfg["data"] and cfg["demo"] == "combinations":
            summary.update(demos.evaluate_combination_demo(ema, cfg, data, vae, grid_sampler, amp, log))
        elif tokenizer is None:
            summary.update(demos.evaluate_class_demo(ema, cfg, data, grid_sampler, amp, log))
        elif not cfg["data"]:
            summary.update(demos.evaluate_caption_demo(ema, cfg, data, tokenizer, vae, grid_sampler, amp, log))
    return summary


RECIPES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def main(argv=None):
    cfg = dict(config)
    recipes = parse_config(cfg, argv, recipes=True)
    if cfg["data"] and not recipes:  # the defaults are the CPU demo's: on real data they would train nonsense
        names = " ".join(f"configs/{n}" for n in sorted(os.listdir(RECIPES)) if not n.startswith(("demo", "_")))
        raise ConfigError(f"--data {cfg['data']} without a recipe: train.py's defaults are the CPU demo's (batch "
                          f"{config['batch_size']}, lr {config['lr']}, EMA {config['ema_decay']}). Name the paper's "
                          f"run it follows, one of {names}, as in `python train.py configs/in256_L2_ablation.py "
                          f"--data {cfg['data']}` (docs/reproducing.md), or a recipe file of your own")
    return launch(cfg, functools.partial(train, recipes=recipes))


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError, ImportError) as e:  # bad options, files, data or a missing optional package
        sys.exit(f"train.py: error: {e}")
