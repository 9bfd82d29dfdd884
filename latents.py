"""The latent data format: extraction of an image folder into VAE posterior moments (extract, the writer run by
extract_latents.py and by the demos) and LatentData, the reader that training and fine-tuning draw from.

Two layouts of an image folder DIR:
  DIR/<class>/<image>    class folders: classes sorted by folder name give the labels 0..K-1
  DIR/metadata.jsonl     captioned images (the imagefolder layout of Hugging Face datasets and diffusers): one
                         JSON object a line, {"file_name": "<path under DIR>", "text": "<caption>" or
                         ["<caption>", ...]}; images in line order, all captions kept, no classes (labels 0)
Each image gets the ADM centre crop, then the moments of it and of its horizontal flip are stored; training
(LatentData) picks a flip and samples z = mean + exp(logvar / 2) * eps per example, as fast-DiT and MAR do.

Output directory:
  plan.json         the options and the hashes of the file list (and of metadata.jsonl): a re-run with the same
                    options resumes, others refuse
  shard_00000.npy   float16 (n, 2, K, C, h, w): n images, [as is, flipped], K = 2 [mean, logvar] (K = 1 for
                    --vae none: the pixels in [-1, 1]); unscaled; fp16 halves the disk of fp32 and is precise
                    enough for moments of this range
  shard_00000.json  that shard's labels, skipped files (and captions); written after its .npy: it marks the
                    shard done
  labels.npy        int64 (N,), in shard order
  captions.json     captioned data only: a JSON list of N lists of caption strings, in shard order (one line each)
  meta.json         vae, scale_factor, image_size, latent_shape, count, skipped, class names, captioned,
                    num_captions, shard list; written last, so its presence means the extraction is complete
"""
import hashlib
import itertools
import json
import math
import os
import time

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from images import IMAGE_EXTENSIONS, center_crop
from runtime import DTYPES, autocast, barrier, distributed
from vae import build_vae

FORMAT = "nanocausalfusion-latents-v1"


class ExtractionError(ValueError):
    pass


# ------------------------------------------------------------------------------------------ listing
def list_images(root):
    """ImageFolder listing: (paths, labels, class_names) with classes sorted by name and files sorted."""
    if not os.path.isdir(root):
        raise ExtractionError(f"--data {root!r}: not a directory")
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ExtractionError(f"--data {root}: no class folders (expected {root}/<class>/<image>)")
    paths, labels = [], []
    for label, name in enumerate(classes):
        found = sorted(os.path.join(d, f) for d, _, files in os.walk(os.path.join(root, name), followlinks=True)
                       for f in files if f.lower().endswith(IMAGE_EXTENSIONS))
        if not found:
            raise ExtractionError(f"--data {root}: class folder {name!r} holds no images ({IMAGE_EXTENSIONS})")
        paths += found
        labels += [label] * len(found)
    return paths, labels, classes


def _check_line(line, root, seen, lineno):
    """One metadata.jsonl line -> (relative path, [captions]); a ValueError says what is wrong with it."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON at column {e.colno}: {e.msg}")  # its "line 1" would mislead
    if not isinstance(obj, dict):
        raise ValueError(f"not a JSON object (a {type(obj).__name__})")
    missing = [k for k in ("file_name", "text") if k not in obj]
    if missing:
        raise ValueError(f"missing {' and '.join(map(repr, missing))}")
    name, text = obj["file_name"], obj["text"]
    if not isinstance(name, str):
        raise ValueError(f"\"file_name\" must be a string, got {name!r}")
    captions = [text] if isinstance(text, str) else text
    if not isinstance(captions, list) or not captions or not all(isinstance(c, str) for c in captions):
        raise ValueError(f"\"text\" must be a string or a non-empty list of strings, got {text!r}")
    empty = [i for i, c in enumerate(captions) if not c.strip()]
    if empty:
        raise ValueError(f"empty caption {text!r}" if isinstance(text, str)
                         else f"empty caption(s) at {empty} of \"text\"")
    rel = os.path.normpath(name)  # "a/./b.png" and "a/b.png" are one file, for the duplicate check
    if os.path.isabs(name) or rel == ".." or rel.startswith(".." + os.sep):
        raise ValueError(f"file_name {name!r} is not a path inside {root}")
    if not os.path.isfile(os.path.join(root, rel)):
        raise ValueError(f"file_name {name!r}: no such file under {root}")
    if rel in seen:
        raise ValueError(f"file_name {name!r} already listed on line {seen[rel]}")
    seen[rel] = lineno
    return rel, captions


def list_captioned(root, show=10):
    """DIR/metadata.jsonl listing: (paths, captions per path, sha1 of the file). Every bad line of the file
    is collected into one error (the first `show` of them spelled out), so one run finds them all."""
    meta_path = os.path.join(root, "metadata.jsonl")
    with open(meta_path, "rb") as f:
        data = f.read()
    paths, captions, bad, seen = [], [], [], {}
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        try:
            line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # tolerate a BOM, as json tools do
        except UnicodeDecodeError as e:
            bad.append(f"line {lineno}: not UTF-8 ({e})")
            continue
        if not line.strip():
            continue
        try:
            rel, caps = _check_line(line, root, seen, lineno)
        except ValueError as e:
            bad.append(f"line {lineno}: {e}")
            continue
        paths.append(os.path.join(root, rel))
        captions.append(caps)
    if bad:
        more = f"\n  ... and {len(bad) - show} more" if len(bad) > show else ""
        raise ExtractionError(f"{meta_path}: {len(bad)} bad line(s); expected one JSON object per line, "
                              f'{{"file_name": "<path under {root}>", "text": "<caption>" or ["<caption>", ...]}}:\n  '
                              + "\n  ".join(bad[:show]) + more)
    if not paths:
        raise ExtractionError(f"{meta_path}: lists no images (expected one JSON object per line)")
    return paths, captions, hashlib.sha1(data).hexdigest()


class ImageFiles(torch.utils.data.Dataset):
    """(uint8 (3, S, S) pixels, error message or "") per file; a bad file gives zeros and its error."""

    def __init__(self, paths, size):
        self.paths, self.size = paths, size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            with Image.open(self.paths[i]) as img:
                img = center_crop(img.convert("RGB"), self.size)  # convert() decodes: bad data raises here
            return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1), ""  # (3, S, S)
        except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError...) for broken files
            return torch.zeros(3, self.size, self.size, dtype=torch.uint8), f"{type(e).__name__}: {e}"


# ------------------------------------------------------------------------------------- output files
def _write_atomic(path, write):
    """Write through a temporary name then os.replace, so `path` is never seen half-written."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


def _write_json(path, obj):
    _write_atomic(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def _shard_name(k):
    return f"shard_{k:05d}"


def _our_files(out):
    ours = ("plan", "meta", "labels", "captions")
    return [f for f in os.listdir(out) if f.startswith("shard_") or f.split(".")[0] in ours]


def _check_out(out, plan, overwrite):
    """What to do with `out`: "new", "resume" or "overwrite"; an error for a foreign or different directory."""
    if not os.path.exists(os.path.join(out, "plan.json")):
        if os.path.isdir(out) and os.listdir(out):
            raise ExtractionError(f"--out {out}: not empty and not an extraction (no plan.json); choose a new folder")
        return "new"
    with open(os.path.join(out, "plan.json")) as f:
        old = json.load(f)
    if old == plan:
        return "resume"
    if not overwrite:
        diff = {k: (old.get(k), plan.get(k)) for k in sorted(set(old) | set(plan)) if old.get(k) != plan.get(k)}
        raise ExtractionError(f"--out {out} holds a different extraction; (was, now): {diff}. "
                              f"Use another --out, or --overwrite to replace it.")
    return "overwrite"


def _finalize(out, plan, num_shards, latent_shape, k_moments):
    """Rank 0, after every shard is written: labels.npy, captions.json and meta.json (last)."""
    captioned = "metadata_sha1" in plan
    shards, labels, skipped, captions = [], [], [], []
    for k in range(num_shards):
        with open(os.path.join(out, _shard_name(k) + ".json")) as f:
            info = json.load(f)
        shards.append({"file": _shard_name(k) + ".npy", "count": len(info["labels"])})
        labels += info["labels"]
        skipped += info["skipped"]
        captions += info["captions"] if captioned else []
    if not labels:
        raise ExtractionError(f"--data {plan['data_path']}: none of the {plan['num_files']} images could be read")
    _write_atomic(os.path.join(out, "labels.npy"), lambda f: np.save(f, np.array(labels, dtype=np.int64)))
    if captioned:  # one image a line: readable, and far smaller than indent=1 with 10 captions an image
        text = "[\n" + ",\n".join(json.dumps(c, ensure_ascii=False) for c in captions) + "\n]\n"
        _write_atomic(os.path.join(out, "captions.json"), lambda f: f.write(text.encode()))
    meta = {"format": FORMAT, "vae": plan["vae"], "vae_ckpt": plan["vae_ckpt"],
            "scale_factor": plan["scale_factor"], "image_size": plan["image_size"], "latent_shape": latent_shape,
            "count": len(labels), "skipped": len(skipped), "skipped_files": skipped,
            "num_classes": len(plan["class_names"]), "class_names": plan["class_names"],
            "captioned": captioned, "num_captions": sum(map(len, captions)),
            "layout": "(n, [as is, flipped], [mean, logvar] or [pixels], C, h, w), unscaled", "dtype": "float16",
            "moments": k_moments, "precision": plan["precision"], "data_path": plan["data_path"], "shards": shards}
    _write_json(os.path.join(out, "meta.json"), meta)
    return meta


# ----------------------------------------------------------------------------------------- extract
def _listing(data, image_size, vae, vae_ckpt, scale_factor, dtype, shard_size):
    """(paths, labels, captions or None, plan): the files of --data and the plan.json that identifies the run."""
    captions = metadata_sha1 = None
    if os.path.exists(os.path.join(data, "metadata.jsonl")):  # captions, no classes
        paths, captions, metadata_sha1 = list_captioned(data)
        labels, class_names = [0] * len(paths), []
    else:
        paths, labels, class_names = list_images(data)
    root = os.path.abspath(data)
    plan = {"format": FORMAT, "vae": vae, "scale_factor": scale_factor,
            "vae_ckpt": vae_ckpt if vae_ckpt in (None, "random") else os.path.abspath(vae_ckpt),
            "image_size": image_size, "precision": dtype, "shard_size": shard_size,  # plan.json's names since v1
            "data_path": root, "num_files": len(paths), "class_names": class_names,
            "files_sha1": hashlib.sha1("\n".join(os.path.relpath(p, root) for p in paths).encode()).hexdigest()}
    if captions is not None:  # changed captions are a different extraction (class folders' plan as before)
        plan["metadata_sha1"] = metadata_sha1
    return paths, labels, captions, plan


def _prepare_out(out, plan, overwrite, rank, world):
    """Every rank checks --out (so every rank raises alike); rank 0 then clears or starts it."""
    action = _check_out(out, plan, overwrite)
    barrier(world)
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        if action == "overwrite":
            for f in _our_files(out):
                os.remove(os.path.join(out, f))
        if action != "resume":
            _write_json(os.path.join(out, "plan.json"), plan)
    barrier(world)


def encode_shard(k, batches, model, out, paths, labels, captions, shape, device, autocast, bar):
    """Encode shard k from its (indices, (pixels, errors)) batches, then write it: the moments (n, 2, K, C, h, w)
    of every readable image and its flip first, its labels, skipped files (and captions) last, as the marker."""
    moments, kept, skipped = [], [], []
    for indices, (pixels, errors) in batches:
        for i, e in zip(indices, errors):
            if e:
                tqdm.write(f"skipping unreadable image {paths[i]} ({e})")
                skipped.append(paths[i])
        ok = torch.tensor([not e for e in errors])
        if ok.any():
            x = pixels[ok].to(device).float() / 127.5 - 1  # (B, 3, S, S) in [-1, 1]
            x = torch.cat([x, x.flip(3)])  # (2B, 3, S, S): as is, then flipped
            with torch.no_grad(), autocast:
                mean, logvar = model.encode_moments(x)
            m = mean[:, None] if logvar is None else torch.stack([mean, logvar], 1)  # (2B, K, C, h, w)
            moments.append(m.half().reshape(2, -1, *m.shape[1:]).transpose(0, 1).cpu().numpy())  # (B, 2, K, C, h, w)
            kept += [i for i, e in zip(indices, errors) if not e]
        bar.update(len(indices))
    name = os.path.join(out, _shard_name(k))
    array = np.concatenate(moments) if moments else np.empty((0, 2, *shape), dtype=np.float16)
    _write_atomic(name + ".npy", lambda f: np.save(f, array))
    info = {"labels": [labels[i] for i in kept], "skipped": skipped}
    if captions is not None:  # an unreadable image's captions go with it
        info["captions"] = [captions[i] for i in kept]
    _write_json(name + ".json", info)


def extract(data, out, vae="none", vae_ckpt=None, image_size=256, batch_size=32, shard_size=10000,
            num_workers=4, dtype="fp32", device="", overwrite=False):
    """Extract the moments of every image of `data` (and of its flip) into `out`; returns meta.json's dict plus
    "seconds" and "images_per_s" of this run. Under torchrun every rank calls it: rank r encodes shards r,
    r + world, ... of those still to do, and rank 0 writes labels and metadata once all are done."""
    if dtype not in DTYPES:
        raise ExtractionError(f"--dtype: expected fp32 or bf16, got {dtype!r}")
    with distributed(device) as (rank, world, device):
        model = build_vae(vae, vae_ckpt, device=device)
        if image_size % model.downsample:
            raise ExtractionError(f"--image-size {image_size}: must be a multiple of {model.downsample} "
                                  f"for --vae {vae}")
        paths, labels, captions, plan = _listing(data, image_size, vae, vae_ckpt, model.scale_factor, dtype,
                                                 shard_size)
        _prepare_out(out, plan, overwrite, rank, world)

        num_shards = math.ceil(len(paths) / shard_size)
        todo = [k for k in range(num_shards) if not os.path.exists(os.path.join(out, _shard_name(k) + ".json"))]
        mine = todo[rank::world]  # round robin over what is left, so a resumed run stays balanced
        if rank == 0 and len(todo) < num_shards:
            print(f"{out}: resuming, {num_shards - len(todo)} of {num_shards} shards already done")
        shard_batches = {k: [list(range(i, min(i + batch_size, len(paths), (k + 1) * shard_size)))
                             for i in range(k * shard_size, min((k + 1) * shard_size, len(paths)), batch_size)]
                         for k in mine}  # batches never cross a shard's end
        batches = [b for k in mine for b in shard_batches[k]]
        # one loader over all of this rank's shards: its workers read ahead across shard boundaries
        loader = torch.utils.data.DataLoader(ImageFiles(paths, image_size), batch_sampler=batches,
                                             num_workers=num_workers, pin_memory=device.type == "cuda")
        h = image_size // model.downsample
        latent_shape, k_moments = [model.latent_channels, h, h], 1 if vae == "none" else 2
        bar = tqdm(total=sum(map(len, batches)), unit="img", disable=rank != 0, dynamic_ncols=True)
        start, stream = time.time(), zip(batches, loader)
        for k in mine:
            encode_shard(k, itertools.islice(stream, len(shard_batches[k])), model, out, paths, labels, captions,
                         (k_moments, *latent_shape), device, autocast(dtype, device), bar)
        bar.close()
        barrier(world)
        meta = _finalize(out, plan, num_shards, latent_shape, k_moments) if rank == 0 else None
        barrier(world)  # no rank returns before meta.json exists
        if meta is None:
            with open(os.path.join(out, "meta.json")) as f:
                meta = json.load(f)
        seconds = time.time() - start
        encoded = sum(min((k + 1) * shard_size, len(paths)) - k * shard_size for k in todo)
        if rank == 0:
            what = (f"{meta['count']} images with {meta['num_captions']} captions" if meta["captioned"]
                    else f"{meta['count']} images of {meta['num_classes']} classes")
            print(f"{out}: {what}, {meta['skipped']} skipped, "
                  f"latents {tuple(latent_shape)} x 2 flips; this run: {encoded} images in {seconds:.1f}s "
                  f"({encoded / max(seconds, 1e-9):.3g} images/s, {world} process(es) on {device.type})")
        return {**meta, "seconds": seconds, "images_per_s": encoded / max(seconds, 1e-9)}


# -------------------------------------------------------------------------------------- training reads
def _json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _read(path, load, what):
    """load(path) of an extraction's file; a missing, truncated or corrupt one is a ValueError naming it."""
    try:
        return load(path)
    except (OSError, ValueError, EOFError) as e:  # numpy: "mmap length is greater than file size", bad headers
        raise ValueError(f"latent data {path}: cannot be read as {what} ({e}); re-run extract_latents.py into a "
                         f"new --out") from None


class LatentData:
    """An extraction opened for training: shards are memory-mapped, so ImageNet-size data stays on disk.

    batch(indices, generator, flip=True) -> (latents (B, C, h, w) float32 ALREADY times scale_factor,
    labels (B,)): per example a random flip and a posterior sample z = mean + exp(logvar / 2) * eps (pixels
    as is for --vae none); all randomness from `generator`. flip=False always takes the unflipped copy (for
    captions that say left or right); the flip bits are drawn all the same, so the generator's stream, and
    eps, are those of flip=True.
    captions: for captioned data (meta["captioned"]) a list, per image in index order, of its caption
    strings; None for class folders.
    """

    def __init__(self, path):
        meta_path = os.path.join(path, "meta.json")
        if not os.path.isdir(path):
            raise FileNotFoundError(f"latent data {path!r}: no such directory (make it with extract_latents.py)")
        if not os.path.exists(meta_path):
            why = ("an unfinished extraction: re-run extract_latents.py with the same options to finish it"
                   if os.path.exists(os.path.join(path, "plan.json")) else "not an extraction of extract_latents.py")
            raise ValueError(f"latent data {path}: no meta.json ({why})")
        self.meta = _read(meta_path, _json, "a JSON file")
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"latent data {meta_path}: format {self.meta.get('format')!r}, expected {FORMAT!r}")
        self.vae, self.scale_factor = self.meta["vae"], self.meta["scale_factor"]
        self.latent_shape = tuple(self.meta["latent_shape"])  # (C, h, w)
        self.class_names, self.num_classes = self.meta["class_names"], self.meta["num_classes"]
        self.shards = [_read(os.path.join(path, s["file"]), lambda p: np.load(p, mmap_mode="r"), "a whole .npy shard")
                       for s in self.meta["shards"]]
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])  # shard k holds [offsets[k], offsets[k+1])
        self.labels = torch.from_numpy(_read(os.path.join(path, "labels.npy"), np.load, "a .npy array")).long()  # (N,)
        if len(self.labels) != self.offsets[-1] or self.offsets[-1] != self.meta["count"]:
            raise ValueError(f"latent data {path}: {len(self.labels)} labels, {self.offsets[-1]} latents in the "
                             f"shards and a count of {self.meta['count']} in meta.json; they should be equal")
        self.captions = None
        if self.meta.get("captioned"):  # older extractions lack the key: class folders
            captions_path = os.path.join(path, "captions.json")
            if not os.path.exists(captions_path):
                raise ValueError(f"latent data {path}: meta.json says captioned but {captions_path} is missing")
            self.captions = _read(captions_path, _json, "a JSON file")
            if len(self.captions) != self.meta["count"]:
                raise ValueError(f"latent data {captions_path}: captions for {len(self.captions)} images, but a "
                                 f"count of {self.meta['count']} in meta.json; they should be equal")

    def __len__(self):
        return len(self.labels)

    def batch(self, indices, generator, flip=True):
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)  # (B,)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"LatentData.batch: indices must lie in [0, {len(self)}), got {idx.min()}..{idx.max()}")
        flips = torch.randint(0, 2, (len(idx),), generator=generator).numpy()  # drawn even if unused: same stream
        flips = flips if flip else np.zeros_like(flips)
        idx_np = idx.numpy()
        shard = np.searchsorted(self.offsets, idx_np, side="right") - 1
        moments = np.empty((len(idx), *self.shards[0].shape[2:]), dtype=np.float16)  # (B, K, C, h, w)
        for k in np.unique(shard):
            pos = np.nonzero(shard == k)[0]
            pos = pos[np.argsort(idx_np[pos], kind="stable")]  # ascending reads from the memory map
            moments[pos] = self.shards[k][idx_np[pos] - self.offsets[k], flips[pos]]
        m = torch.from_numpy(moments).float()
        if self.vae == "none":
            z = m[:, 0]
        else:
            eps = torch.randn((len(idx), *self.latent_shape), generator=generator)  # (B, C, h, w)
            z = m[:, 0] + torch.exp(0.5 * m[:, 1]) * eps
        return z * self.scale_factor, self.labels[idx]
