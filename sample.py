"""Sampling from a CausalFusion model: diffusion mode (1 AR step) and AR mode (S steps) through a KV cache."""
import torch


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
