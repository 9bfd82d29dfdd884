"""AR splits, token orders, the generalized causal mask and the AR loss weights (paper Sec. 3-5, App. A-B).

Pure functions on tensors; every random draw goes through the torch.Generator passed in.
A "step id" tensor (N, L) gives, for each position in the AR order of a sample, its AR step (0-based,
non-decreasing): tokens 0..c_1-1 are step 0, tokens c_1..c_2-1 step 1, and so on.
"""
import torch

# the kinds of token in the sequence [prefix | time | clean | noisy] (causal_mask)
PREFIX, CLEAN, NOISY, TIME = 0, 1, 2, 3  # prefix: the class tokens, or a text's slots


def sample_num_steps(n, num_tokens, gamma, generator):
    """Number of AR steps S in 1..L for n samples, P(S = k) proportional to gamma^(k-1) (paper Sec. 5, Table 3a).

    gamma = 1 is uniform; gamma = 0 always gives S = 1 (the in-context DiT baseline)."""
    k = torch.arange(num_tokens, dtype=torch.float64)
    probs = torch.where(k == 0, 1.0, torch.tensor(float(gamma), dtype=torch.float64) ** k)
    return torch.multinomial(probs, n, replacement=True, generator=generator) + 1  # (n,)


def sample_step_ids(num_steps, num_tokens, generator):
    """Random split of L tokens into S[i] non-empty steps: S-1 distinct cut points drawn uniformly from 1..L-1.

    Returns step ids (N, L). Vectorized over samples with different S: the cut points are the S-1 positions
    of lowest rank in a random permutation of the L-1 candidates, which is a uniform (S-1)-subset."""
    n = num_steps.shape[0]
    ranks = torch.rand(n, num_tokens - 1, generator=generator).argsort(1).argsort(1)  # (N, L-1)
    cuts = ranks < (num_steps[:, None] - 1)  # cut before position j+1
    zero = torch.zeros(n, 1, dtype=torch.long)
    return torch.cat([zero, cuts.long().cumsum(1)], dim=1)  # (N, L)


def step_ids_from_sizes(sizes):
    """Step ids (L,) of consecutive steps with the given sizes, e.g. [2, 2, 3] -> [0, 0, 1, 1, 2, 2, 2]."""
    sizes = torch.as_tensor(sizes)
    return torch.repeat_interleave(torch.arange(len(sizes)), sizes)


def equal_split(num_steps, num_tokens):
    """Step sizes as equal as possible (the larger ones first), e.g. (3, 7) -> [3, 2, 2]."""
    if not 1 <= num_steps <= num_tokens:
        raise ValueError(f"number of AR steps must be in 1..{num_tokens}, got {num_steps}")
    base, extra = divmod(num_tokens, num_steps)
    return [base + (i < extra) for i in range(num_steps)]


def random_split(num_steps, num_tokens, generator):
    """Step sizes of one uniformly random composition of L into S parts."""
    equal_split(num_steps, num_tokens)  # validates
    steps = sample_step_ids(torch.tensor([num_steps]), num_tokens, generator)[0]
    return torch.bincount(steps, minlength=num_steps).tolist()


def token_order(n, height, width, kind, generator, block=2):
    """AR order of the H*W image positions for n samples: (N, L) permutations of 0..L-1.

    random: a new permutation per sample (the paper's default); raster: row by row; block_raster: blocks of
    block x block tokens in raster order, raster inside each block (the paper's Table 3b ablation)."""
    L = height * width
    if kind == "random":
        return torch.rand(n, L, generator=generator).argsort(1)
    if kind == "raster":
        order = torch.arange(L)
    elif kind == "block_raster":
        if height % block or width % block:
            raise ValueError(f"block_raster needs a grid divisible by block={block}, got {height}x{width}")
        grid = torch.arange(L).view(height // block, block, width // block, block)  # (Hb, b, Wb, b)
        order = grid.permute(0, 2, 1, 3).reshape(L)  # (Hb, Wb, b, b) -> (L,)
    else:
        raise ValueError(f"token order must be random, raster or block_raster, got {kind!r}")
    return order.expand(n, L).clone()


def causal_mask(clean_steps, noisy_steps, num_prefix, text_lengths=None, text_after=None, text_sees_noisy=False,
                time_token=False, copies=1):
    """Generalized causal mask (True = may attend) for the sequence [prefix | clean | noisy].

    clean_steps (N, Lx), noisy_steps (N, L): the AR step of each clean and noisy token; num_prefix: the tokens
    before the image (class tokens, or a text's slots). The rules (paper Sec. 3, Fig. 6; the authors' mask):
    all tokens see the prefix; the prefix sees only itself; clean of step s sees clean of steps <= s; noisy of
    step s sees clean of steps < s and noisy of step s. The authors' layout has only the clean tokens of steps 1..S-1;
    the static training layout passes all L (those of the last step are then seen by no noisy token).
    Example (paper Fig. 6), one cond token c, steps of sizes 2, 2, 3, clean tokens of the first two steps:

           c 0 0 1 1 0 0 1 1 2 2 2      <- keys: cond, clean (step), noisy (step)
        c  x . . . . . . . . . . .
        0  x x x . . . . . . . . .
        0  x x x . . . . . . . . .
        1  x x x x x . . . . . . .
        1  x x x x x . . . . . . .
        0  x . . . . x x . . . . .
        0  x . . . . x x . . . . .
        1  x x x . . . . x x . . .
        1  x x x . . . . x x . . .
        2  x x x x x . . . . x x x
        2  x x x x x . . . . x x x
        2  x x x x x . . . . x x x

    Text (paper Sec. 6): with text_lengths (N,) the prefix is a text of num_prefix slots, the first
    text_lengths of them real ([bos, ..., eos]) and the rest padding that no other token sees. Text is causal.
    text_after (N,) bool picks each sample's order: False = text first (text-to-image: every image token sees
    the real text, the text sees no image), True = image first (captioning: the image sees no text, which makes
    its loss the unconditional one of CFG; the text sees every clean image token, or with text_sees_noisy
    every noisy one, as in Transfusion). Example: 3 text slots (2 real: t t, 1 pad: p), steps of sizes 1, 2,
    all clean tokens; text first on the left, image first on the right:

           t t p 0 1 1 0 1 1                   t t p 0 1 1 0 1 1
        t  x . . . . . . . .                t  x . . x x x . . .
        t  x x . . . . . . .                t  x x . x x x . . .
        p  x x x . . . . . .                p  x x x x x x . . .
        0  x x . x . . . . .                0  . . . x . . . . .
        1  x x . x x x . . .                1  . . . x x x . . .
        1  x x . x x x . . .                1  . . . x x x . . .
        0  x x . . . . x . .                0  . . . . . . x . .
        1  x x . x . . . x x                1  . . . x . . . x x
        1  x x . x . . . x x                1  . . . x . . . x x
    Two ablations of the class-conditional model (with text, model.py and train.py refuse them).
    time_token (Table 1): one token T after the cond tokens carries the timestep; it sees the cond tokens and
    itself, and only noisy tokens see it (clean tokens stay
    independent of t, so they can be cached). copies = K (Table 7's "K x t per AR step"): the noisy segment
    holds K copies of the L noisy tokens (same steps, each copy noised at its own t); a noisy token sees the
    clean tokens of earlier steps and the tokens of its own step in its own copy. Example: one cond token,
    steps of sizes 1, 2, all clean tokens, the time token on the left, 2 copies on the right:

           c T 0 1 1 0 1 1                   c 0 1 1 0 1 1 0 1 1
        c  x . . . . . . .                c  x . . . . . . . . .
        T  x x . . . . . .                0  x x . . . . . . . .
        0  x . x . . . . .                1  x x x x . . . . . .
        1  x . x x x . . .                1  x x x x . . . . . .
        1  x . x x x . . .                0  x . . . x . . . . .
        0  x x . . . x . .                1  x x . . . x x . . .
        1  x x x . . . x x                1  x x . . . x x . . .
        1  x x x . . . x x                0  x . . . . . . x . .
                                          1  x x . . . . . . x x
                                          1  x x . . . . . . x x
    Returns (N, Lc + Lx + L, Lc + Lx + L) bool (with the time token and K copies: Lc + 1 + Lx + K L)."""
    n, device, L = noisy_steps.shape[0], noisy_steps.device, noisy_steps.shape[1]
    Lx, nt = clean_steps.shape[1], int(time_token)
    none = noisy_steps.new_full((n, num_prefix + nt), -1)  # the prefix and the time token belong to no step
    step = torch.cat([none, clean_steps, noisy_steps.repeat(1, copies)], 1)  # (N, T)
    kind = torch.cat([torch.full((num_prefix,), PREFIX), torch.full((nt,), TIME), torch.full((Lx,), CLEAN),
                      torch.full((copies * L,), NOISY)]).to(device)  # (T,)
    # copy: which copy of the noisy tokens (-1: not a noisy token)
    copy = torch.cat([torch.full((num_prefix + nt + Lx,), -1), torch.arange(copies).repeat_interleave(L)]).to(device)
    q_step, k_step = step[:, :, None], step[:, None, :]  # (N, T, 1), (N, 1, T)
    q_kind, k_kind = kind[None, :, None], kind[None, None, :]  # (1, T, 1), (1, 1, T)
    clean_key = (k_kind == CLEAN) & (((q_kind == CLEAN) & (k_step <= q_step)) | ((q_kind == NOISY) & (k_step < q_step)))
    same_copy = (copy[:, None] == copy[None, :])[None]  # (1, T, T)
    noisy_key = (k_kind == NOISY) & (q_kind == NOISY) & (k_step == q_step) & same_copy
    time_key = (k_kind == TIME) & ((q_kind == NOISY) | (q_kind == TIME))  # seen by the noisy tokens and by itself
    if text_lengths is None:
        return (k_kind == PREFIX) | clean_key | noisy_key | time_key  # (N, T, T)
    index = torch.arange(len(kind), device=device)
    q_index, k_index = index[None, :, None], index[None, None, :]  # (1, T, 1), (1, 1, T)
    after = text_after.to(device)[:, None, None]  # (N, 1, 1)
    text_causal = (q_kind == PREFIX) & (k_kind == PREFIX) & (k_index <= q_index)
    real_text = k_index < text_lengths.to(device)[:, None, None]  # (N, 1, T): padding is seen by no other token
    image_sees_text = (q_kind != PREFIX) & (k_kind == PREFIX) & real_text & ~after
    text_sees_image = (q_kind == PREFIX) & (k_kind == (NOISY if text_sees_noisy else CLEAN)) & after
    return text_causal | image_sees_text | text_sees_image | clean_key | noisy_key  # (N, T, T)


def ar_weights(step_ids, lam):
    """Loss weight per token, lam at the first AR step decaying linearly towards 1 (paper Sec. 5, Table 3c):
    w = lam - (lam - 1) * c_{s-1} / L, with c_{s-1} the number of tokens in the steps before s. (N, L)."""
    n, L = step_ids.shape
    position = torch.arange(L, device=step_ids.device).expand(n, L)
    is_first = torch.cat([torch.ones(n, 1, dtype=torch.bool, device=step_ids.device),
                          step_ids[:, 1:] != step_ids[:, :-1]], 1)
    step_start = torch.where(is_first, position, 0).cummax(1).values  # c_{s-1} for each token
    return lam - (lam - 1) * step_start.float() / L


def mask_to_ascii(m):
    """Render a (T, T) bool mask, 'x' = may attend."""
    return "\n".join("".join("x" if v else "." for v in row) for row in m.tolist())
