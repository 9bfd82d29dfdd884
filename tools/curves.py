"""Training curves of one or more runs as one PNG (train_monitor.draw_curves draws them; train.py writes OUT/curves.png itself).

    python -m tools.curves runs/L2_sd                                  # one run (its metrics.jsonl) -> curves.png
    python -m tools.curves runs/a runs/b runs/c --out compare.png      # two or more runs on the same axes

A RUN is a train.py --out folder or its metrics.jsonl.
"""
import os
import sys

from runtime import parse_config
from train_monitor import draw_curves, read_metrics

config = dict(
    out="curves.png",  # the PNG to write
)


def run_names(paths):
    """Legend names: each run's folder name, or the whole path where two runs share one."""
    names = [os.path.basename(os.path.normpath(p if os.path.isdir(p) else os.path.dirname(p) or "."))
             for p in paths]
    return [n if names.count(n) == 1 else p for n, p in zip(names, paths)]


def main(argv=None):
    c = dict(config)
    paths = parse_config(c, argv, prog="tools.curves", positional="RUN [RUN ...]")
    if not paths:
        raise ValueError("usage: python -m tools.curves RUN [RUN ...] [--out curves.png]; a RUN is a train.py --out "
                         "folder or its metrics.jsonl")
    runs = {name: read_metrics(p) for name, p in zip(run_names(paths), paths)}
    draw_curves(runs, c["out"])
    print(f"wrote {c['out']}: {len(runs)} run(s), {sum(map(len, runs.values()))} records")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:
        sys.exit(f"tools.curves: error: {e}")
