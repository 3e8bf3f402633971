"""amd_jax.paths: the one file layer, on local disk and on a real GCS API (the local emulator)."""
import os
import stat

import pytest

from amd_jax import paths


def test_local_write_is_atomic_and_takes_the_umask(tmp_path):
  target = tmp_path / "sub" / "config.json"
  paths.write_text(target, '{"a": 1}')
  assert paths.read_text(target) == '{"a": 1}'
  mask = os.umask(0)
  os.umask(mask)
  assert stat.S_IMODE(os.stat(target).st_mode) == 0o666 & ~mask
  assert [p.name for p in (tmp_path / "sub").iterdir()] == ["config.json"]  # no temporary left behind


def test_failed_local_write_leaves_the_old_file(tmp_path):
  target = tmp_path / "results.md"
  paths.write_text(target, "old")

  class Boom(Exception):
    pass

  with pytest.raises(Boom):
    with paths.writing(target) as tmp:
      with open(tmp, "w") as f:
        f.write("half")
      raise Boom()
  assert paths.read_text(target) == "old"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["results.md"]


def test_resolve_keeps_urls_and_absolutises_local_paths():
  assert paths.resolve("gs://bucket/run") == "gs://bucket/run"
  assert paths.resolve("rel/dir") == os.path.join(os.getcwd(), "rel", "dir")
  assert paths.join("gs://bucket/run", "checkpoints") == "gs://bucket/run/checkpoints"
  assert paths.is_remote("gs://b/x") and not paths.is_remote("/tmp/gs:/b")


@pytest.mark.gcs
def test_bucket_round_trip(gcs):
  config = gcs / "run/config.json"
  paths.write_text(config, "{}")
  with paths.writing(gcs / "run/model.bin") as tmp:
    with open(tmp, "wb") as f:
      f.write(b"\x00\x01")
  assert paths.read_text(config) == "{}"
  assert paths.read_bytes(gcs / "run/model.bin") == b"\x00\x01"
  assert paths.isfile(config) and not paths.isdir(config)
  assert paths.isdir(gcs / "run") and not paths.exists(gcs / "run/missing")
  assert paths.listdir(gcs / "run") == ["config.json", "model.bin"]
  with paths.local_file(gcs / "run/model.bin") as local:
    with open(local, "rb") as f:
      assert f.read() == b"\x00\x01"
  # What the library wrote is in the bucket, as seen by an independent client.
  assert gcs.objects() == ["run/config.json", "run/model.bin"]
