"""The core tests: the mask against brute force, the model and its KV cache, diffusion and the config parser
(mask.py, model.py, diffusion.py, runtime.py); the authors' code as a reference where it exists."""
import contextlib
import math
import re

import pytest
import torch

import diffusion
import mask
from model import CausalFusion, patchify, unpatchify

# the tests' models are tiny: one intra-op thread is as fast, and OpenMP threads stall badly on a busy CPU
torch.set_num_threads(1)


def tiny_model(**kw):
    args = dict(size="T", input_size=8, patch_size=2, in_channels=4, num_classes=10, num_cond_tokens=4)
    args.update(kw)
    torch.manual_seed(0)
    model = CausalFusion(**args)
    # the head is zero-initialized; give it weights so the tests compare non-trivial outputs
    torch.nn.init.normal_(model.final_layer[1].weight, std=0.02)
    return model.eval()


def test_config_overrides():
    from runtime import ConfigError, parse_config
    cfg = dict(lr=1e-4, size="T", steps=250, compile=False, resume=False, interval=(0.0, 1000.0), classes=[], ckpt=None)
    rest = parse_config(cfg, ["a.npz", "--lr=3e-4", "--size", "L", "--compile", "--resume", "false", "--interval",
                              "100", "800", "--classes", "3", "-1", "--ckpt", "x.pt", "b.npz"], positional="A B")
    assert rest == ["a.npz", "b.npz"]
    assert cfg == dict(lr=3e-4, size="L", steps=250, compile=True, resume=False, interval=(100.0, 800.0),
                       classes=["3", "-1"], ckpt="x.pt")
    for bad, word in ((["--stpes", "3"], "--stpes"), (["--steps", "many"], "--steps"),
                      (["--compile=maybe"], "--compile"), (["--steps"], "--steps")):
        with pytest.raises(ConfigError, match=re.escape(word)):
            parse_config(dict(steps=1, compile=False), bad)
    # a mistyped key names the nearest ones first
    with pytest.raises(ConfigError, match="^" + re.escape("unknown option --gama: did you mean --gamma?")):
        parse_config(dict(gamma=0.9, grid_steps=10, lr=1.0), ["--gama", "0.5"])


def test_config_stray_words_and_recipes(tmp_path):
    """A word that is not an option is an error naming it, unless the script takes words or recipes; a recipe's
    keys apply before every --key value wherever it stands; a bad recipe names its file and line."""
    from runtime import ConfigError, parse_config
    with pytest.raises(ConfigError, match=r"unexpected word 'latents/x' \(after 3\)"):
        parse_config(dict(steps=1), ["--steps", "3", "latents/x"])
    recipe = tmp_path / "run.py"
    recipe.write_text("_EPOCH = 625  # a helper of the file's own\nsteps = 240 * _EPOCH\nlr = 1\nbetas = [0.9, 0.5]\n")
    cfg = dict(steps=1, lr=0.5, betas=(0.9, 0.95), size="T")
    words = parse_config(cfg, ["--lr", "3e-4", str(recipe), "--size", "L"], recipes=True)
    assert words == [str(recipe)] and cfg == dict(steps=150_000, lr=3e-4, betas=(0.9, 0.5), size="L")
    assert type(cfg["betas"]) is tuple
    for text, message in (("steps = 2\nstpes = 3\n", r"run\.py, line 2: unknown key stpes: did you mean --steps"),
                          ("steps = '2'\n", r"run\.py, line 1: steps = '2': expected int"),
                          ("lr = True\n", r"line 1: lr = True: expected float"),
                          ("steps = 2\nsteps = (\n", r"run\.py, line 2: SyntaxError"),
                          ("steps = 1\nsteps = 1 // 0\n", r"run\.py, line 2: ZeroDivisionError")):
        recipe.write_text(text)
        with pytest.raises(ConfigError, match=message):
            parse_config(dict(steps=1, lr=0.5), [str(recipe)], recipes=True)
    with pytest.raises(ConfigError, match="recipe .*missing.py: No such file"):
        parse_config(dict(steps=1), [str(tmp_path / "missing.py")], recipes=True)
    with pytest.raises(ConfigError, match="unexpected word 'notes.txt'"):
        parse_config(dict(steps=1), ["notes.txt"], recipes=True)


def test_micro_batches_name_all_three():
    from runtime import micro_batches
    assert micro_batches(2048, 32, 8) == (8, 32) and micro_batches(2048, 0, 8) == (1, 256)
    assert micro_batches(16, 0, 1) == (1, 16)
    for batch, micro, world in ((2048, 48, 8), (10, 0, 4), (8, 16, 1)):
        with pytest.raises(ValueError, match=f"--batch-size {batch} must be a multiple of --device-batch-size "
                                             f"{micro} x {world} rank"):
            micro_batches(batch, micro, world)


def test_config_help_prints_each_keys_comment():
    """--help prints every key of a script's config block with its default and its whole comment, under the
    block's headings (a hanging-indent comment line continues its key's comment)."""
    import contextlib
    import io

    import train
    from runtime import parse_config
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        parse_config(dict(train.config), ["--help"], source=train.__file__)
    text = out.getvalue()
    for key in train.config:
        line = next((l for l in text.splitlines() if l.lstrip().startswith(f"--{key.replace('_', '-')} ")), None)
        assert line is not None and len(line.split(None, 2)) == 3, (key, line)  # option, default, comment
    assert "(needs `pip install tokenizers`)" in text and "\nmodel (model.py):\n" in text, text[:2000]


# ----------------------------------------------------------------------------------------- mask.py
def brute_force_mask(num_cond, clean_steps, noisy_steps, text_length=None, text_after=False, sees_noisy=False,
                     time_token=False, copies=1):
    """The mask's rules (paper Sec. 3, Fig. 6; Sec. 6 for text), one token pair at a time (a text in the cond slots
    if text_length);
    Table 1's time token (seen by noisy tokens, seeing cond tokens) and Table 7's copies of the noisy tokens."""
    kinds = (["cond"] * num_cond + ["time"] * time_token + ["clean"] * len(clean_steps) +
             ["noisy"] * (copies * len(noisy_steps)))
    steps = [-1] * (num_cond + time_token) + list(clean_steps) + list(noisy_steps) * copies
    copy = [-1] * (num_cond + time_token + len(clean_steps)) + [j for j in range(copies) for _ in noisy_steps]
    n = len(kinds)
    out = torch.zeros(n, n, dtype=torch.bool)
    for q in range(n):
        for k in range(n):
            if text_length is not None and kinds[q] == "cond":  # a text token: earlier text, maybe the image
                ok = k <= q if kinds[k] == "cond" else text_after and kinds[k] == ("noisy" if sees_noisy else "clean")
            elif text_length is not None and kinds[k] == "cond":  # an image token looking at the text
                ok = not text_after and k < text_length
            elif kinds[k] == "cond":
                ok = True
            elif kinds[k] == "time":
                ok = kinds[q] in ("time", "noisy")
            elif kinds[q] in ("cond", "time"):
                ok = False
            elif kinds[q] == "clean":
                ok = kinds[k] == "clean" and steps[k] <= steps[q]
            else:
                ok = (kinds[k] == "clean" and steps[k] < steps[q]) or (
                    kinds[k] == "noisy" and steps[k] == steps[q] and copy[k] == copy[q])
            out[q, k] = ok
    return out


def algorithm1_mask(sumk, num_cond):
    """The paper's Algorithm 1 (1 = blocked) for cumulative step sizes sumk = [0, c_1, ..., L], over
    [cond | clean tokens of steps 1..S-1 | all L noisy tokens], turned into our convention (True = may attend)."""
    Lx, L = sumk[-2], sumk[-1]
    m1, m2, m3 = torch.ones(Lx, Lx), torch.ones(L, Lx), torch.ones(L, L)
    for i in range(len(sumk) - 2):
        m1[sumk[i]:sumk[i + 1], 0:sumk[i + 1]] = 0
        m2[sumk[i + 1]:sumk[i + 2], 0:sumk[i + 1]] = 0
    for i in range(len(sumk) - 1):
        m3[sumk[i]:sumk[i + 1], sumk[i]:sumk[i + 1]] = 0
    blocked = torch.ones(Lx + L, Lx + L)
    blocked[:Lx, :Lx], blocked[Lx:, :Lx], blocked[Lx:, Lx:] = m1, m2, m3
    expected = torch.ones(num_cond + Lx + L, num_cond + Lx + L, dtype=torch.bool)
    expected[:num_cond, num_cond:] = False  # cond tokens see only cond tokens
    expected[num_cond:, num_cond:] = blocked == 0
    return expected


def test_mask_fig6_example():
    # paper Fig. 6 / Algorithm 1: steps of sizes 2, 2, 3; clean tokens of the first two steps only
    steps = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    got = mask.causal_mask(steps[None, :4], steps[None], num_prefix=1)[0]
    expected = algorithm1_mask([0, 2, 4, 7], 1)
    assert torch.equal(got, expected), f"\n{got.int()}\n{expected.int()}"
    print(mask.mask_to_ascii(got))


def test_mask_vs_brute_force():
    g = torch.Generator().manual_seed(0)
    for L in (1, 2, 5, 16):
        num_steps = mask.sample_num_steps(8, L, 0.9, g)
        steps = mask.sample_step_ids(num_steps, L, g)
        for static in (True, False):
            for b in range(8):
                noisy = steps[b]
                clean = noisy if static else noisy[noisy < num_steps[b] - 1]
                got = mask.causal_mask(clean[None], noisy[None], num_prefix=3)[0]
                assert torch.equal(got, brute_force_mask(3, clean.tolist(), noisy.tolist())), (L, b, static)


def test_mask_time_token_and_noisy_copies_vs_brute_force():
    g = torch.Generator().manual_seed(2)
    for L in (1, 5, 16):
        num_steps = mask.sample_num_steps(4, L, 0.9, g)
        steps = mask.sample_step_ids(num_steps, L, g)
        for time_token, copies in ((True, 1), (False, 3), (True, 2)):
            for clean_len in (L, 0):
                got = mask.causal_mask(steps[:, :clean_len], steps, 2, time_token=time_token, copies=copies)
                for b in range(4):
                    ref = brute_force_mask(2, steps[b, :clean_len].tolist(), steps[b].tolist(), time_token=time_token,
                                           copies=copies)
                    assert torch.equal(got[b], ref), (L, time_token, copies, clean_len, b)


def test_mask_with_text_vs_brute_force():
    g = torch.Generator().manual_seed(1)
    for L, Lt in ((1, 1), (5, 3), (16, 7)):
        num_steps = mask.sample_num_steps(6, L, 0.9, g)
        steps = mask.sample_step_ids(num_steps, L, g)
        lengths = torch.randint(1, Lt + 1, (6,), generator=g)
        after = torch.tensor([False, True] * 3)
        for clean_len in (L, 0):  # the static layout, and no clean tokens at all (single-step models)
            for noisy in (False, True):
                got = mask.causal_mask(steps[:, :clean_len], steps, Lt, lengths, after, text_sees_noisy=noisy)
                for b in range(6):
                    ref = brute_force_mask(Lt, steps[b, :clean_len].tolist(), steps[b].tolist(), int(lengths[b]),
                                           bool(after[b]), noisy)
                    assert torch.equal(got[b], ref), (L, Lt, b, clean_len, noisy)


def test_num_steps_distribution():
    g = torch.Generator().manual_seed(1)
    L, gamma, n = 6, 0.7, 200_000
    counts = torch.bincount(mask.sample_num_steps(n, L, gamma, g), minlength=L + 1)[1:].double() / n
    p = torch.tensor([gamma ** k for k in range(L)], dtype=torch.float64)
    assert torch.allclose(counts, p / p.sum(), atol=4e-3), (counts, p / p.sum())
    assert mask.sample_num_steps(100, L, 0.0, g).eq(1).all()
    assert mask.sample_num_steps(100, 1, 0.9, g).eq(1).all()


def test_split_is_uniform_composition():
    # with S steps, every one of the C(L-1, S-1) compositions of L is equally likely
    g = torch.Generator().manual_seed(2)
    L, S, n = 5, 3, 60_000
    steps = mask.sample_step_ids(torch.full((n,), S), L, g)
    assert steps.min() == 0 and steps.max() == S - 1 and (steps.diff(dim=1) >= 0).all()
    assert (steps.diff(dim=1).sum(1) == S - 1).all()  # every step is non-empty
    _, counts = torch.unique(steps, dim=0, return_counts=True)
    assert len(counts) == math.comb(L - 1, S - 1)
    assert (counts.double() / n - 1 / len(counts)).abs().max() < 0.01


def test_token_orders():
    g = torch.Generator().manual_seed(3)
    for kind in ("random", "raster", "block_raster"):
        order = mask.token_order(4, 4, 4, kind, g, block=2)
        assert torch.equal(order.sort(dim=1).values, torch.arange(16).expand(4, 16)), kind
    assert torch.equal(mask.token_order(1, 4, 4, "raster", g)[0], torch.arange(16))
    block = mask.token_order(1, 4, 4, "block_raster", g, block=2)[0]
    assert block[:4].tolist() == [0, 1, 4, 5] and block[4:8].tolist() == [2, 3, 6, 7]
    rnd = mask.token_order(64, 4, 4, "random", g)
    assert len({tuple(r) for r in rnd.tolist()}) > 60  # a different order per sample


def test_ar_weights():
    steps = torch.tensor([[0, 0, 1, 1, 2, 2, 2, 2]])
    w = mask.ar_weights(steps, lam=2.0)
    assert torch.allclose(w, torch.tensor([[2, 2, 1.75, 1.75, 1.5, 1.5, 1.5, 1.5]]))
    assert torch.allclose(mask.ar_weights(steps, lam=1.0), torch.ones(1, 8))


# ---------------------------------------------------------------------------------------- model.py
def test_patchify_roundtrip():
    x = torch.randn(2, 4, 8, 6)
    tokens = patchify(x, 2)
    assert tokens.shape == (2, 12, 16)
    assert torch.equal(unpatchify(tokens, 2, 8, 6), x)
    # channels-last inside a token (as the authors' patchify): token 0 = x[:, :, :2, :2] as (p, p, C)
    assert torch.equal(tokens[:, 0], x[:, :, :2, :2].permute(0, 2, 3, 1).reshape(2, -1))


def _training_inputs(model, n, num_steps, g):
    L = model.num_tokens
    clean = torch.randn(n, L, model.token_dim, generator=g)
    noisy = torch.randn(n, L, model.token_dim, generator=g)
    order = mask.token_order(n, model.grid_size, model.grid_size, "random", g)
    steps = mask.sample_step_ids(num_steps, L, g)
    t = torch.randint(0, 1000, (n,), generator=g)
    y = torch.randint(0, max(model.num_classes, 1), (n,), generator=g)  # (unused by a text model)
    return clean, noisy, order, steps, t, y


def _check_cache_matches_forward(model, split_sizes, cfg=False):
    """AR inference through the KV cache gives the training forward's eps (float32 tolerance)."""
    g = torch.Generator().manual_seed(4)
    n, L = 3, model.num_tokens
    S = len(split_sizes)
    clean, noisy, order, _, t, y = _training_inputs(model, n, torch.full((n,), S), g)
    steps = torch.repeat_interleave(torch.arange(S), torch.tensor(split_sizes)).expand(n, L)
    with torch.no_grad():
        attn = mask.causal_mask(steps, steps, model.num_prefix_tokens, time_token=model.time_token)
        ref = model(clean, noisy, t, y, order, attn)  # (N, L, P)
        batch = 2 * n if cfg else n
        labels = torch.cat([y, torch.full_like(y, model.num_classes)]) if cfg else y
        rep = (lambda a: torch.cat([a, a])) if cfg else (lambda a: a)
        cache = model.new_cache(batch)
        model.prefill(cache, labels)
        start, got = 0, []
        for size in split_sizes:
            sl = slice(start, start + size)
            eps = model.denoise(cache, rep(noisy[:, sl]), rep(t), rep(order[:, sl]))
            got.append(eps[:n])
            model.extend(cache, rep(clean[:, sl]), rep(order[:, sl]))
            start += size
        got = torch.cat(got, dim=1)
    err = (got - ref).abs().max().item()
    assert err < 1e-5 * max(1.0, ref.abs().max().item()), (split_sizes, err)


def test_kv_cache_matches_forward_diffusion_mode():
    _check_cache_matches_forward(tiny_model(), [16])


def test_kv_cache_matches_forward_ar_mode():
    model = tiny_model()
    for sizes in ([8, 8], [3, 5, 1, 7], [1] * 16):
        _check_cache_matches_forward(model, sizes)
    _check_cache_matches_forward(model, [5, 11], cfg=True)


def test_kv_cache_repeated_class_tokens_and_learned_pos():
    _check_cache_matches_forward(tiny_model(num_cond_tokens=8, cond_repeat=4, learn_pos=True), [6, 10])


def test_time_token_and_no_qk_norm_ablations():
    # Table 1: the time step as a token of its own, [cond | time | clean | noisy]; the cached path equals the
    # forward (so the clean tokens, cached once, do not depend on t) and t reaches the eps through that token
    model = tiny_model(time_token=True)
    for sizes, cfg in (([16], False), ([3, 5, 1, 7], False), ([5, 11], True)):
        _check_cache_matches_forward(model, sizes, cfg)
    g = torch.Generator().manual_seed(3)
    clean, noisy, order, steps, t, y = _training_inputs(model, 2, torch.tensor([1, 3]), g)
    lengths = []
    hook = model.blocks[0].register_forward_pre_hook(lambda m, args: lengths.append(args[0].shape[1]))
    with torch.no_grad():
        attn = mask.causal_mask(steps, steps, 4, time_token=True)
        eps = model(clean, noisy, t, y, order, attn)
        eps_other_t = model(clean, noisy, t + 100, y, order, attn)
    hook.remove()
    assert attn.shape == (2, 4 + 1 + 32, 37) and lengths == [37, 37] and eps.shape == noisy.shape
    assert (eps - eps_other_t).abs().max() > 1e-4
    assert model.config["time_token"] and "time_token" not in tiny_model().config  # old configs stay as they were
    with pytest.raises(ValueError, match="time_token .*class-conditional"):  # the model refuses it with text
        tiny_model(time_token=True, text_vocab=300, text_len=8)
    # QK LayerNorm off: no q_norm / k_norm parameters; the cache still equals the forward
    plain = tiny_model(qk_norm=False)
    assert not [k for k in plain.state_dict() if "q_norm" in k or "k_norm" in k]
    _check_cache_matches_forward(plain, [6, 10])


def test_init_is_the_authors():
    # xavier_uniform on every Linear, the timestep MLP's too (the authors' _basic_init), zero biases, zero head
    torch.manual_seed(0)
    model = CausalFusion(size="T", input_size=8, patch_size=2, in_channels=4, num_classes=10)
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name != "final_layer.1":
            bound = math.sqrt(6 / (m.in_features + m.out_features))
            assert m.weight.abs().max() <= bound and m.weight.std() > 0.9 * bound / math.sqrt(3), name
            assert m.bias is None or not m.bias.any(), name
    assert not model.final_layer[1].weight.any()


def tiny_text_model(**kw):
    return tiny_model(num_classes=0, text_vocab=40, text_len=6, **kw)


def _text_inputs(model, n, g):
    text = torch.randint(0, model.text_vocab, (n, model.num_prefix_tokens), generator=g)
    return text, torch.randint(1, model.num_prefix_tokens + 1, (n,), generator=g)


def test_kv_cache_text_to_image_matches_forward():
    """Text-to-image AR inference through the cache (texts of any length, and the no-text CFG branch) gives the
    training forward's eps, with the text first (conditional) or the image first (unconditional)."""
    model = tiny_text_model()
    g = torch.Generator().manual_seed(6)
    n, L, sizes = 4, model.num_tokens, [5, 11]
    clean, noisy, order, _, t, _ = _training_inputs(model, n, torch.full((n,), 2), g)
    text, lengths = _text_inputs(model, n, g)
    steps = mask.step_ids_from_sizes(sizes).expand(n, L)
    with torch.no_grad():
        ref = {}
        for after in (False, True):
            attn = mask.causal_mask(steps, steps, model.num_prefix_tokens, lengths, torch.full((n,), after))
            ref[after] = model(clean, noisy, t, None, order, attn, text=text)[0]
        assert (ref[False] - ref[True]).abs().max() > 1e-3  # the text matters
        rep = lambda a: torch.cat([a, a])
        cache = model.new_cache(2 * n)
        model.prefill_text(cache, rep(text), torch.cat([lengths, torch.zeros_like(lengths)]))
        start, got = 0, []
        for size in sizes:
            sl = slice(start, start + size)
            got.append(model.denoise(cache, rep(noisy[:, sl]), rep(t), rep(order[:, sl])))
            model.extend(cache, rep(clean[:, sl]), rep(order[:, sl]))
            start += size
        got = torch.cat(got, 1)
    for after, half in ((False, got[:n]), (True, got[n:])):
        assert (half - ref[after]).abs().max() < 1e-5 * max(1.0, ref[after].abs().max().item()), after


def test_cached_text_decoding_matches_forward_logits():
    """Captioning: the clean image enters the cache once, then the text one token at a time (and a few at a time)
    gives the training forward's next-token logits, image first; Transfusion reads the image as noisy at t = 0."""
    for sees_noisy in (False, True):
        model = tiny_text_model(text_sees_noisy=sees_noisy)
        torch.nn.init.normal_(model.text_head[1].weight, std=0.5)
        g = torch.Generator().manual_seed(7)
        n, L = 3, model.num_tokens
        clean, _, order, _, _, _ = _training_inputs(model, n, torch.ones(n, dtype=torch.long), g)
        text, _ = _text_inputs(model, n, g)
        Lt = text.shape[1]
        steps = torch.zeros(n, L, dtype=torch.long)  # one AR step: every clean token sees every other
        t0 = torch.zeros(n, dtype=torch.long)
        with torch.no_grad():
            attn = mask.causal_mask(steps, steps, Lt, torch.full((n,), Lt), torch.ones(n, dtype=torch.bool),
                                    text_sees_noisy=sees_noisy)
            noisy = clean if sees_noisy else torch.randn(clean.shape, generator=g)
            ref = model(clean, noisy, t0, None, order, attn, text=text)[1]  # (N, Lt, V)
            for chunks in ([1] * Lt, [2, Lt - 2]):
                cache = model.new_cache(n, L + Lt)
                model.extend(cache, clean, order, t0 if sees_noisy else None)
                got, start = [], 0
                for k in chunks:
                    got.append(model.next_token_logits(cache, text[:, start:start + k], start))
                    start += k
                got = torch.cat(got, 1)
                assert (got - ref).abs().max() < 1e-5 * max(1.0, ref.abs().max().item()), (sees_noisy, chunks)


def test_paper_layout_equals_static_layout():
    # the static layout (all L clean tokens, the last step's masked out) gives the authors' variable-length
    # layout's predictions
    model = tiny_model()
    g = torch.Generator().manual_seed(5)
    clean, noisy, order, _, t, y = _training_inputs(model, 1, torch.tensor([3]), g)
    steps = torch.tensor([[0] * 5 + [1] * 4 + [2] * 7])
    with torch.no_grad():
        static = model(clean, noisy, t, y, order, mask.causal_mask(steps, steps, 4))
        keep = 9  # clean tokens of steps 1..S-1
        short = model(clean[:, :keep], noisy, t, y, order, mask.causal_mask(steps[:, :keep], steps, 4),
                      clean_pos=order[:, :keep])
    assert torch.allclose(static, short, atol=1e-5)


def _authors_state_dict(depth, hidden, heads, patch, channels, grid, num_cond, num_classes, g):
    """Random weights in the authors' key layout and shapes (their released checkpoints), written out by hand."""
    P, D, hd = patch * patch * channels, hidden, hidden // heads
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.05
    sd = {"x_proj.weight": r(D, P), "x_proj.bias": r(D),
          "t_embedder.mlp.0.weight": r(D, 256), "t_embedder.mlp.0.bias": r(D),
          "t_embedder.mlp.2.weight": r(D, D), "t_embedder.mlp.2.bias": r(D),
          "y_embedder.embedding_table.weight": r(num_classes + 1, D * num_cond),
          "pos_embed": r(1, grid * grid, D), "cond_pos_embed": r(1, num_cond, D)}
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update({b + "norm1.weight": 1 + r(D), b + "norm1.bias": r(D), b + "attn.qkv.weight": r(3 * D, D),
                   b + "attn.proj.weight": r(D, D), b + "attn.proj.bias": r(D),
                   b + "attn.q_norm.weight": 1 + r(hd), b + "attn.q_norm.bias": r(hd),
                   b + "attn.k_norm.weight": 1 + r(hd), b + "attn.k_norm.bias": r(hd),
                   b + "norm2.weight": 1 + r(D), b + "norm2.bias": r(D),
                   b + "mlp.fc1.weight": r(4 * D, D), b + "mlp.fc1.bias": r(4 * D),
                   b + "mlp.fc2.weight": r(D, 4 * D), b + "mlp.fc2.bias": r(D)})
    sd.update({"final_layer.0.weight": 1 + r(D), "final_layer.0.bias": r(D),
               "final_layer.1.weight": r(P, D), "final_layer.1.bias": r(P)})
    return sd


def test_authors_state_dict_loads_and_matches():
    g = torch.Generator().manual_seed(6)
    sd = _authors_state_dict(depth=2, hidden=64, heads=4, patch=1, channels=16, grid=4, num_cond=4,
                             num_classes=10, g=g)
    model = CausalFusion(depth=2, hidden_size=64, num_heads=4, input_size=4, patch_size=1, in_channels=16,
                         num_classes=10, num_cond_tokens=4, learn_pos=True).eval()
    model.load_state_dict(sd, strict=True)
    # same predictions as a direct re-computation from the raw tensors (independent of model.py's modules)
    n, L, D, H = 2, 16, 64, 4
    clean, noisy, order, steps, t, y = _training_inputs(model, n, torch.tensor([2, 3]), g)
    attn = mask.causal_mask(steps, steps, 4)
    with torch.no_grad():
        got = model(clean, noisy, t, y, order, attn)
        F = torch.nn.functional
        lin = lambda x, k, bias=True: F.linear(x, sd[k + ".weight"], sd[k + ".bias"] if bias else None)
        ln = lambda x, k, eps: F.layer_norm(x, x.shape[-1:], sd[k + ".weight"], sd[k + ".bias"], eps)
        freqs = torch.exp(-math.log(10000) * torch.arange(128) / 128)
        args = t[:, None].float() * freqs[None]
        temb = lin(F.silu(lin(torch.cat([args.cos(), args.sin()], -1), "t_embedder.mlp.0")), "t_embedder.mlp.2")
        pos = sd["pos_embed"][0][order]
        cond = sd["y_embedder.embedding_table.weight"][y].view(n, 4, D) + sd["cond_pos_embed"]
        x = torch.cat([cond, lin(clean, "x_proj") + pos, lin(noisy, "x_proj") + pos + temb[:, None]], 1)
        for i in range(2):
            b = f"blocks.{i}."
            h = ln(x, b + "norm1", 1e-5)
            q, k, v = lin(h, b + "attn.qkv", bias=False).view(n, -1, 3, H, D // H).permute(2, 0, 3, 1, 4)
            q, k = ln(q, b + "attn.q_norm", 1e-5), ln(k, b + "attn.k_norm", 1e-5)
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(D // H)
            scores = scores.masked_fill(~attn[:, None], float("-inf")).softmax(-1)
            x = x + lin((scores @ v).transpose(1, 2).reshape(n, -1, D), b + "attn.proj")
            x = x + lin(F.gelu(lin(ln(x, b + "norm2", 1e-5), b + "mlp.fc1"), approximate="tanh"), b + "mlp.fc2")
        ref = lin(ln(x[:, -L:], "final_layer.0", 1e-5), "final_layer.1")
    assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()
    assert set(model.state_dict()) == set(sd)


def test_model_sizes_and_params():
    # paper Sec. 6: L with 64 cond tokens is ~368M parameters (counted on the meta device, no memory)
    with torch.device("meta"):
        base = CausalFusion(size="L", input_size=32, patch_size=2, in_channels=4, num_cond_tokens=64)
        rep = CausalFusion(size="L", input_size=32, patch_size=2, in_channels=4, num_cond_tokens=64, cond_repeat=16)
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert abs(count(base) - 368e6) / 368e6 < 0.01, count(base)
    # App. B: 4 unique tokens repeated 16x cost ~3.9M (2^20) table parameters instead of ~62.5M
    table = lambda m: m.y_embedder.embedding_table.weight.numel()
    assert table(base) == 1001 * 64 * 1024 and table(rep) == 1001 * 4 * 1024
    assert abs(table(rep) / 2 ** 20 - 3.9) < 0.05 and abs(table(base) / 2 ** 20 - 62.5) < 0.1


def test_bf16_autocast_forward_backward():
    model = tiny_model().train()
    g = torch.Generator().manual_seed(7)
    clean, noisy, order, steps, t, y = _training_inputs(model, 2, torch.tensor([1, 4]), g)
    attn = mask.causal_mask(steps, steps, model.num_prefix_tokens)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(clean, noisy, t, y, order, attn)
    ref = model(clean, noisy, t, y, order, attn)
    out.float().square().mean().backward()
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max() + 1e-3
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_fast_and_reference_attention_paths_agree():
    # bench.py's two paths: SDPA's fused kernel (the default) and its math backend give the same loss and grads
    from torch.nn.attention import SDPBackend, sdpa_kernel
    model = tiny_model().train()
    g = torch.Generator().manual_seed(10)
    clean, noise, order, steps, t, y = _training_inputs(model, 4, torch.tensor([1, 2, 5, 16]), g)
    kwargs = dict(y=y, pos=order, attn_mask=mask.causal_mask(steps, steps, model.num_prefix_tokens))
    results = []
    for kernels in (lambda: sdpa_kernel([SDPBackend.MATH]), contextlib.nullcontext):
        model.zero_grad()
        with kernels():
            o = diffusion.Objective()
            pred = model(clean, o.q_sample(clean, t, noise), o.model_time(t), **kwargs)
            loss = o.loss(pred, clean, noise, t, mask.ar_weights(steps, 2.0))
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (ref_loss, ref_grads), (fast_loss, fast_grads) = results
    assert abs(ref_loss - fast_loss) < 1e-6 * ref_loss
    for a, b in zip(ref_grads, fast_grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), (a - b).abs().max()


def test_bench_runs_both_benchmarks():
    # bench.py end to end on a tiny shape: both training paths and every (sampler, scale, S) sampling run, S = L too
    from benchmarks import bench
    report = bench.main(["--input-size", "8", "--batch-size", "4", "--repeats", "1", "--warmup", "1",
                         "--sample-repeats", "1", "--steps", "2", "--ar-steps", "1", "4", "0", "--samplers", "dpm++:3"])
    assert set(report["train"]) == {"reference", "fast"}
    for r in report["train"].values():
        assert r["steps_per_s"] > 0 and math.isclose(r["images_per_s"], 4 * r["steps_per_s"])
        assert math.isclose(r["tokens_per_s"], 16 * r["images_per_s"])  # 8x8 latents, 2x2 patches: 16 tokens
    assert list(report["sample"]) == [f"{name} cfg {c} S={s}" for name in ("ddpm-2", "dpm++-3") for c in ("1", "1.5")
                                      for s in (1, 4, 16)]
    for run, r in report["sample"].items():
        assert math.isclose(r["images_per_s"] * r["seconds"], 4) and (r["vs_S1"] == 1) == run.endswith("S=1")
    # the text-segment benchmark: train.py's step with and without a text
    report = bench.main(["--what", "text", "--input-size", "8", "--batch-size", "4", "--repeats", "1", "--warmup",
                         "1", "--text-len", "6", "--text-vocab", "300"])
    assert set(report) == {"text"} and set(report["text"]) == {"class", "text"}
    assert all(r["steps_per_s"] > 0 for r in report["text"].values())


# ------------------------------------------------------------------------------------ diffusion.py
def test_respaced_schedule_matches_direct_computation():
    d = diffusion.Sampler(steps=250)
    # ADM's space_timesteps(1000, "250"): round(i * 999 / 249)
    expected = [round(i * 999 / 249) for i in range(250)]
    assert d.timesteps.tolist() == expected
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    full_acp = torch.cumprod(1 - betas, 0)
    acp = d.objective.alphas_cumprod[d.timesteps]
    assert torch.allclose(acp, full_acp[expected])  # same marginals at the kept steps
    # respaced betas reproduce those marginals step by step
    d_betas, variance, _, _ = diffusion.ddpm_posterior(acp)
    assert torch.allclose(torch.cumprod(1 - d_betas, 0), full_acp[expected])
    # fixed "large" variance: posterior variance at step 1, then betas
    acp_prev = torch.cat([torch.ones(1, dtype=torch.float64), acp[:-1]])
    post_var = d_betas * (1 - acp_prev) / (1 - acp)
    assert torch.allclose(variance, torch.cat([post_var[1:2], d_betas[1:]]))
    full = diffusion.Sampler(steps=1000)
    full_betas = diffusion.ddpm_posterior(full.objective.alphas_cumprod[full.timesteps])[0]
    assert full.timesteps.tolist() == list(range(1000)) and torch.allclose(full_betas, betas)


def adm_space_timesteps(num_timesteps, section_counts):
    """openai/guided-diffusion respace.py space_timesteps, transcribed (integer section counts)."""
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start_idx, all_steps = 0, []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        cur_idx, taken_steps = 0.0, []
        for _ in range(section_count):
            taken_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        all_steps += taken_steps
        start_idx += size
    return set(all_steps)


def test_respacing_is_adms_for_every_number_of_steps():
    for n in range(1, 1001):
        d = diffusion.Sampler(steps=n)
        assert d.timesteps.tolist() == sorted(adm_space_timesteps(1000, [n])), n
        assert len(d.coefs) == n
    # one DDPM step (N = 1) maps noise straight to the x0 prediction at t = 0
    d, x, eps = diffusion.Sampler(steps=1), torch.randn(3, 4), torch.randn(3, 4)
    acp = d.objective.alphas_cumprod[0].float()
    assert torch.allclose(d.step(x, eps, 0, None, None)[0], (x - (1 - acp).sqrt() * eps) / acp.sqrt(), atol=1e-5)


def test_q_sample_and_posterior():
    d = diffusion.Sampler(steps=1000)
    g = torch.Generator().manual_seed(8)
    x0, noise = torch.randn(2, 5, 3, generator=g), torch.randn(2, 5, 3, generator=g)
    t = torch.tensor([0, 999])
    xt = d.objective.q_sample(x0, t, noise)
    acp = d.objective.alphas_cumprod[t].float()[:, None, None]
    assert torch.allclose(xt, acp.sqrt() * x0 + (1 - acp).sqrt() * noise)
    per_token_t = torch.tensor([[0, 1, 2, 3, 4], [999, 998, 10, 500, 0]])
    _, variance, coef_x0, coef_xt = diffusion.ddpm_posterior(d.objective.alphas_cumprod[d.timesteps])
    xt2 = d.objective.q_sample(x0, per_token_t, noise)
    acp2 = d.objective.alphas_cumprod[per_token_t].float()[..., None]
    assert torch.allclose(xt2, acp2.sqrt() * x0 + (1 - acp2).sqrt() * noise)
    # one ancestral step with the true noise: the posterior mean of q(x_{t-1} | x_t, x_0) plus sigma_t z
    for i in (0, 1, 700, 999):
        xt = d.objective.q_sample(x0, torch.full((2,), int(d.timesteps[i])), noise)
        z = torch.randn(xt.shape, generator=torch.Generator().manual_seed(i)) if i else 0
        expected = coef_x0[i] * x0 + coef_xt[i] * xt + variance[i].sqrt() * z
        step = d.step(xt, noise, i, None, torch.Generator().manual_seed(i))[0]
        assert torch.allclose(step, expected.float(), atol=1e-4), i


def test_cfg_scale_one_is_conditional():
    d = diffusion.Sampler(steps=10)

    def pair_fn(x, t):  # a doubled batch [cond; uncond] whose halves predict differently
        half = x.shape[0] // 2
        return torch.cat([torch.sin(x[:half] + t / 500), torch.cos(x[half:])])

    cond_fn = lambda x, t: torch.sin(x + t / 500)
    x = torch.randn(3, 4, 2, generator=torch.Generator().manual_seed(0))
    plain = d.sample(cond_fn, x, generator=torch.Generator().manual_seed(1))
    # scale 1: no doubled batch, the conditional prediction
    assert torch.equal(d.sample(cond_fn, x, torch.Generator().manual_seed(1), cfg_scale=1.0), plain)
    # scale 4 with an interval that holds none of the 10 respaced timesteps: the conditional prediction too
    gaps = d.sample(pair_fn, x, torch.Generator().manual_seed(1), cfg_scale=4.0, cfg_interval=(1, 111))
    assert d.timesteps.tolist()[:2] == [0, 111] and torch.equal(gaps, plain)
    guided = d.sample(pair_fn, x, torch.Generator().manual_seed(1), cfg_scale=4.0)
    assert (guided - plain).abs().max() > 1e-2  # and guidance inside the interval does change the samples
    # guidance outside the interval is the conditional prediction; inside it is eps_u + s (eps_c - eps_u)
    ec, eu = torch.randn(2, 3), torch.randn(2, 3)
    assert torch.equal(d.guide(torch.cat([ec, eu]), 10, 4.0, (0, 1000)), eu + 4 * (ec - eu))
    assert torch.equal(d.guide(torch.cat([ec, eu]), 10, 4.0, (100, 800)), ec)
    assert torch.equal(d.guide(torch.cat([ec, eu]), 10, 1.0, (0, 1000)), ec)


def test_sampler_recovers_a_point_mass():
    # with the exact eps of a point-mass data distribution, DDPM sampling lands on that point
    d = diffusion.Sampler(steps=50)
    target = torch.tensor([[0.5, -1.0, 2.0]])

    def eps_fn(x, t):
        acp = d.objective.alphas_cumprod[t].float()
        return (x - acp.sqrt() * target) / (1 - acp).sqrt()

    x = torch.randn(4, 1, 3, generator=torch.Generator().manual_seed(0))
    out = d.sample(eps_fn, x, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(out, target.expand_as(out), atol=1e-3), out


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = CausalFusion(size="T", input_size=8, patch_size=2, in_channels=4, num_classes=10, num_cond_tokens=4)
    d = diffusion.Objective()
    g = torch.Generator().manual_seed(9)
    x0 = patchify(torch.randn(8, 4, 8, 8, generator=g), 2)
    y = torch.arange(8) % 10
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    order = mask.token_order(8, 4, 4, "random", g)
    steps = mask.sample_step_ids(mask.sample_num_steps(8, 16, 0.9, g), 16, g)
    t, noise = torch.randint(0, 1000, (8,), generator=g), torch.randn(x0.shape, generator=g)
    clean = x0.gather(1, order[..., None].expand_as(x0))
    losses = []
    for _ in range(150):
        pred = model(clean, d.q_sample(clean, t, noise), d.model_time(t), y=y, pos=order,
                     attn_mask=mask.causal_mask(steps, steps, 4))
        loss = d.loss(pred, clean, noise, t, mask.ar_weights(steps, 2.0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], (losses[0], losses[-1])
