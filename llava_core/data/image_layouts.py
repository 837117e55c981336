"""How a family's images are stored in a shard, how many tokens each takes, and how a micro-batch's images become
the model's pixel inputs again. Both directions of one shard format live here, so they cannot drift apart.

- **Crops** (`llava`, layouts `pad` / `square`): one view per image, stored as the processor's final crop in uint8
  (after pad/resize/crop, before rescale and normalise) with the per-channel affine that turns it into the model's
  float32 pixels: lossless (the processor's float output is exactly `uint8 * scale + offset`), 4x smaller than
  float32, ~0.2 ms per 336 px image in the trainer. Every image is `image_seq_length` tokens (576 for CLIP-336).
- **Tiles** (`llava_next` / `llava_onevision`, layouts `anyres`, `anyres_max_N`, `pad` = one 1x1 grid): the image's
  encoded bytes as read (checked by decoding them), its (height, width) and its exact `<image>` token count from the
  processor (`processors.image_token_counts`: base view + unpadded tiles + row newlines, OneVision's shrink past N
  tiles). The trainer runs the family's own image processor on the decoded bytes, so the tiles it sees are the
  ones serving computes. Storing the tiles instead would be 10 views x 384 x 384 x 3 = 4.4 MB a OneVision image,
  14 TB for its 3.2M single-image rows, against ~0.1-0.3 MB of JPEG.
- **Video** (`llava_onevision` only, column `video`): the sampled frames (`data.video`: exactly
  `prepare.video_frames` of them) squashed to the tower's tile by the frame processor (`processors.frame_processor`,
  what LlavaOnevisionVideoProcessor does), as uint8 (frames, 3, tile, tile) with the same per-channel affine as the
  crops, and the `<video>` token count (`video_tokens`: frames x 196 + 1 = 6,273 at SigLIP-384). At real size that is
  32 x 3 x 384 x 384 = 14.2 MB a video row (56.6 MB as float32), against a few MB for a typical 10-60 s source
  clip and up to gigabytes for a long one. Why frames and not the file: sampling a video is slow and uneven CPU work
  (measured here on one core for a 30 s 640x360 clip: ~350 ms to seek and decode 32 frames, ~470 ms to squash them
  to 384 px, against ~13 ms for a JPEG), too slow to repeat in every epoch's trainer and too variable to keep ranks
  in step, while 14 MB reads in milliseconds. The uint8 frames lose nothing against the float pixels (PIL resizes
  in 8 bits) and serving squashes its frames with the same function. A few hundred thousand video rows (OneVision's
  video share) are terabytes of shards: storing the sampled frames as JPEG (~1 MB a row) is the next step if that is
  too much, at ~32 small JPEG decodes per row in the trainer.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from llava_core.data import images

EMPTY = {"pixel_values": None}
NO_VIDEO = {"video": {"uint8": b"", "scale": [], "offset": []}, "video_tokens": 0}  # the columns of a row without one


@dataclass
class PreparedImages:
    token_counts: list[int]  # the `<image>` tokens of each image, in order
    columns: dict  # the shard columns that hold them


class CropImages:
    """Prepare side of the crop format (LLaVA-1.5): the processor the model trains with and its export saves
    (`shard_images`; for a new model `processors.base_processor`, whose image processor pads to a square for `pad`)
    computes the crops, so prepare and every reader of the export agree."""

    def __init__(self, processor, tower_path: str, limits: images.ImageLimits):
        from llava_core.model.families import features_per_view, vision_config
        from llava_core.model.tokens import IMAGE_TOKEN

        self.tokenizer, self.image_processor = processor.tokenizer, processor.image_processor
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.tokens_per_image = features_per_view(vision_config(tower_path))
        self.limits = limits
        self.scale, self.offset = images.normalisation(self.image_processor)

    def prepare(self, encoded: list[bytes]) -> PreparedImages:
        return PreparedImages([self.tokens_per_image] * len(encoded), self.columns(self._uint8(encoded)))

    def columns(self, data: bytes = b"") -> dict:
        return {"pixel_values": {"uint8": data, "scale": self.scale, "offset": self.offset}, "images": [],
                "image_sizes": []}

    def _uint8(self, encoded: list[bytes]) -> bytes:
        """The processed crops, (num_images, 3, H, W) uint8, as raw bytes; empty for text-only rows."""
        if not encoded:
            return b""
        decoded = [images.decode_image(data, self.limits) for data in encoded]
        return images.processed_uint8(self.image_processor, decoded).tobytes()


class TiledImages:
    """Prepare side of the tile format (LLaVA-NeXT, LLaVA-OneVision)."""

    def __init__(self, processor, family_name: str, limits: images.ImageLimits):
        from llava_core.model.families import family
        from llava_core.model.tokens import IMAGE_TOKEN

        self.family = family(family_name)
        self.processor = processor
        self.tokenizer = self.processor.tokenizer
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.limits = limits

    def prepare(self, encoded: list[bytes]) -> PreparedImages:
        from llava_core.model.processors import image_token_counts

        sizes = [_height_width(images.decode_image(data, self.limits)) for data in encoded]
        counts = image_token_counts(self.processor, sizes, self.family) if sizes else []
        return PreparedImages(counts, self.columns(list(encoded), sizes))

    def columns(self, encoded: list | None = None, sizes: list | None = None) -> dict:
        return {"pixel_values": {"uint8": b"", "scale": [], "offset": []}, "images": encoded or [],
                "image_sizes": [list(s) for s in sizes or []]}


def shard_images(vision_path: str, llm_path: str, family_name: str, layout: str, template: str,
                 limits: images.ImageLimits, checkpoint: str = ""):
    """The prepare side of `family_name`'s shard format, with the processor the model trains with: a `checkpoint`'s
    own saved one when the stage starts from one (what `build.load_llava` loads beside it: its media token ids, image
    processing and tile grids), else the one a fresh model is assembled with from the base models."""
    from llava_core.model.families import family
    from llava_core.model.processors import base_processor, saved_processor

    if checkpoint:
        processor, tower_path = saved_processor(checkpoint), checkpoint
    else:
        processor = base_processor(family(family_name), vision_path, llm_path, template, layout)
        tower_path = vision_path
    if family_name == "llava":
        return CropImages(processor, tower_path, limits)
    return TiledImages(processor, family_name, limits)


@dataclass
class PreparedVideo:
    token_count: int  # the `<video>` tokens it expands to
    columns: dict  # the shard columns that hold it


class VideoFrames:
    """Prepare side of the video format (LLaVA-OneVision): sampled frames, squashed and stored as uint8."""

    def __init__(self, processor, sampling, limits: images.ImageLimits):
        from llava_core.model.processors import frame_processor

        self.processor, self.frames = processor, frame_processor(processor)
        self.video_token_id = processor.video_token_id
        self.sampling, self.limits = sampling, limits
        self.scale, self.offset = images.normalisation(processor.image_processor)

    def prepare(self, image_folder: str, spec, allow_outside: bool = False) -> PreparedVideo:
        from llava_core.data import video
        from llava_core.model.processors import video_token_count

        squashed = self.frames.squash(video.read_video(image_folder, spec, self.sampling, self.limits, allow_outside))
        frames, _, height, width = squashed.shape
        count = video_token_count(self.processor, frames, height, width)
        columns = {"video": {"uint8": squashed.tobytes(), "scale": self.scale, "offset": self.offset},
                   "video_tokens": count}
        return PreparedVideo(count, columns)


def shard_videos(images_side, family_name: str, sampling, limits: images.ImageLimits) -> VideoFrames | None:
    """The prepare side of the video format for a family whose model takes videos (OneVision), else None."""
    from llava_core.model.families import family

    return VideoFrames(images_side.processor, sampling, limits) if family(family_name).takes_videos() else None


def _height_width(image) -> tuple[int, int]:
    return image.height, image.width


# --- the trainer's side: a micro-batch's stored images -> the model's pixel inputs -------------------------------


def stored_pixels(record: dict, shape: tuple[int, ...]) -> np.ndarray:
    """A stored uint8 array (crops or video frames) as the model's float32 pixels: uint8 * scale + offset."""
    uint8 = np.frombuffer(record["uint8"], dtype=np.uint8).reshape(-1, *shape)
    scale = np.asarray(record["scale"], dtype=np.float32).reshape(1, -1, 1, 1)
    offset = np.asarray(record["offset"], dtype=np.float32).reshape(1, -1, 1, 1)
    return uint8.astype(np.float32) * scale + offset


class CropPixels:
    """Stored uint8 crops -> float32 `pixel_values` (N, 3, H, W), in row order."""

    columns = ("pixel_values",)

    def __init__(self, image_shape: tuple[int, int, int], tokens_per_image: int = 0):
        self.image_shape, self.tokens_per_image = tuple(image_shape), tokens_per_image

    def __call__(self, records: list) -> dict:
        crops = [stored_pixels(record, self.image_shape) for record in records if record and record["uint8"]]
        return {"pixel_values": torch.from_numpy(np.concatenate(crops))} if crops else dict(EMPTY)

    @staticmethod
    def views(batch: dict) -> int:
        """Tower passes of a collated micro-batch (for the FLOP count): one per image."""
        return 0 if batch["pixel_values"] is None else batch["pixel_values"].shape[0]

    def blank(self) -> tuple[dict, int]:
        """One blank image's inputs and its token count (a text-only micro-batch's stand-in image)."""
        return {"pixel_values": torch.zeros(1, *self.image_shape)}, self.tokens_per_image


class TilePixels:
    """Stored encoded images -> the family's image processor's `pixel_values` (N, max views, 3, tile, tile) and
    `image_sizes`, plus OneVision's `batch_num_images` per sample (an image of a several-image sample is its base
    view alone). Under packing a row holds several samples; `batch_num_images` stays per sample, which is all the
    model reads it for. OneVision's stored videos become `pixel_values_videos` (videos, frames, 3, tile, tile) in row
    order, the order the model fills the `<video>` tokens in."""

    def __init__(self, processor, family_name: str):
        from llava_core.model.families import family

        self.processor, self.family = processor, family(family_name)
        self.columns = ("images", "video") if self.family.takes_videos() else ("images",)
        self._blank: tuple[dict, int] | None = None  # made on first use, by `blank`

    def __call__(self, rows: list, videos: list | None = None) -> dict:
        per_sample = [[images.decode_image(data) for data in row] for row in rows if row]
        inputs = self._pixels(per_sample) if per_sample else dict(EMPTY)
        return {**inputs, **self._videos(videos or [])}

    def _videos(self, records: list) -> dict:
        size = self.processor.image_processor.size  # the frame processor squashes every frame to it
        clips = [stored_pixels(record, (3, size["height"], size["width"])) for record in records
                 if record and record["uint8"]]
        if not clips:
            return {}
        if len({clip.shape[0] for clip in clips}) > 1:
            raise ValueError(f"a micro-batch's videos have {sorted({c.shape[0] for c in clips})} frames; the model "
                             "needs equal counts: prepare every dataset with the same prepare.video_frames")
        return {"pixel_values_videos": torch.from_numpy(np.stack(clips))}

    def _pixels(self, per_sample: list[list]) -> dict:
        """The images as inference gives them to the processor (`processor_images`): OneVision's per sample, so an
        image of a several-image sample becomes a square base view, said in `batch_num_images`."""
        out = self.processor.image_processor(images=processor_images(self.family.name, per_sample),
                                             return_tensors="pt")
        several = self.family.base_view_for_several_images
        keys = ("pixel_values", "image_sizes", "batch_num_images") if several else ("pixel_values", "image_sizes")
        return {key: out[key] for key in keys}

    def views(self, inputs: dict) -> int:
        """Tower passes of a collated micro-batch (for the FLOP count): the views the model keeps of each image (the
        processor pads every image to the most), and one per video frame."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        videos = inputs.get("pixel_values_videos")
        frames = 0 if videos is None else videos.shape[0] * videos.shape[1]  # one tower pass a frame
        if inputs["pixel_values"] is None:
            return frames
        tile = tile_side(self.processor.image_processor)
        pinpoints = self.processor.image_processor.image_grid_pinpoints
        several = inputs.get("batch_num_images")
        base_only = [n > 1 for n in several.tolist() for _ in range(n)] if several is not None else None
        views = [1 if base_only and base_only[i] else image_size_to_num_patches(size.tolist(), pinpoints, tile)
                 for i, size in enumerate(inputs["image_sizes"])]
        return frames + sum(views)

    def blank(self) -> tuple[dict, int]:
        """Made once: every text-only micro-batch of the run gets the same blank image (the model never writes into
        its inputs). Kept on the instance: a `functools.cache` on the method would keep every instance alive."""
        from llava_core.model.processors import image_token_counts

        if self._blank is None:
            tile = tile_side(self.processor.image_processor)
            image = images.blank_image(self.processor.image_processor, tile)
            self._blank = self._pixels([[image]]), image_token_counts(self.processor, [(tile, tile)], self.family)[0]
        return self._blank


def processor_images(family_name: str, per_sample: list[list]) -> list | None:
    """A batch's images (per sample, decoded) as the family's processor takes them: flat for LLaVA-1.5 (whose
    processor pads them) and LLaVA-NeXT (whose processor tiles them); OneVision per sample, so an image of a
    several-image sample becomes its base view alone. The processor does every pixel step itself, as it does in any
    other reader of the export."""
    from llava_core.model.families import family

    if not any(per_sample):
        return None
    if family(family_name).base_view_for_several_images:
        return [list(sample) for sample in per_sample if sample]
    return [image for sample in per_sample for image in sample]


def tile_side(image_processor) -> int:
    """The side of one tile: LLaVA-NeXT's processor crops tiles to `crop_size`, OneVision's resizes to `size`."""
    crop = getattr(image_processor, "crop_size", None)
    return crop["height"] if crop else image_processor.size["height"]


def pixel_inputs(processor, family_name: str, model_config):
    """The trainer side of `family_name`'s shard format, for a model with `model_config`."""
    if family_name == "llava":
        crop = processor.image_processor.crop_size
        return CropPixels((3, crop["height"], crop["width"]), model_config.image_seq_length)
    return TilePixels(processor, family_name)
