"""Distil a flow checkpoint into a few-step model: 1 or 2 network calls per AR step, in diffusion and AR mode.

    python -m distill.few_step --ckpt out/demo/ckpt.pt --out out/few_step      # a train.py --objective flow run
    python sample.py --ckpt out/few_step/ckpt.pt --steps 1 --ar-steps 4 --cfg-scale 5   # then, as any checkpoint

The method: direct distillation into a step-size-conditioned student, as shortcut models (Frans et al. 2024,
"One Step Diffusion via Shortcut Models") condition on the step size, with the teacher's ODE as the target (the
direct distillation of Luhman & Luhman 2021, per step of the sampler's grid). The student is the teacher plus a
zero-initialized step-size embedding (model.py, step_size=True), so it starts as the teacher. Each sample draws
(diffusion.draw_intervals) a step of a k-step euler grid, t = i / k -> (i - 1) / k, for k in --grids (or a fine
step that keeps many-step sampling), and a guidance scale w of --cfg-scales; x_t noises its real tokens (the flow
marginal). The frozen teacher's CFG-guided ODE, in --teacher-steps euler steps, gives x at the step's end
(diffusion.distill_target); the student's guided velocity, [cond; null class] as the sampler runs it, is trained so
that one euler step with its step-size input lands there (diffusion.distill_loss). Training's layout [cond |
clean | noisy] with the teacher's AR splits, orders and class dropout (train_step.py) does every AR step at once
against its clean context, so one forward per teacher step covers them all.

The output is a checkpoint as train.py's (model, ema, optimizer, step, config with the teacher's objective,
model_config with step_size, data): sample.py, the editor and bench.py sample it with the flow samplers, the step
count the only choice. The run writes OUT/train.log and OUT/metrics.jsonl (train_monitor.py), resumes exactly with
--resume (micro-batch draws keyed by (seed, step), as train.py's), one process.
"""
import copy
import dataclasses
import json
import math
import os
import sys
import time

import torch
from tqdm import tqdm

import demos
import mask
from checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from diffusion import Objective, distill_loss, distill_target, draw_intervals, guide_each
from latents import LatentData
from model import CausalFusion
from runtime import SEED_DISTILL_STEP, autocast, autocast_dtype, launch, parse_config, seeded, step_indices
from train_monitor import Metrics, RunLog, log_line, log_record
from train_step import StepOptions, draw_micro_batch, ema_update

config = dict(
    ckpt="",  # the teacher: a train.py checkpoint of --objective flow (required); its EMA weights
    out="out/few_step",  # run dir: ckpt.pt (the few-step model), train.log, metrics.jsonl
    resume=False,  # continue OUT/ckpt.pt exactly (step, weights, optimizer, EMA)
    data="",  # the training latents; "" = the teacher's --data, or its class demo rebuilt under OUT/data
    seed=0,  # seeds the step-size embedding and every random draw
    grids=(1, 2, 4),  # the euler grids learned: k steps of 1 / k each (calls per AR step)
    fine_steps=128,  # plus steps of 1 / fine_steps at logit-normal times: keeps the many-step sampler
    teacher_steps=8,  # the teacher's euler steps over each learned step (its target)
    cfg_scales=(1.0, 5.0),  # guidance scales learned, one drawn per sample (1: the conditional branch alone)
    batch_size=16,  # images per step
    max_steps=400,  # distillation steps
    lr=5e-4,  # AdamW learning rate after warmup
    warmup_steps=20,  # linear lr warmup, then constant
    grad_clip=1.0,  # max global grad norm (0 = no clipping)
    ema_decay=0.99,  # EMA of the weights, warmed up as train.py's; sample.py samples it
    log_every=50,  # steps between log lines
    ckpt_every=200,  # steps between writes of OUT/ckpt.pt (and at the end)
    device="",  # "" = cuda if available, else cpu
    dtype="",  # autocast dtype: bf16 or fp32; "" = bf16 on cuda, fp32 on cpu
)
RUN_KEYS = ("ckpt", "data", "seed", "grids", "fine_steps", "teacher_steps", "cfg_scales", "batch_size")  # --resume


def open_data(cfg, teacher_cfg, rank):
    """The teacher's class-conditional training latents (--data, its --data, or its class demo rebuilt)."""
    data_dir = cfg["data"] or teacher_cfg.get("data", "")
    if not data_dir:
        if teacher_cfg.get("demo") != "classes":
            raise ValueError(f"--ckpt {cfg['ckpt']}: trained on --demo {teacher_cfg.get('demo')}; pass its --data")
        data_dir = demos.build_demo_data(os.path.join(cfg["out"], "data"), teacher_cfg["demo_image_size"],
                                         teacher_cfg["demo_per_class"], teacher_cfg["seed"], rank)
    data = LatentData(data_dir)
    if data.captions is not None:
        raise ValueError(f"--data {data_dir}: captioned data; the distillation takes class-conditional models")
    return data


def build_student(teacher, seed):
    """The teacher's architecture with a zero-initialized step-size embedding, holding the teacher's weights."""
    torch.manual_seed(seed)
    student = CausalFusion(**teacher.config, step_size=True)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("d_embedder.") for k in missing), (missing, unexpected)
    return student


def micro_loss(student, teacher, objective, b, scales, cfg, options):
    """The distillation loss of one micro-batch b (draw_micro_batch's, on the device) at steps b["t"] of sizes
    b["d"] and guidance scales (N,)."""
    steps, order = b["steps"], b["order"]
    attn_mask = mask.causal_mask(steps, steps, teacher.num_prefix_tokens, time_token=teacher.time_token)
    null = torch.full_like(b["y"], teacher.null_class)
    double = lambda a: torch.cat([a, a])  # [cond; null class], as the sampler's CFG batch
    args = dict(clean=double(b["clean"]), y=torch.cat([b["y"], null]), pos=double(order), attn_mask=double(attn_mask))

    def velocity(model, x, t, d=None):
        out = model(noisy=double(x), t=double(objective.model_time(t)), d=None if d is None else double(d), **args)
        return guide_each(out, scales)
    xt = objective.q_sample(b["clean"], b["t"], b["noise"])  # (N, L, P)
    x_end = distill_target(lambda x, t: velocity(teacher, x, t), xt, b["t"], b["d"], cfg["teacher_steps"])
    pred = velocity(student, xt, b["t"], b["d"])
    return distill_loss(pred, xt, x_end, b["d"], mask.ar_weights(steps, options.ar_lambda))


def distill(cfg, rank, world, device):
    if world > 1:
        raise ValueError("distill.few_step runs as one process")
    if not cfg["ckpt"]:
        raise ValueError("--ckpt is required: a train.py checkpoint of --objective flow")
    if not cfg["grids"] or min(cfg["grids"]) < 1 or cfg["teacher_steps"] < 1 or min(cfg["cfg_scales"], default=0) < 1:
        raise ValueError(f"need --grids of step counts >= 1, --teacher-steps >= 1 and --cfg-scales >= 1, got "
                         f"{cfg['grids']}, {cfg['teacher_steps']}, {cfg['cfg_scales']}")
    out = cfg["out"]
    ckpt_path = os.path.join(out, "ckpt.pt")
    if os.path.exists(ckpt_path) and not cfg["resume"]:
        raise FileExistsError(f"{ckpt_path} exists: pass --resume to continue that run, or choose another --out")
    os.makedirs(out, exist_ok=True)
    log = RunLog(os.path.join(out, "train.log"), rank)
    dtype = autocast_dtype(cfg["dtype"], device)

    # the frozen teacher, its training's draws (one copy, one time per image: the student's steps), the data
    teacher_ckpt = read_checkpoint(cfg["ckpt"])
    teacher, meta = load_checkpoint(cfg["ckpt"], ckpt=teacher_ckpt)
    if meta["objective"] != "flow" or teacher.text_vocab or teacher.step_size:
        raise ValueError(f"--ckpt {cfg['ckpt']}: need a class-conditional train.py checkpoint of --objective flow, "
                         f"got objective {meta['objective']}" + (", a text model" if teacher.text_vocab else "")
                         + (", already a few-step model" if teacher.step_size else ""))
    teacher_cfg, teacher_data = teacher_ckpt["config"], teacher_ckpt["data"]
    del teacher_ckpt  # its weights and optimizer state: the teacher holds the EMA weights it needs
    options = dataclasses.replace(StepOptions.from_config(teacher_cfg), noisy_copies=1, per_step_t=False)
    data = open_data(cfg, teacher_cfg, rank)
    objective = Objective("flow")
    teacher.to(device).requires_grad_(False)

    student = build_student(teacher, cfg["seed"]).to(device).train()
    ema = copy.deepcopy(student).requires_grad_(False).eval()
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg["lr"], betas=(0.9, 0.95), eps=1e-15, weight_decay=0.0)
    step = 0
    if cfg["resume"]:
        if not os.path.exists(ckpt_path):
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
        ckpt = read_checkpoint(ckpt_path)
        diff = {k: (ckpt["config"]["few_step"].get(k), cfg[k]) for k in RUN_KEYS
                if ckpt["config"]["few_step"].get(k) != cfg[k]}
        if diff:
            raise ValueError(f"--resume: {ckpt_path} is another run; (checkpoint, now): {diff}")
        student.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
        log(f"resuming {ckpt_path} at step {step}")
    metrics = Metrics(dict(cfg, tensorboard=False, wandb=False), rank, step)
    log(f"config: {json.dumps(cfg)}")
    log(f"teacher {cfg['ckpt']} ({teacher.num_tokens} tokens, {len(data)} samples of {data.num_classes} classes); "
        f"learning {cfg['grids']}-step euler grids and 1/{cfg['fine_steps']} steps against {cfg['teacher_steps']} "
        f"teacher steps each, CFG scales {cfg['cfg_scales']}; on {device} ({dtype})")

    amp, scales = autocast(dtype, device), torch.tensor(cfg["cfg_scales"], dtype=torch.float32)
    losses, pending, timer = [], [], 0.0
    bar = tqdm(total=cfg["max_steps"], initial=step, desc="distill", disable=not sys.stderr.isatty())
    while step < cfg["max_steps"]:
        t0 = time.time()
        lr = cfg["lr"] * min(1.0, (step + 1) / cfg["warmup_steps"]) if cfg["warmup_steps"] else cfg["lr"]
        for group in optimizer.param_groups:
            group["lr"] = lr
        g = seeded(cfg["seed"], SEED_DISTILL_STEP, step)
        indices = step_indices(step, cfg["batch_size"], len(data), cfg["seed"])
        b = draw_micro_batch(data, teacher, indices, g, options, objective)
        n = len(indices)
        b["t"], b["d"] = draw_intervals(n, cfg["grids"], cfg["fine_steps"], g, options.logit_mean, options.logit_std)
        w = scales[torch.randint(len(scales), (n,), generator=g)]  # (N,)
        b = {k: v.to(device) for k, v in b.items()}
        with amp:
            loss = micro_loss(student, teacher, objective, b, w.to(device), cfg, options)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"] or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema_update(ema, student, min(cfg["ema_decay"], (1 + step) / (10 + step)))
        pending.append(loss.detach())
        step += 1
        bar.update()
        timer += time.time() - t0
        if step % cfg["log_every"] == 0 or step == cfg["max_steps"]:
            new = torch.stack(pending).tolist()
            pending.clear()
            if not all(map(math.isfinite, new)):
                raise FloatingPointError(f"step {step}: non-finite loss; {ckpt_path} keeps the last good state")
            losses += new
            record = log_record(step, new, [], lr, float(norm), timer, cfg, None, device, teacher.num_tokens)
            log(log_line(record, None))
            metrics(record)
            timer = 0.0
        if step % cfg["ckpt_every"] == 0 or step == cfg["max_steps"]:
            state = {"model": student.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                     "step": step, "config": dict(teacher_cfg, few_step=cfg), "model_config": student.config,
                     "data": teacher_data, "rng": {"torch": torch.get_rng_state()}}
            save_checkpoint(state, out, False)
            metrics.draw(os.path.join(out, "curves.png"))
    bar.close()
    metrics.close()
    log(f"few-step model: {ckpt_path}; e.g. python sample.py --ckpt {ckpt_path} --steps 1 --ar-steps 4")
    return {"step": step, "losses": losses}


def main(argv=None):
    cfg = dict(config)
    parse_config(cfg, argv)
    return launch(cfg, distill)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:  # bad options or files
        sys.exit(f"distill.few_step: error: {e}")
