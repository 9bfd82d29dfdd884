"""Fine-tune a CausalFusion checkpoint for image classification (paper Sec. 6 "Visual Representation Learning",
Table 6b, App. C Table 12), or train a linear probe on its frozen features (--probe).

    python -m finetune.classify --ckpt out/demo/ckpt.pt --batch-size 128  # the demo's shapes, 1,000 new held out
    python -m finetune.classify --ckpt out/demo/ckpt.pt --probe --probe-batch-size 250 --probe-optimizer sgd
    python -m finetune.classify --ckpt RUN/ckpt.pt --data latents/in256_sd --val-data latents/in256_sd_val --out runs/ft
    torchrun --nproc_per_node=8 -m finetune.classify ...same options...

The classifier is the pretrained model's ViT body: x_proj, position embedding and blocks, over the L tokens of a
clean latent with full attention; no timestep embedding, label embedding, cond position embedding or cond tokens.
The last layer's tokens are averaged, then LayerNorm and a linear head (the paper, as MAE's global pooling).
Fine-tuning is MAE's recipe (Table 12): AdamW, layer-wise lr decay, cosine schedule after a linear warmup, label
smoothing, mixup and cutmix, drop path. On extracted latents the augmentation is a random flip and a posterior
sample (MAE's RandomResizedCrop and RandAugment work on pixels). The probe is MAE's: a frozen body,
BatchNorm without affine before the linear head, LARS, no weight decay.
Randomness as in train.py (common.py): resuming continues exactly and needs no generator state.
"""
import json
import math
import os
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import demos
from finetune.common import (body_tokens, data_parallel, describe_run, learning_rate, load_body, mean_latents,
                             mean_loss, open_run_dir, optimizer_step, resume_run, save_run, steps_in_epoch, summarize)
from latents import LatentData
from runtime import autocast, autocast_dtype, launch, micro_batches, parse_config, step_indices

config = dict(
    ckpt="",  # the pretrained train.py checkpoint (required)
    weights="ema",  # ema or model: which of its weights; random: its architecture freshly initialized (a baseline)
    data="",  # training latents (extract_latents.py); "" = the demo's shapes at the checkpoint's image size
    val_data="",  # held-out latents for top-1 accuracy (ImageNet val); the demo draws new shapes
    out="out/finetune",  # run dir: ckpt.pt, finetune.log
    resume=False,  # continue OUT/ckpt.pt exactly
    seed=0,  # seeds the head and every random draw
    per_class=0,  # labelled training examples per class, the first of each class (0 = all): few-label probes
    probe=False,  # linear probe (frozen body, LARS) instead of end-to-end fine-tuning
    # MAE's fine-tuning recipe (paper Table 12, their names): the defaults are its values for L
    batch_size=1024,  # global batch, split over ranks and micro-batches
    device_batch_size=0,  # images per micro-batch on one GPU; a step accumulates batch / (device_batch_size x
      # ranks) of them, the same update (0 = batch / ranks)
    epochs=50,  # training epochs (MAE: 100 for B)
    warmup_epochs=5,  # linear lr warmup, then cosine decay to min_lr
    blr=1e-3,  # base learning rate: lr = blr * batch_size / 256 (MAE: 5e-4 for B)
    min_lr=1e-6,  # the cosine schedule's floor
    layer_decay=0.75,  # layer-wise lr decay: block i gets layer_decay^(depth - i) of the lr (MAE: 0.65 for B)
    weight_decay=0.05,  # AdamW weight decay (not on biases, norms and the position embedding)
    betas=(0.9, 0.999),  # AdamW betas
    drop_path=0.1,  # stochastic depth rate of the last block, linear from 0 (MAE: 0.2 for H)
    smoothing=0.1,  # label smoothing
    mixup=0.8,  # mixup alpha (0 = off)
    cutmix=1.0,  # cutmix alpha on the latent grid (0 = off)
    mixup_prob=1.0,  # probability of mixing a batch at all
    mixup_switch_prob=0.5,  # probability of cutmix rather than mixup when both are on
    # MAE's linear probe (--probe): LARS, batch 16384, 90 epochs, no weight decay
    probe_blr=0.1,  # base learning rate: lr = probe_blr * probe_batch_size / 256
    probe_batch_size=16384,  # global batch
    probe_epochs=90,  # training epochs
    probe_warmup_epochs=10,  # linear lr warmup, then cosine decay to 0
    probe_optimizer="lars",  # lars (MAE's) or sgd (momentum 0.9): LARS moves the head by ~1e-3 x lr of its norm
      # per step, far too little for the few hundred steps of a small data set
    # the demo (--data "")
    demo_per_class=100,  # training images per class (train.py's demo data: the same images)
    demo_val_per_class=100,  # held-out images per class, drawn with another seed
    # logging, system
    eval_every=1,  # epochs between top-1 evaluations on the held-out set (and at the end)
    ckpt_every=1,  # epochs between writes of OUT/ckpt.pt (and at the end)
    device="",  # "" = cuda if available, else cpu
    dtype="",  # autocast dtype: bf16 or fp32; "" = bf16 on cuda (the paper), fp32 on cpu
)
RUN_KEYS = ("ckpt", "weights", "probe", "per_class", "seed")  # what a run's course depends on: --resume checks them


# ------------------------------------------------------------------------------------------------ model
class Classifier(nn.Module):
    """The ViT body of a CausalFusion model (its x_proj, pos_embed and blocks, same names) + average pooling,
    LayerNorm and a linear head; probe=True puts MAE's BatchNorm without affine before the head."""

    def __init__(self, generator_model, num_classes, drop_path=0.0, probe=False):
        super().__init__()
        g = generator_model
        self.patch_size, self.depth = g.patch_size, len(g.blocks)
        self.x_proj, self.pos_embed, self.blocks = g.x_proj, g.pos_embed, g.blocks
        dim = g.x_proj.out_features
        self.fc_norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.01 if probe else 2e-5)  # MAE's head inits
        nn.init.zeros_(self.head.bias)
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6) if probe else nn.Identity()
        self.drop_rates = torch.linspace(0, drop_path, self.depth).tolist()  # stochastic depth per block
        self.probe = probe
        if probe:
            for p in self.body_parameters():
                p.requires_grad_(False)

    def body_parameters(self):
        return [p for name, p in self.named_parameters() if not name.startswith(("head.", "bn."))]

    def features(self, latents, generator=None):
        """Scaled latents (N, C, H, W) -> pooled, normalized features (N, D)."""
        return self.fc_norm(body_tokens(self, latents, self._drop, generator).mean(1))  # (N, D)

    def _drop(self, x, rate, generator):
        """Stochastic depth: zero the branch for a random `rate` of the samples, rescale the rest."""
        if not self.training or rate == 0:
            return x
        keep = (torch.rand(x.shape[0], 1, 1, generator=generator) >= rate).to(x.device, x.dtype)  # (N, 1, 1)
        return x * keep / (1 - rate)

    def forward(self, latents, generator=None):
        if self.probe:  # the frozen body builds no graph
            with torch.no_grad():
                feats = self.features(latents)
            return self.head(self.bn(feats.float()))
        return self.head(self.features(latents, generator))


def param_groups(model, weight_decay, layer_decay):
    """MAE's layer-wise lr decay: x_proj and pos_embed are layer 0, block i layer i + 1, the head and its norm layer
    depth + 1; a layer's lr scale is layer_decay^(depth + 1 - layer). No weight decay on 1-d tensors (biases,
    norms) and the position embedding."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer = (0 if name.startswith(("x_proj.", "pos_embed")) else
                 int(name.split(".")[1]) + 1 if name.startswith("blocks.") else model.depth + 1)
        decay = 0.0 if p.ndim == 1 or name == "pos_embed" else weight_decay
        key = (layer, decay)
        if key not in groups:
            groups[key] = dict(params=[], weight_decay=decay, lr_scale=layer_decay ** (model.depth + 1 - layer))
        groups[key]["params"].append(p)
    return list(groups.values())


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) as MAE's linear probe uses it: for matrices, the update g + wd * p is rescaled to
    trust_coefficient * |p| / |update|; then SGD momentum."""

    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:  # not biases or norms
                    update = update.add(p, alpha=group["weight_decay"])
                    p_norm, u_norm = p.norm(), update.norm()
                    trust = torch.where((p_norm > 0) & (u_norm > 0), group["trust_coefficient"] * p_norm / u_norm, 1.0)
                    update = update * trust
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                state["mu"].mul_(group["momentum"]).add_(update)
                p.add_(state["mu"], alpha=-group["lr"])


def build_classifier(cfg, device):
    """The classifier from the pretrained checkpoint, its data meta, its optimizer and the recipe's numbers
    (batch_size, epochs, warmup_epochs, lr, min_lr): Table 12's fine-tuning, or MAE's probe."""
    pretrained, meta = load_body(cfg["ckpt"], cfg["weights"], cfg["seed"], text_ok=False)
    model = Classifier(pretrained, meta["num_classes"], 0.0 if cfg["probe"] else cfg["drop_path"], cfg["probe"])
    model = model.to(device).train()
    if cfg["probe"]:
        recipe = dict(batch_size=cfg["probe_batch_size"], epochs=cfg["probe_epochs"],
                      warmup_epochs=cfg["probe_warmup_epochs"], lr=cfg["probe_blr"] * cfg["probe_batch_size"] / 256,
                      min_lr=0.0)
        if cfg["probe_optimizer"] not in ("lars", "sgd"):
            raise ValueError(f"--probe-optimizer must be lars or sgd, got {cfg['probe_optimizer']!r}")
        groups = [dict(params=list(model.head.parameters()), lr_scale=1.0)]
        optimizer = (LARS(groups) if cfg["probe_optimizer"] == "lars" else
                     torch.optim.SGD(groups, lr=0.0, momentum=0.9))
    else:
        recipe = dict(batch_size=cfg["batch_size"], epochs=cfg["epochs"], warmup_epochs=cfg["warmup_epochs"],
                      lr=cfg["blr"] * cfg["batch_size"] / 256, min_lr=cfg["min_lr"])
        optimizer = torch.optim.AdamW(param_groups(model, cfg["weight_decay"], cfg["layer_decay"]), betas=cfg["betas"])
    return model, meta, optimizer, recipe


# ------------------------------------------------------------------------------------------------ data
def mix(x, y, num_classes, cfg, g):
    """Label smoothing, and with probability mixup_prob one mixup or cutmix (timm's batch mode) of the batch with
    its reverse: latents (B, C, H, W) and soft targets (B, num_classes)."""
    off = cfg["smoothing"] / num_classes
    target = torch.full((len(y), num_classes), off).scatter_(1, y[:, None], 1 - cfg["smoothing"] + off)
    use_mixup, use_cutmix = cfg["mixup"] > 0, cfg["cutmix"] > 0
    if not (use_mixup or use_cutmix) or torch.rand((), generator=g) >= cfg["mixup_prob"]:
        return x, target
    cut = use_cutmix and (not use_mixup or torch.rand((), generator=g) < cfg["mixup_switch_prob"])
    alpha = cfg["cutmix"] if cut else cfg["mixup"]
    lam = float(np.random.default_rng(int(torch.randint(2 ** 62, (), generator=g))).beta(alpha, alpha))
    if cut:  # a box of area ~(1 - lam) from the reversed batch; lam becomes the kept area
        h, w = x.shape[2:]
        ch, cw = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
        cy, cx = torch.randint(h, (), generator=g).item(), torch.randint(w, (), generator=g).item()
        y0, y1, x0, x1 = max(cy - ch // 2, 0), min(cy + ch // 2, h), max(cx - cw // 2, 0), min(cx + cw // 2, w)
        x = x.clone()
        x[:, :, y0:y1, x0:x1] = x.flip(0)[:, :, y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
    else:
        x = lam * x + (1 - lam) * x.flip(0)
    return x, lam * target + (1 - lam) * target.flip(0)


def open_classify_data(cfg, meta, rank):
    """(training LatentData, the indices it trains on, held-out LatentData) for the options."""
    if cfg["data"]:
        if not cfg["val_data"]:
            raise ValueError("--val-data is required with --data: the held-out latents to measure top-1 on")
        train_data, val_data = LatentData(cfg["data"]), LatentData(cfg["val_data"])
    else:  # the demo: train.py's shapes (same seed: the pretraining images) and new ones drawn with another seed
        if meta["vae"] != "none" or meta["num_classes"] != len(demos.SHAPES):
            raise ValueError(f"--ckpt {cfg['ckpt']} was not trained on the class demo; pass --data and --val-data")
        root, size = os.path.join(cfg["out"], "data"), meta["image_size"]
        train_data = LatentData(demos.build_demo_data(os.path.join(root, "train"), size, cfg["demo_per_class"],
                                                       cfg["seed"], rank))
        val_data = LatentData(demos.build_demo_data(os.path.join(root, "val"), size, cfg["demo_val_per_class"],
                                                     cfg["seed"] + 1000, rank))
    for name, d in (("--data", train_data), ("--val-data", val_data)):
        if list(d.latent_shape) != list(meta["latent_shape"]) or d.num_classes != meta["num_classes"]:
            raise ValueError(f"{name}: latents {d.latent_shape} of {d.num_classes} classes, but --ckpt was trained on "
                             f"{tuple(meta['latent_shape'])} of {meta['num_classes']} classes")
    indices = torch.arange(len(train_data))
    if cfg["per_class"]:
        indices = torch.cat([torch.nonzero(train_data.labels == c)[:cfg["per_class"], 0]
                             for c in range(train_data.num_classes)])
    return train_data, indices, val_data


@torch.no_grad()
def top1_accuracy(model, data, batch_size, device, amp, rank, world):
    """Top-1 accuracy on the held-out data (mean latents, no flip), split over the ranks."""
    model.eval()
    correct, total = torch.zeros((), device=device), torch.zeros((), device=device)
    starts = range(rank * batch_size, len(data), world * batch_size)
    for start in tqdm(starts, desc="eval", disable=rank > 0, leave=False):
        stop = min(start + batch_size, len(data))
        with amp:
            logits = model(mean_latents(data, start, stop).to(device))
        correct += (logits.argmax(1).cpu() == data.labels[start:stop]).sum().to(device)
        total += stop - start
    if world > 1:
        dist.all_reduce(correct)
        dist.all_reduce(total)
    model.train()
    return (correct / total).item()


# ------------------------------------------------------------------------------------------------ run
def main(argv=None):
    cfg = dict(config)
    parse_config(cfg, argv, prog="finetune.classify")
    return launch(cfg, finetune)


def finetune(cfg, rank, world, device):
    """Fine-tune (or probe) on this rank; returns {top1, best_top1, history} of the held-out evaluations."""
    # the model on the pretrained body, its optimizer and the recipe's numbers
    model, meta, optimizer, recipe = build_classifier(cfg, device)
    num_classes, batch = meta["num_classes"], recipe["batch_size"]
    accum, _ = micro_batches(batch, cfg["device_batch_size"], world)
    micro = world * accum  # micro-batches in a global batch
    dtype = autocast_dtype(cfg["dtype"], device)
    # the run folder, the data, and where a resumed run stands
    ckpt_path, log = open_run_dir(cfg["out"], cfg["resume"], rank)
    train_data, indices, val_data = open_classify_data(cfg, meta, rank)
    steps_per_epoch = steps_in_epoch(len(indices), batch, "probe-batch-size" if cfg["probe"] else "batch-size")
    total = recipe["epochs"] * steps_per_epoch
    step, history = resume_run(ckpt_path, cfg, config, RUN_KEYS, model, optimizer) if cfg["resume"] else (0, [])
    train_model = data_parallel(model, world, device)
    amp = autocast(dtype, device)
    log(f"config: {json.dumps(cfg)}")
    log(describe_run("linear probe" if cfg["probe"] else "fine-tuning", cfg, model, recipe,
                     train_size=len(indices), val_size=len(val_data), steps_per_epoch=steps_per_epoch, world=world,
                     device=device, dtype=dtype))

    def micro_loss(idx, g):
        """The loss of a micro-batch (its sample indices, its generator): cross-entropy on soft targets (smoothed
        and mixed; one-hot for the probe)."""
        x, y = train_data.batch(idx, g)  # flip + posterior sample
        x, target = (x, F.one_hot(y, num_classes).float()) if cfg["probe"] else mix(x, y, num_classes, cfg, g)
        with amp:
            logits = train_model(x.to(device), g)
        return F.cross_entropy(logits.float(), target.to(device))  # soft targets

    # train: MAE's per-step lr schedule; held-out evaluations and checkpoints at the ends of epochs
    losses = []
    bar = tqdm(total=total, initial=step, desc="steps", disable=rank > 0, dynamic_ncols=True)
    while step < total:
        lr = learning_rate(step, steps_per_epoch, recipe)
        chosen = indices[step_indices(step, batch, len(indices), cfg["seed"])]
        losses.append(optimizer_step(train_model, optimizer, micro_loss, chosen, step=step, lr=lr, seed=cfg["seed"],
                                     grad_accum=accum, rank=rank, world=world, device=device))
        step += 1
        bar.update()
        epoch, within = divmod(step, steps_per_epoch)
        if within == 0 and (epoch % cfg["eval_every"] == 0 or step == total):
            loss = mean_loss(losses, world)
            top1 = top1_accuracy(model, val_data, batch // micro, device, amp, rank, world)
            history.append({"epoch": epoch, "step": step, "loss": loss, "top1": top1})
            bar.set_postfix({"loss": f"{loss:.4f}", "top1": f"{top1:.3f}"})
            log(f"epoch {epoch} | step {step} | loss {loss:.4f} | lr {lr:.2e} | held-out top-1 {top1:.4f}")
        if within == 0 and (epoch % cfg["ckpt_every"] == 0 or step == total) and rank == 0:
            save_run(model, optimizer, cfg, meta, step=step, history=history)
    bar.close()
    return summarize(history, "top1", "top-1", len(val_data), log)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:  # bad options, files or data
        sys.exit(f"finetune.classify: error: {e}")
