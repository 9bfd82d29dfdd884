"""Fine-tune a CausalFusion checkpoint for image classification (paper Sec. 6 "Visual Representation Learning",
Table 6b, App. C Table 12), or train a linear probe on its frozen features.

    python finetune.py --ckpt out/demo/ckpt.pt --batch-size 128   # the demo's 1,000 shapes, 1,000 new held-out ones
    python finetune.py --ckpt out/demo/ckpt.pt --probe --probe-batch-size 250 --probe-optimizer sgd  # linear probe
    python finetune.py --ckpt RUN/ckpt.pt --data latents/in256_sd --val-data latents/in256_sd_val --out runs/ft
    torchrun --nproc_per_node=8 finetune.py ...same options...

The classifier is the pretrained model's ViT body: x_proj, position embedding and blocks, over the L tokens of a
clean latent with full attention; no timestep embedding, label embedding, cond position embedding or cond tokens.
The last layer's tokens are averaged, then LayerNorm and a linear head (the paper, as MAE's global pooling).
Fine-tuning is MAE's recipe (Table 12): AdamW, layer-wise lr decay, cosine schedule after a linear warmup, label
smoothing, mixup and cutmix, drop path. On extracted latents the augmentation is a random flip and a posterior
sample (MAE's RandomResizedCrop and RandAugment work on pixels). The probe is MAE's: a frozen body,
BatchNorm without affine before the linear head, LARS, no weight decay.
Randomness as in train.py: micro-batch m of step s draws from a generator seeded by (seed, s, m), so resuming
continues exactly and needs no generator state.
"""
import contextlib
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

import shapes
from checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from config import parse_config
from latents import LatentData
from model import CausalFusion, patchify
from runtime import autocast, autocast_dtype, launch, seeded, step_indices

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
    grad_accum=1,  # micro-batches per rank per step (MAE's accum_iter)
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
        x = self.x_proj(patchify(latents, self.patch_size)) + self.pos_embed  # (N, L, D)
        for block, rate in zip(self.blocks, self.drop_rates):
            x = x + self._drop(block.attn(block.norm1(x)), rate, generator)  # full attention: no mask
            x = x + self._drop(block.mlp(block.norm2(x)), rate, generator)
        return self.fc_norm(x.mean(1))  # (N, D)

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


def mean_latents(data, start, stop):
    """The unflipped posterior means of examples start..stop-1, times the scale factor: (B, C, H, W)."""
    parts = [shard[max(start - lo, 0):max(min(stop - lo, len(shard)), 0), 0, 0]
             for shard, lo in zip(data.shards, data.offsets)]
    return torch.from_numpy(np.concatenate(parts)).float() * data.scale_factor


def open_data(cfg, meta, rank):
    """(training LatentData, the indices it trains on, held-out LatentData) for the options."""
    if cfg["data"]:
        if not cfg["val_data"]:
            raise ValueError("--val-data is required with --data: the held-out latents to measure top-1 on")
        train_data, val_data = LatentData(cfg["data"]), LatentData(cfg["val_data"])
    else:  # the demo: train.py's shapes (same seed: the pretraining images) and new ones drawn with another seed
        if meta["vae"] != "none" or meta["num_classes"] != len(shapes.SHAPES):
            raise ValueError(f"--ckpt {cfg['ckpt']} was not trained on the class demo; pass --data and --val-data")
        root, size = os.path.join(cfg["out"], "data"), meta["image_size"]
        train_data = LatentData(shapes.build_demo_data(os.path.join(root, "train"), size, cfg["demo_per_class"],
                                                       cfg["seed"], rank))
        val_data = LatentData(shapes.build_demo_data(os.path.join(root, "val"), size, cfg["demo_val_per_class"],
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


# ------------------------------------------------------------------------------------------------ run
@torch.no_grad()
def evaluate(model, data, batch_size, device, amp, rank, world):
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


def learning_rate(step, steps_per_epoch, peak, warmup_epochs, epochs, floor):
    """MAE's per-iteration schedule: linear warmup, then half a cosine from peak to floor."""
    epoch = step / steps_per_epoch
    if epoch < warmup_epochs:
        return peak * epoch / warmup_epochs
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))


def build(cfg, device):
    """The classifier from the pretrained checkpoint, its optimizer and the recipe's numbers."""
    if cfg["weights"] not in ("ema", "model", "random"):
        raise ValueError(f"--weights must be ema, model or random, got {cfg['weights']!r}")
    if not cfg["ckpt"]:
        raise ValueError("--ckpt is required: a train.py checkpoint to fine-tune")
    pretrained, meta = load_checkpoint(cfg["ckpt"], use_ema=cfg["weights"] != "model")
    if pretrained.text_vocab:
        raise ValueError(f"--ckpt {cfg['ckpt']}: a text model; fine-tuning takes a class-conditional checkpoint")
    torch.manual_seed(cfg["seed"])
    if cfg["weights"] == "random":
        pretrained = CausalFusion(**pretrained.config)
    meta = dict(meta, model_config=pretrained.config)
    model = Classifier(pretrained, meta["num_classes"], 0.0 if cfg["probe"] else cfg["drop_path"], cfg["probe"])
    model = model.to(device).train()
    p = "probe_" if cfg["probe"] else ""
    recipe = dict(batch_size=cfg[p + "batch_size"], epochs=cfg[p + "epochs"], warmup_epochs=cfg[p + "warmup_epochs"],
                  min_lr=0.0 if cfg["probe"] else cfg["min_lr"])
    recipe["lr"] = cfg[p + "blr"] * recipe["batch_size"] / 256
    if cfg["probe"]:
        if cfg["probe_optimizer"] not in ("lars", "sgd"):
            raise ValueError(f"--probe-optimizer must be lars or sgd, got {cfg['probe_optimizer']!r}")
        groups = [dict(params=list(model.head.parameters()), lr_scale=1.0)]
        optimizer = (LARS(groups) if cfg["probe_optimizer"] == "lars" else
                     torch.optim.SGD(groups, lr=0.0, momentum=0.9))
    else:
        optimizer = torch.optim.AdamW(param_groups(model, cfg["weight_decay"], cfg["layer_decay"]), betas=cfg["betas"])
    return model, meta, optimizer, recipe


def main(argv=None):
    cfg = dict(config)
    parse_config(cfg, argv)
    return launch(cfg, finetune)


def finetune(cfg, rank, world, device):
    out, micro = cfg["out"], world * cfg["grad_accum"]
    model, meta, optimizer, recipe = build(cfg, device)
    batch = recipe["batch_size"]
    dtype = autocast_dtype(cfg["dtype"], device)
    if batch % micro:
        raise ValueError(f"need the batch ({batch}) divisible by ranks x --grad-accum ({world} x {cfg['grad_accum']})")
    ckpt_path = os.path.join(out, "ckpt.pt")
    if os.path.exists(ckpt_path) and not cfg["resume"]:
        raise FileExistsError(f"{ckpt_path} exists: pass --resume to continue that run, or choose another --out")
    os.makedirs(out, exist_ok=True)
    train_data, indices, val_data = open_data(cfg, meta, rank)
    if len(indices) < batch:
        raise ValueError(f"{len(indices)} training examples, fewer than one batch ({batch}): lower --"
                         f"{'probe-' if cfg['probe'] else ''}batch-size")
    steps_per_epoch = len(indices) // batch
    total = recipe["epochs"] * steps_per_epoch

    def log(msg):
        if rank == 0:
            tqdm.write(msg)
            with open(os.path.join(out, "finetune.log"), "a") as f:
                f.write(msg + "\n")

    step, history = 0, []
    if cfg["resume"]:
        if not os.path.exists(ckpt_path):
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
        ckpt = read_checkpoint(ckpt_path)
        keys = ("ckpt", "weights", "probe", "per_class", "seed")  # what the run's course depends on
        diff = {k: (ckpt["config"].get(k), cfg[k]) for k in keys if ckpt["config"].get(k) != cfg[k]}
        if diff:
            raise ValueError(f"--resume: {ckpt_path} is another run; (checkpoint, now): {diff}")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step, history = ckpt["step"], ckpt["history"]
    train_model = model if world == 1 else nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
    amp = autocast(dtype, device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6
    log(f"config: {json.dumps(cfg)}")
    log(f"{'linear probe' if cfg['probe'] else 'fine-tuning'} of {cfg['ckpt']} ({cfg['weights']} weights): "
        f"{trainable:.3f}M trainable of {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; "
        f"{len(indices)} training and {len(val_data)} held-out examples; {recipe['epochs']} epochs of "
        f"{steps_per_epoch} steps at batch {batch}, peak lr {recipe['lr']:.2e}; {world} rank(s) on {device} ({dtype})")

    def checkpoint():
        if rank == 0:
            save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                             "history": history, "config": cfg, "pretrained_config": meta["model_config"],
                             "data": {k: meta[k] for k in ("vae", "latent_shape", "num_classes", "class_names")}},
                            out, False)

    micro_size, losses = batch // micro, []
    bar = tqdm(total=total, initial=step, desc="steps", disable=rank > 0, dynamic_ncols=True)
    while step < total:
        lr = learning_rate(step, steps_per_epoch, recipe["lr"], recipe["warmup_epochs"], recipe["epochs"],
                           recipe["min_lr"])
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        chosen = indices[step_indices(step, batch, len(indices), cfg["seed"])]
        loss_sum = torch.zeros((), device=device)
        for a in range(cfg["grad_accum"]):
            m = rank * cfg["grad_accum"] + a
            g = seeded(cfg["seed"], 2, step, m)
            x, y = train_data.batch(chosen[m * micro_size:(m + 1) * micro_size], g)  # flip + posterior sample
            x, target = (x, F.one_hot(y, meta["num_classes"]).float()) if cfg["probe"] else mix(
                x, y, meta["num_classes"], cfg, g)
            sync = world == 1 or a == cfg["grad_accum"] - 1
            with contextlib.nullcontext() if sync else train_model.no_sync():
                with amp:
                    logits = train_model(x.to(device), g)
                loss = F.cross_entropy(logits.float(), target.to(device))  # soft targets
                (loss / cfg["grad_accum"]).backward()
            loss_sum += loss.detach() / cfg["grad_accum"]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        losses.append(loss_sum)
        bar.update()
        epoch_done = step % steps_per_epoch == 0
        epoch = step // steps_per_epoch
        if epoch_done and (epoch % cfg["eval_every"] == 0 or step == total):
            loss_mean = torch.stack(losses).mean()
            losses.clear()
            if world > 1:
                dist.all_reduce(loss_mean)
            loss_value = loss_mean.item() / world
            acc = evaluate(model, val_data, micro_size, device, amp, rank, world)
            history.append(dict(epoch=epoch, step=step, loss=loss_value, top1=acc))
            bar.set_postfix(loss=f"{loss_value:.4f}", top1=f"{acc:.3f}")
            log(f"epoch {epoch} | step {step} | loss {loss_value:.4f} | lr {lr:.2e} | held-out top-1 {acc:.4f}")
        if epoch_done and (epoch % cfg["ckpt_every"] == 0 or step == total):
            checkpoint()
    bar.close()
    summary = dict(top1=history[-1]["top1"] if history else None,
                   best_top1=max((h["top1"] for h in history), default=None), history=history)
    log(f"final held-out top-1 {summary['top1']:.4f} (best {summary['best_top1']:.4f}) on {len(val_data)} examples")
    return summary


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:  # bad options, files or data
        sys.exit(f"finetune.py: error: {e}")
