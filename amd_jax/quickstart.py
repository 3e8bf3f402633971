"""The quickstart stories, end to end from one command.

  python -m amd_jax.quickstart --workdir workdirs/quickstart                 # images: Fashion-MNIST
  python -m amd_jax.quickstart --video --workdir workdirs/quickstart_video   # videos: moving garments
  python -m amd_jax.quickstart --workdir W --config.data.source=image_folder --config.data.path=P \\
      --config.data.channels=3 --config.data.mean=auto --config.data.std=auto   # images: your own folder

Images (configs/quickstart.py): a teacher MAE, a student-size MAE and an AMD student distilled from the
teacher, each scored by the train loop's frozen-feature evaluation (kNN and linear probe), next to two
controls: the student architecture untrained, and raw pixels.

Videos (configs/quickstart_video.py): the moving-garments set is generated in WORKDIR/data unless it is there
(amd_jax.data.make_moving; --data names another folder), then a teacher VideoMAE, a student-size VideoMAE and
an AMD student with tube masks. One ordered decoding pass then feeds every encoder and control together, and
kNN and a linear probe score each on BOTH labels of the set: the direction of motion and the garment class.
The controls: the untrained student, raw pixels, and a single frame (each trained student applied to the
middle frame repeated over time, which shows the garment but not where it goes). On another video list
(--config.data.path=...) the list's one label is scored instead.

Overrides: --config.a.b=value, parsed as `python -m amd_jax.main` parses them, apply to every stage and
every control whose config has that field (an AMD-only field to the AMD stage alone); a field that no stage
has stops the quickstart before anything runs.

Records, so that a rerun never replaces a real result with a partial one: each stage's numbers are written to
WORKDIR/<stage>/quickstart.json when it finishes, the controls' to WORKDIR/controls.json (images) and the
video evaluation to WORKDIR/evaluation.json; a rerun reuses every record it finds (an interrupted stage
resumes from its checkpoints). WORKDIR/quickstart.json holds the settings (mode, config file, overrides):
a workdir of other settings is refused. When everything is done, WORKDIR/results.md (the table, the command
and the date) and results.json are written; a rerun on a finished workdir prints the stored table, says so,
and changes nothing.
"""
from __future__ import annotations

import datetime
import importlib.util
import json
import os
import shlex
import sys
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from amd_jax import config_files, errors, evaluate, paths, probe
from amd_jax.data import make_moving
from amd_jax.models import vit
from amd_jax.train import checkpoint, loop, metrics, sharding

# The quickstart's own flags are defined only when it runs as a program (see the end of the file), so that
# importing this module beside amd_jax.main (tests, notebooks) defines no flag twice.
_FLAGS: dict[str, flags.FlagHolder] = {}


def _define_flags() -> None:
  _FLAGS["workdir"] = flags.DEFINE_string(
      "workdir", None, "Parent directory of the runs (default workdirs/quickstart, or workdirs/quickstart_video "
      "with --video).")
  _FLAGS["video"] = flags.DEFINE_bool("video", False,
                                      "The video story (moving garments) instead of Fashion-MNIST images.")
  _FLAGS["config"] = flags.DEFINE_string(
      "config", None, "The quickstart's config file, by shipped name or path (default quickstart, or "
      "quickstart_video with --video). Its fields are overridden with --config.a.b=value.")
  _FLAGS["data"] = flags.DEFINE_string(
      "data", None, "--video: the moving-garments folder to read (default WORKDIR/data, generated when absent).")
  _FLAGS["runlocal"] = flags.DEFINE_bool("runlocal", False,
                                         "A few steps per stage and small evaluations (smoke test).")


IMAGE_STAGES = ("teacher", "mae", "amd")
VIDEO_STAGES = ("teacher", "videomae", "amd")
STUDENT = {"image": "mae", "video": "videomae"}
SETTINGS_FILE = "quickstart.json"     # in WORKDIR: the settings of the quickstart run there
STAGE_RECORD = "quickstart.json"      # in a stage's workdir: the numbers measured when it finished
RESULTS_JSON, RESULTS_MD = "results.json", "results.md"
CONTROLS_FILE, EVALUATION_FILE = "controls.json", "evaluation.json"
OVERRIDE_PREFIX = "--config."


def load_config_module(path: str):
  spec = importlib.util.spec_from_file_location("amd_jax_quickstart_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def default_config_path(video: bool = False) -> str:
  """The shipped quickstart config (configs/ of a checkout, amd_jax/configs of an installed wheel)."""
  return config_files.path_of("quickstart_video" if video else "quickstart")


def _arg(**kw) -> str:
  return ",".join(f"{k}={v}" if v is not True else k for k, v in kw.items() if v not in ("", False, None))


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _read_json(path: str):
  return json.loads(paths.read_text(path)) if paths.isfile(path) else None


def _write_json(path: str, value) -> None:
  paths.write_text(path, json.dumps(value, indent=2, default=float) + "\n")   # row order is meaningful


def _numbers(results: dict) -> dict[str, float]:
  return {k: float(v) for k, v in results.items() if isinstance(v, (int, float, np.number))}


# ------------------------------------------------------------------------------------------ overrides


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """(the other arguments, the --config.a.b=value overrides). `--config.a.b value` is taken too."""
  rest, overrides = [], []
  i = 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith(OVERRIDE_PREFIX):
      if "=" not in arg and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
        arg, i = f"{arg}={argv[i + 1]}", i + 1
      overrides.append(arg)
    else:
      rest.append(arg)
    i += 1
  return rest, overrides


def override_field(override: str) -> str:
  """'--config.data.path=P' -> 'data.path'."""
  return override[len(OVERRIDE_PREFIX):].split("=", 1)[0]


def has_field(config: ml_collections.ConfigDict, dotted: str) -> bool:
  node = config
  for part in dotted.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return False
    node = node[part]
  return True


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
  """`config` with the overrides whose field it has, parsed by ml_collections as amd_jax.main parses them."""
  mine = [o for o in overrides if has_field(config, override_field(o))]
  if not mine:
    return config
  argv = ["quickstart"] + mine
  flag_values = flags.FlagValues()
  holder = config_flags.DEFINE_config_dict("config", config, flag_values=flag_values, sys_argv=argv)
  try:
    flag_values(argv)
  except flags.Error as e:
    raise errors.ConfigError(str(e).replace("\n", "; ")) from None
  return holder.value


def check_overrides(configs: Sequence[ml_collections.ConfigDict], overrides: Sequence[str],
                    what: str = "the quickstart's configs") -> None:
  """ConfigError for an override whose field none of `configs` has."""
  for override in overrides:
    if not any(has_field(c, override_field(override)) for c in configs):
      raise errors.ConfigError(f"{override.split('=', 1)[0]} names no field of {what} "
                               "(see docs/config_reference.md); nothing was run.")


# ------------------------------------------------------------------------------------------ plan


class Plan:
  """Everything one quickstart invocation is about: mode, paths, the stage configs (overrides applied)."""

  def __init__(self, workdir: str, video: bool, config_path: str, overrides: Sequence[str], runlocal: bool,
               data: str | None = None):
    self.workdir, self.video, self.runlocal = workdir, video, runlocal
    self.mode = "video" if video else "image"
    self.config_path = os.path.abspath(config_path)
    if not os.path.isfile(self.config_path):
      raise errors.ConfigError(f"--config={config_path!r} is not a file; give a quickstart config file such as "
                               f"{default_config_path(video)}")
    self.overrides = list(overrides)
    self.module = load_config_module(self.config_path)
    self.data = data or (paths.join(workdir, "data") if video else None)
    self.stages = VIDEO_STAGES if video else IMAGE_STAGES
    self.student = STUDENT[self.mode]
    self.configs = {stage: self._stage_config(stage) for stage in self.stages}
    check_overrides(list(self.configs.values()), self.overrides)

  def stage_dir(self, stage: str) -> str:
    return paths.join(self.workdir, stage)

  def _stage_config(self, stage: str) -> ml_collections.ConfigDict:
    arg = dict(stage=stage, runlocal=self.runlocal)
    if stage == "amd":
      arg["teacher"] = self.stage_dir("teacher")
    if self.video:
      arg["data"] = self.data
    config = self.module.get_config(_arg(**arg))
    if self.video:
      config.eval.probe = False   # every encoder is scored on both labels in one pass at the end
    return apply_overrides(config, self.overrides)

  @property
  def moving_data(self) -> bool:
    """Whether the video stages read the moving-garments folder (rather than a list given by override)."""
    if not self.video:
      return False
    fields = self.module.data_fields(self.data)
    data = self.configs[self.student].data
    return data.path == fields["path"] and data.video_root == fields["video_root"]

  def settings(self) -> dict:
    return {"mode": self.mode, "config": self.config_path, "overrides": self.overrides, "runlocal": self.runlocal,
            "data": self.data and paths.resolve(self.data)}


def _command(argv: Sequence[str]) -> str:
  return "python -m amd_jax.quickstart " + shlex.join(argv)


# ------------------------------------------------------------------------------------------ stages


def count_params(config) -> int:
  """Parameters of the encoder config.model describes, at config.data's input shape."""
  d = config.data
  shape = (1, d.num_frames, d.image_size, d.image_size, d.channels) if d.modality == "video" else (
      1, d.image_size, d.image_size, d.channels)
  encoder = vit.encoder_from_config(config.model)
  shapes = jax.eval_shape(encoder.init, jax.random.PRNGKey(0), jnp.zeros(shape))
  return sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))


def run_stage(config, stage_dir: str) -> dict:
  """Train one stage (resuming its checkpoints), or return the numbers a finished one recorded."""
  record = paths.join(stage_dir, STAGE_RECORD)
  stored = _read_json(record)
  if stored is not None:
    logging.info("%s finished before: its recorded numbers are used", stage_dir)
    return stored
  resumed = paths.isdir(checkpoint.checkpoint_dir(stage_dir))
  t0 = time.perf_counter()
  final = _numbers(loop.run(config, stage_dir))
  if config.eval.probe and "knn_top1" not in final:   # the loop found the run already complete
    final.update(_numbers(evaluate.evaluate_workdir(stage_dir)))
  final.update(wall_seconds=time.perf_counter() - t0, params=count_params(config), resumed=resumed, date=_now())
  _write_json(record, final)
  return final


def _pixels(batch, key: str):
  return batch[key].reshape(batch[key].shape[0], -1)


def image_controls(student_dir: str) -> dict:
  """The student architecture with random weights, and raw pixels, through the students' evaluation."""
  config, method, _ = evaluate.load_run(student_dir)   # the run's config: data statistics and classes resolved
  mesh = sharding.make_mesh(config.mesh)
  d, e = config.data, config.eval
  example = {"image": jnp.zeros((2, d.image_size, d.image_size, d.channels))}
  params = jax.jit(method.init)(jax.random.PRNGKey(config.seed), example)
  rows = {"untrained student": probe.evaluate(method, params, config, mesh)}
  kw = dict(batch_size=e.probe_batch_size, mesh=mesh)
  train = probe.extract_features(lambda b: _pixels(b, "image"), d, split=d.split,
                                 max_examples=e.max_train_examples, **kw)
  test = probe.extract_features(lambda b: _pixels(b, "image"), d, split=d.eval_split, **kw)
  rows["raw pixels"] = probe.evaluate_features(train, test, e, _num_classes(d.num_classes, train[1], test[1]))
  return {"rows": rows, "date": _now()}


def _num_classes(configured: int, *labels: np.ndarray) -> int:
  return int(configured) or int(max(int(np.max(y)) for y in labels)) + 1


# ------------------------------------------------------------------------------------------ video evaluation


def middle_frame_clip(video: jax.Array) -> jax.Array:
  """[B, T, H, W, C] -> the middle frame repeated T times: appearance without motion."""
  t = video.shape[1]
  return jnp.repeat(video[:, t // 2:t // 2 + 1], t, axis=1)


def _label_views(moving: bool, num_classes: int) -> dict[str, tuple[Callable[[np.ndarray], np.ndarray], int]]:
  """Label name -> (labels of the evaluated list -> that label, its class count)."""
  if not moving:
    return {"label": (lambda y: y, num_classes)}
  garments = len(make_moving.GARMENTS)
  return {"direction": (lambda y: y // garments, len(make_moving.DIRECTIONS)),
          "garment": (lambda y: y % garments, garments)}


def video_feature_functions(stage_dirs: dict[str, str], student: str, *, pixels: bool = True,
                            single_frame: Sequence[str] = ()) -> tuple[dict[str, Callable], ml_collections.ConfigDict]:
  """Row name -> features(batch) for the encoders of the runs in `stage_dirs` and the controls, and the config
  of run `student` (the rows are read with its data config; its architecture and seed give the untrained row)."""
  runs = {stage: evaluate.load_run(workdir) for stage, workdir in stage_dirs.items()}
  config, student_method, _ = runs[student]
  d = config.data
  example = {"video": jnp.zeros((2, d.num_frames, d.image_size, d.image_size, d.channels))}
  untrained = jax.jit(student_method.init)(jax.random.PRNGKey(config.seed), example)

  def encoder(stage: str, frames: Callable = lambda v: v):
    _, method, params = runs[stage]
    return lambda b: method.features(params, {"video": frames(b["video"])})

  fns = {stage: encoder(stage) for stage in stage_dirs}
  fns["untrained student"] = lambda b: student_method.features(untrained, b)
  if pixels:
    fns["raw pixels"] = lambda b: _pixels(b, "video")
  for stage in single_frame:
    fns[f"single frame, {stage}"] = encoder(stage, middle_frame_clip)
  return fns, config


def evaluate_video(stage_dirs: dict[str, str], student: str, *, joint_data: dict | None = None, pixels: bool = True,
                   single_frame: Sequence[str] = ()) -> dict:
  """One decoding pass per split feeds every encoder and control; kNN and linear probe on every label.

  joint_data: config.data fields of a moving-garments set's joint list (both labels from one pass); None reads
  the student run's own list and scores its one label.
  """
  fns, config = video_feature_functions(stage_dirs, student, pixels=pixels, single_frame=single_frame)
  data = config.data.copy_and_resolve_references()
  if joint_data is not None:
    data.update(joint_data)
    data.update(mean=config.data.mean, std=config.data.std)   # as the runs normalised
  mesh = sharding.make_mesh(config.mesh)
  e = config.eval
  names = list(fns)
  example = {"video": jnp.zeros((2, data.num_frames, data.image_size, data.image_size, data.channels))}
  widths = [jax.eval_shape(fns[n], example).shape[-1] for n in names]
  joint = lambda b: jnp.concatenate([fns[n](b).astype(jnp.float32) for n in names], axis=-1)
  t0 = time.perf_counter()
  kw = dict(batch_size=e.probe_batch_size, mesh=mesh)
  train_x, train_y = probe.extract_features(joint, data, split=data.split, max_examples=e.max_train_examples, **kw)
  test_x, test_y = probe.extract_features(joint, data, split=data.eval_split, **kw)
  extract_seconds = time.perf_counter() - t0
  labels = _label_views(joint_data is not None, _num_classes(data.num_classes, train_y, test_y))
  bounds = np.cumsum([0] + widths)
  rows = {}
  for i, name in enumerate(names):
    cols = slice(bounds[i], bounds[i + 1])
    rows[name] = {label: probe.evaluate_features((train_x[:, cols], view(train_y)), (test_x[:, cols], view(test_y)),
                                                 e, count)
                  for label, (view, count) in labels.items()}
  return {"rows": rows, "labels": list(labels), "num_train": int(len(train_y)), "num_test": int(len(test_y)),
          "wall_seconds": time.perf_counter() - t0, "extract_seconds": extract_seconds, "date": _now()}


def evaluate_plan(plan: Plan) -> dict:
  """The video quickstart's evaluation: every stage, the untrained student, raw pixels, the single frames."""
  joint = plan.module.data_fields(plan.data, "joint") if plan.moving_data else None
  return evaluate_video({s: plan.stage_dir(s) for s in plan.stages}, plan.student, joint_data=joint,
                        single_frame=[s for s in plan.stages if s != "teacher"])


def ensure_moving_data(plan: Plan) -> dict | None:
  """Generates the moving-garments set the video stages read, unless it is there; its moving.json."""
  if not plan.moving_data:
    return None
  args = dict(plan.module.moving_data(plan.runlocal))
  counts = {k: args.pop(k) for k in ("num_train", "num_test")}
  found = make_moving.read_meta(plan.data) if paths.isdir(plan.data) else None
  t0 = time.perf_counter()
  meta = make_moving.generate(plan.data, counts["num_train"], counts["num_test"], make_moving.MovingSpec(**args),
                              log=lambda m: logging.info("moving garments: %s", m))
  generated = not (found and found.get("complete"))
  return {**meta, "generated_seconds": time.perf_counter() - t0 if generated else None}


# ------------------------------------------------------------------------------------------ tables


def _cell(value, digits: int = 4) -> str:
  return "-" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def _stage_name(plan: Plan, stage: str) -> str:
  model = plan.configs[stage].model
  width, depth, _ = vit.resolve_variant(model.variant, model.width, model.depth, model.num_heads)
  size = f"{width} wide, {depth} deep"
  teacher = "VideoMAE" if plan.video else "MAE"
  return {"teacher": f"teacher ({teacher}, {size})", "mae": f"student, MAE ({size})",
          "videomae": f"student, VideoMAE ({size})", "amd": f"student, AMD ({size})"}[stage]


def _time(r: dict) -> str:
  return f"{r['wall_seconds'] / 60:.1f} min" + (" (resumed)" if r.get("resumed") else "")


def image_table(plan: Plan, stages: dict, controls: dict) -> str:
  rows = ["| encoder | params | pre-training | final pixel loss | kNN top-1 | linear probe top-1 |",
          "|---|---|---|---|---|---|"]
  for stage in plan.stages:
    r = stages[stage]
    rows.append(f"| {_stage_name(plan, stage)} | {r['params'] / 1e6:.2f}M | {_time(r)} | {_cell(r.get('loss_rec'))} | "
                f"{_cell(r.get('knn_top1'))} | {_cell(r.get('linear_probe_top1'))} |")
  for name, r in controls.items():
    rows.append(f"| control: {name} | - | - | - | {_cell(r['knn_top1'])} | {_cell(r['linear_probe_top1'])} |")
  return "\n".join(rows)


def video_table(plan: Plan, stages: dict, evaluation: dict) -> str:
  labels = evaluation["labels"]
  head = "".join(f" {label} kNN | {label} linear probe |" for label in labels)
  rows = [f"| encoder | params | pre-training | final pixel loss |{head}", "|---" * (4 + 2 * len(labels)) + "|"]
  for name, scores in evaluation["rows"].items():
    cells = "".join(f" {_cell(scores[l]['knn_top1'])} | {_cell(scores[l]['linear_probe_top1'])} |" for l in labels)
    if name in stages:
      r = stages[name]
      rows.append(f"| {_stage_name(plan, name)} | {r['params'] / 1e6:.2f}M | {_time(r)} | "
                  f"{_cell(r.get('loss_rec'))} |{cells}")
    else:
      title = name
      if name.startswith("single frame, "):
        student = {"videomae": "VideoMAE", "amd": "AMD"}.get(name[len("single frame, "):], name)
        title = f"single frame, {student} student (middle frame repeated)"
      rows.append(f"| control: {title} | - | - | - |{cells}")
  return "\n".join(rows)


def _describe_data(plan: Plan, evaluation: dict | None) -> str:
  d = plan.configs[plan.student].data
  if not plan.video:
    if d.source == "fashion_mnist":
      return (f"Fashion-MNIST (train 60k / test 10k), {d.image_size}x{d.image_size} grey; probes fit on "
              f"{plan.configs[plan.student].eval.max_train_examples or 'all'} train features")
    return f"{d.source} at {d.path} ({d.split} -> {d.eval_split})"
  what = ("moving garments (amd_jax.data.make_moving) in " + paths.resolve(plan.data) if plan.moving_data
          else f"video list {d.path}")
  return (f"{what}: {d.num_frames} frames (stride {d.sampling_rate}) of {d.image_size}x{d.image_size}; probes fit on "
          f"{evaluation['num_train']} train clips, scored on {evaluation['num_test']} test clips")


def results_text(plan: Plan, command: str, table: str, pieces: Sequence[dict], evaluation: dict | None = None,
                 moving: dict | None = None) -> str:
  total = sum(p["wall_seconds"] for p in pieces) / 60
  resumed = any(p.get("resumed") for p in pieces)
  title = "Video quickstart" if plan.video else "Quickstart"
  generated = ""
  if moving is not None:
    seconds = moving.get("generated_seconds")
    generated = (f"; generating the data took {seconds / 60:.1f} min" if seconds is not None else
                 "; the data set was already in place")
  lines = [f"{title} results", "",
           f"Command: `{command}`",
           f"Finished: {_now()}; stages, controls and evaluation took {total:.1f} min"
           + (" (some resumed: their times cover the last invocation only)" if resumed else "") + generated + ".",
           f"Data: {_describe_data(plan, evaluation)}.",
           f"Device: {jax.devices()[0].device_kind} x{jax.device_count()}, {os.cpu_count()} CPU cores.", "", table, ""]
  return "\n".join(lines)


# ------------------------------------------------------------------------------------------ the story


def run(plan: Plan, command: str, log=print) -> str:
  """The whole quickstart in plan.workdir (resuming what is there); returns the results text."""
  paths.makedirs(plan.workdir)
  settings_file = paths.join(plan.workdir, SETTINGS_FILE)
  stored = _read_json(settings_file)
  if stored is not None and stored != plan.settings():
    now = plan.settings()
    diffs = "; ".join(f"{k}: {stored.get(k)!r} there, {now[k]!r} now" for k in now if stored.get(k) != now[k])
    raise errors.ConfigError(f"--workdir={plan.workdir!r} holds a quickstart run of other settings ({diffs}); "
                             "nothing was changed. Use another --workdir for these settings.")
  results = _read_json(paths.join(plan.workdir, RESULTS_JSON))
  results_md = paths.join(plan.workdir, RESULTS_MD)
  if paths.isfile(results_md) and (results is None or results.get("complete")):
    text = paths.read_text(results_md)
    origin = (f"a finished quickstart (`{results['command']}`, {results['date']})" if results is not None else
              f"a {RESULTS_MD} without {RESULTS_JSON} (an earlier version's run: kept as it is)")
    log(f"{paths.resolve(plan.workdir)} holds {origin}; nothing was run again. Its stored results "
        f"({RESULTS_MD}):\n\n{text}")
    return text
  _write_json(settings_file, plan.settings())
  moving = ensure_moving_data(plan) if plan.video else None
  stages = {stage: run_stage(plan.configs[stage], plan.stage_dir(stage)) for stage in plan.stages}
  if plan.video:
    evaluation = _cached(paths.join(plan.workdir, EVALUATION_FILE), lambda: evaluate_plan(plan))
    table = video_table(plan, stages, evaluation)
    extra = {"evaluation": evaluation, "moving_data": moving}
    pieces = list(stages.values()) + [evaluation]
  else:
    evaluation = None
    controls = _cached(paths.join(plan.workdir, CONTROLS_FILE), lambda: image_controls(plan.stage_dir(plan.student)))
    table = image_table(plan, stages, controls["rows"])
    extra = {"controls": controls}
    pieces = list(stages.values()) + [controls]
  text = results_text(plan, command, table, pieces, evaluation, moving)
  paths.write_text(paths.join(plan.workdir, RESULTS_MD), text)
  _write_json(paths.join(plan.workdir, RESULTS_JSON), {"command": command, "date": _now(), "settings": plan.settings(),
                                                       "stages": stages, **extra, "complete": True})
  log(f"results written to {paths.join(plan.workdir, RESULTS_MD)}\n\n{text}")
  return text


def _cached(path: str, compute: Callable[[], dict]) -> dict:
  stored = _read_json(path)
  if stored is not None:
    return stored
  t0 = time.perf_counter()
  value = compute()
  value.setdefault("wall_seconds", time.perf_counter() - t0)
  _write_json(path, value)
  return value


_OVERRIDES: list[str] = []


def _parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's parsing of the quickstart's own flags; --config.* overrides are kept aside for every stage."""
  rest, overrides = split_overrides(argv[1:])
  _OVERRIDES[:] = overrides
  return app.parse_flags_with_usage([argv[0]] + rest)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  metrics.quiet_library_logs()
  video = _FLAGS["video"].value
  workdir = _FLAGS["workdir"].value or ("workdirs/quickstart_video" if video else "workdirs/quickstart")
  try:
    config = _FLAGS["config"].value
    plan = Plan(workdir, video, config_files.resolve(config) if config else default_config_path(video), _OVERRIDES,
                _FLAGS["runlocal"].value, data=_FLAGS["data"].value)
    run(plan, _command(sys.argv[1:]), log=lambda text: print(text, flush=True))
  except errors.ConfigError as e:   # one line, once (absl's logging would print it a second time)
    print(f"amd_jax: configuration error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  _define_flags()
  app.run(main, flags_parser=_parse_flags)
