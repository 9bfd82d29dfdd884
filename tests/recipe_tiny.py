# The tests' recipe (tests/test_train.py's TINY): the tiny model on the tests' tiny latents, logging every step,
# no grids or closing figures unless a test asks.
size = "T"
patch_size = 2
num_cond_tokens = 4
batch_size = 8
lr = 1e-3
warmup_steps = 2
ema_decay = 0.9
log_every = 1
grid_every = 0
grid_classes = 2
grid_per_class = 1
grid_steps = 2
eval_per_class = 0
