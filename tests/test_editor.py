"""Tests of the editor (python -m editor.app): its JSON API on tiny pixel-space models against sample.py (edits,
samples, captions, crops), its answers to bad input, one request computing at a time, the authors' checkpoint
with its VAE, the command line, and the page in a real browser: headless Chromium (Debian's chromium and
chromium-driver, which .ci/run installs) driven by selenium. Run by test_all.py.

EDITOR_SCREENSHOTS=DIR also keeps the browser test's screenshots before and after its edit in DIR; EDITOR_CKPT=CKPT
runs the browser test on that pixel-space checkpoint (the demo model of `python train.py`) instead of the tiny one.
"""
import argparse
import base64
import functools
import http.client
import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import torch
from PIL import Image

import inference
import sample
from editor import app
from test_core import _authors_state_dict
from test_sample import ROOT, TMP, overfit_model, random_model, save_ckpt, text_model

MAX_REQUEST_MB = 0.05  # the test servers refuse bodies over 50 KiB: the tiny images fit, the size test does not


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


def request(httpd, method, path, body=None):
    """(status, JSON answer) of one request; body: a dict (sent as JSON) or raw bytes."""
    host, port = httpd.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=120)
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data is not None else {})
    res = conn.getresponse()
    answer = json.loads(res.read())
    conn.close()
    return res.status, answer


def ok(httpd, path, body=None):
    status, answer = request(httpd, "POST" if body is not None else "GET", path, body)
    assert status == 200, (path, status, answer)
    return answer


def to_url(pixels, fmt="PNG"):
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
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
def test_editor_edit_keeps_the_pixels_outside_the_mask():
    _, path = overfit_model()
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


def test_editor_answers_equal_sample_py():
    _, path = overfit_model()
    httpd = server(path)
    out = tempfile.mkdtemp(dir=TMP.name)
    # an upload: a JPEG of another size and shape, centre-cropped as sample.py --edit crops it
    photo = os.path.join(out, "photo.jpg")
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
    keep = os.path.join(out, "keep.png")
    Image.fromarray(255 - from_url(answer["mask"])).save(keep)
    run_command(answer["command"], out, ORIGINAL=photo, KEEP=keep)
    edit_by_sample_py = figure_cell(os.path.join(out, "edit_keep.png"), 2, 8)
    assert np.array_equal(from_url(answer["image"]), edit_by_sample_py)
    # /api/generate = sample.py --num-samples 1: OUT_DIR/000000.png; with no class, sample.py's class of the seed
    for body in ({"class": "left", "seed": 3, "steps": 10, "ar_steps": 4, "cfg_scale": 3.0}, {"seed": 11, "steps": 5}):
        answer = ok(httpd, "/api/generate", body)
        expected_class = inference.class_labels(1, None, 4, 11).item() if "class" not in body else 3
        assert answer["class"] == expected_class, answer["class"]
        run_command(answer["command"], out)
        assert np.array_equal(from_url(answer["image"]), np.asarray(Image.open(os.path.join(out, "000000.png"))))


def test_editor_flow_model_uses_its_samplers():
    # a flow checkpoint: the page offers the flow samplers, a plain request uses euler (sample.py's default for
    # it) and says so in its command, which computes the same image; an eps sampler is a 400 naming both
    model, _ = random_model()
    path = save_ckpt(model, os.path.join(TMP.name, "flow_editor.pt"), config=dict(objective="flow"))
    httpd = server(path)
    info = ok(httpd, "/api/info")
    assert info["samplers"] == ["euler", "dpm++", "dpm++sde"] and info["defaults"]["sampler"] == "euler"
    assert info["default_steps"] == inference.DEFAULT_STEPS["flow"]
    out = tempfile.mkdtemp(dir=TMP.name)
    for body in ({"class": 1, "seed": 2, "steps": 4, "cfg_scale": 2.0}, {"seed": 3, "sampler": "dpm++", "steps": 4}):
        answer = ok(httpd, "/api/generate", body)
        assert f"--sampler {body.get('sampler', 'euler')} --steps 4" in answer["command"], answer["command"]
        run_command(answer["command"], out)
        assert np.array_equal(from_url(answer["image"]), np.asarray(Image.open(os.path.join(out, "000000.png"))))
    status, answer = request(httpd, "POST", "/api/generate", {"sampler": "ddpm"})
    assert status == 400 and "ddpm" in answer["error"] and "flow" in answer["error"], answer


def test_editor_text_model_prompts_and_captions():
    _, path, tok = text_model("text_editor.pt")
    httpd = server(path)
    out = tempfile.mkdtemp(dir=TMP.name)
    info = ok(httpd, "/api/info")
    assert info["text"] and info["classes"] == [] and info["text_tokens"] == 12
    generated = ok(httpd, "/api/generate", {"prompt": "a red dot", "seed": 2, "steps": 4, "cfg_scale": 2.0})
    assert generated["prompt"] == "a red dot" and "--prompts 'a red dot'" in generated["command"]
    run_command(generated["command"], out)
    assert np.array_equal(from_url(generated["image"]), np.asarray(Image.open(os.path.join(out, "000000.png"))))
    # an edit under a new prompt = sample.py --edit ... --prompts (the text model's edits)
    original = os.path.join(out, "original.png")
    Image.fromarray(from_url(generated["image"])).save(original)
    mask = np.zeros((8, 8), np.uint8)
    mask[:, 4:] = 255
    answer = ok(httpd, "/api/edit", {"image": generated["image"], "mask": to_url(mask), "prompt": "blue",
                                     "seed": 4, "steps": 4, "ar_steps": 2})
    keep = os.path.join(out, "keep.png")
    Image.fromarray(255 - from_url(answer["mask"])).save(keep)
    run_command(answer["command"], out, ORIGINAL=original, KEEP=keep)
    assert np.array_equal(from_url(answer["image"]), figure_cell(os.path.join(out, "edit_keep.png"), 2, 8))
    # the caption = sample.py --caption's, greedy and sampled
    for fields in ({}, {"temperature": 1.0, "top_k": 5, "seed": 3}):
        caption = ok(httpd, "/api/caption", {"image": generated["image"], **fields})["caption"]
        jsonl = os.path.join(out, "captions.jsonl")
        sample.main(["--ckpt", path, "--caption", original, "--out", jsonl, "--out-dir", out]
                    + [a for k, v in fields.items() for a in ("--" + k.replace("_", "-"), str(v))])
        assert [json.loads(line)["text"] for line in open(jsonl)] == [caption]
    for body, words in (({"class": 1}, "class: this is a text model"), ({}, "prompt: expected a non-empty string"),
                        ({"prompt": "a long prompt of many bytes"}, "prompt: 29 tokens with BOS and EOS")):
        status, answer = request(httpd, "POST", "/api/generate", body)
        assert status == 400 and answer["error"].startswith(words), answer


def test_editor_bad_input_gets_400_and_the_server_goes_on():
    _, path = overfit_model()
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
         "image: expected a PNG or JPEG image, got GIF"),
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


def test_editor_computes_one_request_at_a_time():
    # several clients at once: each waits for the model (the KV cache and the weights are shared), the answers are
    # those of requests made one after another, and /api/progress shows the work and the waiting
    _, path = overfit_model()
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


def test_editor_defaults_and_regions_are_sample_pys():
    for key, default in app.SAMPLING_DEFAULTS.items():
        assert sample.config[key] == default, key
    for key, default in app.CAPTION_DEFAULTS.items():
        assert sample.config[key] == default, key
    for key in ("ema", "vae", "vae_ckpt", "tokenizer", "dtype", "device"):  # the model is loaded as sample.py does
        assert app.config[key] == sample.config[key], key
    assert app.config["host"] == "127.0.0.1"
    _, path = overfit_model()
    regions = ok(server(path), "/api/info")["regions"]
    # the paper's regenerated regions are the complements of what sample.py --keep keeps
    for name, kept in (("centre", "outer"), ("top", "bottom"), ("bottom", "top"), ("outer", "inner")):
        assert regions[name] == (~inference.keep_mask(kept, 4)).flatten().int().tolist(), name
    assert sum(regions["centre"]) == 4 and sum(regions["outer"]) == 12


def test_editor_authors_checkpoint_with_its_vae():
    # the authors' layout (MAR's VAE, 16x downsampling; random VAE weights) loads as in sample.py, and an edit of
    # a 64 px image is sample.py's
    sd = _authors_state_dict(depth=2, hidden=64, heads=4, patch=1, channels=16, grid=4, num_cond=4, num_classes=10,
                             g=torch.Generator().manual_seed(0))
    path = os.path.join(TMP.name, "authors_editor.pt")
    torch.save({"model": sd, "ema": sd, "args": argparse.Namespace(model="CausalFusion-XL")}, path)
    httpd = server(path, vae_ckpt="random")
    info = ok(httpd, "/api/info")
    assert (info["image_size"], info["grid"], info["token_pixels"], info["vae"]) == (64, 4, 16, "mar")
    assert info["classes"] == [str(k) for k in range(10)]
    out = tempfile.mkdtemp(dir=TMP.name)
    original = os.path.join(out, "original.png")
    Image.fromarray(noise_image(64, 3)).save(original)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    answer = ok(httpd, "/api/edit", {"image": to_url(noise_image(64, 3)), "mask": to_url(mask), "class": "7",
                                     "steps": 3, "seed": 2})
    assert "--vae-ckpt random" in answer["command"] and from_url(answer["image"]).shape == (64, 64, 3)
    keep = os.path.join(out, "keep.png")
    Image.fromarray(255 - from_url(answer["mask"])).save(keep)
    run_command(answer["command"], out, ORIGINAL=original, KEEP=keep)
    assert np.array_equal(from_url(answer["image"]), figure_cell(os.path.join(out, "edit_keep.png"), 2, 64))


def test_editor_command_line():
    _, path = overfit_model()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "editor.app", "--ckpt", path, "--port", "0"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "open http://127.0.0.1:" in line, line + proc.stderr.read()
        port = int(line.split("http://127.0.0.1:")[1].split()[0])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("GET", "/api/info")
        assert json.loads(conn.getresponse().read())["grid"] == 4
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    missing = os.path.join(TMP.name, "none.pt")
    done = subprocess.run([sys.executable, "-m", "editor.app", "--ckpt", missing], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and f"editor/app.py: error: {missing}: no such checkpoint file" in done.stderr and \
        "Traceback" not in done.stderr, done.stderr
    for args, words in (([], "--ckpt is required"), (["--ckpt", path, "--colour", "red"], "unknown option --colour"),
                        (["--ckpt", path, "--max-request-mb", "0"], "--max-request-mb must be > 0")):
        try:
            app.main(args)
            raise AssertionError(f"no error for {args}")
        except ValueError as e:
            assert words in str(e), (args, str(e))


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


def test_editor_page_in_a_browser():
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait
    path = os.environ.get("EDITOR_CKPT") or overfit_model()[1]
    httpd = server(path)
    info = ok(httpd, "/api/info")
    n, size, f = info["grid"], info["image_size"], info["token_pixels"]
    shots = [tempfile.mkdtemp(dir=TMP.name)] + ([os.environ["EDITOR_SCREENSHOTS"]] if os.environ.get(
        "EDITOR_SCREENSHOTS") else [])
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
