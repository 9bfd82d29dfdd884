# The captioned demo (docs/multimodal.md): the multimodal model of paper Sec. 6 at toy scale on a CPU (about 10
# minutes): 4,000 captioned shapes of 16x16 px, a BPE learned from the captions (needs `pip install tokenizers`).
#   python train.py configs/demo_captions.py
# Figures: the attribute accuracies of text-to-image samples and of captions that train.py prints at the end
#   (docs/multimodal.md: the captioned demo); DDPM 100 steps, CFG 2, diffusion mode.
out = "out/captions"
demo = "captions"
demo_image_size = 16
patch_size = 2
learn_tokenizer = 512
text_len = 10
flip = False  # the captions name left and right
batch_size = 32
max_steps = 2_400
cfg_scale = 2.0
eval_per_class = 50
grid_classes = 8
grid_per_class = 8
