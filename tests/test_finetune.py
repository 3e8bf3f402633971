"""Fine-tuning: classifier, layer decay, mixup/cutmix, multi-view evaluation, pre-trained init, EMA,
G2SD specific distillation, and short real fine-tunes through the train loop."""
from __future__ import annotations

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amd_jax import evaluate, losses, mixup, recipes, weights
from amd_jax.config_validation import ConfigError, validate
from amd_jax.methods import get_method
from amd_jax.train import loop, optim, sharding

# Runs of the same configs compile the same programs: the session's compilation cache (conftest.py) compiles
# each once, here and in the subprocesses started from os.environ.
pytestmark = pytest.mark.usefixtures("compilation_cache")


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str, arg: str | None = None):
  path = os.path.join(REPO, "configs", name + ".py")
  spec = importlib.util.spec_from_file_location(f"_ft_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def tiny_finetune(method: str = "finetune", steps: int = 4, **model):
  c = load_config("test_tiny", f"steps={steps}")
  recipes.with_method_fields(c, method)
  c.model.update(**model)
  c.finetune.update(mixup=0.8, cutmix=1.0, label_smoothing=0.1)
  return c


def flat(tree):
  return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


# ------------------------------------------------------------------ layer-wise lr decay


@pytest.mark.parametrize("scan", [False, True])
def test_layer_decay_factor_of_every_parameter_group(scan):
  c = tiny_finetune(scan=scan)   # 'tiny': depth 2
  c.finetune.layer_decay = 0.5
  method = get_method(c)
  params = method.init(jax.random.PRNGKey(0), {"image": jnp.zeros((2, 16, 16, 1))})
  scales = flat(method.layer_scales(params))
  depth = 2
  seen = set()
  for key, scale in scales.items():
    scale = np.asarray(scale)
    if key.startswith("encoder/patch_embed") or key == "encoder/cls_token":
      expected = 0.5 ** (depth + 1)            # layer 0: 0.125
    elif key.startswith("encoder/blocks_"):
      i = int(key.split("/")[1].split("_")[1])
      expected = 0.5 ** (depth - i)            # block i is layer i + 1: 0.5, 1 ... of depth + 1 - (i + 1)
    elif key.startswith("encoder/blocks/block/"):
      expected = (0.5 ** (depth - np.arange(depth))).reshape((-1,) + (1,) * (scale.ndim - 1))
    else:
      assert key.split("/")[0] in ("fc_norm", "head"), key
      expected = 1.0
    np.testing.assert_array_equal(scale, np.broadcast_to(expected, scale.shape) if scale.ndim else expected,
                                  err_msg=key)
    seen.add(key.split("/")[0] if not key.startswith("encoder/") else key.split("/")[1])
  assert {"patch_embed", "cls_token", "fc_norm", "head"} <= seen
  assert ("blocks" in seen) if scan else {"blocks_0", "blocks_1"} <= seen


def test_layer_decay_reaches_the_updates():
  """First AdamW step moves each parameter by lr x its layer scale (Adam's first step is sign-like)."""
  c = tiny_finetune()
  c.finetune.layer_decay = 0.5
  c.optim.update(weight_decay=0.0, lr=1e-2, warmup_steps=0)
  method = get_method(c)
  params = method.init(jax.random.PRNGKey(0), {"image": jnp.zeros((2, 16, 16, 1))})
  tx, _ = optim.make_optimizer(c.optim, batch_size=8, total_steps=10, warmup_steps=0,
                               layer_scales=method.layer_scales(params))
  grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.3, p.dtype), params)
  updates, _ = tx.update(grads, tx.init(params), params)
  up = flat(updates)
  np.testing.assert_allclose(np.abs(up["head/kernel"]), 1e-2, rtol=1e-4)
  np.testing.assert_allclose(np.abs(up["encoder/blocks_1/attn/proj/kernel"]), 1e-2 * 0.5, rtol=1e-4)
  np.testing.assert_allclose(np.abs(up["encoder/blocks_0/attn/proj/kernel"]), 1e-2 * 0.25, rtol=1e-4)
  np.testing.assert_allclose(np.abs(up["encoder/patch_embed/proj/kernel"]), 1e-2 * 0.125, rtol=1e-4)


# ------------------------------------------------------------------------ mixup / cutmix


def test_smoothed_targets():
  t = np.asarray(mixup.smooth_one_hot(jnp.array([2, 0]), 4, 0.1))
  np.testing.assert_allclose(t[0], [0.025, 0.025, 0.925, 0.025], rtol=1e-6)
  np.testing.assert_allclose(t.sum(-1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("shape", [(8, 16, 16, 3), (4, 4, 16, 16, 3)])
@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_mixed_targets_sum_to_one_and_match_the_pixels(shape, kind):
  cfg = mixup.MixupConfig(mixup_alpha=0.8 if kind == "mixup" else 0.0, cutmix_alpha=1.0 if kind == "cutmix" else 0.0,
                          prob=1.0, label_smoothing=0.1)
  b = shape[0]
  # Example i is constant i + 1 everywhere: the partner's share of pixels is readable from the values.
  x = jnp.broadcast_to(jnp.arange(1, b + 1, dtype=jnp.float32).reshape((b,) + (1,) * (len(shape) - 1)), shape)
  labels = jnp.arange(b) % 5
  for seed in range(6):
    mixed, targets, info = mixup.mix_batch(jax.random.PRNGKey(seed), x, labels, 5, cfg)
    lam = float(info["mix_lambda"])
    np.testing.assert_allclose(np.asarray(targets).sum(-1), 1.0, rtol=1e-5)
    own, partner = np.arange(1, b + 1, dtype=np.float32), np.arange(b, 0, -1, dtype=np.float32)
    mixed = np.asarray(mixed).reshape(b, -1)
    if kind == "mixup":
      np.testing.assert_allclose(mixed, (lam * own + (1 - lam) * partner)[:, None] * np.ones_like(mixed), rtol=1e-5)
    else:
      assert float(info["mix_is_cutmix"]) == 1.0
      share = (mixed == partner[:, None]).mean(-1)        # fraction of pixels pasted from the partner
      rows = own != partner                                # the middle row of an odd batch is its own partner
      np.testing.assert_allclose(share[rows], 1.0 - lam, atol=1e-6)
    expected = lam * np.asarray(mixup.smooth_one_hot(labels, 5, 0.1)) + (1 - lam) * np.asarray(
        mixup.smooth_one_hot(labels[::-1], 5, 0.1))
    np.testing.assert_allclose(np.asarray(targets), expected, rtol=1e-5)


def test_cutmix_box_is_the_same_on_every_frame():
  cfg = mixup.MixupConfig(mixup_alpha=0.0, cutmix_alpha=1.0, prob=1.0)
  x = jnp.concatenate([jnp.zeros((1, 4, 8, 8, 1)), jnp.ones((1, 4, 8, 8, 1))])
  mixed, _, _ = mixup.mix_batch(jax.random.PRNGKey(3), x, jnp.array([0, 1]), 2, cfg)
  frames = np.asarray(mixed[0, ..., 0])
  for t in range(1, 4):
    np.testing.assert_array_equal(frames[t], frames[0])


def test_mixup_off_gives_plain_smoothed_targets_and_the_same_pixels():
  cfg = mixup.MixupConfig(mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.0)
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 1))
  mixed, targets, _ = mixup.mix_batch(jax.random.PRNGKey(1), x, jnp.array([0, 1, 2, 3]), 4, cfg)
  np.testing.assert_array_equal(np.asarray(mixed), np.asarray(x))
  np.testing.assert_array_equal(np.asarray(targets), np.eye(4))


# ------------------------------------------------------------------ evaluation


def test_view_probabilities_are_averaged_per_example():
  logits = jnp.log(jnp.array([[0.7, 0.2, 0.1], [0.1, 0.2, 0.7],     # example 0: two views
                              [0.2, 0.6, 0.2], [0.2, 0.6, 0.2]]))   # example 1
  probs = np.asarray(evaluate.average_view_probabilities(logits, 2))
  np.testing.assert_allclose(probs, [[0.4, 0.2, 0.4], [0.2, 0.6, 0.2]], rtol=1e-5)


def test_multi_view_eval_step_counts_top1_and_top5_and_ignores_padding():
  mesh = sharding.make_mesh(recipes.config_base.mesh_config())
  # Fake model: logits = the mean pixel value of each view on class 0, else 0; 7 classes.
  def predict(params, batch):
    v = batch["video"].mean(axis=(1, 2, 3, 4))
    return jnp.stack([v * params] + [jnp.zeros_like(v)] * 6, axis=-1)
  step = evaluate.make_eval_step(predict, "video", mesh)
  views = np.zeros((3, 2, 2, 4, 4, 1), np.float32)
  views[0] = 5.0                      # both views say class 0
  views[1, 0], views[1, 1] = 9.0, -9.0   # views disagree: mean softmax is near uniform on class 0 vs rest
  batch = {"video": views, "label": np.array([0, 3, -1], np.int32), "mask": np.array([True, True, False])}
  out = jax.device_get(step(jnp.float32(1.0), batch))
  assert int(out["count"]) == 2
  assert int(out["top1"]) == 1        # example 0 right; example 1 (label 3) wrong at top-1
  # example 1: class 0 gets ~0.5, the six others ~0.083 each: label 3 is within the top 5 by the tie order
  assert int(out["top5"]) >= 1


# -------------------------------------------------------------- classifier and init


def test_classifier_heads_start_small_and_distilled_predict_averages_heads():
  c = tiny_finetune("g2sd_sd")
  c.teacher.model.update(c.model.to_dict())
  method = get_method(c)
  batch = {"image": jax.random.normal(jax.random.PRNGKey(0), (4, 16, 16, 1))}
  params = method.init(jax.random.PRNGKey(1), batch)
  assert "dist_token" in params["encoder"] and "head_dist" in params
  # trunc-normal(0.02) cut at 2 std, x 1e-3: the official 2e-5-scale start
  assert 0 < float(jnp.abs(params["head"]["kernel"]).max()) <= 2 * 0.02 * 1e-3
  logits, dist = method.model.apply({"params": params}, batch["image"])
  np.testing.assert_allclose(np.asarray(method.predict(params, batch)), np.asarray((logits + dist) / 2), rtol=1e-6)


def test_pool_validation_and_bad_fields_name_the_field():
  c = tiny_finetune()
  c.finetune.pool = "max"
  with pytest.raises(ConfigError, match=r"config\.finetune\.pool"):
    validate(c)
  c = tiny_finetune()
  c.finetune.layer_decay = 0.0
  with pytest.raises(ConfigError, match=r"config\.finetune\.layer_decay"):
    validate(c)
  c = tiny_finetune()
  c.finetune.init = "/nonexistent/run"
  with pytest.raises(ConfigError, match=r"config\.finetune\.init"):
    validate(c)
  c = tiny_finetune("g2sd_sd")
  c.distill.kind = "medium"
  with pytest.raises(ConfigError, match=r"config\.distill\.kind"):
    validate(c)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("pretrain"))
  loop.run(load_config("test_tiny", "steps=2"), workdir)
  return workdir


@pytest.mark.slow
def test_finetune_starts_from_the_pretrained_encoder(pretrained, tmp_path):
  c = tiny_finetune(steps=1)
  c.finetune.init = pretrained
  method = get_method(c)
  fresh = method.init(jax.random.PRNGKey(0), {"image": jnp.zeros((2, 16, 16, 1))})
  loaded = method.load_pretrained(jax.device_get(fresh))
  source = weights.load_params(pretrained)["encoder"]
  assert "norm" in source and "norm" not in loaded["encoder"]   # mean pooling: fc_norm replaces it
  for key, value in flat(loaded["encoder"]).items():
    np.testing.assert_array_equal(value, flat(source)[key])
  np.testing.assert_array_equal(loaded["head"]["kernel"], fresh["head"]["kernel"])


@pytest.mark.slow
def test_pretrained_encoder_that_does_not_fit_names_keys(pretrained):
  c = tiny_finetune(steps=1, width=48, num_heads=2)
  c.finetune.init = pretrained
  method = get_method(c)
  fresh = method.init(jax.random.PRNGKey(0), {"image": jnp.zeros((2, 16, 16, 1))})
  with pytest.raises(weights.WeightsMismatchError, match=r"(?s)config\.model.*mis-shaped.*blocks_0/attn/proj/kernel: expected \(48, 48\), got \(32, 32\)"):
    method.load_pretrained(jax.device_get(fresh))


def test_ema_follows_its_recurrence():
  c = tiny_finetune()
  method = get_method(c)
  batch = {"image": jax.random.normal(jax.random.PRNGKey(0), (8, 16, 16, 1)), "label": jnp.arange(8) % 4}
  params = method.init(jax.random.PRNGKey(1), batch)
  tx, schedule = optim.make_optimizer(c.optim, batch_size=8, total_steps=10, warmup_steps=0)
  state = loop.TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params),
                          ema_params=jax.tree.map(jnp.copy, params))
  step = jax.jit(loop.make_train_step(method, tx, schedule, jax.random.PRNGKey(2), ema_decay=0.9))
  new, _ = step(state, batch, None)
  for key, p0 in flat(params).items():
    expected = 0.9 * np.asarray(p0) + 0.1 * np.asarray(flat(new.params)[key])
    np.testing.assert_allclose(np.asarray(flat(new.ema_params)[key]), expected, rtol=1e-5, atol=1e-7)


# -------------------------------------------------------------- G2SD specific distillation


def test_specific_distillation_loss_and_gradients():
  c = tiny_finetune("g2sd_sd")
  c.teacher.model.update(c.model.to_dict())
  c.finetune.update(mixup=0.0, cutmix=0.0, label_smoothing=0.0)
  c.distill.update(kind="hard", alpha=0.5)
  method = get_method(c)
  batch = {"image": jax.random.normal(jax.random.PRNGKey(0), (8, 16, 16, 1)), "label": jnp.arange(8) % 4}
  params = method.init(jax.random.PRNGKey(1), batch)
  teacher = jax.tree.map(lambda p: p * 50.0, method.teacher_init(jax.random.PRNGKey(2), batch))  # confident
  rng = jax.random.PRNGKey(3)
  loss, aux = method.loss(params, teacher, batch, rng)
  t_logits, _ = method.teacher.apply({"params": teacher}, batch["image"])
  # Dropout-free model: recompute the student's two heads and the expected terms by hand.
  logits, dist = method.model.apply({"params": params}, batch["image"])
  ce = losses.soft_cross_entropy(logits, jax.nn.one_hot(batch["label"], 4))
  hard = losses.soft_cross_entropy(dist, jax.nn.one_hot(jnp.argmax(t_logits, -1), 4))
  np.testing.assert_allclose(float(aux["loss_ce"]), float(ce), rtol=1e-5)
  np.testing.assert_allclose(float(aux["loss_distill"]), float(hard), rtol=1e-5)
  np.testing.assert_allclose(float(loss), 0.5 * float(ce) + 0.5 * float(hard), rtol=1e-5)
  g_student, g_teacher = jax.grad(lambda p, t: method.loss(p, t, batch, rng)[0], argnums=(0, 1))(params, teacher)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(g_teacher))
  assert float(jnp.abs(g_student["head_dist"]["kernel"]).max()) > 0
  assert float(jnp.abs(g_student["encoder"]["dist_token"]).max()) > 0
  c.distill.update(kind="soft", temperature=2.0)
  soft = get_method(c).loss(params, teacher, batch, rng)[1]["loss_distill"]
  np.testing.assert_allclose(float(soft), float(losses.logit_distillation(dist, t_logits, 2.0, hard=False)),
                             rtol=1e-5)


# -------------------------------------------------------------- end to end through the loop


@pytest.mark.parametrize("name", ["finetune_vit_s_ssv2", "finetune_vit_b_k400", "g2sd_sd_vit_s_in1k",
                                  "finetune_vit_s_in1k"])
@pytest.mark.slow
def test_recipe_runlocal_trains_and_evaluates(name, tmp_path):
  c = load_config(name, "runlocal")
  if c.data.modality == "video":   # a multi-view test as in the recipe, on the synthetic clips
    c.data.update(test_num_clips=2, test_num_crops=3)
    c.eval.batch_size = 4
  result = loop.run(c, str(tmp_path))
  assert np.isfinite(result["loss"])
  assert result["eval/examples"] == c.data.synthetic_size
  assert 0.0 <= result["eval/top1"] <= result["eval/top5"] <= 1.0
  if name == "finetune_vit_s_in1k":   # the finished run, evaluated again from its workdir
    again = evaluate.evaluate_workdir(str(tmp_path), max_train_examples=8)
    assert again["eval/top1"] == result["eval/top1"] and again["eval/loss"] == pytest.approx(result["eval/loss"])
    assert 0.0 <= again["knn_top1"] <= 1.0 and 0.0 <= again["linear_probe_top1"] <= 1.0


@pytest.mark.slow
def test_short_fashion_mnist_finetune_ends_far_above_chance(tmp_path):
  """From scratch (no pre-trained encoder to lean on), a small ViT: the fine-tuning loop alone must learn."""
  c = load_config("finetune_fmnist", "init=")
  c.model.update(width=32, depth=2, num_heads=2, patch_size=7, drop_path=0.0)
  c.finetune.update(layer_decay=1.0, mixup=0.0, cutmix=0.0, label_smoothing=0.1)
  c.num_epochs, c.total_steps = -1.0, 150
  c.batch_size = 128
  c.optim.update(lr=3e-3, warmup_epochs=-1.0, warmup_steps=10)
  c.log_every_steps = 50
  result = loop.run(c, str(tmp_path))
  assert result["eval/examples"] == 10000
  assert result["eval/top1"] > 0.5, result   # chance is 0.1


@pytest.mark.slow
def test_tinymim_student_hands_over_its_encoder_with_the_last_mlp_off(tmp_path):
  pre = load_config("tinymim_vit_t_in1k", "runlocal")
  loop.run(pre, str(tmp_path / "pre"))
  c = load_config("finetune_vit_s_in1k", "runlocal")
  c.model.update(pre.model.to_dict())
  c.model.update(drop_path=0.0)
  c.finetune.init = str(tmp_path / "pre")
  method = get_method(c)
  x = {"image": jnp.zeros((2, c.data.image_size, c.data.image_size, c.data.channels))}
  loaded = method.load_pretrained(jax.device_get(method.init(jax.random.PRNGKey(0), x)))["encoder"]
  source = weights.load_params(str(tmp_path / "pre"))["encoder"]
  last = f"blocks_{method.model.encoder.depth - 1}"
  assert not np.any(loaded[last]["mlp"]["fc2"]["kernel"]) and np.any(source[last]["mlp"]["fc2"]["kernel"])
  np.testing.assert_array_equal(loaded["blocks_0"]["mlp"]["fc2"]["kernel"], source["blocks_0"]["mlp"]["fc2"]["kernel"])
