"""A row's video as exactly `frames` RGB frames: decoded from a video file (local or s3://, named like an image) or
picked from a list of frame images, sampled uniformly over the clip or at a frame rate; every failure is a `RowError`.

Every video gives exactly `VideoSampling.frames` frames (a short clip repeats frames): transformers' OneVision takes
a batch's videos as one (videos, frames, 3, tile, tile) tensor, so all of them must have the same count.

Decoding uses PyAV: it installs from PyPI as a wheel with ffmpeg inside (no system ffmpeg, no torchvision, whose PyPI
build is CUDA-linked and replaces a CPU torch), reads every container and codec ffmpeg does, and seeks.

What a video costs: the file is read whole into memory (at most `max_bytes`, refused from its size before the read).
One demux pass over its packets, without decoding, gives every frame's timestamp (~1 us a packet: a 2-hour clip at
30 fps is 216K packets, well under a second). Then only the sampled frames are decoded: for each one the decoder
seeks to the keyframe before it and decodes forward to it (at most one group of pictures, typically 1-10 s of video),
or, when it is less than `SEEK_GAP_S` after the last decoded frame, simply decodes forward. So the decoding cost is
about `frames` x one GOP, whatever the clip's length, instead of every frame of it.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from llava_core.data import images
from llava_core.data.formats import RowError
from llava_core.schema import MediaLimits

SEEK_GAP_S = 2.0  # decode forward rather than seek when the next wanted frame is this close (about one GOP)


@dataclass(frozen=True)
class VideoSampling:
    frames: int = images.DEFAULTS.video_frames  # every video yields exactly this many frames
    fps: float = 0.0  # 0: spread over the whole clip; > 0: candidates every 1/fps s, then resampled to `frames`
    max_bytes: int = images.DEFAULTS.max_video_bytes

    @classmethod
    def of(cls, media: MediaLimits, fps: float = 0.0) -> VideoSampling:
        return cls(media.video_frames, fps, media.max_video_bytes)


def uniform_indices(count: int, frames: int) -> np.ndarray:
    """`frames` indices spread evenly over 0..count-1, first and last included (LLaVA-NeXT's
    `np.linspace(0, total - 1, frames)`); fewer than `frames` candidates repeat, in order."""
    return np.rint(np.linspace(0, count - 1, frames)).astype(np.int64)


def sample_times(times: np.ndarray, sampling: VideoSampling) -> np.ndarray:
    """Indices into a clip's frame `times` (seconds, ascending) of the frames to keep: exactly `sampling.frames`.
    With `fps`, the candidates are the first frame at or after every 1/fps seconds from the clip's start."""
    candidates = np.arange(len(times))
    if sampling.fps > 0:
        ticks = np.arange(0.0, times[-1] - times[0] + 1e-9, 1.0 / sampling.fps) + times[0]
        candidates = np.minimum(np.searchsorted(times, ticks - 1e-9), len(times) - 1)
    return candidates[uniform_indices(len(candidates), sampling.frames)]


def read_video(image_folder: str, spec, sampling: VideoSampling, limits: images.ImageLimits,
               allow_outside: bool = False) -> list[np.ndarray]:
    """A row's `video`: a file name (decoded) or a list of frame image names (sampled uniformly; `fps` needs
    timestamps, which a frame list has not). Names follow the image rules: inside the image folder unless allowed."""
    if isinstance(spec, str) and spec:
        data = images.read_media_bytes(image_folder, spec, allow_outside, "video", sampling.max_bytes)
        return decode_video(data, sampling, limits)
    if isinstance(spec, list) and spec and all(isinstance(name, str) and name for name in spec):
        return frames_from_images(image_folder, spec, sampling, limits, allow_outside)
    raise RowError("video_missing", f"video must be a file name or a non-empty list of frame image names, got "
                                    f"{type(spec).__name__}")


def frames_from_images(image_folder: str, names: list[str], sampling: VideoSampling, limits: images.ImageLimits,
                       allow_outside: bool = False) -> list[np.ndarray]:
    """The sampled frames of a frame list; only the frames kept are read and decoded."""
    picked = uniform_indices(len(names), sampling.frames)
    decoded = {i: np.asarray(images.decode_image(images.read_image_bytes(image_folder, names[i], allow_outside),
                                                 limits)) for i in np.unique(picked).tolist()}
    return [decoded[i] for i in picked.tolist()]


def decode_video(data: bytes, sampling: VideoSampling, limits: images.ImageLimits) -> list[np.ndarray]:
    """Exactly `sampling.frames` RGB frames (height, width, 3) uint8 of an encoded video."""
    import av

    if not data:
        raise RowError("video_empty", "zero bytes")
    if len(data) > sampling.max_bytes:
        raise RowError("video_too_large", f"{len(data)} bytes, over the limit of {sampling.max_bytes}")
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            stream = video_stream(container)
            check_frame_size(stream, limits)
            pts = frame_timestamps(container, stream)
            wanted = pts[sample_times(pts * float(stream.time_base), sampling)]
            decoded = decode_at(container, stream, np.unique(wanted).tolist())
            return [decoded[p] for p in wanted.tolist()]
    except RowError:
        raise
    except (av.FFmpegError, ValueError, OSError, EOFError) as error:  # FFmpegError: container and codec errors
        raise RowError("video_unreadable", f"{type(error).__name__}: {error}") from error


def video_stream(container):
    if not container.streams.video:
        raise RowError("video_unreadable", "the file has no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"  # frame threads: several frames of a GOP decode at once
    return stream


def check_frame_size(stream, limits: images.ImageLimits) -> None:
    """The frame size from the stream header, before any frame is decoded, against the image limits."""
    try:
        limits.check(stream.codec_context.width, stream.codec_context.height)
    except RowError as error:
        raise RowError(error.reason.replace("image_", "video_", 1), f"frames of {error.detail}") from None


def frame_timestamps(container, stream) -> np.ndarray:
    """Every frame's presentation timestamp, ascending, from one demux pass (packets are read, not decoded)."""
    pts = [packet.pts for packet in container.demux(stream) if packet.pts is not None and packet.size]
    if not pts:
        raise RowError("video_empty", "no frames")
    return np.unique(np.asarray(pts, dtype=np.int64))


def decode_at(container, stream, targets: list[int]) -> dict[int, np.ndarray]:
    """The frames at (or first after) each timestamp of `targets` (ascending), seeking only across long gaps."""
    gap = SEEK_GAP_S / float(stream.time_base)
    frames, last, out = None, None, {}
    for target in targets:
        if frames is None or target - last > gap:
            container.seek(target, stream=stream, backward=True, any_frame=False)  # the keyframe at or before it
            frames = container.decode(stream)
        for frame in frames:
            if frame.pts is None:
                continue
            last = frame.pts
            if frame.pts >= target:
                out[target] = frame.to_ndarray(format="rgb24")
                break
        else:
            raise RowError("video_unreadable", f"the frame at timestamp {target} could not be decoded")
    return out
