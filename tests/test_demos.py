"""Tests of demos.py, the demo data: `python test_all.py test_demos`."""
import hashlib
import json
import os

import numpy as np
import pytest
import torch

import demos
from latents import ExtractionError


def test_demo_draw_shapes_unchanged():
    # sha256 of train.draw_shapes(3, 16, 0)'s image bytes, computed from train.py before draw_shapes moved here:
    # the class demo (and its checkpoints' data) must not change with the move. (Pillow 13's LANCZOS.)
    images, labels = demos.draw_shapes(3, 16, 0)
    assert images.shape == (30, 16, 16, 3) and images.dtype == np.uint8
    assert labels.tolist() == [k for k in range(10) for _ in range(3)]
    assert hashlib.sha256(images.tobytes()).hexdigest() == \
        "9a34fb79999310f2813959d8af549ca762afc191cb1583ef1ad8d5ab62a1ab64"


def test_demo_caption_round_trip():
    assert len(demos.COMBINATIONS) == 5 * 4 * 2 * 4
    for attrs in demos.COMBINATIONS:
        assert demos.parse_caption(demos.caption(attrs)) == attrs, attrs
    assert demos.caption(dict(shape="bar", colour="red", size="small", position="top left")) == \
        "a small red bar in the top left"
    assert demos.parse_caption("A small red and blue bar, top left!") == \
        dict(shape="bar", colour=None, size="small", position="top left")
    assert demos.parse_caption("Large BAR... bottom-right corner, please") == \
        dict(shape="bar", colour=None, size="large", position="bottom right")
    assert demos.parse_caption("a circle or a square at the top left or bottom left") == \
        dict(shape=None, colour=None, size=None, position=None)
    assert demos.parse_caption("") == dict(shape=None, colour=None, size=None, position=None)


def test_demo_held_out_combinations():
    held = [a for a in demos.COMBINATIONS if demos.is_held_out(a)]
    assert len(held) == len(demos.HELD_OUT) * 2 * 4 == 40
    seen = demos.random_attrs(2000, 0, held_out=False)
    assert not any(demos.is_held_out(a) for a in seen)
    assert {tuple(a.values()) for a in seen} == {tuple(a.values()) for a in demos.COMBINATIONS
                                                if not demos.is_held_out(a)}  # all 120 drawn
    unseen = demos.random_attrs(500, 0, held_out=True)
    assert all(demos.is_held_out(a) for a in unseen)
    assert {tuple(a.values()) for a in unseen} == {tuple(a.values()) for a in held}
    for name in demos.VALUES:  # every value of every attribute is still seen in training
        assert {a[name] for a in seen} == set(demos.VALUES[name])
    assert demos.random_attrs(5, 3, False) == demos.random_attrs(5, 3, False) != demos.random_attrs(5, 4, False)


def test_demo_draw_captioned():
    attrs = demos.random_attrs(6, 0, False)
    for size in (16, 24, 32, 64):
        images = demos.draw_captioned(attrs, size, 0)
        assert images.shape == (6, size, size, 3) and images.dtype == np.uint8
    assert np.array_equal(images, demos.draw_captioned(attrs, 64, 0))
    assert not np.array_equal(images, demos.draw_captioned(attrs, 64, 1))


@pytest.mark.parametrize("size, ceiling", [(16, 0.95), (24, 0.98), (32, 0.98)])
def test_demo_measure_real_images(size, ceiling):
    # fresh real images score >= 0.98 on every attribute (0.95 at 16 px, where a small shape is 3 px wide, against
    # only 600 training images); shuffled against their labels, about chance
    train_attrs = demos.random_attrs(600, 1, False)
    train_images = demos.draw_captioned(train_attrs, size, 1)
    attrs = demos.random_attrs(300, 2, False) + demos.random_attrs(100, 2, True)
    images = demos.draw_captioned(attrs, size, 2)
    acc = demos.t2i_accuracy(images, attrs, train_images, train_attrs)
    assert set(acc) == {*demos.CHANCE, "all"} and all(v >= ceiling for v in acc.values()), (size, acc)
    shuffled = [attrs[i] for i in np.random.default_rng(0).permutation(len(attrs))]
    acc = demos.t2i_accuracy(images, shuffled, train_images, train_attrs)
    assert all(abs(acc[k] - demos.CHANCE[k]) < 0.1 for k in demos.CHANCE), (size, acc)


def test_demo_measure_blank_images():
    train_attrs = demos.random_attrs(600, 1, False)
    train_images = demos.draw_captioned(train_attrs, 32, 1)
    blank = np.full((2, 32, 32, 3), 20, np.uint8)  # nothing drawn: nothing measured
    assert demos.measure(blank) == [dict(shape=None, colour=None, size=None, position=None)] * 2
    assert demos.nearest_shape(blank, train_images, train_attrs) == [None, None]


def test_demo_caption_accuracy():
    attrs = [dict(shape="bar", colour="red", size="small", position="top left"),
             dict(shape="plus", colour="blue", size="large", position="bottom right")]
    texts = ["a small red or yellow bar in the top left", "a large blue plus, bottom right or top right"]
    assert demos.caption_accuracy(texts, attrs) == dict(colour=0.5, position=0.5, size=1.0, shape=1.0, all=0.0)
    assert demos.caption_accuracy(["", "?"], attrs) == dict(colour=0.0, position=0.0, size=0.0, shape=0.0, all=0.0)
    assert demos.caption_accuracy(["a small red bar in the top left", "a large blue plus in the top right"],
                                   attrs) == dict(colour=1.0, position=0.5, size=1.0, shape=1.0, all=0.5)
    assert demos.CHANCE == dict(colour=0.25, position=0.25, size=0.5, shape=0.2)


def test_demo_build_caption_demo_data(tmp):
    try:
        out = demos.build_caption_demo_data(tmp, 16, 50, 0, rank=0)
    except ExtractionError as e:  # extract() not yet reading metadata.jsonl: check the written files only
        if "no class folders" not in str(e):
            raise
        out = None
    folder = os.path.join(tmp, "images")
    with open(os.path.join(folder, "metadata.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["file_name"] for r in rows] == [f"{i:05d}.png" for i in range(50)]
    assert sorted(os.listdir(folder)) == sorted([r["file_name"] for r in rows] + ["metadata.jsonl"])
    attrs = [demos.parse_caption(r["text"]) for r in rows]
    assert all(None not in a.values() and not demos.is_held_out(a) for a in attrs)
    assert attrs == demos.random_attrs(50, 0, False)  # the images are those of draw_captioned
    images = np.stack([np.asarray(demos.Image.open(os.path.join(folder, r["file_name"]))) for r in rows])
    assert np.array_equal(images, demos.draw_captioned(attrs, 16, 0))
    if out is not None:
        from latents import LatentData
        data = LatentData(out)
        assert len(data) == 50 and data.latent_shape == (3, 16, 16)
        assert [c[0] for c in data.captions] == [r["text"] for r in rows]


def test_demo_build_combination_demo_data(tmp):
    # the yardstick's data: the captioned demo's images, in one class folder per combination named by its caption
    out = demos.build_combination_demo_data(tmp, 16, 60, 0, rank=0)
    from latents import LatentData
    data = LatentData(out)
    attrs = demos.random_attrs(60, 0, False)
    assert len(data) == 60 and data.num_classes == len({demos.class_name(a) for a in attrs}) > 20
    found = [demos.parse_caption(data.class_names[k].replace("_", " ")) for k in data.labels.tolist()]
    assert sorted(map(demos.caption, found)) == sorted(map(demos.caption, attrs))
    # image i of the folder of its combination is draw_captioned's image i
    drawn = demos.draw_captioned(attrs, 16, 0)
    for i in (0, 17, 59):
        path = os.path.join(tmp, "images", demos.class_name(attrs[i]), f"{i:05d}.png")
        assert np.array_equal(np.asarray(demos.Image.open(path)), drawn[i]), i
    assert np.array_equal(np.sort(demos.pixel_images(data).reshape(60, -1), 0), np.sort(drawn.reshape(60, -1), 0))


def test_kernel_distance_is_kids_unbiased_mmd():
    # against a loop over pairs written from Binkowski et al.'s unbiased estimator (their eq. 4, KID's cubic kernel)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(7, 5)), rng.normal(0.3, 1.2, size=(9, 5))
    k = lambda a, b: (float(np.dot(a, b)) / 5 + 1) ** 3
    xx = sum(k(x[i], x[j]) for i in range(7) for j in range(7) if i != j) / (7 * 6)
    yy = sum(k(y[i], y[j]) for i in range(9) for j in range(9) if i != j) / (9 * 8)
    xy = sum(k(a, b) for a in x for b in y) / (7 * 9)
    assert np.isclose(demos.kernel_distance(torch.from_numpy(x), torch.from_numpy(y)), xx + yy - 2 * xy, rtol=1e-10)
    torch.manual_seed(0)
    # unbiased: two draws of one distribution average 0 (within 3 standard errors); a shifted one is far above
    same = [demos.kernel_distance(torch.randn(50, 20), torch.randn(50, 20)) for _ in range(200)]
    assert abs(np.mean(same)) < 3 * np.std(same) / np.sqrt(len(same)), (np.mean(same), np.std(same))
    assert demos.kernel_distance(torch.randn(50, 20) + 0.5, torch.randn(50, 20)) > 10 * np.std(same)
