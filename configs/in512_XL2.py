# CausalFusion-XL at 512x512 (paper Table 4, the 512 column): XL/2 on MAR KL-16 latents of 512 px (32x32x16,
# patch 2: 256 tokens, as at 256 px), 64 unique class tokens, learnable positions, 800 epochs at batch 2048. Patch 2
# and 800 epochs are Fig. 1a's caption ("CausalFusion-XL/2, ImageNet 512x512, 800 epoch"); Table 10 is silent.
#   torchrun --nproc_per_node=8 train.py configs/in512_XL2.py            # data: docs/latents.md (512 px)
# Figure to reach (FID-50K, Table 4): 1.98 with CFG (IS 283.2); no figure without CFG.
# Sampling behind it: diffusion mode, DDPM 250 steps, fp32, against ADM's VIRTUAL_imagenet512.npz. The FID's CFG
#   scale is not stated (Fig. 1a's samples use 4.0, the 512 figures 3.0 and 4.0): sweep it on FID-10K.
# Time: about 11 days on 8 H100s (an estimate: `python -m benchmarks.recipes`, from one measured H100 step).
#   A shorter route is `--init-from runs/in256_XL1/ckpt.pt` (the paper does not say how it trained this model).
# Memory: 32 images per GPU and micro-batch, 8 accumulated per step on 8 GPUs; about 45 GiB per GPU (estimated).
data = "latents/in512_mar"
out = "runs/in512_XL1"
size = "XL"
patch_size = 2
num_cond_tokens = 64
learn_pos = True
batch_size = 2048
device_batch_size = 32
lr = 1e-4
warmup_steps = 25_000  # 40 epochs of 625 steps (1,281,167 images / 2048)
max_steps = 500_000  # 800 epochs
ema_decay = 0.9999
compile = True
log_every = 100
ckpt_every = 2_000
keep_every = 25_000
grid_every = 10_000
grid_steps = 250
eval_per_class = 0
