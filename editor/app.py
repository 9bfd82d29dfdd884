"""Zero-shot editing in the browser (paper Sec. 6 "Zero-shot image editing", Fig. 2b, App. D): one page to generate
or upload an image, paint the region to regenerate on the token grid, and regenerate it under a new class or prompt.

    python -m editor.app --ckpt out/demo/ckpt.pt                  # then open http://127.0.0.1:8000
    python -m editor.app --ckpt RUN/ckpt.pt --port 8001           # on a GPU node: ssh -L 8001:127.0.0.1:8001 NODE

The page (editor/page.html: a canvas and plain JavaScript) calls a JSON API that scripts can call too. Images and
masks travel as base64 data URLs (an image: PNG or JPEG; a mask: PNG of the model's image size, white = regenerate):
  GET  /api/info      {"image_size", "classes": [names], "text", "samplers", "grid", "regions", "defaults", ...}
  POST /api/generate  {"class" (index or name) or "prompt", "seed", "sampler", "steps", "cfg_scale", "ar_steps"}
                      -> {"image", "class" or "prompt", "command"}
  POST /api/edit      {"image", "mask", "class" or "prompt", "seed", ...} -> {"image", "mask" (snapped to the
                      tokens), "class" or "prompt", "command"}
  POST /api/caption   {"image", "temperature", "top_k", "seed"} -> {"caption"}            (text models)
  POST /api/crop      {"image"} -> {"image": centre-cropped to the model's size, as sample.py --edit crops}
  GET  /api/progress  {"busy", "task", "elapsed_s", "done", "total", "waiting"}: the sampler steps of the request
                      that computes, and how many wait
The generate and edit requests also take sample.py's eta, spacing, cfg_interval, split, order and order_block. A
missing field takes sample.py's default, and an answer is what sample.py computes from the same inputs; its
"command" is that sample.py command:
  /api/generate  `sample.py --classes C --seed S --num-samples 1 ...`: the image is OUT_DIR/000000.png (a random
                 class, with no "class", is drawn from the seed as sample.py draws it: the answer names it);
  /api/edit      `sample.py --edit ORIGINAL.png --keep KEEP.png --classes C --seed S --num-samples 1 ...` with
                 ORIGINAL.png the request's image and KEEP.png the answer's mask inverted (--keep keeps the
                 white): the edit is the third image (original | kept | edit) of OUT_DIR/edit_KEEP.png.
A token is regenerated when its pixels of the mask average white (>= 128), as sample.py snaps --keep MASK.png.
A refused request gets a 4xx with {"error": "..."} naming the field or the header and what was expected (400 bad
input, 403 another Host or Origin, 404, 405, 408 past --request-timeout, 414, 415 not application/json, 431), 503
when --max-waiting requests already wait; the server's own errors are 500. One request computes at a time (the
model and its KV cache are not thread-safe), the others wait; a request whose client has gone stops at its next
sampler step. Limits (MAX_* below, and the max_* options) bound the memory, the compute and the connections of
hostile requests; /api/info states them (max_*, and memory_mb: the most memory one request and all take). The
server listens on 127.0.0.1 unless --host says otherwise, answers only requests addressed to it (Host
127.0.0.1:PORT, localhost:PORT, --host:PORT or an --allow-host name) and serves its page and this API only:
nothing a request names is read from disk. Ctrl-C or SIGTERM stops it.
"""
import base64
import binascii
import contextlib
import io
import json
import math
import os
import re
import select
import shlex
import signal
import socket
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import numpy as np
import torch
from PIL import Image

import tokenization
from diffusion import SAMPLERS_OF
from images import center_crop, to_8bit
from inference import (DEFAULT_STEPS, caption_images, check_sampling_options, class_labels, edit_tokens,
                       encode_images, load_model, make_diffusion, region_masks, sample_batch, sample_seed, snap_mask,
                       tokens_to_images)
from runtime import autocast, autocast_dtype, distributed, parse_config, read_script_config

config = dict(
    ckpt="",  # a checkpoint of train.py, or of the authors' code (as sample.py --ckpt)
    ema=True,  # the EMA weights (false: the raw "model" weights)
    vae=None,  # sd, mar or none; default: the checkpoint's (the authors' checkpoints: mar)
    vae_ckpt=None,  # VAE weights (vae.py); "random" = random weights, for speed measurements
    tokenizer="",  # a text model's tokenizer file: checked against the copy in the checkpoint (optional)
    dtype="",  # bf16 (autocast) or fp32; "" = bf16 on cuda, fp32 on cpu (as sample.py)
    device="",  # default: cuda if available, else cpu
    host="127.0.0.1",  # address to listen on; 0.0.0.0 opens the page, which has no login, to the whole network
    port=8000,  # port to listen on (0: any free port, printed)
    allow_host=(),  # more HOST:PORT names the page is opened at (an SSH tunnel to another local port: localhost:9000)
    max_request_mb=16.0,  # request bodies above this many MiB are refused (HTTP 400)
    max_request_steps=4000,  # sampler steps x AR steps (x 2 with CFG) one request may take (HTTP 400 above)
    max_waiting=8,  # requests that may wait for the model while one computes (HTTP 503 above)
    max_connections=16,  # connections served at once; more wait in the listen queue
    request_timeout=60.0,  # seconds for a request's line, headers and body together (HTTP 408 after)
)

# the request fields that are sample.py options, with sample.py's defaults, read from its source (an entry point
# imports no other)
SAMPLE_CONFIG = read_script_config(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                "sample.py"))
SAMPLING_DEFAULTS = {k: SAMPLE_CONFIG[k] for k in ("seed", "sampler", "steps", "cfg_scale", "ar_steps", "eta",
                                                   "spacing", "cfg_interval", "split", "order", "order_block")}
CAPTION_DEFAULTS = {k: SAMPLE_CONFIG[k] for k in ("temperature", "top_k", "seed")}  # sample.py --caption's
SHOWN_ALWAYS = ("sampler", "steps", "cfg_scale", "ar_steps")  # in every answer's command; the others when set
FIELDS = {  # what each POST takes
    "generate": {"class", "prompt", *SAMPLING_DEFAULTS},
    "edit": {"image", "mask", "class", "prompt", *SAMPLING_DEFAULTS},
    "caption": {"image", *CAPTION_DEFAULTS},
    "crop": {"image"},
}
MAX_SEED = 2 ** 32 - 1
MAX_STEPS = 1000  # the schedule's timesteps (diffusion.Objective)
MAX_CFG_SCALE = 20.0  # far above any useful guidance; larger scales only overflow the latents
MIN_TEMPERATURE = 0.01  # a caption's temperature below it (but 0, greedy) overflows the logits it divides
MAX_PROMPT_CHARS = 4096  # a longer prompt is refused before it is tokenized
# an upload is refused before it is decoded when it has more pixels (decoding takes up to BYTES_PER_PIXEL bytes
# each), or when one side is more than MAX_ASPECT times the other: the centre crop resizes the short side to the
# model's size, so the long side would grow to more than MAX_ASPECT times it
MAX_PIXELS = 4096 * 4096
MAX_ASPECT = 16
BYTES_PER_PIXEL = 12  # PIL's peak per pixel: a progressive CMYK JPEG's coefficients (8) and its pixels (4)
BODY_COPIES = 4  # of a body at once while its image decodes: the data URL, its base64 part, that as bytes, the file
IMAGE_FORMATS = ("PNG", "JPEG")  # the only decoders PIL runs on an upload
# a body with more of the characters [ { , : (JSON's containers, keys and items, each a Python object) is refused
# before it is parsed: a request has about 20, a prompt's punctuation counts too
MAX_JSON_MARKS = 2 * MAX_PROMPT_CHARS
A_REQUEST = "a request is one object of strings, numbers and [lo, hi]"
MAX_REQUEST_LINE = 65536  # bytes (http.server's limit)
LINGER_S = 2.0  # after its answer, a connection is read (and dropped) this long: closing a socket with unread
# request bytes resets it, and the client may lose the answer
REQUEST_LINE = re.compile(r"[A-Z]+ /\S* HTTP/1\.[01]")
SERVED_METHODS = ("GET", "POST")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# the page's one-click regions to regenerate (paper Fig. 2b: the centre, the top or the bottom half; App. D, Fig. 7:
# the outer region) -> inference.region_masks' names
REGIONS = dict(centre="inner", top="top", bottom="bottom", outer="outer")
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "page.html")


class RequestError(ValueError):
    """A refused request: HTTP `status` (400: bad input) with the message."""

    def __init__(self, message, status=400):
        super().__init__(message)
        self.status = status


class ClientGone(Exception):
    """The client closed its connection: its work stops, nothing is answered."""


def shown(value, chars=80):
    """A request's value in a message, cut to `chars`."""
    return json.dumps(value)[:chars]


def number(value):
    """A JSON number (not a bool) that a float holds finitely (not 1e400, NaN or a 400-digit integer)."""
    try:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    except OverflowError:  # an integer beyond float
        return False


def option_to_field(message):
    """The library's messages name sample.py's options (--cfg-scale); the API's fields are cfg_scale."""
    return re.sub(r"--([a-z][a-z-]*)", lambda m: m.group(1).replace("-", "_"), message)


def typed(fields, name, default):
    """fields[name], checked to be of the type of its default (an int is also a float; a float is finite), or the
    default. An integer may be of any size: the caller checks its range."""
    value = fields.get(name, default)
    if isinstance(default, tuple):
        if isinstance(value, (list, tuple)) and len(value) == 2 and all(map(number, value)):
            return tuple(float(v) for v in value)
        raise RequestError(f"{name}: expected two numbers [lo, hi], got {shown(value)}")
    if isinstance(default, float) and number(value):
        return float(value)
    if isinstance(default, int) and isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(default, str) and isinstance(value, str):
        return value
    kind = {float: "a finite number", int: "an integer", str: "a string"}[type(default)]
    raise RequestError(f"{name}: expected {kind}, got {shown(value)}")


def open_image(fields, name, formats):
    """The PIL image of a base64 data URL field, opened (its size read) but not decoded; refused when not of
    `formats`, over MAX_PIXELS or with sides more than MAX_ASPECT apart."""
    if name not in fields:
        raise RequestError(f"{name}: required (a data:image/png;base64,... URL)")
    value, what = fields[name], " or ".join(formats)
    header, comma, payload = value.partition(",") if isinstance(value, str) else ("", "", "")
    if not (comma and header.startswith("data:") and header.endswith(";base64")):
        raise RequestError(f"{name}: expected a base64 data URL of a {what} image (data:image/png;base64,...), got "
                           f"{shown(value, 60)}")
    try:
        raw = base64.b64decode(payload, validate=True)
    except binascii.Error as e:
        raise RequestError(f"{name}: the data URL's base64 does not decode ({e})") from None
    try:
        image = Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as e:
        raise RequestError(f"{name}: {e}") from None
    except (OSError, SyntaxError, ValueError):
        raise RequestError(f"{name}: expected a {what} image, got {len(raw)} bytes of neither") from None
    if image.format not in formats:
        raise RequestError(f"{name}: expected a {what} image, got {image.format}")
    w, h = image.size
    shape = f"{name}: {w}x{h} pixels"
    if w * h > MAX_PIXELS:
        raise RequestError(f"{shape}, more than the {MAX_PIXELS} accepted: downscale it")
    if max(w, h) > MAX_ASPECT * min(w, h):
        raise RequestError(f"{shape}: one side is more than {MAX_ASPECT} times the other (the centre crop would "
                           f"resize the short side to the model's size, and the long side with it): crop it")
    return image


def decode(image, name):
    """image decoded (load), 16-bit greyscale scaled to 8 bits; a broken file is a RequestError naming the field."""
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise RequestError(f"{name}: not a readable {image.format} ({e})") from None
    return to_8bit(image)


def parse_json(body):
    """The request body (bytes) as a JSON object; refused (RequestError naming the body) when it has more than
    MAX_JSON_MARKS containers, keys and items, is not JSON, or is not an object."""
    marks = sum(body.count(c) for c in (b"[", b"{", b",", b":"))
    if marks > MAX_JSON_MARKS:
        raise RequestError(f"body: {marks} of the JSON characters [ {{ , :, more than the {MAX_JSON_MARKS} accepted "
                           f"({A_REQUEST})")
    try:
        fields = json.loads(body)
    except RecursionError:
        raise RequestError(f"body: JSON nested too deep ({A_REQUEST})") from None
    except ValueError as e:  # not UTF-8, not JSON, or an integer of more digits than Python converts
        raise RequestError(f"body: expected a JSON object, got text that is not JSON ({e})") from None
    if not isinstance(fields, dict):
        raise RequestError(f"body: expected a JSON object {{\"field\": value, ...}}, got a JSON "
                           f"{type(fields).__name__}")
    return fields


def connected(sock):
    """Whether the client still holds the connection: it has sent its whole request, so a socket with something
    to read and nothing to peek at was closed (or reset) by it."""
    poll = select.poll()
    poll.register(sock, select.POLLIN)
    if not poll.poll(0):
        return True
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""
    except OSError:
        return False


def memory_mb(cfg):
    """(one request, all requests at once): the most memory in MiB that requests take beyond the model's own: a
    body of max_request_mb for each connection, BODY_COPIES of it and BYTES_PER_PIXEL for each of MAX_PIXELS
    pixels for the one request that decodes."""
    one = BODY_COPIES * cfg["max_request_mb"] + BYTES_PER_PIXEL * MAX_PIXELS / 2 ** 20
    return one, one + (cfg["max_connections"] - 1) * cfg["max_request_mb"]


def png_url(pixels):
    """uint8 (H, W, 3) or (H, W) -> a data:image/png;base64 URL."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


class Progress:
    """What the computing request does, for GET /api/progress (read without waiting for the model)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.task, self.started, self.done, self.total, self.waiting = None, 0.0, 0, 0, 0
        self.alive = None  # the computing request's connected(): its work stops when its client has gone

    def state(self):
        busy = self.task is not None
        return dict(busy=busy, task=self.task, elapsed_s=round(time.time() - self.started, 2) if busy else 0.0,
                    done=self.done, total=self.total, waiting=self.waiting)

    def count(self, steps):
        """generate()'s progress wrapper: one tick per sampler step; ClientGone stops the work."""
        for step in steps:
            if not self.alive():
                raise ClientGone
            yield step
            self.done += 1


class Editor:
    """The model and what the API computes with it, one request at a time."""

    def __init__(self, cfg, device):
        self.cfg, self.device = cfg, device
        self.dtype = autocast_dtype(cfg["dtype"], device)
        self.model, self.meta, self.vae, self.scale, self.tokenizer = load_model(cfg, device)
        self.size, self.grid = self.meta["image_size"], self.model.grid_size
        self.text = bool(self.model.text_vocab)
        # the checkpoint's objective picks the samplers, as in sample.py; "" = its default (eps: ddpm, flow: euler)
        self.objective = self.meta["objective"]
        self.defaults = dict(SAMPLING_DEFAULTS, sampler=SAMPLERS_OF[self.objective][0])
        self.class_names = self.meta.get("class_names") or [str(k) for k in range(self.model.num_classes)]
        self.model_lock, self.progress = threading.Lock(), Progress()
        # one request at a time parses its body and decodes its images: the memory of one, whatever the number
        self.decoding = threading.Lock()
        self.info_answer = self.info()  # GET /api/info's answer: the same for every request

    @contextlib.contextmanager
    def computing(self, task, alive, total=0):
        """Hold the model for one request; the others wait here (503 when max_waiting already do). alive: whether
        the request's client is still connected."""
        progress = self.progress
        with progress.lock:
            if self.model_lock.locked() and progress.waiting >= self.cfg["max_waiting"]:
                raise RequestError(f"busy: {progress.waiting} requests wait for the model, the most that may "
                                   f"(--max-waiting {self.cfg['max_waiting']}); try again later", 503)
            progress.waiting += 1
        with self.model_lock:
            with progress.lock:
                progress.waiting -= 1
                progress.task, progress.started, progress.done, progress.total = task, time.time(), 0, total
            progress.alive = alive
            try:
                if not alive():  # gone while it waited
                    raise ClientGone
                yield
            finally:
                progress.task = None

    # -------------------------------------------------------------------------------------- requests
    def info(self):
        """What the page shows and the limits (computed once: Editor.info_answer)."""
        regions = region_masks(self.grid)
        return dict(image_size=self.size, classes=self.class_names, text=self.text,
                    samplers=list(SAMPLERS_OF[self.objective]), grid=self.grid, token_pixels=self.size // self.grid,
                    num_tokens=self.model.num_tokens,
                    text_tokens=self.model.num_prefix_tokens if self.text else 0,
                    regions={name: regions[kind].flatten().int().tolist() for name, kind in REGIONS.items()},
                    defaults=dict(self.defaults), default_steps=DEFAULT_STEPS[self.objective], max_steps=MAX_STEPS,
                    max_request_steps=self.cfg["max_request_steps"], max_cfg_scale=MAX_CFG_SCALE,
                    max_image_pixels=MAX_PIXELS, max_image_aspect=MAX_ASPECT, max_request_mb=self.cfg["max_request_mb"],
                    memory_mb=dict(zip(("request", "all"), map(round, memory_mb(self.cfg)))),
                    ckpt=self.cfg["ckpt"], vae=self.cfg["vae"] or self.meta["vae"], device=str(self.device),
                    dtype=self.dtype)

    def generate(self, fields, alive):
        """Batch 0 of `sample.py --num-samples 1`: one image of the class (or prompt). alive: whether the client is
        still connected (every request takes it)."""
        self.check_fields(fields, "generate")
        classes, prompts = self.condition(fields, required=False)
        seed, diffusion, options = self.sampling(fields, classes, self.model.num_tokens)
        if prompts:
            text, lengths, _ = tokenization.tokenize(self.tokenizer, prompts, self.model.num_prefix_tokens)
            cond, answer = dict(labels=None, text=text, text_lengths=lengths), dict(prompt=prompts[0])
        else:  # sample.py's labels: --classes, or drawn from the seed
            labels = class_labels(1, classes, self.model.num_classes, seed)
            cond, answer = dict(labels=labels), {"class": int(labels[0])}
        with self.computing("generate", alive, options["ar_steps"] * len(diffusion.timesteps)):
            tokens = sample_batch(self.model, diffusion, batch_seed=sample_seed(seed, 0), dtype=self.dtype,
                                  progress=self.progress.count, **cond, **options)  # sample_images' batch 0
            image = tokens_to_images(tokens, self.model, self.vae, self.scale)[0]
        self.check_finite(tokens)
        command = self.command(fields, answer, edit=False)
        return dict(image=png_url(image), command=command, **answer)

    def edit(self, fields, alive):
        """`sample.py --edit IMAGE --keep (the inverted mask) --num-samples 1`: the one edit of its figure."""
        self.check_fields(fields, "edit")
        image = self.crop_image(fields)
        regenerate = self.mask_tokens(fields)  # (grid, grid)
        if regenerate.all() or not regenerate.any():
            raise RequestError(f"mask: regenerates {int(regenerate.sum())} of {self.grid ** 2} tokens (white = "
                               f"regenerate); paint some, not all")
        classes, prompts = self.condition(fields, required=True)
        seed, diffusion, options = self.sampling(fields, classes, int(regenerate.sum()))
        with self.computing("edit", alive, options["ar_steps"] * len(diffusion.timesteps)):
            originals = encode_images(np.asarray(image)[None], self.model, self.vae, self.scale)  # (1, L, P)
            edits = edit_tokens(self.model, originals, ~regenerate, classes, seed, diffusion, self.dtype, prompts,
                                self.tokenizer, progress=self.progress.count, **options)  # (1, 1, L, P)
            edited = tokens_to_images(edits.flatten(0, 1), self.model, self.vae, self.scale)[0]
        self.check_finite(edits)
        pixels = self.size // self.grid
        snapped = np.kron(regenerate.numpy().astype(np.uint8) * 255, np.ones((pixels, pixels), np.uint8))
        answer = dict(prompt=prompts[0]) if prompts else {"class": classes[0]}
        return dict(image=png_url(edited), mask=png_url(snapped), command=self.command(fields, answer, edit=True),
                    **answer)

    def caption(self, fields, alive):
        """`sample.py --caption IMAGE` (with --temperature, --top-k, --seed) of one image."""
        self.check_fields(fields, "caption")
        if not self.text:
            raise RequestError("this is a class-conditional model: captions need a model trained on captions")
        image = self.crop_image(fields)
        temperature, top_k, seed = (typed(fields, k, v) for k, v in CAPTION_DEFAULTS.items())
        if temperature < 0 or top_k < 0 or 0 < temperature < MIN_TEMPERATURE:
            raise RequestError(f"temperature and top_k: expected 0 (greedy) or >= {MIN_TEMPERATURE}, and >= 0; got "
                               f"{temperature} and {shown(top_k)}")
        with self.computing("caption", alive):
            g = torch.Generator(self.device).manual_seed(seed)
            with autocast(self.dtype, self.device):  # sample.py --caption's autocast
                tokens = encode_images(np.asarray(image)[None], self.model, self.vae, self.scale)
                text = caption_images(self.model, tokens, self.tokenizer, temperature, top_k, g)[0]
        return dict(caption=text)

    def crop(self, fields, alive):
        """The image centre-cropped (nothing computes: alive is not asked)."""
        self.check_fields(fields, "crop")
        return dict(image=png_url(np.asarray(self.crop_image(fields))))

    # -------------------------------------------------------------------------------------- checks
    @staticmethod
    def check_fields(fields, request):
        unknown = sorted(set(fields) - FIELDS[request])
        if unknown:
            raise RequestError(f"unknown field(s) {', '.join(map(repr, unknown))}: /api/{request} takes "
                               f"{', '.join(sorted(FIELDS[request]))}")

    def crop_image(self, fields):
        """The request's image, centre-cropped to the model's size (sample.py --edit's crop)."""
        with self.decoding:
            return center_crop(decode(open_image(fields, "image", IMAGE_FORMATS), "image").convert("RGB"), self.size)

    def mask_tokens(self, fields):
        """(grid, grid) bool: the tokens the request's mask regenerates (its size checked before it is decoded)."""
        with self.decoding:
            mask = open_image(fields, "mask", ("PNG",))
            if mask.size != (self.size, self.size):
                raise RequestError(f"mask: expected a {self.size}x{self.size} PNG (the model's image size; white = "
                                   f"regenerate), got {mask.width}x{mask.height}")
            return snap_mask(decode(mask, "mask"), self.grid)

    def condition(self, fields, required):
        """([class index] or None, [prompt] or None) of the request."""
        if self.text:
            if "class" in fields:
                raise RequestError("class: this is a text model: give a prompt")
            prompt = fields.get("prompt")
            if not isinstance(prompt, str) or not prompt.strip():
                raise RequestError(f"prompt: expected a non-empty string (a text model), got {shown(prompt)}")
            if len(prompt) > MAX_PROMPT_CHARS:
                raise RequestError(f"prompt: {len(prompt)} characters, more than the {MAX_PROMPT_CHARS} accepted")
            length = len(self.tokenizer.encode_batch([prompt])[0]) + 2  # with BOS and EOS
            if length > self.model.num_prefix_tokens:
                raise RequestError(f"prompt: {length} tokens with BOS and EOS, the model reads at most "
                                   f"{self.model.num_prefix_tokens}: shorten it")
            return None, [prompt]
        if "prompt" in fields:
            raise RequestError("prompt: this is a class-conditional model (no text): give a class")
        if "class" not in fields:
            if required:
                raise RequestError("class: required, the new class of the regenerated region (index or name)")
            return None, None
        value, names = fields["class"], self.class_names
        if isinstance(value, str):  # a name, or an index as text (ASCII digits: int() also reads '²')
            value = names.index(value) if value in names else int(value) if re.fullmatch(r"\s*[0-9]{1,9}\s*",
                                                                                          value) else value
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < len(names):
            raise RequestError(f"class: expected an index in 0..{len(names) - 1} or a class name "
                               f"({', '.join(names[:4])}, ...), got {shown(fields['class'])}")
        return [value], None

    def sampling(self, fields, classes, num_tokens):
        """(seed, Sampler, sample_batch's options) of the request's sample.py fields."""
        got = {k: typed(fields, k, v) for k, v in self.defaults.items()}
        if not 0 <= got["seed"] <= MAX_SEED:
            raise RequestError(f"seed: expected an integer in 0..{MAX_SEED}, got {shown(got['seed'])}")
        if not 0 <= got["steps"] <= MAX_STEPS:
            raise RequestError(f"steps: expected sampler steps per AR step in 1..{MAX_STEPS}, or 0 for the "
                               f"sampler's default ({DEFAULT_STEPS[self.objective]}); got {shown(got['steps'])}")
        options = {k: got[k] for k in ("ar_steps", "split", "order", "order_block", "cfg_scale", "cfg_interval")}
        try:
            diffusion = make_diffusion(got["steps"], got["sampler"], got["eta"], got["spacing"], self.objective)
            check_sampling_options(self.model, classes=classes, num_tokens=num_tokens, **options)
        except ValueError as e:
            raise RequestError(option_to_field(str(e))) from None
        if got["cfg_scale"] > MAX_CFG_SCALE:
            raise RequestError(f"cfg_scale: expected at most {MAX_CFG_SCALE:g}, got {got['cfg_scale']:g}")
        guided = got["cfg_scale"] > 1  # a doubled batch: each step costs two
        steps = len(diffusion.timesteps) * got["ar_steps"] * (2 if guided else 1)
        if steps > self.cfg["max_request_steps"]:
            raise RequestError(f"steps, ar_steps{', cfg_scale' if guided else ''}: {len(diffusion.timesteps)} sampler "
                               f"steps x {got['ar_steps']} AR steps{' x 2 (CFG)' if guided else ''} = {steps}, more "
                               f"than the {self.cfg['max_request_steps']} a request may take (/api/info "
                               f"max_request_steps)")
        return got["seed"], diffusion, options

    @staticmethod
    def check_finite(tokens):
        if not torch.isfinite(tokens).all():  # a NaN would decode to a plausible-looking image
            raise FloatingPointError("non-finite latents (try --dtype fp32)")

    def command(self, fields, answer, edit):
        """The sample.py command that computes this answer (edit: with ORIGINAL.png and KEEP.png)."""
        cfg, args = self.cfg, ["python", "sample.py", "--ckpt", self.cfg["ckpt"]]
        args += ["--ema", "false"] if not cfg["ema"] else []
        args += [a for k in ("vae", "vae_ckpt", "dtype", "device") if cfg[k] for a in ("--" + k.replace("_", "-"),
                                                                                        cfg[k])]
        args += ["--edit", "ORIGINAL.png", "--keep", "KEEP.png"] if edit else []
        args += ["--prompts", answer["prompt"]] if "prompt" in answer else ["--classes", str(answer["class"])]
        args += ["--seed", str(typed(fields, "seed", self.defaults["seed"])), "--num-samples", "1"]
        for key, default in self.defaults.items():
            value = typed(fields, key, default)
            if key == "sampler":
                value = value or default  # "" = the objective's default, named in the command
            if key != "seed" and (key in SHOWN_ALWAYS or value != default):
                args += ["--" + key.replace("_", "-"), *map(str, value if isinstance(value, tuple) else [value])]
        return shlex.join(args)


# ------------------------------------------------------------------------------------------ HTTP
class DeadlineReader(io.RawIOBase):
    """A socket's reads under one deadline for the whole request (a socket's timeout is per read: a client sending
    a byte at a time would hold its thread forever)."""

    def __init__(self, sock, seconds):
        super().__init__()
        self.sock, self.seconds, self.deadline = sock, seconds, time.monotonic() + seconds

    def readable(self):
        return True

    def readinto(self, buffer):
        try:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self.sock.settimeout(left)
            return self.sock.recv_into(buffer)
        except TimeoutError:
            raise RequestError(f"request: its line, headers and body did not arrive within {self.seconds:g} s "
                               f"(--request-timeout)", 408) from None


class Handler(BaseHTTPRequestHandler):
    """One request per connection (HTTP/1.0); every refusal is a JSON error naming what was wrong."""
    server_version = "nanoCausalFusion-editor"
    POST = dict(generate=Editor.generate, edit=Editor.edit, caption=Editor.caption, crop=Editor.crop)

    def setup(self):
        super().setup()
        self.rfile.close()  # StreamRequestHandler's waits per read
        self.rfile = io.BufferedReader(DeadlineReader(self.connection, self.server.cfg["request_timeout"]))

    def handle_one_request(self):
        self.command, self.path, self.requestline, self.request_version = None, "", "", "HTTP/1.0"
        try:
            self.raw_requestline = self.rfile.readline(MAX_REQUEST_LINE + 1)
            if not self.raw_requestline:  # closed without a request
                return
            self.check_request_line()
            if not self.parse_request():  # reads the headers; answers their errors itself (send_error)
                return
            self.check_sender()
            if self.command == "GET":
                self.do_GET()
            else:
                self.do_POST()
        except RequestError as e:
            self.send_json(e.status, dict(error=str(e)))
        except ValueError as e:  # the library's check of a value
            self.send_json(400, dict(error=option_to_field(str(e))))
        except FloatingPointError as e:
            self.send_json(500, dict(error=str(e)))
        except ClientGone:
            self.log_message("%s: the client has gone, its work stopped", self.path)
        except ConnectionError:  # reset by the client
            self.log_message("%s: the connection was reset", self.path)
        except Exception:  # a bug: the server goes on serving; the answer echoes nothing of the request
            traceback.print_exc()
            self.send_json(500, dict(error="internal error (the server's log has the traceback)"))

    def check_request_line(self):
        line = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        if len(self.raw_requestline) > MAX_REQUEST_LINE:
            raise RequestError(f"request line: more than {MAX_REQUEST_LINE} bytes", 414)
        if not REQUEST_LINE.fullmatch(line):
            raise RequestError(f"request line: expected 'GET /PATH HTTP/1.1' or 'POST /api/... HTTP/1.1', got "
                               f"{shown(line)}")
        if line.split()[0] not in SERVED_METHODS:
            raise RequestError(f"method: {line.split()[0]} is not served (GET and POST are)", 405)

    def check_sender(self):
        """Only the page's own origin: the Host header names this server (another name is a DNS-rebinding page's,
        which would read the answers), an Origin header is the page's (another site's page would use the model)."""
        allowed = self.server.allowed_hosts
        host = self.headers.get("Host", "")
        if host.lower() not in allowed:
            raise RequestError(f"Host: {shown(host)} is not this server's address ({', '.join(sorted(allowed))}); "
                               f"another name (an SSH tunnel's port): --allow-host NAME:PORT", 403)
        origin = self.headers.get("Origin")
        if origin is not None and origin.lower() not in self.server.allowed_origins:
            raise RequestError(f"Origin: {shown(origin)} is not this server's page: only the page served here may "
                               f"call the API", 403)

    def do_GET(self):
        path, editor = urlsplit(self.path).path, self.server.editor
        if path in ("/", "/index.html"):
            self.send(200, self.server.page, "text/html; charset=utf-8")
        elif path == "/api/info":
            self.send_json(200, editor.info_answer)
        elif path == "/api/progress":
            self.send_json(200, editor.progress.state())
        else:
            raise RequestError(f"{path}: not found (this server serves / and /api/...)", 404)

    def do_POST(self):
        path = urlsplit(self.path).path
        action = self.POST.get(path.removeprefix("/api/")) if path.startswith("/api/") else None
        if action is None:
            raise RequestError(f"{path}: not found (POST /api/{', /api/'.join(self.POST)})", 404)
        if self.headers.get_content_type() != "application/json":  # a cross-site form's types are refused
            raise RequestError(f"Content-Type: expected application/json, got "
                               f"{shown(self.headers.get('Content-Type', ''))}", 415)
        body = self.read_body()
        with self.server.editor.decoding:
            fields = parse_json(body)
        del body  # a waiting request keeps its fields only
        self.send_json(200, action(self.server.editor, fields, alive=lambda: connected(self.connection)))

    def read_body(self):
        """The request body (bytes), of its Content-Length, at most --max-request-mb."""
        if self.headers.get("Transfer-Encoding"):
            raise RequestError("Transfer-Encoding: not accepted: send the body with a Content-Length header")
        length = self.headers.get("Content-Length", "")
        if not re.fullmatch(r"[0-9]{1,15}", length):  # ASCII digits: int() also reads '²'
            raise RequestError(f"Content-Length: expected the body's size in bytes, got {shown(length)}")
        limit, size = int(self.server.cfg["max_request_mb"] * 2 ** 20), int(length)
        if size > limit:
            raise RequestError(f"body: {size} bytes, over the limit of {limit} (--max-request-mb "
                               f"{self.server.cfg['max_request_mb']:g})")
        try:
            body = self.rfile.read(size)
        except RequestError as e:
            raise RequestError(f"body: fewer than its Content-Length of {size} bytes arrived within "
                               f"{self.server.cfg['request_timeout']:g} s (--request-timeout)", e.status) from None
        if len(body) < size:
            raise RequestError(f"body: {len(body)} bytes, fewer than its Content-Length of {size}")
        return body

    def send_error(self, code, message=None, explain=None):
        """http.server's own refusals (a header line too long, too many headers), as JSON naming the headers."""
        self.send_json(code, dict(error=f"headers: {message}" + (f" ({explain})" if explain else "")))

    def send_json(self, status, answer):
        self.send(status, json.dumps(answer).encode(), "application/json")

    def send(self, status, body, content_type):
        try:
            self.connection.settimeout(self.server.cfg["request_timeout"])  # the answer's writes, each
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            # the page loads nothing from elsewhere (its own inline script and style, and data: images), and no
            # other site may frame it
            self.send_header("Content-Security-Policy", "default-src 'none'; script-src 'unsafe-inline'; style-src "
                             "'unsafe-inline'; img-src data: blob:; connect-src 'self'; form-action 'none'; "
                             "frame-ancestors 'none'")
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            self.log_message("%s: the client has gone before its answer", self.path)

    def finish(self):
        super().finish()
        with contextlib.suppress(OSError):  # lingering close (LINGER_S)
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(LINGER_S)
            end = time.monotonic() + LINGER_S
            while time.monotonic() < end and self.connection.recv(2 ** 16):
                pass

    def version_string(self):
        return self.server_version  # not the Python version

    def log_message(self, format, *args):
        if not self.path.startswith("/api/progress"):  # the page polls it while it waits
            super().log_message(format, *args)


class Server(ThreadingHTTPServer):
    """The HTTP server of the editor: at most cfg max_connections connections served at once."""
    daemon_threads = True

    def __init__(self, editor, cfg):
        super().__init__((cfg["host"], cfg["port"]), Handler)
        self.editor, self.cfg = editor, cfg
        self.connections = threading.Semaphore(cfg["max_connections"])
        port = self.server_address[1]
        self.allowed_hosts = {f"{name}:{port}".lower() for name in ("127.0.0.1", "localhost", cfg["host"])} | {
            name.lower() for name in cfg["allow_host"]}
        self.allowed_origins = {"http://" + name for name in self.allowed_hosts}  # the page's, at each name
        with open(PAGE, "rb") as f:
            self.page = f.read()

    def process_request(self, request, client_address):
        self.connections.acquire()  # more connections wait in the listen queue; Ctrl-C and SIGTERM interrupt this
        try:
            super().process_request(request, client_address)  # a thread
        except BaseException:
            self.connections.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connections.release()


def make_server(cfg, device):
    """The HTTP server of cfg (host, port; port 0: any free one) with the model loaded; serve_forever() runs it."""
    return Server(Editor(cfg, device), cfg)


def stop(signum, frame):
    """Ctrl-C or SIGTERM: serve_forever (in the main thread) unwinds and the socket closes."""
    raise KeyboardInterrupt


def main(argv=None):
    cfg = dict(config)
    parse_config(cfg, argv, prog="editor/app.py")
    if not cfg["ckpt"]:
        raise ValueError("--ckpt is required: a checkpoint of train.py or of the authors' code")
    for key in ("max_request_mb", "max_request_steps", "max_connections", "request_timeout"):
        if cfg[key] <= 0:
            raise ValueError(f"--{key.replace('_', '-')} must be > 0, got {cfg[key]}")
    if cfg["max_waiting"] < 0:
        raise ValueError(f"--max-waiting must be >= 0, got {cfg['max_waiting']}")
    for signum in STOP_SIGNALS:  # also when started with them ignored (nohup, a background job) or blocked
        signal.signal(signum, stop)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    with distributed(cfg["device"]) as (_, world, device):
        if world > 1:
            raise ValueError("editor/app.py is one process: start it with python, not torchrun")
        server = make_server(cfg, device)
        host, port = server.server_address[:2]
        print(f"editing with {cfg['ckpt']} on {device}: open http://{host}:{port} (Ctrl-C or SIGTERM stops)",
              flush=True)
        try:
            server.serve_forever()
        finally:
            server.server_close()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM, after main() closed the socket
        sys.stdout.flush()
        sys.stderr.flush()
        # skips the interpreter's teardown: torch's C++ teardown at exit aborts now and then ("terminate called
        # without an active exception", 2 of 80 stops measured on CPU), and nothing is left to save
        os._exit(0)
    except (ValueError, FileNotFoundError, ImportError, OSError) as e:  # bad options or files, a port in use
        sys.exit(f"editor/app.py: error: {e}")
