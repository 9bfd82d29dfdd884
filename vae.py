"""The VAEs that map images to latents and back (paper App. C, Tables 9-10: the SD VAE for the ablations, MAR's
KL-16 VAE for the system-level models).

Both released VAEs are the LDM KL autoencoder: a ResNet encoder to the mean and log-variance of a diagonal
Gaussian, and a mirrored decoder. One implementation, parameterized, serves
  "sd":   the Stable Diffusion VAE (sd-vae-ft-ema / sd-vae-ft-mse): 8x downsampling, 4 channels;
  "mar":  MAR's KL-16 VAE (kl16.ckpt): 16x downsampling, 16 channels;
  "none": the identity on pixels in [-1, 1], so the whole pipeline runs on small images on a CPU.
Modules carry the LDM parameter names, so LDM/CompVis and MAR checkpoints load as they are; diffusers
files are renamed on load. Loading is strict: a missing or unexpected key is an error listing the keys.

Latents here are UNSCALED. The diffusion model works on latents * scale_factor (unit variance); that factor
lives only in SCALE_FACTORS below and travels with the extracted latents (latents.py's meta.json).
"""
import argparse
import json
import os
import pickle
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

SCALE_FACTORS = {"sd": 0.18215, "mar": 0.2325, "none": 1.0}

VAE_CONFIGS = {  # LDM ddconfig; *_attn_levels: the levels (0 = full resolution) with self-attention blocks
    "sd": dict(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=4, enc_attn_levels=(), dec_attn_levels=()),
    # MAR: attention at resolution 16 of a 256 input = level 4, in the encoder only (its decoder has none)
    "mar": dict(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=16, enc_attn_levels=(4,),
                dec_attn_levels=()),
}

WEIGHTS = {
    "sd": "the SD VAE from Hugging Face, stabilityai/sd-vae-ft-ema or stabilityai/sd-vae-ft-mse (the folder, or "
          "its diffusion_pytorch_model.safetensors or .bin), or an original CompVis/LDM .ckpt",
    "mar": "MAR's kl16.ckpt, released with github.com/LTH14/mar (its README and util/download.py link it)",
}


# ------------------------------------------------------------------------------------------- modules
def _norm(channels):
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions; q, k, v, proj_out are 1x1 convolutions (LDM)."""

    def __init__(self, channels):
        super().__init__()
        self.norm = _norm(channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x):
        n, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (conv(y).reshape(n, 1, c, h * w).transpose(2, 3) for conv in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v)  # q, k, v, y: (N, 1 head, HW, C)
        return x + self.proj_out(y.transpose(2, 3).reshape(n, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # LDM pads right and bottom only


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(cin, cout, num_blocks, attn):
    """One resolution level: `block` ResNet blocks, each followed by an `attn` block where attn is True."""
    level = nn.Module()
    level.block = nn.ModuleList(ResnetBlock(cin if i == 0 else cout, cout) for i in range(num_blocks))
    level.attn = nn.ModuleList(AttnBlock(cout) for _ in range(num_blocks if attn else 0))
    return level


def _run_level(level, h):
    for i, block in enumerate(level.block):
        h = block(h)
        if len(level.attn):
            h = level.attn[i](h)
    return h


def _mid(channels):
    mid = nn.Module()
    mid.block_1, mid.attn_1 = ResnetBlock(channels, channels), AttnBlock(channels)
    mid.block_2 = ResnetBlock(channels, channels)
    return mid


class Encoder(nn.Module):
    def __init__(self, ch, ch_mult, num_res_blocks, z_channels, attn_levels):
        super().__init__()
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.down = nn.ModuleList()
        cin = ch
        for i, mult in enumerate(ch_mult):
            level = _level(cin, ch * mult, num_res_blocks, i in attn_levels)
            if i < len(ch_mult) - 1:
                level.downsample = Downsample(ch * mult)
            self.down.append(level)
            cin = ch * mult
        self.mid = _mid(cin)
        self.norm_out, self.conv_out = _norm(cin), nn.Conv2d(cin, 2 * z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = _run_level(level, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Mirror of the encoder with num_res_blocks + 1 blocks per level; up[i] is level i, run from the last."""

    def __init__(self, ch, ch_mult, num_res_blocks, z_channels, attn_levels):
        super().__init__()
        cin = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, cin, 3, padding=1)
        self.mid = _mid(cin)
        up = []
        for i in reversed(range(len(ch_mult))):
            level = _level(cin, ch * ch_mult[i], num_res_blocks + 1, i in attn_levels)
            if i > 0:
                level.upsample = Upsample(ch * ch_mult[i])
            up.append(level)
            cin = ch * ch_mult[i]
        self.up = nn.ModuleList(reversed(up))
        self.norm_out, self.conv_out = _norm(cin), nn.Conv2d(cin, 3, 3, padding=1)

    def forward(self, z):
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(self.up):
            h = _run_level(level, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    def __init__(self, kind, ch, ch_mult, num_res_blocks, z_channels, enc_attn_levels, dec_attn_levels):
        super().__init__()
        self.kind, self.scale_factor = kind, SCALE_FACTORS[kind]
        self.downsample, self.latent_channels = 2 ** (len(ch_mult) - 1), z_channels
        self.encoder = Encoder(ch, ch_mult, num_res_blocks, z_channels, enc_attn_levels)
        self.decoder = Decoder(ch, ch_mult, num_res_blocks, z_channels, dec_attn_levels)
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * z_channels, 1)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, 1)

    def encode_moments(self, x):
        """x (N, 3, H, W) in [-1, 1] -> mean, logvar (N, C, H/f, W/f) of the posterior, unscaled."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)  # the clamp of LDM's DiagonalGaussianDistribution

    def decode(self, z):
        """Unscaled latents (N, C, h, w) -> images (N, 3, h*f, w*f), roughly in [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))


class IdentityVAE(nn.Module):
    """--vae none: the latent is the image itself (3 channels, no downsampling, scale 1)."""
    kind, scale_factor, downsample, latent_channels = "none", SCALE_FACTORS["none"], 1, 3

    def encode_moments(self, x):
        return x, None  # a point mass: no log-variance; extract_latents.py stores the pixels only

    def decode(self, z):
        return z


# ------------------------------------------------------------------------------------------- weights
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def read_safetensors(path):
    """A .safetensors file -> {name: tensor}. Format: u64 little-endian header size, a JSON header
    {name: {dtype, shape, data_offsets: [begin, end]}} (plus optional __metadata__), then the raw bytes."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if size > os.path.getsize(path) - 8:
            raise ValueError(f"{path}: not a .safetensors file (header size {size} is beyond the end of the file)")
        header = json.loads(f.read(size))
        data = bytearray(f.read())
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{path}: tensor {name} has dtype {info['dtype']}, expected one of {list(_ST_DTYPES)}")
        dtype, (begin, end) = _ST_DTYPES[info["dtype"]], info["data_offsets"]
        flat = torch.frombuffer(data, dtype=dtype, offset=begin, count=(end - begin) // dtype.itemsize) \
            if end > begin else torch.empty(0, dtype=dtype)
        tensors[name] = flat.reshape(info["shape"])
    return tensors


_ATTN_NAMES = {"group_norm": "norm", "to_q": "q", "query": "q", "to_k": "k", "key": "k", "to_v": "v",
               "value": "v", "to_out.0": "proj_out", "proj_attn": "proj_out"}


def diffusers_to_ldm(sd):
    """Rename a diffusers AutoencoderKL state dict to LDM names. Its decoder up_blocks run from the lowest
    resolution (up_blocks.0 = LDM up.{n-1}); its attention projections are Linear (out, in), LDM's 1x1 convs."""
    num_up = 1 + max((int(m[1]) for k in sd if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))), default=-1)
    rules = [
        (r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.", lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.mid.attn_1."),
        (r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block."),
        (r"^encoder\.down_blocks\.(\d+)\.attentions\.", r"encoder.down.\1.attn."),
        (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
        (r"^decoder\.up_blocks\.(\d+)\.(resnets|attentions|upsamplers\.0)\.",
         lambda m: f"decoder.up.{num_up - 1 - int(m[1])}."
                   + {"resnets": "block.", "attentions": "attn.", "upsamplers.0": "upsample."}[m[2]]),
        (r"\.conv_shortcut\.", ".nin_shortcut."),
        (r"\.conv_norm_out\.", ".norm_out."),
        (r"(\.attn(?:_1|\.\d+)\.)(group_norm|to_q|query|to_k|key|to_v|value|to_out\.0|proj_attn)\.",
         lambda m: m[1] + _ATTN_NAMES[m[2]] + "."),
    ]
    out = {}
    for key, value in sd.items():
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
        if re.search(r"\.attn(_1|\.\d+)\.(q|k|v|proj_out)\.weight$", key) and value.ndim == 2:
            value = value[:, :, None, None]  # Linear (out, in) -> 1x1 conv (out, in, 1, 1)
        out[key] = value
    return out


def read_vae_weights(path):
    """Any released layout -> a state dict with LDM names. `path`: a diffusers folder (or its vae/ subfolder)
    or diffusion_pytorch_model.{safetensors,bin}; an LDM/CompVis .ckpt (under "state_dict"); MAR's kl16.ckpt
    (under "model")."""
    if os.path.isdir(path):
        names = [os.path.join(path, sub, f"diffusion_pytorch_model.{ext}") for sub in ("", "vae")
                 for ext in ("safetensors", "bin")]
        found = [n for n in names if os.path.exists(n)]
        if not found:
            raise FileNotFoundError(f"--vae-ckpt {path}: a folder without any of {names}")
        path = found[0]
    if not os.path.exists(path):
        raise FileNotFoundError(f"--vae-ckpt {path}: no such file")
    if path.endswith(".safetensors"):
        sd = read_safetensors(path)
    else:
        try:  # MAR-style checkpoints may pickle their argparse args next to the weights
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise ValueError(f"--vae-ckpt {path}: holds Python objects that weights_only loading refuses; load it "
                             f"once where you trust it and save its state dict alone.\n{e}") from None
        sd = obj.get("model", obj.get("state_dict", obj)) if isinstance(obj, dict) else obj
        if not isinstance(sd, dict):
            raise ValueError(f"--vae-ckpt {path}: expected a state dict (or one under 'model'/'state_dict'), "
                             f"got {type(sd).__name__}")
    # LDM training checkpoints also hold their loss networks (LPIPS, discriminator) under loss.*
    sd = {k: v for k, v in sd.items() if not k.startswith("loss.")}
    if any("down_blocks." in k or "up_blocks." in k or "mid_block." in k for k in sd):
        sd = diffusers_to_ldm(sd)
    return sd


def load_vae_weights(model, path):
    """Strictly load `path` into `model`; any missing, unexpected or misshapen tensor is an error listing them."""
    sd, expected = read_vae_weights(path), model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    misshapen = [f"{k}: {tuple(sd[k].shape)} in the file, {tuple(v.shape)} in the model"
                 for k, v in expected.items() if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or misshapen:
        raise ValueError(f"--vae-ckpt {path} does not match the '{model.kind}' VAE (is it {WEIGHTS[model.kind]}?)\n"
                         f"missing keys ({len(missing)}): {missing}\nunexpected keys ({len(unexpected)}): "
                         f"{unexpected}\nshape mismatches ({len(misshapen)}): {misshapen}")
    model.load_state_dict(sd, strict=True)


def _random_init(model, seed):
    """Deterministic random weights of a sensible scale (tests, speed measurements)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.normal_(0.0, fan_in ** -0.5, generator=g)
                module.bias.zero_()


def build_vae(kind, ckpt=None, device="cpu", random_init=False, seed=0, **arch):
    """The VAE `kind` ("sd", "mar" or "none") in eval mode, with the weights at `ckpt`, or random weights
    with random_init=True (or ckpt="random"). `arch` overrides VAE_CONFIGS entries (small test models)."""
    if kind == "none":
        return IdentityVAE().to(device).eval()
    if kind not in VAE_CONFIGS:
        raise ValueError(f"--vae: expected one of {sorted(SCALE_FACTORS)}, got {kind!r}")
    random_init = random_init or ckpt == "random"
    if ckpt is None and not random_init:
        raise ValueError(f"--vae {kind} needs its weights: pass --vae-ckpt PATH, with PATH {WEIGHTS[kind]}")
    model = AutoencoderKL(kind, **{**VAE_CONFIGS[kind], **arch})
    if random_init:
        _random_init(model, seed)
    else:
        load_vae_weights(model, ckpt)
    return model.to(device).eval()
