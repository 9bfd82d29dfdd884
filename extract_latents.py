"""Encode an image folder once into VAE posterior moments; training then reads latents, not JPEGs.

    python extract_latents.py --data DIR --vae mar --vae-ckpt kl16.ckpt --image-size 256 --out latents/in256_mar
    torchrun --nproc_per_node 8 extract_latents.py ...same options...     # many GPUs: one shard set per rank
    python extract_latents.py --data DIR --vae none --image-size 32 --out latents/tiny   # pixels, CPU

DIR holds class folders (DIR/<class>/<image>) or captioned images (DIR/metadata.jsonl); latents.py describes
both layouts and the output directory (shards of moments, labels, captions, meta.json), and holds the reader,
LatentData. An interrupted run resumes: the same command again encodes only the shards still missing.
"""
import os
import sys

from latents import ExtractionError, extract
from runtime import parse_config

config = dict(
    data="",  # image folder: DIR/<class>/<image>, or captioned images listed in DIR/metadata.jsonl
    out="",  # output directory (created; a re-run with the same options resumes an interrupted extraction)
    vae="none",  # "sd" (SD VAE, 8x, 4 channels), "mar" (MAR KL-16, 16x, 16 channels) or "none" (pixels)
    vae_ckpt=None,  # VAE weights (see vae.py; "random" = random weights, for tests and speed measurements)
    image_size=256,  # ADM centre crop to this size (a multiple of the VAE's downsampling)
    batch_size=32,  # images per forward pass (each is encoded twice: as is and flipped)
    shard_size=10000,  # images per shard file (the unit of resuming; each process holds one shard in RAM)
    num_workers=min(4, (os.cpu_count() or 1) - 1),  # image-decoding processes beside the main one (0 = decode in
      # the main process); the default leaves one core to the VAE: 1 on a 2-core laptop, 4 from 5 cores up
    dtype="fp32",  # fp32 or bf16 (autocast for the VAE; for GPUs: most CPUs run bf16 convolutions slowly)
    device="",  # "" = cuda (cuda:LOCAL_RANK under torchrun) if available, else cpu
    overwrite=False,  # replace a different extraction found in --out (never files it did not write)
)


def main(argv=None):
    cfg = dict(config)
    parse_config(cfg, argv)
    if not cfg["data"] or not cfg["out"]:
        raise ExtractionError("--data and --out are required (see the top of extract_latents.py)")
    return extract(**cfg)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:  # bad options, files or data: the message names them
        sys.exit(f"extract_latents.py: error: {e}")
