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
Bad input is HTTP 400 with {"error": "..."} naming the field and what was expected. One request computes at a
time (the model and its KV cache are not thread-safe), the others wait. The server listens on 127.0.0.1 unless
--host says otherwise and serves its page and this API only: nothing a request names is read from disk.
"""
import base64
import binascii
import contextlib
import io
import json
import math
import os
import re
import shlex
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
from images import center_crop
from inference import (DEFAULT_STEPS, caption_images, check_sampling_options, class_labels, edit_tokens,
                       encode_images, load_model, make_diffusion, region_masks, sample_batch, snap_mask,
                       tokens_to_images)
from runtime import autocast, autocast_dtype, distributed, parse_config

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
    max_request_mb=16.0,  # request bodies above this many MiB are refused (HTTP 400)
)

# the request fields that are sample.py options, with sample.py's defaults (tests/test_editor.py compares them)
SAMPLING_DEFAULTS = dict(seed=0, sampler="", steps=0, cfg_scale=1.0, ar_steps=1, eta=0.0, spacing="",
                         cfg_interval=(0.0, 1000.0), split="equal", order="random", order_block=2)
CAPTION_DEFAULTS = dict(temperature=0.0, top_k=0, seed=0)  # sample.py --caption's
SHOWN_ALWAYS = ("sampler", "steps", "cfg_scale", "ar_steps")  # in every answer's command; the others when set
FIELDS = {  # what each POST takes
    "generate": {"class", "prompt", *SAMPLING_DEFAULTS},
    "edit": {"image", "mask", "class", "prompt", *SAMPLING_DEFAULTS},
    "caption": {"image", *CAPTION_DEFAULTS},
    "crop": {"image"},
}
MAX_SEED = 2 ** 32 - 1
MAX_STEPS = 1000  # the schedule's timesteps (diffusion.Diffusion)
MAX_PIXELS = 50_000_000  # an uploaded image larger than this is refused before it is decoded
# the page's one-click regions to regenerate (paper Fig. 2b: the centre, the top or the bottom half; App. D, Fig. 7:
# the outer region) -> inference.region_masks' names
REGIONS = dict(centre="inner", top="top", bottom="bottom", outer="outer")
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "page.html")


class RequestError(ValueError):
    """Bad input: HTTP 400 with the message."""


def option_to_field(message):
    """The library's messages name sample.py's options (--cfg-scale); the API's fields are cfg_scale."""
    return re.sub(r"--([a-z][a-z-]*)", lambda m: m.group(1).replace("-", "_"), message)


def typed(fields, name, default):
    """fields[name], checked to be of the type of its default (an int is also a float), or the default."""
    value = fields.get(name, default)
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if isinstance(default, tuple):
        if isinstance(value, (list, tuple)) and len(value) == 2 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            return tuple(float(v) for v in value)
        raise RequestError(f"{name}: expected two numbers [lo, hi], got {json.dumps(value)[:80]}")
    if isinstance(default, float) and number:
        return float(value)
    if isinstance(default, int) and number and isinstance(value, int):
        return value
    if isinstance(default, str) and isinstance(value, str):
        return value
    kind = {float: "a number", int: "an integer", str: "a string"}[type(default)]
    raise RequestError(f"{name}: expected {kind}, got {json.dumps(value)[:80]}")


def decode_image(fields, name, formats=("PNG", "JPEG")):
    """The PIL image of a base64 data URL field (RGB), refusing other formats and images over MAX_PIXELS."""
    if name not in fields:
        raise RequestError(f"{name}: required (a data:image/png;base64,... URL)")
    value, what = fields[name], " or ".join(formats)
    header, comma, payload = value.partition(",") if isinstance(value, str) else ("", "", "")
    if not (comma and header.startswith("data:") and header.endswith(";base64")):
        raise RequestError(f"{name}: expected a base64 data URL of a {what} image (data:image/png;base64,...), got "
                           f"{json.dumps(value)[:60]}")
    try:
        raw = base64.b64decode(payload, validate=True)
    except binascii.Error as e:
        raise RequestError(f"{name}: the data URL's base64 does not decode ({e})") from None
    try:
        image = Image.open(io.BytesIO(raw))
    except Image.DecompressionBombError as e:
        raise RequestError(f"{name}: {e}") from None
    except (OSError, SyntaxError, ValueError):
        raise RequestError(f"{name}: expected a {what} image, got {len(raw)} bytes of no image format") from None
    if image.format not in formats:
        raise RequestError(f"{name}: expected a {what} image, got {image.format}")
    if image.width * image.height > MAX_PIXELS:
        raise RequestError(f"{name}: {image.width}x{image.height} pixels, more than the {MAX_PIXELS} accepted")
    try:
        return image.convert("RGB")  # decodes: a truncated file fails here
    except (OSError, SyntaxError, ValueError) as e:
        raise RequestError(f"{name}: not a readable {image.format} ({e})") from None


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

    def state(self):
        busy = self.task is not None
        return dict(busy=busy, task=self.task, elapsed_s=round(time.time() - self.started, 2) if busy else 0.0,
                    done=self.done, total=self.total, waiting=self.waiting)

    def count(self, steps):
        """generate()'s progress wrapper: one tick per sampler step."""
        for step in steps:
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

    @contextlib.contextmanager
    def computing(self, task, total=0):
        """Hold the model for one request; the others wait here."""
        progress = self.progress
        with progress.lock:
            progress.waiting += 1
        with self.model_lock:
            with progress.lock:
                progress.waiting -= 1
                progress.task, progress.started, progress.done, progress.total = task, time.time(), 0, total
            try:
                yield
            finally:
                progress.task = None

    # -------------------------------------------------------------------------------------- requests
    def info(self):
        regions = region_masks(self.grid)
        return dict(image_size=self.size, classes=self.class_names, text=self.text,
                    samplers=list(SAMPLERS_OF[self.objective]), grid=self.grid, token_pixels=self.size // self.grid,
                    num_tokens=self.model.num_tokens,
                    text_tokens=self.model.num_prefix_tokens if self.text else 0,
                    regions={name: regions[kind].flatten().int().tolist() for name, kind in REGIONS.items()},
                    defaults=dict(self.defaults), default_steps=DEFAULT_STEPS[self.objective], max_steps=MAX_STEPS,
                    ckpt=self.cfg["ckpt"], vae=self.cfg["vae"] or self.meta["vae"], device=str(self.device),
                    dtype=self.dtype)

    def generate(self, fields):
        """Batch 0 of `sample.py --num-samples 1`: one image of the class (or prompt)."""
        self.check_fields(fields, "generate")
        classes, prompts = self.condition(fields, required=False)
        seed, diffusion, options = self.sampling(fields, classes, self.model.num_tokens)
        if prompts:
            text, lengths, _ = tokenization.tokenize(self.tokenizer, prompts, self.model.num_prefix_tokens)
            cond, answer = dict(labels=None, text=text, text_lengths=lengths), dict(prompt=prompts[0])
        else:  # sample.py's labels: --classes, or drawn from the seed
            labels = class_labels(1, classes, self.model.num_classes, seed)
            cond, answer = dict(labels=labels), {"class": int(labels[0])}
        with self.computing("generate", options["ar_steps"] * len(diffusion.timesteps)):
            tokens = sample_batch(self.model, diffusion, batch_seed=seed * 1_000_003, dtype=self.dtype,
                                  progress=self.progress.count, **cond, **options)  # sample_images' batch 0
            image = tokens_to_images(tokens, self.model, self.vae, self.scale)[0]
        self.check_finite(tokens, seed)
        command = self.command(fields, answer, edit=False)
        return dict(image=png_url(image), command=command, **answer)

    def edit(self, fields):
        """`sample.py --edit IMAGE --keep (the inverted mask) --num-samples 1`: the one edit of its figure."""
        self.check_fields(fields, "edit")
        image = self.crop_image(fields)
        mask = decode_image(fields, "mask", formats=("PNG",))
        if mask.size != (self.size, self.size):
            raise RequestError(f"mask: expected a {self.size}x{self.size} PNG (the model's image size; white = "
                               f"regenerate), got {mask.width}x{mask.height}")
        regenerate = snap_mask(mask, self.grid)  # (grid, grid)
        if regenerate.all() or not regenerate.any():
            raise RequestError(f"mask: regenerates {int(regenerate.sum())} of {self.grid ** 2} tokens (white = "
                               f"regenerate); paint some, not all")
        classes, prompts = self.condition(fields, required=True)
        seed, diffusion, options = self.sampling(fields, classes, int(regenerate.sum()))
        with self.computing("edit", options["ar_steps"] * len(diffusion.timesteps)):
            originals = encode_images(np.asarray(image)[None], self.model, self.vae, self.scale)  # (1, L, P)
            edits = edit_tokens(self.model, originals, ~regenerate, classes, seed, diffusion, self.dtype, prompts,
                                self.tokenizer, progress=self.progress.count, **options)  # (1, 1, L, P)
            edited = tokens_to_images(edits.flatten(0, 1), self.model, self.vae, self.scale)[0]
        self.check_finite(edits, seed)
        pixels = self.size // self.grid
        snapped = np.kron(regenerate.numpy().astype(np.uint8) * 255, np.ones((pixels, pixels), np.uint8))
        answer = dict(prompt=prompts[0]) if prompts else {"class": classes[0]}
        return dict(image=png_url(edited), mask=png_url(snapped), command=self.command(fields, answer, edit=True),
                    **answer)

    def caption(self, fields):
        """`sample.py --caption IMAGE` (with --temperature, --top-k, --seed) of one image."""
        self.check_fields(fields, "caption")
        if not self.text:
            raise RequestError("this is a class-conditional model: captions need a model trained on captions")
        image = self.crop_image(fields)
        temperature, top_k, seed = (typed(fields, k, v) for k, v in CAPTION_DEFAULTS.items())
        if temperature < 0 or top_k < 0:
            raise RequestError(f"temperature and top_k: expected >= 0, got {temperature} and {top_k}")
        with self.computing("caption"):
            g = torch.Generator(self.device).manual_seed(seed)
            with autocast(self.dtype, self.device):  # sample.py --caption's autocast
                tokens = encode_images(np.asarray(image)[None], self.model, self.vae, self.scale)
                text = caption_images(self.model, tokens, self.tokenizer, temperature, top_k, g)[0]
        return dict(caption=text)

    def crop(self, fields):
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
        return center_crop(decode_image(fields, "image"), self.size)

    def condition(self, fields, required):
        """([class index] or None, [prompt] or None) of the request."""
        if self.text:
            if "class" in fields:
                raise RequestError("class: this is a text model: give a prompt")
            prompt = fields.get("prompt")
            if not isinstance(prompt, str) or not prompt.strip():
                raise RequestError(f"prompt: expected a non-empty string (a text model), got {json.dumps(prompt)}")
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
        if isinstance(value, str):
            value = names.index(value) if value in names else int(value) if value.strip().isdigit() else value
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < len(names):
            raise RequestError(f"class: expected an index in 0..{len(names) - 1} or a class name "
                               f"({', '.join(names[:4])}, ...), got {json.dumps(fields['class'])}")
        return [value], None

    def sampling(self, fields, classes, num_tokens):
        """(seed, Diffusion, sample_batch's options) of the request's sample.py fields."""
        got = {k: typed(fields, k, v) for k, v in self.defaults.items()}
        if not 0 <= got["seed"] <= MAX_SEED:
            raise RequestError(f"seed: expected an integer in 0..{MAX_SEED}, got {got['seed']}")
        if not 0 <= got["steps"] <= MAX_STEPS:
            raise RequestError(f"steps: expected sampler steps per AR step in 1..{MAX_STEPS}, or 0 for the "
                               f"sampler's default ({DEFAULT_STEPS[self.objective]}); got {got['steps']}")
        options = {k: got[k] for k in ("ar_steps", "split", "order", "order_block", "cfg_scale", "cfg_interval")}
        try:
            diffusion = make_diffusion(got["steps"], got["sampler"], got["eta"], got["spacing"], self.objective)
            check_sampling_options(self.model, classes=classes, num_tokens=num_tokens, **options)
        except ValueError as e:
            raise RequestError(option_to_field(str(e))) from None
        return got["seed"], diffusion, options

    @staticmethod
    def check_finite(tokens, seed):
        if not torch.isfinite(tokens).all():  # a NaN would decode to a plausible-looking image
            raise FloatingPointError(f"non-finite latents with seed {seed} (try --dtype fp32)")

    def command(self, fields, answer, edit):
        """The sample.py command that computes this answer (edit: with ORIGINAL.png and KEEP.png)."""
        cfg, args = self.cfg, ["python", "sample.py", "--ckpt", self.cfg["ckpt"]]
        args += ["--ema", "false"] if not cfg["ema"] else []
        args += [a for k in ("vae", "vae_ckpt", "dtype", "device") if cfg[k] for a in ("--" + k.replace("_", "-"),
                                                                                        cfg[k])]
        args += ["--edit", "ORIGINAL.png", "--keep", "KEEP.png"] if edit else []
        args += ["--prompts", answer["prompt"]] if "prompt" in answer else ["--classes", str(answer["class"])]
        args += ["--seed", str(typed(fields, "seed", 0)), "--num-samples", "1"]
        for key, default in self.defaults.items():
            value = typed(fields, key, default)
            if key == "sampler":
                value = value or default  # "" = the objective's default, named in the command
            if key != "seed" and (key in SHOWN_ALWAYS or value != default):
                args += ["--" + key.replace("_", "-"), *map(str, value if isinstance(value, tuple) else [value])]
        return shlex.join(args)


# ------------------------------------------------------------------------------------------ HTTP
class Handler(BaseHTTPRequestHandler):
    server_version = "nanoCausalFusion-editor"
    timeout = 120  # seconds a client may take to send its request
    POST = dict(generate=Editor.generate, edit=Editor.edit, caption=Editor.caption, crop=Editor.crop)

    def do_GET(self):
        path, editor = urlsplit(self.path).path, self.server.editor
        if path in ("/", "/index.html"):
            self.send(200, self.server.page, "text/html; charset=utf-8")
        elif path == "/api/info":
            self.send_json(200, editor.info())
        elif path == "/api/progress":
            self.send_json(200, editor.progress.state())
        else:
            self.send_json(404, dict(error=f"{path}: not found (this server serves / and /api/...)"))

    def do_POST(self):
        path = urlsplit(self.path).path
        action = self.POST.get(path.removeprefix("/api/")) if path.startswith("/api/") else None
        if action is None:
            with contextlib.suppress(RequestError):
                self.read_json()  # read what was sent, so the client hears the answer
            self.send_json(404, dict(error=f"{path}: not found (POST /api/{', /api/'.join(self.POST)})"))
            return
        try:
            self.send_json(200, action(self.server.editor, self.read_json()))
        except RequestError as e:
            self.send_json(400, dict(error=str(e)))
        except ValueError as e:  # the library's check of a value
            self.send_json(400, dict(error=option_to_field(str(e))))
        except FloatingPointError as e:
            self.send_json(500, dict(error=str(e)))
        except Exception as e:  # a bug: the server goes on serving
            traceback.print_exc()
            self.send_json(500, dict(error=f"internal error (the server's log has the traceback): "
                                           f"{type(e).__name__}: {e}"))

    def read_json(self):
        """The request body as a JSON object; refused (RequestError) when too large, not JSON, or not an object."""
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise RequestError("body: send it with a Content-Length header (no Transfer-Encoding)")
        length = self.headers.get("Content-Length", "")
        if not length.isdigit():
            raise RequestError(f"body: expected a JSON object with a Content-Length header, got Content-Length "
                               f"{length!r}")
        limit, size = int(self.server.max_request_mb * 2 ** 20), int(length)
        if size > limit:
            self.close_connection = True
            unread = min(size, 64 * limit)  # read what was sent (up to a point), so that the client hears the answer
            while unread > 0:
                chunk = self.rfile.read(min(2 ** 16, unread))
                if not chunk:
                    break
                unread -= len(chunk)
            raise RequestError(f"body: {size} bytes, over the limit of {limit} (--max-request-mb "
                               f"{self.server.max_request_mb:g})")
        try:
            fields = json.loads(self.rfile.read(size))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RequestError(f"body: expected a JSON object, got text that is not JSON ({e})") from None
        if not isinstance(fields, dict):
            raise RequestError(f"body: expected a JSON object {{\"field\": value, ...}}, got a JSON "
                               f"{type(fields).__name__}")
        return fields

    def send_json(self, status, answer):
        self.send(status, json.dumps(answer).encode(), "application/json")

    def send(self, status, body, content_type):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        # the page loads nothing from elsewhere: its own inline script and style, and data: images
        self.send_header("Content-Security-Policy", "default-src 'none'; script-src 'unsafe-inline'; style-src "
                         "'unsafe-inline'; img-src data: blob:; connect-src 'self'; form-action 'none'")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        if not self.path.startswith("/api/progress"):  # the page polls it while it waits
            super().log_message(format, *args)


def make_server(cfg, device):
    """The HTTP server of cfg (host, port; port 0: any free one) with the model loaded; serve_forever() runs it."""
    editor = Editor(cfg, device)
    server = ThreadingHTTPServer((cfg["host"], cfg["port"]), Handler)
    server.daemon_threads = True
    server.editor, server.max_request_mb = editor, cfg["max_request_mb"]
    with open(PAGE, "rb") as f:
        server.page = f.read()
    return server


def main(argv=None):
    cfg = dict(config)
    parse_config(cfg, argv, prog="editor/app.py")
    if not cfg["ckpt"]:
        raise ValueError("--ckpt is required: a checkpoint of train.py or of the authors' code")
    if cfg["max_request_mb"] <= 0:
        raise ValueError(f"--max-request-mb must be > 0, got {cfg['max_request_mb']}")
    with distributed(cfg["device"]) as (_, world, device):
        if world > 1:
            raise ValueError("editor/app.py is one process: start it with python, not torchrun")
        server = make_server(cfg, device)
        host, port = server.server_address[:2]
        print(f"editing with {cfg['ckpt']} on {device}: open http://{host}:{port} (Ctrl-C stops)", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, ImportError, OSError) as e:  # bad options or files, a port in use
        sys.exit(f"editor/app.py: error: {e}")
