"""Watching a training run (train.py): its log lines, metrics file, optional loggers, curves and FID.

  RunLog      rank 0 prints each line and appends it to OUT/train.log;
  Metrics     OUT/metrics.jsonl (one JSON record per log line and per evaluation), intact across --resume, and
              the same numbers to TensorBoard (--tensorboard) or W&B (--wandb);
  draw_curves the curves of one or more runs as a PNG with PIL only (loss on a log scale, lr, grad norm, FID),
              OUT/curves.png at each checkpoint and `python -m tools.curves RUN_A RUN_B`;
  FID during training (--eval-every): prepare_fid checks the reference before step 1, evaluate_fid samples on
              every rank (inference.sample_images) and measures on rank 0 with fid.py's functions.
"""
import contextlib
import importlib
import json
import math
import os
import resource

import torch
import torch.distributed as dist
from PIL import Image, ImageDraw, ImageFont

import fid
from inference import gather, make_diffusion, sample_images


class RunLog:
    """Rank 0 prints each line and appends it to OUT/train.log; the other ranks stay silent."""

    def __init__(self, path, rank):
        self.path, self.rank = path, rank

    def __call__(self, msg):
        if self.rank == 0:
            print(msg, flush=True)
            with open(self.path, "a") as f:
                f.write(msg + "\n")


def read_step_stats(pending, micro, world, first_step, ckpt_path):
    """The host values of the steps' device-side rows (image loss, text loss sum, text tokens, grad norm), the
    loop's only device sync: (image losses, (text sum, text tokens) pairs, the last grad norm). The sums are
    added over the ranks (the image loss is a mean over micro-batches); the grad norm is the same on every rank.
    A non-finite value stops the run before the checkpoint could save it."""
    rows = torch.stack(pending)  # (steps, 4)
    sums = rows[:, :3].contiguous()
    if world > 1:
        dist.all_reduce(sums)
    sums[:, 0] /= micro
    losses, text_losses = [], []
    for i, ((loss, text_sum, text_count), norm) in enumerate(zip(sums.tolist(), rows[:, 3].tolist())):
        if not all(map(math.isfinite, (loss, text_sum, norm))):
            raise FloatingPointError(f"step {first_step + i}: non-finite loss {loss}, text loss sum {text_sum} or "
                                     f"grad norm {norm}; stopped without saving, {ckpt_path} keeps the last good state")
        losses.append(loss)
        text_losses.append((text_sum, text_count))
    return losses, text_losses, norm


def log_record(step, losses, text_losses, lr, norm, seconds, cfg, tokenizer, device, num_tokens):
    """The metrics.jsonl record of the last len(losses) steps (timed over `seconds`)."""
    rate = len(losses) / seconds
    mem = (torch.cuda.max_memory_allocated() if device.type == "cuda"
           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 1e9  # peak RSS on cpu
    record = {"step": step, "image_loss" if tokenizer else "loss": sum(losses) / len(losses)}
    if tokenizer is not None:
        text_sum, text_count = map(sum, zip(*text_losses))
        record["text_loss"] = text_sum / max(text_count, 1)
    return dict(record, lr=lr, grad_norm=norm, steps_per_s=rate, img_per_s=rate * cfg["batch_size"],
                tok_per_s=rate * cfg["batch_size"] * num_tokens, mem_gb=mem)  # tok: latent tokens


def log_line(r, captions):
    """The train.log line of a log_record."""
    loss = (f"image loss {r['image_loss']:.6f} | text loss {r['text_loss']:.4f} | captions cut {captions[0]}/"
            f"{captions[1]}" if "text_loss" in r else f"loss {r['loss']:.6f}")
    return (f"step {r['step']} | {loss} | lr {r['lr']:.1e} | grad norm {r['grad_norm']:.3f} | "
            f"{r['steps_per_s']:.2f} steps/s | {r['img_per_s']:.0f} img/s | {r['tok_per_s']:.0f} tok/s | "
            f"mem {r['mem_gb']:.2f} GB")


def optional_import(name):
    """The optional package of --NAME (--tensorboard, --wandb), or an ImportError saying how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ImportError(f"--{name} needs the {name} package: pip install {name} ({e})") from None


class Metrics:
    """Rank 0 appends each record (a log line's numbers, or an evaluation's) to OUT/metrics.jsonl and, with
    --tensorboard / --wandb, logs its numbers there too, at global step = training step; the other ranks do
    nothing. A run that starts at `step` (0, or its checkpoint's) first drops the records after that step, so a
    run killed after logging past its last checkpoint leaves no step twice; TensorBoard hides them (purge_step)
    and W&B continues the run of wandb_id (the checkpoint's)."""

    def __init__(self, cfg, rank, step, wandb_id=None):
        self.path, self.rank, self.records = os.path.join(cfg["out"], "metrics.jsonl"), rank, []
        self.name = os.path.basename(os.path.normpath(cfg["out"]))
        self.tensorboard = self.wandb = None
        if rank > 0:
            return
        if os.path.exists(self.path):
            self.records = [r for r in read_metrics(self.path) if r["step"] <= step]
        with open(self.path + ".tmp", "w") as f:  # the records kept, written whole, then renamed
            f.writelines(json.dumps(r) + "\n" for r in self.records)
        os.replace(self.path + ".tmp", self.path)
        if cfg["tensorboard"]:
            optional_import("tensorboard")
            from torch.utils.tensorboard import SummaryWriter
            self.tensorboard = SummaryWriter(os.path.join(cfg["out"], "tensorboard"), purge_step=step + 1)
        if cfg["wandb"]:
            wandb = optional_import("wandb")
            self.wandb = wandb.init(project=cfg["wandb_project"], name=cfg["wandb_run"] or self.name, config=cfg,
                                    id=wandb_id, resume="allow" if wandb_id else None, allow_val_change=True,
                                    dir=os.environ.get("WANDB_DIR", cfg["out"]))

    @staticmethod
    def scalars(record):
        """The numbers of a record as TensorBoard / W&B tags: train/KEY, or eval/KEY for an evaluation's."""
        group = "eval" if "fid" in record else "train"
        return {f"{group}/{k}": v for k, v in record.items()
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}

    def __call__(self, record):
        if self.rank > 0:
            return
        self.records.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for tag, value in self.scalars(record).items():
                self.tensorboard.add_scalar(tag, value, record["step"])
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log(self.scalars(record), step=record["step"])

    def draw(self, path):
        """The run's curves (draw_curves) into path."""
        if self.rank == 0:
            draw_curves({self.name: self.records}, path)

    def close(self):
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


# ------------------------------------------------------------------------------------------ FID during training
@contextlib.contextmanager
def kept_matmul_precision():
    """fid.py turns TF32 off for its features (TF32 moves FID visibly); training gets its own setting back."""
    precision, cudnn_tf32 = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(precision)
        torch.backends.cudnn.allow_tf32 = cudnn_tf32


def prepare_fid(cfg, rank, device):
    """--eval-every's fixed parts, checked before step 1 (a bad --eval-ref fails here, naming the file): the
    sampler, and on rank 0 the FID Inception and the reference's mu/sigma (computed once; a file's own are used
    as they are, as ADM does); (sampler, None, None) on the other ranks."""
    path = cfg["eval_ref"]
    if not path or cfg["eval_samples"] < 2 or cfg["eval_batch_size"] < 1:
        raise ValueError(f"--eval-every needs --eval-ref (an ADM .npz, or a fid.py --save-stats file), --eval-samples "
                         f">= 2 and --eval-batch-size >= 1; got {path!r}, {cfg['eval_samples']}, "
                         f"{cfg['eval_batch_size']}")
    sampler = make_diffusion(cfg["eval_steps"], cfg["eval_sampler"], cfg["eta"], cfg["spacing"], cfg["objective"])
    ref = fid.read_stats(path)  # raises fid.InputError (a ValueError) naming the file
    if "mu" not in ref:
        fid.read_images(path, 1)  # no statistics: then it must hold arr_0 images
    if rank > 0:
        return sampler, None, None
    inception = fid.load_inception(cfg["fid_weights"] or None, device)
    if "mu" not in ref:
        with kept_matmul_precision():
            ref = fid.stats_from_activations(fid.compute_activations(inception, path, cfg["eval_batch_size"], device))
    if ref["mu"].shape != (2048,):
        raise ValueError(f"--eval-ref {path}: mu has shape {ref['mu'].shape}, FID's pool3 features have 2048")
    return sampler, inception, ref


def fid_name(n):
    return f"FID-{n // 1000}K" if n % 1000 == 0 else f"FID-{n}"


def fid_record(step, value, seconds, sampler, cfg):
    """The metrics.jsonl record of an evaluation."""
    return dict(step=step, fid=value, eval_samples=cfg["eval_samples"], sampler=sampler.name,
                sampler_steps=len(sampler.timesteps), cfg_scale=cfg["cfg_scale"], seconds=seconds)


def fid_line(r, first):
    """The train.log line of an evaluation; the first one adds its cost, to size --eval-every by."""
    n, seconds = r["eval_samples"], r["seconds"]
    cost = f" (the first evaluation: {1000 * seconds / n:.1f} s per 1,000 samples)" if first else ""
    return (f"step {r['step']} | {fid_name(n)} {r['fid']:.4f} | {n} EMA samples, {r['sampler']} {r['sampler_steps']} "
            f"steps, CFG {r['cfg_scale']:g} | {seconds:.1f} s{cost}")


def evaluate_fid(ema, vae, data, tokenizer, sampler, inception, ref, cfg, dtype, rank, world, device):
    """FID of --eval-samples EMA samples against the reference's mu/sigma: balanced classes (class = index mod
    classes), or for a text model the first captions of evenly spaced training images, cycled; seeded by --seed
    alone, so every evaluation sees the same noise. Every rank samples its share (inference.sample_images: global
    batches r, r + world, ...; the samples do not depend on the number of ranks), rank 0 gathers them and
    measures them with fid.py's functions. Returns the FID on rank 0, None on the others."""
    n = cfg["eval_samples"]
    if tokenizer is None:
        cond = dict(classes=list(range(data.num_classes)))
    else:
        images = torch.linspace(0, len(data) - 1, min(n, len(data))).round().long()
        cond = dict(prompts=[data.captions[int(i)][0] for i in images], tokenizer=tokenizer)
    samples, labels, index = sample_images(ema, vae, data.scale_factor, n, diffusion=sampler,
                                           cfg_scale=cfg["cfg_scale"], seed=cfg["seed"],
                                           batch_size=cfg["eval_batch_size"], dtype=dtype, rank=rank,
                                           world_size=world, **cond)
    samples, _ = gather(samples, labels, index, rank, world, cfg["out"])
    if rank > 0:
        return None
    with kept_matmul_precision():
        stats = fid.compute_stats(samples, inception, cfg["eval_batch_size"], device)
    return fid.frechet_distance(stats["mu"], stats["sigma"], ref["mu"], ref["sigma"])  # ADM: samples first


# ------------------------------------------------------------------------------------------ curves
# (title, the record keys it plots (the first one a record has), log scale, markers at the points)
PANELS = (("loss", ("loss", "image_loss"), True, False), ("text loss", ("text_loss",), True, False),
          ("lr", ("lr",), False, False), ("grad norm", ("grad_norm",), False, False), ("FID", ("fid",), False, True))
COLORS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
          (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))  # matplotlib's tab10, run by run
PANEL_SIZE = (460, 300)  # pixels per panel, two panels per row
LEGEND_HEIGHT = 28
MARGIN = dict(left=64, right=16, top=26, bottom=34)  # around each plot area: tick labels, title, "step"
BACKGROUND, AXES, GRID, TEXT = (255, 255, 255), (60, 60, 60), (225, 225, 225), (20, 20, 20)


def read_metrics(path):
    """The records of a run: its folder (OUT/metrics.jsonl) or the .jsonl file. A cut last line (a run killed in
    the middle of writing it) is left out."""
    file = os.path.join(path, "metrics.jsonl") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path}: no metrics.jsonl (train.py writes one into its --out)")
    with open(file) as f:
        lines = f.read().splitlines()
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise ValueError(f"{file}:{i + 1}: not a JSON record") from None
    return records


def series(records, keys):
    """(steps, values) of the first of keys that each record holds."""
    points = [(r["step"], next(r[k] for k in keys if k in r)) for r in records if any(k in r for k in keys)]
    return [s for s, _ in points], [v for _, v in points]


def nice_ticks(lo, hi, n=5):
    """About n round values (1, 2 or 5 times a power of ten apart) within [lo, hi]."""
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw * (1 - 1e-9))
    return [k * step for k in range(math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9) + 1)]


def label(v):
    """A tick label: 150000 -> 150k, 0.0002 -> 0.0002, 12.5 -> 12.5."""
    if v != 0 and abs(v) >= 1000 and v % 1000 == 0:
        return f"{v / 1000:g}k"
    return f"{v:.3g}"


class Axes:
    """A plot area (x0, y0, x1, y1 pixels) showing steps xlim and values ylim (a log10 scale if log)."""

    def __init__(self, box, xlim, ylim, log):
        self.box, self.xlim, self.ylim, self.log = box, xlim, ylim, log

    def point(self, step, value):
        x0, y0, x1, y1 = self.box
        f = math.log10 if self.log else float
        (xa, xb), (ya, yb) = self.xlim, (f(self.ylim[0]), f(self.ylim[1]))
        return x0 + (step - xa) / (xb - xa) * (x1 - x0), y1 - (f(value) - ya) / (yb - ya) * (y1 - y0)


def limits(values, log):
    """(lo, hi) around the values, with a 5% margin (on the log scale for log); never empty."""
    f, g = (math.log10, lambda v: 10 ** v) if log else (float, float)
    lo, hi = f(min(values)), f(max(values))
    pad = (hi - lo) * 0.05 or (0.1 if log else max(abs(lo) * 0.1, 1e-12))
    return g(lo - pad), g(hi + pad)


def y_ticks(lo, hi, log):
    if not log:
        return nice_ticks(lo, hi)
    decades = [10.0 ** k for k in range(math.ceil(math.log10(lo)), math.floor(math.log10(hi)) + 1)]
    return decades if len(decades) >= 2 else [v for v in nice_ticks(lo, hi, 3) if v > 0]


def draw_panel(draw, font, origin, title, lines, log, markers):
    """One panel at origin (its top-left pixel): title, axes with tick labels and grid, lines = [(colour, steps,
    values)]. Returns its Axes, or None when no run has values for it."""
    left, top = origin[0] + MARGIN["left"], origin[1] + MARGIN["top"]
    box = (left, top, origin[0] + PANEL_SIZE[0] - MARGIN["right"], origin[1] + PANEL_SIZE[1] - MARGIN["bottom"])
    draw.text((left, origin[1] + 6), title + (" (log scale)" if log else ""), fill=TEXT, font=font)
    draw.rectangle(box, outline=AXES)
    steps = [s for _, xs, _ in lines for s in xs]
    values = [v for _, _, vs in lines for v in vs]
    if not values:
        draw.text((left + 10, top + 10), "no values", fill=AXES, font=font)
        return None
    xlim = (min(steps), max(steps)) if max(steps) > min(steps) else (min(steps) - 1, max(steps) + 1)
    axes = Axes(box, xlim, limits(values, log), log)
    for v in y_ticks(*axes.ylim, log):
        y = round(axes.point(xlim[0], v)[1])
        draw.line([(box[0] + 1, y), (box[2] - 1, y)], fill=GRID)
        draw.text((box[0] - 4, y), label(v), fill=TEXT, font=font, anchor="rm")
    for s in nice_ticks(*xlim, 4):
        x = round(axes.point(s, axes.ylim[0])[0])
        draw.line([(x, box[3]), (x, box[3] + 4)], fill=AXES)
        draw.text((x, box[3] + 6), label(s), fill=TEXT, font=font, anchor="ma")
    draw.text(((box[0] + box[2]) // 2, box[3] + 20), "step", fill=AXES, font=font, anchor="ma")
    for colour, xs, vs in lines:
        points = [axes.point(s, v) for s, v in zip(xs, vs)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        if markers or len(points) == 1:
            for x, y in points:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
    return axes


def draw_curves(runs, path):
    """Draw runs {name: records (metrics.jsonl dicts)} on shared panels (loss, text loss if any run has one, lr,
    grad norm, FID), one colour per run, into the PNG path. Returns {panel title: Axes (None if empty)}, where
    Axes.point(step, value) is the pixel of a value."""
    names = list(runs)
    panels = [p for p in PANELS if p[0] != "text loss" or any("text_loss" in r for rs in runs.values() for r in rs)]
    rows = -(-len(panels) // 2)
    image = Image.new("RGB", (2 * PANEL_SIZE[0], LEGEND_HEIGHT + rows * PANEL_SIZE[1]), BACKGROUND)
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    x = MARGIN["left"]
    for i, name in enumerate(names):  # the legend: a swatch and the name of each run
        draw.rectangle([x, 10, x + 18, 18], fill=COLORS[i % len(COLORS)])
        draw.text((x + 24, 14), name, fill=TEXT, font=font, anchor="lm")
        x += 40 + round(draw.textlength(name, font=font))
    out = {}
    for j, (title, keys, log, markers) in enumerate(panels):
        lines = []
        for i, name in enumerate(names):
            steps, values = series(runs[name], keys)
            if log:  # a log axis shows positive values only
                steps, values = [s for s, v in zip(steps, values) if v > 0], [v for v in values if v > 0]
            lines.append((COLORS[i % len(COLORS)], steps, values))
        origin = ((j % 2) * PANEL_SIZE[0], LEGEND_HEIGHT + (j // 2) * PANEL_SIZE[1])
        out[title] = draw_panel(draw, font, origin, title, lines, log, markers)
    tmp = path + ".tmp.png"  # written whole, then renamed: a viewer never sees half an image
    image.save(tmp)
    os.replace(tmp, path)
    return out
