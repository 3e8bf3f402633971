"""amd_jax.visualize: the views of a reconstruction, attention maps, the grid's layout, TensorBoard and the CLI."""
import io
import math

import jax
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator
from PIL import Image

from amd_jax import config_base, recipes, visualize
from amd_jax.methods import get_method

# Runs of the same configs compile the same programs: the session's compilation cache (conftest.py) compiles
# each once, here and in the subprocesses started from os.environ.
pytestmark = pytest.mark.usefixtures("compilation_cache")


def tiny_config(method="amd", modality="image"):
  c = recipes.with_method_fields(config_base.base_config(), method)
  c.model.update(variant="tiny", patch_size=8, width=32, depth=2, num_heads=2)
  c.decoder.update(width=32, depth=1, num_heads=2)
  c.data.update(source="synthetic", synthetic_size=16, image_size=32, channels=1, mean="0.5", std="0.25")
  c.batch_size, c.total_steps, c.num_epochs = 4, 2, -1.0
  c.log_every_steps = c.checkpoint_every_steps = 1
  c.mask.ratio = 0.75
  if method == "amd":
    c.teacher.model.update(variant="tiny", patch_size=8, width=64, depth=2, num_heads=2)
    c.amd.update(student_layers="1,2", teacher_layers="1,2", generator_heads=2)
    c.teacher.checkpoint, c.teacher.mask_ratio = "random", 0.5
  if modality == "video":
    c.data.update(modality="video", channels=3, num_frames=4, mean=recipes.IMAGENET_MEAN, std=recipes.IMAGENET_STD)
    for m in [c.model] + ([c.teacher.model] if method == "amd" else []):
      m.update(cls_token=False, qkv_bias="qv", pos_emb="sincos1d", tubelet_size=2)
    c.mask.update(kind="tube", ratio=0.75)
    if method == "amd":
      c.teacher.mask_ratio = 0.5
  return c


def init(c, batch=3):
  method = get_method(c)
  shape = (batch, 4, 32, 32, 3) if c.data.modality == "video" else (batch, 32, 32, 1)
  x = jax.random.normal(jax.random.PRNGKey(1), shape)
  params = method.init(jax.random.PRNGKey(0), {method.input_key(): x})
  return method, params, {method.input_key(): x}


def test_amd_views_nest_and_paste_the_visible_pixels():
  method, params, batch = init(tiny_config("amd"))
  out = jax.tree.map(np.asarray, method.reconstruct(params, batch, jax.random.PRNGKey(2)))
  x = np.asarray(batch["image"])
  student, teacher = out["visible_mask"], out["teacher_visible_mask"]
  # 16 tokens: the student sees int(16 * 0.25) = 4 of them, the teacher int(16 * 0.5) = 8, a superset.
  assert set(np.unique(student)) == {0.0, 1.0}
  np.testing.assert_allclose(student.reshape(3, -1).mean(1), 4 / 16)
  np.testing.assert_allclose(teacher.reshape(3, -1).mean(1), 8 / 16)
  assert np.all(teacher >= student)
  np.testing.assert_array_equal(out["visible"], x * student)
  np.testing.assert_array_equal(out["teacher_visible"], x * teacher)
  # The reconstruction keeps the input where the student saw it and predicts the rest.
  np.testing.assert_allclose(out["reconstruction"] * student, x * student, atol=1e-6)
  assert not np.allclose(out["reconstruction"] * (1 - student), x * (1 - student))


def manual_attention(method, params, x, block):
  enc = method.encoder.clone(attn_layers=(block,))
  _, out = enc.apply({"params": params["encoder"]}, x)
  w = np.asarray(jax.nn.softmax(out[f"attn_logits_{block}"], axis=-1)).mean(1)
  m = w[:, 0, 1:] if enc.cls_token else w.mean(1)
  lo, hi = m.min(1, keepdims=True), m.max(1, keepdims=True)
  return (m - lo) / (hi - lo)


@pytest.mark.parametrize("modality", ["image", "video"])
def test_attention_maps_are_head_averaged_cls_or_received_attention(modality):
  method, params, batch = init(tiny_config("mae" if modality == "image" else "videomae", modality))
  x = batch[method.input_key()]
  maps = visualize.attention_maps(method, params, x, 1)
  grid = (4, 4) if modality == "image" else (2, 4, 4)
  assert maps.shape == (3,) + grid
  np.testing.assert_allclose(maps.reshape(3, -1), manual_attention(method, params, x, 1), atol=1e-5)
  assert maps.min() == 0.0 and maps.max() == 1.0


def test_grid_layout_and_cells_of_an_amd_image_run():
  method, params, batch = init(tiny_config("amd"))
  grid = visualize.reconstruction_grid(method, params, batch, jax.random.PRNGKey(2), attention_block=2)
  scale = math.ceil(visualize.MIN_CELL_PIXELS / 32)        # 32 px inputs are enlarged 4x
  cell, gap = 32 * scale, visualize.GAP
  # Columns: original, student sees, teacher sees, reconstruction, attention; a row per example under the titles.
  assert grid.dtype == np.uint8
  assert grid.shape == (visualize.TITLE_HEIGHT + 3 * (cell + gap), 5 * cell + 4 * gap, 3)
  # The first cell of the second row is the second image, de-normalised (x * 0.25 + 0.5) and enlarged.
  top = visualize.TITLE_HEIGHT + (cell + gap) + gap
  want = np.clip(np.round((np.asarray(batch["image"][1]) * 0.25 + 0.5) * 255), 0, 255).astype(np.uint8)
  np.testing.assert_array_equal(grid[top:top + cell:scale, :cell:scale, 0], want[..., 0])
  # Hidden patches of the student's view are grey.
  student = grid[top:top + cell, cell + gap:2 * cell + gap, 0]
  assert np.mean(student == visualize.HIDDEN_GREY) >= 0.7


def test_mae_grid_has_no_teacher_column_and_video_cells_hold_frames():
  method, params, batch = init(tiny_config("mae"))
  columns = visualize.picture_columns(method, params, batch, jax.random.PRNGKey(0), attention_block=1)
  assert list(columns) == ["original", "visible", "reconstruction", "attn block 1"]
  method, params, batch = init(tiny_config("videomae", "video"))
  grid = visualize.reconstruction_grid(method, params, batch, num_frames=3, attention_block=0)
  scale = math.ceil(visualize.MIN_CELL_PIXELS / 32)
  cell = 3 * 32 * scale + 2 * visualize.GAP                  # three frames side by side
  assert grid.shape[1] == 3 * cell + 2 * visualize.GAP      # original, visible, reconstruction


def test_method_without_pixel_decoder_shows_original_and_attention():
  method, params, batch = init(tiny_config("mae"))
  class Bare:  # what the pictures need of a method that draws no reconstructions (Method's default)
    config, encoder, input_key = method.config, method.encoder, method.input_key
    can_reconstruct = False

  bare = Bare()
  columns = visualize.picture_columns(bare, params, batch, jax.random.PRNGKey(0), attention_block=2)
  assert list(columns) == ["original", "attn block 2"]


def test_heat_colours_run_from_dark_to_light():
  rgb = visualize.heat_colors(np.linspace(0, 1, 11)).astype(int)
  brightness = rgb.sum(-1)
  assert np.all(np.diff(brightness) > 0)


def image_summaries(workdir, tag):
  """{step: PIL image} of an image tag, read as TensorBoard reads it."""
  accumulator = event_accumulator.EventAccumulator(workdir, size_guidance={event_accumulator.IMAGES: 0})
  accumulator.Reload()
  return {e.step: Image.open(io.BytesIO(e.encoded_image_string)) for e in accumulator.Images(tag)}


@pytest.mark.slow
def test_training_writes_pictures_and_the_cli_draws_a_run(tmp_path, capsys):
  from amd_jax.train import loop  # pylint: disable=g-import-not-at-top
  c = tiny_config("amd")
  c.image_every_steps = 2
  workdir = str(tmp_path / "run")
  loop.run(c, workdir)
  pictures = image_summaries(workdir, "pictures")
  assert sorted(pictures) == [2]
  cell = 32 * math.ceil(visualize.MIN_CELL_PIXELS / 32)
  n = visualize.TrainingPictures.NUM_IMAGES
  assert pictures[2].size == (5 * cell + 4 * visualize.GAP, visualize.TITLE_HEIGHT + n * (cell + visualize.GAP))

  out = str(tmp_path / "pictures.png")
  assert visualize.main(["--workdir", workdir, "--out", out, "--num_images", "3", "--attention_block", "0"]) == 0
  png = np.asarray(Image.open(out))
  assert png.shape == (visualize.TITLE_HEIGHT + 3 * (cell + visualize.GAP), 4 * cell + 3 * visualize.GAP, 3)
  assert "wrote" in capsys.readouterr().out
  assert visualize.main(["--workdir", str(tmp_path / "missing"), "--out", out]) == 2
