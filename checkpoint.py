"""Checkpoints: atomic writes, and one reader for train.py's files and the authors' released ones.

train.py's ckpt.pt holds model, ema, optimizer, step, config, model_config, data (the latent format) and rng
(and a text model's tokenizer); finetune.py's holds its classifier. The authors' files hold model, ema and their
pickled argparse args; their model config is read off the tensor shapes. Everything is plain tensors and values,
read with torch.load(weights_only=True).
"""
import argparse
import math
import os

import torch

from model import CausalFusion
from vae import SCALE_FACTORS, VAE_CONFIGS


def save_checkpoint(ckpt, out, numbered):
    """torch.save to OUT/ckpt.pt (and OUT/ckpt_<step>.pt if numbered) through a temporary file, fsync, rename: a
    kill at any moment leaves the previous file whole."""
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


def read_checkpoint(path):
    """The dict of a checkpoint file (either format), on the CPU."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    with torch.serialization.safe_globals([argparse.Namespace]):  # the authors pickle their args
        return torch.load(path, map_location="cpu", weights_only=True)


def authors_config(sd, vae):
    """Model config and data meta of an authors' checkpoint, inferred from its tensor shapes."""
    hidden, token_dim = sd["x_proj.weight"].shape
    vae_config = VAE_CONFIGS.get(vae, dict(z_channels=3, ch_mult=(1,)))  # "none": 3 channels, no downsampling
    channels, down = vae_config["z_channels"], 2 ** (len(vae_config["ch_mult"]) - 1)
    patch = math.isqrt(token_dim // channels)
    grid = math.isqrt(sd["pos_embed"].shape[1])
    rows, width = sd["y_embedder.embedding_table.weight"].shape
    num_cond = sd["cond_pos_embed"].shape[1]
    model_config = dict(hidden_size=hidden, depth=len({k.split(".")[1] for k in sd if k.startswith("blocks.")}),
                        num_heads=hidden // sd["blocks.0.attn.q_norm.weight"].numel(), input_size=grid * patch,
                        patch_size=patch, in_channels=channels, num_classes=rows - 1, num_cond_tokens=num_cond,
                        cond_repeat=num_cond // (width // hidden), learn_pos=True,
                        mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / hidden)
    meta = dict(vae=vae, scale_factor=SCALE_FACTORS[vae], latent_shape=[channels, grid * patch, grid * patch],
                image_size=grid * patch * down, num_classes=rows - 1, class_names=None)
    return model_config, meta


def load_checkpoint(path, use_ema=True, vae=None):
    """A train.py or authors' checkpoint -> (CausalFusion in eval mode on the CPU, data meta dict); vae names the
    authors' checkpoint's VAE (default mar). A weight that does not fit the config is an error listing all."""
    ckpt = read_checkpoint(path)
    key = "ema" if use_ema else "model"
    if key not in ckpt:
        raise ValueError(f"{path}: no {key!r} weights (keys: {list(ckpt)[:8]}); see --ema")
    sd = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in ckpt[key].items()}  # DDP/compile
    if "model_config" in ckpt:
        model_config, meta = ckpt["model_config"], dict(ckpt["data"], tokenizer=ckpt.get("tokenizer"))
    elif "args" in ckpt:
        model_config, meta = authors_config(sd, vae or "mar")
    else:
        raise ValueError(f"{path}: neither a train.py checkpoint (model_config) nor the authors' (args)")
    model = CausalFusion(**model_config)
    expected = model.state_dict()
    problems = ([f"missing {k} {tuple(v.shape)}" for k, v in expected.items() if k not in sd]
                + [f"unexpected {k} {tuple(v.shape)}" for k, v in sd.items() if k not in expected]
                + [f"{k}: checkpoint {tuple(sd[k].shape)}, config {tuple(v.shape)}"
                   for k, v in expected.items() if k in sd and sd[k].shape != v.shape])
    if problems:
        more = f"\n  ... {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ValueError(f"{path}: the {key} weights do not match the model config {model_config}:\n  "
                         + "\n  ".join(problems[:20]) + more)
    model.load_state_dict(sd)
    return model.eval(), meta


def check_resumable(ckpt, path, model_config, data_info, tokenizer):
    """Refuse (with the differences) a train.py checkpoint whose model, latent format or tokenizer is not this
    run's."""
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
