"""VideoMAE ViT-B/16 pre-training on Kinetics-400, the official recipe.

Tube mask 0.9, 16 frames at sampling stride 4, tubelet 2x16x16, multi-scale crop,
no flip (as the official script), per-patch-per-channel norm-pix target,
decoder 384 wide / 4 deep / 6 heads, AdamW (0.9, 0.95), wd 0.05, lr 1.5e-4 per 256
clips (1.2e-3 at the official global batch 2048), 40 warmup epochs, min lr 1e-5,
1600 epochs (800 also reported).
Data: a VideoMAE-style annotation file ("path label" per line) via --config.data.path
and --config.data.video_root.
"""
from amd_jax import config_base, recipes


def get_config(arg=None):
  args = config_base.parse_arg(arg, epochs=1600, runlocal=False)
  c = config_base.base_config()
  c.method = "videomae"
  c.data.update(source="video_list", modality="video", path="", video_root="", split="train",
                image_size=224, channels=3, num_frames=16, sampling_rate=4,
                mean="0.485,0.456,0.406", std="0.229,0.224,0.225", hflip=False,
                multiscale_scales="1,0.875,0.75,0.66", num_workers=32, num_classes=400)
  c.model.update(variant="B", patch_size=16, tubelet_size=2, cls_token=False, qkv_bias="qv",
                 pos_emb="sincos1d", dtype="bfloat16", scan=True)
  c.decoder.update(width=384, depth=4, num_heads=6)
  c.mask.update(ratio=0.9, kind="tube")
  c.norm_pix_loss = True
  c.batch_size = 2048
  c.num_epochs = float(args.epochs)
  c.optim.update(base_lr=1.5e-4, warmup_epochs=40.0, b1=0.9, b2=0.95, weight_decay=0.05, min_lr=1e-5)
  c.log_every_steps = 100
  c.checkpoint_every_steps = 2000
  if args.runlocal:
    recipes.shrink_for_local_run(c)
  return c
