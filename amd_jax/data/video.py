"""Video decoding with PyAV and temporal frame sampling.

A clip is `num_frames` frames taken `stride` (config.data.sampling_rate) frames
apart, i.e. it spans `(num_frames - 1) * stride + 1` frames of the video.

Training clips start at a uniformly random frame; evaluation clips are centred,
or, for a multi-clip test, spread evenly from the first frame to the last.
When a video is shorter than the span, the indices that run past the end are
CLAMPED to the last frame (the last frame repeats), as VideoMAE's loaders do,
rather than looping back to the start: looping would put a temporal jump inside
the clip that no real video has.

Frames are found by their time stamps: one pass over the file's packets
(demuxing only, no decoding: about a millisecond for a clip) lists every frame's
presentation time stamp and which frames are keyframes (`frame_index`); frame i
is the frame with the i-th smallest time stamp. A clip is then decoded from the
last keyframe at or before its first frame up to its last frame
(`decode_from_keyframe`), and only the frames it needs are converted to RGB
arrays. On a camera clip with a keyframe every second or so this decodes about
half the frames that decoding from the start of the file would. Files whose time
stamps cannot name the frames (missing or repeated, as some tools write them)
are decoded from their first frame instead, counting frames as they come out.

decord, the other decoder common in video pre-training code, was measured
against this on the same clips (benchmarks/input.py, docs/benchmarks.md): it
returns the same pixels (both convert with FFmpeg's swscale) at about the same
CPU cost per clip, but it returned frames from 35 frames later on a file with
repeated time stamps, and it has no wheels for Linux on ARM (its last release
is from 2021), so it is not used.

Where the bytes come from (`open_video`):
- a local path is checked before it is opened: anything but a regular file (a
  FIFO, a directory, a device, a socket) raises NotARegularFile and is never
  opened, because open() on a FIFO waits for a writer forever. The file is then
  opened non-blocking and checked once more on the open descriptor, so a path
  swapped for a FIFO in between is caught too;
- a URL (gs://...) is read through amd_jax.paths: an object up to
  MAX_IN_MEMORY_BYTES is fetched whole, in one request, and decoded from memory
  (clips are a few MB; a temporary file would cost a disk write and a clean-up
  for nothing, and PyAV reading the remote file object directly would turn its
  small reads and the seeks of an MP4 index into many requests); a larger object
  is decoded from the remote file object itself, so memory stays bounded.

Every read has a deadline (`timeout_s`, DEFAULT_TIMEOUT_S): the decoding runs
in a helper thread that the caller waits for at most timeout_s; past it the
caller gets VideoTimeout (a skipped file for the sources) and the helper stops
at its next frame. So one file that decodes very slowly, or a read that blocks
(a stalled network file system), cannot hang a run.
"""
from __future__ import annotations

import dataclasses
import io
import os
import stat
import threading
from typing import BinaryIO, Callable, TypeVar

import av
import numpy as np

from amd_jax import paths

# Seconds one video may take to open and decode before it is skipped. A normal clip takes well under a
# second (a 720p clip of 16 frames at stride 4: ~0.2 s on one core); a minute means something is wrong.
DEFAULT_TIMEOUT_S = 60.0
# Remote objects up to this size are fetched whole and decoded from memory; larger ones are streamed.
MAX_IN_MEMORY_BYTES = 256 * 2**20

T = TypeVar("T")


class NotARegularFile(OSError):
  """A listed video path that is a FIFO, a directory, a device or a socket: never opened."""


class VideoTimeout(TimeoutError):
  """Opening and decoding a video took longer than its timeout."""


class VideoTooLarge(ValueError):
  """A video whose frames have more pixels than allowed: skipped before any frame is decoded."""


def clip_span(num_frames: int, stride: int) -> int:
  """Number of video frames a clip covers, first sampled frame to last."""
  return (num_frames - 1) * stride + 1


def clip_indices(video_length: int, num_frames: int, stride: int, start: int) -> np.ndarray:
  """Frame indices start, start+stride, ... clamped to [0, video_length - 1]."""
  if video_length < 1:
    raise ValueError(f"cannot sample frames from a video with {video_length} frames")
  idx = start + stride * np.arange(num_frames, dtype=np.int64)
  return np.clip(idx, 0, video_length - 1)


def random_start(video_length: int, num_frames: int, stride: int, rng: np.random.Generator) -> int:
  """Uniform start such that the clip fits in the video; 0 when it cannot fit."""
  room = video_length - clip_span(num_frames, stride)
  return int(rng.integers(0, room + 1)) if room > 0 else 0


def centre_start(video_length: int, num_frames: int, stride: int) -> int:
  """Start that centres the clip in the video; 0 when the video is too short."""
  return max(0, (video_length - clip_span(num_frames, stride)) // 2)


def spaced_starts(video_length: int, num_frames: int, stride: int, num_clips: int) -> list[int]:
  """Starts of num_clips test clips, evenly spaced from the first to the last possible start.

  One clip is centred (`centre_start`); several span the video as VideoMAE's
  multi-clip test does. A video shorter than a clip gives every clip start 0.
  """
  if num_clips == 1:
    return [centre_start(video_length, num_frames, stride)]
  room = max(0, video_length - clip_span(num_frames, stride))
  return [int(k * room / (num_clips - 1)) for k in range(num_clips)]


def sample_indices(video_length: int, num_frames: int, stride: int,
                   rng: np.random.Generator | None = None) -> np.ndarray:
  """Training indices (random start) when rng is given, else centred ones."""
  if rng is None:
    start = centre_start(video_length, num_frames, stride)
  else:
    start = random_start(video_length, num_frames, stride, rng)
  return clip_indices(video_length, num_frames, stride, start)


def _stream_length(stream) -> int:
  """Frame count from the container's metadata; 0 when the container has none.

  Some containers (e.g. WebM) do not store a frame count; then it is estimated
  from duration x frame rate. An estimate that is too long is harmless: indices
  past the real end are clamped to the last decoded frame in `decode_frames`.
  """
  if stream.frames and stream.frames > 0:
    return int(stream.frames)
  if stream.duration and stream.time_base and stream.average_rate:
    return int(round(float(stream.duration * stream.time_base * stream.average_rate)))
  return 0


def _stop_if(cancelled: threading.Event | None) -> None:
  if cancelled is not None and cancelled.is_set():
    raise VideoTimeout("the reader gave up waiting for this video")


def _decode_all(container, stream, cancelled: threading.Event | None = None) -> list[np.ndarray]:
  frames = []
  for frame in container.decode(stream):
    _stop_if(cancelled)
    frames.append(frame.to_ndarray(format="rgb24"))
  return frames


def decode_frames(container, stream, indices: np.ndarray,
                  cancelled: threading.Event | None = None) -> np.ndarray:
  """Decodes sequentially up to max(indices); returns uint8 [len(indices), H, W, 3].

  Indices beyond the frames actually decoded (metadata that over-counts) take
  the last decoded frame, the same clamping rule as `clip_indices`. Stops with
  VideoTimeout once `cancelled` is set (checked at every frame).
  """
  wanted = set(int(i) for i in indices)
  last_needed = int(np.max(indices))
  frames: dict[int, np.ndarray] = {}
  last_frame, decoded = None, 0
  for i, frame in enumerate(container.decode(stream)):
    _stop_if(cancelled)
    last_frame, decoded = frame, i + 1
    if i in wanted:
      frames[i] = frame.to_ndarray(format="rgb24")
    if i >= last_needed:
      break
  if last_frame is None:
    raise ValueError("no decodable video frames")
  if len(frames) < len(wanted):
    # The video ended before the metadata said: clamp to its last frame.
    tail = frames.get(decoded - 1)
    if tail is None:
      tail = last_frame.to_ndarray(format="rgb24")
    return np.stack([frames.get(int(i), tail) for i in indices])
  return np.stack([frames[int(i)] for i in indices])


# ------------------------------------------------------------------------------------- opening files

_FILE_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISDIR, "a directory"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
               (stat.S_ISSOCK, "a socket"))


def _kind(mode: int) -> str:
  return next((name for test, name in _FILE_KINDS if test(mode)), "a special file")


def _open_local(path: str) -> BinaryIO:
  """A regular local file opened for reading; NotARegularFile (never opened) for anything else."""
  mode = os.stat(path).st_mode  # follows symlinks: a link to a FIFO is a FIFO
  if not stat.S_ISREG(mode):
    raise NotARegularFile(f"{path} is {_kind(mode)}, not a regular file")
  # O_NONBLOCK: should the path have become a FIFO since the stat, open() returns at once instead of
  # waiting for a writer; the descriptor is then checked for what it really is.
  nonblocking = getattr(os, "O_NONBLOCK", 0)  # POSIX (Linux, macOS)
  fd = os.open(path, os.O_RDONLY | nonblocking | getattr(os, "O_CLOEXEC", 0))
  try:
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
      raise NotARegularFile(f"{path} is {_kind(mode)}, not a regular file")
    if nonblocking:
      os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")
  except BaseException:
    os.close(fd)
    raise


def _open_remote(url: str) -> BinaryIO:
  """A URL's bytes: in memory up to MAX_IN_MEMORY_BYTES, else the remote file object (see module doc)."""
  remote = paths.open_read(url)
  try:
    size = remote.seek(0, io.SEEK_END)
    remote.seek(0)
    if size > MAX_IN_MEMORY_BYTES:
      return remote
    data = remote.read()
  except BaseException:
    remote.close()
    raise
  remote.close()
  return io.BytesIO(data)


def open_video(path: str) -> BinaryIO:
  """A binary file object holding a video's bytes, local path or URL (see the module doc)."""
  return _open_remote(path) if paths.is_remote(path) else _open_local(path)


# ---------------------------------------------------------------------------------------- deadlines


def run_with_timeout(work: Callable[[threading.Event], T], timeout_s: float | None = None) -> T:
  """work(cancelled), waited for at most timeout_s seconds; VideoTimeout past it.

  `work` runs in a daemon thread (a read blocked for good never keeps the
  process alive) and should check `cancelled` between units of work and stop
  when it is set: the caller has moved on. timeout_s None: DEFAULT_TIMEOUT_S;
  0 (or less): no deadline, `work` runs in the calling thread.
  """
  cancelled = threading.Event()
  if timeout_s is None:
    timeout_s = DEFAULT_TIMEOUT_S
  if timeout_s <= 0:
    return work(cancelled)
  outcome: dict[str, object] = {}

  def target():
    try:
      outcome["value"] = work(cancelled)
    except BaseException as e:  # pylint: disable=broad-except  (handed to the caller below)
      outcome["error"] = e

  thread = threading.Thread(target=target, name="amd_jax-video-read", daemon=True)
  thread.start()
  thread.join(timeout_s)
  if thread.is_alive():
    cancelled.set()
    raise VideoTimeout(f"opening and decoding took longer than {timeout_s:g} s")
  if "error" in outcome:
    raise outcome["error"]
  return outcome["value"]


# ------------------------------------------------------------------------------------------ reading


def _check_size(stream, max_frame_pixels: int) -> None:
  width, height = stream.codec_context.width, stream.codec_context.height
  if max_frame_pixels and width * height > max_frame_pixels:
    raise VideoTooLarge(f"frames of {width}x{height} = {width * height / 1e6:.1f} megapixels exceed the "
                        f"limit of {max_frame_pixels / 1e6:g} megapixels")


@dataclasses.dataclass(frozen=True)
class FrameIndex:
  """Where each frame of a stream is, read from its packets alone (nothing decoded).

  Frame i of the video is the i-th frame in presentation order: the packet with
  the i-th smallest presentation time stamp.
  """
  pts: np.ndarray        # int64 [num_frames]: presentation time stamps, ascending
  keyframes: np.ndarray  # int64 positions into pts of the frames decoding can start from (0 among them)

  def __len__(self) -> int:
    return len(self.pts)

  def keyframe_before(self, position: int) -> int:
    """The last keyframe at or before `position`."""
    return int(self.keyframes[np.searchsorted(self.keyframes, position, side="right") - 1])


def frame_index(container, stream, cancelled: threading.Event | None = None) -> FrameIndex | None:
  """The FrameIndex of a stream, demuxed to its end; None when time stamps cannot name the frames
  (a packet without one, two frames with the same one, or no keyframe at the start)."""
  pts, keys = [], []
  for packet in container.demux(stream):
    _stop_if(cancelled)
    if packet.size == 0:
      continue  # the demuxer's end-of-stream marker
    if packet.pts is None:
      return None
    pts.append(packet.pts)
    keys.append(packet.is_keyframe)
  if not pts:
    return None
  order = np.argsort(np.asarray(pts, np.int64), kind="stable")
  sorted_pts = np.asarray(pts, np.int64)[order]
  keyframes = np.flatnonzero(np.asarray(keys, bool)[order])
  if np.any(np.diff(sorted_pts) == 0) or not len(keyframes) or keyframes[0] != 0:
    return None
  return FrameIndex(sorted_pts, keyframes)


def decode_from_keyframe(container, stream, index: FrameIndex, indices: np.ndarray,
                         cancelled: threading.Event | None = None) -> np.ndarray | None:
  """Frames `indices` (positions in `index`), decoded from the last keyframe at or before the first.

  None when the container cannot seek or the decoded frames do not line up with
  the index (a frame whose time stamp the index does not hold, or a wanted frame
  never decoded): the caller then decodes from the start instead.
  """
  first, last = int(np.min(indices)), int(np.max(indices))
  try:
    container.seek(int(index.pts[index.keyframe_before(first)]), stream=stream, backward=True,
                   any_frame=False)
  except av.FFmpegError:  # a container that cannot seek: decode from the start
    return None
  position = {int(p): i for i, p in enumerate(index.pts)}
  wanted = set(int(i) for i in indices)
  frames: dict[int, np.ndarray] = {}
  for frame in container.decode(stream):
    _stop_if(cancelled)
    i = position.get(frame.pts)
    if i is None:
      return None
    if i in wanted:
      frames[i] = frame.to_ndarray(format="rgb24")
    if i >= last:  # the decoder hands frames out in presentation order
      break
  if len(frames) < len(wanted):
    return None
  return np.stack([frames[int(i)] for i in indices])


def _decode_by_index(file: BinaryIO, indices_for: Callable[[int], np.ndarray], max_frame_pixels: int,
                     cancelled: threading.Event) -> np.ndarray | None:
  """The wanted frames by seeking to a keyframe; None when the file's time stamps do not allow it."""
  with av.open(file) as container:
    if not container.streams.video:
      raise ValueError("file has no video stream")
    stream = container.streams.video[0]
    _check_size(stream, max_frame_pixels)
    index = frame_index(container, stream, cancelled)
    if index is None:
      return None
    return decode_from_keyframe(container, stream, index, indices_for(len(index)), cancelled)


def decode_from_start(file: BinaryIO, indices_for: Callable[[int], np.ndarray],
                      cancelled: threading.Event | None = None) -> np.ndarray:
  """The wanted frames counted in decoding order from the first, for files without usable time stamps."""
  with av.open(file) as container:
    stream = container.streams.video[0]
    length = _stream_length(stream)
    if length > 0:
      return decode_frames(container, stream, indices_for(length), cancelled)
    # No usable metadata: decode everything once, then sample from what is there.
    frames = _decode_all(container, stream, cancelled)
    if not frames:
      raise ValueError("no decodable video frames")
    return np.stack([frames[i] for i in indices_for(len(frames))])


def _decode(path: str, indices_for: Callable[[int], np.ndarray], max_frame_pixels: int,
            cancelled: threading.Event) -> np.ndarray:
  """Decodes the frames indices_for(video length) of a file: uint8 [len(indices), H, W, 3]."""
  with open_video(path) as file:
    frames = _decode_by_index(file, indices_for, max_frame_pixels, cancelled)
    if frames is not None:
      return frames
    file.seek(0)
    return decode_from_start(file, indices_for, cancelled)


def read_frames(path: str, indices_for: Callable[[int], np.ndarray], *, timeout_s: float | None = None,
                max_frame_pixels: int = 0) -> np.ndarray:
  """The frames indices_for(video length) of a video file: uint8 [len(indices), H, W, 3].

  What `read_clip` and `read_clips` are made of; raises like them.
  """
  return run_with_timeout(lambda cancelled: _decode(path, indices_for, max_frame_pixels, cancelled),
                          timeout_s)


def read_clip(path: str, num_frames: int, stride: int, rng: np.random.Generator | None = None, *,
              timeout_s: float | None = None, max_frame_pixels: int = 0) -> np.ndarray:
  """Reads one clip from a video file (local path or URL): uint8 [num_frames, H, W, 3].

  rng given: random temporal position (training); rng None: centred (eval).
  Raises on files that cannot be used: av.FFmpegError, OSError (NotARegularFile
  for a FIFO, a directory, a device), ValueError (VideoTooLarge when a frame has
  more than max_frame_pixels pixels; 0: no limit), VideoTimeout past timeout_s
  seconds (None: DEFAULT_TIMEOUT_S; 0: no deadline). The caller decides whether
  to skip.
  """
  return read_frames(path, lambda length: sample_indices(length, num_frames, stride, rng),
                     timeout_s=timeout_s, max_frame_pixels=max_frame_pixels)


def read_clips(path: str, num_frames: int, stride: int, num_clips: int, *,
               timeout_s: float | None = None, max_frame_pixels: int = 0) -> np.ndarray:
  """The num_clips test clips of `spaced_starts`: uint8 [num_clips, num_frames, H, W, 3].

  The file is decoded once for all clips (within one timeout). Raises like `read_clip`.
  """
  def indices_for(length: int) -> np.ndarray:
    starts = spaced_starts(length, num_frames, stride, num_clips)
    return np.concatenate([clip_indices(length, num_frames, stride, s) for s in starts])
  frames = read_frames(path, indices_for, timeout_s=timeout_s, max_frame_pixels=max_frame_pixels)
  return frames.reshape((num_clips, num_frames) + frames.shape[1:])
