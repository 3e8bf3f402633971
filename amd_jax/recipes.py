"""Official recipes as functions, so the files in configs/ stay one screen long.

Each function returns a complete ConfigDict (base config + the method's fields)
set to a published recipe; config files pick the size and data set.
"""
from __future__ import annotations

from amd_jax import config_base, methods
from amd_jax.models import vit

# ImageNet normalisation used by every official recipe.
IMAGENET_MEAN, IMAGENET_STD = "0.485,0.456,0.406", "0.229,0.224,0.225"

# (decoder width, depth, heads) of VideoMAE/AMD students.
VIDEO_DECODERS = {"S": (192, 4, 3), "B": (384, 4, 6)}
VIDEO_DATASETS = {  # frame stride and classes of the two video benchmarks
    "ssv2": dict(sampling_rate=2, num_classes=174),
    "k400": dict(sampling_rate=4, num_classes=400),
}


def with_method_fields(config, method: str):
  """Add the fields a method declares (Method.extra_config) to a base config."""
  config.method = method
  for key, value in methods.get_method_class(method).extra_config().items():
    config[key] = value
  return config


def video_model(model, variant: str):
  """VideoMAE encoder layout: no cls token, q/v bias, 1-D interleaved sincos, tubelets 2x16x16, and the
  official video code's initialisation."""
  model.update(variant=variant, patch_size=16, tubelet_size=2, cls_token=False, qkv_bias="qv",
               pos_emb="sincos1d", dtype="bfloat16", scan=True, init_scheme="videomae")


def image_model(model, variant: str):
  """ImageMAE encoder layout: cls token, fused qkv bias, 2-D sincos, 16x16 patches."""
  model.update(variant=variant, patch_size=16, cls_token=True, qkv_bias="fused", pos_emb="sincos2d",
               dtype="bfloat16", scan=True)


def videomae(variant: str, dataset: str, epochs: float):
  """VideoMAE pre-training (official scripts): tube mask 0.9, 16 frames, decoder 4 deep, no flip.

  lr 1.5e-4 per 256 clips (1.2e-3 at the official global batch 2048), 40 warmup epochs,
  min lr 1e-5, AdamW (0.9, 0.95), wd 0.05, per-patch-per-channel norm-pix target.
  """
  c = config_base.base_config()
  c.method = "videomae"
  ds = VIDEO_DATASETS[dataset]
  c.data.update(source="video_list", modality="video", image_size=224, channels=3, num_frames=16,
                sampling_rate=ds["sampling_rate"], mean=IMAGENET_MEAN, std=IMAGENET_STD, hflip=False,
                multiscale_scales="1,0.875,0.75,0.66", num_workers=32, num_classes=ds["num_classes"])
  video_model(c.model, variant)
  c.decoder.update(dict(zip(("width", "depth", "num_heads"), VIDEO_DECODERS[variant])))
  c.mask.update(ratio=0.9, kind="tube")
  c.norm_pix_loss = True
  c.batch_size = 2048
  c.num_epochs = float(epochs)
  c.optim.update(base_lr=1.5e-4, warmup_epochs=40.0, b1=0.9, b2=0.95, weight_decay=0.05, min_lr=1e-5)
  c.log_every_steps = 100
  c.checkpoint_every_steps = 2000
  return c


def amd_video(variant: str, dataset: str):
  """AMD video pre-training (official scripts): ViT-L VideoMAE teacher, mask 0.90 / 0.75 tube.

  Official: 32 GPUs x 16 clips with 4 repeated samples per clip = 2048 samples per
  step, 200 epochs ("800e" counting repeats), lr 2.4e-3 (1.2e-3 per 256 of the 512
  unique clips), 10 warmup epochs, min lr 2e-5, grad clip 0.02. Here the same:
  data.repeated_aug=4 (each decoded clip gives 4 independently cropped and masked
  samples, consecutive in the batch), batch 2048 = 512 distinct clips, 200 epochs of
  distinct clips (as many steps as the official run), 10 warmup epochs.
  """
  # The student side is VideoMAE's recipe; AMD adds the teacher and its own optimiser settings.
  c = with_method_fields(videomae(variant, dataset, epochs=800), "amd")
  video_model(c.teacher.model, "L")
  c.mask.update(ratio=0.90, kind="tube")
  c.teacher.mask_ratio = 0.75
  c.amd.update(student_layers="6,12", teacher_layers="12,24", align_loss="l2", shared_heads=True)
  c.batch_size = 2048
  c.data.repeated_aug = 4
  c.num_epochs = 200.0
  c.optim.update(lr=2.4e-3, min_lr=2e-5, warmup_epochs=10.0, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.05,
                 grad_clip=0.02)
  c.log_every_steps = 100
  c.checkpoint_every_steps = 2000
  return c


def amd_image(variant: str):
  """AMD on ImageMAE (ImageNet-1k). The official image code is not released: amd_jax's choices.

  Teacher: facebookresearch/mae ViT-L/16 (as the AMD maintainers say). Student mask
  0.75 (ImageMAE's), teacher mask 0.5 (the teacher sees twice the student's tokens),
  layer pairs (6,12) <-> (12,24) as in the video code, the MAE pre-training recipe:
  batch 4096, blr 1.5e-4, 40 warmup epochs, 800 epochs, RandomResizedCrop(0.2, 1) + flip.
  """
  c = with_method_fields(config_base.base_config(), "amd")
  c.data.update(source="tfds", tfds_name="imagenet2012", split="train", eval_split="validation",
                image_size=224, channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_scale_min=0.2,
                crop_scale_max=1.0, hflip=True, num_workers=32, num_classes=1000)
  image_model(c.model, variant)
  c.decoder.update(width=512, depth=8, num_heads=16)
  image_model(c.teacher.model, "L")
  c.mask.update(ratio=0.75, kind="random")
  c.teacher.mask_ratio = 0.5
  c.amd.update(student_layers="6,12", teacher_layers="12,24", align_loss="l2", shared_heads=True)
  c.batch_size = 4096
  c.num_epochs = 800.0
  c.optim.update(base_lr=1.5e-4, warmup_epochs=40.0, b1=0.9, b2=0.95, weight_decay=0.05, min_lr=0.0)
  c.log_every_steps = 100
  c.checkpoint_every_steps = 2000
  return c


def shrink_for_local_run(c):
  """`:runlocal` — the same config on tiny synthetic data and models, for a laptop smoke run."""
  video = c.data.modality == "video"
  c.data.update(source="synthetic", image_size=32, synthetic_size=16, num_workers=0, num_frames=4)
  for m in [c.model] + ([c.teacher.model] if "teacher" in c else []):
    m.update(variant="tiny", patch_size=8, dtype="float32", scan=False)
  c.decoder.update(width=32, depth=1, num_heads=2)
  if "amd" in c:
    c.teacher.checkpoint = "random"
    c.amd.update(student_layers="1,2", teacher_layers="1,2", generator_heads=2)
  c.batch_size, c.num_epochs, c.total_steps = (4 if video else 8), -1.0, 3
  c.optim.update(warmup_steps=1, warmup_epochs=-1.0, warmup_fraction=-1.0)   # the recipe's warmup outlasts 3 steps
  c.log_every_steps = c.checkpoint_every_steps = 1
  return c


# --------------------------------------------------------------------------- related distillation methods
# Each repository's student layout, by encoder variant. Head counts are explicit: they change the
# meaning of attention / relation targets but not the weight shapes.
DMAE_STUDENTS = {"Ti": dict(num_heads=12, decoder=(96, 1, 3)),     # MAE-lite mae_vit_tiny_patch16
                 "S": dict(num_heads=12, decoder=(192, 1, 6))}     # MAE-lite mae_vit_small_patch16
TINYMIM_STUDENTS = {"Ti": dict(num_heads=6, last_heads=12),        # tinymim_vit_tiny_patch16
                    "S": dict(num_heads=6, last_heads=12)}         # tinymim_vit_small_patch16
G2SD_STUDENTS = {"Ti": dict(num_heads=3, decoder=(128, 4, 4)),     # mae_vit_tiny_patch16_dec128d4b
                 "S": dict(num_heads=6, decoder=(256, 4, 8))}      # mae_vit_small_patch16_dec256d4b


def _imagenet(c, crop_scale_min: float):
  c.data.update(source="tfds", tfds_name="imagenet2012", split="train", eval_split="validation",
                image_size=224, channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_scale_min=crop_scale_min,
                crop_scale_max=1.0, hflip=True, num_workers=32, num_classes=1000)
  c.log_every_steps = 100
  c.checkpoint_every_steps = 2000


def _mae_teacher(model, variant: str = "B", scan: bool = True):
  """A facebookresearch/mae encoder as teacher (12 heads for ViT-B, 16 for ViT-L), heads explicit."""
  image_model(model, variant)
  model.update(num_heads=vit_heads(variant), scan=scan)


def vit_heads(variant: str) -> int:
  return vit.VARIANTS[variant][2]


def dmae_image(variant: str):
  """D-MAE / MAE-lite (wangsr126/mae-lite, mae_lite_distill_exp.py) on ImageNet-1k.

  Student ViT-Ti or ViT-S with 12 heads (MAE-lite's change), decoder 1 block; teacher
  MAE ViT-B/16 on the same visible tokens; attention-logit distillation at block 12 <->
  12 with the head adapter, no hidden distillation; L = L_MAE + 1.0 * L_attn. 400 epochs,
  batch 4096, lr 2.4e-3 (1.5e-4 per 256), 40 warmup epochs, cosine to 0, AdamW (0.9,
  0.95), wd 0.05, RandomResizedCrop(0.08, 1) + flip, mask 0.75, norm-pix target.
  Unscanned stacks: attention logits are read inside the blocks.
  """
  s = DMAE_STUDENTS[variant]
  c = with_method_fields(config_base.base_config(), "dmae")
  _imagenet(c, crop_scale_min=0.08)
  image_model(c.model, variant)
  c.model.update(num_heads=s["num_heads"], scan=False)
  c.decoder.update(dict(zip(("width", "depth", "num_heads"), s["decoder"])))
  _mae_teacher(c.teacher.model, "B", scan=False)
  c.mask.update(ratio=0.75, kind="random")
  c.norm_pix_loss = True
  c.dmae.update(attn_student_layers="12", attn_teacher_layers="12", factor_attn=1.0, attn_adapter=True,
                hidden_student_layers="", hidden_teacher_layers="", factor_rec=1.0)
  c.batch_size = 4096
  c.num_epochs = 400.0
  c.optim.update(base_lr=1.5e-4, warmup_epochs=40.0, b1=0.9, b2=0.95, weight_decay=0.05, min_lr=0.0)
  return c


def tinymim_image(variant: str, sequential: bool = False):
  """TinyMIM (OliverRensu/TinyMIM) on ImageNet-1k.

  Student ViT-Ti or ViT-S with 6 heads and a 12-head last block; teacher MAE ViT-B/16
  (12 heads), relations at its block 12; Q-K and V-V relation KL 1:1; unmasked input,
  ColorJitter 0.4 on the student's view; drop path 0.1 on blocks 1..11. 300 epochs,
  batch 4096, lr 2.4e-3 (1.5e-4 per 256), 15 warmup epochs, AdamW (0.9, 0.95), wd 0.05,
  RandomResizedCrop(0.2, 1) + flip. (The README's command: 2048 images per step at the
  same 1.5e-4 per 256.) `sequential`: the teacher is a TinyMIM ViT-S student (384 wide,
  6 heads, 12-head last block; its workdir as teacher.checkpoint), relations at its
  last block: B -> S -> T.
  """
  s = TINYMIM_STUDENTS[variant]
  c = with_method_fields(config_base.base_config(), "tinymim")
  _imagenet(c, crop_scale_min=0.2)
  image_model(c.model, variant)
  c.model.update(num_heads=s["num_heads"], scan=False, drop_path=0.1)
  if sequential:
    image_model(c.teacher.model, "S")
    c.teacher.model.update(num_heads=TINYMIM_STUDENTS["S"]["num_heads"], scan=False)
    c.tinymim.update(teacher_layer=12, teacher_last_heads=TINYMIM_STUDENTS["S"]["last_heads"])
  else:
    _mae_teacher(c.teacher.model, "B", scan=False)
    c.tinymim.update(teacher_layer=12, teacher_last_heads=0)
  c.tinymim.update(student_last_heads=s["last_heads"], factor_qk=1.0, factor_vv=1.0, color_jitter=0.4,
                   constant_drop_path=True)
  c.batch_size = 4096
  c.num_epochs = 300.0
  c.optim.update(base_lr=1.5e-4, warmup_epochs=15.0, b1=0.9, b2=0.95, weight_decay=0.05, min_lr=0.0)
  return c


def g2sd_image(variant: str):
  """G2SD generic distillation (pengzhiliang/G2SD, GD.sh) on ImageNet-1k.

  Student ViT-Ti (3 heads, decoder 128 wide x 4, 4 heads) or ViT-S (6 heads, decoder 256
  x 4, 8 heads); teacher the whole MAE ViT-B/16 including its decoder (512 x 8, 16
  heads): targets are its decoder block-4 features, LayerNorm-ed, on all tokens;
  smooth-L1 with beta 2. One shared mask at 0.75. 300 epochs, batch 4096, lr 2.4e-3
  (1.5e-4 per 256), 10 warmup epochs, min lr 2.5e-6, AdamW (0.9, 0.95), wd 0.05,
  RandomResizedCrop(0.2, 1) + flip. The teacher checkpoint must include the decoder.
  """
  s = G2SD_STUDENTS[variant]
  c = with_method_fields(config_base.base_config(), "g2sd")
  _imagenet(c, crop_scale_min=0.2)
  image_model(c.model, variant)
  c.model.update(num_heads=s["num_heads"])
  c.decoder.update(dict(zip(("width", "depth", "num_heads"), s["decoder"])))
  _mae_teacher(c.teacher.model, "B")
  c.teacher.decoder.update(width=512, depth=8, num_heads=16)
  c.mask.update(ratio=0.75, kind="random")
  c.g2sd.update(teacher_decoder_layer=4, tokens="all", loss="smooth_l1", smooth_l1_beta=2.0)
  c.batch_size = 4096
  c.num_epochs = 300.0
  c.optim.update(base_lr=1.5e-4, warmup_epochs=10.0, b1=0.9, b2=0.95, weight_decay=0.05, min_lr=2.5e-6)
  return c


def shrink_distill_for_local_run(c):
  """`:runlocal` for the D-MAE / TinyMIM / G2SD recipes: tiny synthetic run with a random teacher."""
  shrink_for_local_run(c)
  for m in (c.model, c.teacher.model):
    m.update(width=0, depth=0, num_heads=0, drop_path=0.0)  # the 'tiny' variant: 32 wide, 2 deep, 2 heads
  c.teacher.checkpoint = "random"
  if c.method == "dmae":
    c.dmae.update(attn_student_layers="2", attn_teacher_layers="2")
  elif c.method == "tinymim":
    c.tinymim.update(teacher_layer=2, student_last_heads=2, teacher_last_heads=0)
  elif c.method == "g2sd":
    c.teacher.decoder.update(width=32, depth=2, num_heads=2)
    c.g2sd.teacher_decoder_layer = 1
  return c


# --------------------------------------------------------------------------- fine-tuning
# (blr per 256 examples, layer decay, epochs) of the official fine-tuning scripts.
IMAGE_FINETUNE = {"S": dict(base_lr=5e-4, layer_decay=0.75, epochs=100.0),   # MAE recipe; 0.75 for ViT-S (ours)
                  "B": dict(base_lr=5e-4, layer_decay=0.65, epochs=100.0)}   # facebookresearch/mae FINETUNE.md
VIDEO_FINETUNE = {("S", "ssv2"): dict(base_lr=1e-3, epochs=40.0, clips=2),   # AMD scripts (finetune)
                  ("B", "ssv2"): dict(base_lr=5e-4, epochs=30.0, clips=2),
                  ("S", "k400"): dict(base_lr=1e-3, epochs=150.0, clips=5),
                  ("B", "k400"): dict(base_lr=5e-4, epochs=90.0, clips=5)}


def _finetune_common(c, *, base_lr: float, layer_decay: float, epochs: float, batch_size: int,
                     warmup_epochs: float = 5.0):
  """AdamW (0.9, 0.999), wd 0.05, warmup then cosine to 1e-6, drop path 0.1, mixup 0.8 / cutmix 1.0,
  label smoothing 0.1, mean pooling + fc_norm: what MAE, VideoMAE and AMD fine-tuning share."""
  c.finetune.update(pool="mean", head_init_scale=1e-3, layer_decay=layer_decay, mixup=0.8, cutmix=1.0,
                    mixup_prob=1.0, mixup_switch_prob=0.5, label_smoothing=0.1)
  c.model.drop_path = 0.1
  c.batch_size = batch_size
  c.num_epochs = float(epochs)
  c.optim.update(base_lr=base_lr, lr=-1.0, warmup_epochs=warmup_epochs, b1=0.9, b2=0.999, eps=1e-8,
                 weight_decay=0.05, min_lr=1e-6, grad_clip=0.0)
  c.eval.update(probe=False, every_steps=5000)
  c.log_every_steps = 100
  c.checkpoint_every_steps = 2000
  return c


def finetune_image(variant: str, method: str = "finetune"):
  """ImageNet-1k fine-tuning, facebookresearch/mae's recipe (FINETUNE.md).

  Batch 1024, blr 5e-4, layer decay 0.65 (ViT-B; 0.75 for ViT-S, amd_jax's choice), 100
  epochs with 5 warmup, drop path 0.1, RandAugment m9-mstd0.5-inc1, random erasing 0.25,
  RandomResizedCrop(0.08, 1) + flip, mixup 0.8, cutmix 1.0, smoothing 0.1, global pool.
  Set --config.finetune.init to the pre-training workdir (or an official .pth).
  """
  r = IMAGE_FINETUNE[variant]
  c = with_method_fields(config_base.base_config(), method)
  _imagenet(c, crop_scale_min=0.08)
  # eval: resize 256, centre crop 224 (crop ratio 0.875), as the official eval transform.
  c.data.update(randaugment="rand-m9-mstd0.5-inc1", random_erase=0.25, eval_crop_ratio=0.875)
  image_model(c.model, variant)
  return _finetune_common(c, base_lr=r["base_lr"], layer_decay=r["layer_decay"], epochs=r["epochs"],
                          batch_size=1024)


def finetune_video(variant: str, dataset: str):
  """SSv2 / K400 fine-tuning, the AMD (VideoMAE) scripts' recipe.

  AdamW (0.9, 0.999), wd 0.05, layer decay 0.75, drop path 0.1, 5 warmup epochs, min lr
  1e-6, mixup 0.8, cutmix 1.0, smoothing 0.1, RandAugment m7-n4-mstd0.5-inc1, random
  erasing 0.25, RandomResizedCrop(0.08, 1), no flip on SSv2, repeated augmentation 2;
  blr 1e-3 (S) / 5e-4 (B); SSv2 40 / 30 epochs, K400 150 / 90 epochs; test views 2 clips
  x 3 crops (SSv2) or 5 x 3 (K400), softmax averaged. Global batch 384 (amd_jax's choice;
  the lr follows it per 256).
  """
  r = VIDEO_FINETUNE[(variant, dataset)]
  ds = VIDEO_DATASETS[dataset]
  c = with_method_fields(config_base.base_config(), "finetune")
  c.data.update(source="video_list", modality="video", image_size=224, channels=3, num_frames=16,
                sampling_rate=ds["sampling_rate"], mean=IMAGENET_MEAN, std=IMAGENET_STD,
                hflip=dataset != "ssv2", num_workers=32, num_classes=ds["num_classes"], split="train",
                eval_split="test", train_crop="rrc", crop_scale_min=0.08, crop_scale_max=1.0,
                randaugment="rand-m7-n4-mstd0.5-inc1", random_erase=0.25, repeated_aug=2,
                test_num_clips=r["clips"], test_num_crops=3)
  video_model(c.model, variant)
  _finetune_common(c, base_lr=r["base_lr"], layer_decay=0.75, epochs=r["epochs"], batch_size=384)
  c.eval.batch_size = 64   # each example carries clips x crops views
  return c


def g2sd_specific_image(variant: str):
  """G2SD specific distillation on ImageNet-1k (pengzhiliang/G2SD, SD scripts).

  Student with a distillation token and head, teacher an MAE ViT-B/16 FINE-TUNED on
  ImageNet (mean pooling + fc_norm) fed the same mixed batch; hard distillation (CE to
  the teacher's argmax) weighted 0.5 / 0.5; both heads averaged at test time. 200 epochs,
  batch 1024, lr 4e-3, layer decay 0.75, mixup 0.8, cutmix 1.0, smoothing 0.1, random
  erasing 0.25, RandAugment m9-mstd0.5-inc1. Set --config.teacher.checkpoint (the
  fine-tuned teacher: a finetune workdir or .pth) and --config.finetune.init (the
  G2SD generic-distillation workdir).
  """
  c = finetune_image(variant, method="g2sd_sd")
  c.model.num_heads = G2SD_STUDENTS[variant]["num_heads"]
  _mae_teacher(c.teacher.model, "B")
  c.teacher.pool = "mean"
  c.distill.update(kind="hard", alpha=0.5, temperature=1.0)
  _finetune_common(c, base_lr=5e-4, layer_decay=0.75, epochs=200.0, batch_size=1024)
  c.optim.lr = 4e-3
  return c


def shrink_finetune_for_local_run(c):
  """`:runlocal` for fine-tuning recipes: tiny synthetic data and model, from scratch, a few steps."""
  shrink_for_local_run(c)
  c.model.update(width=0, depth=0, num_heads=0)
  c.data.update(num_classes=4, repeated_aug=1, test_num_clips=1, test_num_crops=1)
  c.finetune.init = ""
  c.eval.update(every_steps=0, batch_size=0)
  if "teacher" in c:
    c.teacher.model.update(width=0, depth=0, num_heads=0)
    c.teacher.checkpoint = "random"
  return c
