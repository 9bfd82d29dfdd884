"""Checkpoints: atomic writes, and one reader for train.py's files and the authors' released ones.

train.py's ckpt.pt holds model, ema, optimizer, step, config (its options, the objective among them: a run before
--objective existed is eps), model_config, data (the latent format) and rng (and a text model's tokenizer); the
fine-tunes' (finetune/classify.py, finetune/caption.py) hold their classifier or captioner. The authors' files hold
model, ema and their pickled argparse args (eps); their model config is read off the tensor shapes. Everything is
plain tensors and values, read with torch.load(weights_only=True).
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
    """The dict of a checkpoint file (either format), on the CPU; a file that is not one (truncated, another
    format) is a ValueError naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):  # the authors pickle their args
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, OSError, pickle and zip errors for a bad file
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}: {why[:200]}); expected a file of "
                         f"train.py, the fine-tunes (finetune/) or the authors' code, written whole") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path}: holds a {type(ckpt).__name__}, not a checkpoint dict")
    return ckpt


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
                image_size=grid * patch * down, num_classes=rows - 1, class_names=None, objective="eps")
    return model_config, meta


def _weights(ckpt, path, use_ema, vae):
    """(state dict, model config, data meta) of a read train.py or authors' checkpoint."""
    key = "ema" if use_ema else "model"
    if key not in ckpt:
        raise ValueError(f"{path}: no {key!r} weights (keys: {list(ckpt)[:8]}); see --ema")
    sd = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in ckpt[key].items()}  # DDP/compile
    if "model_config" in ckpt:
        return sd, ckpt["model_config"], dict(ckpt["data"], tokenizer=ckpt.get("tokenizer"), objective=objective(ckpt))
    if "args" in ckpt:
        return (sd, *authors_config(sd, vae or "mar"))
    raise ValueError(f"{path}: neither a train.py checkpoint (model_config) nor the authors' (args)")


def objective(ckpt):
    """The objective (diffusion.py) a train.py checkpoint was trained with: eps before --objective existed."""
    return ckpt.get("config", {}).get("objective", "eps")


def load_checkpoint(path, use_ema=True, vae=None, ckpt=None):
    """A train.py or authors' checkpoint -> (CausalFusion in eval mode on the CPU, data meta dict with the
    objective); vae names the authors' checkpoint's VAE (default mar); ckpt: the file's dict where the caller has
    read it already (read_checkpoint). A weight that does not fit the config is an error listing all."""
    sd, model_config, meta = _weights(read_checkpoint(path) if ckpt is None else ckpt, path, use_ema, vae)
    key = "ema" if use_ema else "model"
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


def check_resumable(ckpt, path, model_config, data_info, tokenizer, run_objective="eps"):
    """Refuse (with the differences) a train.py checkpoint whose objective, model, latent format or tokenizer is not
    this run's."""
    if objective(ckpt) != run_objective:
        raise ValueError(f"--resume: {path} was trained with --objective {objective(ckpt)}, this run has --objective "
                         f"{run_objective}; resume with --objective {objective(ckpt)}, or use a new --out")
    if tokenizer is not None:  # first: another tokenizer also means another text vocabulary in the model config
        theirs, ours = ckpt.get("tokenizer", {}), tokenizer.state()
        if (theirs.get("kind"), theirs.get("sha256")) != (ours["kind"], ours.get("sha256")):
            raise ValueError(f"--resume: {path} was trained with another tokenizer (checkpoint: {theirs.get('kind')} "
                             f"{theirs.get('sha256', '')}, this run: {ours['kind']} {ours.get('sha256', '')}); pass "
                             f"the original --tokenizer or --learn-tokenizer")
    data_keys = ("vae", "scale_factor", "latent_shape", "num_classes")  # what the weights depend on
    for what, theirs, ours, keys in (("data", ckpt["data"], data_info, data_keys),
                                     ("model", ckpt["model_config"], model_config, model_config)):
        diff = {k: (theirs.get(k), ours[k]) for k in keys if theirs.get(k) != ours[k]}
        if diff:
            raise ValueError(f"--resume: {path} was trained with another {what} configuration; (checkpoint, this "
                             f"run): {diff}. Resume with the original options, or use a new --out.")


def init_from(model, path, use_ema=True):
    """Copy the weights of a train.py or authors' checkpoint into a freshly initialized model (train.py
    --init-from: a new run from someone's weights). What may differ, and how it is carried over:
      the class count: the rows of the classes both share (by index) are copied, the null class row goes to the
        null class row, new classes keep their fresh initialization;
      the latent grid: a learned position embedding is resized bicubically (as a 2-D grid), the fixed sin-cos one
        is the model's own, recomputed for its grid.
    Anything else that does not fit (another width, depth, patch, channels, class-token count, a tensor one side
    lacks) is a ValueError listing all of it. Returns the list of the carried-over differences, for the log."""
    sd, _, _ = _weights(read_checkpoint(path), path, use_ema, None)
    own, notes, problems = model.state_dict(), [], []
    problems += [f"unexpected {k} {tuple(v.shape)}" for k, v in sd.items() if k not in own]
    for key, fresh in own.items():
        if key not in sd:
            problems.append(f"missing {key} {tuple(fresh.shape)}")
            continue
        theirs = sd[key].to(fresh.dtype)
        if theirs.shape == fresh.shape:
            fresh.copy_(theirs)
        elif key == "y_embedder.embedding_table.weight" and theirs.shape[1] == fresh.shape[1]:
            shared = min(len(theirs), len(fresh)) - 1  # the last row is the null class on both sides
            fresh[:shared] = theirs[:shared]
            fresh[-1] = theirs[-1]
            notes.append(f"classes: {len(theirs) - 1} -> {len(fresh) - 1} (the first {shared} and the null class "
                         f"copied)")
        elif key == "pos_embed" and theirs.shape[2] == fresh.shape[2]:
            if model.pos_embed.requires_grad:  # learned: resize the grid
                old, new = math.isqrt(theirs.shape[1]), math.isqrt(fresh.shape[1])
                grid = theirs[0].T.reshape(1, -1, old, old)  # (1, D, g, g)
                grid = torch.nn.functional.interpolate(grid.float(), size=(new, new), mode="bicubic",
                                                       align_corners=False)
                fresh.copy_(grid.reshape(-1, new * new).T[None])  # (1, L, D)
                notes.append(f"learned position embedding resized from {old}x{old} to {new}x{new}")
            else:
                notes.append(f"fixed sin-cos position embedding recomputed for {math.isqrt(fresh.shape[1])}x"
                             f"{math.isqrt(fresh.shape[1])}")
        else:
            problems.append(f"{key}: checkpoint {tuple(theirs.shape)}, this run {tuple(fresh.shape)}")
    if problems:
        raise ValueError(f"--init-from {path}: these weights do not fit this run's model:\n  " + "\n  ".join(problems))
    return notes
