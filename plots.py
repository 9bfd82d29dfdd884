"""Training curves as a PNG with PIL only: loss, lr, grad norm and eval FID against the step, one line per run.
train.py draws OUT/curves.png with it at each checkpoint; curves.py draws two or more runs on the same axes.

A run is its --out folder or the metrics.jsonl train.py writes there (one JSON object per log line: step, loss or
image_loss and text_loss, lr, grad_norm, ...; one per evaluation: step, fid, ...). The loss panels have a log
scale; a panel no run has values for says so.
"""
import json
import math
import os

from PIL import Image, ImageDraw, ImageFont


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
