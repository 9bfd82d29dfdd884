"""What the two fine-tunes share (classify.py: classification and the linear probe; caption.py: captioning): the
pretrained generator's ViT body and its tokens, MAE's lr schedule, the held-out latents, and the run's plumbing
(its folder and log, the exact resume, one optimizer step over the micro-batches, the checkpoint, the last line).

Randomness as in train.py: micro-batch m of step s draws from seeded(seed, SEED_FINETUNE_STEP, s, m) and epoch e's
order from seeded(seed, SEED_DATA_ORDER, e), so resuming continues exactly and needs no generator state, and N ranks
compute the step of one rank accumulating N micro-batches.
"""
import contextlib
import math
import os

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from model import CausalFusion, patchify
from runtime import SEED_FINETUNE_STEP, seeded


# ------------------------------------------------------------------------------------------------ the body
def load_body(ckpt, weights, seed, text_ok):
    """The pretrained model of the train.py checkpoint `ckpt` (its `weights`: ema or model; random: its architecture
    freshly initialized) and its data meta with its model_config; text_ok: a text model is welcome. torch is seeded
    with `seed` for what is built next (the head)."""
    if weights not in ("ema", "model", "random"):
        raise ValueError(f"--weights must be ema, model or random, got {weights!r}")
    if not ckpt:
        raise ValueError("--ckpt is required: a train.py checkpoint to fine-tune")
    pretrained, meta = load_checkpoint(ckpt, use_ema=weights != "model")
    if pretrained.text_vocab and not text_ok:
        raise ValueError(f"--ckpt {ckpt}: a text model; fine-tuning takes a class-conditional checkpoint")
    torch.manual_seed(seed)
    if weights == "random":
        pretrained = CausalFusion(**pretrained.config)
    return pretrained, dict(meta, model_config=pretrained.config)


def body_tokens(body, latents, drop=None, generator=None):
    """The ViT body's output tokens (N, L, D) of scaled latents (N, C, H, W): x_proj + pos_embed, then body.blocks
    with full attention (no mask, no cond tokens, no timestep); drop(branch, rate, generator) is stochastic depth."""
    x = body.x_proj(patchify(latents, body.patch_size)) + body.pos_embed  # (N, L, D)
    for block, rate in zip(body.blocks, body.drop_rates):
        branch = block.attn(block.norm1(x))  # full attention: no mask
        x = x + (drop(branch, rate, generator) if drop else branch)
        branch = block.mlp(block.norm2(x))
        x = x + (drop(branch, rate, generator) if drop else branch)
    return x


def mean_latents(data, start, stop):
    """The unflipped posterior means of examples start..stop-1, times the scale factor: (B, C, H, W)."""
    parts = [shard[max(start - lo, 0):max(min(stop - lo, len(shard)), 0), 0, 0]
             for shard, lo in zip(data.shards, data.offsets)]
    return torch.from_numpy(np.concatenate(parts)).float() * data.scale_factor


def learning_rate(step, steps_per_epoch, recipe):
    """MAE's per-iteration schedule: a linear warmup over recipe's warmup_epochs, then half a cosine from its lr to
    its min_lr at the end of its epochs."""
    peak, floor, warmup_epochs, epochs = recipe["lr"], recipe["min_lr"], recipe["warmup_epochs"], recipe["epochs"]
    epoch = step / steps_per_epoch
    if epoch < warmup_epochs:
        return peak * epoch / warmup_epochs
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))


# ------------------------------------------------------------------------------------------------ the run
def open_run_dir(out, resume, rank):
    """(OUT/ckpt.pt's path, log): OUT is created; a checkpoint already there is an error unless resume; log(msg)
    prints on rank 0 and appends to OUT/finetune.log."""
    ckpt_path = os.path.join(out, "ckpt.pt")
    if os.path.exists(ckpt_path) and not resume:
        raise FileExistsError(f"{ckpt_path} exists: pass --resume to continue that run, or choose another --out")
    os.makedirs(out, exist_ok=True)

    def log(msg):
        if rank == 0:
            tqdm.write(msg)
            with open(os.path.join(out, "finetune.log"), "a") as f:
                f.write(msg + "\n")
    return ckpt_path, log


def steps_in_epoch(examples, batch, batch_option):
    """Full batches in an epoch of `examples` (the last partial one is dropped); none is an error naming the option."""
    if examples < batch:
        raise ValueError(f"{examples} training examples, fewer than one batch ({batch}): lower --{batch_option}")
    return examples // batch


def resume_run(ckpt_path, cfg, defaults, run_keys, model, optimizer):
    """(step, history) of the run in ckpt_path, whose model and optimizer states are loaded; it must agree with cfg
    on run_keys, what the run's course depends on (a key the file lacks had its value in defaults)."""
    if not os.path.exists(ckpt_path):
        raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
    ckpt = read_checkpoint(ckpt_path)
    diff = {k: (ckpt["config"].get(k, defaults[k]), cfg[k]) for k in run_keys
            if ckpt["config"].get(k, defaults[k]) != cfg[k]}
    if diff:
        raise ValueError(f"--resume: {ckpt_path} is another run; (checkpoint, now): {diff}")
    if set(ckpt["model"]) != set(model.state_dict()):
        raise ValueError(f"--resume: {ckpt_path} holds another model (a run of the other fine-tune?)")
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    return ckpt["step"], ckpt["history"]


def data_parallel(model, world, device):
    """The model the steps run: itself on one rank, else wrapped in DistributedDataParallel."""
    return model if world == 1 else nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)


def describe_run(what, cfg, model, recipe, *, train_size, val_size, steps_per_epoch, world, device, dtype):
    """The log's line on the run: `what` of --ckpt, its parameters, data, schedule and processes."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6
    return (f"{what} of {cfg['ckpt']} ({cfg['weights']} weights): "
            f"{trainable:.3f}M trainable of {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; "
            f"{train_size} training and {val_size} held-out examples; {recipe['epochs']} epochs of "
            f"{steps_per_epoch} steps at batch {recipe['batch_size']}, peak lr {recipe['lr']:.2e}; "
            f"{world} rank(s) on {device} ({dtype})")


def optimizer_step(train_model, optimizer, micro_loss, chosen, *, step, lr, seed, grad_accum, rank, world, device):
    """One step at lr (times each group's lr_scale) on the global batch `chosen` (sample indices): this rank's
    micro-batches m = rank * grad_accum + a, each's loss micro_loss(indices, generator) with the generator seeded by
    (seed, SEED_FINETUNE_STEP, step, m), gradients synced once per step. Returns the micro-batches' mean loss."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
    micro_size = len(chosen) // (world * grad_accum)
    loss_sum = torch.zeros((), device=device)
    for a in range(grad_accum):
        m = rank * grad_accum + a
        g = seeded(seed, SEED_FINETUNE_STEP, step, m)
        sync = world == 1 or a == grad_accum - 1
        with contextlib.nullcontext() if sync else train_model.no_sync():
            loss = micro_loss(chosen[m * micro_size:(m + 1) * micro_size], g)
            (loss / grad_accum).backward()
        loss_sum += loss.detach() / grad_accum
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum


def mean_loss(losses, world):
    """The mean of the steps' losses since the last call, over the ranks; empties losses."""
    loss = torch.stack(losses).mean()
    losses.clear()
    if world > 1:
        dist.all_reduce(loss)
    return loss.item() / world


def save_run(model, optimizer, cfg, meta, *, step, history, **extras):
    """OUT/ckpt.pt: the fine-tuned model, its optimizer, step, history and config, the pretrained model's config and
    its data format, and extras."""
    save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                     "history": history, "config": cfg, "pretrained_config": meta["model_config"],
                     "data": {k: meta[k] for k in ("vae", "latent_shape", "num_classes", "class_names")}, **extras},
                    cfg["out"], False)


def summarize(history, metric, metric_name, held_out, log):
    """{metric: the last evaluation's, best_<metric>, history}, and its line in the log."""
    summary = {metric: history[-1][metric] if history else None,
               f"best_{metric}": max((h[metric] for h in history), default=None), "history": history}
    log(f"final held-out {metric_name} {summary[metric]:.4f} (best {summary['best_' + metric]:.4f}) on "
        f"{held_out} examples")
    return summary
