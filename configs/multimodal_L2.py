# Multimodal CausalFusion-L/2, text and images (paper Sec. 6, Table 6a; App. C, Table 11): L/2 on SD-VAE latents of
# ImageNet 256 with 10 captions per image, LLaMA-3's tokenizer, 35 text tokens, text first in 90% of examples
# (text-to-image), captioning with a next-token loss of weight 0.01, 240 epochs at batch 2048. Transfusion, the
# paper's baseline, is this file plus --transfusion.
#   torchrun --nproc_per_node=8 train.py configs/multimodal_L2.py         # data, tokenizer: docs/multimodal.md
# Figures to reach: zero-shot MS-COCO FID-30K and CIDEr on Karpathy's test split (Table 6a). Their values are in
#   the table's image, not in the paper's text; this repository has not reproduced them.
# Sampling behind them: DDPM 250 steps (Table 11); CFG scale not stated (docs/evaluation.md: MS-COCO).
# Time: about 1.5 days on 8 H100s (an estimate: `python -m benchmarks.recipes`, from one measured H100 step).
# Memory: 64 images per GPU and micro-batch, 4 accumulated per step on 8 GPUs; about 49 GiB per GPU (estimated).
data = "latents/in256_sd_captions"
out = "runs/multimodal_L2"
size = "L"
patch_size = 2
tokenizer = "llama3/tokenizer.model"
text_len = 35
text_first = 0.9
text_loss_weight = 0.01
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
