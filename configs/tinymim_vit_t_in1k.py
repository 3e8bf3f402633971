"""TinyMIM ViT-Ti/16 student (6 heads, 12-head last block), ImageNet-1k.

Recipe: amd_jax/recipes.py (tinymim_image), from OliverRensu/TinyMIM; method notes in docs/distillation.md.
Teacher: MAE ViT-B/16 (relations at block 12). `:sequential` distils from a TinyMIM ViT-S student instead
(B -> S -> T): give the workdir of a configs/tinymim_vit_s_in1k.py run as teacher.checkpoint.

  python -m amd_jax.main --config configs/tinymim_vit_t_in1k.py --workdir DIR
      --config.data.path=<tfds data_dir> --config.teacher.checkpoint=<teacher>
  python -m amd_jax.main --config configs/tinymim_vit_t_in1k.py:runlocal --workdir /tmp/smoke   # tiny smoke run
  python -m amd_jax.main --config configs/tinymim_vit_t_in1k.py:sequential --workdir DIR_T
      --config.data.path=<tfds data_dir> --config.teacher.checkpoint=DIR_S
"""
from amd_jax import config_base, recipes


def get_config(arg=None):
  args = config_base.parse_arg(arg, runlocal=False, sequential=False)
  c = recipes.tinymim_image("Ti", sequential=args.sequential)
  if args.runlocal:
    recipes.shrink_distill_for_local_run(c)
  return c
