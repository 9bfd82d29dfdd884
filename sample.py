"""Sampling from CausalFusion (paper Sec. 3, 6, App. D): diffusion mode, AR mode, zero-shot editing, text-to-image
and captioning, over the generation engine of inference.py.

    python sample.py --ckpt RUN/ckpt.pt --num-samples 64 --ar-steps 4 --cfg-scale 1.5 --seed 0
    python sample.py --ckpt RUN/ckpt.pt --num-samples 64 --sampler dpm++sde --steps 20   # fast (docs/sampling.md)
    python sample.py --ckpt RUN/ckpt.pt --num-samples 50000 --cfg-scale 1.5 --out samples.npz   # FID (fid.py)
    torchrun --nproc_per_node 8 sample.py ...same options...                       # same npz, 8x faster
    python sample.py --ckpt RUN/ckpt.pt --edit photo.png --keep outer --classes 3 7  # zero-shot editing
    python sample.py --ckpt RUN/ckpt.pt --prompts "a red circle" "a small blue star" --num-samples 8  # text model
    python sample.py --ckpt RUN/ckpt.pt --caption photos/ --out captions.jsonl                    # captioning

Randomness comes from one generator per global batch, seeded by (seed, batch index), and ranks take whole
batches, so the samples do not depend on the number of processes.
"""
import hashlib
import json
import os
import sys
import time

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from runtime import parse_config
from inference import (caption_images, check_sampling_options, edit_tokens, encode_images, gather, keep_mask,
                       load_model, make_diffusion, sample_batch, sample_images, sample_seed, tokens_to_images)
from images import GRID_PIXELS, IMAGE_EXTENSIONS, center_crop, read_image, read_npz_images, save_grid
from runtime import autocast, autocast_dtype, distributed

config = dict(
    ckpt="",  # a checkpoint of train.py, or of the authors' code (keys model/ema/args)
    ema=True,  # sample with the EMA weights (false: the raw "model" weights)
    vae=None,  # sd, mar or none; default: the checkpoint's (the authors' checkpoints: mar)
    vae_ckpt=None,  # VAE weights (vae.py); "random" = random weights, for speed measurements
    num_samples=16,  # images to generate (editing: rows of edits)
    batch_size=64,  # images per global batch; with the seed it fixes the samples (docs/sampling.md, "Batch size")
    classes=[],  # class indices or names, cycled over the samples; empty or "random": uniformly random (DiT,
      # ADM); "balanced": every class in turn (50,000 samples: 50 per class, as MAR)
    ar_steps=1,  # AR steps S: 1 = diffusion mode, L = token by token
    split="equal",  # AR step sizes: equal, or random (a uniformly random composition of L)
    order="random",  # order of the tokens over the AR steps: random (per sample), raster or block_raster
    order_block=2,  # block side (in tokens) of --order block_raster (as train.py's)
    sampler="",  # "" = the checkpoint objective's default; eps: ddpm (the paper's, ancestral), ddim, dpm++
      # (DPM-Solver++ 2M) or dpm++sde (its SDE form); flow: euler (the default), dpm++ or dpm++sde (docs/flow.md)
    steps=0,  # sampler steps per AR step (eps: respaced from 1000); 0 = the sampler's default (ddpm 250, the paper's)
    eta=0.0,  # --sampler ddim: its noise, 0 (deterministic) to 1 (DDPM-like)
    spacing="",  # the timesteps a fast sampler visits: uniform, trailing or logsnr ("" = the sampler's default)
    cfg_scale=1.0,  # classifier-free guidance scale s >= 1 (1 = no guidance)
    cfg_interval=(0.0, 1000.0),  # guide only for lo <= t < hi of the 1000-step schedule (as the authors); a flow
      # time t counts as the first timestep with at most its SNR ((1 - t) / t)^2: the same region of noise
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
    prompts=[],  # text-to-image: prompts, cycled over the samples (editing a text model: the new prompts)
    prompts_file="",  # text-to-image: a UTF-8 file of prompts, one per line, after --prompts
    caption="",  # captioning instead: an image, a folder of images, or an .npz (arr_0); --out takes a .jsonl
    temperature=0.0,  # captioning: 0 = greedy decoding, else sampling at this temperature
    top_k=0,  # captioning: sample among the k most likely tokens (0 = all)
    tokenizer="",  # the tokenizer file training used: checked against the copy in the checkpoint (optional)
)


# ------------------------------------------------------------------------------------------ class and text samples
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


def read_prompts(cfg):
    """--prompts, then the lines of --prompts-file (blank lines skipped)."""
    prompts = [str(p) for p in cfg["prompts"]]
    if cfg["prompts_file"]:
        if not os.path.isfile(cfg["prompts_file"]):
            raise FileNotFoundError(f"--prompts-file {cfg['prompts_file']}: no such file")
        with open(cfg["prompts_file"], encoding="utf-8") as f:
            prompts += [line.strip() for line in f if line.strip()]
    return prompts


def provenance(cfg, diffusion, dtype):
    """How an .npz was made (fid.py prints it beside the scores): the checkpoint, the weights and every option
    that changes the samples."""
    sha = hashlib.sha256()
    with open(cfg["ckpt"], "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            sha.update(block)
    return dict(ckpt=os.path.basename(cfg["ckpt"]), ckpt_sha256=sha.hexdigest(), weights="ema" if cfg["ema"] else
                "model", objective=diffusion.objective.kind, sampler=diffusion.name, steps=len(diffusion.timesteps),
                eta=diffusion.eta, spacing=diffusion.spacing, cfg_scale=cfg["cfg_scale"],
                cfg_interval=list(cfg["cfg_interval"]),
                ar_steps=cfg["ar_steps"], order=cfg["order"], split=cfg["split"], classes=cfg["classes"],
                **({"order_block": cfg["order_block"]} if cfg["order"] == "block_raster" else {}),
                num_samples=cfg["num_samples"], seed=cfg["seed"], batch_size=cfg["batch_size"], dtype=dtype,
                torch=torch.__version__)


def run_samples(cfg, model, vae, scale, classes, prompts, tokenizer, dtype, diffusion, options, rank, world):
    """Class or text-to-image samples, shared over the ranks: --out (.npz) or one PNG each, and grid.png."""
    start = time.time()
    images, labels, index = sample_images(model, vae, scale, cfg["num_samples"], classes, diffusion=diffusion,
                                          seed=cfg["seed"], batch_size=cfg["batch_size"], dtype=dtype, rank=rank,
                                          world_size=world, prompts=prompts or None, tokenizer=tokenizer, **options)
    images, labels = gather(images, labels, index, rank, world, cfg["out_dir"])
    if rank > 0:
        return
    print(f"sampled {len(images)} images in {time.time() - start:.2f} s")
    if cfg["out"]:
        made = json.dumps(provenance(cfg, diffusion, dtype))
        np.savez(cfg["out"], arr_0=images, provenance=np.array(made), **{"prompts" if prompts else "labels": labels})
        print(f"wrote {cfg['out']}: arr_0 {images.shape} {images.dtype}; made by {made}")
    else:
        for i, image in enumerate(images):
            Image.fromarray(image).save(os.path.join(cfg["out_dir"], f"{i:06d}.png"))
    save_grid(images[:64], os.path.join(cfg["out_dir"], "grid.png"), ncol=8,
              captions=list(labels[:64]) if prompts else None, zoom_to=GRID_PIXELS)


# ------------------------------------------------------------------------------------------ zero-shot editing
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
        images = read_npz_images(path, "--edit")
        if not 0 <= index < len(images):
            raise ValueError(f"--edit-index {index}: {path} holds {len(images)} images")
        image = Image.fromarray(images[index])
    else:
        image = read_image(path, "--edit")
    return np.asarray(center_crop(image, size))[None]


def run_edit(cfg, model, meta, vae, scale, classes, dtype, diffusion, options, prompts=None, tokenizer=None):
    """--edit / --edit-class: originals, their edits (one per class, or a text model's prompts), and the figure;
    returns its path."""
    keep, rows = keep_mask(cfg["keep"], model.grid_size), cfg["num_samples"]
    if cfg["edit"]:
        image = load_image(cfg["edit"], cfg["edit_index"], meta["image_size"])
        originals = encode_images(image, model, vae, scale).expand(rows, -1, -1)  # one image, R rows of edits
    elif prompts:
        raise ValueError("--edit-class generates class-conditional originals: a text model edits an --edit image")
    else:  # what a plain run with --classes edit_class --batch-size R gives (batch 0)
        check_sampling_options(model, classes=[cfg["edit_class"]], **options)
        originals = sample_batch(model, diffusion, torch.full((rows,), cfg["edit_class"]), sample_seed(cfg["seed"], 0),
                                 dtype=dtype, **options)
    edits = edit_tokens(model, originals, keep, classes, cfg["seed"], diffusion, dtype, prompts, tokenizer, **options)
    path = os.path.join(cfg["out_dir"], f"edit_{os.path.basename(cfg['keep']).removesuffix('.png')}.png")
    edit_figure(tokens_to_images(originals, model, vae, scale), tokens_to_images(edits.flatten(0, 1), model, vae,
                scale), keep, path)
    return path


# ------------------------------------------------------------------------------------------ captioning
def caption_sources(src, size):
    """--caption SRC -> (sources, uint8 images (N, size, size, 3)): an image (its file name), a folder (every image
    under it, sorted, by relative path) or an .npz (arr_0; the integer indices); centre-cropped to size."""
    if src.endswith(".npz"):
        images = read_npz_images(src, "--caption")
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
    return names, np.stack([np.asarray(center_crop(read_image(path, "--caption"), size)) for path in paths])


def run_captions(cfg, model, meta, vae, scale, tokenizer, dtype):
    """--caption: one caption per image, written to --out (.jsonl) or printed; the first 64 images with their
    captions in OUT_DIR/captions.png."""
    sources, images = caption_sources(cfg["caption"], meta["image_size"])
    device = model.x_proj.weight.device
    g = torch.Generator(device).manual_seed(cfg["seed"])
    texts = []
    for i in tqdm(range(0, len(images), cfg["batch_size"]), desc="captions"):
        with autocast(dtype, device):
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


# ------------------------------------------------------------------------------------------ main
def main(argv=None):
    cfg = dict(config)
    parse_config(cfg, argv)
    if not cfg["ckpt"]:
        raise ValueError("--ckpt is required: a checkpoint of train.py or of the authors' code")
    suffix, what = (".jsonl", "a .jsonl file (captions)") if cfg["caption"] else (".npz", "an .npz file (for fid.py)")
    if cfg["out"] and not cfg["out"].endswith(suffix):  # np.savez would quietly append .npz
        raise ValueError(f"--out must name {what}, got {cfg['out']!r}")
    with distributed(cfg["device"]) as (rank, world, device):
        dtype = autocast_dtype(cfg["dtype"], device)
        model, meta, vae, scale, tokenizer = load_model(cfg, device)
        # the checkpoint's objective picks the samplers: a sampler of the other one is an error naming both
        diffusion = make_diffusion(cfg["steps"], cfg["sampler"], cfg["eta"], cfg["spacing"], meta["objective"])
        prompts = read_prompts(cfg)
        if model.text_vocab and not prompts and not cfg["caption"]:
            raise ValueError(f"{cfg['ckpt']} is a text model: give --prompts / --prompts-file, or --caption SRC")
        if not model.text_vocab and (prompts or cfg["caption"]):
            raise ValueError(f"{cfg['ckpt']} is a class-conditional model: --prompts, --prompts-file and --caption "
                             f"need a model trained on captions")
        classes = parse_classes(cfg["classes"], model.num_classes, meta.get("class_names"))
        options = {k: cfg[k] for k in ("ar_steps", "split", "order", "order_block", "cfg_scale", "cfg_interval")}
        os.makedirs(cfg["out_dir"], exist_ok=True)
        start = time.time()
        if cfg["caption"]:
            if rank == 0:
                run_captions(cfg, model, meta, vae, scale, tokenizer, dtype)
        elif cfg["edit"] or cfg["edit_class"] >= 0:
            if not classes and not prompts:
                raise ValueError("editing needs --classes: the new class(es) of the regenerated region (a text "
                                 "model: --prompts)")
            if rank == 0:
                path = run_edit(cfg, model, meta, vae, scale, classes, dtype, diffusion, options, prompts, tokenizer)
                print(f"wrote {path} ({time.time() - start:.1f} s)")
        else:
            run_samples(cfg, model, vae, scale, classes, prompts, tokenizer, dtype, diffusion, options, rank, world)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, ImportError, FloatingPointError) as e:  # bad options or files, a missing
        sys.exit(f"sample.py: error: {e}")  # optional package, a non-finite batch
