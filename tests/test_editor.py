"""Tests of the editor (python -m editor.app): its JSON API on tiny pixel-space models against sample.py (edits,
samples, captions, crops), its answers to bad input, one request computing at a time, the authors' checkpoint
with its VAE, the command line, and the page in a real browser: headless Chromium (Debian's chromium and
chromium-driver, which .ci/run installs) driven by selenium. Run by test_all.py.

EDITOR_SCREENSHOTS=DIR also keeps the browser test's screenshots before and after its edit in DIR; EDITOR_CKPT=CKPT
runs the browser test on that pixel-space checkpoint (the demo model of `python train.py`) instead of the tiny one.
"""
import argparse
import base64
import contextlib
import functools
import http.client
import io
import json
import os
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import types

import numpy as np
import pytest
import torch
from PIL import Image

import inference
import sample
from editor import app
from test_core import _authors_state_dict
from test_sample import ROOT, overfit_model, random_model, save_ckpt, text_model

MAX_REQUEST_MB = 0.05  # the test servers refuse bodies over 50 KiB: the tiny images fit, the size test does not
DEADLINE_S = 1.5  # --request-timeout of the servers that test slow and silent clients
# the growth of a server's peak resident memory while it refuses a hostile image (decoding it would take 100s of MB)
REFUSAL_MB = 16


# ------------------------------------------------------------------------------------------ helpers
class QuietHandler(app.Handler):
    def log_message(self, format, *args):  # no line per request in the test log
        pass


@functools.lru_cache(maxsize=None)
def server(ckpt, **overrides):
    """A server for ckpt on 127.0.0.1 and a free port, started in this process (one per checkpoint); its URL."""
    cfg = dict(app.config, ckpt=ckpt, port=0, max_request_mb=MAX_REQUEST_MB, **overrides)
    httpd = app.make_server(cfg, torch.device("cpu"))
    httpd.RequestHandlerClass = QuietHandler
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


def request(httpd, method, path, body=None, headers=None):
    """(status, JSON answer) of one request; body: a dict (sent as JSON) or raw bytes; headers: more or others."""
    host, port = httpd.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=120)
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    conn.request(method, path, body=data, headers={**({"Content-Type": "application/json"} if data is not None else {}),
                                                   **(headers or {})})
    res = conn.getresponse()
    answer = json.loads(res.read())
    conn.close()
    return res.status, answer


def ok(httpd, path, body=None):
    status, answer = request(httpd, "POST" if body is not None else "GET", path, body)
    assert status == 200, (path, status, answer)
    return answer


def raw_request(port, data, close_sending=False):
    """(status, JSON answer, headers) of the bytes `data` sent on one connection; close_sending: then close this
    side's sending (the server reads the end of the request)."""
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        sock.sendall(data)
        if close_sending:
            sock.shutdown(socket.SHUT_WR)
        return read_answer(sock)


def read_answer(sock):
    answer = b""
    while chunk := sock.recv(2 ** 16):
        answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body), head.decode("iso-8859-1")


def post_bytes(port, path, body, content_length=None):
    """The bytes of a POST of body (bytes) with the Content-Length header content_length (default: its length)."""
    length = str(len(body)).encode() if content_length is None else content_length
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n".encode() +
            b"Content-Length: " + length + b"\r\n\r\n" + body)


@contextlib.contextmanager
def server_log(httpd):
    """The log of an in-process server (its real handler's lines, and any traceback) while in the block."""
    log = io.StringIO()
    httpd.RequestHandlerClass = app.Handler
    try:
        with contextlib.redirect_stderr(log):
            yield log
    finally:
        httpd.RequestHandlerClass = QuietHandler


def still_serving(httpd):
    assert ok(httpd, "/api/info")["image_size"] == 8


def wait_until(condition, timeout=60):
    """condition()'s first true value, asked every 10 ms (an AssertionError after timeout seconds)."""
    end = time.time() + timeout
    while not (value := condition()):
        assert time.time() < end, "timed out"
        time.sleep(0.01)
    return value


def start_editor(ckpt, log, inherited=""):
    """A server process `python -m editor.app --ckpt ckpt --port 0` logging to the file log, exec'd after the Python
    statements `inherited` (signal dispositions it inherits); (process, an object with its server_address, log)."""
    code = f"import os, signal, sys\n{inherited}\nos.execv(sys.executable, sys.argv[1:])"
    with open(log, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-c", code, sys.executable, "-m", "editor.app", "--ckpt", ckpt,
                                 "--port", "0"], cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))
    line = proc.stdout.readline()
    assert "open http://127.0.0.1:" in line, line + open(log).read()
    port = int(line.split("http://127.0.0.1:")[1].split()[0])
    return proc, types.SimpleNamespace(server_address=("127.0.0.1", port)), log


def stop_editor(proc, site, log, signum=signal.SIGTERM):
    """Stop a server process with signum: it exits 0, without a traceback, and its port is free."""
    try:
        proc.send_signal(signum)
        assert proc.wait(timeout=30) == 0, open(log).read()
    finally:
        if proc.poll() is None:  # it did not stop
            proc.kill()
            proc.wait()
        proc.stdout.close()
    assert "Traceback" not in open(log).read(), open(log).read()
    with pytest.raises(ConnectionRefusedError):  # its port is free
        socket.create_connection(site.server_address, timeout=10).close()


def peak_memory_mb(pid):
    """(resident memory, its peak) of a process in MiB: VmRSS and VmHWM of /proc/PID/status."""
    status = open(f"/proc/{pid}/status").read()
    return tuple(int(re.search(rf"{key}:\s+(\d+) kB", status).group(1)) / 1024 for key in ("VmRSS", "VmHWM"))


def to_url(pixels, fmt="PNG"):
    buffer = io.BytesIO()
    (pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)).save(buffer, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def from_url(url, mode=None):
    image = Image.open(io.BytesIO(base64.b64decode(url.partition(",")[2])))
    return np.asarray(image.convert(mode) if mode else image)


def token_blocks(pixels, f):
    """(H, W, ...) -> (H/f, W/f, f, f, ...): the pixels of each token."""
    h, w = pixels.shape[:2]
    return pixels.reshape(h // f, f, w // f, f, *pixels.shape[2:]).swapaxes(1, 2)


def run_command(command, out_dir, **files):
    """Run an answer's sample.py command in this process, with its placeholder file names replaced."""
    args = shlex.split(command)
    assert args[:2] == ["python", "sample.py"], command
    args = [files.get(a.removesuffix(".png"), a) for a in args[2:]]
    sample.main(args + ["--out-dir", out_dir])


def figure_cell(path, column, size):
    """Image `column` of the first row of sample.py's edit figure (2 px padding, no zoom)."""
    fig = np.asarray(Image.open(path))
    x = 2 + column * (size + 2)
    return fig[2:2 + size, x:x + size]


def noise_image(size, seed):
    """A mid-grey noise image: a regenerated token of the tiny model (near its saturated templates) differs."""
    return np.random.default_rng(seed).integers(40, 216, (size, size, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------------------ the API
def test_editor_edit_keeps_the_pixels_outside_the_mask(shared):
    _, path = overfit_model(shared)
    httpd = server(path)
    info = ok(httpd, "/api/info")
    assert (info["image_size"], info["grid"], info["token_pixels"], info["text"]) == (8, 4, 2, False)
    assert info["classes"] == ["red", "blue", "top", "left"] and info["samplers"] == ["ddpm", "ddim", "dpm++",
                                                                                      "dpm++sde"]
    original = noise_image(8, 0)
    # a hand-drawn mask, not on the token grid: 3 of a token's 4 pixels white regenerate it, 1 of 4 keeps it
    mask = np.zeros((8, 8), np.uint8)
    mask[0:2, 0:2] = 255
    mask[2:4, 2:4] = 255
    mask[2, 3] = 0  # token (1, 1): 3 of 4 white
    mask[5, 5] = 255  # token (2, 2): 1 of 4 white
    mask[4:8, 6:8] = 255
    expected = token_blocks(mask, 2).reshape(4, 4, 4).astype(float).mean(2) > 127.5  # (4, 4) tokens to regenerate
    body = {"image": to_url(original), "mask": to_url(mask), "class": "blue", "seed": 5, "steps": 10, "ar_steps": 2}
    answer = ok(httpd, "/api/edit", body)
    snapped = from_url(answer["mask"])
    assert snapped.shape == (8, 8) and np.array_equal(snapped, np.kron(expected * 255, np.ones((2, 2))))
    edited = from_url(answer["image"])
    assert edited.shape == (8, 8, 3) and answer["class"] == 1
    inside = np.kron(expected, np.ones((2, 2), bool))
    assert np.array_equal(edited[~inside], original[~inside])  # the kept tokens, bit for bit
    changed = token_blocks(edited != original, 2).reshape(4, 4, -1).any(2)
    assert changed[expected].all(), changed  # every regenerated token
    # the same request twice: the same image; the class by index: the same; another seed: another image
    assert ok(httpd, "/api/edit", body) == answer
    assert ok(httpd, "/api/edit", dict(body, **{"class": 1}))["image"] == answer["image"]
    other = from_url(ok(httpd, "/api/edit", dict(body, seed=6))["image"])
    assert np.array_equal(other[~inside], original[~inside]) and not np.array_equal(other, edited)


def test_editor_answers_equal_sample_py(shared, tmp):
    _, path = overfit_model(shared)
    httpd = server(path)
    # an upload: a JPEG of another size and shape, centre-cropped as sample.py --edit crops it
    photo = os.path.join(tmp, "photo.jpg")
    Image.fromarray(noise_image(24, 1)[:, :17]).save(photo, quality=90)
    with open(photo, "rb") as f:
        upload = "data:image/jpeg;base64," + base64.b64encode(f.read()).decode()
    cropped = from_url(ok(httpd, "/api/crop", {"image": upload})["image"])
    assert np.array_equal(cropped, sample.load_image(photo, 0, 8)[0])
    # /api/edit = the third image of sample.py --edit ORIGINAL --keep KEEP (the mask inverted), with AR steps, CFG
    # and a fast sampler
    mask = np.zeros((8, 8), np.uint8)
    mask[2:8, 0:4] = 255
    body = {"image": upload, "mask": to_url(mask), "class": 2, "seed": 7, "sampler": "ddim", "steps": 8,
            "cfg_scale": 2.0, "ar_steps": 3, "order": "raster"}
    answer = ok(httpd, "/api/edit", body)
    assert "--edit ORIGINAL.png --keep KEEP.png --classes 2 --seed 7 --num-samples 1" in answer["command"]
    assert "--order raster" in answer["command"] and "--split" not in answer["command"]  # the defaults left out
    keep = os.path.join(tmp, "keep.png")
    Image.fromarray(255 - from_url(answer["mask"])).save(keep)
    run_command(answer["command"], tmp, ORIGINAL=photo, KEEP=keep)
    edit_by_sample_py = figure_cell(os.path.join(tmp, "edit_keep.png"), 2, 8)
    assert np.array_equal(from_url(answer["image"]), edit_by_sample_py)
    # /api/generate = sample.py --num-samples 1: OUT_DIR/000000.png; with no class, sample.py's class of the seed
    for body in ({"class": "left", "seed": 3, "steps": 10, "ar_steps": 4, "cfg_scale": 3.0}, {"seed": 11, "steps": 5}):
        answer = ok(httpd, "/api/generate", body)
        expected_class = inference.class_labels(1, None, 4, 11).item() if "class" not in body else 3
        assert answer["class"] == expected_class, answer["class"]
        run_command(answer["command"], tmp)
        assert np.array_equal(from_url(answer["image"]), np.asarray(Image.open(os.path.join(tmp, "000000.png"))))


def test_editor_flow_model_uses_its_samplers(shared, tmp):
    # a flow checkpoint: the page offers the flow samplers, a plain request uses euler (sample.py's default for
    # it) and says so in its command, which computes the same image; an eps sampler is a 400 naming both
    model, _ = random_model(shared)
    path = save_ckpt(model, os.path.join(tmp, "flow_editor.pt"), config=dict(objective="flow"))
    httpd = server(path)
    info = ok(httpd, "/api/info")
    assert info["samplers"] == ["euler", "dpm++", "dpm++sde"] and info["defaults"]["sampler"] == "euler"
    assert info["default_steps"] == inference.DEFAULT_STEPS["flow"]
    for body in ({"class": 1, "seed": 2, "steps": 4, "cfg_scale": 2.0}, {"seed": 3, "sampler": "dpm++", "steps": 4}):
        answer = ok(httpd, "/api/generate", body)
        assert f"--sampler {body.get('sampler', 'euler')} --steps 4" in answer["command"], answer["command"]
        run_command(answer["command"], tmp)
        assert np.array_equal(from_url(answer["image"]), np.asarray(Image.open(os.path.join(tmp, "000000.png"))))
    status, answer = request(httpd, "POST", "/api/generate", {"sampler": "ddpm"})
    assert status == 400 and "ddpm" in answer["error"] and "flow" in answer["error"], answer


def test_editor_text_model_prompts_and_captions(tmp):
    _, path, tok = text_model(tmp, "text_editor.pt")
    httpd = server(path)
    info = ok(httpd, "/api/info")
    assert info["text"] and info["classes"] == [] and info["text_tokens"] == 12
    generated = ok(httpd, "/api/generate", {"prompt": "a red dot", "seed": 2, "steps": 4, "cfg_scale": 2.0})
    assert generated["prompt"] == "a red dot" and "--prompts 'a red dot'" in generated["command"]
    run_command(generated["command"], tmp)
    assert np.array_equal(from_url(generated["image"]), np.asarray(Image.open(os.path.join(tmp, "000000.png"))))
    # an edit under a new prompt = sample.py --edit ... --prompts (the text model's edits)
    original = os.path.join(tmp, "original.png")
    Image.fromarray(from_url(generated["image"])).save(original)
    mask = np.zeros((8, 8), np.uint8)
    mask[:, 4:] = 255
    answer = ok(httpd, "/api/edit", {"image": generated["image"], "mask": to_url(mask), "prompt": "blue",
                                     "seed": 4, "steps": 4, "ar_steps": 2})
    keep = os.path.join(tmp, "keep.png")
    Image.fromarray(255 - from_url(answer["mask"])).save(keep)
    run_command(answer["command"], tmp, ORIGINAL=original, KEEP=keep)
    assert np.array_equal(from_url(answer["image"]), figure_cell(os.path.join(tmp, "edit_keep.png"), 2, 8))
    # the caption = sample.py --caption's, greedy and sampled
    for fields in ({}, {"temperature": 1.0, "top_k": 5, "seed": 3}):
        caption = ok(httpd, "/api/caption", {"image": generated["image"], **fields})["caption"]
        jsonl = os.path.join(tmp, "captions.jsonl")
        sample.main(["--ckpt", path, "--caption", original, "--out", jsonl, "--out-dir", tmp]
                    + [a for k, v in fields.items() for a in ("--" + k.replace("_", "-"), str(v))])
        assert [json.loads(line)["text"] for line in open(jsonl)] == [caption]
    for body, words in (({"class": 1}, "class: this is a text model"), ({}, "prompt: expected a non-empty string"),
                        ({"prompt": "a long prompt of many bytes"}, "prompt: 29 tokens with BOS and EOS"),
                        ({"prompt": "x" * 5000}, f"prompt: 5000 characters, more than the {app.MAX_PROMPT_CHARS}")):
        status, answer = request(httpd, "POST", "/api/generate", body)
        assert status == 400 and answer["error"].startswith(words), answer
    # a temperature that would overflow the logits it divides
    status, answer = request(httpd, "POST", "/api/caption", {"image": generated["image"], "temperature": 1e-300})
    assert status == 400 and answer["error"].startswith("temperature and top_k: expected 0 (greedy) or >= 0.01"), answer


def test_editor_bad_input_gets_400_and_the_server_goes_on(shared):
    _, path = overfit_model(shared)
    httpd = server(path)
    image, mask = noise_image(8, 2), np.zeros((8, 8), np.uint8)
    mask[:4] = 255
    good = {"image": to_url(image), "mask": to_url(mask), "class": 0, "seed": 1, "steps": 5}
    before = ok(httpd, "/api/edit", good)
    gif = io.BytesIO()
    Image.fromarray(image).save(gif, "GIF")
    too_big = json.dumps(dict(good, image=to_url(noise_image(200, 0)))).encode()  # > MAX_REQUEST_MB
    cases = [  # (path, body, the error's start)
        ("/api/generate", {"class": "purple"}, "class: expected an index in 0..3 or a class name"),
        ("/api/generate", {"class": 4}, "class: expected an index in 0..3"),
        ("/api/generate", {"class": True}, "class: expected an index"),
        ("/api/generate", {"prompt": "a red circle"}, "prompt: this is a class-conditional model"),
        ("/api/generate", {"steps": 1001}, "steps: expected sampler steps per AR step in 1..1000"),
        ("/api/generate", {"steps": -1}, "steps: expected"),
        ("/api/generate", {"steps": "ten"}, "steps: expected an integer"),
        ("/api/generate", {"steps": 2.5}, "steps: expected an integer"),
        ("/api/generate", {"seed": -1}, "seed: expected an integer in 0..4294967295"),
        ("/api/generate", {"cfg_scale": 0.5}, "cfg_scale must be >= 1"),
        ("/api/generate", {"ar_steps": 17}, "ar_steps must be in 1..16"),
        ("/api/generate", {"sampler": "euler"}, "sampler must be one of ddpm, ddim, dpm++, dpm++sde"),
        ("/api/generate", {"sampler": "dpm++", "steps": 1}, "sampler dpm++ needs steps >= 2"),
        ("/api/generate", {"cfg_interval": [0]}, "cfg_interval: expected two numbers"),
        ("/api/generate", {"colour": "red"}, "unknown field(s) 'colour': /api/generate takes ar_steps"),
        ("/api/edit", dict(good, mask=None), "mask: expected a base64 data URL of a PNG image"),
        ("/api/edit", {k: v for k, v in good.items() if k != "mask"}, "mask: required"),
        ("/api/edit", dict(good, mask=to_url(np.zeros((10, 10), np.uint8))), "mask: expected a 8x8 PNG"),
        ("/api/edit", dict(good, mask=to_url(mask, "JPEG")), "mask: expected a PNG image, got JPEG"),
        ("/api/edit", dict(good, mask=to_url(0 * mask)), "mask: regenerates 0 of 16 tokens"),
        ("/api/edit", dict(good, mask=to_url(0 * mask + 255)), "mask: regenerates 16 of 16 tokens"),
        ("/api/edit", dict(good, image="data:image/gif;base64," + base64.b64encode(gif.getvalue()).decode()),
         f"image: expected a PNG or JPEG image, got {len(gif.getvalue())} bytes of neither"),  # no GIF decoder runs
        ("/api/edit", dict(good, image="data:image/png;base64,aGVsbG8="), "image: expected a PNG or JPEG image, got"),
        ("/api/edit", dict(good, image="data:image/png;base64,%%%"), "image: the data URL's base64 does not decode"),
        ("/api/edit", dict(good, image="/etc/passwd"), "image: expected a base64 data URL"),
        ("/api/edit", {k: v for k, v in good.items() if k != "class"}, "class: required"),
        ("/api/edit", dict(good, ar_steps=9), "ar_steps must be in 1..8 (the tokens to generate)"),
        ("/api/caption", {"image": good["image"]}, "this is a class-conditional model"),
        ("/api/crop", {"image": good["image"], "size": 8}, "unknown field(s) 'size'"),
        ("/api/edit", b"not json", "body: expected a JSON object, got text that is not JSON"),
        ("/api/edit", b"\xff\xfe", "body: expected a JSON object"),
        ("/api/edit", b"[1, 2]", "body: expected a JSON object {\"field\": value, ...}, got a JSON list"),
        ("/api/edit", too_big, f"body: {len(too_big)} bytes, over the limit of 52428 (--max-request-mb 0.05)"),
    ]
    for path_, body, words in cases:
        status, answer = request(httpd, "POST", path_, body)
        assert status == 400 and answer["error"].startswith(words), (path_, status, answer, words)
        assert ok(httpd, "/api/info")["grid"] == 4  # still serving
    # only its page and its API
    for method, path_ in (("GET", "/etc/passwd"), ("GET", "/../editor/app.py"), ("GET", "/page.html"),
                          ("GET", "/api/edit"), ("POST", "/api/info"), ("POST", "/api/../../etc/passwd")):
        status, answer = request(httpd, method, path_, b"{}" if method == "POST" else None)
        assert status == 404 and "not found" in answer["error"], (method, path_, status, answer)
    host, port = httpd.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request("GET", "/")
    page = conn.getresponse()
    html = page.read().decode()
    assert page.status == 200 and "<canvas" in html and "http:" not in html and "https:" not in html  # all inline
    assert "default-src 'none'" in page.getheader("Content-Security-Policy")
    assert ok(httpd, "/api/edit", good) == before  # the next good request still works, and gives the same


def test_editor_computes_one_request_at_a_time(shared):
    # several clients at once: each waits for the model (the KV cache and the weights are shared), the answers are
    # those of requests made one after another, and /api/progress shows the work and the waiting
    _, path = overfit_model(shared)
    httpd = server(path)
    model = httpd.editor.model
    active, most, seen = [0], [0], []
    denoise = model.denoise

    def tracked(*args, **kwargs):
        active[0] += 1
        most[0] = max(most[0], active[0])
        time.sleep(0.002)  # widens the window two unserialized requests would overlap in
        try:
            return denoise(*args, **kwargs)
        finally:
            active[0] -= 1

    bodies = [{"class": k, "seed": k, "steps": 20, "ar_steps": 2} for k in range(4)]
    model.denoise = tracked
    try:
        answers = [None] * len(bodies)
        threads = [threading.Thread(target=lambda i=i: answers.__setitem__(i, ok(httpd, "/api/generate", bodies[i])))
                   for i in range(len(bodies))]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            seen.append(ok(httpd, "/api/progress"))
            time.sleep(0.01)
    finally:
        del model.denoise  # the class's method again
    assert most[0] == 1, most
    assert any(p["busy"] and p["task"] == "generate" and p["total"] == 40 and 0 <= p["done"] <= 40 for p in seen)
    assert any(p["waiting"] > 0 for p in seen), seen[:5]
    assert not ok(httpd, "/api/progress")["busy"]
    assert answers == [ok(httpd, "/api/generate", body) for body in bodies]


def test_editor_defaults_and_regions_are_sample_pys(shared):
    for key, default in app.SAMPLING_DEFAULTS.items():
        assert sample.config[key] == default, key
    for key, default in app.CAPTION_DEFAULTS.items():
        assert sample.config[key] == default, key
    for key in ("ema", "vae", "vae_ckpt", "tokenizer", "dtype", "device"):  # the model is loaded as sample.py does
        assert app.config[key] == sample.config[key], key
    assert app.config["host"] == "127.0.0.1"
    _, path = overfit_model(shared)
    regions = ok(server(path), "/api/info")["regions"]
    # the paper's regenerated regions are the complements of what sample.py --keep keeps
    for name, kept in (("centre", "outer"), ("top", "bottom"), ("bottom", "top"), ("outer", "inner")):
        assert regions[name] == (~inference.keep_mask(kept, 4)).flatten().int().tolist(), name
    assert sum(regions["centre"]) == 4 and sum(regions["outer"]) == 12


def test_editor_authors_checkpoint_with_its_vae(tmp):
    # the authors' layout (MAR's VAE, 16x downsampling; random VAE weights) loads as in sample.py, and an edit of
    # a 64 px image is sample.py's
    sd = _authors_state_dict(depth=2, hidden=64, heads=4, patch=1, channels=16, grid=4, num_cond=4, num_classes=10,
                             g=torch.Generator().manual_seed(0))
    path = os.path.join(tmp, "authors_editor.pt")
    torch.save({"model": sd, "ema": sd, "args": argparse.Namespace(model="CausalFusion-XL")}, path)
    httpd = server(path, vae_ckpt="random")
    info = ok(httpd, "/api/info")
    assert (info["image_size"], info["grid"], info["token_pixels"], info["vae"]) == (64, 4, 16, "mar")
    assert info["classes"] == [str(k) for k in range(10)]
    original = os.path.join(tmp, "original.png")
    Image.fromarray(noise_image(64, 3)).save(original)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    answer = ok(httpd, "/api/edit", {"image": to_url(noise_image(64, 3)), "mask": to_url(mask), "class": "7",
                                     "steps": 3, "seed": 2})
    assert "--vae-ckpt random" in answer["command"] and from_url(answer["image"]).shape == (64, 64, 3)
    keep = os.path.join(tmp, "keep.png")
    Image.fromarray(255 - from_url(answer["mask"])).save(keep)
    run_command(answer["command"], tmp, ORIGINAL=original, KEEP=keep)
    assert np.array_equal(from_url(answer["image"]), figure_cell(os.path.join(tmp, "edit_keep.png"), 2, 64))


def test_editor_command_line(shared, tmp):
    # Ctrl-C and SIGTERM stop it (exit 0, the port freed, no traceback) whatever it inherits: started here as a
    # background job (nohup ... &) starts, SIGINT ignored, and both signals blocked too
    _, path = overfit_model(shared)
    inherited = "signal.signal(signal.SIGINT, signal.SIG_IGN)\nsignal.pthread_sigmask(signal.SIG_BLOCK, " \
                "{signal.SIGINT, signal.SIGTERM})"
    servers = [start_editor(path, os.path.join(tmp, f"server{i}.log"), inherited) for i in range(2)]
    (proc, site, log), (busy, busy_site, busy_log) = servers
    try:
        assert ok(site, "/api/info")["grid"] == 4
        stop_editor(proc, site, log, signal.SIGINT)
        with socket.create_connection(busy_site.server_address, timeout=30) as sock:  # SIGTERM while one computes
            sock.sendall(post_bytes(busy_site.server_address[1], "/api/generate", b'{"steps": 1000, "ar_steps": 4}'))
            wait_until(lambda: ok(busy_site, "/api/progress")["busy"])
            stop_editor(busy, busy_site, busy_log, signal.SIGTERM)
    finally:
        for server_process, _, _ in servers:  # none left running when a stop fails
            if server_process.poll() is None:
                server_process.kill()
                server_process.wait()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    missing = os.path.join(tmp, "none.pt")
    done = subprocess.run([sys.executable, "-m", "editor.app", "--ckpt", missing], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and f"editor/app.py: error: {missing}: no such checkpoint file" in done.stderr and \
        "Traceback" not in done.stderr, done.stderr
    for args, words in (([], "--ckpt is required"), (["--ckpt", path, "--colour", "red"], "unknown option --colour"),
                        (["--ckpt", path, "--max-request-mb", "0"], "--max-request-mb must be > 0"),
                        (["--ckpt", path, "--request-timeout", "0"], "--request-timeout must be > 0"),
                        (["--ckpt", path, "--max-waiting", "-1"], "--max-waiting must be >= 0")):
        with pytest.raises(ValueError, match=re.escape(words)):
            app.main(args)


# ------------------------------------------------------------------------------------------ hostile requests
# one test per probe of issue 33, each against a running server on a tiny checkpoint; /api/info answers after each
def test_editor_refuses_wide_and_tall_images_before_decoding(shared, tmp):
    # a W x 1 PNG (a few hundred bytes) would be resized to (W * size) x size by the centre crop: refused from its
    # header, the server's peak memory does not grow; the largest accepted images decode one request at a time
    proc, site, log = start_editor(random_model(shared)[1], os.path.join(tmp, "server.log"))
    try:
        mask = np.zeros((8, 8), np.uint8)
        mask[:4] = 255
        _, peak = peak_memory_mb(proc.pid)
        for w, h in ((1_000_000, 1), (1, 1_000_000)):
            image = to_url(np.zeros((h, w), np.uint8))
            for path_, body in (("/api/crop", {"image": image}),
                                ("/api/edit", {"image": image, "mask": to_url(mask), "class": 0})):
                status, answer = request(site, "POST", path_, body)
                assert status == 400 and answer["error"].startswith(
                    f"image: {w}x{h} pixels: one side is more than {app.MAX_ASPECT} times the other"), answer
                still_serving(site)
        grown = peak_memory_mb(proc.pid)[1] - peak
        assert grown < REFUSAL_MB, f"the peak resident memory grew by {grown:.0f} MiB"
        # 4 uploads at once of the largest image accepted (RGB: 8 bytes per pixel decoded, 134 MB): one decodes at a
        # time, the peak grows by one decoding, not four
        rss, _ = peak_memory_mb(proc.pid)
        largest = to_url(np.zeros((4096, 4096, 3), np.uint8))
        answers, crop = [], lambda: answers.append(request(site, "POST", "/api/crop", {"image": largest}))
        threads = [threading.Thread(target=crop) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [status for status, _ in answers] == [200] * 4, answers
        one, stated = 8 * 4096 * 4096 / 2 ** 20, ok(site, "/api/info")["memory_mb"]["request"]
        grown = peak_memory_mb(proc.pid)[1] - rss
        assert one / 2 < grown < min(1.5 * one, stated), f"the peak resident memory grew by {grown:.0f} MiB"
        still_serving(site)
    finally:
        stop_editor(proc, site, log)


def test_editor_checks_sizes_before_decoding_a_mask(shared, tmp):
    # a 7000 x 7000 1-bit PNG (8 KB) is refused from its header as an image and as a mask, and a mask of the wrong
    # size under the pixel limit (4096 x 4096, 1-bit) is refused before it is decoded (+32 MB if decoded)
    proc, site, log = start_editor(random_model(shared)[1], os.path.join(tmp, "server.log"))
    try:
        small = to_url(noise_image(8, 0))
        _, peak = peak_memory_mb(proc.pid)
        huge, large = to_url(Image.new("1", (7000, 7000))), to_url(Image.new("1", (4096, 4096), 1))
        for body, words in (({"image": huge}, f"image: 7000x7000 pixels, more than the {app.MAX_PIXELS} accepted"),
                            ({"image": small, "mask": huge}, "mask: 7000x7000 pixels, more than"),
                            ({"image": small, "mask": large}, "mask: expected a 8x8 PNG (the model's image size; white "
                                                              "= regenerate), got 4096x4096")):
            status, answer = request(site, "POST", "/api/edit", dict(body, **{"class": 0}))
            assert status == 400 and answer["error"].startswith(words), (answer, words)
            still_serving(site)
        grown = peak_memory_mb(proc.pid)[1] - peak
        assert grown < REFUSAL_MB, f"the peak resident memory grew by {grown:.0f} MiB"
    finally:
        stop_editor(proc, site, log)


def test_editor_answers_only_its_own_origin(shared):
    # another Host (a DNS-rebinding page reading the answers), another site's Origin or a form's Content-Type (a
    # page the user visits making the server compute) are refused; the server's own names, and --allow-host's
    # (an SSH tunnel to another port), are answered
    path = random_model(shared)[1]
    httpd = server(path)
    port = httpd.server_address[1]
    crop = {"image": to_url(noise_image(8, 0))}
    for method, headers, body, status_, words in (
            ("GET", {"Host": "evil.example"}, None, 403, "Host: \"evil.example\" is not this server's address"),
            ("GET", {"Host": f"evil.example:{port}"}, None, 403, "Host: "),
            ("POST", {"Host": "evil.example"}, crop, 403, "Host: "),
            ("POST", {"Origin": "https://evil.example"}, crop, 403, "Origin: \"https://evil.example\" is not this "
                                                                    "server's page"),
            ("POST", {"Origin": "null"}, crop, 403, "Origin: "),
            ("POST", {"Content-Type": "text/plain"}, crop, 415, "Content-Type: expected application/json, got "
                                                                 "\"text/plain\""),
            ("POST", {"Content-Type": "application/x-www-form-urlencoded"}, crop, 415, "Content-Type: ")):
        status, answer = request(httpd, method, "/api/info" if method == "GET" else "/api/crop", body, headers)
        assert status == status_ and answer["error"].startswith(words), (headers, status, answer)
        still_serving(httpd)
    for headers in ({"Host": f"localhost:{port}"}, {"Origin": f"http://127.0.0.1:{port}"},
                    {"Origin": f"http://localhost:{port}", "Host": f"LOCALHOST:{port}"},
                    {"Content-Type": "application/json; charset=utf-8"}):
        assert request(httpd, "POST", "/api/crop", crop, headers)[0] == 200, headers
    tunnelled = server(path, allow_host=("localhost:9000",))
    headers = {"Host": "localhost:9000", "Origin": "http://localhost:9000"}
    assert request(tunnelled, "POST", "/api/crop", crop, headers)[0] == 200
    assert request(tunnelled, "GET", "/api/info", None, {"Host": "localhost:9001"})[0] == 403
    assert request(httpd, "GET", "/api/info", None, headers)[0] == 403  # the name is only the tunnelled server's


def test_editor_bounds_compute_and_stops_the_work_of_a_gone_client(shared):
    path = random_model(shared)[1]
    httpd = server(path, max_waiting=1)
    info = ok(httpd, "/api/info")
    cap = info["max_request_steps"]
    assert cap == app.config["max_request_steps"] == 4000 and info["max_cfg_scale"] == app.MAX_CFG_SCALE
    # the cap on sampler steps x AR steps (x 2 with CFG), a 400 naming the fields
    for body, words in (({"steps": 1000, "ar_steps": 16}, "steps, ar_steps: 1000 sampler steps x 16 AR steps = 16000, "
                                                          f"more than the {cap} a request may take"),
                        ({"steps": 1000, "ar_steps": 3, "cfg_scale": 2.0}, "steps, ar_steps, cfg_scale: 1000 sampler "
                                                                           "steps x 3 AR steps x 2 (CFG) = 6000"),
                        ({"cfg_scale": 21}, f"cfg_scale: expected at most {app.MAX_CFG_SCALE:g}")):
        status, answer = request(httpd, "POST", "/api/generate", body)
        assert status == 400 and answer["error"].startswith(words), (body, answer)
        still_serving(httpd)
    # a bounded queue: with the model busy and one request waiting, the next is answered 503
    editor = httpd.editor
    waiting = []
    with editor.model_lock:  # as a computing request
        first = threading.Thread(target=lambda: waiting.append(request(httpd, "POST", "/api/generate", {"steps": 2})))
        first.start()
        wait_until(lambda: ok(httpd, "/api/progress")["waiting"])
        status, answer = request(httpd, "POST", "/api/generate", {"steps": 2})
        assert status == 503 and answer["error"].startswith("busy: 1 requests wait for the model"), answer
    first.join()
    assert waiting[0][0] == 200
    # the work of a client that closes its connection stops at its next step: slowed to 2 ms a step, the request at
    # the cap would take 8 s
    model, calls = editor.model, [0]
    denoise = model.denoise

    def slowed(*args, **kwargs):
        calls[0] += 1
        time.sleep(0.002)
        return denoise(*args, **kwargs)

    model.denoise = slowed
    try:
        with server_log(httpd) as log:
            with socket.create_connection(httpd.server_address, timeout=30) as sock:
                sock.sendall(post_bytes(httpd.server_address[1], "/api/generate",
                                        json.dumps({"class": 0, "steps": 1000, "ar_steps": 4}).encode()))
                done = wait_until(lambda: (p := ok(httpd, "/api/progress"))["busy"] and p["done"])
            wait_until(lambda: not ok(httpd, "/api/progress")["busy"])
    finally:
        del model.denoise  # the class's method again
    assert done <= calls[0] <= done + 1000 < cap, (done, calls)  # at the latest, the end of the AR step under way
    assert "the client has gone, its work stopped" in log.getvalue() and "Traceback" not in log.getvalue(), \
        log.getvalue()
    still_serving(httpd)


def test_editor_bounds_connections_and_the_time_to_send_a_request(shared):
    # idle connections: at most max_connections threads serve them, each answered 408 at the deadline; a client
    # sending a byte at a time is answered 408 at the same deadline
    httpd = server(random_model(shared)[1], max_connections=4, request_timeout=DEADLINE_S)
    serving = lambda: sum("process_request_thread" in t.name for t in threading.enumerate())
    before, start = serving(), time.time()
    idle = [socket.create_connection(httpd.server_address, timeout=30) for _ in range(6)]
    try:
        time.sleep(DEADLINE_S / 3)
        assert serving() - before <= 4, serving() - before
        answers = []
        for sock in idle:  # 4 at the deadline, then the 2 queued
            answers.append(read_answer(sock)[:2])
            sock.close()
    finally:
        for sock in idle:
            sock.close()
    assert all(status == 408 and answer["error"].startswith(f"request: its line, headers and body did not arrive "
                                                            f"within {DEADLINE_S:g} s") for status, answer in answers)
    assert 2 * DEADLINE_S < time.time() - start < 3 * DEADLINE_S, time.time() - start
    still_serving(httpd)
    with socket.create_connection(httpd.server_address, timeout=30) as sock:
        start = time.time()
        for byte in b"GET /api/info HTTP/1.1\r\nX-Slow: " + b"y" * 100:
            if select.select([sock], [], [], 0)[0]:  # answered
                break
            sock.sendall(bytes([byte]))
            time.sleep(DEADLINE_S / 5)
        status, answer, _ = read_answer(sock)
    assert status == 408 and answer["error"].startswith("request: its line, headers and body"), answer
    assert time.time() - start < DEADLINE_S + 1, time.time() - start
    still_serving(httpd)


def test_editor_malformed_json_and_numbers_get_400_naming_the_field(shared):
    httpd = server(random_model(shared)[1], max_connections=4, request_timeout=DEADLINE_S)
    port = httpd.server_address[1]
    cases = [(b'{"seed": ' + b"[" * 5000 + b"]" * 5000 + b"}", "body: JSON nested too deep"),
             (b'{"seed": [' + b"0," * 9000 + b"0]}", f"body: 9003 of the JSON characters [ {{ , :, more than the "
                                                      f"{app.MAX_JSON_MARKS} accepted"),
             (b'{"seed": ' + b"9" * 5000 + b"}", "body: expected a JSON object, got text that is not JSON"),
             (b'{"cfg_scale": 1e308}', f"cfg_scale: expected at most {app.MAX_CFG_SCALE:g}"),
             (b'{"cfg_scale": NaN}', "cfg_scale: expected a finite number, got NaN"),
             (b'{"eta": -Infinity}', "eta: expected a finite number"),
             (b'{"cfg_interval": [0, 1e400]}', "cfg_interval: expected two numbers [lo, hi], got [0, Infinity]")]
    for name, words in (("seed", "seed: expected an integer"), ("steps", "steps: expected an integer"),
                        ("ar_steps", "ar_steps: expected an integer")):
        cases.append((f'{{"{name}": 1e400}}'.encode(), f"{words}, got Infinity"))
    big = "1" + "0" * 400
    cases += [(f'{{"seed": {big}}}'.encode(), "seed: expected an integer in 0..4294967295, got 1000"),
              (f'{{"steps": {big}}}'.encode(), "steps: expected sampler steps per AR step in 1..1000"),
              (f'{{"ar_steps": {big}}}'.encode(), "ar_steps must be in 1..16 (the tokens to generate)"),
              (f'{{"cfg_scale": {big}}}'.encode(), "cfg_scale: expected a finite number"),
              (f'{{"cfg_interval": [0, {big}]}}'.encode(), "cfg_interval: expected two numbers")]
    for body, words in cases:
        status, answer = request(httpd, "POST", "/api/generate", body)
        assert status == 400 and answer["error"].startswith(words), (body[:40], status, answer, words)
        still_serving(httpd)
    # a body shorter than its Content-Length: 400 when the client ends its side, 408 at the deadline when it waits
    status, answer, _ = raw_request(port, post_bytes(port, "/api/generate", b'{"seed": 1}', b"100"), True)
    assert status == 400 and answer["error"] == "body: 11 bytes, fewer than its Content-Length of 100", answer
    start = time.time()
    status, answer, _ = raw_request(port, post_bytes(port, "/api/generate", b'{"seed": 1}', b"100"))
    assert status == 408 and answer["error"].startswith("body: fewer than its Content-Length of 100 bytes arrived "
                                                        f"within {DEADLINE_S:g} s"), answer
    assert time.time() - start < DEADLINE_S + 1
    still_serving(httpd)


def test_editor_bad_request_lines_get_an_answer_and_no_traceback(shared):
    httpd = server(random_model(shared)[1], max_connections=4, request_timeout=DEADLINE_S)
    port = httpd.server_address[1]
    with server_log(httpd) as log:
        for data, status_, words in (
                (b"GARBAGE\r\n\r\n", 400, "request line: expected 'GET /PATH HTTP/1.1'"),
                (b"G" * 70_000 + b"\r\n\r\n", 414, "request line: more than 65536 bytes"),
                (b"GET / HTTP/2.0\r\n\r\n", 400, "request line: "),
                (b"GET /\r\n\r\n", 400, "request line: "),
                (b"OPTIONS /api/edit HTTP/1.1\r\n\r\n", 405, "method: OPTIONS is not served"),
                (b"GET / HTTP/1.1\r\nX: " + b"y" * 70_000 + b"\r\n\r\n", 431, "headers: Line too long"),
                (b"", 408, "request: its line, headers and body did not arrive")):  # a connection sending nothing
            status, answer, _ = raw_request(port, data)
            assert status == status_ and answer["error"].startswith(words), (data[:20], status, answer)
            still_serving(httpd)
    assert "Traceback" not in log.getvalue() and log.getvalue().count('" 408 -') == 1, log.getvalue()


def test_editor_checks_content_length_on_every_path(shared):
    httpd = server(random_model(shared)[1])
    port = httpd.server_address[1]
    with server_log(httpd) as log:
        for path_, length, status_, words in (
                ("/api/crop", "²".encode(), 400, "Content-Length: expected the body's size in bytes, got "
                                                 '"\\u00c2\\u00b2"'),  # UTF-8 bytes, read as Latin-1
                ("/api/crop", "²".encode("latin-1"), 400, "Content-Length: expected the body's size in bytes"),
                ("/api/crop", b"-2", 400, "Content-Length: expected"),
                ("/api/nowhere", "²".encode(), 404, "/api/nowhere: not found (POST /api/generate"),
                ("/nowhere", b"2", 404, "/nowhere: not found")):
            status, answer, _ = raw_request(port, post_bytes(port, path_, b"{}", length))
            assert status == status_ and answer["error"].startswith(words), (path_, length, status, answer)
            still_serving(httpd)
    assert "Traceback" not in log.getvalue(), log.getvalue()
    status, answer, _ = raw_request(port, b"POST /api/crop HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: "
                                          b"application/json\r\n\r\n{}" % port, True)
    assert status == 400 and answer["error"] == "Content-Length: expected the body's size in bytes, got \"\"", answer


def test_editor_scales_16_bit_images_to_8_bits(shared, tmp):
    # a dark 16-bit greyscale PNG (1000 of 65535) is dark (its high byte, 3), as an image and as a mask, as in
    # sample.py (--edit, --keep)
    httpd = server(random_model(shared)[1])
    dark = os.path.join(tmp, "dark16.png")
    Image.fromarray(np.full((12, 8), 1000, np.uint16)).save(dark)
    with open(dark, "rb") as f:
        url = "data:image/png;base64," + base64.b64encode(f.read()).decode()
    cropped = from_url(ok(httpd, "/api/crop", {"image": url})["image"])
    assert (cropped == 3).all() and np.array_equal(cropped, sample.load_image(dark, 0, 8)[0])
    mask = np.full((8, 8), 1000, np.uint16)
    mask[:4] = 65535  # white: the top half, the dark bottom half is kept
    answer = ok(httpd, "/api/edit", {"image": to_url(noise_image(8, 1)), "mask": to_url(mask), "class": 0,
                                     "steps": 2})
    assert np.array_equal(from_url(answer["mask"]) > 0, mask == 65535)
    keep = os.path.join(tmp, "mask16.png")
    Image.fromarray(mask).save(keep)
    assert np.array_equal(inference.snap_mask(Image.open(keep), 4).numpy(), token_blocks(mask, 2)[..., 0, 0] == 65535)


def test_editor_page_headers(shared):
    # no other site frames the page, and the Server header does not show the Python version
    httpd = server(random_model(shared)[1])
    conn = http.client.HTTPConnection(*httpd.server_address, timeout=30)
    conn.request("GET", "/")
    page = conn.getresponse()
    page.read()
    assert "frame-ancestors 'none'" in page.getheader("Content-Security-Policy")
    assert page.getheader("Server") == "nanoCausalFusion-editor", page.getheader("Server")


# ------------------------------------------------------------------------------------------ the page
def browser():
    """Headless Chromium through selenium; a missing browser fails the test (CI installs it: .ci/run)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    assert binary and driver, "no chromium/chromedriver: apt-get install chromium chromium-driver (as .ci/run does)"
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000"):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=Service(driver))


def test_editor_page_in_a_browser(shared, tmp):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait
    path = os.environ.get("EDITOR_CKPT") or overfit_model(shared)[1]
    httpd = server(path)
    info = ok(httpd, "/api/info")
    n, size, f = info["grid"], info["image_size"], info["token_pixels"]
    shots = [tmp] + ([os.environ["EDITOR_SCREENSHOTS"]] if os.environ.get("EDITOR_SCREENSHOTS") else [])
    driver = browser()
    try:
        driver.get(f"http://127.0.0.1:{httpd.server_address[1]}/")
        wait = WebDriverWait(driver, 120)
        wait.until(lambda d: d.execute_script("return !!(window.editor && editor.ready)"))
        state = lambda what: driver.execute_script(f"return {what}")
        by_id = lambda name: driver.find_element(By.ID, name)
        # the paper's regions, one click each
        for name in ("centre", "top", "bottom", "outer"):
            by_id(f"region-{name}").click()
            assert state("Array.from(editor.mask)") == info["regions"][name], name
        by_id("clear").click()
        assert sum(state("Array.from(editor.mask)")) == 0
        # generate class 0 (with the README's recommended sampler, and the demo's guidance)
        for name, value in (("gen-class", "0"), ("seed", "3"), ("steps", "20"), ("cfg", "5")):
            by_id(name).clear()
            by_id(name).send_keys(value)
        Select(by_id("sampler")).select_by_value("dpm++sde")
        by_id("generate").click()
        wait.until(lambda d: state("!editor.busy"))
        assert state("editor.lastError") == "" and state("editor.original") is not None
        original = from_url(state("editor.original"))
        # paint with the mouse: a 2x2-token brush clicked over the centre (the paper's centre region), then a
        # 1-token brush dragged along the top row
        canvas = by_id("canvas")
        cell = canvas.size["width"] / n
        at = lambda col, row: ((col + 0.5) * cell - canvas.size["width"] / 2, (row + 0.5) * cell -
                               canvas.size["height"] / 2)  # offsets from the canvas centre (selenium 4)
        width = max(1, n // 4)
        driver.execute_script("const b = document.getElementById('brush'); b.value = 2; b.dispatchEvent(new "
                              "Event('input'))")
        assert "2×2 tokens" in by_id("brush-text").text
        for row in range(width, n - width, 2):
            for col in range(width, n - width, 2):
                ActionChains(driver).move_to_element_with_offset(canvas, *at(col, row)).click().perform()
        driver.execute_script("const b = document.getElementById('brush'); b.value = 1; b.dispatchEvent(new "
                              "Event('input'))")
        drag = ActionChains(driver).move_to_element_with_offset(canvas, *at(0, 0)).click_and_hold()
        drag.move_to_element_with_offset(canvas, *at(n - 1, 0)).release().perform()
        expected = np.array(info["regions"]["centre"]).reshape(n, n).astype(bool)
        expected[0] = True
        assert np.array_equal(np.array(state("Array.from(editor.mask)")).reshape(n, n), expected)
        for directory in shots:
            driver.save_screenshot(os.path.join(directory, "editor_before.png"))
        # regenerate under a new class, by name
        by_id("edit-class").send_keys(info["classes"][1])
        by_id("edit").click()
        wait.until(lambda d: state("!editor.busy"))
        assert state("editor.lastError") == "" and state("editor.history.length") == 1
        entry = state("(({mask, ...rest}) => ({mask: Array.from(mask), ...rest}))(editor.history[0])")
        for directory in shots:
            driver.save_screenshot(os.path.join(directory, "editor_after.png"))
        assert np.array_equal(np.array(entry["mask"]).reshape(n, n), expected)
        assert np.array_equal(from_url(entry["original"]), original)
        edited, inside = from_url(entry["image"]), np.kron(expected, np.ones((f, f), bool))
        assert edited.shape == (size, size, 3) and np.array_equal(edited[~inside], original[~inside])
        assert (edited[inside] != original[inside]).any()
        assert entry["request"] == dict(entry["request"], seed=3, sampler="dpm++sde", steps=20, cfg_scale=5,
                                        ar_steps=1, **{"class": info["classes"][1]})
        # the page's request through the API gives its image; its files and command are offered
        assert ok(httpd, "/api/edit", entry["request"])["image"] == entry["image"]
        keep = 255 * np.kron(~expected, np.ones((f, f), np.uint8))  # white = kept: sample.py --keep's mask
        assert np.array_equal(from_url(entry["keepURL"], "L"), keep)
        assert np.array_equal(from_url(entry["maskURL"]), 255 - keep)
        links = [a.get_attribute("download") for a in driver.find_elements(By.CSS_SELECTOR, "#edit1 a")]
        assert links == ["edit1.png", "edit1_mask.png", "edit1_keep.png", "edit1_original.png"], links
        assert "--edit edit1_original.png --keep edit1_keep.png --classes 1 --seed 3" in by_id("edit1").text
        for directory in shots:
            assert Image.open(os.path.join(directory, "editor_after.png")).size[0] > 0
    finally:
        driver.quit()
