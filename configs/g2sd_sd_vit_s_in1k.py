"""G2SD specific distillation of a ViT-S/16 on ImageNet-1k (distillation token, hard distillation).

  python -m amd_jax.main --config configs/g2sd_sd_vit_s_in1k.py --workdir DIR \\
      --config.finetune.init=G2SD_GENERIC_WORKDIR \\
      --config.teacher.checkpoint=FINETUNED_VIT_B_WORKDIR_OR_PTH

See amd_jax/recipes.py (g2sd_specific_image).
"""
from amd_jax import config_base, recipes


def get_config(arg=None):
  args = config_base.parse_arg(arg, runlocal=False)
  c = recipes.g2sd_specific_image("S")
  if args.runlocal:
    recipes.shrink_finetune_for_local_run(c)
  return c
