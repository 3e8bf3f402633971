"""D-MAE, TinyMIM and G2SD students on Fashion-MNIST at the quickstart's scale (offline, 2 CPU cores).

Config arguments: `method=dmae|tinymim|g2sd` (default dmae), `teacher=WORKDIR` (default
workdirs/quickstart/teacher, where `python -m amd_jax.quickstart` puts its teacher MAE),
`runlocal` (8 steps), `teacher_decoder_depth=N` (G2SD: depth of the teacher MAE's decoder; 1
as the quickstart teacher has).

  python -m amd_jax.main --config configs/quickstart.py --workdir /tmp/qs/teacher
  python -m amd_jax.main --config configs/distill_fmnist.py:method=g2sd,teacher=/tmp/qs/teacher --workdir /tmp/qs/g2sd

Everything but the method is configs/quickstart.py's `stage=mae` run: 28x28 grey images in
4-pixel patches (49 tokens + cls), the 64-wide 4-deep student (2 heads), decoder 64 wide x 1,
mask 0.75, batch 256, 2 epochs, the same optimizer and evaluation; the teacher is the
quickstart's 128-wide 4-deep MAE (4 heads). Each repository's choices scaled down:
- dmae: attention logits of student block 4 <-> teacher block 4 (the last), head adapter 2 -> 4
  heads, no hidden distillation, L = L_MAE + L_attn.
- tinymim: relations at the teacher's block 4 (its last, as when depths match); the student's
  last block uses the teacher's 4 heads; no mask; colour jitter 0.4 on the student's view (only
  brightness and contrast act on grey images); drop path 0.1 on blocks 1..3.
- g2sd: the teacher decoder's block ceil(depth/2) (4 of 8 in the official recipe; 1 of 1 for the
  quickstart teacher), LayerNorm-ed, on all tokens; the student decoder is 64 wide with that
  many blocks; smooth-L1 with beta 2.
"""
import importlib.util
import os

from amd_jax import config_base, recipes

METHODS = ("dmae", "tinymim", "g2sd")


def _quickstart():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quickstart.py")
  spec = importlib.util.spec_from_file_location("amd_jax_quickstart_config_for_distill", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg=None):
  args = config_base.parse_arg(arg, method="dmae", teacher="workdirs/quickstart/teacher", runlocal=False,
                               teacher_decoder_depth=1)
  if args.method not in METHODS:
    raise ValueError(f"distill_fmnist method={args.method!r}; allowed: {', '.join(METHODS)}")
  qs = _quickstart()
  c = qs.get_config("stage=mae" + (",runlocal" if args.runlocal else ""))
  recipes.with_method_fields(c, args.method)
  c.teacher.model.update(patch_size=4, cls_token=True, qkv_bias="fused", pos_emb="sincos2d", **qs.TEACHER)
  c.teacher.checkpoint = args.teacher
  student_heads, teacher_heads = qs.STUDENT["num_heads"], qs.TEACHER["num_heads"]
  depth_s, depth_t = qs.STUDENT["depth"], qs.TEACHER["depth"]
  if args.method == "dmae":
    c.dmae.update(attn_student_layers=str(depth_s), attn_teacher_layers=str(depth_t), factor_attn=1.0,
                  attn_adapter=True, hidden_student_layers="", hidden_teacher_layers="", factor_rec=1.0)
  elif args.method == "tinymim":
    c.model.drop_path = 0.1
    c.tinymim.update(teacher_layer=depth_t, student_last_heads=teacher_heads, teacher_last_heads=0,
                     factor_qk=1.0, factor_vv=1.0, color_jitter=0.4, constant_drop_path=True)
  else:
    layer = (args.teacher_decoder_depth + 1) // 2
    teacher_decoder = qs.get_config("stage=teacher").decoder  # the quickstart teacher MAE's decoder
    c.teacher.decoder.update(width=teacher_decoder.width, depth=args.teacher_decoder_depth,
                             num_heads=teacher_decoder.num_heads, mlp_ratio=teacher_decoder.mlp_ratio)
    c.decoder.update(width=qs.STUDENT["width"], depth=layer, num_heads=student_heads)
    c.g2sd.update(teacher_decoder_layer=layer, tokens="all", loss="smooth_l1", smooth_l1_beta=2.0)
  return c
