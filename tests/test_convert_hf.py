"""transformers both ways: amd_jax params written as save_pretrained directories, and such directories read back.

Export: ViTMAE / VideoMAE directories (the encoder alone, or with the pixel decoder) that
transformers' from_pretrained loads with no missing, unexpected or mis-shaped keys, whose
encoder computes what amd_jax's computes (all tokens, position tables included) and whose
decoder predicts what amd_jax's predicts under the same mask. Import: directories written by
transformers itself (and their weights files) convert without naming the layout or the
architecture. Small shapes keep the file to seconds.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from amd_jax import config_base, convert, masking
from amd_jax.convert import __main__ as cli
from amd_jax.convert import mapping
from amd_jax.methods.mae import MAE, VideoMAE
from amd_jax.models import vit

TOL = 1e-5
W, DEPTH, HEADS, DEC_W, DEC_DEPTH, DEC_HEADS = 64, 2, 4, 32, 1, 2
IMG, PATCH, FRAMES, TUBELET = 32, 8, 4, 2
BATCH = 2
TOKENS_PER_FRAME = (IMG // PATCH)**2


def run_config(video: bool):
  c = config_base.base_config()
  c.method = "videomae" if video else "mae"
  c.model.update(variant="tiny", width=W, depth=DEPTH, num_heads=HEADS, patch_size=PATCH, tubelet_size=TUBELET,
                 cls_token=not video, qkv_bias="qv" if video else "fused",
                 pos_emb="sincos1d" if video else "sincos2d")
  c.decoder.update(width=DEC_W, depth=DEC_DEPTH, num_heads=DEC_HEADS)
  c.data.update(modality="video" if video else "image", image_size=IMG, channels=3, num_frames=FRAMES)
  c.mask.update(ratio=0.75, kind="tube" if video else "random")
  return c


def method_of(video: bool):
  return (VideoMAE if video else MAE)(run_config(video))


def random_params(video: bool, seed: int = 0) -> dict:
  """The method's params with non-trivial random values (every bias, LayerNorm and token)."""
  method = method_of(video)
  shape = (1, FRAMES, IMG, IMG, 3) if video else (1, IMG, IMG, 3)
  abstract = jax.eval_shape(method.init, jax.random.PRNGKey(0),
                            {method.input_key(): jax.ShapeDtypeStruct(shape, jnp.float32)})
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: (0.1 * rng.standard_normal(a.shape)).astype(np.float32), abstract)


def arch_of(video: bool) -> mapping.Arch:
  return convert.arch_from_run_config(run_config(video))


def clip(video: bool, seed: int = 1) -> np.ndarray:
  shape = (BATCH, FRAMES, IMG, IMG, 3) if video else (BATCH, IMG, IMG, 3)
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def to_torch_layout(x: np.ndarray, video: bool) -> torch.Tensor:
  """amd_jax (B, [T,] H, W, C) -> transformers (B, C, H, W) or (B, T, C, H, W)."""
  return torch.from_numpy(x.transpose(0, 1, 4, 2, 3) if video else x.transpose(0, 3, 1, 2))


def load(cls, directory, **overrides):
  model, info = cls.from_pretrained(str(directory), output_loading_info=True, **overrides)
  return model.eval(), {k: sorted(info[k]) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}


CLEAN = {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}
CLASSES = {False: (transformers.ViTMAEModel, transformers.ViTMAEForPreTraining),
           True: (transformers.VideoMAEModel, transformers.VideoMAEForPreTraining)}


def maxdiff(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.max(np.abs(a - b)))


def assert_trees_bit_equal(a, b):
  fa, fb = mapping.flatten(a), mapping.flatten(b)
  assert sorted(fa) == sorted(fb)
  for path in fa:
    assert np.array_equal(np.asarray(fa[path]), np.asarray(fb[path])), "/".join(path)


def encode(video: bool, encoder_params, x):
  """amd_jax's encoder output on every token (jitted: op-by-op dispatch is slow on a busy machine)."""
  encoder = vit.encoder_from_config(run_config(video).model)
  return jax.jit(lambda p, xx: encoder.apply({"params": p}, xx)[0])(encoder_params, x)


def is_decoder_key(key: str) -> bool:
  return key.startswith(("decoder.", "encoder_to_decoder.")) or key == "mask_token"


# ------------------------------------------------------------------------------------------------------------
# Export
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("video", [False, True])
def test_encoder_directory_loads_cleanly_and_matches(video, tmp_path):
  params, arch = random_params(video), arch_of(video)
  out = tmp_path / "hf"
  layout = "hf_videomae" if video else "hf_vitmae"
  convert.export_torch(params, str(out), arch, layout, parts=("encoder",), hf_options=dict(mask_ratio=0.75))
  assert sorted(os.listdir(out)) == ["amd_jax.json", "config.json", "model.safetensors"]
  base, pretraining = CLASSES[video]
  # ViTMAE masks inside its embeddings: mask_ratio 0 with increasing noise keeps every token in grid order.
  model, info = load(base, out, **({} if video else {"mask_ratio": 0.0}))
  assert info == CLEAN
  x = clip(video)
  tokens = encode(video, params["encoder"], x)
  with torch.no_grad():
    if video:
      theirs = model(pixel_values=to_torch_layout(x, video)).last_hidden_state
    else:
      noise = torch.arange(TOKENS_PER_FRAME, dtype=torch.float32).expand(BATCH, -1)
      theirs = model(pixel_values=to_torch_layout(x, video), noise=noise).last_hidden_state
  assert maxdiff(tokens, theirs.numpy()) < TOL
  if not video:   # amd_jax's fixed table is what the model holds; the run's mask ratio is in config.json
    table = model.embeddings.position_embeddings.detach().numpy()
    np.testing.assert_array_equal(table, mapping.fixed_table(arch, W))
    assert json.loads((out / "config.json").read_text())["mask_ratio"] == 0.75
  # The pre-training class finds only its decoder missing.
  _, info = load(pretraining, out)
  assert info["missing_keys"] and all(is_decoder_key(k) for k in info["missing_keys"])
  assert not info["unexpected_keys"]


def _mask(video: bool, seed: int = 7):
  """A mask in amd_jax's form (ascending keep / masked groups) and as transformers takes it."""
  noise = np.random.default_rng(seed).random((BATCH, TOKENS_PER_FRAME)).astype(np.float32)
  n_keep = int(TOKENS_PER_FRAME * 0.25)
  perm = np.argsort(noise, axis=1, kind="stable")
  keep, masked = np.sort(perm[:, :n_keep], 1), np.sort(perm[:, n_keep:], 1)
  if video:  # tubes: the same spatial mask in every temporal slice
    keep = np.concatenate([keep + t * TOKENS_PER_FRAME for t in range(FRAMES // TUBELET)], 1)
    masked = np.concatenate([masked + t * TOKENS_PER_FRAME for t in range(FRAMES // TUBELET)], 1)
  mask = masking.Mask(keep=jnp.asarray(keep, jnp.int32), masked=jnp.asarray(masked, jnp.int32))
  return mask, noise


@pytest.mark.parametrize("video", [False, True])
def test_pretraining_directory_loads_cleanly_and_predicts(video, tmp_path):
  params, arch = random_params(video, seed=3), arch_of(video)
  out = tmp_path / "hf_full"
  layout = "hf_videomae" if video else "hf_vitmae"
  convert.export_torch(params, str(out), arch, layout, parts=("encoder", "decoder"))
  base, pretraining = CLASSES[video]
  model, info = load(pretraining, out)
  assert info == CLEAN
  # The base class takes the encoder and leaves the decoder unused, as for any checkpoint with a head.
  _, info = load(base, out)
  assert not info["missing_keys"] and info["unexpected_keys"]
  assert all(is_decoder_key(k) for k in info["unexpected_keys"])

  x = clip(video, seed=2)
  mask, noise = _mask(video)
  reconstruct = lambda p, xx, m: method_of(video).reconstruction(p, xx, m, jax.random.PRNGKey(0), train=False)[0]
  ours = jax.jit(reconstruct)(params, jnp.asarray(x), mask)
  with torch.no_grad():
    if video:
      model.decoder.norm.eps = 1e-6   # transformers fixes this LayerNorm's eps at 1e-5; amd_jax and the official 1e-6
      bool_masked = np.ones((BATCH, TOKENS_PER_FRAME * FRAMES // TUBELET), bool)
      np.put_along_axis(bool_masked, np.asarray(mask.keep), False, axis=1)
      theirs = model(pixel_values=to_torch_layout(x, video), bool_masked_pos=torch.from_numpy(bool_masked)).logits
    else:
      logits = model(pixel_values=to_torch_layout(x, video), noise=torch.from_numpy(noise)).logits
      theirs = np.take_along_axis(logits.numpy(), np.asarray(mask.masked)[..., None], axis=1)
  assert maxdiff(ours, np.asarray(theirs)) < TOL
  # And back: the directory converts to the same params, bit for bit, naming and architecture detected.
  back, report = convert.load_torch_checkpoint(str(out), arch, strict=True)
  assert report.layout == layout and report.parts == ["encoder", "decoder"]
  assert_trees_bit_equal(back, params)


def test_hf_export_refuses_what_transformers_cannot_express(tmp_path):
  params, arch = random_params(False), arch_of(False)
  with pytest.raises(mapping.ConversionError, match="cls token"):
    convert.export_torch(params, str(tmp_path / "a"), arch, "hf_videomae")
  no_norm = dict(params, encoder={k: v for k, v in params["encoder"].items() if k != "norm"})
  with pytest.raises(mapping.ConversionError, match="final LayerNorm"):
    convert.export_torch(no_norm, str(tmp_path / "b"), arch, "hf_vitmae")
  with pytest.raises(mapping.ConversionError, match="holds the encoder and the pixel decoder"):
    convert.export_torch(params, str(tmp_path / "c"), arch, "hf_vitmae", parts=("encoder", "classifier"))
  with pytest.raises(mapping.ConversionError, match="is a directory|output is a directory"):
    convert.export_torch(params, str(tmp_path / "d.safetensors"), arch, "hf_vitmae")
  assert not os.listdir(tmp_path)   # nothing written by any refusal


# ------------------------------------------------------------------------------------------------------------
# Import: directories written by transformers
# ------------------------------------------------------------------------------------------------------------
def _transformers_vitmae(seed=0):
  cfg = transformers.ViTMAEConfig(
      hidden_size=W, num_hidden_layers=DEPTH, num_attention_heads=HEADS, intermediate_size=4 * W, image_size=IMG,
      patch_size=PATCH, layer_norm_eps=1e-6, decoder_hidden_size=DEC_W, decoder_num_hidden_layers=DEC_DEPTH,
      decoder_num_attention_heads=DEC_HEADS, decoder_intermediate_size=4 * DEC_W)
  torch.manual_seed(seed)
  return transformers.ViTMAEForPreTraining(cfg).eval()


def test_save_pretrained_directory_needs_no_layout_or_arch(tmp_path, capsys):
  model = _transformers_vitmae()
  directory = tmp_path / "vitmae"
  model.save_pretrained(str(directory))
  state_dict = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  arch = mapping.Arch(width=W, depth=DEPTH, num_heads=HEADS, patch_size=PATCH, image_size=IMG,
                      decoder=mapping.DecoderArch(DEC_W, DEC_DEPTH, DEC_HEADS))
  expected, _ = convert.torch_to_flax(state_dict, arch, "hf_vitmae", strict=True)
  # The directory, and the weights file inside it, with neither --layout nor --arch.
  for name, source in (("dir", directory), ("file", directory / "model.safetensors")):
    out = tmp_path / name
    assert cli.main(["to_flax", "--input", str(source), "--output", str(out), "--strict"]) == 0
    assert "layout: hf_vitmae (from config.json)" in capsys.readouterr().out
    params, meta = convert.load_flax_params(str(out / "params.npz"))
    assert meta["arch"]["num_heads"] == HEADS and meta["parts"] == ["encoder", "decoder"]
    assert_trees_bit_equal(params, expected)
  # transformers' other formats: pytorch_model.bin (what 4.x wrote by default; 5.x writes safetensors only, so
  # the same tensors are saved by hand), and shards listed in an index file.
  from safetensors.torch import load_file  # pylint: disable=g-import-not-at-top
  (tmp_path / "vitmae_bin").mkdir()
  (tmp_path / "vitmae_bin" / "config.json").write_text((directory / "config.json").read_text())
  torch.save(load_file(str(directory / "model.safetensors")), str(tmp_path / "vitmae_bin" / "pytorch_model.bin"))
  model.save_pretrained(str(tmp_path / "vitmae_shards"), max_shard_size="100KB")
  for name in ("bin", "shards"):
    other = tmp_path / f"vitmae_{name}"
    assert cli.main(["to_flax", "--input", str(other), "--output", str(tmp_path / f"flax_{name}")]) == 0
    params, _ = convert.load_flax_params(str(tmp_path / f"flax_{name}" / "params.npz"))
    assert_trees_bit_equal(params, expected)
  assert any(n.endswith(".index.json") for n in os.listdir(tmp_path / "vitmae_shards"))
  assert cli.main(["to_flax", "--input", str(tmp_path / "vitmae_bin" / "pytorch_model.bin"), "--output",
                   str(tmp_path / "flax_bin_file")]) == 0
  assert "layout: hf_vitmae (from config.json)" in capsys.readouterr().out
  # A teacher or init given as the directory (what weights.load_encoder calls).
  cfg = run_config(False)
  assert_trees_bit_equal(convert.load_torch_encoder(str(directory), cfg.model, image_size=IMG),
                         expected["encoder"])
  # Its config.json knows the head count: a model config that disagrees is refused, not silently regrouped.
  cfg.model.num_heads = 2
  with pytest.raises(mapping.ConversionError, match="4 attention heads"):
    convert.load_torch_encoder(str(directory), cfg.model, image_size=IMG)


def test_videomae_base_model_directory(tmp_path, capsys):
  cfg = transformers.VideoMAEConfig(
      hidden_size=W, num_hidden_layers=DEPTH, num_attention_heads=HEADS, intermediate_size=4 * W, image_size=IMG,
      patch_size=PATCH, num_frames=FRAMES, tubelet_size=TUBELET, layer_norm_eps=1e-6, use_mean_pooling=False)
  torch.manual_seed(1)
  model = transformers.VideoMAEModel(cfg).eval()
  directory = tmp_path / "videomae"
  model.save_pretrained(str(directory))
  state_dict = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  assert mapping.detect_layout(state_dict) == "hf_videomae"   # the base model's names, without a config
  out = tmp_path / "flax"
  assert cli.main(["to_flax", "--input", str(directory), "--output", str(out)]) == 0
  assert "layout: hf_videomae (from config.json)" in capsys.readouterr().out
  params, _ = convert.load_flax_params(str(out / "params.npz"))
  x = clip(True, seed=5)
  ours = encode(True, params["encoder"], x)
  with torch.no_grad():
    theirs = model(pixel_values=to_torch_layout(x, True)).last_hidden_state.numpy()
  assert maxdiff(ours, theirs) < TOL


def test_cli_to_torch_hf_from_workdir(tmp_path, capsys):
  from amd_jax.train.checkpoint import Checkpointer  # pylint: disable=g-import-not-at-top
  cfg = run_config(True)
  params = random_params(True, seed=8)
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text(cfg.to_json_best_effort())
  ckpt = Checkpointer(str(workdir), every_steps=1, keep=1, async_save=False)
  ckpt.save(1, {"step": jnp.asarray(1), "params": params}, force=True)
  ckpt.close()
  out = tmp_path / "hf"
  argv = ["to_torch", "--workdir", str(workdir), "--layout", "hf_videomae", "--include_decoder", "--output", str(out)]
  assert cli.main(argv) == 0
  assert "VideoMAEForPreTraining.from_pretrained" in capsys.readouterr().out
  _, info = load(transformers.VideoMAEForPreTraining, out)
  assert info == CLEAN
  saved = json.loads((out / "config.json").read_text())
  assert saved["architectures"] == ["VideoMAEForPreTraining"] and saved["num_attention_heads"] == HEADS
  record = json.loads((out / "amd_jax.json").read_text())
  assert record["layout"] == "hf_videomae" and record["parts"] == ["encoder", "decoder"]
  assert cli.main(argv) == 2 and "exist" in capsys.readouterr().err      # never replaced without --overwrite
  assert cli.main(argv + ["--overwrite"]) == 0
  assert cli.main(argv[:-1] + [str(tmp_path / "x.pth")]) == 2
  assert "directory" in capsys.readouterr().err
