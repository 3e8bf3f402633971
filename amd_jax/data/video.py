"""Video decoding with PyAV and temporal frame sampling.

A clip is `num_frames` frames taken `stride` (config.data.sampling_rate) frames
apart, i.e. it spans `(num_frames - 1) * stride + 1` frames of the video.

Training clips start at a uniformly random frame; evaluation clips are centred,
or, for a multi-clip test, spread evenly from the first frame to the last.
When a video is shorter than the span, the indices that run past the end are
CLAMPED to the last frame (the last frame repeats), as VideoMAE's loaders do,
rather than looping back to the start: looping would put a temporal jump inside
the clip that no real video has.

Decoding is sequential from the start of the file up to the last frame needed,
with no seeking. That is simple and exact for the short clips of action
recognition data sets (Kinetics and Something-Something clips are a few
seconds); only the needed frames are converted to RGB arrays, which is the
expensive part.
"""
from __future__ import annotations

from typing import Callable

import av
import numpy as np


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


def _decode_all(container, stream) -> list[np.ndarray]:
  return [f.to_ndarray(format="rgb24") for f in container.decode(stream)]


def decode_frames(container, stream, indices: np.ndarray) -> np.ndarray:
  """Decodes sequentially up to max(indices); returns uint8 [len(indices), H, W, 3].

  Indices beyond the frames actually decoded (metadata that over-counts) take
  the last decoded frame, the same clamping rule as `clip_indices`.
  """
  wanted = set(int(i) for i in indices)
  last_needed = int(np.max(indices))
  frames: dict[int, np.ndarray] = {}
  last_frame, decoded = None, 0
  for i, frame in enumerate(container.decode(stream)):
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


def _read_frames(path: str, indices_for: Callable[[int], np.ndarray]) -> np.ndarray:
  """Decodes the frames indices_for(video length) of a file: uint8 [len(indices), H, W, 3]."""
  with av.open(path) as container:
    if not container.streams.video:
      raise ValueError("file has no video stream")
    stream = container.streams.video[0]
    length = _stream_length(stream)
    if length > 0:
      return decode_frames(container, stream, indices_for(length))
    # No usable metadata: decode everything once, then sample from what is there.
    frames = _decode_all(container, stream)
    if not frames:
      raise ValueError("no decodable video frames")
    return np.stack([frames[i] for i in indices_for(len(frames))])


def read_clip(path: str, num_frames: int, stride: int,
              rng: np.random.Generator | None = None) -> np.ndarray:
  """Reads one clip from a video file: uint8 [num_frames, H, W, 3].

  rng given: random temporal position (training); rng None: centred (eval).
  Raises on unreadable files (av.FFmpegError, OSError, ValueError); the caller
  decides whether to skip.
  """
  return _read_frames(path, lambda length: sample_indices(length, num_frames, stride, rng))


def read_clips(path: str, num_frames: int, stride: int, num_clips: int) -> np.ndarray:
  """The num_clips test clips of `spaced_starts`: uint8 [num_clips, num_frames, H, W, 3].

  The file is decoded once for all clips. Raises like `read_clip`.
  """
  def indices_for(length: int) -> np.ndarray:
    starts = spaced_starts(length, num_frames, stride, num_clips)
    return np.concatenate([clip_indices(length, num_frames, stride, s) for s in starts])
  frames = _read_frames(path, indices_for)
  return frames.reshape((num_clips, num_frames) + frames.shape[1:])
