"""The default config every amd_jax config file starts from.

Config files in configs/ call `base_config()` and override what their recipe
changes, so every run carries every field (and the validator can insist that no
field is unknown). Durations are given in steps or epochs (one of them, the
other left at -1); train.loop converts epochs to steps once, from the data
source's size.

Tuple-valued fields are avoided on purpose: they do not survive command-line
overrides. Sequences that users override (mean/std, layer lists) are strings of
comma-separated numbers, parsed by `parse_floats` / `parse_ints`.
"""
from __future__ import annotations

import ml_collections


def parse_floats(text: str) -> tuple[float, ...]:
  """'0.5,0.25' -> (0.5, 0.25). Empty string -> ()."""
  return tuple(float(t) for t in str(text).replace(" ", "").split(",") if t)


def parse_ints(text: str) -> tuple[int, ...]:
  """'6,12' -> (6, 12). Empty string -> ()."""
  return tuple(int(t) for t in str(text).replace(" ", "").split(",") if t)


def model_config(variant: str = "S") -> ml_collections.ConfigDict:
  """Encoder description. Width/depth/heads of 0 mean 'take the variant's'."""
  return ml_collections.ConfigDict(dict(
      variant=variant,      # models.vit.VARIANTS: tiny, Ti, S, B, L, H
      width=0,              # 0: from variant
      depth=0,              # 0: from variant
      num_heads=0,          # 0: from variant; always explicit in the built model
      mlp_ratio=4.0,
      patch_size=16,
      tubelet_size=2,       # video only
      cls_token=True,       # ImageMAE: True; VideoMAE/AMD: False
      qkv_bias="fused",     # fused (MAE) | qv (VideoMAE: q/v bias, k bias fixed at 0) | none
      pos_emb="sincos2d",   # sincos2d (MAE, concatenated halves) | sincos1d (VideoMAE, interleaved)
      dtype="float32",      # compute dtype of matmuls: float32 | bfloat16. Params stay float32.
      scan=False,           # nn.scan over blocks (faster compile for deep models)
      remat="none",         # none | full | dots | dots_no_batch
      drop_path=0.0,
      attention="xla",      # jax.nn.dot_product_attention implementation: xla | cudnn (flash attention, GPUs)
      init_scheme="mae",    # mae (MAE's init) | videomae (as the official VideoMAE/AMD code: PyTorch-default
                            # patch embedding and decoder input projection, mask tokens cut at +-1 std)
  ))


def teacher_config(variant: str) -> ml_collections.ConfigDict:
  """config.teacher of the distillation methods: the frozen teacher's architecture and weights."""
  return ml_collections.ConfigDict(dict(
      model=model_config(variant),
      checkpoint="",   # amd_jax workdir | .pth/.safetensors | 'random' (benchmarks/tests only)
  ))


def decoder_config(width: int = 512, depth: int = 8, num_heads: int = 16) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(width=width, depth=depth, num_heads=num_heads, mlp_ratio=4.0))


def data_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      source="fashion_mnist",  # fashion_mnist | image_folder | tfds | video_list | synthetic
      modality="image",        # image | video
      path="",                 # source-specific; see amd_jax/data/sources.py
      tfds_name="",            # tfds only: builder name, e.g. 'imagenet2012'
      video_root="",           # video_list only: prefix for the paths in the annotation file
      split="train",
      eval_split="test",
      image_size=32,
      channels=1,              # 1 for Fashion-MNIST, 3 for RGB sources
      num_frames=16,           # video only
      sampling_rate=4,         # video only: stride between sampled frames
      mean="0.2860",           # per-channel, comma-separated; 'auto': measured on the training split once (cached
                               # in WORKDIR/data_stats.json); `python -m amd_jax.data.stats` prints them
      std="0.3530",            # per-channel, comma-separated, or 'auto' (inputs are (x / 255 - mean) / std)
      crop_scale_min=0.2,      # random resized crop (images)
      crop_scale_max=1.0,
      hflip=True,
      eval_crop_ratio=1.0,     # image eval view: centre crop_ratio of the shorter side, resized to image_size
                               # (1: whole shorter side; 0.875: MAE/DeiT's resize 256, crop 224)
      multiscale_scales="1,0.875,0.75,0.66",  # video multi-scale crop
      # Fine-tuning augmentation (amd_jax/data/augment.py); the defaults leave it off.
      train_crop="default",    # default: images RRC, videos multi-scale crop | rrc: RRC for videos too
                               # (crop_scale_min/max, aspect 3/4..4/3; VideoMAE fine-tuning)
      randaugment="",          # timm-style RandAugment, e.g. 'rand-m9-mstd0.5-inc1'; '' = off
      random_erase=0.0,        # probability of erasing one rectangle (a cube for clips) with noise
      repeated_aug=1,          # augmented copies of each sampled example, consecutive in a batch;
                               # per-process batch must be a multiple (1 = off)
      test_num_clips=1,        # video eval: clips evenly spaced in time ...
      test_num_crops=1,        # ... x spatial crops along the longer side; >1 view: [b, V, T, H, W, C]
      num_workers=0,           # grain multiprocessing workers; 0 = in-process with thread prefetch
      prefetch=2,
      synthetic_size=512,      # synthetic only: number of examples
      num_classes=0,           # 0: inferred (class folders, largest list label + 1, Fashion-MNIST 10, synthetic 10);
                               # an explicit count that disagrees with the data stops the run
      cache_max_bytes=1024**3,  # image_folder: hold the decoded images in memory when they fit (per process,
                                # num_workers=0 only); 0 = always decode from the files
      video_timeout_s=60.0,    # video_list: seconds a video may take to open and decode before it is skipped
                               # (and counted); 0 = no limit
      max_image_pixels=64_000_000,  # image files (video frames) with more pixels than this, read from the
                                    # header, are skipped and counted, never decoded; 0 = no limit of our own
  ))


def optim_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      base_lr=1.5e-4,          # lr = base_lr * batch_size / 256 (MAE convention)
      lr=-1.0,                 # >0 overrides the scaled base_lr
      min_lr=0.0,
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      weight_decay=0.05,
      warmup_steps=-1,         # warmup given as steps, epochs or a fraction of the run (at most one; none: 0)
      warmup_epochs=-1.0,
      warmup_fraction=-1.0,    # share of total steps; transfers across data set sizes and run lengths
      grad_clip=0.0,           # 0 disables global-norm clipping
      ema_decay=0.0,           # >0: keep an EMA of the weights (evaluated beside them); 0 = off
  ))


def mesh_config() -> ml_collections.ConfigDict:
  """Device mesh (amd_jax/train/sharding.py, docs/scaling.md). data*fsdp*tensor = device count."""
  return ml_collections.ConfigDict(dict(
      data=-1,        # pure data parallel; -1: whatever the other axes leave
      fsdp=1,         # data parallel with params and optimizer state sharded
      tensor=1,       # attention heads and MLP hidden units split
      dcn_data=1,     # TPU slices the data axis spans (multi-slice); must equal the slice count
      rules="",       # activation rule overrides, e.g. 'embed=tensor,mlp=' ('' = sharding.DEFAULT_RULES)
  ))


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.method = "mae"            # a key of amd_jax.methods.REGISTRY
  c.seed = 0
  c.batch_size = 256          # global batch
  c.total_steps = -1
  c.num_epochs = -1.0
  c.log_every_steps = 50
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.image_every_steps = 0     # >0: write masked views, reconstructions and attention (amd_jax.visualize) to
                              # TensorBoard every N steps; 0 = off
  c.allow_config_change = False  # True: continue a workdir whose run had a different config
  c.nan_policy = "stop"       # a NaN/Inf loss, gradient or update: stop (checkpoints untouched) | skip | off;
                              # see amd_jax/train/guard.py
  c.nan_max_skips = 20        # nan_policy='skip': stop after this many non-finite steps in a row
  c.init = ""                 # start the trained model from these weights (all its parts; the optimizer starts
                              # fresh): a workdir of the same method, a to_flax .npz, or a PyTorch checkpoint
                              # holding every part (e.g. an official AMD pre-training checkpoint); '' = random
  c.profile_steps = ""        # 'A,B': a jax.profiler trace of steps A..B in WORKDIR/plugins/profile
                              # (TensorBoard's profile tab); '' = off
  c.shard_teacher = "auto"    # auto (shard like the student when fsdp > 1) | sharded | replicated
  c.model = model_config()
  c.decoder = decoder_config()
  c.data = data_config()
  c.optim = optim_config()
  c.mesh = mesh_config()
  c.mask = ml_collections.ConfigDict(dict(
      ratio=0.75,             # student (or MAE) mask ratio
      kind="random",          # random | tube
  ))
  c.norm_pix_loss = True
  c.eval = ml_collections.ConfigDict(dict(
      probe=False,            # run linear probe + kNN at the end of pre-training
      knn_k=20,
      knn_temperature=0.07,
      probe_epochs=20,
      probe_lr=0.1,
      probe_batch_size=256,
      max_train_examples=0,   # 0: all
      every_steps=0,          # classifiers: evaluate top-1/top-5 every N steps (0: at the end only)
      batch_size=0,           # classification eval batch (0: config.batch_size)
  ))
  return c


def parse_arg(arg: str | None, **defaults):
  """big_vision-style config argument: 'key=value,flag' -> ConfigDict over `defaults`.

  Values are parsed as the type of their default; a bare key sets a bool to True.
  Example: --config configs/quickstart.py:runlocal
  """
  out = ml_collections.ConfigDict(defaults)
  if not arg:
    return out
  for item in arg.split(","):
    if not item:
      continue
    key, _, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; allowed: {', '.join(defaults)}")
    kind = type(defaults[key])
    if kind is bool:
      out[key] = value.lower() in ("", "1", "true", "yes")
    else:
      out[key] = kind(value)
  return out
