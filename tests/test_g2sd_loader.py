"""Prototype test for the proposed loader change: G2SD through the loop with teachers from a workdir and .pth."""
import numpy as np
import pytest

from amd_jax import config_base, convert, weights
from amd_jax.train import loop
from testlib import tiny_distill_config as tiny

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("compilation_cache")]   # whole G2SD runs through the loop


def test_g2sd_end_to_end_teacher_workdir_and_files(tmp_path):
  t = config_base.base_config()
  t.model.update(variant="tiny", patch_size=8, width=64, depth=2, num_heads=4)
  t.decoder.update(width=32, depth=2, num_heads=2)
  t.data.update(source="synthetic", synthetic_size=32, image_size=32, channels=1)
  t.batch_size, t.total_steps, t.num_epochs, t.checkpoint_every_steps = 4, 1, -1.0, 100
  teacher_dir = str(tmp_path / "teacher")
  loop.run(t, teacher_dir)

  final = loop.run(tiny("g2sd", teacher=teacher_dir), str(tmp_path / "g2sd"))
  assert np.isfinite(final["loss_feature"])

  params = weights.load_params(teacher_dir)
  arch = convert.arch_from_config(t.model, decoder_cfg=t.decoder, image_size=32, in_chans=1, video=False)
  full = str(tmp_path / "mae_full.pth")
  convert.export_torch(params, full, arch, "mae", parts=("encoder", "decoder"))
  final = loop.run(tiny("g2sd", teacher=full), str(tmp_path / "g2sd_pth"))
  assert np.isfinite(final["loss_feature"])

  enc_only = str(tmp_path / "mae_encoder.pth")
  convert.export_torch(params, enc_only, arch, "mae", parts=("encoder",))
  with pytest.raises(weights.WeightsMismatchError, match="decoder") as err:
    loop.run(tiny("g2sd", teacher=enc_only), str(tmp_path / "bad"))
  print(err.value)
