"""Fine-tune a CausalFusion checkpoint for image captioning with FLIP's COCO caption recipe (paper Sec. 6, App. C
Table 13), scored by CIDEr-D of greedy captions of held-out images.

    python -m finetune.caption --ckpt out/captions/ckpt.pt   # the captioned demo's images, 500 new ones held out
    python -m finetune.caption --ckpt RUN/ckpt.pt --data latents/coco_train --val-data latents/coco_test \
        --tokenizer llama3/tokenizer.model --feature-layer 21
    torchrun --nproc_per_node=8 -m finetune.caption ...same options...

The captioner is the pretrained model's ViT body (x_proj, position embedding and blocks over the L tokens of a clean
latent with full attention, as classify.py's), cut after --feature-layer, under a caption head (caption_head.py: a
3-layer transformer encoder over the body's tokens, a 3-layer causal transformer decoder, width 384, 6 heads),
trained by next-token cross-entropy on one caption drawn per image with Table 13's recipe (AdamW, head lr 1e-4,
body lr 1e-5 or frozen, cosine decay). The checkpoint may be class-conditional or a text model.
Randomness as in train.py (common.py): resuming continues exactly and needs no generator state; the caption head's
dropout reseeds torch from the micro-batch's generator.
"""
import contextlib
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import demos
import tokenization
from coco.cider import cider_d
from finetune.caption_head import CaptionHead
from finetune.common import (body_tokens, data_parallel, describe_run, learning_rate, load_body, mean_latents,
                             mean_loss, open_run_dir, optimizer_step, resume_run, save_run, steps_in_epoch, summarize)
from latents import LatentData
from runtime import autocast, autocast_dtype, launch, micro_batches, parse_config, step_indices

config = dict(
    ckpt="",  # the pretrained train.py checkpoint, class-conditional or text (required)
    weights="ema",  # ema or model: which of its weights; random: its architecture freshly initialized (a baseline)
    data="",  # captioned training latents (extract_latents.py of a folder with a metadata.jsonl); "" = the captioned
      # demo's images at the checkpoint's image size
    val_data="",  # held-out captioned latents for CIDEr-D (Karpathy test); the demo draws new images
    out="out/caption",  # run dir: ckpt.pt, finetune.log
    resume=False,  # continue OUT/ckpt.pt exactly
    seed=0,  # seeds the head and every random draw
    # FLIP's COCO caption fine-tuning (paper App. C Table 13, its names and values)
    caption_lr=1e-4,  # caption head lr
    caption_body_lr=1e-5,  # other parameters lr: the body's
    caption_weight_decay=0.01,  # weight decay (AdamW; not on biases, norms and position embeddings)
    caption_dropout=0.1,  # dropout of the caption head (embeddings, attention, MLPs)
    caption_betas=(0.9, 0.999),  # optimizer momentum: AdamW betas
    caption_batch_size=256,  # batch size (global, split over ranks and micro-batches)
    device_batch_size=0,  # images per micro-batch on one GPU; a step accumulates batch / (device_batch_size x
      # ranks) of them, the same update (0 = batch / ranks)
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
    tokenizer="",  # "" = a text checkpoint's own tokenizer, else the byte one (tokenization.py); a LLaMA-3
      # tokenizer.model file (paper Sec. 6)
    text_len=0,  # caption tokens, BOS and EOS included (longer captions are cut, counted); 0 = the checkpoint's
      # text length for a text model, else 35 (paper Table 11)
    # the demo (--data "")
    demo_images=4000,  # training images of the captioned demo (train.py's: the same images)
    demo_val_images=500,  # held-out images of seen combinations, drawn with another seed
    # logging, system
    eval_every=1,  # epochs between CIDEr-D evaluations on the held-out set (and at the end)
    ckpt_every=1,  # epochs between writes of OUT/ckpt.pt (and at the end)
    device="",  # "" = cuda if available, else cpu
    dtype="",  # autocast dtype: bf16 or fp32; "" = bf16 on cuda (the paper), fp32 on cpu
)
RUN_KEYS = ("ckpt", "weights", "seed", "feature_layer", "caption_freeze_body", "caption_flip", "tokenizer", "text_len",
            "head_width", "head_heads", "head_encoder_layers", "head_decoder_layers")  # --resume checks them


# ------------------------------------------------------------------------------------------------ model
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


def build_captioner(cfg, device):
    """The captioner (the checkpoint's body, class-conditional or text, under a new caption head), its data meta,
    AdamW over Table 13's two lrs, the recipe's numbers (batch_size, epochs, warmup_epochs, lr, min_lr), the
    tokenizer and the caption length."""
    pretrained, meta = load_body(cfg["ckpt"], cfg["weights"], cfg["seed"], text_ok=True)
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
                  warmup_epochs=cfg["caption_warmup_epochs"], lr=cfg["caption_lr"], min_lr=0.0)
    return model, meta, optimizer, recipe, tok, text_len


# ------------------------------------------------------------------------------------------------ data
def open_caption_data(cfg, meta, rank):
    """(training LatentData, held-out LatentData), both with captions, for the options."""
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
            raise ValueError(f"{name} {where}: no captions (extract a folder with a metadata.jsonl for captioning)")
        if list(d.latent_shape) != list(meta["latent_shape"]):
            raise ValueError(f"{name} {where}: latents {d.latent_shape}, but --ckpt was trained on "
                             f"{tuple(meta['latent_shape'])}")
    return train_data, val_data


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


# ------------------------------------------------------------------------------------------------ run
def main(argv=None):
    cfg = dict(config)
    parse_config(cfg, argv, prog="finetune.caption")
    return launch(cfg, finetune)


def finetune(cfg, rank, world, device):
    """Fine-tune the captioner on this rank; returns {cider, best_cider, history} of the held-out evaluations."""
    # the model on the pretrained body, its optimizer and the recipe's numbers
    model, meta, optimizer, recipe, tok, text_len = build_captioner(cfg, device)
    batch = recipe["batch_size"]
    accum, _ = micro_batches(batch, cfg["device_batch_size"], world)
    micro = world * accum  # micro-batches in a global batch
    dtype = autocast_dtype(cfg["dtype"], device)
    # the run folder, the data, and where a resumed run stands
    ckpt_path, log = open_run_dir(cfg["out"], cfg["resume"], rank)
    train_data, val_data = open_caption_data(cfg, meta, rank)
    steps_per_epoch = steps_in_epoch(len(train_data), batch, "caption-batch-size")
    total = recipe["epochs"] * steps_per_epoch
    step, history = resume_run(ckpt_path, cfg, config, RUN_KEYS, model, optimizer) if cfg["resume"] else (0, [])
    train_model = data_parallel(model, world, device)
    amp = autocast(dtype, device)
    log(f"config: {json.dumps(cfg)}")
    body = "frozen body" if cfg["caption_freeze_body"] else f"body at lr {cfg['caption_body_lr']:.1e}"
    what = (f"caption fine-tuning (features of block {model.feature_layer}, {body}, {tok.kind} tokenizer, "
            f"{text_len} text tokens)")
    log(describe_run(what, cfg, model, recipe, train_size=len(train_data), val_size=len(val_data),
                     steps_per_epoch=steps_per_epoch, world=world, device=device, dtype=dtype))
    cut = [0, 0]  # captions cut to text_len, captions seen (since the last evaluation)

    def micro_loss(idx, g):
        """The loss of a micro-batch (its sample indices, its generator): next-token cross-entropy on one caption
        drawn per image."""
        x, _ = train_data.batch(idx, g, flip=cfg["caption_flip"])  # posterior sample (+ flip)
        captions = [c[int(torch.randint(len(c), (), generator=g))] for c in map(train_data.captions.__getitem__,
                                                                                   idx.tolist())]  # one per image
        ids, lengths, n_cut = tokenization.tokenize(tok, captions, text_len)  # (B, text_len), (B,)
        cut[0] += n_cut
        cut[1] += len(captions)
        ids = ids[:, :int(lengths.max())].to(device)  # (B, T): the causal mask makes the EOS padding after it inert
        lengths = lengths.to(device)
        torch.manual_seed(int(torch.randint(2 ** 62, (), generator=g)))  # the head's dropout masks, keyed as the rest
        with amp:
            logits = train_model(x.to(device), ids[:, :-1])  # (B, T - 1, V)
        targets = torch.arange(ids.shape[1] - 1, device=device)[None] < (lengths - 1)[:, None]  # (B, T - 1): to EOS
        return F.cross_entropy(logits.float()[targets], ids[:, 1:][targets])

    # train: MAE's per-step lr schedule; held-out evaluations and checkpoints at the ends of epochs
    losses = []
    bar = tqdm(total=total, initial=step, desc="steps", disable=rank > 0, dynamic_ncols=True)
    while step < total:
        lr = learning_rate(step, steps_per_epoch, recipe)
        chosen = step_indices(step, batch, len(train_data), cfg["seed"])
        losses.append(optimizer_step(train_model, optimizer, micro_loss, chosen, step=step, lr=lr, seed=cfg["seed"],
                                     grad_accum=accum, rank=rank, world=world, device=device))
        step += 1
        bar.update()
        epoch, within = divmod(step, steps_per_epoch)
        if within == 0 and (epoch % cfg["eval_every"] == 0 or step == total):
            loss = mean_loss(losses, world)
            cider, captions = evaluate_captions(model, val_data, tok, batch // micro, device, amp, rank, world)
            examples = "; ".join(f"{val_data.captions[i][0]!r} -> {captions[i]!r}"
                                 for i in range(min(3, len(val_data))))  # three held-out images' first references
            history.append({"epoch": epoch, "step": step, "loss": loss, "cider": cider})
            bar.set_postfix({"loss": f"{loss:.4f}", "cider": f"{cider:.3f}"})
            log(f"epoch {epoch} | step {step} | loss {loss:.4f} | lr {lr:.2e} | held-out CIDEr-D {cider:.4f} | "
                f"captions cut {cut[0]}/{cut[1]}\n  e.g. {examples}")
            cut[:] = [0, 0]
        if within == 0 and (epoch % cfg["ckpt_every"] == 0 or step == total) and rank == 0:
            save_run(model, optimizer, cfg, meta, step=step, history=history, tokenizer=tok.state(),
                     text_len=text_len)
    bar.close()
    return summarize(history, "cider", "CIDEr-D", len(val_data), log)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:  # bad options, files or data
        sys.exit(f"finetune.caption: error: {e}")
