# The captioned demo's yardstick (docs/multimodal.md): the same images and budget, one class per (shape, colour,
# size, position) instead of a caption: what the model does when the condition is given whole.
#   python train.py configs/demo_combinations.py
# Figures: the attribute accuracies train.py prints at the end, beside demo_captions.py's.
out = "out/combinations"
demo = "combinations"
demo_image_size = 16
patch_size = 2
flip = False
batch_size = 32
max_steps = 2_400
cfg_scale = 2.0
eval_per_class = 50
grid_classes = 8
grid_per_class = 8
