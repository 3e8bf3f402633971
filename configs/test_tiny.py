"""A tiny config for tests: synthetic data, the 'tiny' ViT, a few steps. Runs in seconds on a CPU.

  python -m amd_jax.main --config configs/test_tiny.py --workdir /tmp/amd_jax_tiny
  python -m amd_jax.main --config configs/test_tiny.py:video --workdir /tmp/amd_jax_tiny_video

Arguments (comma-separated, amd_jax.config_base.parse_arg):
  video      tiny VideoMAE on synthetic clips (tube mask, q/v bias, 1-D sincos, no cls token)
  amd        tiny AMD student of a tiny MAE teacher (this config's own model; give the teacher with
             --config.teacher.checkpoint=WORKDIR|FILE, or 'random')
  steps=N    total_steps (default 4)
  batch=N    global batch size (default 8)
  width=N    encoder width (default 0: the 'tiny' variant's 32)
"""
from amd_jax import config_base, recipes


def get_config(arg=None):
  args = config_base.parse_arg(arg, video=False, amd=False, steps=4, batch=8, width=0)
  c = config_base.base_config()
  c.method = "mae"
  c.seed = 0
  c.data.update(source="synthetic", modality="image", path="", split="train", eval_split="test",
                image_size=16, channels=1, mean="0.5", std="0.25", synthetic_size=64,
                crop_scale_min=0.5, crop_scale_max=1.0, hflip=True, num_workers=0, prefetch=2,
                num_classes=4)
  c.model.update(variant="tiny", width=args.width, patch_size=4, cls_token=True, qkv_bias="fused",
                 pos_emb="sincos2d", dtype="float32", scan=False, remat="none")
  c.decoder.update(width=32, depth=1, num_heads=2)
  c.mask.update(ratio=0.75, kind="random")
  c.norm_pix_loss = True
  c.batch_size = args.batch
  c.total_steps = args.steps
  c.num_epochs = -1.0
  c.optim.update(base_lr=1.5e-4, lr=1e-3, warmup_steps=1, min_lr=0.0, weight_decay=0.05)
  c.log_every_steps = 1
  c.checkpoint_every_steps = 2
  c.keep_checkpoints = 10
  c.eval.update(probe=False)
  if args.video:
    c.method = "videomae"
    c.data.update(modality="video", channels=3, num_frames=4, sampling_rate=1, mean="0.485,0.456,0.406",
                  std="0.229,0.224,0.225", hflip=False, multiscale_scales="1,0.875", synthetic_size=32)
    c.model.update(tubelet_size=2, cls_token=False, qkv_bias="qv", pos_emb="sincos1d")
    c.mask.update(ratio=0.75, kind="tube")
  if args.amd:
    recipes.with_method_fields(c, "amd")
    c.teacher.model.update(c.model.to_dict())
    c.teacher.model.width = 32   # the teacher is the plain tiny MAE, whatever the student's width
    c.teacher.mask_ratio = 0.5
    c.amd.update(student_layers="1,2", teacher_layers="1,2", generator_heads=2, generator_depth=1)
  return c
