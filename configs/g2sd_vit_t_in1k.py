"""G2SD generic distillation, ViT-Ti/16 student (3 heads, decoder 128 x 4), MAE ViT-B/16 teacher, ImageNet-1k.

Recipe: amd_jax/recipes.py (g2sd_image), from pengzhiliang/G2SD GD.sh; method notes in docs/distillation.md.
The teacher must include its DECODER: an amd_jax MAE ViT-B workdir, or facebookresearch/mae's
mae_pretrain_vit_base_full.pth (not the encoder-only mae_pretrain_vit_base.pth).

  python -m amd_jax.main --config configs/g2sd_vit_t_in1k.py --workdir DIR
      --config.data.path=<tfds data_dir> --config.teacher.checkpoint=<teacher>
  python -m amd_jax.main --config configs/g2sd_vit_t_in1k.py:runlocal --workdir /tmp/smoke   # tiny smoke run
"""
from amd_jax import config_base, recipes


def get_config(arg=None):
  args = config_base.parse_arg(arg, runlocal=False)
  c = recipes.g2sd_image("Ti")
  if args.runlocal:
    recipes.shrink_distill_for_local_run(c)
  return c
