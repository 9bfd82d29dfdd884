"""Tests of train_monitor.py and tools/curves.py: the PNG has the panels' size and each run's line is drawn where its
data says."""
import json
import math
import os

import numpy as np
import pytest
from PIL import Image

from tools import curves
import train_monitor


def _records(loss, fid_scale, steps=range(10, 201, 10)):
    """A run's metrics.jsonl records: loss falling from `loss`, lr warming up to fid_scale x 1e-3 at step 100, grad
    norm rising, and an evaluation every 50 steps."""
    out = []
    for s in steps:
        out.append(dict(step=s, loss=loss * math.exp(-s / 100), lr=fid_scale * 1e-3 * min(1, s / 100),
                        grad_norm=fid_scale + s / 200))
        if s % 50 == 0:
            out.append(dict(step=s, fid=fid_scale * 100 / s, eval_samples=10, sampler="dpm++sde"))
    return out


def _has_colour_near(image, xy, colour, radius=2):
    x, y = round(xy[0]), round(xy[1])
    patch = image[y - radius:y + radius + 1, x - radius:x + radius + 1].reshape(-1, 3)
    return (np.abs(patch.astype(int) - colour).sum(1) <= 30).any()


def test_curves_size_and_lines_where_the_data_says(tmp):
    runs = {"a": _records(2.0, 1.0), "b": _records(0.05, 3.0)}
    path = os.path.join(tmp, "c.png")
    axes = train_monitor.draw_curves(runs, path)
    image = np.asarray(Image.open(path).convert("RGB"))
    w, h = train_monitor.PANEL_SIZE
    assert image.shape == (train_monitor.LEGEND_HEIGHT + 2 * h, 2 * w, 3)  # 4 panels (no text loss), 2 per row
    assert list(axes) == ["loss", "lr", "grad norm", "FID"] and axes["loss"].log and not axes["lr"].log
    a, b = (np.array(c) for c in train_monitor.COLORS[:2])
    for panel, key in (("loss", "loss"), ("lr", "lr"), ("grad norm", "grad_norm"), ("FID", "fid")):
        ax = axes[panel]
        (x0, y0, x1, y1), (xa, xb), (ya, yb) = ax.box, ax.xlim, ax.ylim
        f = math.log10 if ax.log else float
        for colour, name in ((a, "a"), (b, "b")):
            for r in [r for r in runs[name] if key in r][1::3]:
                # the pixel of (step, value), computed here from the panel's box and limits
                x = x0 + (r["step"] - xa) / (xb - xa) * (x1 - x0)
                y = y1 - (f(r[key]) - f(ya)) / (f(yb) - f(ya)) * (y1 - y0)
                assert x0 <= x <= x1 and y0 <= y <= y1, (panel, r)
                assert _has_colour_near(image, (x, y), colour), (panel, name, r, (x, y))
    # the loss panel (log scale): run a's loss 40x run b's is drawn about log10(40) decades higher, and far
    # from b's line there is none of a's colour
    ax = axes["loss"]
    ya, yb = ax.point(100, 2.0 * math.exp(-1))[1], ax.point(100, 0.05 * math.exp(-1))[1]
    decade = (ax.box[3] - ax.box[1]) / (math.log10(ax.ylim[1]) - math.log10(ax.ylim[0]))
    assert abs((yb - ya) - math.log10(40) * decade) < 1
    assert not _has_colour_near(image, ax.point(100, 0.05 * math.exp(-1)), a)
    # the FID panel: a run without evaluations leaves it, and its panel says so
    empty = train_monitor.draw_curves({"a": [r for r in runs["a"] if "fid" not in r]}, path)
    assert empty["FID"] is None and empty["loss"] is not None


def test_curves_command_draws_two_runs_and_text_loss(tmp):
    for name, records in (("run_a", _records(2.0, 1.0)), ("run_b", _records(1.0, 2.0))):
        os.makedirs(os.path.join(tmp, name))
        with open(os.path.join(tmp, name, "metrics.jsonl"), "w") as f:
            f.writelines(json.dumps(dict(r, text_loss=3.0) if "loss" in r else r) + "\n" for r in records)
            f.write('{"step": 210, "loss"')  # a run killed while writing its last line
    out = os.path.join(tmp, "compare.png")
    curves.main([os.path.join(tmp, "run_a"), os.path.join(tmp, "run_b", "metrics.jsonl"), "--out", out])
    image = Image.open(out)
    w, h = train_monitor.PANEL_SIZE
    assert image.size == (2 * w, train_monitor.LEGEND_HEIGHT + 3 * h)  # 5 panels
    assert curves.run_names([os.path.join(tmp, "run_a"), os.path.join(tmp, "run_b", "metrics.jsonl")]) == \
        ["run_a", "run_b"]
    with pytest.raises(FileNotFoundError, match="missing"):  # a run without metrics.jsonl is refused
        curves.main([os.path.join(tmp, "missing"), "--out", out])
