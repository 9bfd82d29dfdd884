"""What one training step computes (paper Sec. 3-5, App. B), shared by train.py and bench.py: the draws of a
micro-batch (draw_micro_batch), its losses over the static layout (forward_losses), and the EMA update.

A micro-batch draws latents (posterior sample, random flip), drops labels to the null class, draws a token order,
an AR split and timesteps, and takes the AR-weighted MSE of the prediction (eps, or flow's v; diffusion.py) over
[prefix | all L clean tokens | all L noisy tokens]; the step's choices are a StepOptions. Captioned data (paper
Sec. 6) puts a caption per example in the prefix, before its image (text-to-image) or after it (captioning, with a
next-token loss), decided per example by the mask.
"""
import copy
import functools
import os
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F

import mask
import tokenization
from diffusion import LOSS_WEIGHTINGS, TIMESTEP_SAMPLINGS
from model import CausalFusion, patchify
from runtime import read_script_config


@functools.cache
def train_defaults():
    """train.py's config: its defaults, read from its source (train.py imports this file, not the reverse)."""
    return read_script_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py"))


@dataclass(frozen=True)
class StepOptions:
    """The choices a training step makes, one per train.py option of the same name; train.py builds it once with
    from_config, and StepOptions.defaults() holds train.py's defaults."""
    flip: bool  # random horizontal flips of the latents
    class_dropout: float  # probability of the null class (classifier-free guidance)
    order: str  # token order: random, raster or block_raster (mask.token_order; Table 3b)
    order_block: int  # block side (in tokens) of block_raster
    split_per: str  # the AR split (S and the step sizes) drawn per sample, or once per micro-batch
    gamma: float  # AR-step decay: P(S = k) ~ gamma^(k-1); 0 = in-context DiT (App. B)
    ar_steps_train: int  # a fixed number of AR steps of equal size (Table 2); 0 = random (gamma)
    transfusion: bool  # one AR step, captions see the noisy image (Table 6a's baseline)
    per_step_t: bool  # one timestep per AR step instead of one per image (Table 7)
    noisy_copies: int  # K noisy copies of each image at K timesteps (Table 7)
    ar_lambda: float  # loss weight of the first AR step, decaying linearly to 1 (Table 3c)
    timestep_sampling: str  # the timesteps' distribution: uniform (the paper's) or logit-normal
    logit_mean: float  # logit-normal: the mean of the normal whose sigmoid is t
    logit_std: float  # logit-normal: its standard deviation
    loss_weighting: str  # none (the paper's) or min-snr: the AR weights times min-SNR-gamma weights
    snr_gamma: float  # min-snr's gamma (Hang et al. 2023: 5)
    text_len: int  # text tokens per example (captioned data), BOS and EOS included
    text_first: float  # share of examples whose text comes first (text-to-image); the rest are captioned
    text_loss_weight: float  # weight of the captioning next-token loss against the image loss

    def __post_init__(self):
        if self.timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise ValueError(f"--timestep-sampling must be one of {', '.join(TIMESTEP_SAMPLINGS)}, got "
                             f"{self.timestep_sampling!r}")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"--loss-weighting must be one of {', '.join(LOSS_WEIGHTINGS)}, got "
                             f"{self.loss_weighting!r}")
        if self.logit_std <= 0 or self.snr_gamma <= 0:
            raise ValueError(f"--logit-std and --snr-gamma must be > 0, got {self.logit_std} and {self.snr_gamma}")
        defaults = train_defaults()
        for key, needs, value in (("logit_mean", "timestep_sampling", "logit-normal"),
                                  ("logit_std", "timestep_sampling", "logit-normal"),
                                  ("snr_gamma", "loss_weighting", "min-snr")):
            if getattr(self, key) != defaults[key] and getattr(self, needs) != value:
                raise ValueError(f"--{key.replace('_', '-')} {getattr(self, key)} does not apply: it goes with "
                                 f"--{needs.replace('_', '-')} {value}, not {getattr(self, needs)}")

    @classmethod
    def from_config(cls, cfg):
        """The options of a train.py config dict (its other keys ignored)."""
        return cls(**{f.name: cfg[f.name] for f in fields(cls)})

    @classmethod
    def defaults(cls, **changes):
        """train.py's defaults, with changes (names checked as dataclasses.replace does)."""
        return replace(cls.from_config(train_defaults()), **changes)


def build_model(cfg, latent_shape, num_classes, text_vocab, device):
    """train.py's model for latents of latent_shape (C, H, W) (a text model when text_vocab > 0), seeded by
    cfg["seed"]; its EMA copy, trainable parameters and AdamW."""
    c, h, w = latent_shape
    text_options = dict(text_vocab=text_vocab, text_len=cfg["text_len"],
                        text_sees_noisy=cfg["transfusion"]) if text_vocab else {}
    torch.manual_seed(cfg["seed"])
    model = CausalFusion(cfg["size"], input_size=h, patch_size=cfg["patch_size"], in_channels=c,
                         num_classes=num_classes, num_cond_tokens=cfg["num_cond_tokens"],
                         cond_repeat=cfg["cond_repeat"], learn_pos=cfg["learn_pos"], qk_norm=cfg["qk_norm"],
                         time_token=cfg["time_token"], **text_options)
    if device is not None:  # None: where it was built (benchmarks/recipes.py's fake tensors)
        model.to(device)
    model.grad_checkpointing = cfg["grad_checkpointing"]
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg["lr"], betas=cfg["betas"], weight_decay=cfg["weight_decay"],
                                  eps=cfg["adam_eps"], fused=device is not None and torch.device(device).type == "cuda")
    return model, ema, params, optimizer


def draw_micro_batch(data, model, indices, g, options, objective, tokenizer=None):
    """One micro-batch, in AR order (K = options.noisy_copies): a dict of clean tokens (B, L, P), noise (B, K L, P),
    t (B,) or (B, K L) (Objective.draw_timesteps': eps's timesteps, flow's times), labels y (B,), order (B, L) (the
    image position of each AR slot) and steps (B, L) (AR step ids). With a tokenizer (captioned data) also one
    caption per example, drawn from its captions: text (B, Lt) ids, text_len (B,) real tokens, text_after (B,)
    (True: the image comes first and is captioned), and truncated (how many of these captions were cut to Lt
    tokens)."""
    o = options
    x, y = data.batch(indices, g, flip=o.flip)  # (B, C, H, W) scaled latents, (B,)
    n, L = len(indices), model.num_tokens
    y = torch.where(torch.rand(n, generator=g) < o.class_dropout, model.null_class, y)
    order = mask.token_order(n, model.grid_size, model.grid_size, o.order, g, o.order_block)
    draws = n if o.split_per == "sample" else 1  # per batch: one S and one split for the whole micro-batch
    num_steps = mask.sample_num_steps(draws, L, o.gamma, g)
    steps = mask.sample_step_ids(torch.ones_like(num_steps) if o.transfusion else num_steps, L, g)
    steps = steps.expand(n, L).contiguous()  # (B, L)
    if o.ar_steps_train:  # (drawn above all the same: the stream stays that of a random-S run)
        steps = mask.step_ids_from_sizes(mask.equal_split(o.ar_steps_train, L)).expand(n, L).clone()
    K = o.noisy_copies
    draw_t = lambda shape: objective.draw_timesteps(shape, g, o.timestep_sampling, o.logit_mean, o.logit_std)
    if o.per_step_t:  # the t of each slot's AR step, per copy
        t = draw_t((n, K, L)).gather(2, steps[:, None].expand(n, K, L)).flatten(1)  # (B, K L)
    else:
        t = draw_t((n, K))
        t = t[:, 0] if K == 1 else t.repeat_interleave(L, 1)  # (B,) or (B, K L)
    tokens = patchify(x, model.patch_size)  # (B, L, P) in image order
    clean = tokens.gather(1, order[..., None].expand_as(tokens))  # (B, L, P) in AR order
    noise = torch.randn(n, K * L, clean.shape[2], generator=g)  # (B, K L, P)
    batch = dict(clean=clean, noise=noise, t=t, y=y, order=order, steps=steps)
    if tokenizer is not None:
        pick = torch.rand(n, generator=g).tolist()
        captions = [data.captions[i][int(u * len(data.captions[i]))] for i, u in zip(indices.tolist(), pick)]
        batch["text"], batch["text_len"], batch["truncated"] = tokenization.tokenize(tokenizer, captions, o.text_len)
        batch["text_after"] = torch.rand(n, generator=g) >= o.text_first
    return batch


def forward_losses(train_model, model, objective, b, options):
    """(loss to minimize, image loss, text loss sum, text tokens): the image loss is the AR-weighted MSE of the
    prediction (eps, or flow's v; options.loss_weighting) over every example; a text model adds the next-token loss
    of the texts that follow their image (mean over their tokens, times options.text_loss_weight), whose sum and
    token count are returned apart (None without text).

    The layout is [cond or text | clean | noisy], static from step to step; when every example is one AR step
    (gamma 0 or ar_steps_train 1 without text, or transfusion) no noisy token sees a clean one, so the clean
    ones are left out. With noisy_copies K the noisy segment is K copies of the image, noised at their own t.
    """
    o = options
    steps, order, text, K = b["steps"], b["order"], b.get("text"), o.noisy_copies
    single_step = o.gamma == 0 or o.ar_steps_train == 1
    keep_clean = not (o.transfusion or (single_step and text is None))
    Lx = steps.shape[1] if keep_clean else 0
    attn_mask = mask.causal_mask(steps[:, :Lx], steps, model.num_prefix_tokens, text_lengths=b.get("text_len"),
                                 text_after=b.get("text_after"), text_sees_noisy=o.transfusion,
                                 time_token=model.time_token, copies=K)  # (B, T, T)

    def copies(a):  # (B, L, ...) -> (B, K L, ...); no copy for K = 1, the hot path
        return a if K == 1 else a.repeat(1, K, *[1] * (a.dim() - 2))
    x0 = copies(b["clean"])  # (B, K L, P)
    xt = objective.q_sample(x0, b["t"], b["noise"])  # (B, K L, P)
    out = train_model(b["clean"][:, :Lx], xt, objective.model_time(b["t"]), b["y"], copies(order), attn_mask,
                      clean_pos=order[:, :Lx], text=text)
    pred, logits = (out, None) if text is None else out
    image_loss = objective.loss(pred, x0, b["noise"], b["t"], copies(mask.ar_weights(steps, o.ar_lambda)),
                                o.loss_weighting, o.snr_gamma)
    if text is None:
        return image_loss, image_loss, None, None
    positions = torch.arange(1, text.shape[1], device=text.device)
    counted = (positions < b["text_len"][:, None]) & b["text_after"][:, None]  # (B, Lt - 1) targets of captions
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), text[:, 1:], reduction="none")  # (B, Lt - 1)
    text_sum, text_count = (nll * counted).sum(), counted.sum()
    return image_loss + o.text_loss_weight * text_sum / text_count.clamp(min=1), image_loss, text_sum, text_count


@torch.no_grad()
def ema_update(ema, model, decay):
    """ema = decay * ema + (1 - decay) * model, over all parameters in one foreach kernel per dtype/device."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)
