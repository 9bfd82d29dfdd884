"""Fine-tune a CausalFusion checkpoint for image classification (paper Sec. 6 "Visual Representation Learning",
Table 6b, App. C Table 12), or train a linear probe on its frozen features, or fine-tune it for captioning with
FLIP's COCO caption recipe (--task caption: App. C Table 13).

    python finetune.py --ckpt out/demo/ckpt.pt --batch-size 128   # the demo's 1,000 shapes, 1,000 new held-out ones
    python finetune.py --ckpt out/demo/ckpt.pt --probe --probe-batch-size 250 --probe-optimizer sgd  # linear probe
    python finetune.py --ckpt RUN/ckpt.pt --data latents/in256_sd --val-data latents/in256_sd_val --out runs/ft
    python finetune.py --task caption --ckpt out/captions/ckpt.pt   # the captioned demo's images, 500 new ones
    python finetune.py --task caption --ckpt RUN/ckpt.pt --data latents/coco_train --val-data latents/coco_test \
        --tokenizer llama3/tokenizer.model --feature-layer 21
    torchrun --nproc_per_node=8 finetune.py ...same options...

The classifier is the pretrained model's ViT body: x_proj, position embedding and blocks, over the L tokens of a
clean latent with full attention; no timestep embedding, label embedding, cond position embedding or cond tokens.
The last layer's tokens are averaged, then LayerNorm and a linear head (the paper, as MAE's global pooling).
Fine-tuning is MAE's recipe (Table 12): AdamW, layer-wise lr decay, cosine schedule after a linear warmup, label
smoothing, mixup and cutmix, drop path. On extracted latents the augmentation is a random flip and a posterior
sample (MAE's RandomResizedCrop and RandAugment work on pixels). The probe is MAE's: a frozen body,
BatchNorm without affine before the linear head, LARS, no weight decay.
The captioner is the same body, cut after --feature-layer, under a caption head (caption_head.py: a 3-layer
transformer encoder over the body's tokens, a 3-layer causal transformer decoder, width 384, 6 heads), trained by
next-token cross-entropy with Table 13's recipe (AdamW, head lr 1e-4, body lr 1e-5 or frozen, cosine decay) and
scored by CIDEr-D of greedy captions of the held-out images.
Randomness as in train.py: micro-batch m of step s draws from a generator seeded by (seed, s, m), so resuming
continues exactly and needs no generator state (the caption head's dropout reseeds torch from that generator).
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

import demos
import tokenization
from finetune.caption_head import CaptionHead
from checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from coco.cider import cider_d
from runtime import parse_config
from latents import LatentData
from model import CausalFusion, patchify
from runtime import autocast, autocast_dtype, launch, seeded, step_indices

config = dict(
    task="classify",  # classify (Table 12's fine-tuning, or --probe) or caption (Table 13's captioning fine-tuning)
    ckpt="",  # the pretrained train.py checkpoint (required)
    weights="ema",  # ema or model: which of its weights; random: its architecture freshly initialized (a baseline)
    data="",  # training latents (extract_latents.py; captioned for --task caption); "" = the demo's shapes at the
      # checkpoint's image size (--task caption: the captioned demo's)
    val_data="",  # held-out latents for top-1 accuracy (ImageNet val) or CIDEr-D (Karpathy test); the demo draws new
      # shapes
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
    # captioning (--task caption): FLIP's COCO caption fine-tuning (paper App. C Table 13, its names and values)
    caption_lr=1e-4,  # caption head lr
    caption_body_lr=1e-5,  # other parameters lr: the body's
    caption_weight_decay=0.01,  # weight decay (AdamW; not on biases, norms and position embeddings)
    caption_dropout=0.1,  # dropout of the caption head (embeddings, attention, MLPs)
    caption_betas=(0.9, 0.999),  # optimizer momentum: AdamW betas
    caption_batch_size=256,  # batch size (global, split over ranks and micro-batches)
    caption_epochs=20,  # training epochs
    caption_warmup_epochs=0.0,  # warmup epochs (left blank in Table 13: none), then cosine decay to 0
    caption_freeze_body=False,  # the body frozen (no gradient, features without a graph); else at --caption-body-lr
    caption_flip=False,  # random horizontal flips (off: captions that name left and right would lie)
    feature_layer=0,  # the block (1..depth) whose output tokens feed the head; 0 = the last. The paper tries the
      # 14th, 21st and 24th of L's 24 and keeps the best (App. C); later blocks are dropped
    head_width=384,  # the caption head's width (Table 13's caption head: 384)
    head_heads=6,  # its attention heads (6)
    head_encoder_layers=3,  # its transformer encoder layers (3)
    head_decoder_layers=3,  # its transformer decoder layers (3)
    tokenizer="",  # "" = a text checkpoint's own tokenizer, else the byte one (tokenizer.py); a LLaMA-3
      # tokenizer.model file (paper Sec. 6)
    text_len=0,  # caption tokens, BOS and EOS included (longer captions are cut, counted); 0 = the checkpoint's
      # text length for a text model, else 35 (paper Table 11)
    # the demo (--data "")
    demo_per_class=100,  # training images per class (train.py's demo data: the same images)
    demo_val_per_class=100,  # held-out images per class, drawn with another seed
    demo_images=4000,  # --task caption: training images of the captioned demo (train.py's: the same images)
    demo_val_images=500,  # --task caption: held-out images of seen combinations, drawn with another seed
    # logging, system
    eval_every=1,  # epochs between top-1 (CIDEr-D) evaluations on the held-out set (and at the end)
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


class Captioner(nn.Module):
    """The ViT body of a CausalFusion model (x_proj, pos_embed and its first feature_layer blocks, same names) under a
    CaptionHead (head.*) that reads the body's output tokens; freeze_body: the body gets no gradient."""

    def __init__(self, generator_model, feature_layer, vocab_size, text_len, width=384, num_heads=6,
                 encoder_layers=3, decoder_layers=3, dropout=0.1, freeze_body=False):
        super().__init__()
        g = generator_model
        depth = len(g.blocks)
        if not 0 <= feature_layer <= depth:
            raise ValueError(f"--feature-layer must be in 1..{depth} (the body's blocks; 0 = the last), got "
                             f"{feature_layer}")
        self.feature_layer = feature_layer or depth
        self.patch_size, self.depth = g.patch_size, self.feature_layer
        self.x_proj, self.pos_embed = g.x_proj, g.pos_embed
        self.blocks = g.blocks[:self.feature_layer]  # the blocks after the feature layer take no part
        self.drop_rates = [0.0] * self.feature_layer  # Table 13 has no drop path
        self.head = CaptionHead(g.x_proj.out_features, g.num_tokens, vocab_size, text_len, width, num_heads,
                                encoder_layers, decoder_layers, dropout)
        self.freeze_body = freeze_body
        if freeze_body:
            for p in self.body_parameters():
                p.requires_grad_(False)

    def body_parameters(self):
        return [p for name, p in self.named_parameters() if not name.startswith("head.")]

    def image_tokens(self, latents):
        """Scaled latents (N, C, H, W) -> the feature layer's tokens (N, L, D)."""
        with torch.no_grad() if self.freeze_body else contextlib.nullcontext():  # a frozen body builds no graph
            return body_tokens(self, latents)

    def forward(self, latents, text):
        """Latents (N, C, H, W), caption ids (N, T) from BOS -> next-token logits (N, T, V)."""
        return self.head(self.image_tokens(latents), text)

    @torch.no_grad()
    def caption(self, latents, bos, eos):
        """Greedy caption ids (N, <= text_len) of latents (N, C, H, W), from BOS."""
        return self.head.generate(self.image_tokens(latents), bos, eos)


def caption_param_groups(model, weight_decay, head_lr, body_lr):
    """Table 13: the caption head at head_lr, the other parameters (the body) at body_lr, as lr scales of head_lr;
    no weight decay on 1-d tensors (biases, norms) and position embeddings."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        head = name.startswith("head.")
        decay = 0.0 if p.ndim == 1 or name.endswith(("pos_embed", "image_pos", "text_pos")) else weight_decay
        key = (head, decay)
        if key not in groups:
            groups[key] = dict(params=[], weight_decay=decay, lr_scale=1.0 if head else body_lr / head_lr)
        groups[key]["params"].append(p)
    return list(groups.values())


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


def open_caption_data(cfg, meta, rank):
    """(training LatentData, held-out LatentData), both with captions, for --task caption."""
    if cfg["data"]:
        if not cfg["val_data"]:
            raise ValueError("--val-data is required with --data: the held-out captioned latents to score CIDEr-D on")
        train_data, val_data = LatentData(cfg["data"]), LatentData(cfg["val_data"])
    else:  # train.py's captioned demo (same seed: the pretraining images) and new seen combinations, another seed
        if meta["vae"] != "none":
            raise ValueError(f"--ckpt {cfg['ckpt']} was trained on {meta['vae']} latents, not the captioned demo's "
                             f"pixels; pass --data and --val-data")
        root, size = os.path.join(cfg["out"], "data"), meta["image_size"]
        train_data = LatentData(demos.build_caption_demo_data(os.path.join(root, "train"), size, cfg["demo_images"],
                                                               cfg["seed"], rank))
        val_data = LatentData(demos.build_caption_demo_data(os.path.join(root, "val"), size,
                                                             cfg["demo_val_images"], cfg["seed"] + 1000, rank))
    for name, d in (("--data", train_data), ("--val-data", val_data)):
        where = cfg[name[2:].replace("-", "_")] or "the captioned demo"
        if d.captions is None:
            raise ValueError(f"{name} {where}: no captions (extract a folder with a metadata.jsonl for --task caption)")
        if list(d.latent_shape) != list(meta["latent_shape"]):
            raise ValueError(f"{name} {where}: latents {d.latent_shape}, but --ckpt was trained on "
                             f"{tuple(meta['latent_shape'])}")
    return train_data, val_data


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


def evaluate_captions(model, data, tok, batch_size, device, amp, rank, world):
    """(corpus CIDEr-D, {index: caption}) of greedy captions of the held-out data (mean latents, no flip) against all
    of each image's captions; the images are split over the ranks, the captions gathered, every rank scores."""
    model.eval()
    mine = {}
    starts = range(rank * batch_size, len(data), world * batch_size)
    for start in tqdm(starts, desc="captions", disable=rank > 0, leave=False):
        stop = min(start + batch_size, len(data))
        with amp:
            ids = model.caption(mean_latents(data, start, stop).to(device), tok.bos, tok.eos)  # (B, T)
        mine.update(zip(range(start, stop), tokenization.detokenize(tok, ids[:, 1:].tolist())))
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, mine)
        mine = {k: v for part in parts for k, v in part.items()}
    model.train()
    candidates = {i: mine[i] for i in range(len(data))}
    score, _ = cider_d(candidates, {i: data.captions[i] for i in range(len(data))})
    return score, candidates


def learning_rate(step, steps_per_epoch, peak, warmup_epochs, epochs, floor):
    """MAE's per-iteration schedule: linear warmup, then half a cosine from peak to floor."""
    epoch = step / steps_per_epoch
    if epoch < warmup_epochs:
        return peak * epoch / warmup_epochs
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))


def load_body(cfg, text_ok):
    """The pretrained model (its architecture freshly initialized for --weights random) and its data meta; torch is
    seeded with --seed for what is built next (the head)."""
    if cfg["weights"] not in ("ema", "model", "random"):
        raise ValueError(f"--weights must be ema, model or random, got {cfg['weights']!r}")
    if not cfg["ckpt"]:
        raise ValueError("--ckpt is required: a train.py checkpoint to fine-tune")
    pretrained, meta = load_checkpoint(cfg["ckpt"], use_ema=cfg["weights"] != "model")
    if pretrained.text_vocab and not text_ok:
        raise ValueError(f"--ckpt {cfg['ckpt']}: a text model; fine-tuning takes a class-conditional checkpoint")
    torch.manual_seed(cfg["seed"])
    if cfg["weights"] == "random":
        pretrained = CausalFusion(**pretrained.config)
    return pretrained, dict(meta, model_config=pretrained.config)


def build(cfg, device):
    """The classifier from the pretrained checkpoint, its optimizer and the recipe's numbers."""
    pretrained, meta = load_body(cfg, text_ok=False)
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


def build_captioner(cfg, device):
    """The captioner (the checkpoint's body, class-conditional or text, under a new caption head), its tokenizer,
    AdamW over Table 13's two lrs and the recipe's numbers."""
    pretrained, meta = load_body(cfg, text_ok=True)
    # a text checkpoint's own tokenizer (and text length) unless --tokenizer names one: its captions fit them
    own = meta.get("tokenizer") if not cfg["tokenizer"] else None
    tok = tokenization.from_state(own) if own else tokenization.build_tokenizer(cfg["tokenizer"])
    text_len = cfg["text_len"] or pretrained.config.get("text_len") or 35
    if text_len < 3:
        raise ValueError(f"--text-len must hold BOS, a token and EOS (3), got {text_len}")
    for key in ("caption_lr", "caption_body_lr"):
        if cfg[key] <= 0 and not (key == "caption_body_lr" and cfg["caption_freeze_body"]):
            raise ValueError(f"--{key.replace('_', '-')} must be > 0, got {cfg[key]} (to freeze the body: "
                             f"--caption-freeze-body)")
    model = Captioner(pretrained, cfg["feature_layer"], tok.vocab_size, text_len, cfg["head_width"],
                      cfg["head_heads"], cfg["head_encoder_layers"], cfg["head_decoder_layers"],
                      cfg["caption_dropout"], cfg["caption_freeze_body"]).to(device).train()
    groups = caption_param_groups(model, cfg["caption_weight_decay"], cfg["caption_lr"], cfg["caption_body_lr"])
    for group in groups:
        group["lr"] = cfg["caption_lr"] * group["lr_scale"]
    optimizer = torch.optim.AdamW(groups, betas=cfg["caption_betas"])
    recipe = dict(batch_size=cfg["caption_batch_size"], epochs=cfg["caption_epochs"],
                  warmup_epochs=cfg["caption_warmup_epochs"], min_lr=0.0, lr=cfg["caption_lr"])
    return model, meta, optimizer, recipe, tok, text_len


class ClassifyTask:
    """Table 12's fine-tuning or MAE's linear probe (--probe): what finetune()'s loop needs of a task."""
    metric, metric_name = "top1", "top-1"
    resume_keys = ("task", "ckpt", "weights", "probe", "per_class", "seed")  # what the run's course depends on

    def __init__(self, cfg, device):
        self.cfg = cfg
        self.model, self.meta, self.optimizer, self.recipe = build(cfg, device)
        self.batch_option = "probe-batch-size" if cfg["probe"] else "batch-size"

    def open_data(self, rank):
        self.train_data, self.indices, self.val_data = open_data(self.cfg, self.meta, rank)

    def describe(self):
        return "linear probe" if self.cfg["probe"] else "fine-tuning"

    def loss(self, train_model, idx, g, device, amp):
        cfg, num_classes = self.cfg, self.meta["num_classes"]
        x, y = self.train_data.batch(idx, g)  # flip + posterior sample
        x, target = (x, F.one_hot(y, num_classes).float()) if cfg["probe"] else mix(x, y, num_classes, cfg, g)
        with amp:
            logits = train_model(x.to(device), g)
        return F.cross_entropy(logits.float(), target.to(device))  # soft targets

    def evaluate(self, batch_size, device, amp, rank, world):
        return evaluate(self.model, self.val_data, batch_size, device, amp, rank, world), ""

    def checkpoint_extras(self):
        return {}


class CaptionTask:
    """Table 13's captioning fine-tuning (--task caption): next-token cross-entropy on a caption drawn per image,
    CIDEr-D of greedy captions of the held-out images."""
    metric, metric_name = "cider", "CIDEr-D"
    resume_keys = ("task", "ckpt", "weights", "seed", "feature_layer", "caption_freeze_body", "caption_flip",
                   "tokenizer", "text_len", "head_width", "head_heads", "head_encoder_layers", "head_decoder_layers")
    batch_option = "caption-batch-size"

    def __init__(self, cfg, device):
        self.cfg = cfg
        self.model, self.meta, self.optimizer, self.recipe, self.tok, self.text_len = build_captioner(cfg, device)
        self.cut = [0, 0]  # captions cut to text_len, captions seen (since the last evaluation)

    def open_data(self, rank):
        self.train_data, self.val_data = open_caption_data(self.cfg, self.meta, rank)
        self.indices = torch.arange(len(self.train_data))

    def describe(self):
        c = self.cfg
        body = "frozen body" if c["caption_freeze_body"] else f"body at lr {c['caption_body_lr']:.1e}"
        return (f"caption fine-tuning (features of block {self.model.feature_layer}, {body}, {self.tok.kind} "
                f"tokenizer, {self.text_len} text tokens)")

    def loss(self, train_model, idx, g, device, amp):
        x, _ = self.train_data.batch(idx, g, flip=self.cfg["caption_flip"])  # posterior sample (+ flip)
        captions = [c[int(torch.randint(len(c), (), generator=g))] for c in map(self.train_data.captions.__getitem__,
                                                                                   idx.tolist())]  # one per image
        ids, lengths, cut = tokenization.tokenize(self.tok, captions, self.text_len)  # (B, text_len), (B,)
        self.cut[0] += cut
        self.cut[1] += len(captions)
        ids = ids[:, :int(lengths.max())].to(device)  # (B, T): the causal mask makes the EOS padding after it inert
        lengths = lengths.to(device)
        torch.manual_seed(int(torch.randint(2 ** 62, (), generator=g)))  # the head's dropout masks, keyed as the rest
        with amp:
            logits = train_model(x.to(device), ids[:, :-1])  # (B, T - 1, V)
        targets = torch.arange(ids.shape[1] - 1, device=device)[None] < (lengths - 1)[:, None]  # (B, T - 1): to EOS
        return F.cross_entropy(logits.float()[targets], ids[:, 1:][targets])

    def evaluate(self, batch_size, device, amp, rank, world):
        score, captions = evaluate_captions(self.model, self.val_data, self.tok, batch_size, device, amp, rank, world)
        examples = "; ".join(f"{self.val_data.captions[i][0]!r} -> {captions[i]!r}" for i in range(min(3, len(captions))))
        cut = f" | captions cut {self.cut[0]}/{self.cut[1]}"
        self.cut = [0, 0]
        return score, f"{cut}\n  e.g. {examples}"

    def checkpoint_extras(self):
        return {"tokenizer": self.tok.state(), "text_len": self.text_len}


TASKS = {"classify": ClassifyTask, "caption": CaptionTask}


def main(argv=None):
    cfg = dict(config)
    parse_config(cfg, argv)
    return launch(cfg, finetune)


def finetune(cfg, rank, world, device):
    if cfg["task"] not in TASKS:
        raise ValueError(f"--task must be classify or caption, got {cfg['task']!r}")
    if cfg["task"] == "caption" and (cfg["probe"] or cfg["per_class"]):
        raise ValueError("--probe and --per-class are for --task classify (the captioner's frozen body: "
                         "--caption-freeze-body)")
    out, micro = cfg["out"], world * cfg["grad_accum"]
    task = TASKS[cfg["task"]](cfg, device)
    model, meta, optimizer, recipe = task.model, task.meta, task.optimizer, task.recipe
    batch = recipe["batch_size"]
    dtype = autocast_dtype(cfg["dtype"], device)
    if batch % micro:
        raise ValueError(f"need the batch ({batch}) divisible by ranks x --grad-accum ({world} x {cfg['grad_accum']})")
    ckpt_path = os.path.join(out, "ckpt.pt")
    if os.path.exists(ckpt_path) and not cfg["resume"]:
        raise FileExistsError(f"{ckpt_path} exists: pass --resume to continue that run, or choose another --out")
    os.makedirs(out, exist_ok=True)
    task.open_data(rank)
    indices, val_data = task.indices, task.val_data
    if len(indices) < batch:
        raise ValueError(f"{len(indices)} training examples, fewer than one batch ({batch}): lower --"
                         f"{task.batch_option}")
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
        diff = {k: (ckpt["config"].get(k, config[k]), cfg[k]) for k in task.resume_keys
                if ckpt["config"].get(k, config[k]) != cfg[k]}  # a key the file lacks had its default
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
    log(f"{task.describe()} of {cfg['ckpt']} ({cfg['weights']} weights): "
        f"{trainable:.3f}M trainable of {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; "
        f"{len(indices)} training and {len(val_data)} held-out examples; {recipe['epochs']} epochs of "
        f"{steps_per_epoch} steps at batch {batch}, peak lr {recipe['lr']:.2e}; {world} rank(s) on {device} ({dtype})")

    def checkpoint():
        if rank == 0:
            save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                             "history": history, "config": cfg, "pretrained_config": meta["model_config"],
                             "data": {k: meta[k] for k in ("vae", "latent_shape", "num_classes", "class_names")},
                             **task.checkpoint_extras()}, out, False)

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
            sync = world == 1 or a == cfg["grad_accum"] - 1
            with contextlib.nullcontext() if sync else train_model.no_sync():
                loss = task.loss(train_model, chosen[m * micro_size:(m + 1) * micro_size], g, device, amp)
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
            score, more = task.evaluate(micro_size, device, amp, rank, world)
            history.append({"epoch": epoch, "step": step, "loss": loss_value, task.metric: score})
            bar.set_postfix({"loss": f"{loss_value:.4f}", task.metric: f"{score:.3f}"})
            log(f"epoch {epoch} | step {step} | loss {loss_value:.4f} | lr {lr:.2e} | held-out {task.metric_name} "
                f"{score:.4f}{more}")
        if epoch_done and (epoch % cfg["ckpt_every"] == 0 or step == total):
            checkpoint()
    bar.close()
    metric = task.metric
    summary = {metric: history[-1][metric] if history else None,
               f"best_{metric}": max((h[metric] for h in history), default=None), "history": history}
    log(f"final held-out {task.metric_name} {summary[metric]:.4f} (best {summary['best_' + metric]:.4f}) on "
        f"{len(val_data)} examples")
    return summary


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:  # bad options, files or data
        sys.exit(f"finetune.py: error: {e}")
