"""The recipes of configs/ on GPUs: memory per GPU, estimated before the run on any machine and measured on a GPU,
the training speed, the sampling speed in both modes, and an estimate of a whole run's time on 8 H100s.

    python -m benchmarks.recipes                                   # every GPU recipe: memory estimate, time estimate
    python -m benchmarks.recipes configs/in256_XL1.py --device-batch-size 64        # one recipe, another micro-batch
    python -m benchmarks.recipes --measure --device cuda           # on a GPU: each recipe at its real shape
    python -m benchmarks.recipes --measure --tiny                  # the same code at a tiny size (CPU, CI)

Estimate: the recipe's model, EMA copy, AdamW and one micro-batch of --device-batch-size are built under torch's
FakeTensorMode (shapes only: no memory, no arithmetic), and PeakMemory counts the bytes of every tensor storage
alive at once over two training steps (forward, backward, clip, AdamW, EMA; the second holds AdamW's states) under
the recipe's autocast. The CPU's bf16 autocast and fused attention kernel stand in for the GPU's (both save the
attention's output and log-sum-exp, not its matrix). Added by hand: DDP's gradient buckets (one more fp32 copy of
the gradients) with more than one rank. Not counted: the CUDA context, NCCL's buffers and the allocator's
fragmentation, so a recipe must estimate under FIT_GIB, not 80. tests/test_recipes.py checks the estimate against
the peak resident memory of the same step run on the CPU.

Measure (--measure): each recipe on --device at its real shape, one micro-batch per step (a GPU's share of the
global batch, without DDP): seconds per micro-batch, images/s, MFU (model.training_flops against the GPU's bf16
peak), peak memory (torch.cuda.max_memory_allocated) against the estimate, and sampling images/s in diffusion mode
and in AR mode (4 steps) with CFG, --sample-steps DDPM steps: a markdown table of measurements for docs/log.md.

Time estimate: a recipe's images x its training FLOPs per image (gradient checkpointing adds a forward), at the MFU
of one measured H100 run (REFERENCE_MFU), on 8 H100s; an estimate until --measure refreshes the MFU.
"""
import glob
import os
import sys
import time
import warnings
import weakref

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import mask
import tokenization
from diffusion import Objective
from inference import make_diffusion, sample_batch
from model import training_flops
from runtime import (PEAK_TFLOPS, ConfigError, autocast, autocast_dtype, device_peak_flops, distributed,
                     micro_batches, parse_config, read_recipe)
from train_step import StepOptions, build_model, draw_micro_batch, ema_update, forward_losses, train_defaults

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
config = dict(
    device_batch_size=0,  # override the recipes' micro-batch (0 = each recipe's own)
    world=8,  # ranks of the run: their gradient buckets, and the time estimate's GPUs
    measure=False,  # run each recipe on --device: speed and measured peak memory beside the estimate
    device="",  # --measure: "" = cuda where available, else cpu
    tiny=False,  # --measure: the recipes' code at a tiny size (size T, 8x8 latents, 2 images): the CPU check of CI
    steps=20,  # --measure: timed training micro-batches per recipe (after WARMUP_STEPS untimed ones)
    sample_steps=50,  # --measure: DDPM steps per AR step of the sampling runs (the paper's 250 takes 5x as long)
    sample_batch_size=32,  # --measure: images per sampling batch
)
FIT_GIB = 72.0  # a recipe's estimate must stay under this on an 80 GB GPU: its context, NCCL and fragmentation
IMAGENET_CLASSES = 1000
LLAMA3_VOCAB = 128256  # the paper's tokenizer: 128,000 ranks and 256 special tokens (tokenization.py)
LATENT_SHAPES = {  # a recipe's `data` (docs/latents.md's extractions) -> its latents (C, H, W)
    "latents/in256_sd": (4, 32, 32),  # SD-VAE, 8x down, of 256 px
    "latents/in256_sd_captions": (4, 32, 32),
    "latents/in256_mar": (16, 16, 16),  # MAR's KL-16, 16x down, of 256 px
    "latents/in512_mar": (16, 32, 32),  # the same of 512 px
}
REFERENCE_MFU = 0.315  # train step of L/2, 32 images per H100, bf16, --compile (docs/log.md, 2026-11-22)
H100_BF16_PEAK = dict(PEAK_TFLOPS)["H100"] * 1e12  # dense bf16 FLOP/s of an H100 SXM
WARMUP_STEPS = 3  # --measure: untimed micro-batches first (compilation, cuDNN's choices)
AR_STEPS_MEASURED = (1, 4)  # --measure: sampling in diffusion mode and in AR mode
MEASURE_CFG = 1.5  # --measure: the sampling runs' CFG scale (a doubled batch)
TINY = dict(size="T", device_batch_size=2, batch_size=2, num_cond_tokens=4, compile=False)  # --tiny's overrides
TINY_LATENTS = (4, 8, 8)


class PeakMemory(TorchDispatchMode):
    """Counts the bytes of every tensor storage created inside it while it lives (each storage once, however
    many views), and their peak; real or fake tensors alike."""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak = {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if id(storage) not in self.live:
                    size = storage.nbytes()
                    self.live[id(storage)] = weakref.ref(storage, lambda _, key=id(storage), n=size: self._free(key, n))
                    self.now += size
                    self.peak = max(self.peak, self.now)
        return out

    def _free(self, key, size):
        del self.live[key]
        self.now -= size


class SyntheticLatents:
    """LatentData's batch() and captions for a recipe's shape: random latents, random labels, one caption each."""

    CAPTION = "a photo of a synthetic latent with a caption long enough to fill every text token"

    def __init__(self, latent_shape, num_classes, size):
        self.latent_shape, self.num_classes, self.captions = latent_shape, num_classes, [[self.CAPTION]] * size

    def batch(self, indices, generator, flip=True):
        n = len(indices)
        return torch.randn(n, *self.latent_shape, generator=generator), torch.randint(0, self.num_classes, (n,),
                                                                                     generator=generator)


def recipe_config(path, train_config, overrides=None):
    """train.py's config with the recipe's values and the overrides."""
    cfg = dict(train_config)
    cfg.update(read_recipe(path, cfg))
    cfg.update(overrides or {})
    return cfg


def recipe_shape(cfg, tiny=False):
    """(latent shape, classes, text vocabulary) of a recipe's data, from LATENT_SHAPES (tiny: TINY_LATENTS); a
    captioned extraction makes a text model, LLaMA-3's vocabulary with --tokenizer, else the byte tokenizer's."""
    text = "captions" in cfg["data"]
    if tiny:
        return TINY_LATENTS, IMAGENET_CLASSES, tokenization.ByteTokenizer.vocab_size if text else 0
    vocab = LLAMA3_VOCAB if text and cfg["tokenizer"] else tokenization.ByteTokenizer.vocab_size if text else 0
    if cfg["data"] not in LATENT_SHAPES:
        raise ConfigError(f"--data {cfg['data']}: not one of the recipes' extractions ({', '.join(LATENT_SHAPES)})")
    return LATENT_SHAPES[cfg["data"]], IMAGENET_CLASSES, vocab


def training_micro_batch(cfg, model, latent_shape, num_classes, text_vocab, seed=0):
    """One micro-batch of the recipe's draws (train_step.draw_micro_batch) on synthetic latents."""
    data = SyntheticLatents(latent_shape, num_classes, cfg["device_batch_size"])
    tokenizer = tokenization.ByteTokenizer() if text_vocab else None
    g = torch.Generator().manual_seed(seed)
    batch = draw_micro_batch(data, model, torch.arange(cfg["device_batch_size"]), g, StepOptions.from_config(cfg),
                             objective=Objective(cfg["objective"]), tokenizer=tokenizer)
    batch.pop("truncated", None)
    return batch


def train_steps(cfg, model, ema, params, optimizer, batch, amp, n, objective):
    """n of train.py's optimizer steps on one micro-batch (forward_losses, backward, clip, AdamW, EMA)."""
    options = StepOptions.from_config(cfg)
    train_model = torch.compile(model) if cfg["compile"] else model
    for _ in range(n):
        with amp:
            loss = forward_losses(train_model, model, objective, batch, options)[0]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"] or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema_update(ema, model, cfg["ema_decay"])


def estimate_memory(cfg, latent_shape, num_classes, text_vocab, world):
    """Peak bytes on one GPU of a recipe's training step at cfg["device_batch_size"] (see the module's doc)."""
    dtype = autocast_dtype(cfg["dtype"], torch.device("cuda"))  # "" = the GPU's default, bf16
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = build_model(cfg, latent_shape, num_classes, text_vocab, None)[0]
    batch = training_micro_batch(cfg, model, latent_shape, num_classes, text_vocab)  # real: the draws are data
    objective = Objective(cfg["objective"])  # real: its schedule's tables are data too
    with FakeTensorMode(allow_non_fake_inputs=True), PeakMemory() as tracker, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")  # PeakMemory's ids
        model, ema, params, optimizer = build_model(cfg, latent_shape, num_classes, text_vocab, None)
        train_steps(dict(cfg, compile=False), model, ema, params, optimizer, batch,
                    autocast(dtype, torch.device("cpu")), n=2, objective=objective)
    buckets = 4 * sum(p.numel() for p in params) if world > 1 else 0  # DDP's fp32 gradient buckets
    return tracker.peak + buckets


def flops_per_image(cfg, latent_shape, num_classes, text_vocab):
    """Training FLOPs per image (model.training_flops over the recipe's drawn masks; + a forward per block with
    gradient checkpointing)."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = build_model(cfg, latent_shape, num_classes, text_vocab, None)[0]
    batch = training_micro_batch(dict(cfg, device_batch_size=64), model, latent_shape, num_classes, text_vocab)
    steps = batch["steps"]
    attn_mask = mask.causal_mask(steps, steps, model.num_prefix_tokens)  # (B, T, T)
    flops = training_flops(model, attn_mask) / len(steps)
    return flops * 4 / 3 if cfg["grad_checkpointing"] else flops


def estimate_days(cfg, flops_image, gpus=8):
    """A whole run's days on `gpus` H100s at REFERENCE_MFU."""
    return cfg["max_steps"] * cfg["batch_size"] * flops_image / (gpus * H100_BF16_PEAK * REFERENCE_MFU) / 86400


def measure(cfg, latent_shape, num_classes, text_vocab, device, c):
    """The recipe's training micro-batch and sampling on device: speed, MFU and peak memory."""
    amp = autocast(autocast_dtype(cfg["dtype"], device), device)
    model, ema, params, optimizer = build_model(cfg, latent_shape, num_classes, text_vocab, device)
    batch = {k: v.to(device) for k, v in training_micro_batch(cfg, model, latent_shape, num_classes,
                                                               text_vocab).items()}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    objective = Objective(cfg["objective"])
    train_steps(cfg, model, ema, params, optimizer, batch, amp, WARMUP_STEPS, objective)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    sync()
    start = time.perf_counter()
    train_steps(cfg, model, ema, params, optimizer, batch, amp, c["steps"], objective)
    sync()
    seconds = (time.perf_counter() - start) / c["steps"]
    flops = training_flops(model, mask.causal_mask(batch["steps"].cpu(), batch["steps"].cpu(),
                                                   model.num_prefix_tokens))
    peak = device_peak_flops(device)
    result = dict(seconds=seconds, images_per_s=cfg["device_batch_size"] / seconds,
                  mfu=flops / seconds / peak if peak else float("nan"),
                  peak_gib=torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else float("nan"))
    del optimizer, params, batch
    if text_vocab:  # the sampling runs are the class-conditional model's
        return result
    ema.eval()
    diffusion = make_diffusion(c["sample_steps"], "", objective=cfg["objective"])
    labels = torch.arange(c["sample_batch_size"]) % num_classes
    for s in AR_STEPS_MEASURED:
        sample_batch(ema, diffusion, labels[:2], batch_seed=0, ar_steps=s, cfg_scale=MEASURE_CFG)  # warm-up
        sync()
        start = time.perf_counter()
        with amp:
            sample_batch(ema, diffusion, labels, batch_seed=1, ar_steps=s, cfg_scale=MEASURE_CFG)
        sync()
        result[f"sample_s{s}"] = len(labels) / (time.perf_counter() - start)
    return result


def recipe_paths(words):
    paths = words or sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                            if not os.path.basename(p).startswith(("demo", "_")))
    return [os.path.relpath(p, ROOT) if os.path.isabs(p) else p for p in paths]


def main(argv=None):
    c = dict(config)
    words = parse_config(c, argv, prog="benchmarks.recipes", positional="[RECIPE.py ...]")
    train_config = train_defaults()  # the defaults a recipe overrides
    overrides = dict(TINY) if c["tiny"] else {}
    if c["device_batch_size"]:
        overrides["device_batch_size"] = c["device_batch_size"]
    with distributed(c["device"]) as (_, _, device):
        rows = []
        for path in recipe_paths(words):
            cfg = recipe_config(path, train_config, overrides)
            shape = recipe_shape(cfg, c["tiny"])
            accum, micro = micro_batches(cfg["batch_size"], cfg["device_batch_size"], 1 if c["tiny"] else c["world"])
            estimate = estimate_memory(cfg, *shape, 1 if c["tiny"] else c["world"]) / 2 ** 30
            row = dict(recipe=path, micro=micro, accum=accum, checkpointing=cfg["grad_checkpointing"],
                       estimate_gib=estimate, days=estimate_days(cfg, flops_per_image(cfg, *shape), c["world"]))
            if c["measure"]:
                row.update(measure(cfg, *shape, device, c))
            rows.append(row)
            print_row(row, c, first=len(rows) == 1)
    return rows


def print_row(row, c, first):
    """One recipe as a markdown table row (the header first)."""
    cols = ["recipe", "micro-batch x accumulation", "grad. checkpointing", "estimated GiB/GPU",
            f"fits ({FIT_GIB:g} GiB)", f"est. days on {c['world']} H100s"]
    measured = ["s/micro-batch", "img/s", "MFU", "measured GiB", "measured/estimate"] + [
        f"sampling img/s, S={s}" for s in AR_STEPS_MEASURED]
    cols += measured if c["measure"] else []
    if first:
        print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    cells = [row["recipe"], f"{row['micro']} x {row['accum']}", "yes" if row["checkpointing"] else "no",
             f"{row['estimate_gib']:.1f}", "yes" if row["estimate_gib"] <= FIT_GIB else "**no**", f"{row['days']:.1f}"]
    if c["measure"]:
        cells += [f"{row['seconds']:.3f}", f"{row['images_per_s']:.1f}", f"{row['mfu']:.1%}",
                  f"{row['peak_gib']:.1f}", f"{row['peak_gib'] / row['estimate_gib']:.2f}"]
        cells += [f"{row[f'sample_s{s}']:.2f}" if f"sample_s{s}" in row else "-" for s in AR_STEPS_MEASURED]
    print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:
        sys.exit(f"benchmarks.recipes: error: {e}")
