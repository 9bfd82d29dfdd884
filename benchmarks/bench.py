"""Speed of training and sampling, the fast path against a plain reference path, in one run; and the samplers'
quality against their step counts on a checkpoint of the class demo.

    python -m benchmarks.bench                          # CPU: size T on 16x16x3 pixels (the captioned demo's)
    python -m benchmarks.bench --device cuda --size L --input-size 32 --in-channels 4 --batch-size 32 --compile
    python -m benchmarks.bench --device cuda --what sample --size XL --input-size 16 --in-channels 16 --patch-size 1 \
        --num-cond-tokens 64 --steps 250 --sample-scales 1.5 --ar-steps 1 4 16

Training: train.py's optimizer step (forward_losses, backward, clip, AdamW, EMA) on a fixed micro-batch, timed
for the fast path (SDPA's fused kernels, and torch.compile with --compile) and for the reference path (the same
model with SDPA's math backend, no compile). Sampling: images/s of diffusion mode and AR mode at S = 4, 16, 64 and L
through the KV cache, same samples and DDPM steps, with and without CFG. Medians over --repeats (training)
and --sample-repeats after a warm-up, in rounds that run every configuration once, so that the ratios
hold on a shared machine; CUDA is synchronized before every clock read.

    python -m benchmarks.bench --what quality --ckpt out/demo/ckpt.pt            # every sampler x steps, S = 1 and 4

Quality: for each --quality-runs sampler and each --quality-ar-steps S, --quality-samples class-balanced samples
per seed (--quality-seeds seeds) of the demo checkpoint at --quality-cfg, scored against fresh demo images by the
Frechet distance of their raw pixels (FD, no network needed; real images drawn afresh score its floor), their
pixel KID x 1000 to the same images (demos.kernel_distance) and the share whose nearest real image has their
class; mean and spread over the seeds, and the seconds of each run.
"""
import contextlib
import copy
import functools
import json
import statistics
import sys
import time

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import mask
import demos
from checkpoint import load_checkpoint
from runtime import parse_config
from diffusion import Objective
from inference import make_diffusion, sample_batch, sample_images
from fid import frechet_distance
from model import CausalFusion, training_flops
from runtime import autocast, autocast_dtype, device_peak_flops
from train_step import StepOptions, ema_update, forward_losses
from vae import build_vae

config = dict(
    what="train,sample",  # train, sample, text (a training step with a text against one without), quality
    device="cpu",  # cpu or cuda
    size="T",  # model size (model.py MODEL_SIZES)
    input_size=16,  # latent side (16 = the captioned demo's 16x16 pixels; 32 = SD latents of 256x256 images)
    in_channels=3,  # latent channels (3 pixels, 4 SD, 16 MAR)
    patch_size=2,  # latent pixels per token side
    num_cond_tokens=4,  # class tokens
    batch_size=64,  # training batch and sampling batch
    dtype="",  # bf16 or fp32 autocast; "" = bf16 on cuda, fp32 on cpu
    compile=False,  # torch.compile the fast path's training model
    repeats=5,  # timed training steps (the median is reported)
    warmup=2,  # untimed training steps first
    sample_repeats=3,  # timed sampling runs per (scale, S), after a two-DDPM-step warm-up (the median is reported)
    steps=25,  # DDPM steps of the sampling benchmark (paper: 250)
    samplers=(),  # fast samplers to time beside DDPM: NAME:STEPS[:eta=E][:spacing=S], e.g. ddim:50 dpm++:20
    ar_steps=(1, 4, 16, 64, 0),  # AR steps S to sample with (0 = L, token by token)
    sample_scales=(1.0, 1.5),  # CFG scales of the sampling runs (1 = no guidance, one batch; > 1 a doubled one)
    peak_tflops=0.0,  # device bf16 peak for MFU; 0 = from the GPU's name (H100 SXM 989, PCIe 756, A100 312)
    seed=0,  # inputs and sampling seed
    text_len=35,  # --what text: text tokens in place of the class tokens (paper: 35)
    text_vocab=128256,  # --what text: text vocabulary (LLaMA-3: 128256; the byte tokenizer: 258)
    ckpt="",  # --what quality: a checkpoint of the class demo (python train.py)
    quality_runs=(),  # NAME:STEPS[:eta=E][:spacing=S] (sample.py's --sampler, --steps, --eta, --spacing); empty =
      # QUALITY_RUNS of the checkpoint's objective
    quality_ar_steps=(1, 4),  # --what quality: AR steps S of each run
    quality_samples=500,  # --what quality: samples per run and seed, the classes in turn
    quality_seeds=3,  # --what quality: seeds per run (the spread is over them)
    quality_cfg=5.0,  # --what quality: CFG scale (the demo's)
    quality_real=5000,  # --what quality: fresh real images of the reference set
)
# --what quality's runs per objective
QUALITY_RUNS = {"eps": ("ddpm:250", "ddpm:50", "ddpm:20", "ddim:50", "ddim:20", "ddim:10", "ddim:20:eta=1",
                        "ddim:10:eta=1", "dpm++:20", "dpm++:10", "dpm++:5", "dpm++sde:20", "dpm++sde:10", "dpm++sde:5"),
                "flow": ("euler:250", "euler:50", "euler:20", "euler:10", "dpm++:50", "dpm++:20", "dpm++:10", "dpm++:5",
                         "dpm++sde:50", "dpm++sde:20", "dpm++sde:10")}


def timed_rounds(fns, repeats, device):
    """{name: (median seconds, peak GiB on cuda)} of the calls fns[name](). Each round calls every fn once, so
    a slow spell of a shared machine hits all of them alike and their ratios stay fair."""
    times, peaks = {name: [] for name in fns}, {name: 0.0 for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
                peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated(device) / 2 ** 30)
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(times[name]), peaks[name] if device.type == "cuda" else float("nan"))
            for name in fns}


def build_model(cfg, device, **text_options):
    torch.manual_seed(cfg["seed"])
    return CausalFusion(cfg["size"], input_size=cfg["input_size"], patch_size=cfg["patch_size"],
                        in_channels=cfg["in_channels"], num_cond_tokens=cfg["num_cond_tokens"], **text_options).to(device)


def micro_batch(model, n, g):
    """A micro-batch of forward_losses (train.py's step) of n examples on random tokens, at the paper's gamma 0.9:
    clean and noise (n, L, P), timesteps t (n,), labels y (n,), order (n, L) and AR step ids steps (n, L)."""
    L = model.num_tokens
    steps = mask.sample_step_ids(mask.sample_num_steps(n, L, 0.9, g), L, g)
    return dict(clean=torch.randn(n, L, model.token_dim, generator=g),
                noise=torch.randn(n, L, model.token_dim, generator=g), t=torch.randint(0, 1000, (n,), generator=g),
                y=torch.randint(0, model.num_classes, (n,), generator=g),
                order=mask.token_order(n, model.grid_size, model.grid_size, "random", g), steps=steps)


def bench_text(cfg, device, amp):
    """train.py's step (forward_losses, backward, clip, AdamW, EMA) of the class-conditional model against the
    multimodal one: a text of text_len tokens instead of the class tokens, 10% of it captions with their
    next-token loss over the text vocabulary; same image shape and batch, fast path, timed in rounds."""
    g = torch.Generator().manual_seed(cfg["seed"])
    n, objective, fns = cfg["batch_size"], Objective(), {}
    step_options = StepOptions.defaults()  # train.py's defaults: the paper's recipe
    for name, options in (("class", {}), ("text", dict(text_vocab=cfg["text_vocab"], text_len=cfg["text_len"]))):
        model = build_model(cfg, device, **options)
        ema = copy.deepcopy(model).requires_grad_(False)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda")
        L, b = model.num_tokens, micro_batch(model, n, g)
        if options:
            b.update(text=torch.randint(0, cfg["text_vocab"], (n, cfg["text_len"]), generator=g), y=None,
                     text_len=torch.randint(2, cfg["text_len"] + 1, (n,), generator=g),
                     text_after=torch.rand(n, generator=g) >= 0.9)
        b = {k: v if v is None else v.to(device) for k, v in b.items()}
        train_model = torch.compile(model) if cfg["compile"] else model

        def step(model=model, train_model=train_model, ema=ema, params=params, optimizer=optimizer, b=b):
            with amp:
                loss = forward_losses(train_model, model, objective, b, step_options)[0]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            ema_update(ema, model, 0.9999)

        for _ in range(cfg["warmup"]):
            step()
        fns[name] = step
        print(f"{name}: {sum(p.numel() for p in params) / 1e6:.2f}M parameters, sequence "
              f"{model.num_prefix_tokens + 2 * L} tokens")
    return {name: dict(steps_per_s=1 / seconds, peak_mem_gib=peak)
            for name, (seconds, peak) in timed_rounds(fns, cfg["repeats"], device).items()}


def bench_train(cfg, device, amp):
    model = build_model(cfg, device)
    ema = copy.deepcopy(model).requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda")
    g = torch.Generator().manual_seed(cfg["seed"])
    n, L, objective, step_options = cfg["batch_size"], model.num_tokens, Objective(), StepOptions.defaults()
    b = {k: v.to(device) for k, v in micro_batch(model, n, g).items()}
    flops = training_flops(model, mask.causal_mask(b["steps"], b["steps"], model.num_prefix_tokens))
    steps = {}
    for path in ("reference", "fast"):
        train_model = torch.compile(model) if path == "fast" and cfg["compile"] else model
        kernels = (lambda: sdpa_kernel([SDPBackend.MATH])) if path == "reference" else contextlib.nullcontext

        def step(train_model=train_model, kernels=kernels):
            with kernels(), amp:
                loss = forward_losses(train_model, model, objective, b, step_options)[0]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            ema_update(ema, model, 0.9999)

        for _ in range(cfg["warmup"]):  # compiles, and lets the allocator settle
            step()
        steps[path] = step
    results, peak_flops = {}, device_peak_flops(device, cfg["peak_tflops"])
    for path, (seconds, peak) in timed_rounds(steps, cfg["repeats"], device).items():
        results[path] = dict(steps_per_s=1 / seconds, images_per_s=n / seconds, tokens_per_s=n * L / seconds,
                             peak_mem_gib=peak, tflops=flops / seconds / 1e12)
        if peak_flops:
            results[path]["mfu"] = flops / seconds / peak_flops
    return results


def parse_sampler(spec, option, objective="eps"):
    """NAME:STEPS[:eta=E][:spacing=S] (sample.py's --sampler, --steps, --eta, --spacing) -> its sampler for a model
    of the objective."""
    name, _, rest = spec.partition(":")
    steps, *extras = rest.split(":")
    options = dict(sampler=name, steps=int(steps) if steps.isdigit() else -1, objective=objective)  # -1: its error
    for item in extras:
        key, _, value = item.partition("=")
        if key not in ("eta", "spacing"):
            raise ValueError(f"{option} {spec!r}: expected NAME:STEPS[:eta=E][:spacing=S], e.g. dpm++:20")
        options[key] = float(value) if key == "eta" else value
    return make_diffusion(**options)


def bench_sample(cfg, device, dtype):
    model = build_model(cfg, device).eval()
    n, L = cfg["batch_size"], model.num_tokens
    labels = torch.arange(n) % model.num_classes
    samplers = [make_diffusion(cfg["steps"])] + [parse_sampler(spec, "--samplers") for spec in cfg["samplers"]]
    samplers = {f"{d.name}-{len(d.timesteps)}": d for d in samplers}
    runs = {}
    for sampler, diffusion in samplers.items():
        for scale in cfg["sample_scales"]:
            for s in sorted({min(s or L, L) for s in cfg["ar_steps"]}):
                run = functools.partial(sample_batch, model, labels=labels, batch_seed=cfg["seed"], ar_steps=s,
                                        cfg_scale=scale, dtype=dtype)
                run(diffusion=make_diffusion(2, diffusion.name))  # warm-up: the same calls, two steps
                runs[(sampler, scale, s)] = functools.partial(run, diffusion=diffusion)
    results = {key: seconds for key, (seconds, _) in timed_rounds(runs, cfg["sample_repeats"], device).items()}
    rows, first = {}, min(s for _, _, s in results)  # S = 1 unless --ar-steps leaves it out
    for (sampler, scale, s), seconds in results.items():
        rows[f"{sampler} cfg {scale:g} S={s}"] = dict(images_per_s=n / seconds, seconds=seconds,
                                                     vs_S1=seconds / results[(sampler, scale, first)])
    return rows


def pixel_stats(images):
    """Mean and covariance of uint8 images (N, H, W, 3) as vectors in [0, 1]: float64."""
    x = images.reshape(len(images), -1).astype(np.float64) / 255
    return x.mean(0), np.cov(x, rowvar=False)


def bench_quality(cfg, device, dtype):
    """{(run, S): dict(fd, fd_spread, nn_accuracy, seconds, ...)} and the real images' FD floor (see the top)."""
    if not cfg["ckpt"]:
        raise ValueError("--what quality needs --ckpt: a checkpoint of the class demo (python train.py)")
    model, meta = load_checkpoint(cfg["ckpt"])
    runs = cfg["quality_runs"] or QUALITY_RUNS[meta["objective"]]
    if meta["vae"] != "none" or meta["num_classes"] != len(demos.SHAPES):
        raise ValueError(f"--ckpt {cfg['ckpt']}: --what quality scores the class demo's pixels; train it with "
                         f"python train.py")
    model.to(device)
    size, n, seeds = meta["image_size"], cfg["quality_samples"], range(cfg["quality_seeds"])
    real, real_labels = demos.draw_shapes(cfg["quality_real"] // 10, size, seed=10_000)  # unseen in training
    real_mu, real_cov = pixel_stats(real)
    flat = lambda images: torch.from_numpy(images.reshape(len(images), -1)).float()  # uint8 (N, H, W, 3) -> (N, D)
    real_x = flat(real)
    real_unit = real_x / 127.5 - 1  # pixels as [-1, 1], the demo's latents (KID)
    fd = lambda images: frechet_distance(*pixel_stats(images), real_mu, real_cov)
    kid = lambda x: demos.KID_SCALE * demos.kernel_distance(x / 127.5 - 1, real_unit)
    fresh = [demos.draw_shapes(n // 10, size, seed=20_000 + s)[0] for s in seeds]
    floor = [fd(images) for images in fresh]
    kid_floor = [kid(flat(images)) for images in fresh]
    print(f"FD of {n} fresh real images against {len(real)} others: {np.mean(floor):.3f} +- {np.std(floor):.3f}; "
          f"KID x {demos.KID_SCALE}: {np.mean(kid_floor):.2f} +- {np.std(kid_floor):.2f}")
    results, vae = {}, build_vae("none")
    for spec in runs:
        diffusion = parse_sampler(spec, "--quality-runs", meta["objective"])
        for S in cfg["quality_ar_steps"]:
            scores, accs, kids, seconds = [], [], [], []
            for seed in seeds:
                start = time.time()
                images, labels, _ = sample_images(model, vae, 1.0, n, list(range(10)), ar_steps=S, diffusion=diffusion,
                                                  cfg_scale=cfg["quality_cfg"], seed=seed, batch_size=cfg["batch_size"],
                                                  dtype=dtype)
                seconds.append(time.time() - start)
                scores.append(fd(images))
                sample_x = flat(images)
                kids.append(kid(sample_x))
                nearest = torch.cdist(sample_x, real_x).argmin(1)
                accs.append(float((real_labels[nearest.numpy()] == labels).mean()))
            results[(spec, S)] = dict(calls=len(diffusion.timesteps), fd=float(np.mean(scores)),
                                      fd_spread=float(np.std(scores)), fds=scores, nn_accuracy=float(np.mean(accs)),
                                      nn_accuracy_spread=float(np.std(accs)), kid=float(np.mean(kids)),
                                      kid_spread=float(np.std(kids)), seconds=float(np.mean(seconds)))
            r = results[(spec, S)]
            print(f"{spec:22s} S={S:<3d} FD {r['fd']:7.3f} +- {r['fd_spread']:.3f}  KID x {demos.KID_SCALE} "
                  f"{r['kid']:6.1f} +- {r['kid_spread']:.1f}  nearest-class {r['nn_accuracy']:.3f} +- "
                  f"{r['nn_accuracy_spread']:.3f}  {r['seconds']:6.1f} s", flush=True)
    return dict(runs=results, real_floor=float(np.mean(floor)), real_floor_spread=float(np.std(floor)),
                real_kid_floor=float(np.mean(kid_floor)))


def main(argv=None):
    cfg = dict(config)
    parse_config(cfg, argv)
    device = torch.device(cfg["device"])
    dtype = autocast_dtype(cfg["dtype"], device)
    amp = autocast(dtype, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"bench.py on {name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}: {json.dumps(cfg)}")
    report = {}
    if "train" in cfg["what"]:
        report["train"] = bench_train(cfg, device, amp)
    if "sample" in cfg["what"]:
        report["sample"] = bench_sample(cfg, device, dtype)
    if "text" in cfg["what"]:
        report["text"] = bench_text(cfg, device, amp)
    if "quality" in cfg["what"]:
        report["quality"] = bench_quality(cfg, device, dtype)
    if "train" in report:
        ref, fast = report["train"]["reference"], report["train"]["fast"]
        print(f"\ntraining, size {cfg['size']}, batch {cfg['batch_size']}, {dtype}:")
        print(f"{'path':10s} {'steps/s':>9s} {'img/s':>9s} {'tok/s':>10s} {'TFLOP/s':>8s} {'MFU':>6s} {'peak GiB':>9s}")
        for path, r in report["train"].items():
            print(f"{path:10s} {r['steps_per_s']:9.3f} {r['images_per_s']:9.1f} {r['tokens_per_s']:10.0f} "
                  f"{r['tflops']:8.2f} {r.get('mfu', float('nan')):6.1%} {r['peak_mem_gib']:9.2f}")
        print(f"fast / reference: {fast['steps_per_s'] / ref['steps_per_s']:.2f}x")
    if "sample" in report:
        print(f"\nsampling, size {cfg['size']}, batch {cfg['batch_size']}, {dtype}:")
        print(f"{'run':28s} {'img/s':>9s} {'seconds':>9s} {'vs S=1':>7s}")
        for run, r in report["sample"].items():
            print(f"{run:28s} {r['images_per_s']:9.2f} {r['seconds']:9.2f} {r['vs_S1']:6.2f}x")
    if "text" in report:
        r = report["text"]
        print(f"\ntraining step with and without a text, size {cfg['size']}, batch {cfg['batch_size']}, {dtype}, "
              f"{cfg['text_len']} text tokens, vocabulary {cfg['text_vocab']}:")
        for name, row in r.items():
            print(f"{name:10s} {row['steps_per_s']:9.3f} steps/s  peak {row['peak_mem_gib']:.2f} GiB")
        print(f"text / class step time: {r['class']['steps_per_s'] / r['text']['steps_per_s']:.2f}x")
    return report


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:  # bad options or files: the message names them
        sys.exit(f"benchmarks.bench: error: {e}")
