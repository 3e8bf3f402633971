"""D-MAE, TinyMIM and G2SD: each loss against a small NumPy reference, gradients reach the student only,
config checks, the G2SD decoder requirement, and end to end through the loop with teachers from workdirs."""
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amd_jax import config_base, config_validation, losses, masking, weights
from amd_jax.methods import get_method
from amd_jax.methods import g2sd as g2sd_lib
from amd_jax.methods import tinymim as tinymim_lib
from amd_jax.models import posemb, vit
from amd_jax.train import loop
from testlib import tiny_distill_config as tiny

# Runs of the same configs compile the same programs: the session's compilation cache (conftest.py) compiles
# each once, here and in the subprocesses started from os.environ.
pytestmark = pytest.mark.usefixtures("compilation_cache")


# ----------------------------------------------------------------------------- helpers


def batch_of(c, b=4, seed=1):
  return {"image": jax.random.normal(jax.random.PRNGKey(seed), (b, 32, 32, c.data.channels))}


def np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def np_layer_norm(x, scale=None, bias=None, eps=1e-6):
  x = np.asarray(x, np.float64)
  y = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)
  return y if scale is None else y * np.asarray(scale) + np.asarray(bias)


def np_relation_kl(s_logits, t_logits):
  """KL(softmax(t) || softmax(s)) per row, summed over the last axis, averaged over the rest."""
  ps, pt = np_softmax(np.asarray(s_logits, np.float64)), np_softmax(np.asarray(t_logits, np.float64))
  return float(np.mean(np.sum(pt * (np.log(pt) - np.log(ps)), axis=-1)))


def np_relation(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return a @ np.swapaxes(b, -1, -2) / np.sqrt(a.shape[-1])


def zero_grads(tree):
  return all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------- the losses against NumPy


def test_attention_logit_mse_with_head_adapter_matches_numpy():
  rng = np.random.default_rng(0)
  s = rng.normal(size=(2, 3, 5, 5)).astype(np.float32)   # 3 student heads
  t = rng.normal(size=(2, 4, 5, 5)).astype(np.float32)   # 4 teacher heads
  w = rng.normal(size=(3, 4)).astype(np.float32)          # adapter [H_s, H_t]
  mixed = np.zeros_like(t, dtype=np.float64)
  for g in range(4):
    for h in range(3):
      mixed[:, g] += w[h, g] * s[:, h]
  want = np.mean((mixed - t) ** 2)
  np.testing.assert_allclose(float(losses.attention_logit_mse(s, t, w)), want, rtol=1e-5)
  same = rng.normal(size=(2, 3, 5, 5)).astype(np.float32)
  np.testing.assert_allclose(float(losses.attention_logit_mse(s, same)), np.mean((s - same) ** 2), rtol=1e-5)
  with pytest.raises(ValueError, match="head adapter"):
    losses.attention_logit_mse(s, t)


def test_relation_kl_matches_numpy():
  rng = np.random.default_rng(1)
  qs, ks = rng.normal(size=(2, 4, 6, 8)), rng.normal(size=(2, 4, 6, 8))    # student head_dim 8
  qt, kt = rng.normal(size=(2, 4, 6, 16)), rng.normal(size=(2, 4, 6, 16))  # teacher head_dim 16
  s_logits, t_logits = losses.relation_logits(qs, ks), losses.relation_logits(qt, kt)
  np.testing.assert_allclose(np.asarray(s_logits), np_relation(qs, ks), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(float(losses.relation_kl(s_logits, t_logits)),
                             np_relation_kl(np_relation(qs, ks), np_relation(qt, kt)), rtol=1e-5)
  assert float(losses.relation_kl(t_logits, t_logits)) == pytest.approx(0.0, abs=1e-6)


def test_smooth_l1_beta_2_matches_numpy():
  rng = np.random.default_rng(2)
  pred, target = rng.normal(scale=3.0, size=(3, 7, 5)), rng.normal(size=(3, 7, 5))
  d = np.abs(pred - target)
  assert (d < 2).any() and (d >= 2).any()  # both branches are exercised
  want = np.mean(np.where(d < 2.0, 0.5 * d**2 / 2.0, d - 1.0))
  np.testing.assert_allclose(float(losses.regression(pred, target, "smooth_l1", 2.0)), want, rtol=1e-5)


# ----------------------------------------------------------------------------- one setup per method


class Setup:
  """A method with student and teacher params and its loss's value and grads, from ONE compiled program."""

  def __init__(self, config, seed=3):
    self.config, self.m = config, get_method(config)
    self.batch = batch_of(config)
    self.x = self.batch["image"]
    self.rng = jax.random.PRNGKey(seed)
    value_and_grad = jax.value_and_grad(self.m.loss, argnums=(0, 1), has_aux=True)

    def everything(batch, rng):
      params = self.m.init(jax.random.PRNGKey(0), batch)
      tparams = self.m.teacher_init(jax.random.PRNGKey(5), batch)
      return params, tparams, value_and_grad(params, tparams, batch, rng)

    self.params, self.tparams, ((self.loss, self.metrics), (self.grads, self.teacher_grads)) = jax.jit(
        everything)(self.batch, self.rng)


@pytest.fixture(scope="module")
def dmae():
  c = tiny("dmae")
  c.dmae.update(hidden_student_layers="1,2", hidden_teacher_layers="1,2")  # the optional term as well
  config_validation.validate(c)
  return Setup(c)


@pytest.fixture(scope="module")
def tinymim():
  c = tiny("tinymim")
  c.tinymim.color_jitter = 0.0
  c.teacher.model.depth = 3
  c.tinymim.teacher_layer = 2  # an intermediate teacher block (as block 18 of ViT-L)
  config_validation.validate(c)
  return Setup(c)


@pytest.fixture(scope="module")
def g2sd():
  return Setup(tiny("g2sd"))


@pytest.mark.parametrize("name,student_parts", [
    ("dmae", ("encoder", "decoder", "attn_adapters", "hidden_adapters")),
    ("tinymim", ("encoder",)),
    ("g2sd", ("encoder", "decoder", "predictor")),
])
def test_gradients_reach_the_student_only(name, student_parts, request):
  s = request.getfixturevalue(name)
  assert set(s.grads) == set(student_parts)
  for part in student_parts:
    assert not zero_grads(s.grads[part]), part
  assert zero_grads(s.teacher_grads)  # the teacher is frozen: stop_gradient on every target
  assert np.isfinite(float(s.loss))


# ----------------------------------------------------------------------------- D-MAE


def test_dmae_attention_term_uses_pre_softmax_logits_on_shared_tokens(dmae):
  s, c = dmae, dmae.config
  assert s.params["attn_adapters"]["adapter_0"]["kernel"].shape == (2, 4)
  # Reference: the SAME mask for both models, logits rebuilt from q and k by NumPy, the adapter by hand.
  k_mask, _ = jax.random.split(s.rng)
  mask = masking.random_mask(k_mask, 4, s.m.mask_spec(s.x), c.mask.ratio)
  _, s_out = s.m.student.apply({"params": s.params["encoder"]}, s.x, mask.keep)
  t_enc = vit.encoder_from_config(c.teacher.model, attn_layers=(2,))
  _, t_out = t_enc.apply({"params": s.tparams}, s.x, mask.keep)
  s_logits = np_relation(s_out["q_2"], s_out["k_2"])  # 4 visible tokens + cls
  t_logits = np_relation(t_out["q_2"], t_out["k_2"])
  assert s_logits.shape == (4, 2, 5, 5) and t_logits.shape == (4, 4, 5, 5)
  np.testing.assert_allclose(np.asarray(s_out["attn_logits_2"]), s_logits, rtol=1e-4, atol=1e-4)
  w = np.asarray(s.params["attn_adapters"]["adapter_0"]["kernel"], np.float64)
  mixed = np.stack([sum(w[h, g] * s_logits[:, h] for h in range(2)) for g in range(4)], axis=1)
  np.testing.assert_allclose(float(s.metrics["loss_attn"]), np.mean((mixed - t_logits) ** 2), rtol=1e-4)
  assert float(s.loss) == pytest.approx(float(s.metrics["loss_rec"] + s.metrics["loss_attn"] +
                                               s.metrics["loss_hidden"]), rel=1e-5)


def test_dmae_hidden_targets_are_norm1_outputs_and_final_norm(dmae):
  s, c = dmae, dmae.config
  assert "norm" in s.tparams  # hidden layer 2 = depth: the teacher's final norm is needed
  keep = masking.random_mask(jax.random.PRNGKey(1), 4, s.m.mask_spec(s.x), c.mask.ratio).keep
  got = s.m.teacher_features(s.tparams, s.x, keep)
  raw = vit.encoder_from_config(c.teacher.model, block_layers=(1,), final_norm=True)
  final, out = raw.apply({"params": s.tparams}, s.x, keep)
  n1 = s.tparams["blocks_1"]["norm1"]  # layer 1 -> the norm1 of block 2 on block 1's output
  np.testing.assert_allclose(np.asarray(got["hidden_1"]), np_layer_norm(out["block_1"], n1["scale"], n1["bias"]),
                             rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(got["hidden_2"]), np.asarray(final), rtol=1e-5, atol=1e-5)
  assert got["attn_2"].shape == (4, 4, 5, 5)


# ----------------------------------------------------------------------------- TinyMIM


def test_tinymim_relations_match_numpy_at_the_right_blocks(tinymim):
  s, c = tinymim, tinymim.config
  _, s_out = s.m.student.apply({"params": s.params["encoder"]}, s.x)  # unmasked: 16 tokens + cls
  full_teacher = vit.encoder_from_config(c.teacher.model, attn_layers=(2,), final_norm=False)
  _, t_out = full_teacher.apply({"params": s.tparams}, s.x)
  assert s_out["q_2"].shape == (4, 4, 17, 8)   # the student's last block: the teacher's 4 heads, head_dim 32/4
  assert t_out["q_2"].shape == (4, 4, 17, 16)  # the teacher's block 2 of 3: head_dim 64/4
  want_qk = np_relation_kl(np_relation(s_out["q_2"], s_out["k_2"]), np_relation(t_out["q_2"], t_out["k_2"]))
  want_vv = np_relation_kl(np_relation(s_out["v_2"], s_out["v_2"]), np_relation(t_out["v_2"], t_out["v_2"]))
  np.testing.assert_allclose(float(s.metrics["loss_qk"]), want_qk, rtol=1e-4)
  np.testing.assert_allclose(float(s.metrics["loss_vv"]), want_vv, rtol=1e-4)
  # The student's other blocks keep their own head count (same weight shapes: the relations tell them apart).
  assert s.params["encoder"]["blocks_0"]["attn"]["qkv"]["kernel"].shape == (32, 96)


def test_tinymim_last_mlp_and_final_norm_get_no_gradient(tinymim):
  s = tinymim
  g = s.grads["encoder"]
  assert zero_grads(g["blocks_1"]["mlp"]) and zero_grads(g["norm"])
  assert not zero_grads(g["blocks_1"]["attn"]["qkv"]) and not zero_grads(g["blocks_0"])
  assert "norm" not in s.tparams  # relations are read inside a block: the teacher needs no final norm
  # Frozen features skip the never-trained last MLP.
  enc = s.m.encoder_for_transfer(s.params)
  assert zero_grads(enc["blocks_1"]["mlp"]["fc2"]) and not zero_grads(s.params["encoder"]["blocks_1"]["mlp"]["fc2"])
  tokens, _ = s.m.encoder.apply({"params": enc}, s.x)
  np.testing.assert_allclose(np.asarray(s.m.features(s.params, s.batch)), np.asarray(tokens[:, 1:].mean(1)),
                             rtol=1e-5, atol=1e-5)
  # Drop path: constant on the blocks before the last, none on the last (the official scheme).
  c = tiny("tinymim")
  c.model.drop_path = 0.1
  assert get_method(c).student.drop_path_rates == (0.1, 0.0)
  c.tinymim.constant_drop_path = False
  assert get_method(c).student.drop_path_rates == ()


def _np_jitter(img, f, order):
  grey = lambda im: im @ np.array([0.299, 0.587, 0.114]) if im.shape[-1] == 3 else im[..., 0]
  for op in order:
    if op == 0:
      img = np.clip(img * f[0], 0, 1)
    elif op == 1:
      img = np.clip(f[1] * img + (1 - f[1]) * grey(img).mean(), 0, 1)
    elif img.shape[-1] == 3:
      img = np.clip(f[2] * img + (1 - f[2]) * grey(img)[..., None], 0, 1)
  return img


@pytest.mark.parametrize("channels", [1, 3])
def test_color_jitter_matches_numpy_and_is_deterministic(channels):
  mean, std = (0.5,) * channels, (0.25,) * channels
  pixels = np.random.default_rng(4).uniform(size=(6, 8, 8, channels))
  x = jnp.asarray((pixels - 0.5) / 0.25, jnp.float32)
  key = jax.random.PRNGKey(7)
  out = tinymim_lib.color_jitter(key, x, 0.4, mean, std)
  factors, orders = map(np.asarray, tinymim_lib.jitter_params(key, 6, 0.4))
  assert factors.min() >= 0.6 and factors.max() <= 1.4
  assert all(sorted(o) == [0, 1, 2] for o in orders)
  want = np.stack([_np_jitter(pixels[b], factors[b], orders[b]) for b in range(6)])
  np.testing.assert_allclose(np.asarray(out) * 0.25 + 0.5, want, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(tinymim_lib.color_jitter(key, x, 0.4, mean, std)))
  assert not np.allclose(np.asarray(out), np.asarray(tinymim_lib.color_jitter(jax.random.PRNGKey(8), x, 0.4, mean,
                                                                                std)))
  if channels == 1:  # saturation is a no-op on grey images
    one = jnp.asarray(pixels[:1], jnp.float32)
    np.testing.assert_array_equal(np.asarray(tinymim_lib.adjust_saturation(one, 1.4)), np.asarray(one))


def test_tinymim_teacher_may_be_a_tinymim_student(tinymim):
  """Sequential distillation: a TinyMIM student's encoder (its last block at 4 heads) is the next teacher."""
  batch, student = tinymim.batch, tinymim.params["encoder"]
  c = tiny("tinymim", teacher="unused")
  c.teacher.model.update(width=32, num_heads=2)        # the previous student's encoder...
  c.tinymim.update(teacher_last_heads=4, student_last_heads=4)  # ...whose last block has 4 heads
  config_validation.validate(c)
  m2 = get_method(c)
  student = {k: v for k, v in student.items() if k != "norm"}  # the loader drops a norm the teacher does not use
  weights.check_fit(jax.eval_shape(m2.teacher_init, jax.random.PRNGKey(1), batch), student, "first student")
  qk, _ = m2.teacher_relations(student, batch["image"])
  assert qk.shape == (4, 4, 17, 17)
  c.tinymim.teacher_last_heads = 0  # the head counts must line up
  with pytest.raises(config_validation.ConfigError, match="student_last_heads=4 must equal the teacher's head count"):
    config_validation.validate(c)


# ----------------------------------------------------------------------------- G2SD


def test_g2sd_targets_are_layernormed_teacher_decoder_features_on_all_tokens(g2sd):
  s = g2sd
  m, x, tparams = s.m, s.x, s.tparams
  assert set(tparams) == {"encoder", "decoder"} and {"norm", "head", "blocks_1"} <= set(tparams["decoder"])
  k_mask, k_drop = jax.random.split(s.rng)
  mask = m.draw_mask(k_mask, x)
  got = np.asarray(m.teacher_targets(tparams, x, mask))
  # Reference in the official layout: embed, scatter into grid order (un-shuffle), add the table, cls first.
  latent, _ = m.teacher_encoder.apply({"params": tparams["encoder"]}, x, mask.keep)
  dec = jax.tree.map(np.asarray, tparams["decoder"])
  emb = np.asarray(latent) @ dec["embed"]["kernel"] + dec["embed"]["bias"]
  grid = np.zeros((4, 16, 32))
  for b in range(4):
    grid[b, np.asarray(mask.keep[b])] = emb[b, 1:]
    grid[b, np.asarray(mask.masked[b])] = dec["mask_token"][0, 0]
  seq = np.concatenate([emb[:, :1], grid + posemb.make_table("sincos2d", 32, (4, 4), cls_token=False)], axis=1)
  h, _ = vit.Block(32, 2).apply({"params": tparams["decoder"]["blocks_0"]}, jnp.asarray(seq, jnp.float32))
  assert got.shape == (4, 17, 32)  # cls + every grid token, from block 1 of the teacher's 2
  np.testing.assert_allclose(got, np_layer_norm(h), rtol=1e-4, atol=1e-4)

  assert "head" not in s.params["decoder"] and "norm" not in s.params["decoder"]
  pred = np.asarray(m.predict_targets(s.params, x, mask, k_drop), np.float64)
  d = np.abs(pred - got)
  np.testing.assert_allclose(float(s.loss), np.mean(np.where(d < 2.0, 0.25 * d**2, d - 1.0)), rtol=1e-4)


def test_g2sd_teacher_without_decoder_stops_with_a_message(g2sd, tmp_path):
  s = g2sd
  c = tiny("g2sd")
  for bad in ({"encoder": s.tparams["encoder"]}, s.tparams["encoder"]):
    with pytest.raises(g2sd_lib.MissingTeacherDecoderError, match="needs the teacher's DECODER") as err:
      s.m.loss(s.params, bad, s.batch, jax.random.PRNGKey(2))
    assert "_full.pth" in str(err.value)
  # A workdir of a run without an MAE decoder is refused before anything is compiled.
  workdir = tmp_path / "tinymim_run"
  workdir.mkdir()
  (workdir / "config.json").write_text(json.dumps({"method": "tinymim"}))
  c.teacher.checkpoint = str(workdir)
  with pytest.raises(config_validation.ConfigError, match="holds a 'tinymim' run"):
    config_validation.validate(c)


# ----------------------------------------------------------------------------- configs


@pytest.mark.parametrize("method,field,value,fragment", [
    ("dmae", "dmae.attn_adapter", False, "needs equal head counts"),
    ("dmae", "dmae.attn_student_layers", "3", "outside the student's range 1..2"),
    ("dmae", "dmae.hidden_teacher_layers", "1", "same number of layers"),
    ("dmae", "model.scan", True, "unscanned stack"),
    ("tinymim", "tinymim.student_last_heads", 2, "must equal the teacher's head count"),
    ("tinymim", "tinymim.teacher_layer", 3, "outside the teacher's blocks 1..2"),
    ("tinymim", "tinymim.color_jitter", 1.5, "color_jitter"),
    ("g2sd", "g2sd.teacher_decoder_layer", 3, "outside the teacher decoder's blocks 1..2"),
    ("g2sd", "g2sd.tokens", "visible", "allowed: all, masked"),
    ("g2sd", "teacher.checkpoint", "", "WITH its decoder"),
])
def test_bad_fields_are_refused(method, field, value, fragment):
  c = tiny(method)
  config_validation.validate(c)
  section, key = field.split(".")
  c[section][key] = value
  with pytest.raises(config_validation.ConfigError, match=fragment):
    config_validation.validate(c)


def load_config(name, arg):
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", name + ".py")
  spec = importlib.util.spec_from_file_location(f"_distill_cfg_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_fashion_mnist_configs_share_the_quickstart_budget():
  mae = load_config("quickstart", "stage=mae")
  for method in ("dmae", "tinymim", "g2sd"):
    c = load_config("distill_fmnist", f"method={method},teacher=/somewhere")
    config_validation.validate(c)
    assert c.method == method and c.teacher.checkpoint == "/somewhere"
    assert (c.num_epochs, c.batch_size, c.optim.base_lr, c.data.image_size) == (
        mae.num_epochs, mae.batch_size, mae.optim.base_lr, 28)
    assert (c.model.width, c.model.depth, c.model.num_heads) == (64, 4, 2)
    assert (c.teacher.model.width, c.teacher.model.depth, c.teacher.model.num_heads) == (128, 4, 4)
  assert load_config("distill_fmnist", "method=g2sd").teacher.decoder.depth == \
      load_config("quickstart", "stage=teacher").decoder.depth
  with pytest.raises(ValueError, match="method='amd'"):
    load_config("distill_fmnist", "method=amd")


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_end_to_end_teachers_from_workdirs(tmp_path):
  """MAE teacher run -> D-MAE student from its workdir -> TinyMIM student distilled from the D-MAE student's
  workdir (sequential distillation); the MAE workdir's params are exactly a G2SD teacher."""
  teacher_cfg = config_base.base_config()
  teacher_cfg.model.update(variant="tiny", patch_size=8, width=64, depth=2, num_heads=4)
  teacher_cfg.decoder.update(width=32, depth=2, num_heads=2)
  teacher_cfg.data.update(source="synthetic", synthetic_size=32, image_size=32, channels=1)
  teacher_cfg.batch_size, teacher_cfg.total_steps, teacher_cfg.num_epochs = 4, 1, -1.0
  teacher_cfg.checkpoint_every_steps = 100
  teacher_dir = str(tmp_path / "teacher")
  loop.run(teacher_cfg, teacher_dir)

  dmae = tiny("dmae", teacher=teacher_dir)
  dmae_dir = str(tmp_path / "dmae")
  final = loop.run(dmae, dmae_dir)
  assert np.isfinite(final["loss_rec"]) and np.isfinite(final["loss_attn"])
  assert set(weights.load_params(dmae_dir)) == {"encoder", "decoder", "attn_adapters"}  # no teacher inside

  seq = tiny("tinymim", teacher=dmae_dir)
  seq.teacher.model.update(width=32, depth=2, num_heads=2)  # the D-MAE student's encoder
  seq.tinymim.update(teacher_layer=2, student_last_heads=2)
  final = loop.run(seq, str(tmp_path / "tinymim"))
  assert np.isfinite(final["loss_qk"]) and np.isfinite(final["loss_vv"])

  # G2SD: the MAE run's params ({'encoder', 'decoder'}) fit the G2SD teacher exactly and drive its loss.
  g = tiny("g2sd", teacher=teacher_dir)
  config_validation.validate(g)
  m = get_method(g)
  batch = batch_of(g)
  full = weights.load_params(teacher_dir)
  weights.check_fit(jax.eval_shape(m.teacher_init, jax.random.PRNGKey(0), batch), full, teacher_dir)
  loss, _ = jax.jit(m.loss)(m.init(jax.random.PRNGKey(0), batch), full, batch, jax.random.PRNGKey(1))
  assert np.isfinite(float(loss))
  assert os.path.isfile(os.path.join(teacher_dir, "config.json"))
