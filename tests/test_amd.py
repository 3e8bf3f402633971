"""AMD: nested masks in the method, teacher targets, frozen teacher, losses, config checks, end to end."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from amd_jax import config_base, config_validation, recipes, weights
from amd_jax.methods import get_method
from amd_jax.models import posemb
from amd_jax.train import loop

# Runs of the same configs compile the same programs: the session's compilation cache (conftest.py) compiles
# each once, here and in the subprocesses started from os.environ.
pytestmark = pytest.mark.usefixtures("compilation_cache")


def tiny_amd_config(modality="image", teacher="random"):
  c = recipes.with_method_fields(config_base.base_config(), "amd")
  c.model.update(variant="tiny", patch_size=8, width=32, depth=4, num_heads=2)
  c.teacher.model.update(variant="tiny", patch_size=8, width=64, depth=4, num_heads=2)
  c.decoder.update(width=32, depth=1, num_heads=2)
  c.amd.update(student_layers="2,4", teacher_layers="2,4", generator_heads=2)
  c.teacher.checkpoint = teacher
  c.data.update(source="synthetic", synthetic_size=32, image_size=32, channels=1)
  c.batch_size, c.total_steps, c.num_epochs = 4, 3, -1.0
  c.log_every_steps = c.checkpoint_every_steps = 1
  c.mask.ratio, c.teacher.mask_ratio = 0.75, 0.5
  if modality == "video":
    c.data.update(modality="video", channels=3, mean=recipes.IMAGENET_MEAN, std=recipes.IMAGENET_STD, num_frames=4)
    for m in (c.model, c.teacher.model):
      m.update(cls_token=False, qkv_bias="qv", pos_emb="sincos1d")
    c.mask.update(kind="tube", ratio=0.9)
    c.teacher.mask_ratio = 0.75
    c.batch_size = 2
  return c


def example(c, batch=None):
  key = jax.random.PRNGKey(1)
  b = batch or c.batch_size
  if c.data.modality == "video":
    return {"video": jax.random.normal(key, (b, c.data.num_frames, 32, 32, 3))}
  return {"image": jax.random.normal(key, (b, 32, 32, 1))}


@pytest.mark.parametrize("modality", ["image", "video"])
def test_nested_mask_used_by_method(modality):
  c = tiny_amd_config(modality)
  m = get_method(c)
  x = example(c)[m.input_key()]
  nm = m.nested_mask(jax.random.PRNGKey(3), x)
  s, d = np.asarray(nm.student), np.asarray(nm.diff)
  for b in range(x.shape[0]):
    assert set(s[b]).isdisjoint(d[b])
    assert list(s[b]) == sorted(s[b]) and list(d[b]) == sorted(d[b])
  if modality == "video":  # 16 spatial tokens per frame: keep 16-int(.9*16)=2 / 16-int(.75*16)=4 per frame
    assert s.shape[1] == 2 * 2 and s.shape[1] + d.shape[1] == 4 * 2
  else:  # 16 tokens: int(16*.25)=4 and int(16*.5)=8
    assert s.shape[1] == 4 and d.shape[1] == 4


def _identity_teacher(c, example_batch, layer_offsets):
  """Teacher params whose blocks add a known constant: block i adds layer_offsets[i] to every channel."""
  m = get_method(c)
  params = jax.tree.map(np.asarray, m.teacher_init(jax.random.PRNGKey(0), example_batch))
  params = jax.tree.map(np.zeros_like, params) | {"patch_embed": params["patch_embed"]}
  for i, offset in enumerate(layer_offsets):
    blk = params[f"blocks_{i}"]
    blk["norm1"]["scale"][:] = 1.0
    blk["norm2"]["scale"][:] = 1.0
    blk["mlp"]["fc2"]["bias"][:] = offset  # zero weights: the MLP branch outputs exactly `offset`
  return m, params


def test_teacher_targets_hand_checked():
  """Direct targets sit at the student-visible tokens, generation targets at the diff tokens, ascending."""
  c = tiny_amd_config("image")
  c.model.cls_token = c.teacher.model.cls_token = True
  batch = example(c, batch=2)
  offsets = [1.0, 10.0, 100.0, 1000.0]
  m, tparams = _identity_teacher(c, batch, offsets)
  x = np.asarray(batch["image"])
  nm = m.nested_mask(jax.random.PRNGKey(7), batch["image"])
  out = m.teacher_features(tparams, batch["image"], nm)
  # By hand: token j = patch_j . W + b + pos_j, then + sum of the offsets of the blocks run so far.
  kernel = tparams["patch_embed"]["proj"]["kernel"].reshape(-1, 64)  # (p*p*C, width)
  bias = tparams["patch_embed"]["proj"]["bias"]
  patches = x.reshape(2, 4, 8, 4, 8, 1).transpose(0, 1, 3, 2, 4, 5).reshape(2, 16, 64)
  pos = posemb.sincos_2d(64, 4, 4)
  tokens = patches @ kernel + bias + pos
  ks = nm.student.shape[1]
  for layer, total in ((2, 11.0), (4, 1111.0)):
    got = np.asarray(out[layer])
    for b in range(2):
      want_dir = tokens[b, np.asarray(nm.student[b])] + total
      want_gen = tokens[b, np.asarray(nm.diff[b])] + total
      np.testing.assert_allclose(got[b, :ks], want_dir, rtol=1e-5, atol=1e-4)
      np.testing.assert_allclose(got[b, ks:], want_gen, rtol=1e-5, atol=1e-4)


def test_teacher_gets_no_gradient_and_terms_fall():
  c = tiny_amd_config("image")
  m = get_method(c)
  batch = example(c)
  params = m.init(jax.random.PRNGKey(0), batch)
  tparams = m.teacher_init(jax.random.PRNGKey(5), batch)
  assert set(params) == {"encoder", "decoder", "projections", "generators"}
  teacher_grads = jax.grad(lambda tp: m.loss(params, tp, batch, jax.random.PRNGKey(2))[0])(tparams)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(teacher_grads))

  tx = optax.adam(3e-3)
  opt_state = tx.init(params)

  @jax.jit
  def step(p, s):
    (_, met), g = jax.value_and_grad(m.loss, has_aux=True)(p, tparams, batch, jax.random.PRNGKey(9))
    u, s = tx.update(g, s)
    return optax.apply_updates(p, u), s, met

  first = None
  for _ in range(40):
    params, opt_state, met = step(params, opt_state)
    first = first or {k: float(v) for k, v in met.items()}
  last = {k: float(v) for k, v in met.items()}
  for term in ("loss_rec", "loss_dir", "loss_gen", "loss_dir_2_2", "loss_gen_4_4"):
    assert np.isfinite(last[term])
    assert last[term] < first[term], (term, first[term], last[term])


def test_frozen_generator_mask_tokens_get_no_gradient():
  c = tiny_amd_config("image")
  c.amd.train_generator_mask_tokens = False
  m = get_method(c)
  batch = example(c)
  params = m.init(jax.random.PRNGKey(0), batch)
  tparams = m.teacher_init(jax.random.PRNGKey(5), batch)
  grads = jax.grad(lambda p: m.loss(p, tparams, batch, jax.random.PRNGKey(2))[0])(params)
  assert float(jnp.abs(grads["generators"]["gen_0"]["mask_token"]).max()) == 0.0
  assert float(jnp.abs(grads["generators"]["gen_0"]["blocks_0"]["mlp"]["fc1"]["kernel"]).max()) > 0.0


def test_separate_heads_option():
  c = tiny_amd_config("image")
  c.amd.shared_heads = False
  m = get_method(c)
  params = m.init(jax.random.PRNGKey(0), example(c))
  assert set(params["generator_projections"]) == {"proj_0", "proj_1"}


@pytest.mark.parametrize("field,value,fragment", [
    ("student_layers", "2,5", "outside the student's blocks 1..4"),
    ("teacher_layers", "2,9", "outside the teacher's blocks 1..4"),
    ("teacher_layers", "4", "same, non-zero number"),
    ("student_layers", "a,b", "comma-separated integers"),
    ("align_loss", "huber", "align_loss"),
])
def test_layer_pair_and_amd_field_validation(field, value, fragment):
  c = tiny_amd_config("image")
  c.amd[field] = value
  with pytest.raises(config_validation.ConfigError, match=fragment):
    config_validation.validate(c)


def test_teacher_ratio_must_be_lower():
  c = tiny_amd_config("image")
  c.teacher.mask_ratio = 0.8
  with pytest.raises(config_validation.ConfigError, match="teacher.mask_ratio"):
    config_validation.validate(c)


@pytest.mark.slow
def test_end_to_end_teacher_from_workdir_and_mismatch(tmp_path):
  """An MAE run's workdir serves as teacher; the student checkpoint holds no teacher; a misfit teacher stops."""
  teacher_cfg = config_base.base_config()
  teacher_cfg.model.update(variant="tiny", patch_size=8, width=64, depth=4, num_heads=2)
  teacher_cfg.decoder.update(width=32, depth=1, num_heads=2)
  teacher_cfg.data.update(source="synthetic", synthetic_size=32, image_size=32, channels=1)
  teacher_cfg.batch_size, teacher_cfg.total_steps, teacher_cfg.num_epochs = 4, 2, -1.0
  teacher_dir = str(tmp_path / "teacher")
  loop.run(teacher_cfg, teacher_dir)

  c = tiny_amd_config("image", teacher=teacher_dir)
  student_dir = str(tmp_path / "student")
  final = loop.run(c, student_dir)
  for term in ("loss_rec", "loss_dir", "loss_gen"):
    assert np.isfinite(final[term])
  saved = weights.load_params(student_dir)
  assert set(saved) == {"encoder", "decoder", "projections", "generators"}
  assert os.path.isdir(os.path.join(student_dir, "checkpoints", "3"))

  # The same teacher as an official-naming PyTorch file (what users download) works the same way.
  from amd_jax import convert
  arch = convert.arch_from_config(teacher_cfg.model, image_size=32, in_chans=1, video=False)
  pth = str(tmp_path / "teacher.pth")
  convert.export_torch({"encoder": weights.load_params(teacher_dir)["encoder"]}, pth, arch, "mae",
                       parts=("encoder",))
  from_file = tiny_amd_config("image", teacher=pth)
  from_file.total_steps = 1
  assert np.isfinite(loop.run(from_file, str(tmp_path / "student_pth"))["loss_dir"])

  # ... and as a transformers save_pretrained folder (ViTMAEModel's), found to be one without being told.
  hf_dir = str(tmp_path / "teacher_hf")
  convert.export_torch({"encoder": weights.load_params(teacher_dir)["encoder"]}, hf_dir, arch, "hf_vitmae",
                       parts=("encoder",))
  from_hf = tiny_amd_config("image", teacher=hf_dir)
  from_hf.total_steps = 1
  assert np.isfinite(loop.run(from_hf, str(tmp_path / "student_hf"))["loss_dir"])

  bad = tiny_amd_config("image", teacher=teacher_dir)
  bad.teacher.model.width = 96  # does not fit the saved 64-wide teacher
  with pytest.raises(weights.WeightsMismatchError, match="mis-shaped") as err:
    loop.run(bad, str(tmp_path / "bad"))
  assert "blocks_0/norm2/scale: expected (96,), got (64,)" in str(err.value)

  bad_depth = tiny_amd_config("image", teacher=teacher_dir)
  bad_depth.teacher.model.depth = 6
  bad_depth.amd.teacher_layers = "2,6"
  with pytest.raises(weights.WeightsMismatchError, match="missing"):
    loop.run(bad_depth, str(tmp_path / "bad_depth"))


def test_empty_teacher_is_refused():
  c = tiny_amd_config("image", teacher="")
  with pytest.raises(config_validation.ConfigError, match="teacher.checkpoint"):
    config_validation.validate(c)


@pytest.mark.slow
def test_an_official_amd_student_checkpoint_starts_a_run_whole(tmp_path, tiny_config):
  """config.init: a PyTorch file in the official AMD names (encoder with projection heads, generators, decoder)
  is converted whole and trained on; every part starts from it (the generators' mask tokens, which the
  official state dict lacks, from amd_jax's init)."""
  import torch  # pylint: disable=g-import-not-at-top
  from amd_jax import convert  # pylint: disable=g-import-not-at-top
  c = tiny_config("amd,video,steps=1")
  c.teacher.checkpoint = "random"
  method = get_method(c)
  video = jnp.zeros((1, c.data.num_frames, c.data.image_size, c.data.image_size, c.data.channels))
  params = jax.device_get(jax.jit(method.init)(jax.random.PRNGKey(7), {"video": video}))
  params = jax.tree.map(lambda a: a + 0.01 * np.random.default_rng(0).standard_normal(a.shape).astype(np.float32),
                        params)   # away from any init
  arch = convert.arch_from_run_config(c)
  state_dict = convert.flax_to_torch(params, arch, "amd", parts=("encoder", "decoder", "amd"))
  assert any(k.startswith("encoder.projection_heads.") for k in state_dict)
  assert any(k.startswith("generators.") for k in state_dict)
  path = str(tmp_path / "checkpoint-799.pth")
  torch.save({"model": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state_dict.items()}}, path)

  run = tiny_config("amd,video,steps=1")
  run.teacher.checkpoint, run.init = "random", path
  run.optim.update(lr=1e-12, weight_decay=0.0)   # one step that moves nothing measurable
  final = loop.run(run, str(tmp_path / "run"))
  assert np.isfinite(final["loss_gen"])
  trained = weights.load_params(str(tmp_path / "run"))
  assert set(trained) == set(params) == {"encoder", "decoder", "projections", "generators"}
  flat = lambda t: {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(t)[0]}
  got, want = flat(trained), flat(params)
  for key in want:
    if "mask_token" in key and "generators" in key:
      continue
    np.testing.assert_allclose(got[key], want[key], atol=1e-6, err_msg=key)


def test_a_bfloat16_teacher_stored_cast_gives_the_same_loss_and_gradients():
  """loop.teacher_storage keeps a bf16 teacher's matmul weights in bf16 (the model casts exactly those leaves
  where it uses them) and its LayerNorms and tokens in float32: the step's numbers do not change."""
  c = tiny_amd_config("video")
  c.model.dtype = c.teacher.model.dtype = "bfloat16"
  c.teacher.model.qkv_bias = "qv"
  m = get_method(c)
  batch = example(c)
  params = m.init(jax.random.PRNGKey(0), batch)
  tparams = jax.tree.map(np.asarray, m.teacher_init(jax.random.PRNGKey(5), batch))
  stored = loop.teacher_storage(tparams, c.teacher.model.dtype)
  kinds = jax.tree_util.tree_map_with_path(lambda p, x: (str(p[-1].key), str(x.dtype)), stored)
  kinds = set(jax.tree.leaves(kinds, is_leaf=lambda x: isinstance(x, tuple)))
  assert ("kernel", "bfloat16") in kinds and ("q_bias", "bfloat16") in kinds and ("scale", "float32") in kinds
  assert all(dtype == "bfloat16" for name, dtype in kinds if name in ("kernel", "q_bias", "v_bias"))
  assert loop.teacher_storage(tparams, "float32") is tparams

  def loss_and_grads(tp):
    return jax.value_and_grad(m.loss, has_aux=True)(params, tp, batch, jax.random.PRNGKey(2))

  (want, want_aux), want_g = loss_and_grads(tparams)
  (got, got_aux), got_g = loss_and_grads(stored)
  assert float(got) == float(want)
  for a, b in zip(jax.tree.leaves(want_g), jax.tree.leaves(got_g)):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
