# The class demo with flow matching and logit-normal timesteps (beyond the paper: docs/flow.md): `python train.py`'s
# shapes, tiny model and 2,200 steps on a CPU (about 5 minutes), the objective that draws every shape.
#   python train.py configs/demo_flow.py
# Figure to reach: nearest-class accuracy of 100 EMA samples 1.000 on each of 3 seeds (docs/flow.md), against about
#   0.95 for the paper's objective (`python train.py`); euler, 100 steps, CFG 5, diffusion mode.
out = "out/demo_flow"
objective = "flow"
timestep_sampling = "logit-normal"
