"""A checked request's `image_url` and `video_url` parts become what the engine takes: checked RGB images and sampled
video frames, in the order their parts appear, or a 400 naming the part and saying what is wrong with it.

A URL is inline data (`data:image/...;base64,`, `data:video/...;base64,`) or an http(s) URL of an allowed host, which
`image_fetch` downloads under its host and size rules. Videos (vLLM's OpenAI extension, LLaVA-OneVision only) are
sampled as prepare samples them (`data.video`: `serve.video_frames` spread over the whole clip), so a served video is
seen as a trained one was.
"""
from __future__ import annotations

import base64
import binascii
import re

import numpy as np
from PIL import Image

from llava_core.config import ServeSettings
from llava_core.data.formats import RowError
from llava_core.data.images import ImageLimits, decode_image
from llava_core.data.video import VideoSampling, decode_video
from llava_core.serve.errors import bad_request
from llava_core.serve.image_fetch import fetch_image_bytes, fetch_media_bytes
from llava_core.serve.protocol import ChatCompletionRequest

DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*);base64,(?P<data>.*)",
                      re.DOTALL)

IMAGE_MESSAGES_FOR_REASON = {
    "not_an_image": "the data is not an image in a format the server can read",
    "image_corrupt": "the image is corrupt or truncated",
    "image_too_large": "the image is too large",
    "image_aspect_ratio": "the image is too long and thin",
    "image_empty": "the image is empty",
}
VIDEO_MESSAGES_FOR_REASON = {
    "video_unreadable": "the data is not a video the server can decode",
    "video_empty": "the video has no frames",
    "video_too_large": "the video is too large",
    "video_aspect_ratio": "the video's frames are too long and thin",
}


def decode_media(request: ChatCompletionRequest, settings: ServeSettings) -> tuple[list[Image.Image], list]:
    """The request's images and its videos (each `settings.video_frames` RGB frames), each list in part order."""
    images, videos = [], []
    for where, part in request.media_parts():
        if part.medium == "image":
            images.append(image_from_url(part.url, settings, where))
        else:
            videos.append(video_from_url(part.url, settings, where))
    return images, videos


def image_from_url(url: str, settings: ServeSettings, param: str) -> Image.Image:
    """The checked RGB image at `url` (EXIF rotation applied; the side, shape and pixel limits read from its header)."""
    if url.strip().lower().startswith(("http://", "https://")):
        data = fetch_image_bytes(url.strip(), settings, param)
    else:
        data = data_url_bytes(url, settings.max_image_bytes, param)
    return checked_image(data, ImageLimits.of(settings), param)


def video_from_url(url: str, settings: ServeSettings, param: str) -> list[np.ndarray]:
    """`settings.video_frames` RGB frames (height, width, 3) uint8 of the video at `url`."""
    if url.strip().lower().startswith(("http://", "https://")):
        data = fetch_media_bytes(url.strip(), settings, param, "video", settings.max_video_bytes)
    else:
        data = data_url_bytes(url, settings.max_video_bytes, param, "video")
    return checked_video(data, VideoSampling.of(settings), ImageLimits.of(settings), param)


def data_url_bytes(url: str, max_bytes: int, param: str, medium: str = "image") -> bytes:
    """The bytes of a `data:<medium>/...;base64,` URL (`medium` "image" or "video"), at most `max_bytes`."""
    # Whitespace is common in pasted base64 (line-wrapped `base64` output) and means nothing.
    encoded = "".join(base64_payload(url, param, medium).split())
    # Refuse oversized payloads from their length (4 characters per 3 bytes), before spending memory on decoding.
    if len(encoded) * 3 // 4 > max_bytes + 2:
        raise bad_request(f"the {medium} is larger than the limit of {max_bytes} bytes", param, f"{medium}_too_large")
    data = decode_base64(encoded, param, medium)
    if len(data) > max_bytes:
        raise bad_request(f"the {medium} is {len(data)} bytes, over the limit of {max_bytes} bytes", param,
                          f"{medium}_too_large")
    return data


def checked_image(data: bytes, limits: ImageLimits, param: str) -> Image.Image:
    try:
        return decode_image(data, limits)
    except RowError as error:
        raise media_error(error, param) from None
    except Exception as error:  # noqa: BLE001 - PIL's decoders fail on crafted files in many ways; all are the client's
        raise media_error(RowError("image_corrupt", f"{type(error).__name__}: {error}"), param) from None


def checked_video(data: bytes, sampling: VideoSampling, limits: ImageLimits, param: str) -> list[np.ndarray]:
    try:
        return decode_video(data, sampling, limits)
    except RowError as error:
        raise media_error(error, param, "video", VIDEO_MESSAGES_FOR_REASON) from None
    except Exception as error:  # noqa: BLE001 - ffmpeg's demuxers fail on crafted files in many ways
        raise media_error(RowError("video_unreadable", f"{type(error).__name__}: {error}"), param, "video",
                          VIDEO_MESSAGES_FOR_REASON) from None


def media_error(error: RowError, param: str, medium: str = "image", messages: dict = IMAGE_MESSAGES_FOR_REASON):
    """The 400 for an image (or video) that failed its checks: the reason in words, its detail, and the code
    `<medium>_too_large` or `invalid_<medium>`."""
    message = f"invalid {medium}: {messages.get(error.reason, error.reason)}"
    if error.detail:
        message += f" ({error.detail[:300]})"
    code = f"{medium}_too_large" if error.reason == f"{medium}_too_large" else f"invalid_{medium}"
    return bad_request(message, param, code)


def base64_payload(url: str, param: str, medium: str = "image") -> str:
    match = DATA_URL.fullmatch(url.strip())
    if not match:
        raise bad_request(f"{medium}_url.url must be a data:{medium}/...;base64,... URL (or an http(s) URL of an "
                          "allowed host)", param, f"invalid_{medium}_url")
    mime = match.group("mime")
    if mime is not None and not mime.startswith(f"{medium}/"):
        article = "an" if medium == "image" else "a"
        raise bad_request(f"the data URL's media type is {mime}, not {article} {medium} type", param,
                          f"invalid_{medium}_url")
    return match.group("data")


def decode_base64(encoded: str, param: str, medium: str = "image") -> bytes:
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as error:
        raise bad_request(f"{medium}_url.url is not valid base64: {error}", param, "invalid_base64") from None
