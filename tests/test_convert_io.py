"""Conversion input and output: gs:// URLs (the local GCS emulator), the user's umask, never overwriting."""
from __future__ import annotations

import json
import os
import stat

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amd_jax import config_base, convert, paths
from amd_jax.convert import __main__ as cli
from amd_jax.convert import torch_io
from amd_jax.methods.mae import MAE

W, DEPTH, HEADS, IMG, PATCH = 64, 2, 4, 32, 8


def image_config():
  c = config_base.base_config()
  c.model.update(variant="tiny", width=W, depth=DEPTH, num_heads=HEADS, patch_size=PATCH)
  c.decoder.update(width=32, depth=1, num_heads=2)
  c.data.update(image_size=IMG, channels=3)
  return c


def image_params() -> dict:
  method = MAE(image_config())
  abstract = jax.eval_shape(method.init, jax.random.PRNGKey(0),
                            {"image": jax.ShapeDtypeStruct((1, IMG, IMG, 3), jnp.float32)})
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda a: (0.1 * rng.standard_normal(a.shape)).astype(np.float32), abstract)


def image_arch():
  return convert.arch_from_run_config(image_config())


def assert_trees_bit_equal(a, b):
  fa, fb = convert.mapping.flatten(a), convert.mapping.flatten(b)
  assert sorted(fa) == sorted(fb)
  for path in fa:
    assert np.array_equal(np.asarray(fa[path]), np.asarray(fb[path])), "/".join(path)


def every_file(folder) -> list[str]:
  return sorted(os.path.relpath(os.path.join(d, n), folder) for d, _, names in os.walk(folder) for n in names)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_take_the_users_umask(umask, tmp_path):
  params, arch = image_params(), image_arch()
  old = os.umask(umask)
  try:
    convert.export_torch(params, str(tmp_path / "enc.pth"), arch, "mae", parts=("encoder",))
    convert.export_torch(params, str(tmp_path / "full.safetensors"), arch, "mae", parts=("encoder", "decoder"))
    convert.export_torch(params, str(tmp_path / "hf"), arch, "hf_vitmae", parts=("encoder", "decoder"))
    assert cli.main(["to_flax", "--input", str(tmp_path / "enc.pth"), "--output", str(tmp_path / "flax")]) == 0
  finally:
    os.umask(old)
  files = every_file(tmp_path)
  assert files == ["enc.pth", "enc.pth.amd_jax.json", "flax/conversion.json", "flax/params.npz",
                   "full.safetensors", "full.safetensors.amd_jax.json", "hf/amd_jax.json", "hf/config.json",
                   "hf/model.safetensors"]   # and no temporary file left behind
  for name in files:
    assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o666 & ~umask, name


def test_existing_outputs_are_never_replaced(tmp_path, capsys):
  params, arch = image_params(), image_arch()
  path = str(tmp_path / "enc.safetensors")
  convert.export_torch(params, path, arch, "mae", parts=("encoder",))
  before = {n: (tmp_path / n).read_bytes() for n in every_file(tmp_path)}
  other = jax.tree.map(lambda a: a + 1, params)
  with pytest.raises(FileExistsError, match="nothing was written"):
    convert.export_torch(other, path, arch, "mae", parts=("encoder",))
  # Only the record is in the way: still nothing is written.
  os.remove(path)
  with pytest.raises(FileExistsError):
    convert.export_torch(other, path, arch, "mae", parts=("encoder",))
  assert not os.path.exists(path)
  convert.export_torch(other, path, arch, "mae", parts=("encoder",), overwrite=True)
  assert (tmp_path / "enc.safetensors.amd_jax.json").read_bytes() != b""
  back, _ = convert.load_torch_checkpoint(path, arch)
  assert_trees_bit_equal(back["encoder"], other["encoder"])
  assert before.keys() == set(every_file(tmp_path))


@pytest.mark.gcs
def test_conversion_to_and_from_a_bucket(gcs, tmp_path, capsys):
  """Every input and output of a conversion in the bucket: files, a transformers directory, the CLI both ways."""
  params, arch = image_params(), image_arch()
  convert.export_torch(params, gcs / "exports/full.pth", arch, "mae", parts=("encoder", "decoder"))
  convert.export_torch(params, gcs / "exports/enc.safetensors", arch, "mae", parts=("encoder",))
  convert.export_torch(params, gcs / "exports/hf", arch, "hf_vitmae", parts=("encoder", "decoder"))
  assert gcs.objects("exports") == [
      "exports/enc.safetensors", "exports/enc.safetensors.amd_jax.json", "exports/full.pth",
      "exports/full.pth.amd_jax.json", "exports/hf/amd_jax.json", "exports/hf/config.json",
      "exports/hf/model.safetensors"]
  for name in ("full.pth", "hf"):
    back, report = convert.load_torch_checkpoint(gcs / f"exports/{name}", arch, strict=True)
    assert report.parts == ["encoder", "decoder"]
    assert_trees_bit_equal(back, params)
  cfg = image_config()
  assert_trees_bit_equal(convert.load_torch_encoder(gcs / "exports/enc.safetensors", cfg.model, image_size=IMG),
                         params["encoder"])
  # The command line, bucket to bucket, with no architecture flags (the files carry their record).
  cwd = os.getcwd()
  os.chdir(tmp_path)
  try:
    assert cli.main(["to_flax", "--input", gcs / "exports/full.pth", "--output", gcs / "flax"]) == 0
    assert "layout: mae (from amd_jax's export record)" in capsys.readouterr().out
    assert cli.main(["to_torch", "--params", gcs / "flax/params.npz", "--include_decoder", "--output",
                     gcs / "back/full.safetensors"]) == 0
    assert cli.main(["to_flax", "--input", gcs / "exports/hf", "--output", gcs / "flax_hf"]) == 0
    assert cli.main(["to_flax", "--input", gcs / "exports/full.pth", "--output", gcs / "flax"]) == 2
    assert "exists" in capsys.readouterr().err
  finally:
    os.chdir(cwd)
  assert not os.listdir(tmp_path)   # nothing landed on local disk (no ./gs:/ folder)
  assert gcs.objects("flax") == ["flax/conversion.json", "flax/params.npz"]
  assert gcs.objects("back") == ["back/full.safetensors", "back/full.safetensors.amd_jax.json"]
  flax_params, meta = torch_io.load_flax_params(gcs / "flax/params.npz")
  assert meta["source"] == gcs / "exports/full.pth"
  assert_trees_bit_equal(flax_params, params)
  hf_params, _ = torch_io.load_flax_params(gcs / "flax_hf/params.npz")
  assert_trees_bit_equal(hf_params, params)
  back, _ = convert.load_torch_checkpoint(gcs / "back/full.safetensors", arch, strict=True)
  assert_trees_bit_equal(back, params)


@pytest.mark.gcs
def test_to_torch_from_a_run_in_a_bucket(gcs, tmp_path):
  """An amd_jax workdir in the bucket (its config.json and checkpoint) exported to the bucket."""
  from amd_jax.train.checkpoint import Checkpointer  # pylint: disable=g-import-not-at-top
  params, cfg = image_params(), image_config()
  paths.write_text(gcs / "run/config.json", cfg.to_json_best_effort())
  ckpt = Checkpointer(gcs / "run", every_steps=1, keep=1, async_save=False)
  ckpt.save(1, {"step": jnp.asarray(1), "params": params}, force=True)
  ckpt.close()
  assert cli.main(["to_torch", "--workdir", gcs / "run", "--include_decoder", "--output",
                   gcs / "student.safetensors"]) == 0
  record = json.loads(paths.read_text(gcs / "student.safetensors.amd_jax.json"))
  assert record["source"] == gcs / "run" and record["layout"] == "mae"
  back, _ = convert.load_torch_checkpoint(gcs / "student.safetensors", image_arch(), strict=True)
  assert_trees_bit_equal(back, params)
