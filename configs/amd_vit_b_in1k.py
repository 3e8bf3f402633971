"""AMD ViT-B/16 student, ViT-L/16 ImageMAE teacher, on ImageNet-1k.

The official image code is not released; amd_jax's choices are listed in
amd_jax/recipes.py (amd_image). Data: tfds imagenet2012 prepared by the user
(--config.data.path=<tfds data_dir>). Teacher: facebookresearch/mae ViT-L .pth
(--config.teacher.checkpoint=mae_pretrain_vit_large.pth) or an amd_jax workdir.
"""
from amd_jax import config_base, recipes


def get_config(arg=None):
  args = config_base.parse_arg(arg, runlocal=False)
  c = recipes.amd_image("B")
  if args.runlocal:
    recipes.shrink_for_local_run(c)
  return c
