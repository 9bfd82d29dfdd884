"""Tests of coco/prepare.py and coco/cider.py (the zero-shot COCO protocols of Table 6a) on small files in COCO's
and Karpathy's real layouts: captions_val2014.json, val2014/COCO_val2014_<12 digits>.jpg of several sizes, aspect
ratios and modes, and dataset_coco.json; then the real chain into fid.py's reader, sample.py's caption folder walk
and coco/cider.py."""
import contextlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from coco import prepare as coco

torch.set_num_threads(1)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout
# COCO image ids -> (size, mode, format): landscape, portrait, odd sizes, grayscale, PNG data, one under the crop
IMAGES = {391895: ((640, 480), "RGB", "JPEG"), 522418: ((480, 640), "RGB", "JPEG"),
          184613: ((500, 333), "L", "JPEG"), 318219: ((1200, 300), "RGB", "PNG"), 554625: ((90, 100), "RGB", "JPEG"),
          397133: ((427, 640), "RGB", "JPEG")}
CAPTIONS = {391895: ["A man with a red helmet on a small moped on a dirt road. ", "Man riding a motor bike on a dirt road"
                     " on the countryside.", "A man riding on the back of a motorcycle."],
            522418: ["A woman wearing a net on her head cutting a cake. ", "A woman cutting a large white sheet cake."],
            184613: ["A child holding a flowered umbrella and petting a yak.", "A young man holding an umbrella\nnext "
                     "to a herd of cattle.", "a young boy barefoot holding an umbrella touching the horn of a cow"],
            318219: ["A young boy standing in front of a computer keyboard.", "a little boy wearing headphones and "
                     "looking at a computer monitor"],
            554625: ["A boy wearing headphones using one computer in a long row of computers", "A little boy  with"
                     "\tearphones on listening to something."],
            397133: ["A man is in a kitchen making pizzas.", "Man in apron standing on front of oven with pans and "
                     "bakeware"]}


def name_of(image_id, folder="val2014"):
    return f"COCO_{folder}_{image_id:012d}.jpg"


def write_coco(root):
    """root/val2014/*.jpg and root/annotations/captions_val2014.json; -> (annotations path, {file_name: captions})."""
    os.makedirs(os.path.join(root, "val2014"))
    os.makedirs(os.path.join(root, "annotations"))
    rng = np.random.default_rng(0)
    for image_id, ((w, h), mode, fmt) in IMAGES.items():
        y, x = np.mgrid[:h, :w]  # smooth gradients plus noise: resampling differences would show
        pixels = np.stack([x * 255 // w, y * 255 // h, (x + y) % 256], -1) + rng.integers(0, 40, (h, w, 3))
        img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).convert(mode)
        img.save(os.path.join(root, "val2014", name_of(image_id)), format=fmt)
    images = [{"license": 3, "file_name": name_of(i), "coco_url": f"http://images.cocodataset.org/val2014/"
               f"{name_of(i)}", "height": s[1], "width": s[0], "date_captured": "2013-11-14 11:18:45", "id": i}
              for i, (s, _, _) in IMAGES.items()]
    annotations = [{"image_id": i, "id": 1000 * i + k, "caption": c} for k in range(5) for i, caps in CAPTIONS.items()
                   if k < len(caps) for c in [caps[k]]]  # interleaved, as in the real file
    path = os.path.join(root, "annotations", "captions_val2014.json")
    with open(path, "w") as f:
        json.dump({"info": {"description": "COCO 2014 Dataset"}, "images": images, "licenses": [],
                   "annotations": annotations}, f)
    return path, {name_of(i): [" ".join(c.split()) for c in caps] for i, caps in CAPTIONS.items()}


def write_karpathy(root):
    """root/dataset_coco.json: 3 test, 1 val, 1 restval (val2014) and 1 train (train2014, no file) entries."""
    splits = {391895: "test", 522418: "test", 184613: "test", 318219: "val", 554625: "restval", 397133: "train"}
    entries = []
    for n, (image_id, split) in enumerate(splits.items()):
        folder = "train2014" if split == "train" else "val2014"
        entries.append({"filepath": folder, "sentids": [10 * n + k for k in range(len(CAPTIONS[image_id]))],
                        "filename": name_of(image_id, folder), "imgid": n, "split": split, "cocoid": image_id,
                        "sentences": [{"tokens": c.lower().split(), "raw": c, "imgid": n, "sentid": 10 * n + k}
                                      for k, c in enumerate(CAPTIONS[image_id])]})
    path = os.path.join(root, "dataset_coco.json")
    with open(path, "w") as f:
        json.dump({"images": entries, "dataset": "coco"}, f)
    return path, {os.path.join(e["filepath"], e["filename"]): [s["raw"] for s in e["sentences"]]
                  for e in entries if e["split"] == "test"}


def run(argv):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return coco.main(argv)


def lines(path):
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


def adm_center_crop(pil_image, image_size):
    """guided-diffusion's image_datasets.center_crop_arr, transcribed (independent of images.py)."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y, crop_x = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[crop_y:crop_y + image_size, crop_x:crop_x + image_size]


# ------------------------------------------------------------------------------------------ prompts
def test_coco_prompts_one_caption_per_image_by_seed(tmp):
    ann, captions = write_coco(tmp)
    outs = {}
    for seed, n, name in ((0, 4, "a"), (0, 4, "b"), (1, 4, "c"), (0, 6, "all")):
        out = os.path.join(tmp, f"{name}.txt")
        assert run(["--make", "prompts", "--annotations", ann, "--num-prompts", str(n), "--seed", str(seed),
                    "--out", out]) == (out, os.path.join(tmp, f"{name}.images.txt"))
        prompts, files = lines(out), lines(os.path.join(tmp, f"{name}.images.txt"))
        assert len(prompts) == len(files) == n
        assert len(set(files)) == n  # no image twice
        for file, prompt in zip(files, prompts):
            assert prompt in captions[file], (file, prompt)  # one of that image's own captions
            assert prompt == " ".join(prompt.split()) and prompt  # one clean line
        outs[name] = list(zip(files, prompts))
    assert outs["a"] == outs["b"]  # deterministic by seed
    assert outs["a"] != outs["c"]
    assert sorted(f for f, _ in outs["all"]) == sorted(captions)  # every image once
    # the draw is the documented one: images from the sorted names, then one caption each, one generator
    rng = __import__("random").Random(0)
    chosen = rng.sample(sorted(captions), 4)
    assert outs["a"] == [(f, rng.choice(captions[f])) for f in chosen]
    # the caption with a newline and the one with a tab and double space come out on one line each
    all_text = open(os.path.join(tmp, "all.txt"), encoding="utf-8").read()
    assert "\t" not in all_text and "  " not in all_text and all_text.count("\n") == 6


# ------------------------------------------------------------------------------------------ images
def test_coco_images_adm_crop_npz_read_by_fid(tmp):
    import fid
    ann, _ = write_coco(tmp)
    folder = os.path.join(tmp, "val2014")
    run(["--make", "prompts", "--annotations", ann, "--num-prompts", "5", "--out", os.path.join(tmp, "p.txt")])
    names = lines(os.path.join(tmp, "p.images.txt"))
    out = os.path.join(tmp, "ref.npz")
    run(["--make", "images", "--images-dir", folder, "--image-list", os.path.join(tmp, "p.images.txt"),
         "--image-size", "64", "--workers", "0", "--out", out])
    with np.load(out) as f:
        arr, files = f["arr_0"], list(f["files"])
    assert arr.shape == (5, 64, 64, 3) and arr.dtype == np.uint8
    assert files == names  # the same images as the prompts, in the same order
    for image, name in zip(arr, names):
        with Image.open(os.path.join(folder, name)) as img:
            expected = adm_center_crop(img.convert("RGB"), 64)
        assert np.array_equal(image, expected), name
    n, batches = fid.read_images(out, 2)  # fid.py's own (streaming) reader
    assert n == 5 and np.array_equal(np.concatenate(list(batches)), arr)
    # no list: every image of the folder, sorted; worker processes give the same bytes
    out2 = os.path.join(tmp, "all.npz")
    run(["--make", "images", "--images-dir", folder, "--image-size", "64", "--workers", "2", "--out", out2])
    with np.load(out2) as f:
        assert list(f["files"]) == sorted(name_of(i) for i in IMAGES) and f["arr_0"].shape == (6, 64, 64, 3)
        for name, image in zip(names, arr):
            assert np.array_equal(f["arr_0"][list(f["files"]).index(name)], image)
    assert sorted(os.listdir(tmp)) == sorted(["all.npz", "annotations", "p.images.txt", "p.txt", "ref.npz",
                                              "val2014"])  # no partial files left


# ------------------------------------------------------------------------------------------ karpathy
def test_coco_karpathy_folder_sample_walk_and_cider(tmp):
    from coco import cider
    from sample import caption_sources
    write_coco(tmp)
    kjson, refs = write_karpathy(tmp)
    out = os.path.join(tmp, "karpathy_test")
    run(["--make", "karpathy", "--karpathy", kjson, "--coco-root", tmp, "--out", out])
    meta = [json.loads(line) for line in lines(os.path.join(out, "metadata.jsonl"))]
    assert {m["file_name"]: m["text"] for m in meta} == refs  # the 3 test images, their raw sentences
    assert [m["file_name"] for m in meta] == list(refs)  # in the file's order
    for m in meta:
        link = os.path.join(out, m["file_name"])
        assert os.path.islink(link) and os.path.samefile(link, os.path.join(tmp, m["file_name"]))
    # sample.py --caption OUT: its folder walk names the images exactly as metadata.jsonl does
    sources, images = caption_sources(out, 16)
    assert sorted(sources) == sorted(refs) and images.shape == (3, 16, 16, 3)
    # fake captions in sample.py's output format -> cider.py: matched by file_name, the exact caption wins
    first = sources[0]
    scores = {}
    for case, text in (("right", refs[first][1]), ("wrong", "a plate of broccoli and rice on a wooden table")):
        caps = os.path.join(tmp, f"caps_{case}.jsonl")
        with open(caps, "w") as f:
            for s in sources:
                f.write(json.dumps({"source": s, "text": text if s == first else "a photo of something"}) + "\n")
        candidates, references, _ = cider.match_captions(caps, os.path.join(out, "metadata.jsonl"))
        assert references == {s: refs[s] for s in sources}
        per_image = os.path.join(tmp, f"scores_{case}.jsonl")
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):  # the CLI, as the README runs it
            cider.main([caps, os.path.join(out, "metadata.jsonl"), "--per-image", per_image])
        assert "CIDEr-D" in stdout.getvalue() and "(3 images)" in stdout.getvalue()
        scores[case] = {json.loads(x)["file_name"]: json.loads(x)["cider_d"] for x in lines(per_image)}[first]
    assert scores["right"] > scores["wrong"] + 1.0, scores
    # --copy: plain files with the same bytes, and the val split on request
    out2 = os.path.join(tmp, "karpathy_val")
    run(["--make", "karpathy", "--karpathy", kjson, "--coco-root", tmp, "--split", "val", "--copy", "--out", out2])
    (m,) = [json.loads(line) for line in lines(os.path.join(out2, "metadata.jsonl"))]
    copied = os.path.join(out2, m["file_name"])
    assert m["file_name"] == "val2014/" + name_of(318219) and not os.path.islink(copied)
    assert open(copied, "rb").read() == open(os.path.join(tmp, m["file_name"]), "rb").read()


# ------------------------------------------------------------------------------------------ errors
def _expect_error(argv, *words):
    with pytest.raises((coco.InputError, coco.ConfigError)) as excinfo:
        run(argv)
    for word in words:
        assert word in str(excinfo.value), (argv, word, str(excinfo.value))
    assert "\n" not in str(excinfo.value), str(excinfo.value)  # one line


def test_coco_bad_inputs_name_the_file_and_entry(tmp):
    ann, _ = write_coco(tmp)
    kjson, _ = write_karpathy(tmp)
    good, kgood = json.load(open(ann)), json.load(open(kjson))

    def variant(name, data, base=tmp):
        path = os.path.join(base, name)
        with open(path, "w") as f:
            f.write(data if isinstance(data, str) else json.dumps(data))
        return path

    def prompts(path, *more):
        return ["--make", "prompts", "--annotations", path, "--out", os.path.join(tmp, "p.txt"), *more]

    no_ann = variant("no_ann.json", {"images": good["images"]})
    _expect_error(prompts(no_ann), no_ann, '"annotations"')
    stray = variant("stray.json", {**good, "annotations": good["annotations"] + [{"id": 1, "image_id": 999,
                                                                                  "caption": "x"}]})
    _expect_error(prompts(stray), stray, f"annotations[{len(good['annotations'])}]", "image_id 999")
    uncaptioned = variant("uncaptioned.json", {**good, "annotations": [a for a in good["annotations"]
                                                                       if a["image_id"] != 522418]})
    _expect_error(prompts(uncaptioned), uncaptioned, "image id 522418", name_of(522418), "no caption")
    no_caption = variant("no_caption.json", {**good, "annotations": [{"id": 5, "image_id": 391895}]})
    _expect_error(prompts(no_caption), no_caption, "annotations[0]", '"caption"')
    _expect_error(prompts(ann, "--num-prompts", "7"), ann, "6 captioned images", "--num-prompts 7")
    broken = variant("broken.json", '{"images": [}')
    _expect_error(prompts(broken), broken, "invalid JSON", "line 1")
    _expect_error(prompts(os.path.join(tmp, "nope.json")), "nope.json", "no such file")

    def karpathy(path, *more):
        return ["--make", "karpathy", "--karpathy", path, "--coco-root", tmp, *more]

    entries = kgood["images"]
    no_sent = variant("no_sent.json", {"images": [entries[0], {k: v for k, v in entries[1].items()
                                                                if k != "sentences"}]})
    _expect_error(karpathy(no_sent, "--out", os.path.join(tmp, "k1")), no_sent, "images[1]", name_of(522418),
                  "'sentences'")
    no_images = variant("no_images.json", {"dataset": "coco"})
    _expect_error(karpathy(no_images, "--out", os.path.join(tmp, "k2")), no_images, '"images"')
    bad_split = variant("bad_split.json", {"images": [{**entries[0], "split": "testing"}]})
    _expect_error(karpathy(bad_split, "--out", os.path.join(tmp, "k3")), bad_split, "images[0]", "'testing'")
    empty_raw = variant("empty_raw.json", {"images": [{**entries[0], "sentences": [{"raw": " ", "tokens": []}]}]})
    _expect_error(karpathy(empty_raw, "--out", os.path.join(tmp, "k4")), empty_raw, "images[0]", "sentences[0]")
    _expect_error(karpathy(kjson, "--coco-root", os.path.join(tmp, "val2014"), "--out", os.path.join(tmp, "k5")),
                  os.path.join(tmp, "val2014", "val2014", name_of(391895)), "no such file", "--coco-root")
    busy = os.path.join(tmp, "busy")
    os.makedirs(busy)
    open(os.path.join(busy, "x"), "w").close()
    _expect_error(karpathy(kjson, "--out", busy), busy, "not an empty folder")

    folder = os.path.join(tmp, "val2014")
    missing_list = variant("missing.images.txt", f"{name_of(391895)}\n{name_of(42)}\n")
    _expect_error(["--make", "images", "--images-dir", folder, "--image-list", missing_list, "--out",
                   os.path.join(tmp, "r.npz")], missing_list, "line 2", name_of(42), "no such file")
    bad_dir = os.path.join(tmp, "bad")
    os.makedirs(bad_dir)
    Image.new("RGB", (40, 30)).save(os.path.join(bad_dir, name_of(1)))
    variant(name_of(2), "not a JPEG", bad_dir)
    _expect_error(["--make", "images", "--images-dir", bad_dir, "--image-size", "16", "--workers", "0", "--out",
                   os.path.join(tmp, "r.npz")], os.path.join(bad_dir, name_of(2)), "cannot read")
    assert not os.path.exists(os.path.join(tmp, "r.npz")) and not os.path.exists(os.path.join(tmp, "r.npz.partial"))
    _expect_error(["--make", "images", "--images-dir", folder, "--out", os.path.join(tmp, "r.npy")], "--out",
                  ".npz")
    _expect_error(["--make", "caption"], "--make", "prompts, images, karpathy", "'caption'")
    _expect_error(["--make", "prompts", "--num-promts", "5"], "--num-promts")
    # the command line: one line `coco.prepare: error: ...`, exit status 1
    proc = subprocess.run([sys.executable, "-m", "coco.prepare", "--make", "karpathy", "--karpathy",
                           no_sent, "--out", os.path.join(tmp, "k6")], capture_output=True, text=True, cwd=tmp,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith(f"coco.prepare: error: {no_sent}: images[1]") and proc.stderr.count("\n") == 1, \
        proc.stderr
