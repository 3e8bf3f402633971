"""Fine-tuning on Fashion-MNIST: the quickstart's encoders as classifiers (offline, 2 CPU cores).

Arguments (comma-separated):
  init=WORKDIR     the pre-training run whose encoder is fine-tuned ('' = from scratch)
  size=student     student (64 wide, the quickstart's MAE/AMD students) | teacher (128 wide)
  method=finetune  finetune | g2sd_sd (G2SD specific distillation; needs teacher=WORKDIR, a
                   fine-tuned teacher-size classifier)
  teacher=WORKDIR  g2sd_sd only
  epochs=2         fine-tuning epochs
  runlocal         8 steps on 2,048 test images (smoke run)

  python -m amd_jax.main --config configs/finetune_fmnist.py:init=/tmp/qs/amd --workdir /tmp/qs/ft_amd

Recipe (amd_jax's, for a short run at this scale): AdamW (0.9, 0.999), wd 0.05, lr 2e-3 at
batch 256 with 0.3 warmup epochs then cosine, layer decay 0.75, drop path 0.1, label
smoothing 0.1, light mixup (0.2) and no cutmix / RandAugment / erasing (a 2-epoch run on
28x28 images gains nothing from heavy regularisation), RandomResizedCrop(0.5, 1) + flip,
mean pooling + fc_norm. docs/finetune.md has the measured table.
"""
from amd_jax import config_base, recipes

SIZES = {"student": dict(variant="S", width=64, depth=4, num_heads=2),
         "teacher": dict(variant="S", width=128, depth=4, num_heads=4)}


def _image_model(model, size: str):
  model.update(patch_size=4, cls_token=True, qkv_bias="fused", pos_emb="sincos2d", dtype="float32", scan=False,
               **SIZES[size])


def get_config(arg=None):
  args = config_base.parse_arg(arg, init="", size="student", method="finetune", teacher="", epochs=2.0,
                               runlocal=False)
  if args.size not in SIZES:
    raise ValueError(f"finetune_fmnist size={args.size!r}; allowed: {', '.join(SIZES)}")
  if args.method not in ("finetune", "g2sd_sd"):
    raise ValueError(f"finetune_fmnist method={args.method!r}; allowed: finetune, g2sd_sd")
  c = recipes.with_method_fields(config_base.base_config(), args.method)
  c.data.update(source="fashion_mnist", image_size=28, channels=1, mean="0.2860", std="0.3530",
                crop_scale_min=0.5, hflip=True, num_classes=0)   # 0: counted from the data (Fashion-MNIST: 10)
  _image_model(c.model, args.size)
  c.model.drop_path = 0.1
  c.finetune.update(init=args.init, pool="mean", head_init_scale=1e-3, layer_decay=0.75, mixup=0.2, cutmix=0.0,
                    mixup_prob=1.0, label_smoothing=0.1)
  if args.method == "g2sd_sd":
    _image_model(c.teacher.model, "teacher")
    c.teacher.update(checkpoint=args.teacher, pool="mean")
    c.distill.update(kind="hard", alpha=0.5, temperature=1.0)
  c.batch_size = 256
  c.num_epochs = args.epochs
  c.optim.update(lr=2e-3, warmup_epochs=0.3, b1=0.9, b2=0.999, weight_decay=0.05, min_lr=1e-6)
  c.log_every_steps = 50
  c.checkpoint_every_steps = 500
  c.eval.update(probe=False, every_steps=0, batch_size=1000)
  if args.runlocal:
    c.num_epochs, c.total_steps = -1.0, 8
    c.log_every_steps = c.checkpoint_every_steps = 4
  return c
