"""Tests of finetune/: for classify.py the ViT body against the blocks run by hand, the frozen probe, MAE's layer-wise
lr decay, cutmix's label weights, LARS by hand, and an exactly resumed run; for caption.py (Table 13) the caption
head's shapes and causal greedy decoding, the frozen body and the two lrs, CIDEr-D of perfect captions, an exact
resume."""
import contextlib
import math
import os
import re
import subprocess
import sys

import pytest
import torch

import checkpoint
import demos
import tokenization
import train
from finetune import caption, classify
from finetune.caption_head import CaptionHead
from latents import LatentData
from model import patchify
from test_train import TINY, _tiny_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout
@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """(checkpoint, latents dir) of a 3-step tiny train.py run on 8x8 shapes (10 classes, 16 tokens), shared by the
    tests of the module."""
    tmp = str(tmp_path_factory.mktemp("pretrained"))
    data = _tiny_data(os.path.join(tmp, "shapes"))
    train.main(TINY + ["--data", data, "--out", os.path.join(tmp, "pre"), "--max-steps", "3", "--grid-classes", "0"])
    return os.path.join(tmp, "pre", "ckpt.pt"), os.path.join(tmp, "shapes", "latents")


def classifier(ckpt, probe=False, drop_path=0.0):
    model, meta = checkpoint.load_checkpoint(ckpt)
    torch.manual_seed(0)
    return classify.Classifier(model, meta["num_classes"], drop_path, probe), model


def test_body_is_the_pretrained_blocks_without_cond_or_time(pretrained):
    # features = the generator's own x_proj + pos_embed and Block.forward with full attention, averaged, LayerNorm
    clf, gen = classifier(pretrained[0], drop_path=0.3)
    x = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h = gen.x_proj(patchify(x, 2)) + gen.pos_embed  # (N, L, D)
        for block in gen.blocks:
            h = block(h)
        ref = torch.nn.functional.layer_norm(h.mean(1), (h.shape[2],))
        got = clf.eval().features(x)
        assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()
        clf.train()  # drop path: a branch is dropped for some samples, so train-mode features differ
        assert not torch.allclose(clf.features(x, torch.Generator().manual_seed(1)), ref, atol=1e-3)
    names = {n for n, _ in clf.named_parameters()}
    assert not [n for n in names if n.startswith(("t_embedder", "y_embedder", "cond_pos_embed"))]
    assert {"x_proj.weight", "blocks.0.attn.qkv.weight", "fc_norm.weight", "head.weight"} <= names


def test_probe_body_gets_no_gradient(pretrained):
    clf, gen = classifier(pretrained[0], probe=True)
    before = {n: p.clone() for n, p in clf.named_parameters()}
    opt = classify.LARS([dict(params=list(clf.head.parameters()))], lr=0.5)
    x, y = torch.randn(8, 3, 8, 8), torch.arange(8)
    for _ in range(2):
        torch.nn.functional.cross_entropy(clf(x), y).backward()
        opt.step()
    for n, p in clf.named_parameters():
        if n.startswith("head."):
            assert p.grad is not None and not torch.equal(p, before[n]), n
        else:
            assert p.grad is None and not p.requires_grad and torch.equal(p, before[n]), n
    assert isinstance(clf.bn, torch.nn.BatchNorm1d) and not clf.bn.affine


def test_layer_decay_groups(pretrained):
    clf, _ = classifier(pretrained[0])
    depth = len(clf.blocks)  # 4 for size T
    scale, decay = {}, {}
    for group in classify.param_groups(clf, 0.05, 0.75):
        for p in group["params"]:
            scale[id(p)], decay[id(p)] = group["lr_scale"], group["weight_decay"]
    for name, p in clf.named_parameters():
        if not p.requires_grad:
            assert id(p) not in scale, name  # the fixed sin-cos position embedding
            continue
        layer = 0 if name.startswith("x_proj") else int(name.split(".")[1]) + 1 if name.startswith("blocks") else 5
        assert math.isclose(scale[id(p)], 0.75 ** (depth + 1 - layer)), name
        assert decay[id(p)] == (0.0 if p.ndim == 1 else 0.05), name


def test_cutmix_and_mixup_targets():
    # each sample is a constant image of its own value; cutmix's label weight is the share of its own pixels
    g = torch.Generator().manual_seed(0)
    x = torch.arange(6.0)[:, None, None, None].expand(6, 1, 8, 8)
    y = torch.arange(6)
    cfg = dict(classify.config, smoothing=0.0, mixup=0.0, cutmix=1.0)
    for _ in range(10):
        mixed, target = classify.mix(x, y, 6, cfg, g)
        own = (mixed == x).float().flatten(1).mean(1)
        assert torch.allclose(target[y, y], own) and torch.allclose(target.sum(1), torch.ones(6))
    mixed, target = classify.mix(x, y, 6, dict(cfg, mixup=0.8, cutmix=0.0), g)
    lam = target[0, 0]
    assert torch.allclose(mixed, lam * x + (1 - lam) * x.flip(0))
    _, target = classify.mix(x, y, 6, dict(cfg, smoothing=0.1, mixup=0.0, cutmix=0.0), g)
    assert torch.allclose(target[0], torch.tensor([0.9 + 0.1 / 6] + [0.1 / 6] * 5))


def test_lars_step_by_hand():
    w = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    opt = classify.LARS([dict(params=[w, b])], lr=0.1, weight_decay=0.01, momentum=0.9)
    w0, b0 = w.detach().clone(), b.detach().clone()
    (w.square().sum() + b.sum()).backward()
    opt.step()
    update = 2 * w0 + 0.01 * w0
    assert torch.allclose(w, w0 - 0.1 * 0.001 * w0.norm() / update.norm() * update)
    assert torch.allclose(b, b0 - 0.1 * torch.ones(3))  # biases: plain momentum SGD, no weight decay or trust ratio


def _run_until_first_checkpoint(script, args):
    """finetune.<script>.main(args) in a subprocess, killed right after it writes its first checkpoint."""
    proc = subprocess.run([sys.executable, "-c", f"import checkpoint, torch\nfrom finetune import common, {script}\n"
                           f"torch.set_num_threads({torch.get_num_threads()})\nsave = checkpoint.save_checkpoint\n"
                           f"def stop(ckpt, *a):\n    save(ckpt, *a)\n    raise SystemExit(3)\n"
                           f"common.save_checkpoint = stop\n{script}.main({args!r})"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr


def _refused(script, args, out, cases):
    """Each (extra options, word) of cases is a ValueError of script.main whose message holds the word."""
    for bad, word in cases:
        with pytest.raises(ValueError, match=re.escape(word)):
            script.main(args + ["--out", out] + bad)


def test_finetune_resumes_exactly_and_probes(pretrained, tmp):
    ckpt, data = pretrained
    args = ["--ckpt", ckpt, "--data", data, "--val-data", data, "--batch-size", "8", "--epochs", "2",
            "--warmup-epochs", "1", "--blr", "0.05"]
    straight = classify.main(args + ["--out", os.path.join(tmp, "a")])
    # the same 2-epoch run, killed right after writing its epoch-1 checkpoint, then resumed
    stopped = args + ["--out", os.path.join(tmp, "b")]
    _run_until_first_checkpoint("classify", stopped)
    resumed = classify.main(args + ["--out", os.path.join(tmp, "b"), "--resume"])
    assert resumed["history"] == straight["history"] and len(straight["history"]) == 2
    a, b = (torch.load(os.path.join(tmp, d, "ckpt.pt"), weights_only=True)["model"] for d in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)
    pre = checkpoint.load_checkpoint(ckpt)[0].state_dict()
    assert not torch.equal(a["blocks.0.attn.qkv.weight"], pre["blocks.0.attn.qkv.weight"])  # fine-tuned
    # the probe, with a few labels per class: only the head moves; the body is the pretrained EMA
    probe = classify.main(args + ["--out", os.path.join(tmp, "p"), "--probe", "--probe-batch-size", "10",
                                  "--probe-epochs", "2", "--probe-warmup-epochs", "1", "--per-class", "2",
                                  "--probe-optimizer", "sgd"])
    p = torch.load(os.path.join(tmp, "p", "ckpt.pt"), weights_only=True)
    assert all(torch.equal(p["model"][k], pre[k]) for k in pre if k in p["model"])
    assert "2 epochs of 2 steps at batch 10" in open(os.path.join(tmp, "p", "finetune.log")).read()
    assert 0 <= probe["top1"] <= 1
    _refused(classify, args, os.path.join(tmp, "bad"), ((["--weights", "best"], "--weights"),
                                              (["--probe", "--probe-optimizer", "adam"], "--probe-optimizer"),
                                              (["--batch-size", "4096"], "batch")))


def test_torchrun_two_ranks_match_accumulation(pretrained, tmp):
    # 2 ranks draw micro-batches 0 and 1 of each step, as one process accumulating 2; the held-out accuracy is
    # counted over both ranks' shares
    ckpt, data = pretrained
    args = ["--ckpt", ckpt, "--data", data, "--val-data", data, "--batch-size", "8", "--epochs", "1",
            "--warmup-epochs", "1", "--blr", "0.05"]
    one = classify.main(args + ["--out", os.path.join(tmp, "one"), "--device-batch-size", "4"])
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                          "-m", "finetune.classify", *args, "--out", os.path.join(tmp, "two")], cwd=ROOT,
                         env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    two = torch.load(os.path.join(tmp, "two", "ckpt.pt"), weights_only=True)
    a = torch.load(os.path.join(tmp, "one", "ckpt.pt"), weights_only=True)["model"]
    assert two["history"][0]["top1"] == one["history"][0]["top1"]
    assert math.isclose(two["history"][0]["loss"], one["history"][0]["loss"], abs_tol=1e-6)
    assert all(torch.allclose(a[k], two["model"][k], atol=1e-5) for k in a)


# ------------------------------------------------------------------------------------------------ captioning
CAPTION = ["--caption-batch-size", "8", "--caption-epochs", "2", "--head-width", "32", "--head-heads", "4",
           "--head-encoder-layers", "1", "--head-decoder-layers", "1", "--text-len", "45", "--demo-images", "24",
           "--demo-val-images", "6"]  # the captioned demo's shapes at the checkpoint's 8 px


def test_caption_head_shapes_and_greedy_decoding_is_causal(pretrained):
    head = CaptionHead(in_dim=16, num_tokens=9, vocab_size=50, text_len=12, width=32, num_heads=4,
                                encoder_layers=2, decoder_layers=2, dropout=0.1).eval()
    feats = torch.randn(3, 9, 16, generator=torch.Generator().manual_seed(0))
    text = torch.randint(50, (3, 7), generator=torch.Generator().manual_seed(1))
    assert head.encode(feats).shape == (3, 9, 32) and head(feats, text).shape == (3, 7, 50)
    # greedy, token by token, against one full forward of the decoder over the decoded sequence
    ids, steps = head.generate(feats, bos=0, eos=49, return_logits=True)
    assert ids.shape[1] == steps.shape[1] + 1 and 2 <= ids.shape[1] <= 12 and (ids[:, 0] == 0).all()
    with torch.no_grad():
        full = head(feats, ids[:, :-1])  # (3, T - 1, V)
    assert torch.allclose(full, steps, atol=1e-5), (full - steps).abs().max()
    live = torch.cat([torch.ones(3, 1, dtype=torch.bool), (ids[:, 1:-1] != 49).cummin(1).values], 1)  # before EOS
    assert torch.equal(full.argmax(2)[live], ids[:, 1:][live])
    # the mask matters: a changed later token leaves earlier logits alone and changes its own position's
    other = ids[:, :-1].clone()
    other[:, 3] = (other[:, 3] + 1) % 50
    with torch.no_grad():
        changed = head(feats, other)
    assert torch.allclose(changed[:, :3], full[:, :3], atol=1e-5) and not torch.allclose(changed[:, 3], full[:, 3])
    # the captioner: the first feature_layer blocks of the body, run by hand, under the head
    gen = checkpoint.load_checkpoint(pretrained[0])[0]
    cap = caption.Captioner(gen, 2, 258, 45, 32, 4, 1, 1).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        h = gen.x_proj(patchify(x, 2)) + gen.pos_embed  # (N, L, D)
        for block in gen.blocks[:2]:
            h = block(h)
        assert torch.allclose(cap.image_tokens(x), h, atol=1e-5)
        assert cap(x, torch.zeros(2, 5, dtype=torch.long)).shape == (2, 5, 258)
    assert len(cap.blocks) == 2 and not [n for n, _ in cap.named_parameters() if n.startswith("blocks.2")]


def _caption_steps(ckpt, freeze, steps=2):
    cfg = dict(caption.config, ckpt=ckpt, caption_freeze_body=freeze, head_width=32, head_heads=4,
               head_encoder_layers=1, head_decoder_layers=1)
    model, _, opt, recipe, tok, text_len = caption.build_captioner(cfg, torch.device("cpu"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids, lengths, _ = tokenization.tokenize(tok, ["a red star", "a small blue plus in the top left"], text_len)
    for _ in range(steps):
        logits = model(torch.randn(2, 3, 8, 8), ids[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()
    return model, opt, before, recipe


def test_caption_body_frozen_or_at_its_own_lr(pretrained):
    model, opt, before, recipe = _caption_steps(pretrained[0], freeze=True)
    for n, p in model.named_parameters():
        if n.startswith("head."):
            assert p.requires_grad and not torch.equal(p, before[n]), n
        else:
            assert p.grad is None and not p.requires_grad and torch.equal(p, before[n]), n
    assert all(g["lr"] == 1e-4 for g in opt.param_groups)  # only the head's groups
    model, opt, before, recipe = _caption_steps(pretrained[0], freeze=False)
    assert (recipe["lr"], recipe["batch_size"], recipe["epochs"]) == (1e-4, 256, 20)  # Table 13
    lr, decay = {}, {}
    for g in opt.param_groups:
        assert g["betas"] == (0.9, 0.999)
        for p in g["params"]:
            lr[id(p)], decay[id(p)] = g["lr"], g["weight_decay"]
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert id(p) not in lr, n  # the fixed sin-cos position embedding
            continue
        assert math.isclose(lr[id(p)], 1e-4 if n.startswith("head.") else 1e-5), n
        assert decay[id(p)] == (0.0 if p.ndim == 1 or n.endswith("_pos") else 0.01), n
        assert not torch.equal(p, before[n]), n  # the body trains too


def test_caption_cider_evaluation_maxes_for_perfect_captions(pretrained, tmp):
    ckpt, _ = pretrained
    data = LatentData(demos.build_caption_demo_data(tmp, 8, 8, 3, 0))
    tok = tokenization.build_tokenizer("")

    class Oracle(torch.nn.Module):  # captions the images in order: their references, or shifted by one
        def __init__(self, shift):
            super().__init__()
            self.i, self.shift = 0, shift

        def caption(self, latents, bos, eos):
            refs = [data.captions[(self.i + k + self.shift) % len(data)][0] for k in range(len(latents))]
            self.i += len(latents)
            return tokenization.tokenize(tok, refs, 45)[0]

    args = (tok, 3, torch.device("cpu"), contextlib.nullcontext(), 0, 1)  # batches of 3, 3 and 2
    perfect, captions = caption.evaluate_captions(Oracle(0), data, *args)
    assert [captions[i] for i in range(len(data))] == [c[0] for c in data.captions]
    assert math.isclose(perfect, 10.0, rel_tol=1e-9)  # CIDEr-D's maximum with one reference each
    wrong, _ = caption.evaluate_captions(Oracle(1), data, *args)
    assert wrong < perfect
    model = _caption_steps(ckpt, False, steps=0)[0]
    score, _ = caption.evaluate_captions(model, data, *args)  # an untrained captioner: a number, far below
    assert 0 <= score < 1 and model.training


def test_caption_finetune_resumes_exactly_and_freezes(pretrained, tmp):
    ckpt, shapes_data = pretrained
    args = ["--ckpt", ckpt] + CAPTION
    straight = caption.main(args + ["--out", os.path.join(tmp, "a")])
    stopped = args + ["--out", os.path.join(tmp, "b")]
    _run_until_first_checkpoint("caption", stopped)
    assert len(torch.load(os.path.join(tmp, "b", "ckpt.pt"), weights_only=True)["history"]) == 1
    resumed = caption.main(args + ["--out", os.path.join(tmp, "b"), "--resume"])
    assert resumed["history"] == straight["history"] and len(straight["history"]) == 2
    assert all(0 <= h["cider"] <= 10 and h["loss"] > 0 for h in straight["history"])
    a, b = (torch.load(os.path.join(tmp, d, "ckpt.pt"), weights_only=True) for d in "ab")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["tokenizer"] == {"kind": "bytes"} and a["text_len"] == 45
    pre = checkpoint.load_checkpoint(ckpt)[0].state_dict()
    assert not torch.equal(a["model"]["blocks.0.attn.qkv.weight"], pre["blocks.0.attn.qkv.weight"])
    log = open(os.path.join(tmp, "a", "finetune.log")).read()
    assert "2 epochs of 3 steps at batch 8" in log and "held-out CIDEr-D" in log and "6 held-out" in log
    # frozen: the body in the checkpoint is the pretrained EMA's, bit for bit
    caption.main(args + ["--out", os.path.join(tmp, "f"), "--caption-freeze-body", "--caption-epochs", "1"])
    f = torch.load(os.path.join(tmp, "f", "ckpt.pt"), weights_only=True)["model"]
    body = [k for k in f if not k.startswith("head.")]
    assert body and all(torch.equal(f[k], pre[k]) for k in body)
    _refused(caption, args, os.path.join(tmp, "bad"), ((["--feature-layer", "9"], "--feature-layer"),
                                                       (["--task", "captions"], "--task"),
                                                       (["--data", shapes_data, "--val-data", shapes_data],
                                                        "no captions"),
                                                       (["--caption-body-lr", "0"], "--caption-freeze-body")))


def test_caption_finetune_takes_a_text_checkpoints_tokenizer(tmp):
    # a text checkpoint's own tokenizer and text length, unless --tokenizer names another: here a learned BPE
    run = os.path.join(tmp, "run")
    train.main(TINY + ["--demo", "captions", "--demo-image-size", "8", "--demo-images", "32", "--flip", "false",
                       "--learn-tokenizer", "400", "--text-len", "10", "--max-steps", "1", "--out", run])
    own = torch.load(os.path.join(run, "ckpt.pt"), weights_only=True)["tokenizer"]
    args = ["--ckpt", os.path.join(run, "ckpt.pt")] + CAPTION[:-6] + ["--caption-epochs", "1", "--demo-images",
                                                                       "24", "--demo-val-images", "6"]
    caption.main(args + ["--out", os.path.join(tmp, "ft")])
    ft = torch.load(os.path.join(tmp, "ft", "ckpt.pt"), weights_only=True)
    assert own["kind"] == "bpe" and ft["tokenizer"] == own and ft["text_len"] == 10
    log = open(os.path.join(tmp, "ft", "finetune.log")).read()
    assert "bpe tokenizer, 10 text tokens" in log and "captions cut 0/" in log, log
