"""amd_jax.aot: the loop's step compiled by libtpu for a TPU topology on this CPU-only host.

The compile tests run `python -m amd_jax.aot` as a user does (a subprocess: JAX must start with
the environment the command sets before it loads). They need libtpu, which CI installs with the
[tpu] extra. The topology-name and config checks run in this process and touch no TPU.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from amd_jax import aot
from amd_jax.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_AMD = ["--config=configs/test_tiny.py:amd", "--config.teacher.checkpoint=random"]
# Lines libtpu prints on a host without TPUs when its host probing is not answered.
LIBTPU_NOISE = ("TPU_WORKER_HOSTNAMES", "TPU_ACCELERATOR_TYPE", "InitGoogle", "libtpu", "common_lib.cc")


def _aot(args: list[str], tmp_path, env_extra: dict | None = None, timeout: int = 900):
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
  env.update(env_extra or {})
  return subprocess.run([sys.executable, "-m", "amd_jax.aot"] + args, cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=timeout)


# ----------------------------------------------------------------------------- no compile


@pytest.mark.parametrize("text, chips", [("v5e:2x2", 4), ("v5e:16x16", 256), ("v4:4x4x4", 64), ("v5p:4x4x4", 64),
                                         ("v6e:8x8", 64), ("V5E:4x8", 32)])
def test_topology_names(text, chips):
  t = aot.parse_topology(text)
  assert t.num_chips == chips
  assert t.chip.peak_bf16_flops > 0 and t.chip.hbm_bytes > 0
  assert aot.parse_topology(text, num_slices=2).num_chips == 2 * chips


@pytest.mark.parametrize("text, words", [("v5e-256", "GENERATION:SHAPE"), ("v3:4x4", "generation"),
                                         ("v5e:4x4x4", "2 dimensions"), ("v4:4x4", "3 dimensions"),
                                         ("v5e:0x4", "positive"), ("v5e:ax4", "positive")])
def test_bad_topology_names_are_config_errors(text, words):
  with pytest.raises(ConfigError, match=words):
    aot.parse_topology(text)


def test_batch_that_does_not_divide_the_chips_is_named(tiny_config):
  config = tiny_config("amd,batch=6")
  config.teacher.checkpoint = "random"
  with pytest.raises(ConfigError, match=r"config.batch_size=6 .*4 chips.*--config.batch_size=4 or 8"):
    aot.check_config(config, aot.parse_topology("v5e:2x2"))


def test_slices_need_dcn_data(tiny_config):
  config = tiny_config("amd,batch=8")
  config.teacher.checkpoint = "random"
  with pytest.raises(ConfigError, match=r"mesh.dcn_data=1 .*--config.mesh.dcn_data=2"):
    aot.check_config(config, aot.parse_topology("v5e:2x2", num_slices=2))
  config.mesh.dcn_data = 2
  aot.check_config(config, aot.parse_topology("v5e:2x2", num_slices=2))


def test_mesh_that_does_not_match_the_chips_is_named(tiny_config):
  config = tiny_config("amd,batch=8")
  config.teacher.checkpoint = "random"
  config.mesh.update(data=1, fsdp=8)
  with pytest.raises(ConfigError, match=r"config.mesh.*4 chips"):
    aot.check_config(config, aot.parse_topology("v5e:2x2"))


def test_without_libtpu_one_line_names_the_extra(tmp_path):
  """A host without libtpu: the import fails as it does when the package is absent (a module on the path
  that raises ImportError stands in for the missing package; nothing else is changed)."""
  blocker = tmp_path / "nolibtpu"
  (blocker / "libtpu").mkdir(parents=True)
  (blocker / "libtpu" / "__init__.py").write_text("raise ImportError(\"No module named 'libtpu'\")\n")
  proc = _aot(TINY_AMD + ["--topology=v5e:2x2"], tmp_path,
              env_extra={"PYTHONPATH": os.pathsep.join([str(blocker), REPO]), "TPU_LIBRARY_PATH": ""})
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert lines[-1].startswith("amd_jax: configuration error:") and "pip install 'amd_jax[tpu]'" in lines[-1]
  assert "Traceback" not in proc.stderr


def test_the_compilers_out_of_memory_refusal_is_read():
  message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
             "(429.47G) exceeds available HBM (15.75G).")
  required, available = aot._out_of_memory(message)  # pylint: disable=protected-access
  assert required == int(429.47 * 2**30) and available == int(15.75 * 2**30)
  assert aot._out_of_memory("INVALID_ARGUMENT: something else") is None  # pylint: disable=protected-access


def test_hlo_summary_groups_matmul_cycles_and_collectives():
  text = "\n".join([
      "%fused_computation.1 (p: bf16[8,128]) -> bf16[8,128] {",
      "  %p = bf16[8,128]{1,0} parameter(0)",
      "  ROOT %c = bf16[8,128]{1,0} convolution(%p, %p), dim_labels=bf_io->bf",
      "}",
      "ENTRY %main (a: bf16[8,128]) -> bf16[8,128] {",
      "  %a = bf16[8,128]{1,0} parameter(0)",
      '  %f = bf16[8,128]{1,0} fusion(%a), kind=kOutput, calls=%fused_computation.1, metadata={op_name='
      '"jit(step)/jvp(Encoder)/blocks/dot_general"}, backend_config={"estimated_cycles":"300"}',
      '  %g = f32[8,128]{1,0} fusion(%f), kind=kOutput, calls=%fused_computation.1, metadata={op_name='
      '"jit(step)/transpose(jvp(Encoder))/blocks/dot_general"}, backend_config={"estimated_cycles":"100"} convolution',
      "  %r = f32[8,128]{1,0} all-reduce(%g), replica_groups={}",
      "  %t = f32[128,8]{1,0} transpose(%r), dimensions={1,0}",
      "  ROOT %o = bf16[128,8]{1,0} convert(%t)",
      "}"])
  s = aot.hlo_summary(text)
  assert s["matmul_cycles_by_module"] == {"Encoder forward": 300, "Encoder backward": 100}
  assert s["cycles_by_part"] == {"Encoder forward / other": 300, "Encoder backward / other": 100}
  assert s["collectives"] == {"all-reduce": {"count": 1, "bytes": 8 * 128 * 4}}
  assert s["copies_and_transposes"] == {"transpose": {"count": 1, "bytes": 128 * 8 * 4}}
  assert s["converts"] == {"count": 1, "bytes": 128 * 8 * 2}
  assert s["float32_matmuls"] == {"count": 1, "bytes": 8 * 128 * 4}
  assert "Encoder forward" in aot.summary_text(s)


# ---------------------------------------------------------------------------------- compiles


@pytest.mark.slow
def test_tiny_amd_step_compiles_for_v5e_2x2(tmp_path):
  out = tmp_path / "aot.json"
  proc = _aot(TINY_AMD + ["--topology=v5e:2x2", f"--json={out}", "--hlo_summary"], tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads(out.read_text())
  assert r["schema_version"] == aot.SCHEMA_VERSION
  assert r["topology"] == {"name": "v5e:2x2", "num_slices": 1, "chips": 4, "chip": "TPU v5e",
                           "hbm_bytes_per_chip": 16 * 2**30, "peak_bf16_flops_per_chip": 197e12}
  assert r["layout"]["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1} and r["layout"]["per_chip_batch"] == 2
  m = r["memory_per_chip"]
  for key in ("argument_bytes", "output_bytes", "temp_bytes", "generated_code_bytes"):
    assert m[key] > 0, key
  assert 0 < m["alias_bytes"] <= m["output_bytes"]   # the state is donated: outputs reuse its buffers
  assert m["total_bytes"] == (m["argument_bytes"] + m["output_bytes"] - m["alias_bytes"] + m["temp_bytes"]
                              + m["generated_code_bytes"])
  assert m["headroom_bytes"] == 16 * 2**30 - m["total_bytes"] > 0
  assert r["fits"] is m["fits"] is True
  f = r["flops"]
  assert f["compiled_per_step"] == pytest.approx(f["compiled_per_chip"] * 4)
  assert f["analytic_per_step"] > 0
  assert 0.5 < f["compiled_over_analytic"] < 5   # small widths: norms, softmax and Adam weigh more than at scale
  modeled = r["modeled"]
  assert modeled["source"] == "modeled (XLA TPU cost model), not measured"
  assert modeled["step_seconds"] > 0 and modeled["while_loops"] == 0   # test_tiny's stacks are unrolled
  assert modeled["step_seconds"] == pytest.approx(modeled["raw_optimal_seconds"] + modeled["unknown_cost_ops"])
  assert modeled["examples_per_second"] == pytest.approx(8 / modeled["step_seconds"])
  assert modeled["mfu"] == pytest.approx(f["analytic_per_step"] / (modeled["step_seconds"] * 4 * 197e12))
  assert r["compile_seconds"] > 0 and r["versions"]["libtpu"]
  assert "FITS" in proc.stdout and "modeled (XLA TPU cost model), not measured" in proc.stdout
  assert "Matmul cycles" in proc.stdout and "Collectives:" in proc.stdout
  noise = [l for l in proc.stderr.splitlines() if any(w in l for w in LIBTPU_NOISE)]
  assert not noise, noise


@pytest.mark.slow
def test_huge_batch_does_not_fit(tmp_path):
  out = tmp_path / "aot.json"
  proc = _aot(TINY_AMD + ["--topology=v5e:2x2", "--config.batch_size=1048576", f"--json={out}"], tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads(out.read_text())
  m = r["memory_per_chip"]
  assert r["fits"] is m["fits"] is False
  assert m["total_bytes"] > 16 * 2**30 and m["headroom_bytes"] < 0
  assert "DOES NOT FIT" in proc.stdout


# ----------------------------------------------------------- CPU runs with libtpu installed


@pytest.fixture(scope="module")
def tiny_cpu_runs(tmp_path_factory):
  """The tiny config trained through amd_jax.main twice: as a user runs it (JAX_PLATFORMS unset, so JAX
  tries the TPU backend libtpu offers) and pinned to the CPU. ALLOW_MULTIPLE_LIBTPU_LOAD lets libtpu
  initialise even while another process on the host holds its lock file, as it would on a quiet host."""
  runs = {}
  for name, extra in (("default", {"ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}), ("cpu", {"JAX_PLATFORMS": "cpu"})):
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS") and not k.startswith("TPU_")}
    env.update(extra)
    workdir = tmp_path_factory.mktemp(f"cpu_{name}")
    runs[name] = subprocess.run([sys.executable, "-m", "amd_jax.main", "--config=configs/test_tiny.py",
                                 f"--workdir={workdir}", "--config.total_steps=2"], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=900)
  return runs


def _final(stdout: str) -> dict[str, str]:
  lines = stdout.split("final metrics:", 1)[-1].splitlines()
  return dict(l.strip().split(": ", 1) for l in lines if ": " in l)


@pytest.mark.slow
def test_cpu_run_is_unchanged_with_libtpu_installed(tiny_cpu_runs):
  for proc in tiny_cpu_runs.values():
    assert proc.returncode == 0, proc.stderr[-3000:]
  default, cpu = _final(tiny_cpu_runs["default"].stdout), _final(tiny_cpu_runs["cpu"].stdout)
  assert default["loss"] == cpu["loss"] and default["step"] == cpu["step"] == "2.0000"
  assert "mfu" not in default   # no accelerator peak: the run was on the CPU


@pytest.mark.slow
def test_cpu_run_with_libtpu_installed_prints_no_libtpu_warnings(tiny_cpu_runs):
  noise = [l for l in tiny_cpu_runs["default"].stderr.splitlines() if any(w in l for w in LIBTPU_NOISE)]
  assert not noise, noise


def _aot_table():
  """benchmarks/aot_table.py as a module (benchmarks/ is not a package)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("aot_table", os.path.join(REPO, "benchmarks", "aot_table.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_aot_table_rows_are_loadable_recipes():
  """Every row the table plans is a shipped recipe that loads, with its batch rounded up to the chips."""
  table = _aot_table()
  names = table.recipe_names()
  assert "amd_vit_b_ssv2" in names and "finetune_vit_s_k400" in names
  assert not [n for n in names if n.startswith(("_", "test_", "quickstart"))], names
  v5e = table.parse_topology_spec("v5e:16x16")
  two = table.parse_topology_spec("2xv5e:16x16")
  assert (v5e.num_chips, two.num_slices, two.num_chips) == (256, 2, 512)
  for name in names:
    recipe_batch, batch = table.row_batch(name, v5e)
    assert batch % v5e.num_chips == 0 and recipe_batch <= batch < recipe_batch + v5e.num_chips, name
  # A row never compiled renders as such, with the batch it would compile.
  text = table.markdown([table.not_compiled("amd_vit_b_ssv2", two)])
  assert "| amd_vit_b_ssv2 | 2x v5e:16x16 | 2048 | not compiled yet |" in text
