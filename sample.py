"""Sampling from a CausalFusion model: diffusion mode (1 AR step) and AR mode (S steps) through a KV cache."""
import numpy as np
import torch
from PIL import Image

from model import unpatchify


@torch.no_grad()
def generate(model, diffusion, labels, step_sizes, order, generator, cfg_scale=1.0, cfg_interval=(0, 1000),
             context=None, context_pos=None, progress=None):
    """Generate the image tokens of labels (N,) in len(step_sizes) AR steps; returns (N, L, P) in image order.

    order (N, L - K) lists the image positions to generate, in AR order; step s denoises the next
    step_sizes[s] of them with all DDPM steps, seeing the cond tokens and the clean tokens of the steps before
    it through the KV cache, then enters its clean result into the cache. context (N, K, P) at image positions
    context_pos (N, K) are given clean tokens (zero-shot editing), entered into the cache before step 1.
    With cfg_scale > 1 the cache holds a doubled batch [cond; null class] and guidance runs in one forward."""
    n, device = labels.shape[0], labels.device
    guided = cfg_scale > 1
    double = (lambda a: torch.cat([a, a])) if guided else (lambda a: a)
    y = torch.cat([labels, torch.full_like(labels, model.null_class)]) if guided else labels
    cache = model.new_cache(2 * n if guided else n)
    model.prefill(cache, y)
    out = torch.zeros(n, model.num_tokens, model.token_dim, device=device)  # (N, L, P) image order
    if context is not None:
        model.extend(cache, double(context), double(context_pos))
        out.scatter_(1, context_pos[..., None].expand_as(context), context.float())
    start = 0
    for s, size in enumerate(step_sizes):
        pos = order[:, start:start + size]  # (N, k)
        eps_fn = lambda x, t: model.denoise(cache, x, torch.full((x.shape[0],), t, device=device), double(pos))
        x = torch.randn(n, size, model.token_dim, generator=generator, device=device)
        x = diffusion.sample(eps_fn, x, generator, cfg_scale, cfg_interval, progress)
        if s < len(step_sizes) - 1:
            model.extend(cache, double(x), double(pos))
        out.scatter_(1, pos[..., None].expand_as(x), x.float())
        start += size
    return out


@torch.no_grad()
def tokens_to_images(tokens, model, vae, scale_factor):
    """Generated tokens (N, L, P) in image order -> uint8 images (N, H, W, 3) through the VAE decoder."""
    size = model.input_size
    latents = unpatchify(tokens.float(), model.patch_size, size, size)  # (N, C, h, w), scaled
    pixels = vae.decode(latents / scale_factor)  # (N, 3, H, W) in [-1, 1]
    return ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images, path, ncol, pad=2):
    """uint8 images (N, H, W, 3) -> one PNG, ncol per row, white padding."""
    n, h, w, _ = images.shape
    nrow = -(-n // ncol)
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, ncol)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = image
    Image.fromarray(grid).save(path)
