"""Configs in configs/ load and validate; every bad value stops with a ConfigError naming field and value."""
from __future__ import annotations

import glob
import importlib.util
import os
import subprocess
import sys
import textwrap

import jax
import pytest

from amd_jax import config_base, config_validation
from amd_jax.data import pipeline
from amd_jax.train import loop
from amd_jax.config_validation import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(p for p in glob.glob(os.path.join(REPO, "configs", "*.py")) if not os.path.basename(p).startswith("_"))
# Sources that read user data; their recipes ship with an empty config.data.path.
DATA_SOURCES = ("tfds", "video_list", "image_folder")


def load_config(name: str, arg: str | None = None):
  """configs/<name>.py:get_config(arg), loaded by path like --config does."""
  path = name if os.path.isabs(name) else os.path.join(REPO, "configs", name + ".py")
  spec = importlib.util.spec_from_file_location(f"_cfg_{os.path.basename(path)[:-3]}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg is not None else module.get_config()


def tiny(arg: str | None = None):
  return load_config("test_tiny", arg)


def _name(path):
  return os.path.basename(path)[:-3]


def test_configs_dir_has_the_recipes():
  names = {_name(p) for p in CONFIG_FILES}
  assert {"quickstart", "test_tiny", "mae_vit_b_in1k", "videomae_vit_b_k400", "videomae_vit_s_ssv2"} <= names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=_name)
def test_every_config_loads_and_validates(path):
  config = load_config(path)
  assert config.method and config.batch_size > 0
  if config.data.source in DATA_SOURCES and not config.data.path:
    # A recipe for data this machine lacks: validation must say which field to set.
    with pytest.raises(ConfigError, match=r"config\.data\.path"):
      config_validation.validate(config)
    local = load_config(path, "runlocal")
    assert local.data.source == "synthetic"
    config_validation.validate(local)
  else:
    config_validation.validate(config)


def _takes_runlocal(path) -> bool:
  return "runlocal" in open(path).read()


@pytest.mark.parametrize("path", [p for p in CONFIG_FILES if _takes_runlocal(p)], ids=_name)
def test_every_runlocal_warms_up_for_less_than_its_run(path):
  config = load_config(path, "runlocal")
  config_validation.validate(config)
  schedule = loop.schedule_for(config, pipeline.num_examples(config.data))
  assert 0 <= schedule.warmup_steps < schedule.total_steps, schedule


@pytest.mark.parametrize("name", ["mae_vit_b_in1k", "videomae_vit_b_k400", "videomae_vit_s_ssv2", "quickstart"])
def test_runlocal_variants_validate(name):
  config = load_config(name, "runlocal")
  config_validation.validate(config)
  assert config.total_steps > 0 and config.num_epochs < 0
  assert config.total_steps <= 10


def test_recipes_keep_their_published_numbers():
  mae = load_config("mae_vit_b_in1k")
  assert (mae.batch_size, mae.num_epochs, mae.optim.base_lr, mae.mask.ratio) == (4096, 800.0, 1.5e-4, 0.75)
  assert load_config("mae_vit_b_in1k", "epochs=400").num_epochs == 400.0
  k400 = load_config("videomae_vit_b_k400")
  assert (k400.method, k400.mask.kind, k400.mask.ratio, k400.model.qkv_bias) == ("videomae", "tube", 0.9, "qv")


def test_tiny_video_variant():
  c = tiny("video")
  assert c.method == "videomae" and c.data.modality == "video" and c.mask.kind == "tube"
  config_validation.validate(c)
  c = tiny("steps=7,batch=4,width=64")
  assert (c.total_steps, c.batch_size, c.model.width) == (7, 4, 64)
  config_validation.validate(c)


# ----------------------------------------------------------------- bad values


def _expect_error(config, *fragments):
  with pytest.raises(ConfigError) as info:
    config_validation.validate(config)
  message = str(info.value)
  for fragment in fragments:
    assert fragment in message, f"{fragment!r} not in {message!r}"
  return message


@pytest.mark.parametrize("ratio", [0.0, 1.0, 1.5, -0.25])
def test_bad_mask_ratio(ratio):
  c = tiny()
  c.mask.ratio = ratio
  _expect_error(c, f"config.mask.ratio={ratio!r}")


def test_image_size_not_divisible_by_patch_size():
  c = tiny()
  c.model.patch_size = 5
  _expect_error(c, "config.data.image_size=16", "patch_size=5")


def test_frames_not_divisible_by_tubelet():
  c = tiny("video")
  c.data.num_frames = 5
  _expect_error(c, "config.data.num_frames=5", "tubelet_size=2")


def test_batch_not_divisible_by_device_count(monkeypatch):
  c = tiny("batch=8")
  monkeypatch.setattr(jax, "device_count", lambda *a, **k: 3)
  _expect_error(c, "config.batch_size=8", "3")


def test_batch_not_divisible_by_8_simulated_devices():
  script = textwrap.dedent("""
      import importlib.util, jax
      from amd_jax import config_validation
      spec = importlib.util.spec_from_file_location("t", "configs/test_tiny.py")
      m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
      assert jax.device_count() == 8, jax.device_count()
      config_validation.validate(m.get_config("batch=16"))
      try:
        config_validation.validate(m.get_config("batch=12"))
      except config_validation.ConfigError as e:
        print("ERROR:", e)
      """)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
             TF_CPP_MIN_LOG_LEVEL="2")
  proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "ERROR: config.batch_size=12" in proc.stdout and "(8)" in proc.stdout, proc.stdout


def test_unknown_method():
  c = tiny()
  c.method = "maee"
  _expect_error(c, "config.method='maee'", "mae")


def test_missing_data_path():
  c = tiny()
  c.data.update(source="fashion_mnist", path="/nonexistent/fashion", image_size=28, mean="0.2860", std="0.3530")
  _expect_error(c, "config.data.path='/nonexistent/fashion'")


def test_empty_video_list_path():
  c = tiny("video")
  c.data.source = "video_list"
  _expect_error(c, "config.data.path")


@pytest.mark.parametrize("section,key", [("optim", "lrr"), ("model", "widht"), (None, "totl_steps")])
def test_unknown_field(section, key):
  c = tiny()
  target = c[section] if section else c
  target[key] = 1
  field = f"config.{section}.{key}" if section else f"config.{key}"
  _expect_error(c, field)


@pytest.mark.parametrize("field,value", [
    ("qkv_bias", "qkv"), ("pos_emb", "learned"), ("dtype", "float16"), ("remat", "everything"),
    ("variant", "XL"), ("drop_path", 1.0), ("attention", "bogus"), ("mlp_ratio", 0.0)])
def test_bad_model_fields(field, value):
  c = tiny()
  c.model[field] = value
  _expect_error(c, f"config.model.{field}={value!r}")


def test_heads_must_divide_width():
  c = tiny("width=36")
  c.model.num_heads = 5
  _expect_error(c, "config.model.num_heads=5", "36")


@pytest.mark.parametrize("total_steps,num_epochs", [(10, 2.0), (-1, -1.0)])
def test_exactly_one_duration(total_steps, num_epochs):
  c = tiny()
  c.total_steps, c.num_epochs = total_steps, num_epochs
  _expect_error(c, "config.total_steps", "config.num_epochs", str(total_steps), str(num_epochs))


@pytest.mark.parametrize("mesh,fragment", [
    (dict(data=2, fsdp=1, tensor=1), "= 2"),
    (dict(data=1, fsdp=2, tensor=3), "= 6"),
    (dict(data=-1, fsdp=-1, tensor=1), "at most one axis"),
])
def test_mesh_product_must_match_devices(mesh, fragment, monkeypatch):
  monkeypatch.setattr(jax, "device_count", lambda *a, **k: 1)
  c = tiny()
  c.mesh.update(mesh)
  _expect_error(c, "config.mesh", fragment)


@pytest.mark.parametrize("field,value", [
    ("optim.b2", 1.0), ("optim.weight_decay", -0.1), ("optim.grad_clip", -1.0), ("log_every_steps", 0),
    ("checkpoint_every_steps", 0), ("batch_size", 0), ("decoder.width", 0), ("mask.kind", "block")])
def test_other_bad_values(field, value):
  c = tiny()
  *parents, leaf = field.split(".")
  node = c
  for p in parents:
    node = node[p]
  node[leaf] = value
  _expect_error(c, f"config.{field}={value!r}")


def test_tube_mask_needs_video():
  c = tiny()
  c.mask.kind = "tube"
  _expect_error(c, "config.mask.kind='tube'", "video")


def test_bad_data_fields_are_config_errors():
  c = tiny()
  c.data.mean = "0.5,0.5"   # two values for one channel
  _expect_error(c, "config.data.mean='0.5,0.5'")


@pytest.mark.parametrize("field,value", [("allow_config_change", True), ("shard_teacher", "replicated")])
def test_run_switches_can_be_set_on_a_locked_config(field, value):
  """The validator accepts these fields, and loop.run's refusal message tells users to pass
  --config.allow_config_change=True; the CLI locks the config (config_flags lock_config=True), so
  the field must exist in the config for that override to be possible."""
  c = tiny()
  c.lock()
  c[field] = value
  config_validation.validate(c)
  assert c[field] == value


def test_shard_teacher_choices():
  c = tiny()
  c.shard_teacher = "yes"
  _expect_error(c, "config.shard_teacher='yes'")


def test_validation_does_not_mutate_config():
  c = tiny()
  before = c.to_json_best_effort(sort_keys=True)
  config_validation.validate(c)
  assert c.to_json_best_effort(sort_keys=True) == before


def test_resume_changes_sort_identity_settings_and_free_fields():
  a = tiny().to_dict()
  b = tiny("width=64,steps=9").to_dict()
  b["optim"]["lr"] = 0.5
  b["log_every_steps"] = 7            # operational: free to change
  identity, settings = config_validation.resume_changes(a, b)
  assert identity == ["model.width: 0 -> 64"]
  assert settings == ["optim.lr: 0.001 -> 0.5", "total_steps: 4 -> 9"]


# --------------------------------------------------------------- config_base


def test_parse_arg_types_and_defaults():
  args = config_base.parse_arg(None, runlocal=False, epochs=800, lr=0.5, name="x")
  assert (args.runlocal, args.epochs, args.lr, args.name) == (False, 800, 0.5, "x")
  args = config_base.parse_arg("runlocal,epochs=400,lr=0.25,name=abc", runlocal=False, epochs=800, lr=0.5,
                               name="x")
  assert args.runlocal is True and args.epochs == 400 and isinstance(args.epochs, int)
  assert args.lr == 0.25 and args.name == "abc"
  assert config_base.parse_arg("", video=False).video is False
  for text, expected in [("video=true", True), ("video=1", True), ("video=False", False), ("video=0", False),
                         ("video=no", False)]:
    assert config_base.parse_arg(text, video=False).video is expected, text


def test_parse_arg_errors():
  with pytest.raises(ValueError, match="runlokal"):
    config_base.parse_arg("runlokal", runlocal=False)
  with pytest.raises(ValueError):
    config_base.parse_arg("epochs=many", epochs=800)


def test_parse_floats_and_ints():
  assert config_base.parse_floats("0.485,0.456, 0.406") == (0.485, 0.456, 0.406)
  assert config_base.parse_floats("1") == (1.0,)
  assert config_base.parse_floats("") == ()
  assert config_base.parse_ints("6,12") == (6, 12)
  assert config_base.parse_ints(" 3 ") == (3,)
  assert config_base.parse_ints("") == ()
  with pytest.raises(ValueError):
    config_base.parse_floats("0.5,abc")
  with pytest.raises(ValueError):
    config_base.parse_ints("1.5")


def test_a_field_newer_than_a_saved_run_is_not_a_change():
  """A workdir written before a field existed resumes without a change: the absent field is its default."""
  saved = tiny().to_dict()
  del saved["model"]["init_scheme"], saved["optim"]["warmup_fraction"], saved["init"]
  assert config_validation.resume_changes(saved, tiny().to_dict()) == ([], [])
  current = tiny().to_dict()
  current["optim"]["warmup_fraction"] = 0.1
  assert config_validation.resume_changes(saved, current)[1] == ["optim.warmup_fraction: -1.0 -> 0.1"]
