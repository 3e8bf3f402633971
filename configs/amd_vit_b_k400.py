"""AMD ViT-B/16 student, ViT-L/16 VideoMAE teacher, on Kinetics-400: the official recipe.

Data: a VideoMAE-style annotation file ("path label" per line):
  --config.data.path=train.csv --config.data.video_root=/data/videos
Teacher: the official VideoMAE ViT-L checkpoint (.pth) or an amd_jax workdir:
  --config.teacher.checkpoint=/ckpt/videomae_vit_l_k400_1600e.pth
See amd_jax/recipes.py (amd_video) for the recipe and how it maps onto amd_jax.
"""
from amd_jax import config_base, recipes


def get_config(arg=None):
  args = config_base.parse_arg(arg, runlocal=False)
  c = recipes.amd_video("B", "k400")
  if args.runlocal:
    recipes.shrink_for_local_run(c)
  return c
