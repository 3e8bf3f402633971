"""TinyMIM ViT-S/16 student (6 heads, 12-head last block), MAE ViT-B/16 teacher, ImageNet-1k.

Recipe: amd_jax/recipes.py (tinymim_image), from OliverRensu/TinyMIM; method notes in docs/distillation.md.
Its workdir is the teacher of configs/tinymim_vit_t_in1k.py:sequential.

  python -m amd_jax.main --config configs/tinymim_vit_s_in1k.py --workdir DIR
      --config.data.path=<tfds data_dir> --config.teacher.checkpoint=<teacher>
  python -m amd_jax.main --config configs/tinymim_vit_s_in1k.py:runlocal --workdir /tmp/smoke   # tiny smoke run
"""
from amd_jax import config_base, recipes


def get_config(arg=None):
  args = config_base.parse_arg(arg, runlocal=False)
  c = recipes.tinymim_image("S")
  if args.runlocal:
    recipes.shrink_distill_for_local_run(c)
  return c
