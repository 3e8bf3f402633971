"""Every file amd_jax reads or writes goes through here: local paths and cloud URLs alike.

A path a user gives (a workdir, a teacher checkpoint, a data folder, an
annotation list, the videos it names) may be local or a URL such as
gs://bucket/run. etils.epath handles both: local paths through the os module,
gs:// (and s3://) through gcsfs / s3fs when TensorFlow is absent, or through
tf.io.gfile when it is installed. Google's libraries find credentials the usual
way (gcloud's application-default login, a service account key in
GOOGLE_APPLICATION_CREDENTIALS, a TPU VM's metadata server); STORAGE_EMULATOR_HOST
points them at a local GCS emulator.

Writes are all-or-nothing: a local file is written to a temporary name in its
folder and renamed into place (a killed process never leaves half a file); an
object in a bucket appears only when its upload completes. New local files get
the permissions the user's umask gives (0644 typically), not a temporary file's
0600.
"""
from __future__ import annotations

import contextlib
import logging as std_logging
import os
import tempfile
from typing import Iterator, Union

from etils import epath

Path = epath.Path
PathLike = Union[str, os.PathLike]

# URL schemes epath serves through a cloud backend.
REMOTE_SCHEMES = ("gs://", "s3://", "az://", "hf://")


def is_remote(path: PathLike) -> bool:
  return os.fspath(path).startswith(REMOTE_SCHEMES)


def as_path(path: PathLike) -> epath.Path:
  return epath.Path(os.fspath(path))


def resolve(path: PathLike) -> str:
  """An absolute local path, or the URL unchanged: the form messages and records show."""
  text = os.fspath(path)
  return text if is_remote(text) else os.path.abspath(text)


def join(path: PathLike, *parts: str) -> str:
  """`path`/`parts` as a string, keeping a URL a URL."""
  return os.fspath(as_path(path).joinpath(*parts))


def exists(path: PathLike) -> bool:
  return as_path(path).exists()


def isdir(path: PathLike) -> bool:
  return as_path(path).is_dir()


def isfile(path: PathLike) -> bool:
  p = as_path(path)
  return p.exists() and not p.is_dir()


def listdir(path: PathLike) -> list[str]:
  """Names (not paths) in a folder, sorted."""
  return sorted(p.name for p in as_path(path).iterdir())


def makedirs(path: PathLike) -> None:
  as_path(path).mkdir(parents=True, exist_ok=True)


def read_text(path: PathLike) -> str:
  return as_path(path).read_text()


def read_bytes(path: PathLike) -> bytes:
  return as_path(path).read_bytes()


def open_read(path: PathLike):
  """A binary file object for reading (PIL, PyAV, torch.load and numpy take one)."""
  return as_path(path).open("rb")


def _umask_mode() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return 0o666 & ~mask


def write_bytes(path: PathLike, data: bytes) -> None:
  """Write `data` to `path` all or nothing (see the module doc)."""
  text = os.fspath(path)
  if is_remote(text):
    as_path(text).write_bytes(data)
    return
  folder = os.path.dirname(os.path.abspath(text))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_", suffix="_" + os.path.basename(text))
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, _umask_mode())
    os.replace(tmp, text)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def write_text(path: PathLike, text: str) -> None:
  write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def writing(path: PathLike) -> Iterator[str]:
  """A local file name to write to; on success its contents land at `path` (all or nothing).

  For writers that want a file name of their own (safetensors, torch.save):
    with paths.writing("gs://b/model.safetensors") as tmp: save_file(tensors, tmp)
  """
  text = os.fspath(path)
  folder = None if is_remote(text) else os.path.dirname(os.path.abspath(text))
  if folder:
    os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_", suffix="_" + os.path.basename(text))
  os.close(fd)
  try:
    yield tmp
    if folder:
      os.chmod(tmp, _umask_mode())
      os.replace(tmp, text)
    else:
      with open(tmp, "rb") as f:
        as_path(text).write_bytes(f.read())
  finally:
    with contextlib.suppress(OSError):
      os.remove(tmp)


@contextlib.contextmanager
def local_file(path: PathLike) -> Iterator[str]:
  """A local file name holding `path`'s bytes: the path itself, or a temporary download of a URL."""
  text = os.fspath(path)
  if not is_remote(text):
    yield text
    return
  suffix = "_" + os.path.basename(text)
  with tempfile.NamedTemporaryFile(prefix="amd_jax_", suffix=suffix) as f:
    f.write(read_bytes(text))
    f.flush()
    yield f.name


class _DropCloudNoise(std_logging.Filter):
  """gcsfs warns on every bucket it cannot classify (zonal / hierarchical) without credentials for
  the Storage Control API; the fallback it takes is the ordinary one, so the warning says nothing."""

  def filter(self, record):
    return "Could not determine bucket type" not in record.getMessage()


def quiet_cloud_logs() -> None:
  std_logging.getLogger("gcsfs").addFilter(_DropCloudNoise())
