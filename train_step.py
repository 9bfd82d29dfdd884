"""What one training step computes (paper Sec. 3-5, App. B), shared by train.py and bench.py: the draws of a
micro-batch (draw_micro_batch), its losses over the static layout (forward_losses), and the EMA update.

A micro-batch draws latents (posterior sample, random flip), drops labels to the null class, draws a token order,
an AR split and timesteps, and takes the AR-weighted eps-MSE over [prefix | all L clean tokens | all L noisy
tokens]. Captioned data (paper Sec. 6) puts a caption per example in the prefix, before its image
(text-to-image) or after it (captioning, with a next-token loss), decided per example by the mask.
"""
import torch
import torch.nn.functional as F

import mask
import tokenization
from model import patchify


def draw_micro_batch(data, model, indices, g, cfg, num_timesteps, tokenizer=None):
    """One micro-batch, in AR order (K = --noisy-copies): a dict of clean tokens (B, L, P), noise (B, K L, P),
    t (B,) or (B, K L), labels y (B,), order (B, L) (the image position of each AR slot) and steps (B, L) (AR step
    ids). With a
    tokenizer (captioned data) also one caption per example, drawn from its captions: text (B, Lt) ids,
    text_len (B,) real tokens, text_after (B,) (True: the image comes first and is captioned), and truncated
    (how many of these captions were cut to Lt tokens)."""
    x, y = data.batch(indices, g, flip=cfg["flip"])  # (B, C, H, W) scaled latents, (B,)
    n, L = len(indices), model.num_tokens
    y = torch.where(torch.rand(n, generator=g) < cfg["class_dropout"], model.null_class, y)
    order = mask.token_order(n, model.grid_size, model.grid_size, cfg["order"], g, cfg["order_block"])
    draws = n if cfg["split_per"] == "sample" else 1  # per batch: one S and one split for the whole micro-batch
    num_steps = mask.sample_num_steps(draws, L, cfg["gamma"], g)
    steps = mask.sample_step_ids(torch.ones_like(num_steps) if cfg["transfusion"] else num_steps, L, g)
    steps = steps.expand(n, L).contiguous()  # (B, L)
    if cfg["ar_steps_train"]:  # (drawn above all the same: the stream stays that of a random-S run)
        steps = mask.step_ids_from_sizes(mask.equal_split(cfg["ar_steps_train"], L)).expand(n, L).clone()
    K = cfg["noisy_copies"]
    if cfg["per_step_t"]:  # the t of each slot's AR step, per copy
        t = torch.randint(0, num_timesteps, (n, K, L), generator=g).gather(2, steps[:, None].expand(n, K, L))
        t = t.flatten(1)  # (B, K L)
    else:
        t = torch.randint(0, num_timesteps, (n, K), generator=g)
        t = t[:, 0] if K == 1 else t.repeat_interleave(L, 1)  # (B,) or (B, K L)
    tokens = patchify(x, model.patch_size)  # (B, L, P) in image order
    clean = tokens.gather(1, order[..., None].expand_as(tokens))  # (B, L, P) in AR order
    noise = torch.randn(n, K * L, clean.shape[2], generator=g)  # (B, K L, P)
    batch = dict(clean=clean, noise=noise, t=t, y=y, order=order, steps=steps)
    if tokenizer is not None:
        pick = torch.rand(n, generator=g).tolist()
        captions = [data.captions[i][int(u * len(data.captions[i]))] for i, u in zip(indices.tolist(), pick)]
        batch["text"], batch["text_len"], batch["truncated"] = tokenization.tokenize(tokenizer, captions, cfg["text_len"])
        batch["text_after"] = torch.rand(n, generator=g) >= cfg["text_first"]
    return batch


def forward_losses(train_model, model, diffusion, b, cfg):
    """(loss to minimize, image loss, text loss sum, text tokens): the image loss is the AR-weighted eps MSE over
    every example; a text model adds the next-token loss of the texts that follow their image (mean over their
    tokens, times --text-loss-weight), whose sum and token count are returned apart (None without text).

    The layout is [cond or text | clean | noisy], static from step to step; when every example is one AR step
    (--gamma 0 or --ar-steps-train 1 without text, or --transfusion) no noisy token sees a clean one, so the clean
    ones are left out. With --noisy-copies K the noisy segment is K copies of the image, noised at their own t.
    """
    steps, order, text, K = b["steps"], b["order"], b.get("text"), cfg["noisy_copies"]
    single_step = cfg["gamma"] == 0 or cfg["ar_steps_train"] == 1
    keep_clean = not (cfg["transfusion"] or (single_step and text is None))
    Lx = steps.shape[1] if keep_clean else 0
    attn_mask = mask.causal_mask(steps[:, :Lx], steps, model.num_prefix_tokens, text_lengths=b.get("text_len"),
                                 text_after=b.get("text_after"), text_sees_noisy=cfg["transfusion"],
                                 time_token=model.time_token, copies=K)  # (B, T, T)

    def copies(a):  # (B, L, ...) -> (B, K L, ...); no copy for K = 1, the hot path
        return a if K == 1 else a.repeat(1, K, *[1] * (a.dim() - 2))
    xt = diffusion.q_sample(copies(b["clean"]), b["t"], b["noise"])  # (B, K L, P)
    out = train_model(b["clean"][:, :Lx], xt, b["t"], b["y"], copies(order), attn_mask, clean_pos=order[:, :Lx],
                      text=text)
    eps, logits = (out, None) if text is None else out
    image_loss = diffusion.eps_loss(eps, b["noise"], copies(mask.ar_weights(steps, cfg["ar_lambda"])))
    if text is None:
        return image_loss, image_loss, None, None
    positions = torch.arange(1, text.shape[1], device=text.device)
    counted = (positions < b["text_len"][:, None]) & b["text_after"][:, None]  # (B, Lt - 1) targets of captions
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), text[:, 1:], reduction="none")  # (B, Lt - 1)
    text_sum, text_count = (nll * counted).sum(), counted.sum()
    return image_loss + cfg["text_loss_weight"] * text_sum / text_count.clamp(min=1), image_loss, text_sum, text_count


@torch.no_grad()
def ema_update(ema, model, decay):
    """ema = decay * ema + (1 - decay) * model, over all parameters in one foreach kernel per dtype/device."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)
