"""What every script sets up the same way: its config from the command line, the device, autocast dtype,
torchrun's process group, seeded generators.

    config = dict(lr=1e-4, size="T", cfg_interval=(0, 1000), compile=False)
    args = parse_config(config)            # sys.argv[1:]: --lr 3e-4 --size=L --cfg-interval 100 800 --compile
    with distributed(cfg["device"]) as (rank, world, device): ...     # one process, or one rank of torchrun
    launch(cfg, run)                                                    # run(cfg, rank, world, device) in it

Config: every key may be given as `--key value` or `--key=value`, dashes or underscores alike. The value is
converted to the type of the default (bool: true/false/1/0/yes/no, or a bare flag for True; a tuple or
list default takes every following value that is not an option; a None default takes a string).
An unknown key or a value of the wrong type is an error that names the key. A word that is not an option is
an error naming it, except where the script takes some (fid.py's file names: returned to it) or a recipe: a
Python file of `key = value` lines (configs/, nanoGPT's config files), applied before every --key value.

Seeding (train.py, finetune/): micro-batch m of step s draws from seeded(seed, SEED_TRAIN_STEP, s, m) (finetune/:
SEED_FINETUNE_STEP) and epoch e's data order from seeded(seed, SEED_DATA_ORDER, e), so resuming needs no generator
state and N ranks compute the same step as one rank accumulating N micro-batches.
"""
import ast
import contextlib
import difflib
import functools
import os
import re
import sys

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
    """The autocast context of --dtype: bf16 autocast, or for fp32 none (an enclosing autocast, such as a training
    run's grids sampling inside its bf16 autocast, stays on)."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()


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
    """run(cfg, rank, world, device) on --device, with TF32 matmuls on GPUs (training: train.py, finetune/)."""
    with distributed(cfg["device"]) as (rank, world, device):
        if device.type == "cuda":
            torch.set_float32_matmul_precision("high")
        return run(cfg, rank, world, device)


PEAK_TFLOPS = (("H100 PCIe", 756), ("H100", 989), ("H200", 989), ("A100", 312))  # dense bf16, first name match


def device_peak_flops(device, tflops=0.0):
    """The dense bf16 peak of a GPU for MFU (tflops > 0: that), from its name; 0 where unknown (a CPU)."""
    if tflops:
        return tflops * 1e12
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    for key, peak in PEAK_TFLOPS:
        if key in name:
            return peak * 1e12
    return 0.0


def barrier(world):
    if world > 1:
        dist.barrier()


# the streams of seeded(seed, stream, ...): one per kind of draw, so no two kinds ever share a generator
SEED_DATA_ORDER = 0  # seeded(seed, SEED_DATA_ORDER, epoch): the epoch's permutation of the training data
SEED_TRAIN_STEP = 1  # seeded(seed, SEED_TRAIN_STEP, step, micro_batch): train.py's draws of a micro-batch
SEED_FINETUNE_STEP = 2  # seeded(seed, SEED_FINETUNE_STEP, step, micro_batch): finetune/'s draws of a micro-batch
SEED_DISTILL_STEP = 3  # seeded(seed, SEED_DISTILL_STEP, step): distill/few_step.py's draws of a step


def seeded(*key):
    """A CPU generator whose seed is a hash of the integers in key."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0]))


@functools.lru_cache(maxsize=1)
def epoch_permutation(n, seed, epoch):
    return torch.randperm(n, generator=seeded(seed, SEED_DATA_ORDER, epoch))


def micro_batches(batch_size, device_batch_size, world):
    """(micro-batches per rank per step, images per micro-batch): the global batch_size over `world` ranks, each
    accumulating micro-batches of device_batch_size (nanochat's; 0 = a rank's whole share at once)."""
    size = device_batch_size or batch_size // world
    if size <= 0 or batch_size % (size * world):
        raise ValueError(f"--batch-size {batch_size} must be a multiple of --device-batch-size {device_batch_size} x "
                         f"{world} rank(s) (the accumulation is batch-size / (device-batch-size x ranks))")
    return batch_size // (size * world), size


def step_indices(step, batch, n, seed):
    """The global batch's sample indices (batch,) at `step`: epochs are seeded permutations, the last partial
    batch of each dropped."""
    epoch, i = divmod(step, n // batch)
    return epoch_permutation(n, seed, epoch)[i * batch:(i + 1) * batch]


# ------------------------------------------------------------------------------------------ the command line
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


class ConfigError(ValueError):
    pass


def _convert(option, text, default):
    kind = type(default)
    if default is None or kind is str:
        return text
    if kind is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ConfigError(f"--{option}: expected true or false, got {text!r}")
    try:
        return kind(text)
    except ValueError:
        raise ConfigError(f"--{option}: expected {kind.__name__}, got {text!r}") from None


def _is_option(word):
    return word.startswith("--") and len(word) > 2


def config_comments(path):
    """{key: its comment} of the `config = dict(...)` block of a script: the comment after `key=value,` and the
    comment lines indented below it (a hanging indent continues it); a comment line at the keys' indent is a
    section heading, kept under the key "# heading"."""
    comments, key, indent, inside = {}, None, None, False
    for line in open(path, encoding="utf-8"):
        stripped = line.strip()
        if not inside:
            inside = stripped.startswith("config = dict(")
            continue
        if stripped == ")":
            break
        depth = len(line) - len(line.lstrip())
        match = re.match(r"(\w+)=.*?#\s?(.*)$", stripped)
        if match:
            key, indent = match.group(1), depth
            comments[key] = match.group(2)
        elif stripped.startswith("#") and key is not None and depth > indent:
            comments[key] += " " + stripped.lstrip("# ")
        elif stripped.startswith("#"):
            comments["# " + stripped.lstrip("# ")] = ""
    return comments


def read_script_config(path):
    """The `config = dict(...)` block of a script as a dict, read from its source without running the script
    (the defaults that a recipe overrides, for a tool that checks recipes)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    call = next(node.value for node in tree.body if isinstance(node, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "config" for t in node.targets))
    return {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}


def print_help(config, prog, path, usage):
    """--help: every key with its default and its comment in the config block, under the block's headings."""
    print(f"usage: {prog} {usage + ' ' if usage else ''}[--key value ...]  (dashes or underscores; --key=value "
          f"works too)")
    comments = config_comments(path) if path else {}
    for key in comments if set(config) <= set(comments) else config:
        if key.startswith("# "):
            print(f"\n{key[2:]}:")
        elif key in config:
            print(f"  --{key.replace('_', '-'):22s} {config[key]!r:>14}   {comments.get(key, '')}")


def _unknown_key(key, config):
    near = difflib.get_close_matches(key, config, n=3, cutoff=0.6)
    return f"did you mean {' or '.join('--' + k.replace('_', '-') for k in near)}? " if near else ""


def _check_type(where, key, value, default):
    """value of a recipe file, checked against the default's type (an int stands for a float; a list for a tuple)."""
    kind = type(default)
    if default is None:
        ok = value is None or isinstance(value, str)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif kind in (tuple, list):
        ok = isinstance(value, (tuple, list))
        value = kind(value) if ok else value
    else:
        ok = type(value) is kind
    if not ok:
        raise ConfigError(f"{where}: {key} = {value!r}: expected {kind.__name__}, like its default {default!r}")
    return value


def read_recipe(path, config):
    """{key: value} of a recipe file: the assignments `key = value` of its top level, each key one of config's
    (a name that starts with _ is the file's own helper), each value of the default's type."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"recipe {path}: {e.strerror}") from None
    try:
        tree = ast.parse(text, path)
        namespace = {}
        exec(compile(tree, path, "exec"), namespace)
    except Exception as e:  # a recipe is the user's Python: name the file and line of whatever stops it
        line = getattr(e, "lineno", None) or (e.__traceback__.tb_next.tb_lineno if e.__traceback__.tb_next else "?")
        raise ConfigError(f"{path}, line {line}: {type(e).__name__}: {e}") from None
    values = {}
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, ast.AnnAssign) else []
        for name in (t.id for t in targets if isinstance(t, ast.Name) and not t.id.startswith("_")):
            where = f"{path}, line {node.lineno}"
            if name not in config:
                raise ConfigError(f"{where}: unknown key {name}: {_unknown_key(name, config)}(--help lists the "
                                  f"{len(config)} keys)")
            values[name] = _check_type(where, name, namespace[name], config[name])
    return values


def parse_config(config, argv=None, prog=None, source=None, positional="", recipes=False):
    """Override `config` in place from argv; return the words that are not options. positional: the usage of the
    words the script takes (fid.py's "REF SAMPLES"); "" = none, a stray word is an error. recipes: a word ending in
    .py is a recipe file (read_recipe), applied in order before every --key value, and returned among the words.
    source: the script whose config block --help reads its comments from (default: the caller's file).
    With argv=None (the real command line) a bad option exits with `prog: error: ...` instead of raising."""
    source = source or sys._getframe(1).f_globals.get("__file__")
    prog = prog or os.path.basename(source or sys.argv[0])
    usage = " ".join(w for w in ("[RECIPE.py ...]" if recipes else "", positional) if w)
    if argv is None:
        try:
            return parse_config(config, sys.argv[1:], prog, source, positional, recipes)
        except ConfigError as e:
            sys.exit(f"{prog}: error: {e}")
    argv = list(argv)
    words, options, i = [], {}, 0
    while i < len(argv):
        word = argv[i]
        i += 1
        if word in ("-h", "--help"):
            print_help(config, prog, source, usage)
            sys.exit(0)
        if not _is_option(word):
            if not positional and not (recipes and word.endswith(".py")):
                after = f" (after {argv[i - 2]})" if i > 1 else ""
                expected = f"options (--key value), and {usage}" if usage else "only options (--key value)"
                raise ConfigError(f"unexpected word {word!r}{after}: {prog} takes {expected}")
            words.append(word)
            continue
        name, has_eq, inline = word[2:].partition("=")
        key = name.replace("-", "_")
        if key not in config:
            raise ConfigError(f"unknown option --{name}: {_unknown_key(key, config)}(--help lists the {len(config)} "
                              f"options)")
        default = config[key]
        if isinstance(default, (tuple, list)):
            values = inline.split(",") if has_eq else []
            while not has_eq and i < len(argv) and not _is_option(argv[i]):
                values.append(argv[i])
                i += 1
            elem = default[0] if len(default) else ""
            options[key] = type(default)(_convert(name, v, elem) for v in values if v != "")
        elif has_eq:
            options[key] = _convert(name, inline, default)
        elif isinstance(default, bool) and (i == len(argv) or _is_option(argv[i])
                                           or argv[i].lower() not in _TRUE | _FALSE):
            options[key] = True  # bare flag
        elif i < len(argv):
            options[key] = _convert(name, argv[i], default)
            i += 1
        else:
            raise ConfigError(f"--{name}: missing value")
    for path in (w for w in words if recipes and w.endswith(".py")):
        config.update(read_recipe(path, config))
    config.update(options)
    return words
