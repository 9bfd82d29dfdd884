"""A few-step model's samples beside its teacher's, from the same noise: one PNG, a band per AR step count S and a
panel per (checkpoint, euler steps), one row per class (docs/flow.md, "Few-step sampling").

    python -m distill.grids --teacher out/demo/ckpt.pt --student out/few_step/ckpt.pt --out assets/few_step.png
"""
import sys

import numpy as np
import torch
from PIL import Image, ImageDraw

from checkpoint import load_checkpoint
from inference import make_diffusion, sample_batch, tokens_to_images
from runtime import parse_config
from vae import build_vae

config = dict(
    teacher="",  # the flow checkpoint the few-step model was distilled from (train.py)
    student="",  # the few-step checkpoint (distill/few_step.py)
    teacher_steps=(100, 2, 1),  # the teacher's panels: euler steps per AR step
    student_steps=(4, 2, 1),  # the student's panels
    ar_steps=(1, 4),  # one band per AR step count S (equal split, random order)
    per_class=3,  # samples per class in each panel
    cfg_scale=5.0,  # classifier-free guidance scale (the demos')
    seed=0,  # the noise, order and split: the same in every panel
    out="out/few_step_grids.png",  # the PNG
)
PAD, LABEL_H, ZOOM = 6, 14, 3  # pixels between panels, of a panel's label above it; each pixel shown ZOOM x ZOOM


def panel(model, steps, S, cfg):
    """uint8 (K H ZOOM, C W ZOOM, 3): the per_class (C) samples of each of the K classes in a row."""
    labels = torch.arange(model.num_classes).repeat_interleave(cfg["per_class"])
    tokens = sample_batch(model, make_diffusion(steps, "euler", objective="flow"), labels, cfg["seed"], ar_steps=S,
                          cfg_scale=cfg["cfg_scale"])
    images = tokens_to_images(tokens, model, build_vae("none"), 1.0)  # (N, H, W, 3)
    n, h, w, _ = images.shape
    rows = images.reshape(model.num_classes, cfg["per_class"], h, w, 3).transpose(0, 2, 1, 3, 4)  # (K, H, C, W, 3)
    grid = rows.reshape(model.num_classes * h, cfg["per_class"] * w, 3)  # (K H, C W, 3)
    return grid.repeat(ZOOM, 0).repeat(ZOOM, 1)


def main(argv=None):
    cfg = dict(config)
    parse_config(cfg, argv)
    teacher, student = load_checkpoint(cfg["teacher"])[0], load_checkpoint(cfg["student"])[0]
    runs = [("teacher", teacher, k) for k in cfg["teacher_steps"]] + [("few-step", student, k)
                                                                       for k in cfg["student_steps"]]
    bands = []
    for S in cfg["ar_steps"]:
        panels = [(f"S={S} {name} {k}", panel(model, k, S, cfg)) for name, model, k in runs]
        h, w = panels[0][1].shape[:2]
        band = Image.new("RGB", (len(panels) * (w + PAD) + PAD, h + LABEL_H + PAD), "white")
        draw = ImageDraw.Draw(band)
        for i, (label, image) in enumerate(panels):
            band.paste(Image.fromarray(np.ascontiguousarray(image)), (PAD + i * (w + PAD), LABEL_H))
            draw.text((PAD + i * (w + PAD), 1), label, fill="black")
        bands.append(band)
    out = Image.new("RGB", (bands[0].width, sum(b.height for b in bands)), "white")
    for i, band in enumerate(bands):
        out.paste(band, (0, sum(b.height for b in bands[:i])))
    out.save(cfg["out"])
    print(f"wrote {cfg['out']}: bands S = {cfg['ar_steps']}, panels {[f'{name} {k}' for name, _, k in runs]}")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:
        sys.exit(f"distill.grids: error: {e}")
