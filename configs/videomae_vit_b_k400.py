"""VideoMAE ViT-B/16 on Kinetics-400 (1600 epochs, 800 also reported; frame stride 4): the official recipe.

See amd_jax/recipes.py (videomae). Data: a VideoMAE-style annotation file ("path label" per line)
via --config.data.path and --config.data.video_root.
"""
from amd_jax import config_base, recipes


def get_config(arg=None):
  args = config_base.parse_arg(arg, epochs=1600, runlocal=False)
  c = recipes.videomae("B", "k400", args.epochs)
  if args.runlocal:
    recipes.shrink_for_local_run(c)
  return c
