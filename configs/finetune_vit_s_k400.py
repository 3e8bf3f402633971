"""ViT-S/16 fine-tuning on Kinetics-400, the AMD / VideoMAE recipe (multi-view test).

Data: VideoMAE-style annotation files ("path label" per line) for the train and test splits:
  python -m amd_jax.main --config configs/finetune_vit_s_k400.py --workdir DIR \\
      --config.data.path=LISTS_DIR --config.data.video_root=/data/videos \\
      --config.finetune.init=PRETRAIN_WORKDIR_OR_PTH

See amd_jax/recipes.py (finetune_video).
"""
from amd_jax import config_base, recipes


def get_config(arg=None):
  args = config_base.parse_arg(arg, runlocal=False)
  c = recipes.finetune_video("S", "k400")
  if args.runlocal:
    recipes.shrink_finetune_for_local_run(c)
  return c
