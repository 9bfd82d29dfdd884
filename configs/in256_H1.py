# CausalFusion-H at 256x256, system level (paper Table 5; App. C, Table 10): H/1 (1408 wide, 40 blocks as Table
# 10 says; the authors' code has 48) on MAR KL-16 latents, 64 unique class tokens, learnable positions, 800 epochs
# at batch 2048, eps objective.
#   torchrun --nproc_per_node=8 train.py configs/in256_H1.py            # data: docs/latents.md
# Figures to reach (FID-50K, Table 5): 1.64 with CFG; 1.57 with CFG and a CFG interval (Kynkaanniemi et al.
#   2024). Table 5 gives no figure without CFG.
# Sampling behind them: diffusion mode, DDPM 250 steps, fp32 (Sec. 6). Neither the CFG scale nor the interval is
#   stated (paper or authors' code): sweep the scale from 1.3 to 2.0, then an interval (`sample.py
#   --cfg-interval LO HI`, in timesteps of the 1000-step schedule) with a higher scale, on FID-10K.
# Time: about 16 days on 8 H100s (an estimate: `python -m benchmarks.recipes`, from one measured H100 step).
# Memory: 32 images per GPU and micro-batch, 8 accumulated per step on 8 GPUs; about 63 GiB per GPU (estimated).
data = "latents/in256_mar"
out = "runs/in256_H1"
size = "H"
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
