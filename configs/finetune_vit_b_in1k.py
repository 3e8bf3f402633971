"""ViT-B/16 fine-tuning on ImageNet-1k, the MAE recipe (facebookresearch/mae FINETUNE.md).

  python -m amd_jax.main --config configs/finetune_vit_b_in1k.py --workdir DIR \\
      --config.finetune.init=PRETRAIN_WORKDIR_OR_PTH

See amd_jax/recipes.py (finetune_image).
"""
from amd_jax import config_base, recipes


def get_config(arg=None):
  args = config_base.parse_arg(arg, runlocal=False)
  c = recipes.finetune_image("B")
  if args.runlocal:
    recipes.shrink_finetune_for_local_run(c)
  return c
