# CausalFusion-L at 256x256, system level (paper Table 4, first CausalFusion row; App. C, Table 10): L/1 on MAR
# KL-16 latents (16x16x16), 64 unique class tokens, learnable positions, 800 epochs at batch 2048, eps objective.
#   torchrun --nproc_per_node=8 train.py configs/in256_L1.py            # data: docs/latents.md
# Figures to reach (FID-50K, Table 4): 5.12 without CFG (IS 166.1), 1.94 with CFG (IS 264.4).
# Sampling behind them: diffusion mode (S_eval = 1), DDPM 250 steps, fp32 (Sec. 6, Table 10). The CFG scale is
#   stated neither by the paper nor by the authors' code (their sample.py defaults to 1.0, their README samples
#   images at 4.0; the paper's figures show 1.5 to 4.0): sweep 1.3 to 2.0 on FID-10K, as DiT did for its 1.5.
# Time: about 5 days on 8 H100s (an estimate: `python -m benchmarks.recipes`, from one measured H100 step).
# Memory: 64 images per GPU and micro-batch, 4 accumulated per step on 8 GPUs; about 45 GiB per GPU (estimated).
data = "latents/in256_mar"
out = "runs/in256_L1"
size = "L"
patch_size = 1
num_cond_tokens = 64
learn_pos = True
batch_size = 2048
device_batch_size = 64
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
