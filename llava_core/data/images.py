"""Decode, check and pad images; every failure becomes a `RowError` with its own reason."""
from __future__ import annotations

import io
import os
import posixpath
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from llava_core import storage
from llava_core.data.formats import RowError
from llava_core.schema import MediaLimits

DEFAULTS = MediaLimits()  # the schema's defaults: what a workflow that sets no limit gets


@dataclass(frozen=True)
class ImageLimits:
    """An image's limits as prepare and serve check them (`prepare.*` / `serve.*`, one `MediaLimits` section)."""
    max_pixels: int = DEFAULTS.max_image_pixels
    max_side: int = DEFAULTS.max_image_side
    max_aspect_ratio: float = DEFAULTS.max_image_aspect_ratio

    @classmethod
    def of(cls, media: MediaLimits) -> ImageLimits:
        return cls(media.max_image_pixels, media.max_image_side, media.max_image_aspect_ratio)

    def check(self, width: int, height: int) -> None:
        """Raise the `RowError` an image of this size gets; nothing when it is within every limit."""
        if width == 0 or height == 0:
            raise RowError("image_empty", f"{width}x{height}")
        if width * height > self.max_pixels:
            raise RowError("image_too_large", f"{width}x{height} is too many pixels (limit {self.max_pixels})")
        if max(width, height) > self.max_side:
            raise RowError("image_too_large", f"{width}x{height}: a side is longer than the limit of "
                                              f"{self.max_side} pixels")
        ratio = max(width, height) / min(width, height)
        if ratio > self.max_aspect_ratio:
            raise RowError("image_aspect_ratio", f"{width}x{height}: aspect ratio {ratio:.1f} > limit "
                                                 f"{self.max_aspect_ratio:g}")


def read_image_bytes(image_folder: str, name: str, allow_outside: bool = False) -> bytes:
    """A row's image, named relative to `image_folder`. A name that leads outside it (`..`, an absolute path, a URI,
    a symlink out of a local folder) is an `image_path_outside_folder` reject unless `allow_outside` (the setting
    `prepare.allow_paths_outside_image_folder`): a row must not read whatever file the process can."""
    return read_media_bytes(image_folder, name, allow_outside)


def read_media_bytes(image_folder: str, name: str, allow_outside: bool = False, kind: str = "image",
                     max_bytes: int | None = None) -> bytes:
    """`read_image_bytes` for any medium a row names (`kind` "image" or "video"; rejects are `<kind>_missing`,
    `<kind>_unreadable`, `<kind>_path_outside_folder`), refused as `<kind>_too_large` from its size before it is
    read when it is over `max_bytes`."""
    if allow_outside:
        path = name if storage.is_remote(name) or name.startswith("/") else storage.join(image_folder, name)
    else:
        path = confined_path(image_folder, name, kind)
    try:
        if max_bytes is not None and storage.size(path) > max_bytes:
            raise RowError(f"{kind}_too_large", f"{path}: {storage.size(path)} bytes, over the limit of {max_bytes}")
        return storage.read_bytes(path)
    except (FileNotFoundError, OSError) as error:
        if not storage.exists(path):
            raise RowError(f"{kind}_missing", path) from error
        raise RowError(f"{kind}_unreadable", f"{path}: {error}") from error


def confined_path(image_folder: str, name: str, kind: str = "image") -> str:
    """`name` inside `image_folder` (local, or `s3://bucket/prefix` where `..` is resolved as text), or a RowError."""
    if storage.is_remote(name) or name.startswith("/"):
        raise RowError(f"{kind}_path_outside_folder", f"{name!r}: an absolute path or URI, not a name in the folder")
    if "\0" in name:
        raise RowError(f"{kind}_missing", f"{name!r}: a name with a NUL character")
    relative = posixpath.normpath(name)
    if relative == ".." or relative.startswith("../"):
        raise RowError(f"{kind}_path_outside_folder", f"{name!r} leads out of {image_folder}")
    if storage.is_remote(image_folder):
        return storage.join(image_folder, relative)
    folder = os.path.realpath(image_folder)
    path = os.path.realpath(os.path.join(folder, relative))  # symlinks resolved: one may point out of the folder
    if os.path.commonpath([folder, path]) != folder:
        raise RowError(f"{kind}_path_outside_folder", f"{name!r} resolves to {path}, outside {folder}")
    return path


def decode_image(data: bytes, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """An RGB image from encoded bytes of any format PIL reads (a GIF saved as .jpg decodes as the GIF it is), once
    its header shows it within `limits`."""
    if not data:
        raise RowError("image_empty", "zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            limits.check(*image.size)  # the size is read from the header, before any pixel is decoded
            image.load()
    except RowError:
        raise
    except UnidentifiedImageError as error:
        raise RowError("not_an_image", str(error)) from error
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise RowError("image_too_large", str(error)) from error
    except (OSError, SyntaxError, ValueError) as error:
        raise RowError("image_corrupt", str(error)) from error
    image = ImageOps.exif_transpose(image)
    return image.convert("RGB")


def pad_to_square(image: Image.Image, fill: tuple[int, int, int] | int) -> Image.Image:
    """LLaVA-1.5's `pad` aspect-ratio mode: centre the image on a square canvas of `fill`. Models pad through their
    processor (`processors.llava_image_processor`); this serves the stand-in tower's pretraining, whose label masks are
    padded alongside their scenes."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def mean_colour(image_processor) -> tuple[int, int, int]:
    """The processor's mean as 8-bit RGB, truncated as the official `expand2square` and transformers'
    `LlavaImageProcessor` compute its pad colour: (122, 116, 104) for CLIP."""
    return tuple(int(c * 255) for c in image_processor.image_mean)


def blank_image(image_processor, size: int = 64) -> Image.Image:
    """An image with no content (the mean colour): the evaluation's image-blind baseline."""
    return Image.new("RGB", (size, size), mean_colour(image_processor))


def processed_uint8(image_processor, decoded: list[Image.Image]) -> np.ndarray:
    """The processor's resize + centre crop without its rescale and normalise: (N, 3, H, W) uint8.

    The CLIP processors resize in 8-bit, so this is exactly what the float pixels are computed from: storing it
    loses nothing (`normalisation` gives the affine that finishes the job in the trainer).
    """
    pixels = image_processor(images=decoded, do_rescale=False, do_normalize=False, return_tensors="np")["pixel_values"]
    return np.ascontiguousarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


def normalisation(image_processor) -> tuple[list[float], list[float]]:
    """Per-channel (scale, offset) with float pixel = uint8 * scale + offset, as the processor computes it."""
    mean = np.asarray(image_processor.image_mean, dtype=np.float64)
    std = np.asarray(image_processor.image_std, dtype=np.float64)
    rescale = image_processor.rescale_factor if image_processor.do_rescale else 1.0
    scale = rescale / std if image_processor.do_normalize else np.full(3, rescale)
    offset = -mean / std if image_processor.do_normalize else np.zeros(3)
    return scale.tolist(), offset.tolist()
