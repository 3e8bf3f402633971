"""VideoMAE ViT-S/16 on Something-Something v2 (2400 epochs, the ViT-S row of the VideoMAE tables; frame stride 2): the official recipe.

See amd_jax/recipes.py (videomae). Data: a VideoMAE-style annotation file ("path label" per line)
via --config.data.path and --config.data.video_root.
"""
from amd_jax import config_base, recipes


def get_config(arg=None):
  args = config_base.parse_arg(arg, epochs=2400, runlocal=False)
  c = recipes.videomae("S", "ssv2", args.epochs)
  if args.runlocal:
    recipes.shrink_for_local_run(c)
  return c
