"""Quickstart: MAE pre-training of a small ViT on Fashion-MNIST, then kNN + linear probe.

Runs offline on 2 CPU cores in a few minutes:
  python -m amd_jax.main --config configs/quickstart.py --workdir /tmp/amd_jax_quickstart
Argument `:runlocal` shrinks it to a smoke run (a few steps).
"""
from amd_jax import config_base


def get_config(arg=None):
  args = config_base.parse_arg(arg, runlocal=False)
  c = config_base.base_config()
  c.method = "mae"
  c.data.source = "fashion_mnist"
  c.data.image_size = 28
  c.data.channels = 1
  c.data.crop_scale_min = 0.5   # small grey images: MAE's 0.2 throws away most of a garment
  c.data.hflip = True
  c.model.update(variant="S", width=96, depth=4, num_heads=3, patch_size=4, cls_token=True,
                 qkv_bias="fused", pos_emb="sincos2d")
  c.decoder.update(width=64, depth=2, num_heads=2)
  c.mask.update(ratio=0.75, kind="random")
  c.batch_size = 256
  c.num_epochs = 4.0
  c.optim.update(base_lr=1.5e-4 * 4, warmup_epochs=0.5, weight_decay=0.05, b2=0.95, min_lr=1e-5)
  c.log_every_steps = 50
  c.checkpoint_every_steps = 200
  c.eval.update(probe=True, probe_epochs=20, probe_batch_size=256)
  if args.runlocal:
    c.num_epochs = -1.0
    c.total_steps = 10
    c.log_every_steps = 5
    c.checkpoint_every_steps = 5
    c.eval.max_train_examples = 2048
    c.eval.probe_epochs = 2
  return c
