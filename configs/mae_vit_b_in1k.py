"""ImageMAE ViT-B/16 pre-training on ImageNet-1k, the official recipe (facebookresearch/mae).

800 epochs, global batch 4096, blr 1.5e-4 (lr = blr * 4096 / 256 = 2.4e-3), 40 warmup epochs,
AdamW (0.9, 0.95) wd 0.05, norm-pix loss, mask 0.75, RandomResizedCrop(0.2, 1) + flip.
Decoder 512 wide, 8 deep, 16 heads. Data: an ImageNet tfds dataset the user prepared
(--config.data.path=<tfds data_dir>) or class folders (--config.data.source=image_folder).
"""
from amd_jax import config_base, recipes


def get_config(arg=None):
  args = config_base.parse_arg(arg, epochs=800, runlocal=False)
  c = config_base.base_config()
  c.method = "mae"
  c.data.update(source="tfds", tfds_name="imagenet2012", split="train", eval_split="validation",
                image_size=224, channels=3, mean="0.485,0.456,0.406", std="0.229,0.224,0.225",
                crop_scale_min=0.2, crop_scale_max=1.0, hflip=True, num_workers=32, num_classes=1000)
  c.model.update(variant="B", patch_size=16, cls_token=True, qkv_bias="fused", pos_emb="sincos2d",
                 dtype="bfloat16", scan=True, remat="none")
  c.decoder.update(width=512, depth=8, num_heads=16)
  c.mask.update(ratio=0.75, kind="random")
  c.norm_pix_loss = True
  c.batch_size = 4096
  c.num_epochs = float(args.epochs)
  c.optim.update(base_lr=1.5e-4, warmup_epochs=40.0, b1=0.9, b2=0.95, weight_decay=0.05, min_lr=0.0)
  c.log_every_steps = 100
  c.checkpoint_every_steps = 2000
  if args.runlocal:
    recipes.shrink_for_local_run(c)
  return c
