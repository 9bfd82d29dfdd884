"""Tests of vae.py (checkpoint layouts, shapes) and latents.py / extract_latents.py (extraction, resuming, bad
input)."""
import argparse
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import vae as vae_lib
from images import center_crop
from latents import ExtractionError, LatentData, extract

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout
# a small KL autoencoder: 3 levels of different widths (so a reversed decoder fails), attention in both halves
TINY = dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=4, enc_attn_levels=(2,), dec_attn_levels=(0,))


# ------------------------------------------------------------------------------------------ vae.py
def _write_safetensors(tensors, path, metadata=None):
    """The writer that pairs with vae.read_safetensors: u64 header size, JSON header, raw little-endian bytes."""
    codes = {v: k for k, v in vae_lib._ST_DTYPES.items()}
    header, chunks, offset = {"__metadata__": metadata} if metadata else {}, [], 0
    for name, t in tensors.items():
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": codes[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header to 8 bytes
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text + b"".join(chunks))


def _layout(arch, old_attn=False):
    """(LDM name, diffusers name, LDM shape, is Linear in diffusers) of every tensor of the KL autoencoder,
    written from the two published layouts (independently of vae.py's converter)."""
    ch, mult, nrb, z = arch["ch"], arch["ch_mult"], arch["num_res_blocks"], arch["z_channels"]
    rows = []

    def conv(ldm, dif, cin, cout, k=3, linear=False):
        rows.extend([(ldm + ".weight", dif + ".weight", (cout, cin, k, k), linear),
                     (ldm + ".bias", dif + ".bias", (cout,), False)])

    def norm(ldm, dif, c):
        rows.extend([(ldm + ".weight", dif + ".weight", (c,), False), (ldm + ".bias", dif + ".bias", (c,), False)])

    def res(ldm, dif, cin, cout):
        norm(ldm + ".norm1", dif + ".norm1", cin)
        conv(ldm + ".conv1", dif + ".conv1", cin, cout)
        norm(ldm + ".norm2", dif + ".norm2", cout)
        conv(ldm + ".conv2", dif + ".conv2", cout, cout)
        if cin != cout:
            conv(ldm + ".nin_shortcut", dif + ".conv_shortcut", cin, cout, k=1)

    def attn(ldm, dif, c):
        norm(ldm + ".norm", dif + ".group_norm", c)
        for name, old, new in (("q", "query", "to_q"), ("k", "key", "to_k"), ("v", "value", "to_v"),
                               ("proj_out", "proj_attn", "to_out.0")):
            conv(f"{ldm}.{name}", f"{dif}.{old if old_attn else new}", c, c, k=1, linear=True)

    def mid(part, c):
        res(f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", c, c)
        attn(f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0", c)
        res(f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", c, c)

    conv("encoder.conv_in", "encoder.conv_in", 3, ch)
    cin = ch
    for i, m in enumerate(mult):
        for j in range(nrb):
            res(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", cin, ch * m)
            cin = ch * m
            if i in arch["enc_attn_levels"]:
                attn(f"encoder.down.{i}.attn.{j}", f"encoder.down_blocks.{i}.attentions.{j}", cin)
        if i < len(mult) - 1:
            conv(f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv", cin, cin)
    mid("encoder", cin)
    norm("encoder.norm_out", "encoder.conv_norm_out", cin)
    conv("encoder.conv_out", "encoder.conv_out", cin, 2 * z)
    conv("quant_conv", "quant_conv", 2 * z, 2 * z, k=1)
    conv("post_quant_conv", "post_quant_conv", z, z, k=1)
    conv("decoder.conv_in", "decoder.conv_in", z, cin)
    mid("decoder", cin)
    for u, i in enumerate(reversed(range(len(mult)))):  # diffusers' up_blocks.u is LDM's up.i
        for j in range(nrb + 1):
            res(f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{u}.resnets.{j}", cin, ch * mult[i])
            cin = ch * mult[i]
            if i in arch["dec_attn_levels"]:
                attn(f"decoder.up.{i}.attn.{j}", f"decoder.up_blocks.{u}.attentions.{j}", cin)
        if i > 0:
            conv(f"decoder.up.{i}.upsample.conv", f"decoder.up_blocks.{u}.upsamplers.0.conv", cin, cin)
    norm("decoder.norm_out", "decoder.conv_norm_out", cin)
    conv("decoder.conv_out", "decoder.conv_out", cin, 3)
    return rows


def _random_weights(rows, g):
    """{LDM name: tensor}: conv weights N(0, 1/fan_in), norm weights near 1, small biases."""
    out = {}
    for name, _, shape, _ in rows:
        if len(shape) == 4:
            out[name] = torch.randn(shape, generator=g) / (shape[1] * shape[2] * shape[3]) ** 0.5
        else:
            out[name] = ("norm" in name.split(".")[-2]) + 0.1 * torch.randn(shape, generator=g)
    return out


def _diffusers(rows, ldm):
    return {dif: ldm[name].flatten(1) if linear else ldm[name] for name, dif, _, linear in rows}


def _reference(sd, arch, x):
    """The LDM KL autoencoder computed straight from the raw tensors: mean, logvar, decode(mean)."""
    conv = lambda h, k, **kw: F.conv2d(h, sd[k + ".weight"], sd[k + ".bias"], **kw)
    norm = lambda h, k: F.group_norm(h, 32, sd[k + ".weight"], sd[k + ".bias"], 1e-6)

    def res(h, k):
        r = conv(F.silu(norm(h, k + ".norm1")), k + ".conv1", padding=1)
        r = conv(F.silu(norm(r, k + ".norm2")), k + ".conv2", padding=1)
        return (conv(h, k + ".nin_shortcut") if k + ".nin_shortcut.weight" in sd else h) + r

    def attn(h, k):
        n, c, height, width = h.shape
        y = norm(h, k + ".norm")
        q, key, v = (conv(y, f"{k}.{p}").flatten(2) for p in "qkv")  # (N, C, HW)
        w = torch.softmax(q.transpose(1, 2) @ key / c ** 0.5, dim=-1)  # (N, HW query, HW key)
        return h + conv((v @ w.transpose(1, 2)).reshape(n, c, height, width), k + ".proj_out")

    def mid(h, part):
        return res(attn(res(h, part + ".mid.block_1"), part + ".mid.attn_1"), part + ".mid.block_2")

    mult, nrb = arch["ch_mult"], arch["num_res_blocks"]
    h = conv(x, "encoder.conv_in", padding=1)
    for i in range(len(mult)):
        for j in range(nrb):
            h = res(h, f"encoder.down.{i}.block.{j}")
            h = attn(h, f"encoder.down.{i}.attn.{j}") if i in arch["enc_attn_levels"] else h
        if i < len(mult) - 1:
            h = conv(F.pad(h, (0, 1, 0, 1)), f"encoder.down.{i}.downsample.conv", stride=2)
    h = conv(F.silu(norm(mid(h, "encoder"), "encoder.norm_out")), "encoder.conv_out", padding=1)
    mean, logvar = conv(h, "quant_conv").chunk(2, dim=1)
    h = mid(conv(conv(mean, "post_quant_conv"), "decoder.conv_in", padding=1), "decoder")
    for i in reversed(range(len(mult))):
        for j in range(nrb + 1):
            h = res(h, f"decoder.up.{i}.block.{j}")
            h = attn(h, f"decoder.up.{i}.attn.{j}") if i in arch["dec_attn_levels"] else h
        if i > 0:
            h = conv(F.interpolate(h, scale_factor=2.0, mode="nearest"), f"decoder.up.{i}.upsample.conv", padding=1)
    return mean, logvar.clamp(-30, 20), conv(F.silu(norm(h, "decoder.norm_out")), "decoder.conv_out", padding=1)


def test_vae_safetensors_reader_roundtrip(tmp):
    g = torch.Generator().manual_seed(0)
    tensors = {"f32": torch.randn(3, 4, generator=g), "f16": torch.randn(5, generator=g).half(),
               "bf16": torch.randn(2, 3, generator=g).bfloat16(), "i64": torch.arange(-3, 4),
               "u8": torch.arange(7, dtype=torch.uint8), "bool": torch.tensor([True, False, True]),
               "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3)}
    path = os.path.join(tmp, "t.safetensors")
    _write_safetensors(tensors, path, metadata={"format": "pt"})
    got = vae_lib.read_safetensors(path)
    with open(path, "wb") as f:
        f.write(b"\xff" * 16)
    with pytest.raises(ValueError, match=re.escape(path)):  # a corrupt header
        vae_lib.read_safetensors(path)
    assert set(got) == set(tensors)
    for name, t in tensors.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name


def test_vae_every_checkpoint_layout_loads_the_same_model(tmp):
    g = torch.Generator().manual_seed(1)
    ldm = _random_weights(_layout(TINY), g)
    x = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    with torch.no_grad():
        ref = _reference(ldm, TINY, x)
    files = {}
    files["CompVis .ckpt"] = p = os.path.join(tmp, "model.ckpt")  # with its loss network, which is dropped
    torch.save({"state_dict": {**ldm, "loss.discriminator.main.0.weight": torch.zeros(2)}, "global_step": 3}, p)
    files["MAR kl16.ckpt"] = p = os.path.join(tmp, "kl16.ckpt")
    torch.save({"model": ldm, "args": argparse.Namespace(vae_embed_dim=16)}, p)
    for old in (False, True):
        dif = _diffusers(_layout(TINY, old_attn=old), ldm)
        assert len(dif) == len(ldm)
        folder = os.path.join(tmp, f"diffusers_old{old}")
        os.makedirs(os.path.join(folder, "vae"))
        files[f"diffusers folder (old attn names: {old})"] = folder  # found in its vae/ subfolder
        _write_safetensors(dif, os.path.join(folder, "vae", "diffusion_pytorch_model.safetensors"))
        files[f"diffusers .bin (old attn names: {old})"] = p = os.path.join(tmp, f"old{old}.bin")
        torch.save(dif, p)
    for what, path in files.items():
        model = vae_lib.build_vae("mar", path, **TINY)
        assert set(model.state_dict()) == set(ldm), what
        with torch.no_grad():
            mean, logvar = model.encode_moments(x)
            out = model.decode(mean)
        for a, b in zip((mean, logvar, out), ref):
            assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5, rtol=1e-4), (what, (a - b).abs().max())
    assert ref[0].shape == (2, 4, 4, 4) and ref[2].shape == (2, 3, 16, 16)


def test_vae_loading_is_strict(tmp):
    g = torch.Generator().manual_seed(2)
    ldm = _random_weights(_layout(TINY), g)
    without = {k: v for k, v in ldm.items() if k != "decoder.conv_out.bias"}
    cases = {"missing keys (1): ['decoder.conv_out.bias']": without,
             "unexpected keys (1): ['encoder.extra.weight']": {**ldm, "encoder.extra.weight": torch.zeros(1)},
             "quant_conv.bias: (3,) in the file, (8,) in the model": {**ldm, "quant_conv.bias": torch.zeros(3)}}
    for expected, sd in cases.items():
        path = os.path.join(tmp, "bad.ckpt")
        torch.save({"state_dict": sd}, path)
        with pytest.raises(ValueError) as excinfo:
            vae_lib.build_vae("sd", path, **TINY)
        assert expected in str(excinfo.value) and path in str(excinfo.value), str(excinfo.value)
    for kind, where in (("sd", "stabilityai/sd-vae-ft-ema"), ("mar", "kl16.ckpt")):
        with pytest.raises(ValueError) as excinfo:  # no weights
            vae_lib.build_vae(kind)
        assert "--vae-ckpt" in str(excinfo.value) and where in str(excinfo.value), str(excinfo.value)
    with pytest.raises(ValueError, match="'kl8'"):  # an unknown VAE
        vae_lib.build_vae("kl8")


def test_vae_real_architectures_shapes_256_and_512():
    # the released architectures on the meta device (no memory, no compute): SD's 83,653,863 parameters
    # are the published count; MAR's 66.5M float32 parameters are the 254 MB of kl16.ckpt
    for kind, params, down, channels in (("sd", 83_653_863, 8, 4), ("mar", 66_456_019, 16, 16)):
        with torch.device("meta"):
            model = vae_lib.AutoencoderKL(kind, **vae_lib.VAE_CONFIGS[kind])
        assert sum(p.numel() for p in model.parameters()) == params, kind
        assert (model.downsample, model.latent_channels) == (down, channels)
        assert model.scale_factor == vae_lib.SCALE_FACTORS[kind]
        for size in (256, 512):
            x = torch.empty(1, 3, size, size, device="meta")
            mean, logvar = model.encode_moments(x)
            assert mean.shape == logvar.shape == (1, channels, size // down, size // down), (kind, size)
            assert model.decode(mean).shape == (1, 3, size, size), (kind, size)
    assert vae_lib.SCALE_FACTORS == {"sd": 0.18215, "mar": 0.2325, "none": 1.0}


def test_vae_none_is_the_identity():
    model = vae_lib.build_vae("none")
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    mean, logvar = model.encode_moments(x)
    assert torch.equal(mean, x) and logvar is None and torch.equal(model.decode(x), x)
    assert (model.kind, model.scale_factor, model.downsample, model.latent_channels) == ("none", 1.0, 1, 3)


# ------------------------------------------------------------------------------- latents.py, extract_latents.py
def _draw(size, seed):
    img = Image.new("RGB", size, (40 * seed % 256, 90, 200 - 20 * seed))
    draw = ImageDraw.Draw(img)
    draw.rectangle([1, 2, size[0] // 2, size[1] - 3], fill=(250, 10 * seed, 30))  # asymmetric: flips differ
    draw.ellipse([size[0] // 3, 1, size[0] - 2, size[1] // 2], fill=(0, 255 - 9 * seed, 60))
    return img


def _make_tree(root):
    """3 classes of drawn images (sizes that exercise the crop), a truncated JPEG, a non-image, a text file.
    Returns the readable files in extraction order, their labels and the unreadable files."""
    files = {"ant/0.png": (16, 16), "ant/1.jpg": (40, 24), "ant/2.jpg": "truncated",
             "bee/0.png": (16, 16), "bee/1.webp": (23, 16), "bee/bad.png": "garbage", "bee/notes.txt": "text",
             "cat/0.png": (16, 16), "cat/1.jpeg": (24, 64), "cat/sub/2.png": (20, 20)}
    good, labels, bad = [], [], []
    for seed, (name, what) in enumerate(files.items()):
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if what == "truncated":
            _draw((32, 32), seed).save(path)
            data = open(path, "rb").read()
            open(path, "wb").write(data[:len(data) // 2])
        elif what in ("garbage", "text"):
            open(path, "wb").write(b"not an image")
        else:
            _draw(what, seed).save(path)
        if what == "text":
            continue
        (bad if isinstance(what, str) else good).append(path)
        if not isinstance(what, str):
            labels.append("abc".index(name[0]))
    return good, labels, bad


def _pixels(path, size):
    return torch.from_numpy(np.asarray(center_crop(Image.open(path).convert("RGB"), size)).copy()).permute(2, 0, 1)


def test_extract_adm_center_crop():
    img = _draw((100, 60), 1)
    # short side 60 >= 2*16: halve (BOX) to 50x30; 30 < 32: stop; BICUBIC to short side 16: 50*16/30 -> 27x16
    expected = img.resize((50, 30), Image.BOX).resize((27, 16), Image.BICUBIC).crop((5, 0, 21, 16))
    assert np.array_equal(np.asarray(center_crop(img, 16)), np.asarray(expected))
    assert center_crop(_draw((16, 40), 2), 16).size == (16, 16)


def test_extract_pixels_labels_flip_skipped_and_batches(tmp):
    root, out = os.path.join(tmp, "images"), os.path.join(tmp, "latents")
    good, labels, bad = _make_tree(root)
    meta = extract(root, out, vae="none", image_size=16, batch_size=3, shard_size=4, num_workers=2)
    data = LatentData(out)
    assert meta["count"] == len(data) == 7 and meta["skipped"] == 2 and sorted(meta["skipped_files"]) == sorted(bad)
    assert len(meta["shards"]) == 3  # 9 image files in shards of 4, unreadable ones left out
    assert data.class_names == ["ant", "bee", "cat"] and data.num_classes == 3
    assert data.labels.tolist() == labels and data.labels.dtype == torch.long
    assert data.latent_shape == (3, 16, 16) and data.scale_factor == 1.0 and data.vae == "none"
    stored = torch.from_numpy(np.concatenate(data.shards)).float()  # (7, 2, 1, 3, 16, 16)
    assert stored.shape == (7, 2, 1, 3, 16, 16)
    for i, path in enumerate(good):
        x = _pixels(path, 16).float() / 127.5 - 1
        assert torch.allclose(stored[i, 0, 0], x, atol=1e-3), path  # fp16 storage
        assert torch.equal(stored[i, 1, 0], stored[i, 0, 0].flip(2)), path
    z, y = data.batch(torch.arange(7), torch.Generator().manual_seed(0))
    assert z.shape == (7, 3, 16, 16) and z.dtype == torch.float32 and torch.equal(y, data.labels)
    flipped = [torch.equal(z[i], stored[i, 1, 0]) for i in range(7)]
    assert all(f or torch.equal(z[i], stored[i, 0, 0]) for i, f in enumerate(flipped))
    z2, _ = data.batch(torch.arange(7), torch.Generator().manual_seed(0))
    assert torch.equal(z, z2)  # same generator state, same batch
    idx = torch.tensor([6, 0, 3, 3, 5])  # any order, repeats, across shards
    g = torch.Generator().manual_seed(1)
    picks = set()
    for _ in range(20):
        z, y = data.batch(idx, g)
        assert torch.equal(y, data.labels[idx])
        for b, i in enumerate(idx):
            picks.add(next(f for f in (0, 1) if torch.equal(z[b], stored[i, f, 0])))
    assert picks == {0, 1}


def test_extract_random_mar_vae_moments_and_sampling(tmp):
    root, out = os.path.join(tmp, "images"), os.path.join(tmp, "latents")
    good, labels, _ = _make_tree(root)
    meta = extract(root, out, vae="mar", vae_ckpt="random", image_size=32, batch_size=4, shard_size=5,
                   num_workers=0, dtype="fp32")
    data = LatentData(out)
    assert meta["skipped"] == 2 and data.labels.tolist() == labels
    assert data.latent_shape == (16, 2, 2) and data.scale_factor == 0.2325 and data.vae == "mar"
    stored = torch.from_numpy(np.concatenate(data.shards)).float()  # (7, 2 flips, 2 moments, 16, 2, 2)
    assert stored.shape == (7, 2, 2, 16, 2, 2)
    x = torch.stack([_pixels(p, 32) for p in good]).float() / 127.5 - 1
    model = vae_lib.build_vae("mar", "random")
    with torch.no_grad():
        for f, xf in enumerate((x, x.flip(3))):
            for m, ref in enumerate(model.encode_moments(xf)):
                assert torch.allclose(stored[:, f, m], ref, atol=2e-3, rtol=2e-3), (f, m)
    g = torch.Generator().manual_seed(3)
    z, y = data.batch([4, 1, 2], g)
    g = torch.Generator().manual_seed(3)  # the documented draws: a flip per example, then eps
    flip, eps = torch.randint(0, 2, (3,), generator=g), torch.randn(3, 16, 2, 2, generator=g)
    mom = stored[[4, 1, 2], flip]  # (3, 2, 16, 2, 2)
    assert torch.allclose(z, 0.2325 * (mom[:, 0] + torch.exp(0.5 * mom[:, 1]) * eps), atol=1e-6)
    assert y.tolist() == [labels[4], labels[1], labels[2]]


def test_extract_resume_guard_and_bad_input(tmp):
    root, out = os.path.join(tmp, "images"), os.path.join(tmp, "latents")
    _make_tree(root)
    opts = dict(vae="none", image_size=16, batch_size=2, shard_size=4, num_workers=0)
    extract(root, out, **opts)
    before = np.concatenate(LatentData(out).shards)
    # an interruption: shard 1 lost (a half-written temporary left behind), no meta.json yet
    for name in ("shard_00001.json", "shard_00001.npy", "meta.json"):
        os.remove(os.path.join(out, name))
    open(os.path.join(out, "shard_00001.npy.tmp"), "wb").write(b"half")
    with pytest.raises(ValueError) as excinfo:  # an unfinished extraction does not open
        LatentData(out)
    assert out in str(excinfo.value) and "unfinished" in str(excinfo.value)
    extract(root, out, **opts)
    data = LatentData(out)
    assert np.array_equal(np.concatenate(data.shards), before) and len(data) == 7
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    # different options into the same folder: refused, unless --overwrite
    with pytest.raises(ExtractionError) as excinfo:
        extract(root, out, **{**opts, "image_size": 8})
    assert "image_size" in str(excinfo.value) and "--overwrite" in str(excinfo.value)
    assert LatentData(out).latent_shape == (3, 16, 16)
    extract(root, out, **{**opts, "image_size": 8}, overwrite=True)
    assert LatentData(out).latent_shape == (3, 8, 8)
    # folders that are not extractions
    foreign = os.path.join(tmp, "foreign")
    os.makedirs(foreign)
    open(os.path.join(foreign, "notes.txt"), "w").write("mine")
    for call in (lambda: extract(root, foreign, **opts), lambda: LatentData(foreign),
                 lambda: LatentData(os.path.join(tmp, "nowhere"))):
        with pytest.raises((ValueError, FileNotFoundError), match=re.escape(tmp)):
            call()
    assert os.listdir(foreign) == ["notes.txt"]
    # an empty class folder, an empty tree, a missing tree
    os.makedirs(os.path.join(root, "dog"))
    empty = os.path.join(tmp, "empty")
    os.makedirs(empty)
    cases = ((root, "'dog'"), (empty, "no class folders"), (os.path.join(tmp, "no"), "not a directory"))
    for path, expected in cases:
        with pytest.raises(ExtractionError) as excinfo:
            extract(path, os.path.join(tmp, "unused"), **opts)
        assert expected in str(excinfo.value) and path in str(excinfo.value), str(excinfo.value)


def test_truncated_or_corrupt_extraction_files_are_named(tmp):
    root, out = os.path.join(tmp, "images"), os.path.join(tmp, "latents")
    _make_tree(root)
    extract(root, out, vae="none", image_size=16, batch_size=2, shard_size=4, num_workers=0)
    shard = os.path.join(out, "shard_00001.npy")
    open(shard, "r+b").truncate(os.path.getsize(shard) // 2)  # a copy cut short
    for broken, what in ((shard, "a whole .npy shard"), (os.path.join(out, "meta.json"), "a JSON file")):
        if broken.endswith(".json"):
            open(broken, "w").write('{"format": ')
        with pytest.raises(ValueError, match=re.escape(f"latent data {broken}: cannot be read as {what}")):
            LatentData(out)


def _extract_cli(root, out):
    """python extract_latents.py on root -> out (pixel space, 16 px) in a subprocess."""
    return subprocess.run([sys.executable, os.path.join(ROOT, "extract_latents.py"), "--data", root, "--vae",
                           "none", "--image-size", "16", "--out", out, "--num-workers", "0"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_extract_command_line(tmp):
    root, out = os.path.join(tmp, "images"), os.path.join(tmp, "latents")
    _make_tree(root)
    run = _extract_cli(root, out)
    assert run.returncode == 0, run.stderr
    assert "2 skipped" in run.stdout and "images/s" in run.stdout and "ant/2.jpg" in run.stdout + run.stderr
    assert LatentData(out).meta["count"] == 7


def _make_captioned_tree(root):
    """Drawn images in nested folders listed by metadata.jsonl (not in sorted order; string and list captions,
    a blank line, an extra key), one of them unreadable. Returns {path: captions} of the readable images in
    line order and the unreadable path."""
    files = {"photos/deep/c.png": ((20, 20), "a green ball above a red box"),
             "a.png": ((16, 16), ["a red box, left", "red on the left", "two shapes"]),
             "photos/broken.png": ("garbage", "never stored"),
             "photos/b.jpg": ((40, 24), ["a wide picture"]),
             "d.webp": ((23, 16), ["d one", "d two"])}
    lines, good = [], {}
    for seed, (name, (what, text)) in enumerate(files.items()):
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if what == "garbage":
            open(path, "wb").write(b"not an image")
        else:
            _draw(what, seed + 3).save(path)
            good[path] = [text] if isinstance(text, str) else text
        lines += [json.dumps({"file_name": name, "text": text, "source": "drawn"}), ""]
    open(os.path.join(root, "metadata.jsonl"), "w").write("\n".join(lines))
    return good, os.path.join(root, "photos/broken.png")


def test_extract_captioned_folder_resume_and_changed_captions(tmp):
    root, out = os.path.join(tmp, "images"), os.path.join(tmp, "latents")
    good, broken = _make_captioned_tree(root)
    opts = dict(vae="none", image_size=16, batch_size=3, shard_size=4, num_workers=0)  # broken: mid-batch
    meta = extract(root, out, **opts)
    data = LatentData(out)
    assert meta["captioned"] is True and meta["count"] == len(data) == 4 and meta["num_captions"] == 7
    assert meta["skipped"] == 1 and meta["skipped_files"] == [broken] and len(meta["shards"]) == 2
    assert data.num_classes == 0 and data.class_names == [] and data.labels.tolist() == [0] * 4
    assert data.captions == list(good.values())  # line order, the unreadable image's caption dropped
    stored = torch.from_numpy(np.concatenate(data.shards)).float()  # (4, 2, 1, 3, 16, 16)
    owner = {json.dumps(c): p for p, c in good.items()}
    for i, caps in enumerate(data.captions):  # the captions at i are those of the image stored at i
        x = _pixels(owner[json.dumps(caps)], 16).float() / 127.5 - 1
        assert torch.allclose(stored[i, 0, 0], x, atol=1e-3), (i, caps)
    assert json.load(open(os.path.join(out, "captions.json"))) == data.captions
    assert "metadata_sha1" in json.load(open(os.path.join(out, "plan.json")))
    # an interruption after shard 0: the re-run encodes only shard 1 and stores the same captions
    shard0 = os.stat(os.path.join(out, "shard_00000.npy")).st_mtime_ns
    for name in ("shard_00001.json", "shard_00001.npy", "captions.json", "meta.json"):
        os.remove(os.path.join(out, name))
    extract(root, out, **opts)
    again = LatentData(out)
    assert again.captions == data.captions and np.array_equal(np.concatenate(again.shards), stored.half().numpy())
    assert os.stat(os.path.join(out, "shard_00000.npy")).st_mtime_ns == shard0
    # a changed caption is a different extraction: refused, unless --overwrite
    meta_path = os.path.join(root, "metadata.jsonl")
    text = open(meta_path).read()
    open(meta_path, "w").write(text.replace("a wide picture", "a wide photo"))
    with pytest.raises(ExtractionError) as excinfo:  # changed captions do not resume the old extraction
        extract(root, out, **opts)
    assert "metadata_sha1" in str(excinfo.value) and "--overwrite" in str(excinfo.value), str(excinfo.value)
    assert LatentData(out).captions == data.captions
    extract(root, out, **opts, overwrite=True)
    assert LatentData(out).captions[2] == ["a wide photo"]


def _bad_metadata_message(root, lines):
    """extract() on a metadata.jsonl of `lines` (bytes or str): the error message, split into {line: problem}."""
    data = b"\n".join(l if isinstance(l, bytes) else l.encode() for l in lines)
    open(os.path.join(root, "metadata.jsonl"), "wb").write(data)
    out = os.path.join(os.path.dirname(root), "never")
    with pytest.raises(ExtractionError) as excinfo:
        extract(root, out, vae="none", image_size=16, num_workers=0)
    msg = str(excinfo.value)
    assert not os.path.exists(out)  # refused before anything is written
    assert os.path.join(root, "metadata.jsonl") in msg, msg
    shown = dict(l.strip().split(": ", 1) for l in msg.splitlines()[1:] if l.strip().startswith("line "))
    return msg, {int(k.split()[1]): v for k, v in shown.items()}


def test_extract_bad_metadata_lines_named(tmp):
    root = os.path.join(tmp, "images")
    os.makedirs(os.path.join(root, "sub"))
    _draw((16, 16), 1).save(os.path.join(root, "sub", "a.png"))
    _draw((16, 16), 2).save(os.path.join(tmp, "outside.png"))  # exists, but not under root
    good = '{"file_name": "sub/a.png", "text": "fine"}'
    f = lambda name, text: json.dumps({"file_name": name, "text": text})
    groups = [  # (line, what the message must say about it); line 1 is good; at most 10 are shown
        [('{"file_name": "sub/a.png", "text": "x"', "invalid JSON"),
         ('["sub/a.png", "x"]', "not a JSON object"),
         ('{"text": "no file"}', "missing 'file_name'"),
         ('{"file_name": "sub/a.png"}', "missing 'text'"),
         (f("sub/a.png", 5), "a string or a non-empty list of strings, got 5"),
         (f("sub/a.png", []), "a string or a non-empty list of strings, got []"),
         (f("sub/a.png", ["ok", 3]), "a string or a non-empty list of strings, got ['ok', 3]"),
         (f("sub/a.png", "   "), "empty caption"),
         (f("sub/a.png", ["ok", ""]), "empty caption(s) at [1]")],
        [(f("sub/missing.png", "x"), "'sub/missing.png': no such file"),
         (f("../outside.png", "x"), "'../outside.png' is not a path inside"),
         (f(os.path.join(tmp, "outside.png"), "x"), "is not a path inside"),
         (f("./sub/a.png", "again"), "'./sub/a.png' already listed on line 1"),
         (f(7, "x"), '"file_name" must be a string, got 7'),
         (b'{"file_name": "sub/a.png", "text": "\xff"}', "not UTF-8")],
    ]
    for group in groups:
        msg, shown = _bad_metadata_message(root, [good] + [l for l, _ in group] + ["", "  "])  # blanks: fine
        assert f"{len(group)} bad line(s)" in msg and "... and" not in msg, msg
        assert sorted(shown) == list(range(2, len(group) + 2)), msg  # neither the good nor the blank lines
        for n, (_, expected) in enumerate(group, 2):
            assert expected in shown[n], (n, expected, msg)
    # many bad lines: the first 10 spelled out, the rest counted
    msg, shown = _bad_metadata_message(root, [good] + ["{"] * 14)
    assert sorted(shown) == list(range(2, 12)) and "... and 4 more" in msg and "14 bad line(s)" in msg, msg
    msg, _ = _bad_metadata_message(root, ["", " "])
    assert "lists no images" in msg, msg


def test_extract_batch_flip_false_never_flips_and_keeps_the_stream(tmp):
    root, out = os.path.join(tmp, "images"), os.path.join(tmp, "latents")
    _make_tree(root)
    meta = extract(root, out, vae="mar", vae_ckpt="random", image_size=16, batch_size=8, shard_size=3,
                   num_workers=0)
    data = LatentData(out)
    assert data.captions is None and meta["captioned"] is False and meta["num_captions"] == 0
    assert not os.path.exists(os.path.join(out, "captions.json"))
    stored = torch.from_numpy(np.concatenate(data.shards)).float()  # (7, 2 flips, 2 moments, 16, 1, 1)
    assert all(not torch.equal(stored[i, 0], stored[i, 1]) for i in range(7))  # so a flip would show
    idx = torch.tensor([6, 0, 3, 3, 5, 1, 2])
    expect = lambda f, eps: 0.2325 * (stored[idx, f, 0] + torch.exp(0.5 * stored[idx, f, 1]) * eps)
    flipped_some = False
    for seed in range(10):
        g = torch.Generator().manual_seed(seed)  # the documented draws: a flip per example, then eps
        f, eps = torch.randint(0, 2, (7,), generator=g), torch.randn(7, 16, 1, 1, generator=g)
        after = torch.rand(1, generator=g)  # the stream's next draw
        flipped_some |= bool(f.any())
        for flip, used in ((True, f), (False, torch.zeros_like(f)), (None, f)):  # None: the default
            g = torch.Generator().manual_seed(seed)
            z, y = data.batch(idx, g) if flip is None else data.batch(idx, g, flip=flip)
            assert torch.allclose(z, expect(used, eps), atol=1e-6), (seed, flip)
            assert torch.equal(y, data.labels[idx]) and torch.equal(torch.rand(1, generator=g), after), (seed, flip)
    assert flipped_some


def test_extract_command_line_captioned(tmp):
    root, out = os.path.join(tmp, "images"), os.path.join(tmp, "latents")
    _make_captioned_tree(root)
    run = _extract_cli(root, out)
    assert run.returncode == 0, run.stderr
    assert "4 images with 7 captions, 1 skipped" in run.stdout, run.stdout
    assert "photos/broken.png" in run.stdout + run.stderr
    assert LatentData(out).meta["num_captions"] == 7
    open(os.path.join(root, "metadata.jsonl"), "a").write('\n{"file_name": "a.png"}\n')
    run = _extract_cli(root, out)
    assert run.returncode != 0 and "line 11: missing 'text'" in run.stderr, run.stderr
    assert os.path.join(root, "metadata.jsonl") in run.stderr, run.stderr
