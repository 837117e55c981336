"""Turn a `video_url` part's URL (vLLM's OpenAI extension: inline `data:video/...;base64,` or an allowed http(s)
host, by the image rules) into the sampled frames the engine takes, or a 400 that says what is wrong with it.

The frames are sampled as prepare samples them (`data.video`: `serve.video_frames` spread over the whole clip), so
a served video is seen as a trained one was."""
from __future__ import annotations

import numpy as np

from llava_core.config import ServeSettings
from llava_core.data.formats import RowError
from llava_core.data.images import ImageLimits
from llava_core.data.video import VideoSampling, decode_video
from llava_core.serve.image_fetch import fetch_media_bytes
from llava_core.serve.image_input import data_url_bytes, media_error

MESSAGES_FOR_REASON = {
    "video_unreadable": "the data is not a video the server can decode",
    "video_empty": "the video has no frames",
    "video_too_large": "the video is too large",
    "video_aspect_ratio": "the video's frames are too long and thin",
}


def video_from_url(url: str, settings: ServeSettings, param: str) -> list[np.ndarray]:
    """`settings.video_frames` RGB frames (height, width, 3) uint8 of the video at `url`."""
    if url.strip().lower().startswith(("http://", "https://")):
        data = fetch_media_bytes(url.strip(), settings, param, "video", settings.max_video_bytes)
    else:
        data = data_url_bytes(url, settings.max_video_bytes, param, "video")
    limits = ImageLimits(settings.max_image_pixels, settings.max_image_side, settings.max_image_aspect_ratio)
    return checked_video(data, VideoSampling(settings.video_frames, 0.0, settings.max_video_bytes), limits, param)


def checked_video(data: bytes, sampling: VideoSampling, limits: ImageLimits, param: str) -> list[np.ndarray]:
    try:
        return decode_video(data, sampling, limits)
    except RowError as error:
        raise media_error(error, param, "video", MESSAGES_FOR_REASON) from None
    except Exception as error:  # noqa: BLE001 - ffmpeg's demuxers fail on crafted files in many ways
        raise media_error(RowError("video_unreadable", f"{type(error).__name__}: {error}"), param, "video",
                          MESSAGES_FOR_REASON) from None
