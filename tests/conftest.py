"""Shared fixtures: the repository's paths, tiny configs, and a real GCS API served locally.

The `gcs` fixture starts the PyPI package gcp-storage-emulator (an in-memory
server speaking Google Cloud Storage's JSON API; tests/gcs_emulator.py adds the
object generations real GCS reports on downloads) on a free port, once per test
session, and hands out a fresh gs:// prefix per test. The library meets it only
through the standard environment variables Google's clients read:
STORAGE_EMULATOR_HOST (google-cloud-storage, gcsfs) and TENSORSTORE_GCS_HTTP_URL
(tensorstore, which orbax writes checkpoints with); GOOGLE_AUTH_TOKEN_FOR_TESTING
keeps tensorstore from looking for real credentials. There is no code path in
amd_jax that exists for the emulator.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import socket
import subprocess
import sys
import time
import uuid

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")
BUCKET = "amd-jax-tests"
# Read by gcsfs when it is first imported (see GcsEmulator.env), which may be before any `gcs` fixture runs.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: end-to-end runs (whole training runs, notebooks, installs)")
  config.addinivalue_line("markers", "gcs: needs the local GCS emulator (started by the `gcs` fixture)")


def load_config(name: str, arg: str | None = None):
  """get_config(arg) of configs/<name>.py."""
  spec = importlib.util.spec_from_file_location(f"amd_jax_test_config_{name}", os.path.join(CONFIGS, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.fixture
def tiny_config():
  """configs/test_tiny.py's get_config: tiny_config('video,steps=3')."""
  return lambda arg=None: load_config("test_tiny", arg)


@pytest.fixture(scope="session")
def shipped_config():
  """Any file of configs/ by name: shipped_config('amd_vit_s_ssv2', 'runlocal')."""
  return load_config


@pytest.fixture
def library_log(caplog):
  """caplog that also sees the `amd_jax` logger (which has its own stderr handler and does not propagate)."""
  logger = logging.getLogger("amd_jax")
  logger.addHandler(caplog.handler)
  caplog.set_level(logging.INFO, logger="amd_jax")
  yield caplog
  logger.removeHandler(caplog.handler)


# ----------------------------------------------------------------- compilation cache

# jax's persistent compilation cache: its config options and the environment variables jax reads them from.
_CACHE_ENV = {"jax_compilation_cache_dir": "JAX_COMPILATION_CACHE_DIR",
              "jax_persistent_cache_min_compile_time_secs": "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"}


def session_root(tmp_path_factory):
  """A temp dir shared by the whole test session, pytest-xdist workers included."""
  root = tmp_path_factory.getbasetemp()
  return root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
  """One persistent compilation cache for the whole session (xdist workers included), used by a module's runs
  in this process and, through jax's environment variables, in the subprocesses they start from os.environ:
  tiny runs of the same configs compile the same programs, and compiling is most of their time on a CPU.
  Modules whose runs repeat programs ask for it (`pytest.mark.usefixtures("compilation_cache")`); it is undone
  when the module ends. Yields the cache folder."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental.compilation_cache import compilation_cache as cc  # pylint: disable=g-import-not-at-top
  path = str(session_root(tmp_path_factory) / "jax_cache")
  values = {"jax_compilation_cache_dir": path, "jax_persistent_cache_min_compile_time_secs": 0.0}
  old_config = {k: getattr(jax.config, k) for k in values}
  old_env = {v: os.environ.get(v) for v in _CACHE_ENV.values()}
  cc.reset_cache()
  for option, value in values.items():
    jax.config.update(option, value)
    os.environ[_CACHE_ENV[option]] = str(value)
  yield path
  for option, value in old_config.items():
    jax.config.update(option, value)
  for name, value in old_env.items():
    if value is None:
      os.environ.pop(name, None)
    else:
      os.environ[name] = value
  cc.reset_cache()


# ----------------------------------------------------------------- GCS emulator


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class GcsEmulator:
  """A running gcp-storage-emulator and the environment that points clients at it."""

  def __init__(self):
    self.port = _free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self.env = {
        "STORAGE_EMULATOR_HOST": self.url,
        "TENSORSTORE_GCS_HTTP_URL": self.url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
        "GOOGLE_CLOUD_PROJECT": "amd-jax-tests",
        # With TensorFlow installed, etils would use tf.io.gfile for gs://, which knows no emulator.
        "EPATH_USE_TF": "false",
        # No metadata server here: don't let google-auth wait for one.
        "GCE_METADATA_HOST": "127.0.0.1:9",
        "GCE_METADATA_IP": "127.0.0.1:9",
        "NO_GCE_CHECK": "true",
        # gcsfs's experimental zonal / hierarchical-namespace support asks the Storage Control API (which no
        # emulator serves) for every bucket's layout, at every call that misses its cache.
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    }
    self.proc = subprocess.Popen(
        [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "gcs_emulator.py"), "start", "--host", "127.0.0.1", "--port", str(self.port),
         "--in-memory", "--default-bucket", BUCKET],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
      try:
        with socket.create_connection(("127.0.0.1", self.port), timeout=1):
          return
      except OSError:
        if self.proc.poll() is not None:
          raise RuntimeError("gcp-storage-emulator exited at start (is it installed? pip install .[test])") from None
        time.sleep(0.2)
    raise RuntimeError("gcp-storage-emulator did not start listening within 60 s")

  def close(self):
    self.proc.terminate()
    try:
      self.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
      self.proc.kill()

  def subprocess_env(self, **extra) -> dict[str, str]:
    """os.environ plus the emulator's variables, for a child process."""
    return {**os.environ, **self.env, **extra}

  def list(self, prefix: str) -> list[str]:
    """Every object name under gs://BUCKET/prefix (through google-cloud-storage, not the library)."""
    from google.cloud import storage  # pylint: disable=g-import-not-at-top
    client = storage.Client(project="amd-jax-tests")
    return sorted(b.name for b in client.list_blobs(BUCKET, prefix=prefix))


@pytest.fixture(scope="session")
def gcs_server():
  server = GcsEmulator()
  yield server
  server.close()


class GcsPrefix:
  """A fresh gs://BUCKET/<unique>/ for one test, with the emulator's environment applied."""

  def __init__(self, server: GcsEmulator, name: str):
    self.server = server
    self.key = f"{name}-{uuid.uuid4().hex[:8]}"
    self.url = f"gs://{BUCKET}/{self.key}"
    self.env = server.env

  def __truediv__(self, other: str) -> str:
    return f"{self.url}/{other}"

  def objects(self, under: str = "") -> list[str]:
    """Object names (relative to this prefix) under `under`."""
    prefix = f"{self.key}/{under}".rstrip("/") + "/" if under else f"{self.key}/"
    return [n[len(self.key) + 1:] for n in self.server.list(prefix)]

  def subprocess_env(self, **extra) -> dict[str, str]:
    return self.server.subprocess_env(**extra)


@pytest.fixture
def gcs(gcs_server, monkeypatch, request):
  """A gs:// prefix of its own on the local emulator; this process's environment points at it."""
  for key, value in gcs_server.env.items():
    monkeypatch.setenv(key, value)
  # etils decides once per process whether TensorFlow serves gs://.
  try:
    from etils.epath import gpath  # pylint: disable=g-import-not-at-top
    gpath._is_tf_installed.cache_clear()  # pylint: disable=protected-access
  except (ImportError, AttributeError):
    pass
  name = "".join(c if c.isalnum() else "-" for c in request.node.name)[:40]
  return GcsPrefix(gcs_server, name)
