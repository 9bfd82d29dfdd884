"""What every script sets up the same way: device, autocast dtype, torchrun's process group, seeded generators.

    with distributed(cfg["device"]) as (rank, world, device): ...     # one process, or one rank of torchrun
    launch(cfg, run)                                                    # run(cfg, rank, world, device) in it

Seeding (train.py, finetune.py): micro-batch m of step s draws from seeded(seed, stream, s, m) and epoch e's data
order from seeded(seed, 0, e), so resuming needs no generator state and N ranks compute the same step as one
rank accumulating N micro-batches.
"""
import contextlib
import functools
import os

import numpy as np
import torch
import torch.distributed as dist

DTYPES = ("bf16", "fp32")


def autocast_dtype(dtype, device):
    """--dtype: bf16 or fp32; "" = bf16 on cuda, fp32 on cpu (most CPUs run bf16 slowly)."""
    dtype = dtype or ("bf16" if device.type == "cuda" else "fp32")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be bf16 or fp32, got {dtype!r}")
    return dtype


def autocast(dtype, device):
    """The autocast context of --dtype: bf16 autocast, or fp32 (autocast disabled)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")


@contextlib.contextmanager
def distributed(device=""):
    """(rank, world size, device) of this process. --device "" (or "auto") is cuda where available, else cpu; a
    cuda device without an index is cuda:LOCAL_RANK. Under torchrun it joins the process group (nccl on GPUs,
    gloo on CPUs), unless the caller already did, and leaves the group it created on exit."""
    device = torch.device("cuda" if device in ("", "auto") and torch.cuda.is_available()
                          else "cpu" if device in ("", "auto") else device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns = not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", 1)) > 1
    if owns:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        if dist.is_initialized():
            yield dist.get_rank(), dist.get_world_size(), device
        else:
            yield 0, 1, device
    finally:
        if owns:
            dist.destroy_process_group()


def launch(cfg, run):
    """run(cfg, rank, world, device) on --device, with TF32 matmuls on GPUs (training: train.py, finetune.py)."""
    with distributed(cfg["device"]) as (rank, world, device):
        if device.type == "cuda":
            torch.set_float32_matmul_precision("high")
        return run(cfg, rank, world, device)


def barrier(world):
    if world > 1:
        dist.barrier()


def seeded(*key):
    """A CPU generator whose seed is a hash of the integers in key."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0]))


@functools.lru_cache(maxsize=1)
def epoch_permutation(n, seed, epoch):
    return torch.randperm(n, generator=seeded(seed, 0, epoch))


def step_indices(step, batch, n, seed):
    """The global batch's sample indices (batch,) at `step`: epochs are seeded permutations, the last partial
    batch of each dropped."""
    epoch, i = divmod(step, n // batch)
    return epoch_permutation(n, seed, epoch)[i * batch:(i + 1) * batch]
