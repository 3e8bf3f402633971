"""D-MAE (MAE-lite) ViT-Ti/16 student with 12 heads, MAE ViT-B/16 teacher, ImageNet-1k.

Recipe: amd_jax/recipes.py (dmae_image), from wangsr126/mae-lite's mae_lite_distill_exp.py; method notes in
docs/distillation.md. Teacher: facebookresearch/mae mae_pretrain_vit_base.pth or an amd_jax MAE ViT-B workdir.

  python -m amd_jax.main --config configs/dmae_vit_t_in1k.py --workdir DIR
      --config.data.path=<tfds data_dir> --config.teacher.checkpoint=<teacher>
  python -m amd_jax.main --config configs/dmae_vit_t_in1k.py:runlocal --workdir /tmp/smoke   # tiny smoke run
"""
from amd_jax import config_base, recipes


def get_config(arg=None):
  args = config_base.parse_arg(arg, runlocal=False)
  c = recipes.dmae_image("Ti")
  if args.runlocal:
    recipes.shrink_distill_for_local_run(c)
  return c
