"""Video quickstart on moving garments (offline, 2 CPU cores): the three pre-training runs of the video story.

The data: `python -m amd_jax.data.make_moving --out DIR` (Fashion-MNIST garments moving over a canvas, real
H.264 files, two labels: the direction of motion and the garment class; docs/video.md). Config arguments:
  stage    teacher (default): VideoMAE pre-training of the larger ViT that serves as teacher;
           videomae: VideoMAE pre-training of the small student-size ViT (the baseline);
           amd: AMD distillation of the same small ViT from the teacher; needs `teacher=WORKDIR`;
           finetune: a short fine-tuning of a student-size encoder, `init=WORKDIR` (a videomae or amd run),
           scored on 2 clips x 3 crops per test video.
  data     the moving-garments folder (required; with runlocal and no data: random clips of the same shape).
  label    which list the probes (and fine-tuning) read: direction (default), garment, or joint (both at once).
  runlocal a few steps per stage (smoke test).

  python -m amd_jax.data.make_moving --out /tmp/moving
  python -m amd_jax.main --config configs/quickstart_video.py:data=/tmp/moving --workdir /tmp/qsv/teacher
  python -m amd_jax.main --config configs/quickstart_video.py:stage=amd,teacher=/tmp/qsv/teacher,data=/tmp/moving \
      --workdir /tmp/qsv/amd
`python -m amd_jax.quickstart --video --workdir DIR` generates the data, runs all three, evaluates them on both
labels next to the controls, and prints the table.

Scale: grey 32x32 clips of 8 frames (sampled with stride 2 from the 16 of each file), 8x8 patches and tubelets of
2 frames: 4 x 4 x 4 = 64 tokens. A 128-wide 4-deep teacher and a 64-wide 4-deep student. Tube masks: with only 16
positions per frame, the official 0.9 would leave the student 2 tubes, which mostly miss a garment that covers 4 of
the 16 positions; the student keeps 4 (0.75) and AMD's teacher 8 (0.5), the asymmetry of the image quickstart.
No horizontal flip: it would turn a garment moving right into one moving left without changing the label.
"""
from amd_jax import config_base, recipes

STUDENT = dict(variant="S", width=64, depth=4, num_heads=2)
TEACHER = dict(variant="S", width=128, depth=4, num_heads=4)
EPOCHS = {"teacher": 6.0, "videomae": 5.0, "amd": 5.0}
FINETUNE_EPOCHS = 3.0
STAGES = tuple(EPOCHS) + ("finetune",)
# The data set the quickstart generates (amd_jax.data.make_moving's arguments), and its smoke-test size.
DATA = dict(num_train=8000, num_test=2000, frames=16, size=32, garment_size=16, min_speed=1.0, max_speed=2.0,
            clear_steps=2, seed=0)
RUNLOCAL_DATA = dict(num_train=64, num_test=32)
# Pixel statistics of that set's training clips (grey garments on black: mostly black).
MEAN, STD = "0.0716", "0.2076"
LABEL_CLASSES = {"direction": 8, "garment": 10, "joint": 80}


def _video_model(model, size: dict):
  model.update(patch_size=8, tubelet_size=2, cls_token=False, qkv_bias="qv", pos_emb="sincos1d", **size)


def moving_data(runlocal: bool = False) -> dict:
  """amd_jax.data.make_moving.generate's arguments for the set the quickstart reads."""
  return {**DATA, **(RUNLOCAL_DATA if runlocal else {})}


def data_fields(folder: str, label: str = "direction") -> dict:
  """config.data fields that read a moving-garments folder with one of its label lists ('' = none given)."""
  return dict(source="video_list", modality="video", path=f"{folder}/{{split}}_{label}.csv" if folder else "",
              video_root=folder, image_size=32, channels=1, num_frames=8, sampling_rate=2, mean=MEAN, std=STD,
              hflip=False, multiscale_scales="1,0.875,0.75,0.66", num_classes=LABEL_CLASSES[label])


def _finetune(c, init: str) -> None:
  """A short fine-tuning of a pre-trained encoder (mean pooling + fc_norm + head), scored on multi-view tests."""
  recipes.with_method_fields(c, "finetune")
  c.finetune.update(init=init, pool="mean", head_init_scale=1e-3, layer_decay=0.75, mixup=0.0, cutmix=0.0,
                    label_smoothing=0.1)
  c.model.drop_path = 0.1
  # 2 clips x 3 crops, softmax averaged. On these square clips the 3 crops along the longer side coincide and the
  # 2 clips (starts 0 and 1 of the 15-frame span) differ by a frame: the machinery of the official test, cheap.
  c.data.update(test_num_clips=2, test_num_crops=3)
  c.batch_size = 64
  c.num_epochs = FINETUNE_EPOCHS
  c.optim.update(lr=1e-3, warmup_fraction=0.1, b1=0.9, b2=0.999, weight_decay=0.05, min_lr=1e-6)
  c.eval.update(probe=False, every_steps=0, batch_size=64)


def get_config(arg=None):
  args = config_base.parse_arg(arg, stage="teacher", teacher="", data="", label="direction", init="",
                               runlocal=False)
  if args.stage not in STAGES:
    raise ValueError(f"quickstart_video stage={args.stage!r}; allowed: {', '.join(STAGES)}")
  if args.label not in LABEL_CLASSES:
    raise ValueError(f"quickstart_video label={args.label!r}; allowed: {', '.join(LABEL_CLASSES)}")
  c = config_base.base_config()
  if args.stage == "amd":
    recipes.with_method_fields(c, "amd")
    _video_model(c.teacher.model, TEACHER)
    c.teacher.checkpoint = args.teacher
    c.teacher.mask_ratio = 0.5
    c.amd.update(student_layers="2,4", teacher_layers="2,4", align_loss="l2", shared_heads=True,
                 generator_depth=2, generator_heads=0)
  else:
    c.method = "videomae"
  c.data.update(data_fields(args.data, args.label))
  _video_model(c.model, TEACHER if args.stage == "teacher" else STUDENT)
  c.decoder.update(width=64, depth=1, num_heads=2)
  c.mask.update(ratio=0.75, kind="tube")
  c.norm_pix_loss = True
  c.batch_size = 64
  c.optim.update(base_lr=1e-3 * 256 / 64, warmup_fraction=0.06, weight_decay=0.05, b1=0.9, b2=0.95, min_lr=1e-5)
  c.log_every_steps = 50
  c.checkpoint_every_steps = 500
  c.eval.update(probe=True, probe_epochs=30, probe_batch_size=256, max_train_examples=0)
  if args.stage == "finetune":
    _finetune(c, args.init)
  else:
    c.num_epochs = EPOCHS[args.stage]
  if args.runlocal:
    if not args.data:   # a smoke run without the data set: random clips of the same shape
      c.data.update(source="synthetic", synthetic_size=64)
    c.num_epochs, c.total_steps = -1.0, 8
    c.log_every_steps = c.checkpoint_every_steps = 4
    c.eval.update(max_train_examples=256, probe_epochs=2)
  return c
