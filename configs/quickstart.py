"""Quickstart on Fashion-MNIST (offline, 2 CPU cores): the three pre-training runs of the story.

Stages (config argument `stage`):
  teacher  MAE pre-training of the larger ViT that serves as teacher (the default);
  mae      MAE pre-training of the small student-size ViT (the baseline);
  amd      AMD distillation of the same small ViT from the teacher; needs `teacher=WORKDIR`.
Each run ends with kNN and linear-probe accuracy on frozen features.

  python -m amd_jax.main --config configs/quickstart.py --workdir /tmp/qs/teacher
  python -m amd_jax.main --config configs/quickstart.py:stage=amd,teacher=/tmp/qs/teacher --workdir /tmp/qs/amd
`python -m amd_jax.quickstart --workdir DIR` runs all three plus the controls and prints the table.

Scale: 28x28 grey images in 7x7 patches of 4 pixels (49 tokens), a 128-wide 4-deep
teacher and a 64-wide 4-deep student, chosen so that all three runs and their
evaluation fit in about 15 minutes on 2 CPU cores (see docs/quickstart.md).
"""
from amd_jax import config_base, recipes

STUDENT = dict(variant="S", width=64, depth=4, num_heads=2)
TEACHER = dict(variant="S", width=128, depth=4, num_heads=4)
EPOCHS = {"teacher": 3.0, "mae": 2.0, "amd": 2.0}
# Warmup as a share of each run (0.3 epochs on Fashion-MNIST): the same schedule shape on any data set size.
WARMUP = {"teacher": 0.1, "mae": 0.15, "amd": 0.15}


def _image_model(model, size: dict):
  model.update(patch_size=4, cls_token=True, qkv_bias="fused", pos_emb="sincos2d", **size)


def get_config(arg=None):
  args = config_base.parse_arg(arg, stage="teacher", teacher="", runlocal=False)
  if args.stage not in EPOCHS:
    raise ValueError(f"quickstart stage={args.stage!r}; allowed: {', '.join(EPOCHS)}")
  c = config_base.base_config()
  if args.stage == "amd":
    recipes.with_method_fields(c, "amd")
    _image_model(c.teacher.model, TEACHER)
    c.teacher.checkpoint = args.teacher
    c.teacher.mask_ratio = 0.5
    c.amd.update(student_layers="2,4", teacher_layers="2,4", align_loss="l2", shared_heads=True,
                 generator_depth=2, generator_heads=0)
  else:
    c.method = "mae"
  c.data.update(source="fashion_mnist", image_size=28, channels=1, mean="0.2860", std="0.3530",
                crop_scale_min=0.5, hflip=True, num_classes=10)
  _image_model(c.model, TEACHER if args.stage == "teacher" else STUDENT)
  c.decoder.update(width=64, depth=1, num_heads=2)
  c.mask.update(ratio=0.75, kind="random")
  c.norm_pix_loss = True
  c.batch_size = 256
  c.num_epochs = EPOCHS[args.stage]
  c.optim.update(base_lr=1e-3, warmup_fraction=WARMUP[args.stage], weight_decay=0.05, b1=0.9, b2=0.95, min_lr=1e-5)
  c.log_every_steps = 50
  c.checkpoint_every_steps = 200
  c.eval.update(probe=True, probe_epochs=30, probe_batch_size=256, max_train_examples=20000)
  if args.runlocal:
    c.num_epochs, c.total_steps = -1.0, 8
    c.log_every_steps = c.checkpoint_every_steps = 4
    c.eval.update(max_train_examples=1024, probe_epochs=2)
  return c
