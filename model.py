"""The CausalFusion transformer (paper Sec. 3-4, App. B-C; names and initialization as in the authors' code).

A decoder-only transformer over [prefix | clean tokens | noisy tokens]. The prefix (class tokens) comes first,
clean tokens carry the finished AR steps, and noisy tokens (with the timestep embedding added) are
denoised; the generalized causal mask (mask.py) keeps each AR step from seeing later ones. The model
returns only its prediction for the noisy tokens (eps, or v for flow): noising, losses and samplers live in
diffusion.py.

The multimodal model (paper Sec. 6, text_vocab > 0) puts a text in the prefix instead of class tokens:
text embedding plus a learnable text position embedding, the same blocks, and a next-token head. Where the
text stands (before or after the image) is a matter of the mask only, so the layout stays static.

A few-step model (distill/few_step.py; shortcut models, Frans et al. 2024) has step_size=True: a second timestep
embedder of log2(1 / d), d the sampler's step in flow time, added to the time embedding; its last layer starts at
zero, so the distilled model starts as its teacher. Off (the default) the model, its parameters and their
initialization are the paper's.

Table 1's in-context DiT variants are options: time_token=True puts the timestep in a token of its own after
the cond tokens (seen by the noisy tokens only) instead of adding it to every noisy token; qk_norm=False drops
the head-wise QK LayerNorm.

Parameter names are the authors', so their checkpoints load with strict=True.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

MODEL_SIZES = {  # name: (hidden size, depth, heads)
    "T": (128, 4, 4),  # tiny: CPU tests and the demo
    "S": (384, 12, 6),  # DiT-S
    "B": (768, 12, 12),  # DiT-B
    "L": (1024, 24, 16),  # paper: 368M with 64 cond tokens
    "XL": (1280, 32, 20),  # paper: 676M
    "H": (1408, 40, 22),  # paper: ~1B (its table says 40 layers; the authors' code uses 48)
}


def patchify(x, p):
    """(N, C, H, W) latents -> (N, L, p*p*C) tokens, channels-last inside a token, row-major token order."""
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // p, p, w // p, p)  # (N, C, H/p, p, W/p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(n, (h // p) * (w // p), p * p * c)  # (N, L, p*p*C)


def unpatchify(tokens, p, h, w):
    """(N, L, p*p*C) tokens -> (N, C, H, W) latents; the inverse of patchify."""
    n, _, dim = tokens.shape
    c = dim // (p * p)
    x = tokens.reshape(n, h // p, w // p, p, p, c)  # (N, H/p, W/p, p, p, C)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(n, c, h, w)  # (N, C, H, W)


def training_flops(model, attn_mask):
    """Model FLOPs of one training step (3x forward): every matmul, and attention over the allowed pairs only."""
    D, depth = model.x_proj.out_features, len(model.blocks)
    n, T, _ = attn_mask.shape
    L = model.num_tokens
    matmul = 2 * n * (T * depth * 12 * D * D + 2 * L * model.token_dim * D + L * D * model.token_dim)
    attention = 4 * D * depth * attn_mask.sum().item()
    return 3 * (matmul + attention)


def sincos_pos_embed(dim, grid_size):
    """Fixed 2-D sin-cos position embedding (1, grid*grid, dim): half the channels encode the column,
    half the row, each as [sin, cos] over dim/4 frequencies (MAE/DiT)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # (D/4,)
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def embed(pos):
        angles = pos.reshape(-1, 1) * omega[None]  # (L, D/4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # (L, D/2)

    return torch.cat([embed(cols), embed(rows)], dim=1).float()[None]  # (1, L, D)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t (dim 256, [cos, sin], max period 10000) -> MLP."""

    def __init__(self, hidden_size, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t):
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t[..., None].float() * freqs  # (..., 128)
        return self.mlp(torch.cat([args.cos(), args.sin()], dim=-1))  # (..., D)


class LabelEmbedder(nn.Module):
    """Class label -> Lc cond tokens: a table of k = Lc / repeat unique tokens, repeated (App. B).
    Row num_classes is the null class of classifier-free guidance."""

    def __init__(self, num_classes, hidden_size, num_tokens, repeat):
        super().__init__()
        self.unique, self.repeat, self.hidden_size = num_tokens // repeat, repeat, hidden_size
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size * self.unique)

    def forward(self, y):
        tokens = self.embedding_table(y).view(y.shape[0], self.unique, self.hidden_size)  # (N, k, D)
        return tokens.repeat(1, self.repeat, 1)  # (N, Lc, D)


class Attention(nn.Module):
    """Multi-head attention with head-wise QK LayerNorm (qk_norm=False: none, Table 1's ablation), through SDPA,
    optionally against a KV cache."""

    def __init__(self, dim, num_heads, qk_norm=True):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, attn_mask=None, kv=None, kv_len=0):
        n, length, dim = x.shape
        qkv = self.qkv(x).view(n, length, 3, self.num_heads, self.head_dim)  # (N, T, 3, H, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x (N, H, T, hd)
        q, k = self.q_norm(q), self.k_norm(k)
        if kv is not None:  # KVCache's rule: write at slots kv_len.., attend to the slots up to them
            k_cache, v_cache = kv  # (N, H, M, hd)
            k_cache[:, :, kv_len:kv_len + length] = k
            v_cache[:, :, kv_len:kv_len + length] = v
            k = k_cache[:, :, :kv_len + length].to(q.dtype)
            v = v_cache[:, :, :kv_len + length].to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (N, H, T, hd)
        return self.proj(out.transpose(1, 2).reshape(n, length, dim))  # (N, T, D)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-LN transformer block (no AdaLN: conditioning is in-context)."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qk_norm=True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)  # eps 1e-5 everywhere, as in the authors' code
        self.attn = Attention(dim, num_heads, qk_norm)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, attn_mask=None, kv=None, kv_len=0):
        x = x + self.attn(self.norm1(x), attn_mask, kv, kv_len)
        return x + self.mlp(self.norm2(x))


class KVCache:
    """Preallocated per-layer keys and values: the prefix (class tokens or a text), then the clean tokens of each
    finished AR step.

    The rule, write then commit: every call through the cache writes its tokens' keys and values at the slots
    length.. (after those committed) and attends to slots 0..length + k; only commit(k) makes them part of the
    cache by advancing length. A call that does not commit (denoise) leaves the cache as it was: its slots are
    overwritten by the next call."""

    def __init__(self, num_layers, batch, num_heads, max_len, head_dim, dtype, device):
        shape = (batch, num_heads, max_len, head_dim)
        self.layers = [(torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device))
                       for _ in range(num_layers)]
        self.length, self.max_len = 0, max_len
        self.visible = None  # (N, max_len) bool once a text is cached: the cached tokens later ones may see

    def attn_mask(self, k, among=None):
        """(N, 1, k, length + k) mask of k new tokens against the cache and among themselves (among (k, k), None =
        all), or None where every token may see every other (the class-conditional path: no mask at all)."""
        if self.visible is None and among is None:
            return None
        n, device = self.layers[0][0].shape[0], self.layers[0][0].device
        cached = (self.visible[:, :self.length] if self.visible is not None
                  else torch.ones(n, self.length, dtype=torch.bool, device=device))
        among = torch.ones(k, k, dtype=torch.bool, device=device) if among is None else among
        return torch.cat([cached[:, None].expand(n, k, -1), among.expand(n, k, k)], 2)[:, None]  # (N, 1, k, len + k)

    def check_room(self, n):
        if self.length + n > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; {self.length} + {n} do not fit")

    def commit(self, k, visible=None):
        """Keep the k tokens the last call wrote; visible (N, k) (default all): which of them later tokens see."""
        if self.visible is not None:
            self.visible[:, self.length:self.length + k] = True if visible is None else visible
        self.length += k


class CausalFusion(nn.Module):
    def __init__(self, size=None, hidden_size=None, depth=None, num_heads=None, input_size=32, patch_size=2,
                 in_channels=4, num_classes=1000, num_cond_tokens=4, cond_repeat=1, learn_pos=False, mlp_ratio=4.0,
                 text_vocab=0, text_len=0, text_sees_noisy=False, qk_norm=True, time_token=False, step_size=False):
        super().__init__()
        if size is not None:
            if size not in MODEL_SIZES:
                raise ValueError(f"size must be one of {', '.join(MODEL_SIZES)}, got {size!r}")
            hidden_size, depth, num_heads = MODEL_SIZES[size]
        if input_size % patch_size or num_cond_tokens % cond_repeat or hidden_size % num_heads:
            raise ValueError(f"need input_size % patch_size == 0 ({input_size}, {patch_size}), num_cond_tokens % "
                             f"cond_repeat == 0 ({num_cond_tokens}, {cond_repeat}), hidden_size % num_heads == 0")
        self.config = dict(hidden_size=hidden_size, depth=depth, num_heads=num_heads, input_size=input_size,
                           patch_size=patch_size, in_channels=in_channels, num_classes=num_classes,
                           num_cond_tokens=num_cond_tokens, cond_repeat=cond_repeat, learn_pos=learn_pos,
                           mlp_ratio=mlp_ratio)
        if text_vocab:  # the multimodal model; the class-conditional config (and checkpoints) stay as they were
            self.config.update(text_vocab=text_vocab, text_len=text_len, text_sees_noisy=text_sees_noisy)
        if time_token and text_vocab:
            raise ValueError("time_token (--time-token, Table 1's in-context DiT ablation) is for class-conditional "
                             "models, not text models")
        if not qk_norm or time_token:  # Table 1's ablations; recorded only when used, like the text options
            self.config.update(qk_norm=qk_norm, time_token=time_token)
        if step_size:  # recorded only when on: the authors' config and checkpoints stay as they were
            self.config.update(step_size=True)
        self.patch_size, self.in_channels, self.input_size = patch_size, in_channels, input_size
        self.num_classes, self.num_heads = num_classes, num_heads
        self.num_prefix_tokens = text_len if text_vocab else num_cond_tokens  # before the image: class tokens or text
        self.grid_size = input_size // patch_size
        self.num_tokens = self.grid_size ** 2
        self.token_dim = patch_size * patch_size * in_channels
        self.grad_checkpointing = False
        self.text_vocab, self.text_sees_noisy, self.time_token = text_vocab, text_sees_noisy, time_token
        self.step_size = step_size

        self.x_proj = nn.Linear(self.token_dim, hidden_size)  # shared by clean and noisy tokens
        self.t_embedder = TimestepEmbedder(hidden_size)
        if text_vocab:  # (registered in the class-conditional model's order: its parameters keep their order)
            self.text_embedder = nn.Embedding(text_vocab, hidden_size)
        else:
            self.y_embedder = LabelEmbedder(num_classes, hidden_size, num_cond_tokens, cond_repeat)
        self.pos_embed = nn.Parameter(sincos_pos_embed(hidden_size, self.grid_size), requires_grad=learn_pos)
        if text_vocab:
            self.text_pos_embed = nn.Parameter(torch.zeros(1, text_len, hidden_size))  # learnable (Table 11)
        else:
            self.cond_pos_embed = nn.Parameter(torch.zeros(1, num_cond_tokens, hidden_size))
        self.blocks = nn.ModuleList(Block(hidden_size, num_heads, mlp_ratio, qk_norm) for _ in range(depth))
        self.final_layer = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, self.token_dim))
        if text_vocab:
            self.text_head = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, text_vocab))
        self.initialize_weights()
        if step_size:  # made and initialized last: the other parameters draw the same values as without it
            self.d_embedder = TimestepEmbedder(hidden_size)
            nn.init.xavier_uniform_(self.d_embedder.mlp[0].weight)
            nn.init.zeros_(self.d_embedder.mlp[0].bias)
            nn.init.zeros_(self.d_embedder.mlp[2].weight)  # adds nothing at the start: the student is its teacher
            nn.init.zeros_(self.d_embedder.mlp[2].bias)

    @property
    def null_class(self):
        """The label of the unconditional (CFG) class: the extra row of the label table."""
        return self.num_classes

    def initialize_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if self.text_vocab:
            nn.init.normal_(self.text_embedder.weight, std=0.02)
            nn.init.normal_(self.text_pos_embed, std=0.02)
        else:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
            nn.init.normal_(self.cond_pos_embed, std=0.02)
        nn.init.zeros_(self.final_layer[1].weight)  # predict zero noise at the start
        nn.init.zeros_(self.final_layer[1].bias)

    def embed_cond(self, y):
        return self.y_embedder(y) + self.cond_pos_embed  # (N, Lc, D)

    def embed_text(self, text, start=0):
        """Text ids (N, k) at text positions start..start+k-1."""
        return self.text_embedder(text) + self.text_pos_embed[:, start:start + text.shape[1]]  # (N, k, D)

    def embed_time(self, t, d=None):
        """The embedding of timesteps t, (N,) or (N, k): (N, D) or (N, k, D); a step-size model adds that of its
        step sizes d (N,) in flow time, given as log2(1 / d): 0 for one step over [0, 1], 1 for two, ..."""
        temb = self.t_embedder(t)
        if not self.step_size:
            return temb
        if d is None:
            raise ValueError("a step-size model (distill/few_step.py) needs the sampler's step size d")
        demb = self.d_embedder(-torch.log2(d.float()))  # (N, D)
        return temb + (demb if temb.dim() == 2 else demb[:, None])

    def embed_tokens(self, tokens, pos, t=None, d=None):
        """Image tokens (N, k, P) at image positions pos (N, k), plus the timestep embedding for noisy ones (and a
        step-size model's step sizes d (N,))."""
        h = self.x_proj(tokens) + self.pos_embed[0][pos]  # (N, k, D)
        if t is not None:
            temb = self.embed_time(t, d)  # (N, D) shared t, or (N, k, D) one t per token
            h = h + (temb[:, None] if temb.dim() == 2 else temb)
        return h

    def forward(self, clean, noisy, t, y, pos, attn_mask, clean_pos=None, text=None, d=None):
        """Training forward over [cond | clean | noisy]; returns the prediction (eps, or v for flow) (N, L, P) of
        the noisy tokens, and with a text also the next-token logits (N, Lt, V) of every text position.

        clean (N, Lx, P) and noisy (N, L, P) are in AR order; pos (N, L) is the image position of each noisy
        token and clean_pos (default pos[:, :Lx]) that of each clean one; t is (N,) or (N, L); y (N,) labels,
        or text (N, Lt) ids in their place; attn_mask (N, T, T) bool from mask.causal_mask, True = may attend;
        d (N,) the step sizes of a step-size model."""
        clean_pos = pos[:, :clean.shape[1]] if clean_pos is None else clean_pos
        cond = self.embed_cond(y) if text is None else self.embed_text(text)
        if self.time_token:  # [cond | time | clean | noisy]: t as one token of its own, not added to noisy ones
            if t.dim() != 1:
                raise ValueError(f"a time-token model takes one timestep per sample, t (N,); got {tuple(t.shape)}")
            cond, t = torch.cat([cond, self.embed_time(t, d)[:, None]], 1), None  # (N, Lc + 1, D)
        h = torch.cat([cond, self.embed_tokens(clean, clean_pos), self.embed_tokens(noisy, pos, t, d)], 1)
        attn_mask = attn_mask[:, None]  # (N, 1, T, T): one mask for all heads
        for block in self.blocks:
            if self.grad_checkpointing and self.training:
                h = checkpoint(block, h, attn_mask, use_reentrant=False)
            else:
                h = block(h, attn_mask)
        pred = self.final_layer(h[:, -noisy.shape[1]:])  # (N, L, P)
        return pred if text is None else (pred, self.text_head(h[:, :text.shape[1]]))

    # ---- inference through a KV cache (inference.py) ----
    def new_cache(self, batch, max_len=None, dtype=None, device=None):
        param = self.x_proj.weight  # (a time token passes through the cache while it denoises: one more slot)
        max_len = max_len or self.num_prefix_tokens + self.num_tokens + self.time_token
        return KVCache(len(self.blocks), batch, self.num_heads, max_len,
                       self.x_proj.out_features // self.num_heads, dtype or param.dtype, device or param.device)

    def _run_cached(self, h, cache, keep, among=None, visible=None, attn_mask=None):
        """Run h (N, k, D) against the cache; keep: commit its keys and values, with `visible` (N, k)
        (default all) saying which of them later tokens may see. among (k, k): the mask among h's tokens;
        attn_mask (k, length + k): the whole mask instead."""
        k = h.shape[1]
        cache.check_room(k)
        attn_mask = cache.attn_mask(k, among) if attn_mask is None else attn_mask
        for block, kv in zip(self.blocks, cache.layers):
            h = block(h, attn_mask, kv=kv, kv_len=cache.length)
        if keep:
            cache.commit(k, visible)
        return h

    def prefill(self, cache, y):
        """Put the cond tokens of labels y (N,) into an empty cache."""
        if cache.length:
            raise ValueError("prefill needs an empty cache")
        self._run_cached(self.embed_cond(y), cache, keep=True)

    def prefill_text(self, cache, text, lengths):
        """Put texts (N, Lt) into an empty cache, causal among themselves; only the first lengths (N,) of each
        will be seen by later tokens (0: no text at all, the unconditional branch of CFG)."""
        if cache.length:
            raise ValueError("prefill_text needs an empty cache")
        k, device = text.shape[1], text.device
        cache.visible = torch.zeros(text.shape[0], cache.max_len, dtype=torch.bool, device=device)
        causal = torch.ones(k, k, dtype=torch.bool, device=device).tril()
        visible = torch.arange(k, device=device) < lengths[:, None]  # (N, Lt)
        self._run_cached(self.embed_text(text), cache, keep=True, among=causal, visible=visible)

    def extend(self, cache, clean, pos, t=None):
        """Append the clean tokens (N, k, P) of a finished AR step at image positions pos (N, k); with t (N,),
        embedded as noisy tokens at that timestep (a Transfusion model reads images so)."""
        self._run_cached(self.embed_tokens(clean, pos, t), cache, keep=True)

    def next_token_logits(self, cache, text, start):
        """Append text ids (N, k) at text positions start.. (causal among themselves, seeing the whole cache);
        returns the next-token logits (N, k, V) of each."""
        k = text.shape[1]
        causal = torch.ones(k, k, dtype=torch.bool, device=text.device).tril() if k > 1 else None
        return self.text_head(self._run_cached(self.embed_text(text, start), cache, keep=True, among=causal))

    def denoise(self, cache, noisy, t, pos, d=None):
        """The prediction (eps, or v for flow) (N, k, P) of noisy tokens (N, k, P) at positions pos (N, k) and
        timestep t (N,) (a step-size model: step size d (N,)), seeing the cache and each other (the current AR
        step); the cache is left as it was."""
        if not self.time_token:
            return self.final_layer(self._run_cached(self.embed_tokens(noisy, pos, t, d), cache, keep=False))
        # the time token goes first: it sees the cond tokens and itself, as in training; the noisy tokens see it
        k, length = noisy.shape[1], cache.length
        sees = torch.ones(k + 1, length + k + 1, dtype=torch.bool, device=noisy.device)  # (1 + k, length + 1 + k)
        sees[0, self.num_prefix_tokens:] = False
        sees[0, length] = True
        h = torch.cat([self.embed_time(t, d)[:, None], self.embed_tokens(noisy, pos)], 1)  # (N, 1 + k, D)
        return self.final_layer(self._run_cached(h, cache, keep=False, attn_mask=sees)[:, 1:])
