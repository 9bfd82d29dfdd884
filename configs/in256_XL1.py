# CausalFusion-XL at 256x256, system level (paper Table 4; App. C, Table 10): XL/1 on MAR KL-16 latents
# (16x16x16), 64 unique class tokens, learnable positions, 800 epochs at batch 2048, eps objective. The authors'
# released checkpoint is this model (docs/reproducing.md: the authors' checkpoint).
#   torchrun --nproc_per_node=8 train.py configs/in256_XL1.py            # data: docs/latents.md
# Figures to reach (FID-50K, Table 4): 3.61 without CFG (IS 180.9), 1.77 with CFG (IS 282.3).
# Sampling behind them: diffusion mode (S_eval = 1), DDPM 250 steps, fp32 (Sec. 6, Table 10). The CFG scale is
#   stated neither by the paper nor by the authors' code (their sample.py defaults to 1.0, their README samples
#   images at 4.0; the paper's figures show 1.5 to 4.0): sweep 1.3 to 2.0 on FID-10K, as DiT did for its 1.5.
# Time: about 11 days on 8 H100s (an estimate: `python -m benchmarks.recipes`, from one measured H100 step).
# Memory: 32 images per GPU and micro-batch, 8 accumulated per step on 8 GPUs; about 45 GiB per GPU (estimated).
data = "latents/in256_mar"
out = "runs/in256_XL1"
size = "XL"
patch_size = 1
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
