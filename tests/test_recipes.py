"""Tests of configs/ (the paper's runs as recipe files) and benchmarks/recipes.py (their memory and speed)."""
import glob
import os
import re
import subprocess
import sys

import pytest
import torch

import runtime
from benchmarks import recipes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_CONFIG = runtime.read_script_config(os.path.join(ROOT, "train.py"))
GPU_RECIPES = recipes.recipe_paths([])
GIB = 2 ** 30


def test_every_recipe_reads_into_train_config():
    """Every file of configs/ sets known keys to values of their defaults' types, and the GPU ones are the paper's
    runs: batch 2048, lr 1e-4, 40 warmup epochs, EMA 0.9999, 240 or 800 epochs of 625 steps."""
    paths = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))
    assert len(paths) == len(GPU_RECIPES) + 3 and len(GPU_RECIPES) == 6, paths
    for path in paths:
        values = runtime.read_recipe(path, TRAIN_CONFIG)
        assert values, path
    for path in GPU_RECIPES:
        cfg = recipes.recipe_config(path, TRAIN_CONFIG)
        assert (cfg["batch_size"], cfg["lr"], cfg["warmup_steps"], cfg["ema_decay"]) == (2048, 1e-4, 25_000, 0.9999)
        assert cfg["max_steps"] in (240 * 625, 800 * 625) and cfg["device_batch_size"] > 0, path


@pytest.mark.parametrize("path", GPU_RECIPES)
def test_gpu_recipe_fits_80gb_as_its_header_says(path):
    """Each GPU recipe's micro-batch fits an 80 GB GPU on 8 ranks (estimated under FIT_GIB), and its header states
    that micro-batch, the estimate (to 1 GiB) and the estimated days (to 10%)."""
    cfg = recipes.recipe_config(path, TRAIN_CONFIG)
    shape = recipes.recipe_shape(cfg)
    gib = recipes.estimate_memory(cfg, *shape, world=8) / GIB
    assert gib <= recipes.FIT_GIB, (path, gib)
    days = recipes.estimate_days(cfg, recipes.flops_per_image(cfg, *shape))
    header = open(os.path.join(ROOT, path)).read()
    accum, micro = runtime.micro_batches(cfg["batch_size"], cfg["device_batch_size"], 8)
    stated = re.search(r"Memory: (\d+) images per GPU and micro-batch, (\d+) accumulated per step on 8 GPUs; about "
                       r"(\d+) GiB per GPU", header)
    assert stated and (int(stated[1]), int(stated[2])) == (micro, accum), (path, stated)
    assert abs(int(stated[3]) - gib) <= 1, (path, gib, stated[0])
    stated_days = float(re.search(r"Time: about ([\d.]+) days on 8 H100s", header)[1])
    assert abs(stated_days - days) <= 0.1 * days, (path, days, stated_days)


MEASURE = """
import sys, torch
sys.path.insert(0, {root!r})
import runtime
from benchmarks import recipes
cfg = dict(runtime.read_script_config({root!r} + "/train.py"), **{cfg!r})
def rss(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
def steps(cfg, shape):
    model, ema, params, optimizer = recipes.build_model(cfg, shape, 10, 0, "cpu")
    batch = recipes.training_micro_batch(cfg, model, shape, 10, 0)
    amp = runtime.autocast(cfg["dtype"], torch.device("cpu"))
    recipes.train_steps(cfg, model, ema, params, optimizer, batch, amp, 2, recipes.Objective("eps"))
steps(dict(cfg, size="T", device_batch_size=2), (4, 8, 8))  # the libraries' lazy buffers, before the baseline
base = rss("VmRSS:")
steps(cfg, {shape!r})
print((rss("VmHWM:") - base))
"""


@pytest.mark.parametrize("options", [dict(dtype="bf16"), dict(dtype="fp32", grad_checkpointing=True)])
def test_memory_estimate_matches_a_cpu_measurement(options):
    """The fake-tensor estimate of a small recipe (S/2 on 32x32x4 latents, 8 images) is within 15% of the peak
    resident memory that the same two steps add to a process on the CPU (glibc's mmap threshold fixed, so that
    every large buffer is mapped and unmapped, and resident memory follows the live tensors)."""
    cfg = dict(size="S", patch_size=2, num_cond_tokens=4, batch_size=8, device_batch_size=8, **options)
    shape = (4, 32, 32)
    code = MEASURE.format(root=ROOT, cfg=cfg, shape=shape)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    measured = int(run.stdout.split()[-1])
    estimate = recipes.estimate_memory(dict(TRAIN_CONFIG, **cfg), shape, 10, 0, world=1)
    assert abs(estimate / measured - 1) < 0.15, (options, estimate / GIB, measured / GIB)
    assert measured > 0.3 * GIB  # large enough that the libraries' own memory is noise


def test_measure_tiny_runs_the_recipes_code():
    """--measure --tiny runs a class and the text recipe's code at a tiny size on the CPU (the GPU check's code,
    kept working by CI): a row each, with positive speeds, and sampling for the class model."""
    chosen = ["configs/in256_XL1.py", "configs/multimodal_L2.py"]
    rows = recipes.main(chosen + ["--measure", "--tiny", "--device", "cpu", "--steps", "1", "--sample-steps", "2",
                                  "--sample-batch-size", "2"])
    assert [r["recipe"] for r in rows] == chosen
    for row in rows:
        assert row["images_per_s"] > 0 and row["estimate_gib"] > 0, row
        assert ("sample_s4" in row) == ("multimodal" not in row["recipe"]), row


def test_recipes_command_errors_name_the_word():
    with pytest.raises(runtime.ConfigError, match="unknown option --device-batch"):
        recipes.main(["--device-batch", "8"])
    with pytest.raises(runtime.ConfigError, match="latents/elsewhere"):
        recipes.recipe_shape(dict(TRAIN_CONFIG, data="latents/elsewhere"))


def test_train_on_real_data_needs_a_recipe(tmp_path):
    """`train.py --data DIR` without a recipe is an error naming the configs, before any data is read; a stray
    word is an error naming it."""
    import train
    with pytest.raises(runtime.ConfigError, match=r"without a recipe.*configs/in256_XL1\.py"):
        train.main(["--data", str(tmp_path), "--size", "L"])
    with pytest.raises(runtime.ConfigError, match="unexpected word 'latents/in256_sd'"):
        train.main(["latents/in256_sd"])
    run = subprocess.run([sys.executable, "train.py", "--data", str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode != 0 and "train.py: error: --data" in run.stderr and "configs/" in run.stderr, run.stderr
