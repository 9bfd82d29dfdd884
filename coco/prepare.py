"""MS-COCO's zero-shot protocols of the paper's Table 6a, from the files COCO and Karpathy publish (nothing is
downloaded): MS-COCO-30K FID for text-to-image and CIDEr on Karpathy's test split for captioning.

    python -m coco.prepare --make prompts --annotations annotations/captions_val2014.json --out prompts.txt
    python -m coco.prepare --make images --images-dir val2014 --image-list prompts.images.txt --out coco_ref.npz
    python -m coco.prepare --make karpathy --karpathy dataset_coco.json --coco-root . --out coco_karpathy_test

prompts   the T2I prompts: --num-prompts distinct images of the annotation file (val2014: 40,504 images, about 5
          captions each) drawn without replacement with Python's random.Random(--seed) from the file names in sorted
          order, then one of each chosen image's captions drawn with the same generator; whitespace and newlines
          collapsed to single spaces. Writes OUT, one caption a line (sample.py --prompts-file), and
          OUT.images.txt (OUT's .txt replaced): the chosen images' file names, one a line, in the same order.
images    the FID reference: every image of --image-list (or, without it, every image under --images-dir, sorted),
          ADM's centre crop to --image-size (images.center_crop, the crop of extraction, editing and captioning),
          written image by image into an .npz (uint8 arr_0 (N, S, S, 3), file names in files (N,)) that fid.py reads
          as it reads ADM's reference batches.
karpathy  the captioning references: the --split (test: 5,000 val2014 images) of Karpathy's dataset_coco.json as
          a folder OUT with OUT/metadata.jsonl, one {"file_name": "<filepath>/<filename>", "text": [<raw
          sentences>]} a line, and OUT/<filepath>/<filename> a symlink to (--copy: a copy of)
          COCO_ROOT/<filepath>/<filename>. `sample.py --caption OUT` walks OUT and names each image by that same
          relative path, which is what cider.py matches against file_name.
Every bad input is an error that names the file, the entry (or line) and what was expected.
"""
import json
import multiprocessing
import os
import random
import shutil
import sys
import zipfile

import numpy as np
from PIL import Image
from tqdm import tqdm

from runtime import ConfigError, parse_config
from images import IMAGE_EXTENSIONS, center_crop

config = dict(
    make="",  # what to build: prompts, images or karpathy (see above)
    annotations="annotations/captions_val2014.json",  # prompts: COCO's captions annotation file
    num_prompts=30000,  # prompts: how many images, one caption each (MS-COCO-30K: 30,000)
    seed=0,  # prompts: seed of the draw of the images and of their captions
    images_dir="val2014",  # images: the folder of COCO's images (the names of --image-list are under it)
    image_list="",  # images: file names one a line (what prompts wrote as OUT.images.txt); "": every image
    image_size=256,  # images: side of the centre crop: the model's resolution
    workers=4,  # images: processes that decode and crop (0: all in this process)
    karpathy="dataset_coco.json",  # karpathy: Karpathy's split file
    coco_root=".",  # karpathy: the folder that holds <filepath>/<filename> of its entries (val2014/COCO_...jpg)
    split="test",  # karpathy: the split to write: test (5,000 images), val, train or restval
    copy=False,  # karpathy: copy the image files instead of symlinking them
    out="",  # output; default prompts.txt, coco_ref.npz or coco_karpathy_test (a folder)
)

DEFAULT_OUT = dict(prompts="prompts.txt", images="coco_ref.npz", karpathy="coco_karpathy_test")
SPLITS = ("train", "restval", "val", "test")
CAPTIONS_FORMAT = ('{"images": [{"id": <int>, "file_name": <str>, ...}], "annotations": [{"id": <int>, '
                   '"image_id": <int>, "caption": <str>}, ...]}')
KARPATHY_FORMAT = ('{"images": [{"filepath": <str>, "filename": <str>, "split": "train" | "restval" | "val" | '
                   '"test", "sentences": [{"raw": <str>, ...}, ...], ...}], ...}')


class InputError(ValueError):
    """A bad input file or option; the message names the file, the entry or line, and what was expected."""


def _short(value, n=80):
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return text if len(text) <= n else text[:n - 3] + "..."


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _load_json(path, what):
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file (expected {what})")
    try:
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e})") from None


def _top_list(data, path, key, form):
    if not isinstance(data, dict) or key not in data:
        raise InputError(f'{path}: missing key "{key}"; expected {form}')
    if not isinstance(data[key], list):
        raise InputError(f'{path}: "{key}" is a {type(data[key]).__name__}, expected a list; expected {form}')
    return data[key]


def companion_path(out):
    """prompts.txt -> prompts.images.txt: the file that lists the chosen images."""
    return (out[:-4] if out.endswith(".txt") else out) + ".images.txt"


# ------------------------------------------------------------------------------------------ prompts
def read_coco_captions(path):
    """COCO captions_*.json -> {file_name: [cleaned captions, in file order]}; every image must have one."""
    data = _load_json(path, "COCO's captions annotations, " + CAPTIONS_FORMAT)
    images = _top_list(data, path, "images", CAPTIONS_FORMAT)
    annotations = _top_list(data, path, "annotations", CAPTIONS_FORMAT)
    names, by_name = {}, {}
    for i, img in enumerate(images):
        if not isinstance(img, dict) or not _is_int(img.get("id")) or not isinstance(img.get("file_name"), str) \
                or not img["file_name"].strip():
            raise InputError(f'{path}: images[{i}]: expected {{"id": <int>, "file_name": <str>, ...}}, '
                             f"got {_short(img)}")
        if img["id"] in names:
            raise InputError(f'{path}: images[{i}]: image id {img["id"]} already listed')
        if img["file_name"] in by_name:
            raise InputError(f'{path}: images[{i}]: file_name {img["file_name"]!r} already listed')
        names[img["id"]], by_name[img["file_name"]] = img["file_name"], img["id"]
    captions = {}
    for i, ann in enumerate(annotations):
        if not isinstance(ann, dict) or not _is_int(ann.get("image_id")) or not isinstance(ann.get("caption"), str):
            raise InputError(f'{path}: annotations[{i}]: expected {{"id": <int>, "image_id": <int>, "caption": '
                             f"<str>}}, got {_short(ann)}")
        if ann["image_id"] not in names:
            raise InputError(f'{path}: annotations[{i}]: image_id {ann["image_id"]} is not an id of "images"')
        text = " ".join(ann["caption"].split())  # one line: newlines, tabs and runs of spaces -> one space
        if not text:
            raise InputError(f'{path}: annotations[{i}] (id {ann.get("id")}): empty caption')
        captions.setdefault(names[ann["image_id"]], []).append(text)
    for image_id, name in names.items():
        if name not in captions:
            raise InputError(f'{path}: image id {image_id} ({name}) has no caption in "annotations"')
    if not names:
        raise InputError(f'{path}: "images" is empty')
    return captions


def choose_prompts(captions, num, seed):
    """{file_name: [captions]} -> [(file_name, caption)]: num distinct images drawn without replacement from the
    sorted file names with random.Random(seed), then one caption of each, in the order drawn."""
    rng = random.Random(seed)
    chosen = rng.sample(sorted(captions), num)
    return [(name, rng.choice(captions[name])) for name in chosen]


def make_prompts(cfg):
    captions = read_coco_captions(cfg["annotations"])
    num = cfg["num_prompts"]
    if num < 1:
        raise InputError(f"--num-prompts {num}: expected at least 1")
    if num > len(captions):
        raise InputError(f"{cfg['annotations']}: {len(captions)} captioned images, fewer than --num-prompts {num} "
                         f"(one caption per image, no image twice)")
    pairs = choose_prompts(captions, num, cfg["seed"])
    out, names_out = cfg["out"], companion_path(cfg["out"])
    for path, lines in ((out, [c for _, c in pairs]), (names_out, [n for n, _ in pairs])):
        with open(path, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))
    print(f"wrote {out}: {num} prompts, one caption of each of {num} of the {len(captions)} images of "
          f"{cfg['annotations']} (seed {cfg['seed']}), and their file names to {names_out}")
    return out, names_out


# ------------------------------------------------------------------------------------------ images
def read_image_list(path, folder):
    """A file of image names, one a line (blank lines skipped) -> [(line number, name)]; each must exist."""
    if not os.path.isfile(path):
        raise InputError(f"--image-list {path}: no such file")
    out, seen = [], {}
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            name = line.strip()
            if not name:
                continue
            if name in seen:
                raise InputError(f"{path}: line {lineno}: {name!r} already listed on line {seen[name]}")
            if not os.path.isfile(os.path.join(folder, name)):
                raise InputError(f"{path}: line {lineno}: {os.path.join(folder, name)}: no such file "
                                 f"(the names are under --images-dir {folder})")
            seen[name] = lineno
            out.append(name)
    if not out:
        raise InputError(f"{path}: lists no images")
    return out


def list_folder(folder):
    """Every image file under folder (images.IMAGE_EXTENSIONS), as sorted relative paths."""
    names = sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, files in os.walk(folder, followlinks=True)
                   for f in files if f.lower().endswith(IMAGE_EXTENSIONS))
    if not names:
        raise InputError(f"--images-dir {folder}: no images in this folder ({', '.join(IMAGE_EXTENSIONS)})")
    return names


def crop_file(job):
    """(path, size) -> (uint8 (size, size, 3) or None, error message or "")."""
    path, size = job
    try:
        with Image.open(path) as img:
            return np.asarray(center_crop(img.convert("RGB"), size)), ""  # convert() decodes: bad data raises
    except Exception as e:  # OSError, PIL's DecompressionBombError, ...: reported with the file's name
        return None, f"{type(e).__name__}: {e}"


def write_reference(paths, size, out, names=None, workers=0):
    """The images at `paths`, centre-cropped, -> out (.npz: arr_0 uint8 (N, size, size, 3), files (N,)), streamed
    to disk one image at a time (30,000 at 256 px are 5.9 GB); a file that cannot be read is an error naming it."""
    shape = (len(paths), size, size, 3)
    tmp = out + ".partial"
    pool = multiprocessing.Pool(workers) if workers > 0 and len(paths) > 1 else None
    try:
        jobs = [(p, size) for p in paths]
        results = pool.imap(crop_file, jobs, chunksize=8) if pool else map(crop_file, jobs)
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as z:  # np.savez's layout
            with z.open("arr_0.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
                for path, (image, error) in zip(paths, tqdm(results, total=len(paths), desc="images", unit="img")):
                    if error:
                        raise InputError(f"{path}: cannot read this image: {error}")
                    f.write(np.ascontiguousarray(image, dtype=np.uint8).tobytes())
            with z.open("files.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.array(names if names is not None else paths, dtype=str))
        os.replace(tmp, out)
    finally:
        if pool:
            pool.terminate()
        if os.path.exists(tmp):
            os.remove(tmp)
    return shape


def make_images(cfg):
    folder, out, size = cfg["images_dir"], cfg["out"], cfg["image_size"]
    if not out.endswith(".npz"):
        raise InputError(f"--out must name an .npz file (for fid.py), got {out!r}")
    if size < 1:
        raise InputError(f"--image-size {size}: expected a positive number of pixels")
    if not os.path.isdir(folder):
        raise InputError(f"--images-dir {folder}: not a folder")
    names = read_image_list(cfg["image_list"], folder) if cfg["image_list"] else list_folder(folder)
    shape = write_reference([os.path.join(folder, n) for n in names], size, out, names, cfg["workers"])
    print(f"wrote {out}: arr_0 {shape} uint8 (ADM centre crop of {len(names)} images of {folder}) and files")
    return out


# ------------------------------------------------------------------------------------------ karpathy
def read_karpathy(path, split):
    """dataset_coco.json -> [(relative path <filepath>/<filename>, [raw sentences])] of `split`, in file order.
    Every entry of the file is checked, whatever its split."""
    if split not in SPLITS:
        raise InputError(f"--split {split!r}: expected one of {', '.join(SPLITS)}")
    data = _load_json(path, "Karpathy's split file, " + KARPATHY_FORMAT)
    out, seen = [], {}
    for i, e in enumerate(_top_list(data, path, "images", KARPATHY_FORMAT)):
        where = f"{path}: images[{i}]"
        if not isinstance(e, dict):
            raise InputError(f"{where}: expected an object {{\"filepath\", \"filename\", \"split\", \"sentences\", "
                             f"...}}, got {_short(e)}")
        if isinstance(e.get("filename"), str):
            where += f" ({e['filename']})"
        missing = [k for k in ("filepath", "filename", "split", "sentences") if k not in e]
        if missing:
            raise InputError(f"{where}: missing {' and '.join(map(repr, missing))}")
        if not isinstance(e["filepath"], str) or not isinstance(e["filename"], str) or not e["filename"]:
            raise InputError(f'{where}: "filepath" and "filename" must be strings, got {_short(e["filepath"])} and '
                             f'{_short(e["filename"])}')
        if e["split"] not in SPLITS:
            raise InputError(f'{where}: "split" is {_short(e["split"])}, expected one of {", ".join(SPLITS)}')
        sentences = e["sentences"]
        if not isinstance(sentences, list) or not sentences:
            raise InputError(f'{where}: "sentences" must be a non-empty list of {{"raw": <str>, ...}}, '
                             f"got {_short(sentences)}")
        for j, s in enumerate(sentences):
            if not isinstance(s, dict) or not isinstance(s.get("raw"), str) or not s["raw"].strip():
                raise InputError(f'{where}: sentences[{j}]: expected {{"raw": <non-empty str>, ...}}, got {_short(s)}')
        rel = os.path.normpath(os.path.join(e["filepath"], e["filename"]))
        if os.path.isabs(rel) or rel == ".." or rel.startswith(".." + os.sep):
            raise InputError(f"{where}: {rel!r} is not a path inside the COCO root")
        if e["split"] != split:
            continue
        if rel in seen:
            raise InputError(f"{where}: {rel} already listed as images[{seen[rel]}]")
        seen[rel] = i
        out.append((rel, [s["raw"] for s in sentences]))
    if not out:
        raise InputError(f'{path}: no entry has "split": "{split}"')
    return out


def make_karpathy(cfg):
    entries = read_karpathy(cfg["karpathy"], cfg["split"])
    root, out = cfg["coco_root"], cfg["out"]
    for rel, _ in entries:
        if not os.path.isfile(os.path.join(root, rel)):
            raise InputError(f"{os.path.join(root, rel)}: no such file ({rel} of {cfg['karpathy']}; --coco-root "
                             f"must be the folder that holds {os.path.dirname(rel) or 'the images'})")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise InputError(f"--out {out}: already exists and is not an empty folder; remove it or choose another")
    for rel, _ in tqdm(entries, desc="copies" if cfg["copy"] else "links", unit="img"):
        src, dst = os.path.join(root, rel), os.path.join(out, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)  # real folders: sample.py's os.walk skips folder links
        if cfg["copy"]:
            shutil.copyfile(src, dst)
        else:
            os.symlink(os.path.abspath(src), dst)  # absolute: the link holds wherever OUT is read from
    with open(os.path.join(out, "metadata.jsonl"), "w", encoding="utf-8") as f:
        for rel, sentences in entries:
            f.write(json.dumps({"file_name": rel.replace(os.sep, "/"), "text": sentences}, ensure_ascii=False) + "\n")
    refs = sum(len(s) for _, s in entries)
    print(f"wrote {out}: {len(entries)} {cfg['split']} images of {cfg['karpathy']} "
          f"({'copies' if cfg['copy'] else 'symlinks'}) and metadata.jsonl ({refs} reference sentences)")
    return out


# ------------------------------------------------------------------------------------------ main
MAKERS = dict(prompts=make_prompts, images=make_images, karpathy=make_karpathy)


def main(argv=None):
    cfg = dict(config)
    parse_config(cfg, argv, prog="coco.prepare")
    if cfg["make"] not in MAKERS:
        raise InputError(f"--make: expected one of {', '.join(MAKERS)}, got {cfg['make']!r}")
    cfg["out"] = cfg["out"] or DEFAULT_OUT[cfg["make"]]
    return MAKERS[cfg["make"]](cfg)


if __name__ == "__main__":
    try:
        main()
    except (InputError, ConfigError) as e:
        sys.exit(f"coco.prepare: error: {e}")
