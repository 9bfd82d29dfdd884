# The ablation setting of Tables 1-3, 7 and 8 (paper App. C, Table 9): CausalFusion-L/2 on SD-VAE latents of
# ImageNet 256x256, 4 class tokens, fixed sin-cos positions, 240 epochs at batch 2048, the paper's eps objective.
#   torchrun --nproc_per_node=8 train.py configs/in256_L2_ablation.py            # data: docs/latents.md
# Each ablation row is this file plus one option (docs/reproducing.md's table).
# Figure to reach: FID-10K 12.13 (Tables 7 and 8, the default row: gamma 0.9, lambda 2, random order, shared t),
#   diffusion mode (S_eval = 1), no CFG.
# Sampling behind it: DDPM, 250 steps, no CFG, FID-10K against ADM's VIRTUAL_imagenet256_labeled.npz (Table 9).
# Time: about 1.4 days on 8 H100s (an estimate: `python -m benchmarks.recipes`, from one measured H100 step).
# Memory: 64 images per GPU and micro-batch, 4 accumulated per step on 8 GPUs; about 39 GiB per GPU (estimated).
data = "latents/in256_sd"
out = "runs/in256_L2_ablation"
size = "L"
patch_size = 2
num_cond_tokens = 4
batch_size = 2048
device_batch_size = 64
lr = 1e-4
warmup_steps = 25_000  # 40 epochs of 625 steps (1,281,167 images / 2048)
max_steps = 150_000  # 240 epochs
ema_decay = 0.9999
compile = True
log_every = 100
ckpt_every = 2_000
keep_every = 25_000
grid_every = 10_000
grid_steps = 250
eval_per_class = 0
